"""OTLP spans (decoded ``opentelemetry.proto`` messages) as flywheel span records.

What the service's ``POST /v1/traces`` hands to ``otlp_traces.TraceAssembler``. Kinds, models,
token counts, inputs and outputs are read the way the OTel adapter reads SDK spans
(``genai_attributes``: GenAI semantic conventions, OpenInference, OpenLLMetry); messages that
instrumentations flatten into one attribute per field (OpenInference's
``llm.input_messages.0.message.role``, OpenLLMetry's ``gen_ai.prompt.0.content``) are put back
together as chat messages first, since no other attribute holds them whole.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from flywheel_middleware.capture.genai_attributes import (
    INPUT_KEYS,
    OUTPUT_KEYS,
    first_value,
    genai_fields,
    otel_span_id,
    span_kind,
)
from flywheel_middleware.capture.records import SpanRecord

WORKFLOW_ATTRIBUTE = "flywheel.workflow"
DEFAULT_WORKFLOW = "otel"
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
# A trace's spans arrive in any order, from any replica: their order within the rollout is
# their start time, in 0.1 ms steps, kept in the 32-bit column (it wraps every 2.5 days).
_SEQUENCE_STEP_NS = 100_000
_SEQUENCE_WRAP = 2**31
# AgentScope's TracingMiddleware sets this when an agent has no session: it is no session.
_NO_SESSION = "[no_session_id]"

# Flattened message lists: (prefix, role a message without one takes).
_FLAT_INPUT = ("llm.input_messages.", "gen_ai.prompt.")
_FLAT_OUTPUT = ("llm.output_messages.", "gen_ai.completion.")
_FLAT_PREFIXES = _FLAT_INPUT + _FLAT_OUTPUT
_SCALAR_KINDS = frozenset(("string_value", "bool_value", "int_value", "double_value"))


class RejectedSpan(ValueError):
    """A span that cannot be stored (its ids are not OTLP ids); the message says why."""


class IngestedSpan:
    """A span record with what its trace's rollout takes from it."""

    __slots__ = ("record", "user_id", "session_id", "service", "explicit_workflow")

    def __init__(
        self,
        record: SpanRecord,
        user_id: str | None,
        session_id: str | None,
        service: str | None,
        explicit_workflow: bool,
    ) -> None:
        self.record = record
        self.user_id = user_id
        self.session_id = session_id
        self.service = service
        self.explicit_workflow = explicit_workflow  # from flywheel.workflow, not service.name


def any_value(value: Any) -> Any:
    """An OTLP ``AnyValue`` as plain data (bytes as base64 text)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind)


def attributes(key_values: Any) -> dict[str, Any]:
    """OTLP ``KeyValue``s as a dict (a repeated key keeps its last value). Most values are
    scalars, read here without a call per value: each span has several."""
    out = {}
    for kv in key_values:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = getattr(value, kind) if kind in _SCALAR_KINDS else any_value(value)
    return out


def _nest(flat: dict[str, Any]) -> Any:
    """``{"0.message.role": "user"}`` -> ``[{"message": {"role": "user"}}]``."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *heads, last = path.split(".")
        for head in heads:
            child = node.get(head)
            if not isinstance(child, dict):
                child = node[head] = {}
            node = child
        node[last] = value
    return _listify(tree)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _tool_call(call: Any) -> Any:
    """OpenInference's ``{"tool_call": {"id", "function": {...}}}``; OpenLLMetry's is plain."""
    return call.get("tool_call", call) if isinstance(call, dict) else call


def _chat_message(item: Any, role: str) -> dict[str, Any] | None:
    """One unflattened message (OpenInference's sits under ``message``) as a chat message;
    ``role`` when it names none."""
    msg = item.get("message", item) if isinstance(item, dict) else None
    if not isinstance(msg, dict):
        return None
    out: dict[str, Any] = {"role": msg.get("role") or role}
    content = msg.get("content")
    if content is None and isinstance(msg.get("contents"), list):  # OpenInference parts
        parts = [c.get("message_content", c) for c in msg["contents"] if isinstance(c, dict)]
        content = "\n".join(str(p.get("text")) for p in parts if p.get("text") is not None)
    out["content"] = "" if content is None else content
    calls = msg.get("tool_calls")
    if isinstance(calls, list) and calls:
        out["tool_calls"] = [_tool_call(c) for c in calls]
    if msg.get("tool_call_id") is not None:
        out["tool_call_id"] = msg["tool_call_id"]
    return out


def flattened_messages(
    attrs: dict[str, Any], prefixes: tuple[str, ...], role: str
) -> list[dict[str, Any]]:
    """The chat messages flattened under the first of ``prefixes`` that has any (``role``
    for a message that names none)."""
    for prefix in prefixes:
        n = len(prefix)
        flat = {
            k[n:]: v for k, v in attrs.items() if k.startswith(prefix) and k[n : n + 1].isdigit()
        }
        if flat:
            nested = _nest(flat)
            items = nested if isinstance(nested, list) else list(nested.values())
            messages = (_chat_message(item, role) for item in items)
            return [m for m in messages if m is not None]
    return []


def _io(attrs: dict[str, Any], flat: bool) -> tuple[Any, Any]:
    """A span's input and output: whole message lists first, then the adapters' keys."""
    messages_in = attrs.get("gen_ai.input.messages")
    messages_out = attrs.get("gen_ai.output.messages")
    if flat:
        messages_in = messages_in or flattened_messages(attrs, _FLAT_INPUT, "user") or None
        messages_out = messages_out or flattened_messages(attrs, _FLAT_OUTPUT, "assistant") or None
    value_in = messages_in if messages_in is not None else first_value(attrs, INPUT_KEYS)
    value_out = messages_out if messages_out is not None else first_value(attrs, OUTPUT_KEYS)
    return json_value(value_in), json_value(value_out)


def json_value(value: Any) -> Any:
    """JSON text parsed now (text that is not JSON stays text): the service has no agent
    thread to spare, and the recorder encodes plain data far faster than it re-reads text."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _error(span: Any) -> str | None:
    """The error of a span whose status is ERROR: its exception event, else the status text."""
    if span.status.code != STATUS_ERROR:
        return None
    for event in span.events:
        if event.name == "exception":
            ea = attributes(event.attributes)
            etype = str(ea.get("exception.type", "Error")).rsplit(".", 1)[-1]
            return f"{etype}: {ea.get('exception.message', '')}"
    return span.status.message or "error"


def _text(value: Any, limit: int) -> str | None:
    """A short text column's value: text, at most ``limit`` characters; None when empty."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:limit]


def _holds_nul(name: str, attrs: dict[str, Any]) -> bool:
    """Whether a span's name, attribute keys or text values (JSON text's ``\\u0000`` escape
    included) hold a NUL character."""
    if "\x00" in name:
        return True
    for key, value in attrs.items():
        if "\x00" in key:
            return True
        if isinstance(value, str) and (
            "\x00" in value or (value[:1] in ("{", "[") and "\\u0000" in value)
        ):
            return True
    return False


def user_and_session(user: Any, session: Any) -> tuple[str | None, str | None]:
    """A span's user and session as its trace's rollout keeps them (AgentScope's marker for
    an agent without a session is no session)."""
    return _text(user, 200), None if session == _NO_SESSION else _text(session, 200)


def span_ids(span: Any) -> tuple[str, int, int | None]:
    """The rollout id (the trace id's 32 hex digits), span id and parent span id of a span;
    raises ``RejectedSpan`` when they are not OTLP ids."""
    trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
    if len(trace_id) != 16 or not any(trace_id):
        raise RejectedSpan(f"span {span.name[:80]!r}: trace id must be 16 bytes, not all zero")
    if len(span_id) != 8 or not any(span_id):
        raise RejectedSpan(f"span {span.name[:80]!r}: span id must be 8 bytes, not all zero")
    if parent and len(parent) != 8:
        raise RejectedSpan(f"span {span.name[:80]!r}: parent span id must be 8 bytes")
    parent_id = otel_span_id(int.from_bytes(parent, "big")) if any(parent) else None
    return trace_id.hex(), otel_span_id(int.from_bytes(span_id, "big")), parent_id


class Resource:
    """What a resource (the process that sent spans) says about the workflow of its spans."""

    __slots__ = ("workflow", "service")

    def __init__(self, key_values: Any) -> None:
        attrs = attributes(key_values)
        self.workflow = _text(attrs.get(WORKFLOW_ATTRIBUTE), 200)
        self.service = _text(attrs.get("service.name"), 200)


def ingested_span(span: Any, resource: Resource) -> IngestedSpan:
    """The span record of one OTLP span from ``resource``; raises ``RejectedSpan`` for a
    span that cannot be stored."""
    rollout_id, span_id, parent_id = span_ids(span)
    if not span.start_time_unix_nano:
        raise RejectedSpan(f"span {span.name[:80]!r}: no start time")
    attrs = attributes(span.attributes)
    if _holds_nul(span.name, attrs):
        raise RejectedSpan(f"span {span.name[:80]!r}: a NUL character, which no store keeps")
    name = span.name[:500]
    kind = span_kind(name, attrs)
    flat = any(k.startswith(_FLAT_PREFIXES) for k in attrs)
    value_in, value_out = _io(attrs, flat)
    error = _error(span)
    start = span.start_time_unix_nano
    end = span.end_time_unix_nano or None
    service = resource.service
    workflow = _text(attrs.get(WORKFLOW_ATTRIBUTE), 200) or resource.workflow
    fields = genai_fields(attrs, kind)
    extra = {k: v for k, v in fields.extra.items() if not (flat and k.startswith(_FLAT_PREFIXES))}
    user_id, session_id = user_and_session(fields.user_id, fields.session_id)
    record = SpanRecord(
        id=span_id,
        rollout_id=rollout_id,
        workflow=workflow or service or DEFAULT_WORKFLOW,
        trace_id=rollout_id,
        parent_id=parent_id,
        sequence=start // _SEQUENCE_STEP_NS % _SEQUENCE_WRAP,
        kind=kind,
        name=name,
        node=_text(attrs.get("flywheel.node") or attrs.get("langgraph.node"), 200),
        status="error" if error else "ok",
        error=error,
        started_at=start,
        ended_at=end,
        duration_ms=(end - start) / 1e6 if end and end >= start else None,
        model=_text(fields.model, 200),
        input=value_in,
        output=value_out,
        input_tokens=fields.input_tokens,
        output_tokens=fields.output_tokens,
        attributes=extra or None,
    )
    return IngestedSpan(
        record,
        user_id=user_id,
        session_id=session_id,
        service=service,
        explicit_workflow=workflow is not None,
    )


def as_rollout_id(value: str) -> str:
    """A rollout id as given, or a trace id (32 hex digits, any case) as its rollout's id."""
    if len(value) == 32:
        try:
            return bytes.fromhex(value).hex()
        except ValueError:
            pass
    return value
