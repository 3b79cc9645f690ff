"""How OpenTelemetry spans name what a flywheel span holds: GenAI semantic conventions,
OpenInference, OpenLLMetry (Traceloop) and AgentScope 1.x attribute names, and the id mapping.

Shared by everything that turns OTel spans into records (the span processor, importers),
without importing the OTel SDK.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_MASK63 = (1 << 63) - 1

_OPENINFERENCE_KIND = {
    "LLM": "llm",
    "CHAIN": "chain",
    "TOOL": "tool",
    "RETRIEVER": "retriever",
    "RERANKER": "retriever",
    "EMBEDDING": "embedding",
    "AGENT": "agent",
    "GUARDRAIL": "chain",
    "EVALUATOR": "reward",
    "PROMPT": "chain",
}
_GENAI_OPERATION_KIND = {
    "chat": "llm",
    "text_completion": "llm",
    "generate_content": "llm",
    "embeddings": "embedding",
    "execute_tool": "tool",
    "invoke_agent": "agent",
    "create_agent": "agent",
    "invoke_workflow": "chain",
}
_TRACELOOP_KIND = {"workflow": "chain", "task": "chain", "agent": "agent", "tool": "tool"}

MODEL_KEYS = ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name", "model")
INPUT_TOKEN_KEYS = (
    "gen_ai.usage.input_tokens",
    "llm.token_count.prompt",
    "gen_ai.usage.prompt_tokens",
    "llm.usage.prompt_tokens",
)
OUTPUT_TOKEN_KEYS = (
    "gen_ai.usage.output_tokens",
    "llm.token_count.completion",
    "gen_ai.usage.completion_tokens",
    "llm.usage.completion_tokens",
)
INPUT_KEYS = (
    "input.value",
    "gen_ai.input.messages",
    "gen_ai.tool.call.arguments",
    "traceloop.entity.input",
    "gen_ai.prompt",
    "input",
)
OUTPUT_KEYS = (
    "output.value",
    "gen_ai.output.messages",
    "gen_ai.tool.call.result",
    "traceloop.entity.output",
    "gen_ai.completion",
    "output",
)
SESSION_KEYS = ("session.id", "gen_ai.conversation.id", "project.run_id")
USER_KEYS = ("user.id", "enduser.id")
MAPPED = frozenset(MODEL_KEYS + INPUT_TOKEN_KEYS + OUTPUT_TOKEN_KEYS + INPUT_KEYS + OUTPUT_KEYS)


def otel_span_id(span_id: int) -> int:
    """The flywheel span id for an OTel span id (positive, fits a signed BIGINT)."""
    return (span_id & _MASK63) or 1


def otel_trace_id(trace_id: int) -> str:
    """The flywheel rollout id for an OTel trace id: its 32 hex digits."""
    return format(trace_id, "032x")


class JsonText:
    """A JSON string attribute, parsed only when the writer thread serializes it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def to_dict(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return self.text

    def __repr__(self) -> str:
        return self.text


def first_value(attrs: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value is not None:
            return value
    return None


def json_content(value: Any) -> Any:
    """JSON text stays text here; the writer thread parses it (see ``JsonText``)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        return JsonText(value)
    return value


def span_kind(name: str, attrs: Any) -> str:
    """The flywheel span kind for an OTel span, from its attributes (or AgentScope 1.x name)."""
    kind = attrs.get("openinference.span.kind")
    if kind:
        return _OPENINFERENCE_KIND.get(str(kind).upper(), "chain")
    op = attrs.get("gen_ai.operation.name")
    if op:
        return _GENAI_OPERATION_KIND.get(op, "llm")
    kind = attrs.get("traceloop.span.kind")
    if kind:
        return _TRACELOOP_KIND.get(kind, "chain")
    if attrs.get("llm.request.type"):
        return "llm"
    kind = attrs.get("span.kind")  # AgentScope 1.x
    if kind:
        return _OPENINFERENCE_KIND.get(str(kind).upper(), "chain")
    if "." in name:  # AgentScope 1.x: {Class}.{method}
        cls = name.split(".", 1)[0]
        if cls.endswith("Agent"):
            return "agent"
        if cls.endswith("Model"):
            return "llm"
        if cls in ("Toolkit", "ToolKit") or cls.endswith("Tool"):
            return "tool"
    return "chain"


@dataclass(frozen=True)
class GenAIFields:
    """What a span's attributes say in the conventions above, as raw attribute values."""

    model: Any
    input: Any
    output: Any
    input_tokens: Any
    output_tokens: Any
    user_id: Any
    session_id: Any
    extra: dict[str, Any]  # the attributes no field above took


def genai_fields(attrs: Any, kind: str) -> GenAIFields:
    """Read a span's attributes once, the same way for every source of OpenTelemetry spans
    (the live mirror, OTLP ingest, the Studio importer); each source then converts the values
    its own way. A model is read for model calls only."""
    return GenAIFields(
        model=first_value(attrs, MODEL_KEYS) if kind in ("llm", "embedding") else None,
        input=first_value(attrs, INPUT_KEYS),
        output=first_value(attrs, OUTPUT_KEYS),
        input_tokens=first_value(attrs, INPUT_TOKEN_KEYS),
        output_tokens=first_value(attrs, OUTPUT_TOKEN_KEYS),
        user_id=first_value(attrs, USER_KEYS),
        session_id=first_value(attrs, SESSION_KEYS),
        extra={k: v for k, v in attrs.items() if k not in MAPPED},
    )
