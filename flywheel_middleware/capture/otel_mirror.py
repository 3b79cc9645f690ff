"""Mirror flywheel spans into OpenTelemetry when asked to (``fw.configure(otel=True)``).

Off by default: an application that runs an OTel SDK for its own reasons (an APM, Langfuse)
does not pay for a second span per recorded call. When on and an SDK provider is installed,
each rollout and span also becomes an OTel span with GenAI semantic-convention attribute
names; ``opentelemetry-api`` alone gives a proxy provider whose spans record nothing, and
then nothing is mirrored.
"""

from __future__ import annotations

from typing import Any

from flywheel_middleware.capture import backend
from flywheel_middleware.capture.records import RolloutRecord

ORIGIN_ATTRIBUTE = "flywheel.origin"
_OPERATION = {
    "llm": "chat",
    "tool": "execute_tool",
    "agent": "invoke_agent",
    "embedding": "embeddings",
    "retriever": "retrieve",
}

_enabled: bool | None = None  # None: not known yet, the backend's configuration says
_cached: tuple[Any, Any] = (None, None)


def set_enabled(enabled: bool | None) -> None:
    """Turn mirroring on or off for this process."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled)


def tracer() -> Any | None:
    """The OTel tracer when mirroring is on and a real SDK provider is installed, else None."""
    global _cached
    if _enabled is None:  # the first span: ask the configuration (flywheel.yaml's otel.emit)
        set_enabled(backend.current().otel_emit())
    if not _enabled:
        return None
    from opentelemetry import trace  # imported once mirroring is asked for

    provider = trace.get_tracer_provider()
    if provider is _cached[0]:
        return _cached[1]
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    tr = provider.get_tracer("flywheel_middleware")
    _cached = (provider, tr)
    return tr


def start(name: str, parent: Any | None, start_ns: int) -> Any | None:
    """Start an OTel span under ``parent`` (an OTel span or None); None when OTel is off."""
    tr = tracer()
    if tr is None:
        return None
    from opentelemetry import trace

    ctx = trace.set_span_in_context(parent) if parent is not None else None
    return tr.start_span(name, context=ctx, start_time=start_ns)


def end(otel_span: Any, handle: Any, end_ns: int) -> None:
    """Set GenAI attributes from a finished rollout or span handle and end its OTel span.
    Never raises."""
    try:
        if isinstance(handle, RolloutRecord):
            kind, rollout_id, model, extra = "workflow", handle.id, None, None
        else:
            kind, rollout_id, model, extra = (
                handle.kind,
                handle.rollout_id,
                handle.model,
                handle.attributes,
            )
        attrs: dict[str, Any] = {
            ORIGIN_ATTRIBUTE: "flywheel",
            "flywheel.kind": kind,
            "flywheel.rollout_id": rollout_id,
        }
        if handle.workflow:
            attrs["flywheel.workflow"] = handle.workflow
        op = _OPERATION.get(kind)
        if op:
            attrs["gen_ai.operation.name"] = op
        if model:
            attrs["gen_ai.request.model"] = model
        if handle.input_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = handle.input_tokens
        if handle.output_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = handle.output_tokens
        if extra:
            for key, value in extra.items():
                if isinstance(value, (str, bool, int, float)):
                    attrs[key] = value
        otel_span.set_attributes(attrs)
        if handle.error:
            from opentelemetry.trace import Status, StatusCode

            otel_span.set_status(Status(StatusCode.ERROR, handle.error[:500]))
        otel_span.end(end_time=end_ns)
    except Exception:
        pass
