"""The demo's timeline: each cycle of the demo placed on a simulated day of its own.

The demo runs a week of customer traffic in a minute. Once it has run, every time the store
holds (rollouts, spans, feedback, telemetry, experiments, versions, change events …) is moved
by one increasing, piecewise-linear map, so cycle k's customers arrive over day k and its
controller run closes that day, and the last day ends when the demo did. Order is kept, so
every figure the loop computed while it ran still holds; only the time axis is stretched, and
the dashboard shows the loop's week as a week.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import Column, DateTime, Float, and_, bindparam, select, update
from sqlmodel import SQLModel

from flywheel_middleware.store.database import Store

DAY = 86_400.0
TRAFFIC_SHARE = 0.8  # of each simulated day, the customers' part; the controller closes the day
EPOCH_COLUMNS = {("telemetry_event", "client_ts")}  # times kept as epoch seconds, not datetimes


@dataclass
class Timeline:
    """Real times (epoch seconds) at which each cycle's traffic began, ended, and its
    controller run ended; ``map`` turns a real time into the simulated one."""

    marks: list[tuple[float, float, float]] = field(default_factory=list)

    def knots(self) -> tuple[list[float], list[float]]:
        if not self.marks:
            return [], []
        end = self.marks[-1][2]
        days = len(self.marks)
        real: list[float] = []
        simulated: list[float] = []
        for k, (start, traffic_end, cycle_end) in enumerate(self.marks):
            day = end - (days - k) * DAY
            real += [start, traffic_end, cycle_end]
            simulated += [day, day + TRAFFIC_SHARE * DAY, day + DAY]
        return real, simulated

    def days(self) -> list[datetime]:
        """When each cycle's simulated day begins."""
        _, simulated = self.knots()
        return [datetime.fromtimestamp(t, timezone.utc) for t in simulated[::3]]

    def map(self, t: float) -> float:
        real, simulated = self.knots()
        if not real:
            return t
        if t <= real[0]:
            return simulated[0] - (real[0] - t)
        if t >= real[-1]:
            return simulated[-1] + (t - real[-1])
        i = bisect.bisect_right(real, t) - 1
        span = real[i + 1] - real[i]
        share = (t - real[i]) / span if span > 0 else 0.0
        return simulated[i] + share * (simulated[i + 1] - simulated[i])


def _to_datetime(value: datetime, timeline: Timeline) -> datetime:
    aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(timeline.map(aware.timestamp()), timezone.utc)


def _is_time(column: Column) -> bool:
    kind = getattr(column.type, "impl", column.type)  # UTCDateTime decorates DateTime
    return isinstance(kind, DateTime) or (column.table.name, column.name) in EPOCH_COLUMNS


def spread_over_days(store: Store, timeline: Timeline) -> int:
    """Move every stored time through ``timeline.map``; returns how many rows changed."""
    changed = 0
    with store.engine.begin() as conn:
        for table in SQLModel.metadata.sorted_tables:
            times = [c for c in table.columns if _is_time(c)]
            keys = list(table.primary_key.columns)
            if not times or not keys:
                continue
            rows = conn.execute(select(*keys, *times)).all()
            if not rows:
                continue
            params = []
            for row in rows:
                values = {f"k_{c.name}": row[i] for i, c in enumerate(keys)}
                for j, c in enumerate(times):
                    v = row[len(keys) + j]
                    if v is not None and isinstance(c.type, Float):
                        v = timeline.map(float(v))
                    elif v is not None:
                        v = _to_datetime(v, timeline)
                    values[f"t_{c.name}"] = v
                params.append(values)
            stmt = (
                update(table)
                .where(and_(*(c == bindparam(f"k_{c.name}") for c in keys)))
                .values({c.name: bindparam(f"t_{c.name}") for c in times})
            )
            conn.execute(stmt, params)
            changed += len(params)
    return changed
