"""Mirror flywheel spans into OpenTelemetry, at close to no cost when no SDK is configured.

``opentelemetry-api`` alone returns a proxy provider whose spans record nothing; in that case
we skip OTel entirely (one isinstance check per span). With an SDK provider installed, each
rollout and span becomes an OTel span with GenAI semantic-convention attribute names.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import ProxyTracerProvider, Status, StatusCode

try:
    from opentelemetry.trace import NoOpTracerProvider
except ImportError:  # pragma: no cover
    NoOpTracerProvider = ProxyTracerProvider  # type: ignore[misc,assignment]

ORIGIN_ATTRIBUTE = "flywheel.origin"
_OPERATION = {
    "llm": "chat",
    "tool": "execute_tool",
    "agent": "invoke_agent",
    "embedding": "embeddings",
    "retriever": "retrieve",
}

_cached: tuple[Any, Any] = (None, None)
# The API loads a provider named by this variable on first use; read once, at import.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def tracer() -> Any | None:
    """The OTel tracer when a real SDK provider is installed, else None.

    Called for every rollout: while no provider is set (the API's module global is still None
    and no environment variable names one) that is one attribute read, where
    ``get_tracer_provider()`` would also search ``os.environ`` (about a microsecond).
    """
    global _cached
    if not _PROVIDER_FROM_ENV and getattr(trace, "_TRACER_PROVIDER", _cached) is None:
        return None
    provider = trace.get_tracer_provider()
    if provider is _cached[0]:
        return _cached[1]
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    tr = provider.get_tracer("flywheel_middleware")
    _cached = (provider, tr)
    return tr


def start(name: str, parent: Any | None, start_ns: int) -> Any | None:
    """Start an OTel span under ``parent`` (an OTel span or None); None when OTel is off."""
    tr = tracer()
    if tr is None:
        return None
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    return tr.start_span(name, context=ctx, start_time=start_ns)


def end(
    otel_span: Any,
    *,
    kind: str,
    rollout_id: str,
    workflow: str | None,
    model: str | None,
    input_tokens: int | None,
    output_tokens: int | None,
    error: str | None,
    attributes: dict[str, Any] | None,
    end_ns: int,
) -> None:
    """Set GenAI attributes and end the span. Never raises."""
    try:
        attrs: dict[str, Any] = {
            ORIGIN_ATTRIBUTE: "flywheel",
            "flywheel.kind": kind,
            "flywheel.rollout_id": rollout_id,
        }
        if workflow:
            attrs["flywheel.workflow"] = workflow
        op = _OPERATION.get(kind)
        if op:
            attrs["gen_ai.operation.name"] = op
        if model:
            attrs["gen_ai.request.model"] = model
        if input_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = input_tokens
        if output_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = output_tokens
        if attributes:
            for key, value in attributes.items():
                if isinstance(value, (str, bool, int, float)):
                    attrs[key] = value
        otel_span.set_attributes(attrs)
        if error:
            otel_span.set_status(Status(StatusCode.ERROR, error[:500]))
        otel_span.end(end_time=end_ns)
    except Exception:
        pass
