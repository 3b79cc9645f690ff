"""Retention: rows of the growing tables older than a cutoff leave the store, except what a
running experiment still needs; a rollout's spans, feedback and telemetry events leave with it.

A row's age is its table's time column (``partitions.TIME_COLUMN``). Kept whatever their age:
the rollouts of a running experiment and the spans, feedback and telemetry events of those
rollouts, since the experiment's statistics and its decision are computed from them. The
tables that hold the loop's history are never pruned: config versions (every exported row's
``config_version_id`` keeps naming a version that exists), deployments, experiments, change
events, routing weights and model artifacts.

On a partitioned PostgreSQL table a partition wholly older than the cutoff is dropped at once
(unless it holds rows a running experiment needs); the rest (the partition the cutoff falls
in, SQLite, unpartitioned PostgreSQL) is deleted in bounded batches, one short transaction
each, so writers never wait long.

A rollout that straddles the cutoff (its start, the root span's, before it; later spans, its
feedback or its events after it) leaves whole: once the rollouts are pruned, the rows of the
other three tables made in ``[cutoff, cutoff + TRACE_BOUND)`` whose rollout row is gone are
deleted too, in the same bounded batches. Left behind they would be spans of nothing (exports
and analysis join nothing to them), and the OTLP service's recovery, which rebuilds a rollout
for ingested spans that have none, would bring the pruned trace back as a partial rollout.
Reading the window afterwards, rather than the pruned ids, works the same in every mode (a
dropped partition's ids are never read) and after an interrupted prune: the next one finds
what is left (or the age rule takes it once the cutoff passes it).

``TRACE_BOUND`` (one day) bounds how long after its rollout's start a row of that rollout is
made: an agent's trace lasts seconds to hours, and a live service closes it minutes after its
last span. A pruned rollout started before the cutoff, so its spans started before
``cutoff + TRACE_BOUND``. Feedback or an event given later than that on a pruned rollout stays
until it ages out (recovery reads spans only, so it brings nothing back). The window costs a
read of a day of each table per prune (``flywheel run`` prunes daily), each row probing the
rollout key; telemetry_event has no time index, so where it is not partitioned that read scans
it, as its age rule's already does.

A row with no rollout row is not always a pruned rollout's: the trace may still be open in a
service, or closed by one that died and not yet rebuilt by recovery (a replica's pass within
the hour; a service's first pass after start-up within its lookback). Those traces are young,
far from the cutoff, so the window never reaches rows started in the last ``RECENT`` (two
days: a trace's ``TRACE_BOUND`` plus a day for its rollout to be written or recovered): with
``keep`` under three days the window ends ``RECENT`` before now, and it is empty with ``keep``
of two days or less, where a straddling trace's later rows stay until they age out (and the
OTLP service's recovery may rebuild the trace from them: keep three days or more there). A trace
that waits for a service's start-up to be recovered longer than ``keep - TRACE_BOUND`` may lose
its rows in the window; with ``keep`` of a week, that is a service down for six days.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import bindparam, text

from flywheel_middleware.capture.records import datetime_to_ns, ns_to_sqlite_text
from flywheel_middleware.errors import StoreError
from flywheel_middleware.store import partitions
from flywheel_middleware.store.database import Store

DEFAULT_BATCH = 5_000
TRACE_BOUND = timedelta(days=1)  # how long after its rollout's start a row of it is made
RECENT = 2 * TRACE_BOUND  # rows younger than this may belong to a rollout not yet written

_RUNNING_ROLLOUTS = (
    "SELECT r.id FROM rollout r JOIN experiment e ON e.id = r.experiment_id "
    "WHERE e.status = 'running'"
)
_NEEDED = {
    "rollout": "EXISTS (SELECT 1 FROM experiment e "
    "WHERE e.status = 'running' AND e.id = t.experiment_id)",
    **{
        table: f"EXISTS (SELECT 1 FROM ({_RUNNING_ROLLOUTS}) r WHERE r.id = t.rollout_id)"
        for table in ("span", "feedback", "telemetry_event")
    },
}
"""Per table, the rows a running experiment needs (``t`` is the table's row)."""

_ROLLOUT_GONE = (
    "t.rollout_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM rollout r WHERE r.id = t.rollout_id)"
)
"""A row of a rollout with no rollout row (``t`` is the row of span, feedback or telemetry)."""


def _needed_in(part: str, table: str) -> str:
    """Whether partition ``part`` holds a row a running experiment needs, found from the
    running experiments' side (usually few rows) through the partition's indexes."""
    if table == "rollout":
        return (
            "SELECT EXISTS (SELECT 1 FROM experiment e WHERE e.status = 'running' AND "
            f'EXISTS (SELECT 1 FROM "{part}" t WHERE t.experiment_id = e.id))'
        )
    return (
        f"SELECT EXISTS (SELECT 1 FROM ({_RUNNING_ROLLOUTS}) r WHERE "
        f'EXISTS (SELECT 1 FROM "{part}" t WHERE t.rollout_id = r.id))'
    )


@dataclass
class PruneReport:
    cutoff: datetime
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows removed
    dropped: list[str] = field(default_factory=list)  # partitions dropped whole
    kept: dict[str, int] = field(default_factory=dict)  # table -> old rows kept for experiments


def prune(
    store: Store,
    older_than: timedelta,
    *,
    batch: int = DEFAULT_BATCH,
    now: datetime | None = None,
) -> PruneReport:
    """Remove the rows older than ``older_than`` (before ``now``) that no running
    experiment needs, and the younger rows of the rollouts removed (see the module
    docstring); returns what was removed and what was kept."""
    if older_than <= timedelta(0):
        raise StoreError(f"the retention age must be positive, got {older_than}")
    if batch < 1:
        raise StoreError(f"the batch size must be 1 or more, got {batch}")
    store.ensure_schema()
    now = now or datetime.now(timezone.utc)
    cutoff = now - older_than
    window_end = min(cutoff + TRACE_BOUND, now - RECENT)
    bound, end = _stored_time(store, cutoff), _stored_time(store, window_end)
    report = PruneReport(cutoff=cutoff)
    for table, column in partitions.TIME_COLUMN.items():  # rollouts first
        removed = _drop_partitions(store, table, cutoff, report)
        old = f't."{column}" < :cutoff AND NOT {_NEEDED[table]}'
        removed += _delete_in_batches(store, table, old, {"cutoff": bound}, batch)
        if table != "rollout" and window_end > cutoff:
            left = f't."{column}" >= :cutoff AND t."{column}" < :end AND {_ROLLOUT_GONE}'
            removed += _delete_in_batches(store, table, left, {"cutoff": bound, "end": end}, batch)
        report.deleted[table] = removed
        with store.engine.connect() as conn:
            report.kept[table] = int(
                conn.execute(
                    text(f'SELECT count(*) FROM "{table}" WHERE "{column}" < :cutoff'),
                    {"cutoff": bound},
                ).scalar()
                or 0
            )
    return report


def _stored_time(store: Store, moment: datetime) -> Any:
    """``moment`` as the store compares it with a time column (text on SQLite)."""
    return ns_to_sqlite_text(datetime_to_ns(moment)) if store.dialect == "sqlite" else moment


def _drop_partitions(store: Store, table: str, cutoff: datetime, report: PruneReport) -> int:
    """Drop ``table``'s partitions that end by ``cutoff`` and hold nothing an experiment needs."""
    removed = 0
    for part in partitions.partition_list(store, table):
        if part.end is None or part.end > cutoff:
            continue
        with store.engine.begin() as conn, store.unbounded(conn):
            partitions.lock_partitions(conn)
            partitions.bound_lock_waits(conn)
            if conn.execute(text("SELECT to_regclass(:p)"), {"p": part.name}).scalar() is None:
                continue  # another prune dropped it meanwhile
            needed = conn.execute(text(_needed_in(part.name, table))).scalar()
            if needed:
                continue  # its other rows go in batches
            removed += int(conn.execute(text(f'SELECT count(*) FROM "{part.name}"')).scalar() or 0)
            conn.execute(text(f'DROP TABLE "{part.name}"'))
        report.dropped.append(part.name)
    return removed


def _delete_in_batches(
    store: Store, table: str, where: str, params: dict[str, Any], batch: int
) -> int:
    """Delete ``table``'s rows ``where`` holds for (``t`` is the row), ``batch`` at a time in
    id order (each batch resumes after the last id seen, so rows kept are never read twice);
    the delete checks ``where`` again, for rows changed since they were found."""
    removed = 0
    last: Any = None
    find = f'SELECT t.id FROM "{table}" t WHERE {where} {{after}}ORDER BY t.id LIMIT :batch'
    delete = text(f'DELETE FROM "{table}" AS t WHERE t.id IN :ids AND {where}').bindparams(
        bindparam("ids", expanding=True)
    )
    while True:
        with store.engine.begin() as conn:
            ids = list(
                conn.execute(
                    text(find.format(after="" if last is None else "AND t.id > :last ")),
                    {**params, "batch": batch, "last": last},
                ).scalars()
            )
            if not ids:
                return removed
            removed += conn.execute(delete, {**params, "ids": ids}).rowcount
        last = ids[-1]
