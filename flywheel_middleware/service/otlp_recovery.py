"""Rollouts for OTLP traces no live service will close: their spans are stored, their rollout
is not, because the ``flywheel serve`` that held them open was killed (SIGKILL, the OOM killer,
a lost host) before it closed them.

A pass finds the rollout ids of ingested spans (``trace_id = rollout_id``; spans captured in
Python have no trace id) with no rollout row, rebuilds each trace from its stored span rows
with ``otlp_traces.rollout_of`` (the code a live close runs) and queues only the rollout
record. The store inserts a rollout id once (``ON CONFLICT DO NOTHING``; on a partitioned
PostgreSQL store, the ``rollout_once`` trigger), so services that recover the same trace at the
same time write one row, and a second pass finds nothing.

When a trace can no longer be open anywhere: a live service closes a trace at most
``max(FLYWHEEL_OTLP_GRACE, FLYWHEEL_OTLP_SETTLE)`` seconds after the last of its spans arrived.
A span arrives after it ended, but its end time is the agent's clock and it may reach the
service late (exporter batching and retries, a collector's queue), so a trace is taken only
when its newest span (end, else start) is older than that plus ``FLYWHEEL_OTLP_LATE`` seconds
(default 300: clock skew between agents and services plus export delay), by this service's
wall clock. A span that arrives later than that is a late span, as one arriving after a live
close is: it is stored, and the rollout stays as first written. Traces this service holds (open,
or closed with their rollout queued) are left to it. Recovery reads the spans the store has:
spans still in a dead service's journal on another host count only once that journal is
replayed, which a service started on the same journal folder does before its first pass.

Cost: a pass reads spans by ``started_at`` (an index; on PostgreSQL, one or two partitions) in a
window ending at that cut-off: ``FLYWHEEL_OTLP_RECOVER_LOOKBACK`` seconds (default 7 days) on
the first pass after start-up, one hour on each later pass (every
``FLYWHEEL_OTLP_RECOVER_EVERY`` seconds, default 60), each span probing the rollout primary key.
A trace that stays without a rollout past a later pass's hour is taken at the next start-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import exists, select

from flywheel_middleware import runtime
from flywheel_middleware.capture.otlp_traces import TraceAssembler, rollout_of, stored_span
from flywheel_middleware.capture.records import SpanRecord, datetime_to_ns, ns_to_datetime
from flywheel_middleware.environment import env_number
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import Rollout, Span
from flywheel_middleware.tables import SPAN

log = logging.getLogger("flywheel_middleware.otlp")

EVERY_ENV = "FLYWHEEL_OTLP_RECOVER_EVERY"
LOOKBACK_ENV = "FLYWHEEL_OTLP_RECOVER_LOOKBACK"
LATE_ENV = "FLYWHEEL_OTLP_LATE"
WINDOW = 3600.0  # seconds of span starts a pass after the first reads
_CHUNK = 200  # traces read back per query
_NS = 1_000_000_000


def orphan_query(since_ns: int, until_ns: int) -> Any:
    """Rollout ids of ingested spans started in ``[since_ns, until_ns)`` with no rollout row."""
    return (
        select(Span.rollout_id)
        .where(
            Span.started_at >= ns_to_datetime(since_ns),
            Span.started_at < ns_to_datetime(until_ns),
            Span.trace_id == Span.rollout_id,
            ~exists().where(Rollout.id == Span.rollout_id),
        )
        .distinct()
    )


def orphan_ids(store: Store, since_ns: int, until_ns: int) -> list[str]:
    with store.session() as session:
        return list(session.execute(orphan_query(since_ns, until_ns)).scalars())


def _time(value: Any) -> int | None:
    return None if value is None else datetime_to_ns(value)


def stored_traces(store: Store, ids: list[str]) -> dict[str, list[SpanRecord]]:
    """The span records of traces ``ids``, each trace's in start order."""
    traces: dict[str, list[SpanRecord]] = {}
    with store.session() as session:
        query = select(Span).where(Span.rollout_id.in_(ids)).order_by(Span.started_at, Span.id)
        rows = session.execute(query).scalars().all()
    for row in rows:
        values = {c: getattr(row, c) for c in SPAN.record_columns}
        values["started_at"] = _time(row.started_at)
        values["ended_at"] = _time(row.ended_at)
        traces.setdefault(row.rollout_id, []).append(SpanRecord(**values))
    return traces


def _newest(spans: Iterable[SpanRecord]) -> int:
    return max(s.ended_at or s.started_at for s in spans)


class Recovery:
    """Passes that queue the rollouts of traces left without one (see the module docstring):
    one soon after start-up, once the recorder has replayed dead processes' journals, then
    every ``every`` seconds, on a daemon thread; a pass that fails is logged and retried."""

    def __init__(
        self,
        assembler: TraceAssembler,
        *,
        hold: float,
        every: float = 60.0,
        lookback: float = 7 * 86400.0,
        window: float = WINDOW,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.assembler = assembler
        self.hold = hold
        self.every = every
        self.lookback = lookback
        self.window = window
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, assembler: TraceAssembler) -> Recovery:
        late = env_number(LATE_ENV, 300.0, allow_zero=True)
        return cls(
            assembler,
            hold=max(assembler.grace, assembler.settle) + late,
            every=env_number(EVERY_ENV, 60.0),
            lookback=env_number(LOOKBACK_ENV, 7 * 86400.0),
        )

    def run_once(self, lookback: float) -> int | None:
        """Queue the rollouts of the traces due among spans started in the ``lookback``
        seconds before the cut-off; how many, or None when the recorder could not first
        write what it holds (a dead process's journal, this service's own rollouts)."""
        recorder = runtime.get_recorder()
        if not recorder.flush(30.0):
            log.warning("flywheel otlp: the store is not taking writes; trace recovery waits")
            return None
        store = runtime.get_store()
        until = self.clock() - int(self.hold * _NS)
        ids = orphan_ids(store, until - int(lookback * _NS), until)
        ids = [i for i in ids if not self.assembler.holds(i)]
        queued = 0
        for start in range(0, len(ids), _CHUNK):
            for trace_id, spans in stored_traces(store, ids[start : start + _CHUNK]).items():
                if _newest(spans) >= until or self.assembler.holds(trace_id):
                    continue  # a span of it is still recent: it may be open in a live service
                rollout = rollout_of(trace_id, map(stored_span, spans))
                rollout.metadata["recovered"] = True
                recorder.enqueue(rollout)
                queued += 1
        if queued:
            log.warning("flywheel otlp: recovered the rollouts of %d unclosed traces", queued)
        return queued

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="flywheel-otlp-recovery", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        first = True  # the first pass reads back ``lookback``; it repeats until it succeeds
        while not self._stop.is_set():
            try:
                if self.run_once(self.lookback if first else self.window) is not None:
                    first = False
            except Exception:
                log.exception("flywheel otlp: recovering unclosed traces failed; retrying later")
            self._stop.wait(self.every)
