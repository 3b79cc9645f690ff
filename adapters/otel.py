"""OpenTelemetry bridge: record spans from any OTel instrumentation into the flywheel store.

    provider.add_span_processor(FlywheelSpanProcessor(workflow="qa"))

Works with OpenInference (``openinference.span.kind``, ``llm.model_name``,
``llm.token_count.*``, ``input.value``), the GenAI semantic conventions (``gen_ai.*``, as
AgentScope 2.x's ``TracingMiddleware`` and OpenLLMetry emit them), OpenLLMetry's
``traceloop.*`` attributes and AgentScope 1.x's ``{Class}.{method}`` spans (``span.kind``,
``input``, ``output``). Each OTel trace becomes a rollout (trace id -> 32-hex rollout id)
and each span a span row (span id -> positive 63-bit integer). When an instrumented call runs
inside an active ``fw.rollout``/``fw.span``, its spans join that rollout under that span.
Spans flywheel itself mirrored into OTel (``flywheel.origin == "flywheel"``) are skipped.
``on_end`` only builds a record and enqueues it; JSON text attributes are parsed on the
recorder's writer thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

from flywheel_middleware.capture import handles
from flywheel_middleware.capture.genai_attributes import (
    first_value,
    genai_fields,
    json_content,
    otel_span_id,
    otel_trace_id,
    span_kind,
)
from flywheel_middleware.capture.otel_mirror import ORIGIN_ATTRIBUTE
from flywheel_middleware.capture.records import RolloutRecord, SpanRecord

log = logging.getLogger("flywheel_middleware.adapters.otel")

__all__ = [
    "FlywheelSpanProcessor",
    "first_value",
    "json_content",
    "otel_span_id",
    "otel_trace_id",
    "span_kind",
]

_FLYWHEEL_SCOPE = "flywheel_middleware"
_MAX_TRACKED = 50_000


def _error(span: ReadableSpan) -> str | None:
    if span.status.status_code is not StatusCode.ERROR:
        return None
    for event in span.events or ():
        if event.name == "exception":
            ea = event.attributes or {}
            etype = ea.get("exception.type", "Error")
            return f"{str(etype).rsplit('.', 1)[-1]}: {ea.get('exception.message', '')}"
    return span.status.description or "error"


class FlywheelSpanProcessor(SpanProcessor):
    """An OTel ``SpanProcessor`` writing finished spans (and trace roots as rollouts) to flywheel.

    ``workflow`` names the rollouts created from traces; ``recorder`` defaults to the process
    recorder (``fw.get_recorder()``).
    """

    def __init__(self, workflow: str = "otel", *, recorder: Any = None) -> None:
        self.workflow = workflow
        self._recorder = recorder
        # Local roots started inside an active flywheel rollout: OTel span id -> (rollout,
        # flywheel parent span id); their traces -> that rollout. OTel ids of flywheel's own
        # mirrored spans, so spans under them count as local roots.
        self._roots: dict[int, tuple[Any, int | None]] = {}
        self._traces: OrderedDict[int, Any] = OrderedDict()
        self._flywheel_ids: set[int] = set()
        self._usage: OrderedDict[int, list[int]] = OrderedDict()

    def _rec(self) -> Any:
        if self._recorder is not None:
            return self._recorder
        from flywheel_middleware import runtime

        return runtime.get_recorder()

    # -- SpanProcessor -----------------------------------------------------------------------

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        try:
            scope = span.instrumentation_scope
            ctx = span.context
            if scope is not None and scope.name == _FLYWHEEL_SCOPE:
                if len(self._flywheel_ids) < _MAX_TRACKED:
                    self._flywheel_ids.add(ctx.span_id)
                return
            parent = span.parent
            if parent is not None and parent.span_id not in self._flywheel_ids:
                return
            current = handles.current()
            if current is not None:
                self._roots[ctx.span_id] = (current.rollout, current.span_id)
                self._traces[ctx.trace_id] = current.rollout
                while len(self._traces) > _MAX_TRACKED:
                    self._traces.popitem(last=False)
        except Exception:
            log.exception("flywheel: FlywheelSpanProcessor.on_start failed")

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._record(span)
        except Exception:
            log.exception("flywheel: FlywheelSpanProcessor.on_end failed")

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            return self._rec().flush(timeout_millis / 1000)
        except Exception:
            log.exception("flywheel: flush failed")
            return False

    # -- mapping -----------------------------------------------------------------------------

    def _record(self, span: ReadableSpan) -> None:
        attrs = span.attributes or {}
        ctx = span.context
        if attrs.get(ORIGIN_ATTRIBUTE) == "flywheel":
            self._flywheel_ids.discard(ctx.span_id)
            return
        trace_id = ctx.trace_id
        parent = span.parent
        is_root = parent is None or parent.is_remote or parent.span_id in self._flywheel_ids
        root = self._roots.pop(ctx.span_id, None) if self._roots else None
        rollout = root[0] if root is not None else self._traces.get(trace_id)
        if rollout is not None:
            rollout_id = rollout.id
            if root is not None:
                parent_id = root[1]
            else:
                parent_id = otel_span_id(parent.span_id) if parent is not None else None
        else:
            rollout = None
            rollout_id = otel_trace_id(trace_id)
            parent_id = None if is_root else otel_span_id(parent.span_id)

        kind = span_kind(span.name, attrs)
        fields = genai_fields(attrs, kind)
        input_tokens, output_tokens = fields.input_tokens, fields.output_tokens
        error = _error(span)
        start, end = span.start_time, span.end_time
        record = SpanRecord(
            id=otel_span_id(ctx.span_id),
            rollout_id=rollout_id,
            workflow=rollout.workflow
            if rollout is not None
            else (attrs.get("flywheel.workflow") or self.workflow),
            trace_id=otel_trace_id(trace_id),
            parent_id=parent_id,
            sequence=0,
            kind=kind,
            name=span.name,
            node=attrs.get("flywheel.node") or attrs.get("langgraph.node"),
            status="error" if error else "ok",
            error=error,
            started_at=start,
            ended_at=end,
            duration_ms=(end - start) / 1e6 if start and end else None,
            model=fields.model,
            input=json_content(fields.input),
            output=json_content(fields.output),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            attributes=fields.extra or None,
        )
        recorder = self._rec()
        recorder.enqueue(record)
        if kind not in ("llm", "embedding") or not (input_tokens or output_tokens):
            pass
        elif rollout is not None:
            rollout.add_usage(input_tokens, output_tokens)
        else:
            usage = self._usage.get(trace_id)
            if usage is None:
                usage = self._usage[trace_id] = [0, 0]
                while len(self._usage) > _MAX_TRACKED:
                    self._usage.popitem(last=False)
            usage[0] += input_tokens or 0
            usage[1] += output_tokens or 0
        if is_root and rollout is None:
            usage = self._usage.pop(trace_id, None)
            recorder.enqueue(
                RolloutRecord(
                    id=rollout_id,
                    workflow=attrs.get("flywheel.workflow") or self.workflow,
                    user_id=fields.user_id,
                    session_id=fields.session_id,
                    input=record.input,
                    output=record.output,
                    status="failed" if error else "succeeded",
                    error=error,
                    started_at=start,
                    ended_at=end,
                    latency_ms=record.duration_ms,
                    input_tokens=usage[0] if usage else None,
                    output_tokens=usage[1] if usage else None,
                    total_tokens=(usage[0] + usage[1]) if usage else None,
                    metadata={"source": "otel", "root_span": span.name},
                )
            )
