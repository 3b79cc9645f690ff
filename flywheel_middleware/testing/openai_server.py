"""A loopback HTTP server that speaks enough of the OpenAI protocol for tests and benchmarks.

Real ``openai`` SDK clients (and anything else that talks OpenAI over HTTP: AgentScope's
``OpenAIChatModel``, LangChain's ``ChatOpenAI``, an LLM judge) point ``base_url`` at it, so
tests exercise the real client code, SSE streaming included, without a paid API.

Endpoints: ``POST /v1/chat/completions`` (plain and ``stream=True``, with
``stream_options.include_usage``), ``POST /v1/responses`` (plain and streaming, text and
function-call output items with their SSE events), ``POST /v1/embeddings`` (float and base64)
and ``GET /v1/models``.

Structured outputs: a request with ``response_format`` (chat) or ``text.format`` (responses) of
type ``json_schema`` is answered, by default, with JSON that fits the schema (every string is
the echo text, integers count its words, arrays hold one item), so the SDK's ``parse()`` and
``stream()`` helpers get a value their pydantic model accepts; ``json_object`` gets
``{"answer": "<echo text>"}``. A scripted ``str`` answer is sent as given.

Scripting answers::

    with OpenAIServer() as server:
        server.enqueue("first answer", Reply(status=429, error="slow down"))  # next answers
        server.set_responder(lambda req: '{"score": 0.9}')                     # then this
        client = server.client()            # openai.OpenAI(base_url=..., max_retries=0)
        ...
        server.requests[-1].body            # what the client sent
        server.max_in_flight                # highest number of concurrent requests seen

A responder (or a queued item) may return a ``str`` (the assistant text), a ``Reply``, or a
``dict`` (sent verbatim as the JSON body). Without either, the server echoes the last user
message as ``"echo: <text>"``. Token usage counts whitespace-separated words.
``Reply(refusal="...")`` answers a chat completion with a refusal instead of content;
``Reply(prelude=[{...}])`` sends those chunk bodies first in a chat stream, as they are (an
Azure-style ``prompt_filter_results`` chunk with no choices, say).
"""

from __future__ import annotations

import base64
import collections
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OpenAIServer", "Reply", "Request", "openai_server_fixture"]


@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def endpoint(self) -> str:
        """``chat``, ``responses``, ``embeddings`` or ``models``."""
        tail = self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return {"completions": "chat"}.get(tail, tail)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    def last_user_text(self) -> str:
        """The text of the last user message (chat) or of the input (responses)."""
        if self.endpoint == "chat":
            for message in reversed(self.body.get("messages") or []):
                if message.get("role") == "user":
                    return _text_of(message.get("content"))
            return ""
        value = self.body.get("input")
        if isinstance(value, list):
            for item in reversed(value):
                if isinstance(item, dict) and item.get("role", "user") == "user":
                    return _text_of(item.get("content"))
            return ""
        return _text_of(value)

    def output_format(self) -> dict[str, Any] | None:
        """The structured-output format asked for, normalised to ``{"type", "schema"}``:
        chat's ``response_format`` or responses' ``text.format``; None for plain text."""
        if self.endpoint == "chat":
            fmt = self.body.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                return {"type": "json_schema", **(fmt.get("json_schema") or {})}
        else:
            fmt = (self.body.get("text") or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
            return fmt
        return None


@dataclass
class Reply:
    """A scripted answer: text and/or tool calls, or an HTTP error (``status`` >= 400)."""

    content: str | None = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    error: str | dict[str, Any] | None = None
    delay: float = 0.0
    model: str | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    refusal: str | None = None
    prelude: list[dict[str, Any]] = field(default_factory=list)  # chat stream: sent first, as is


Responder = Callable[[Request], "str | Reply | dict[str, Any]"]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(str(part.get("text") or part.get("content") or ""))
            else:
                parts.append(str(part))
        return " ".join(p for p in parts if p)
    return "" if content is None else str(content)


def _count_tokens(text: str) -> int:
    return len(text.split())


def _prompt_tokens(req: Request) -> int:
    if req.endpoint == "chat":
        return sum(
            _count_tokens(_text_of(m.get("content"))) for m in req.body.get("messages") or []
        )
    if req.endpoint == "embeddings":
        value = req.body.get("input")
        items = value if isinstance(value, list) else [value]
        return sum(_count_tokens(_text_of(v)) for v in items)
    value = req.body.get("input")
    if isinstance(value, list):
        return sum(
            _count_tokens(_text_of(v.get("content") if isinstance(v, dict) else v)) for v in value
        )
    return _count_tokens(_text_of(value)) + _count_tokens(str(req.body.get("instructions") or ""))


def _pieces(text: str) -> list[str]:
    """Split text into stream deltas that concatenate back to exactly ``text``."""
    if not text:
        return []
    out: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == " " and i > start:
            out.append(text[start:i])
            start = i
    out.append(text[start:])
    return out


def _embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector derived from the text (same text, same vector)."""
    seed = sum((i + 1) * ord(c) for i, c in enumerate(text)) or 1
    vec = [math.sin(seed * (k + 1) * 0.618) for k in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _from_schema(schema: Any, text: str, defs: dict[str, Any], depth: int = 0) -> Any:
    """A value that fits ``schema`` (the subset structured outputs use), built from ``text``."""
    if not isinstance(schema, dict) or depth > 20:
        return text
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _from_schema(defs.get(ref.rsplit("/", 1)[-1]), text, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    options = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
    if options:
        chosen = next((o for o in options if o.get("type") != "null"), options[0])
        return _from_schema(chosen, text, defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: _from_schema(v, text, defs, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [_from_schema(schema.get("items") or {}, text, defs, depth + 1)]
    if kind == "integer":
        return _count_tokens(text)
    if kind == "number":
        return float(_count_tokens(text))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _structured(fmt: dict[str, Any], text: str) -> str:
    """The JSON text answering a structured-output request."""
    if fmt.get("type") == "json_object":
        return json.dumps({"answer": text})
    schema = fmt.get("schema") or {}
    defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    return json.dumps(_from_schema(schema, text, defs))


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up (closed streams, pooled connections at exit) are not errors here."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class OpenAIServer:
    """A threaded loopback server; start with ``with`` or ``start()``/``stop()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, model: str = "gpt-test") -> None:
        self.model = model
        self.delay = 0.0
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._queue: collections.deque[Any] = collections.deque()
        self._responder: Responder | None = None
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = _QuietServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """The ``base_url`` an OpenAI client needs (ends in ``/v1``)."""
        return f"http://{self._httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> OpenAIServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- scripting --------------------------------------------------------------------------

    def enqueue(self, *answers: str | Reply | dict[str, Any]) -> None:
        """Answer the next requests with these, in order (before the responder)."""
        with self._lock:
            self._queue.extend(answers)

    def set_responder(self, responder: Responder | None) -> None:
        """Answer every request (once the queue is empty) with ``responder(request)``."""
        self._responder = responder

    def reset(self) -> None:
        """Forget recorded requests, queued answers, the responder and the concurrency peak."""
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.max_in_flight = 0
        self._responder = None
        self.delay = 0.0

    def client(self, **kwargs: Any) -> Any:
        """A real ``openai.OpenAI`` client for this server (no retries unless asked)."""
        import openai

        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key="sk-test", **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        """A real ``openai.AsyncOpenAI`` client for this server."""
        import openai

        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="sk-test", **kwargs)

    # -- answering --------------------------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def _answer(self, req: Request) -> Reply | dict[str, Any]:
        with self._lock:
            item = self._queue.popleft() if self._queue else None
        if item is None:
            if self._responder is not None:
                item = self._responder(req)
            else:
                item = "echo: " + req.last_user_text()
                fmt = req.output_format()
                if fmt is not None:
                    item = _structured(fmt, item)
        if isinstance(item, str):
            return Reply(content=item)
        return item

    def _enter(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


# -- response bodies ----------------------------------------------------------------------


def _error_body(reply: Reply) -> dict[str, Any]:
    if isinstance(reply.error, dict):
        return {"error": reply.error}
    return {
        "error": {
            "message": reply.error or f"scripted error {reply.status}",
            "type": "invalid_request_error" if reply.status < 500 else "server_error",
            "param": None,
            "code": None,
        }
    }


def _usage(server: OpenAIServer, req: Request, reply: Reply) -> tuple[int, int]:
    prompt = reply.input_tokens if reply.input_tokens is not None else _prompt_tokens(req)
    completion = (
        reply.output_tokens
        if reply.output_tokens is not None
        else _count_tokens(reply.refusal if reply.refusal is not None else reply.content or "")
        + sum(_count_tokens(json.dumps(t.get("arguments", {}))) for t in reply.tool_calls)
    )
    return prompt, completion


def _tool_call_json(call: dict[str, Any], index: int) -> dict[str, Any]:
    args = call.get("arguments", {})
    return {
        "index": index,
        "id": call.get("id") or f"call_{index}",
        "type": "function",
        "function": {
            "name": call["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args),
        },
    }


def _chat_body(server: OpenAIServer, req: Request, reply: Reply) -> dict[str, Any]:
    prompt, completion = _usage(server, req, reply)
    content = None if reply.refusal is not None else reply.content
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": reply.refusal}
    if reply.tool_calls:
        message["tool_calls"] = [
            {k: v for k, v in _tool_call_json(c, i).items() if k != "index"}
            for i, c in enumerate(reply.tool_calls)
        ]
    return {
        "id": server._next_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model or req.body.get("model") or server.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": reply.finish_reason
                or ("tool_calls" if reply.tool_calls else "stop"),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _chat_stream(server: OpenAIServer, req: Request, reply: Reply) -> Iterator[str]:
    cid = server._next_id("chatcmpl")
    created = int(time.time())
    model = reply.model or req.body.get("model") or server.model
    include_usage = bool((req.body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    for body in reply.prelude:  # e.g. Azure's prompt_filter_results chunk (no choices)
        yield f"data: {json.dumps(body)}\n\n"
    yield chunk({"role": "assistant", "content": ""})
    if reply.refusal is not None:
        for piece in _pieces(reply.refusal):
            yield chunk({"refusal": piece})
    else:
        for piece in _pieces(reply.content or ""):
            yield chunk({"content": piece})
    for i, call in enumerate(reply.tool_calls):
        yield chunk({"tool_calls": [_tool_call_json(call, i)]})
    yield chunk({}, reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop"))
    if include_usage:
        prompt, completion = _usage(server, req, reply)
        usage_chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        yield f"data: {json.dumps(usage_chunk)}\n\n"
    yield "data: [DONE]\n\n"


def _responses_body(
    server: OpenAIServer, req: Request, reply: Reply, rid: str | None = None
) -> dict[str, Any]:
    prompt, completion = _usage(server, req, reply)
    output: list[dict[str, Any]] = []
    if reply.content is not None:
        output.append(
            {
                "type": "message",
                "id": f"msg_{rid or 'x'}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply.content, "annotations": []}],
            }
        )
    for i, call in enumerate(reply.tool_calls):
        tc = _tool_call_json(call, i)
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{i}",
                "call_id": tc["id"],
                "name": tc["function"]["name"],
                "arguments": tc["function"]["arguments"],
                "status": "completed",
            }
        )
    return {
        "id": rid or server._next_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": reply.model or req.body.get("model") or server.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": req.body.get("instructions"),
        "metadata": {},
        "temperature": req.body.get("temperature"),
        "top_p": None,
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
    }


def _responses_stream(server: OpenAIServer, req: Request, reply: Reply) -> Iterator[str]:
    rid = server._next_id("resp")
    seq = iter(range(1_000_000))
    final = _responses_body(server, req, reply, rid)
    in_progress = dict(final, status="in_progress", output=[], usage=None)

    def event(name: str, data: dict[str, Any]) -> str:
        data = {"type": name, "sequence_number": next(seq), **data}
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    yield event("response.created", {"response": in_progress})
    yield event("response.in_progress", {"response": in_progress})
    text = reply.content or ""
    if reply.content is not None:
        item_id = f"msg_{rid}"
        item = {
            "type": "message",
            "id": item_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        yield event("response.output_item.added", {"output_index": 0, "item": item})
        part = {"type": "output_text", "text": "", "annotations": []}
        ids = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield event("response.content_part.added", {**ids, "part": part})
        for piece in _pieces(text):
            yield event("response.output_text.delta", {**ids, "delta": piece, "logprobs": []})
        yield event("response.output_text.done", {**ids, "text": text, "logprobs": []})
        yield event("response.content_part.done", {**ids, "part": dict(part, text=text)})
        yield event("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
    for index, item in enumerate(final["output"]):
        if item["type"] != "function_call":
            continue
        ids = {"item_id": item["id"], "output_index": index}
        added = dict(item, arguments="", status="in_progress")
        yield event("response.output_item.added", {"output_index": index, "item": added})
        yield event("response.function_call_arguments.delta", {**ids, "delta": item["arguments"]})
        yield event(
            "response.function_call_arguments.done",
            {**ids, "name": item["name"], "arguments": item["arguments"]},
        )
        yield event("response.output_item.done", {"output_index": index, "item": item})
    yield event("response.completed", {"response": final})


def _embeddings_body(server: OpenAIServer, req: Request, reply: Reply) -> dict[str, Any]:
    value = req.body.get("input")
    items = value if isinstance(value, list) else [value]
    dims = int(req.body.get("dimensions") or 8)
    as_base64 = req.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vec = _embedding(_text_of(item), dims)
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_base64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    prompt = reply.input_tokens if reply.input_tokens is not None else _prompt_tokens(req)
    return {
        "object": "list",
        "data": data,
        "model": req.body.get("model") or server.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else small responses wait ~40 ms for delayed ACKs

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
            pass

        def _send_json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write
            self.flush_headers()

        def _send_stream(self, events: Iterator[str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for text in events:
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.rstrip("/").endswith("/models"):
                self._send_json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {"id": server.model, "object": "model", "created": 0, "owned_by": "t"}
                        ],
                    },
                )
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                self._send_json(400, {"error": {"message": "request body is not JSON"}})
                return
            req = Request("POST", self.path, dict(self.headers.items()), body)
            server._enter(req)
            try:
                self._dispatch(req)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                server._leave()

        def _dispatch(self, req: Request) -> None:
            endpoint = req.endpoint
            if endpoint not in {"chat", "responses", "embeddings"}:
                self._send_json(404, {"error": {"message": f"no route {req.path}"}})
                return
            try:
                reply = server._answer(req)
            except Exception as exc:  # a broken responder is the test's bug: say so
                self._send_json(500, {"error": {"message": f"responder failed: {exc!r}"}})
                return
            delay = server.delay + (reply.delay if isinstance(reply, Reply) else 0.0)
            if delay:
                time.sleep(delay)
            if isinstance(reply, dict):
                self._send_json(200, reply)
                return
            if reply.status >= 400:
                self._send_json(reply.status, _error_body(reply))
                return
            if endpoint == "embeddings":
                self._send_json(200, _embeddings_body(server, req, reply))
            elif endpoint == "chat":
                if req.stream:
                    self._send_stream(_chat_stream(server, req, reply))
                else:
                    self._send_json(200, _chat_body(server, req, reply))
            elif req.stream:
                self._send_stream(_responses_stream(server, req, reply))
            else:
                self._send_json(200, _responses_body(server, req, reply))

    return Handler


def openai_server_fixture() -> Iterator[OpenAIServer]:
    """Body of the ``openai_server`` pytest fixture: a started server, stopped afterwards."""
    with OpenAIServer() as server:
        yield server


def main() -> None:
    """``python -m flywheel_middleware.testing.openai_server [--port N]``: serve until killed
    (a server in its own process, e.g. for benchmarks that must not share the GIL with it)."""
    import argparse

    parser = argparse.ArgumentParser(description="Loopback OpenAI-protocol server (echoes).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = OpenAIServer(args.host, args.port)
    print(server.base_url, flush=True)
    server._httpd.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
