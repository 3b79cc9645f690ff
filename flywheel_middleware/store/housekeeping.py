"""The store's routine upkeep, run by the ``flywheel run`` leader while it holds the cycle
lock: on PostgreSQL, partitions created ahead, DEFAULT rows moved home and the partitioned
tables analyzed (``partitions.maintain``, never a conversion); and, when a retention age is
set, the rows older than it pruned (``retention.prune``).

The leader runs it at its first cycle and then at most once per interval (a day unless the
caller says otherwise); at the cycles between, it only re-analyzes a partitioned table that
has outgrown its statistics (``partitions.analyze_stale``, one catalog query when none has).
A chore that fails is reported and the cycle runs anyway; the upkeep is tried again at the
next cycle (a lock not had in time: see ``partitions.bound_lock_waits``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from flywheel_middleware.store import partitions, retention
from flywheel_middleware.store.database import Store

log = logging.getLogger("flywheel_middleware.store.housekeeping")

DAY = 86_400.0


@dataclass
class Chores:
    """What one round of upkeep did, a line per chore, and what failed."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Housekeeper:
    """Upkeep of ``store`` at most once per ``every`` seconds of ``clock``; ``keep`` is the
    retention age (None: nothing is pruned)."""

    def __init__(
        self,
        store: Store,
        *,
        keep: timedelta | None,
        every: float = DAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.keep = keep
        self.every = every
        self.clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        return self._last is None or self.clock() - self._last >= self.every

    def run_if_due(self) -> Chores | None:
        """Do the upkeep when it is due, else the statistics check; None when nothing was
        done. Never raises."""
        chores = Chores()
        if not self.due():
            if self.store.dialect == "postgresql":
                _attempt(chores, "statistics", lambda: _statistics(self.store))
            return chores if chores.done or chores.failed else None
        if self.store.dialect == "postgresql":
            _attempt(chores, "maintain", lambda: _maintain(self.store))
        if self.keep is not None:
            keep = self.keep
            _attempt(chores, "prune", lambda: _prune(self.store, keep))
        if not chores.failed:  # a failed chore (a lock not had in time) is tried next cycle
            self._last = self.clock()
        return chores


def _attempt(chores: Chores, name: str, chore: Callable[[], str]) -> None:
    try:
        line = chore()
    except Exception as exc:
        log.warning("housekeeping failed: %s: %s", name, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        chores.failed.append(f"{name}: {type(exc).__name__}: {first}")
    else:
        if line:
            log.info("housekeeping: %s", line)
            chores.done.append(line)


def _statistics(store: Store) -> str:
    analyzed = partitions.analyze_stale(store)
    return f"statistics refreshed: {', '.join(analyzed)}" if analyzed else ""


def _maintain(store: Store) -> str:
    report = partitions.maintain(store)
    if len(report.not_partitioned) == len(partitions.TIME_COLUMN):
        return (
            "tables not partitioned by time: `flywheel db maintain --partition` converts them "
            "(it copies each table; choose a quiet time)"
        )
    line = f"partitions: {len(report.created)} created" + (
        f" ({', '.join(report.created)})" if report.created else " (all there already)"
    )
    moved = sum(report.moved.values())
    if moved:
        line += f"; {moved} row(s) moved in from DEFAULT partitions"
    if report.not_partitioned:
        line += f"; not partitioned: {', '.join(report.not_partitioned)}"
    return line + "; statistics refreshed"


def _prune(store: Store, keep: timedelta) -> str:
    report = retention.prune(store, keep)
    removed = ", ".join(f"{table} {n}" for table, n in report.deleted.items())
    line = f"pruned rows older than {report.cutoff:%Y-%m-%d %H:%M} UTC: {removed}"
    if report.dropped:
        line += f"; {len(report.dropped)} partition(s) dropped"
    kept = sum(report.kept.values())
    if kept:
        line += f"; {kept} old row(s) kept for running experiments"
    return line
