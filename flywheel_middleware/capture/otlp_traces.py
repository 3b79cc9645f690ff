"""Traces that arrive span by span, over several OTLP requests, as rollouts.

A trace is one rollout (its id is the trace id). Each span is queued for the recorder as it
arrives, once: a span sent again (an exporter's retry, a replayed batch) is recognised and
skipped. The rollout row is written once, when the trace closes: ``settle`` seconds after its
root span (the span without a parent) arrived, so children exported in the same burst still
count in its token totals, or, for a trace whose root never comes, ``grace`` seconds after its
last span, from its top-most span. Its input and output are the root span's, read as chat
messages by the message normalizer, so exports read ingested traces as they read captured ones.
``rollout_of`` builds the same rollout from stored spans (``stored_span``), for traces whose
service died before closing them (``service.otlp_recovery``).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from flywheel_middleware.capture.genai_attributes import SESSION_KEYS, USER_KEYS, first_value
from flywheel_middleware.capture.otlp_spans import (
    DEFAULT_WORKFLOW,
    WORKFLOW_ATTRIBUTE,
    IngestedSpan,
    user_and_session,
)
from flywheel_middleware.capture.records import (
    Record,
    RolloutRecord,
    SpanRecord,
    rollout_status,
    token_total,
)
from flywheel_middleware.messages import to_messages

log = logging.getLogger("flywheel_middleware.otlp")

_TOKEN_KINDS = ("llm", "embedding")  # agent spans may repeat their children's totals


class _Trace:
    """What an open trace has shown so far."""

    __slots__ = (
        "span_ids",
        "root",
        "top",
        "input_tokens",
        "output_tokens",
        "workflow",
        "user_id",
        "session_id",
        "started_at",
        "ended_at",
        "last_seen",
    )

    def __init__(self) -> None:
        self.span_ids: set[int] = set()
        self.root: IngestedSpan | None = None
        self.top: IngestedSpan | None = None  # the earliest span so far, for a trace with no root
        self.input_tokens = 0
        self.output_tokens = 0
        self.workflow: str | None = None  # from a flywheel.workflow attribute
        self.user_id: str | None = None
        self.session_id: str | None = None
        self.started_at: int | None = None
        self.ended_at: int | None = None
        self.last_seen = 0.0

    def note(self, span: IngestedSpan, now: float) -> bool:
        """Count a new span of this trace in; True when it is the trace's root (its first
        span without a parent)."""
        record = span.record
        self.span_ids.add(record.id)
        self.last_seen = now
        if record.kind in _TOKEN_KINDS:
            self.input_tokens += _count(record.input_tokens)
            self.output_tokens += _count(record.output_tokens)
        if span.explicit_workflow and (self.workflow is None or record.parent_id is None):
            self.workflow = record.workflow
        self.user_id = self.user_id or span.user_id
        self.session_id = self.session_id or span.session_id
        start, end = record.started_at, record.ended_at
        if self.started_at is None or start < self.started_at:
            self.started_at = start
            self.top = span
        if end is not None and (self.ended_at is None or end > self.ended_at):
            self.ended_at = end
        if record.parent_id is None and self.root is None:
            self.root = span
            return True
        return False

    def rollout(self, trace_id: str) -> RolloutRecord:
        """The trace's rollout record, from its root span (else its earliest) and its totals."""
        head = self.root or self.top
        assert head is not None  # a trace opens with its first span
        span = head.record
        tokens_in = self.input_tokens or None
        tokens_out = self.output_tokens or None
        metadata: dict[str, Any] = {
            "source": "otlp",
            "root_span": span.name,
            "spans": len(self.span_ids),
        }
        if head.service:
            metadata["service.name"] = head.service
        if self.root is None:
            metadata["root_missing"] = True
        started = span.started_at if self.root else self.started_at
        ended = span.ended_at if self.root else self.ended_at
        return RolloutRecord(
            id=trace_id,
            workflow=self.workflow or span.workflow or DEFAULT_WORKFLOW,
            user_id=self.user_id,
            session_id=self.session_id,
            input=_as_messages(span.input, "user"),
            output=_as_messages(span.output, "assistant"),
            status=rollout_status(span.error),
            error=span.error,
            started_at=started,
            ended_at=ended,
            latency_ms=(ended - started) / 1e6 if ended and started and ended >= started else None,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            total_tokens=token_total(tokens_in, tokens_out),
            metadata=metadata,
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _as_messages(value: Any, role: str) -> Any:
    """A root span's input or output as chat messages, or as it is when it holds none."""
    return to_messages(value, role) or value


def stored_span(record: SpanRecord) -> IngestedSpan:
    """A span read back from the store, with what its trace's rollout takes from it: user and
    session from its unmapped attributes, read as ``ingested_span`` read them. The resource's
    ``service.name`` is not stored; a workflow counts as explicit when the span's own
    ``flywheel.workflow`` attribute named it (a resource's is already its workflow column)."""
    attrs = record.attributes if isinstance(record.attributes, dict) else {}
    user_id, session_id = user_and_session(
        first_value(attrs, USER_KEYS), first_value(attrs, SESSION_KEYS)
    )
    return IngestedSpan(
        record,
        user_id=user_id,
        session_id=session_id,
        service=None,
        explicit_workflow=WORKFLOW_ATTRIBUTE in attrs,
    )


def rollout_of(trace_id: str, spans: Iterable[IngestedSpan]) -> RolloutRecord:
    """The rollout a trace of ``spans`` (in the order they came; repeats skipped) closes
    with: what ``TraceAssembler`` queues for it, built by the same code."""
    trace = _Trace()
    for span in spans:
        if span.record.id not in trace.span_ids:
            trace.note(span, 0.0)
    return trace.rollout(trace_id)


class TraceAssembler:
    """Turns ingested spans into queued span records and, per trace, one rollout record.

    ``enqueue`` takes each record (the recorder's ``enqueue``). ``add`` is thread-safe; a
    daemon thread closes traces as they fall due (``start``); ``close_all`` closes every open
    trace now (at shutdown: their spans are already queued, their rollouts must not be lost).
    """

    def __init__(
        self,
        enqueue: Callable[[Record], None],
        *,
        settle: float = 1.0,
        grace: float = 600.0,
        max_open: int = 100_000,
        remember_closed: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enqueue = enqueue
        self.settle = settle
        self.grace = grace
        self.max_open = max_open
        self.remember_closed = remember_closed
        self.clock = clock
        self._open: dict[str, _Trace] = {}
        self._closed: OrderedDict[str, set[int]] = OrderedDict()  # their span ids, for repeats
        self._due: list[tuple[float, str]] = []  # (when to look at it, trace id); lazy
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- spans in ----------------------------------------------------------------------------

    def add(self, span: IngestedSpan) -> bool:
        """Queue a span's record and note it in its trace; False for a span already queued."""
        record = span.record
        trace_id = record.rollout_id
        now = self.clock()
        evicted: list[tuple[str, _Trace]] = []
        with self._lock:  # decided here, queued after: the queue may apply backpressure
            closed = self._closed.get(trace_id)
            if closed is not None:  # a late or repeated span of a closed trace: its row only
                if record.id in closed:
                    return False
                closed.add(record.id)
            else:
                trace = self._open.get(trace_id)
                if trace is None:
                    trace = self._open[trace_id] = _Trace()
                    heapq.heappush(self._due, (now + self.grace, trace_id))
                    if len(self._open) > self.max_open:
                        evicted.append(self._evict_oldest())
                elif record.id in trace.span_ids:
                    return False
                if trace.note(span, now):  # its root: it closes ``settle`` from now
                    heapq.heappush(self._due, (now + self.settle, trace_id))
                    self._wake.set()
        self.enqueue(record)
        self._emit(evicted)
        return True

    # -- rollouts out ------------------------------------------------------------------------

    def close_due(self) -> int:
        """Close the traces that are due now; how many closed."""
        now = self.clock()
        due: list[tuple[str, _Trace]] = []
        with self._lock:
            while self._due and self._due[0][0] <= now:
                _, trace_id = heapq.heappop(self._due)
                trace = self._open.get(trace_id)
                if trace is None:
                    continue
                if trace.root is None and trace.last_seen + self.grace > now:
                    heapq.heappush(self._due, (trace.last_seen + self.grace, trace_id))
                    continue
                due.append(self._take(trace_id))
        self._emit(due)
        return len(due)

    def close_all(self) -> int:
        """Close every open trace now; how many closed."""
        with self._lock:
            taken = [self._take(trace_id) for trace_id in list(self._open)]
            self._due.clear()
        self._emit(taken)
        return len(taken)

    @property
    def open_traces(self) -> int:
        return len(self._open)

    def holds(self, trace_id: str) -> bool:
        """Whether this assembler has ``trace_id`` open, or closed it lately (its rollout is
        queued, perhaps not written yet): either way its rollout is this assembler's to write."""
        with self._lock:
            return trace_id in self._open or trace_id in self._closed

    def _evict_oldest(self) -> tuple[str, _Trace]:
        oldest = next(iter(self._open))  # the first opened
        log.warning("flywheel otlp: %d traces open; closing the oldest early", len(self._open))
        return self._take(oldest)

    def _take(self, trace_id: str) -> tuple[str, _Trace]:
        """Move a trace from open to closed (under the lock); its rollout is still to queue."""
        trace = self._open.pop(trace_id)
        self._closed[trace_id] = trace.span_ids
        while len(self._closed) > self.remember_closed:
            self._closed.popitem(last=False)
        return trace_id, trace

    def _emit(self, closed: list[tuple[str, _Trace]]) -> None:
        """Queue the rollouts of closed traces (outside the lock)."""
        for trace_id, trace in closed:
            try:
                self.enqueue(trace.rollout(trace_id))
            except Exception:  # a bad value must not stop other traces from closing
                log.exception("flywheel otlp: could not build the rollout of trace %s", trace_id)

    # -- the closing thread ------------------------------------------------------------------

    def start(self) -> None:
        """Close traces as they fall due on a daemon thread, until ``stop``."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="flywheel-otlp-traces", daemon=True
                )
                self._thread.start()

    def stop(self) -> int:
        """Stop the thread and close every open trace; how many closed."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        return self.close_all()

    def _next_wait(self) -> float:
        with self._lock:
            if not self._due:
                return 1.0
            return min(1.0, max(0.0, self._due[0][0] - self.clock()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._next_wait())
            self._wake.clear()
            try:
                self.close_due()
            except Exception:
                log.exception("flywheel otlp: closing traces failed")
