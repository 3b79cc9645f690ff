"""One message normalizer: any recorded input or output as a list of OpenAI-style chat messages.

Pure data (no imports beyond the standard library), at the bottom layer so the importers, the
exporters, the CLI and the dashboard read messages one way. A message is ``{"role", "content"}``
plus ``tool_calls`` (OpenAI shape) on assistant turns and ``tool_call_id`` on tool turns.

Handled: OpenAI chat (string content and content-part lists, completions responses), OpenAI
Responses input items and responses, OpenTelemetry GenAI ``parts`` messages, LangChain messages
as stored (dicts with ``type``/``role``, the ``{"lc": 1, ...}`` constructor form, ``(role, text)``
pairs, LLMResult ``generations``), graph state ``{"messages": [...]}``, AgentScope ``Msg`` dicts
and the old Studio schema's ``Msg(...)`` reprs, OpenLLMetry's ``traceloop.entity.*`` wrappers,
and plain strings. A value none of these fit is
counted in an :class:`Unknown` (with one example) rather than turned into empty text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

ROLES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
}
_LC_CLASSES = {
    "HumanMessage": "user",
    "HumanMessageChunk": "user",
    "AIMessage": "assistant",
    "AIMessageChunk": "assistant",
    "SystemMessage": "system",
    "ToolMessage": "tool",
    "FunctionMessage": "tool",
}
# The keys a plain dict holds its text under, by what is read: a question (the default role
# "user") or an answer ("assistant"). Graph state, LCEL ``assign`` and AgentExecutor outputs
# hold both, so each side reads its own keys first.
_QUESTION_KEYS = ("content", "text", "question", "query", "input", "prompt")
_ANSWER_KEYS = ("answer", "output", "result", "response", "content", "text")
_TEXT_PART_TYPES = ("text", "input_text", "output_text")


@dataclass
class Unknown:
    """Values no known message shape fits: how many, and the first one (for the report)."""

    count: int = 0
    example: Any = None

    def add(self, value: Any) -> None:
        if self.count == 0:
            self.example = value
        self.count += 1

    def __str__(self) -> str:
        example = json.dumps(self.example, ensure_ascii=False, default=str)
        if len(example) > 200:
            example = example[:199] + "…"
        return f"{self.count} value(s) of an unknown message shape, e.g. {example}"


class _NotMessages(Exception):
    """Raised inside the normalizer when a value fits no known shape."""


def content_text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list | tuple):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and (
                part.get("type") in _TEXT_PART_TYPES or "type" not in part
            ):
                text = part.get("text", part.get("content"))
                if isinstance(text, str):
                    texts.append(text)
        return "\n".join(t for t in texts if t)
    raise _NotMessages


def _image_part(part: Any) -> dict[str, Any] | None:
    """An image content part in OpenAI chat's ``image_url`` shape (from chat's, Responses'
    ``input_image`` or GenAI's ``uri``/``blob`` parts), else None."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    image: Any = None
    if kind == "image_url":
        image = part.get("image_url")
    elif kind == "input_image":
        image = {"url": part.get("image_url"), "detail": part.get("detail")}
    elif kind == "uri" and part.get("modality") == "image":
        image = {"url": part.get("uri")}
    elif kind == "blob" and part.get("modality") == "image" and part.get("mime_type"):
        image = {"url": f"data:{part['mime_type']};base64,{part.get('content', '')}"}
    if isinstance(image, str):
        image = {"url": image}
    if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
        return None
    url = {k: v for k, v in image.items() if k in ("url", "detail") and v is not None}
    return {"type": "image_url", "image_url": url}


def _chat_content(role: str, content: Any) -> Any:
    """A message's content as text; a user's that holds images keeps them, as OpenAI chat's
    text and ``image_url`` parts in their order (what vision fine-tuning accepts)."""
    if role != "user" or not isinstance(content, list):
        return content_text(content)
    parts: list[dict[str, Any]] = []
    for part in content:
        image = _image_part(part)
        text = "" if image else content_text([part])
        if image or text.strip():
            parts.append(image or {"type": "text", "text": text})
    if not any(p["type"] == "image_url" for p in parts):
        return content_text(content)
    return parts


def _arguments(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)


def tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """One tool call in OpenAI's shape, from OpenAI's, LangChain's, GenAI's or AgentScope's.

    A Responses item's ``call_id`` is what its output answers (its ``id`` names the item)."""
    if isinstance(call.get("function"), dict):
        fn = call["function"]
        name, args = fn.get("name"), fn.get("arguments")
    else:
        name = call.get("name")
        args = call.get("args", call.get("arguments", call.get("input")))
    cid = call.get("call_id") or call.get("id") or ""
    return {
        "id": str(cid),
        "type": "function",
        "function": {"name": str(name), "arguments": _arguments(args)},
    }


_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool definition in OpenAI chat's shape: the Responses API declares a function's
    fields flat (``{"type": "function", "name", "parameters"}``), chat under ``function``."""
    if (
        tool.get("type") != "function"
        or "function" in tool
        or not isinstance(tool.get("name"), str)
    ):
        return tool
    return {"type": "function", "function": {k: tool[k] for k in _FUNCTION_FIELDS if k in tool}}


def _role(value: Any) -> str | None:
    return ROLES.get(str(value).lower()) if value is not None else None


def _from_parts(role: str, parts: list[Any]) -> list[Message]:
    """A GenAI ``parts`` message: text parts, tool_call parts, tool_call_response parts."""
    shown: list[dict[str, Any]] = []  # text and image parts
    calls: list[dict[str, Any]] = []
    responses: list[Message] = []
    for part in parts:
        if not isinstance(part, dict):
            raise _NotMessages
        kind = part.get("type")
        if kind == "text":
            shown.append({"type": "text", "text": str(part.get("content", part.get("text")) or "")})
        elif _image_part(part):
            shown.append(part)
        elif kind == "tool_call":
            calls.append(tool_call(part))
        elif kind == "tool_call_response":
            result = part.get("response", part.get("result"))
            text = result if isinstance(result, str) else _arguments(result)
            responses.append(_tool_turn(text, part.get("id")))
        # reasoning, file and other parts are no chat text
    out: list[Message] = []
    if shown or calls or not (parts or responses):
        msg: Message = {"role": role, "content": _chat_content(role, shown)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out + responses


def _tool_turn(text: str, call_id: Any) -> Message:
    return {"role": "tool", "content": text, "tool_call_id": str(call_id or "")}


_TOOL_BLOCKS = ("tool_use", "tool_call", "tool_result")
_NO_TURN = ("hint", "thinking")  # AgentScope blocks that are not a chat turn's text


def _agentscope_blocks(role: str, blocks: list[Any]) -> list[Message] | None:
    """AgentScope content blocks in their order (text; ``tool_use`` in 1.x, ``tool_call`` in 2.x;
    ``tool_result``): one reply Msg holds a whole ReAct turn, so a tool result closes the
    assistant turn that called it and later text opens the next. None if they are not that.
    """
    if not any(isinstance(b, dict) and b.get("type") in _TOOL_BLOCKS for b in blocks):
        return None
    out: list[Message] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []

    def close_turn() -> None:
        if texts or calls:
            msg: Message = {"role": role, "content": "\n".join(texts)}
            if calls:
                msg["tool_calls"] = list(calls)
            out.append(msg)
        texts.clear()
        calls.clear()

    for b in blocks:
        if not isinstance(b, dict):
            continue
        kind = b.get("type")
        if kind == "text":
            if calls:  # text after a call belongs to the next turn
                close_turn()
            texts.append(str(b.get("text", "")))
        elif kind in ("tool_use", "tool_call"):
            calls.append(tool_call(b))
        elif kind == "tool_result":  # Anthropic's says tool_use_id and content
            close_turn()
            output = b.get("output", b.get("content"))
            text = output if isinstance(output, str) else content_text(output)
            out.append(_tool_turn(text, b.get("id") or b.get("tool_use_id")))
    close_turn()
    return out


def _message(value: dict[str, Any], default_role: str) -> list[Message] | None:
    """One message dict of any framework (None when the dict is not a message)."""
    if value.get("lc") == 1 and isinstance(value.get("kwargs"), dict):
        cls = (value.get("id") or [""])[-1]
        role = _LC_CLASSES.get(cls)
        if role is None:
            return None
        return _message({**value["kwargs"], "role": role}, default_role)
    kind = value.get("type")
    if isinstance(kind, str) and kind in _RESPONSES_NO_TURN or kind == "reasoning":
        return []
    if isinstance(kind, str) and kind.endswith("_call_output"):  # function, custom, computer...
        output = value.get("output")
        text = output if isinstance(output, str) else content_text(output)
        return [_tool_turn(text, value.get("call_id") or value.get("id"))]
    if isinstance(kind, str) and kind.endswith("_call"):
        if kind != "function_call" and not value.get("call_id"):
            return []  # a hosted tool (web_search_call, ...): its result is no turn of its own
        return [{"role": "assistant", "content": "", "tool_calls": [_item_call(value)]}]
    role = _role(value.get("role")) or _role(kind)
    if role is None:
        return None
    if isinstance(value.get("parts"), list):
        return _from_parts(role, value["parts"])
    content = value.get("content")
    calls = value.get("tool_calls") or (value.get("additional_kwargs") or {}).get("tool_calls")
    if isinstance(content, list) and not (calls and role == "assistant"):
        # a LangChain message's tool_calls hold the parsed arguments; its content blocks may
        # not (Anthropic's streamed tool_use keeps ``input: {}`` beside its partial_json)
        blocks = _agentscope_blocks(role, content)
        if blocks is not None:
            return blocks
        if content and all(isinstance(b, dict) and b.get("type") in _NO_TURN for b in content):
            return []  # a reply Msg AgentScope opened with a runtime hint, before any answer
    msg: Message = {"role": role, "content": _chat_content(role, content)}
    if calls and role == "assistant":
        msg["tool_calls"] = [tool_call(c) for c in calls if isinstance(c, dict)]
    if role == "tool" and value.get("tool_call_id"):
        msg["tool_call_id"] = str(value["tool_call_id"])
    return [msg]


# Responses input items that are no chat turn: a reference to an earlier item.
_RESPONSES_NO_TURN = frozenset(("item_reference",))


def _item_call(item: dict[str, Any]) -> dict[str, Any]:
    """A Responses ``*_call`` item answered by a ``*_call_output`` as an OpenAI tool call:
    a custom tool's free-form ``input`` and a computer's ``action`` become JSON arguments."""
    kind = item["type"]
    if kind == "function_call":
        args = item.get("arguments")
    elif kind == "custom_tool_call":
        args = {"input": item.get("input")}
    else:
        args = item.get("action", item.get("arguments", item.get("input")))
    name = item.get("name") or kind.removesuffix("_call")
    return tool_call(
        {"call_id": item.get("call_id"), "id": item.get("id"), "name": name, "arguments": args}
    )


_MSG_REPR = re.compile(r"^\s*Msg\((.*)\)\s*$", re.S)


def _msg_repr(text: str) -> Message | None:
    """The old Studio schema's ``Msg(name='user', content='...', role='user')`` repr."""
    match = _MSG_REPR.match(text)
    if not match:
        return None
    try:
        call = ast.parse(f"f({match.group(1)})", mode="eval").body
    except SyntaxError:
        return None
    fields: dict[str, Any] = {}
    for kw in getattr(call, "keywords", []):
        try:
            fields[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            continue
    if "content" not in fields:
        return None
    role = _role(fields.get("role")) or ("user" if fields.get("name") == "user" else "assistant")
    return {"role": role, "content": content_text(fields["content"])}


def _walk(value: Any, default_role: str) -> list[Message]:
    if value is None:
        return []
    if isinstance(value, str):
        parsed = _msg_repr(value)
        return [parsed] if parsed else [{"role": default_role, "content": value}]
    if isinstance(value, list | tuple):
        pair = len(value) == 2 and isinstance(value[0], str) and _role(value[0])
        if pair and isinstance(value[1], str | list):
            return [{"role": _role(value[0]), "content": content_text(value[1])}]
        if (
            value
            and all(isinstance(v, list | tuple) for v in value)
            and not all(len(v) == 2 and isinstance(v[0], str) for v in value)
        ):
            return _walk(value[-1], default_role)  # LangChain passes a batch of message lists
        out: list[Message] = []
        for item in value:
            out.extend(_walk(item, default_role))
        return _merge_calls(out)
    if not isinstance(value, dict):
        raise _NotMessages
    if isinstance(value.get("messages"), list):  # graph state, chat request
        return _walk(value["messages"], default_role)
    if isinstance(value.get("messages"), str):  # LangGraph reads a string as a user message
        return [{"role": "user", "content": value["messages"]}]
    if isinstance(value.get("choices"), list) and value["choices"]:  # chat completion
        choice = value["choices"][0]
        if isinstance(choice, dict):
            return _walk(choice.get("message") or choice.get("text"), "assistant")
    if "generations" in value:  # a LangChain LLMResult
        gens = value["generations"]
        while isinstance(gens, list) and gens:
            gens = gens[-1] if isinstance(gens[-1], list) else gens[0]
        if isinstance(gens, dict):
            return _walk(gens.get("message") or gens.get("text"), "assistant")
    if value.get("object") == "response" and isinstance(value.get("output"), list):
        return _walk(value["output"], "assistant")  # a Responses API response
    message = _message(value, default_role)
    if message is not None:
        return message
    if (
        "input" in value
        and not isinstance(value["input"], str | type(None))
        or ("instructions" in value and "input" in value)
    ):  # a Responses request: instructions + input items
        system = value.get("instructions")
        head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        return head + _walk(value["input"], default_role)
    entity = _traceloop_entity(value)
    if entity is not None:
        return _walk(entity, default_role)
    for key in _ANSWER_KEYS if default_role == "assistant" else _QUESTION_KEYS:
        if isinstance(value.get(key), str):
            return _walk(value[key], default_role)
    if isinstance(value.get("content"), list):
        return [{"role": default_role, "content": content_text(value["content"])}]
    raise _NotMessages


_ENTITY_FIELDS = frozenset(("inputs", "outputs", "tags", "metadata", "kwargs"))
_CALL_FIELDS = frozenset(("args", "kwargs"))


def _traceloop_entity(value: dict[str, Any]) -> Any:
    """What OpenLLMetry's ``traceloop.entity.input``/``output`` wrap, or None: a LangChain
    run's ``{"inputs"|"outputs": ..., "tags", "metadata", "kwargs"}``, or a decorated
    function's ``{"args": [...], "kwargs": {...}}`` (its arguments, else its keywords)."""
    keys = value.keys()
    if ("inputs" in keys or "outputs" in keys) and keys <= _ENTITY_FIELDS:
        return value["inputs"] if "inputs" in keys else value["outputs"]
    if "args" in keys and keys <= _CALL_FIELDS:
        return value["args"] or value.get("kwargs") or None
    return None


def _merge_calls(messages: list[Message]) -> list[Message]:
    """Consecutive tool-call-only assistant turns (Responses items) become one turn."""
    out: list[Message] = []
    for m in messages:
        prev = out[-1] if out else None
        if (
            prev is not None
            and m["role"] == prev["role"] == "assistant"
            and m.get("tool_calls")
            and not m["content"]
            and "tool_calls" in prev
        ):
            prev["tool_calls"] = [*prev["tool_calls"], *m["tool_calls"]]
            continue
        out.append(m)
    return out


def _name_unnamed_calls(messages: list[Message]) -> list[Message]:
    """Give tool calls without an id (optional in GenAI's semconv) a stable one, from the
    call itself, and the id-less tool results after them the id of the earliest call still
    unanswered: the same conversation always gets the same ids."""
    seen: dict[str, int] = {}
    waiting: list[str] = []
    for m in messages:
        if m["role"] == "tool" and not m.get("tool_call_id") and waiting:
            m["tool_call_id"] = waiting.pop(0)
        for call in m.get("tool_calls") or ():
            if call["id"]:
                continue
            key = f"{call['function']['name']}\n{call['function']['arguments']}"
            seen[key] = seen.get(key, 0) + 1
            digest = hashlib.sha256(f"{key}\n{seen[key]}".encode()).hexdigest()
            call["id"] = f"call_{digest[:24]}"
            waiting.append(call["id"])
    return messages


def to_messages(
    value: Any, default_role: str = "user", unknown: Unknown | None = None
) -> list[Message]:
    """The chat messages of a recorded value; ``[]`` (and counted in ``unknown``) if unknown."""
    try:
        return _name_unnamed_calls(_walk(value, default_role))
    except _NotMessages:
        if unknown is not None:
            unknown.add(value)
        return []


def _last_text(value: Any, role: str, unknown: Unknown | None) -> str:
    messages = to_messages(value, role, unknown)
    for m in reversed(messages):
        text = content_text(m["content"])
        if m["role"] == role and text.strip():
            return text
    if messages and unknown is not None:  # messages, but none of this role with text
        unknown.add(value)
    return ""


def question_text(value: Any, unknown: Unknown | None = None) -> str:
    """The last user turn's text of a rollout input ("" when there is none)."""
    return _last_text(value, "user", unknown)


def answer_text(value: Any, unknown: Unknown | None = None) -> str:
    """The final assistant text of a rollout output ("" when there is none)."""
    return _last_text(value, "assistant", unknown)


EMPTY_TOOL_RESULT = "(empty)"


def mark_empty_tool_results(messages: list[Message]) -> list[Message]:
    """Tool turns whose result is empty say so: a tool that found nothing answered, and a
    training row may hold no empty content."""
    return [
        {**m, "content": EMPTY_TOOL_RESULT}
        if m["role"] == "tool" and not content_text(m["content"]).strip()
        else m
        for m in messages
    ]
