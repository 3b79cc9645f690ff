"""Hot problems (seed 001's ``get_hot_problems``): where a workflow is slow, failing or disliked.

Per workflow and node — ``span.node``, or the span's name for top-level and agent spans — and
per workflow as a whole (from rollouts, ``node`` is None): calls, average and p95 latency, error
rate, low-rating rate (a rollout's rating, by ``store.outcomes``, joined through the rollout:
low when at most ``triggers.low_rating.max_rating``) and implicit satisfaction (mean of
feedback with source ``implicit``), over a time window. Groups with at least ``min_calls`` that
breach a threshold of YAML ``analysis:`` are hot.

Everything is aggregated in SQL. Node-level spans are read from the partial covering index
``ix_span_hot`` alone (no join, no sort), their exact p95 two rows at an OFFSET per group.
For rollouts, p95 is ``percentile_cont(0.95)`` on PostgreSQL; on SQLite the same interpolated
value comes from ``ROW_NUMBER()`` over each group, and on windows larger than ``exact_limit``
rows (where SQLite's sort would dominate) from a 1%-wide log histogram in the same pass.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import text

from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.store import outcomes
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import HOT_SPANS

WORKFLOW_NODE = None
"""``HotProblem.node`` of the workflow-level row."""


@dataclass
class HotProblem:
    """One (workflow, node) group and the thresholds it breached (empty: not hot)."""

    workflow: str
    node: str | None
    calls: int
    avg_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    errors: int = 0
    rated: int = 0
    low_rated: int = 0
    implicit_satisfaction: float | None = None
    breaches: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def low_rating_rate(self) -> float | None:
        return self.low_rated / self.rated if self.rated else None

    @property
    def hot(self) -> bool:
        return bool(self.breaches)

    @property
    def label(self) -> str:
        return self.node if self.node is not None else "(workflow)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "node": self.node,
            "calls": self.calls,
            "avg_latency_ms": self.avg_latency_ms,
            "p95_latency_ms": self.p95_latency_ms,
            "error_rate": self.error_rate,
            "rated": self.rated,
            "low_rating_rate": self.low_rating_rate,
            "implicit_satisfaction": self.implicit_satisfaction,
            "breaches": self.breaches,
        }


_ERROR = "{c} IN ('error', 'failed')"
_NODE_SPANS = f"({HOT_SPANS})"  # node, parent_id and kind exist only on span
_BUCKETS_PER_E = 100
"""Histogram resolution on large SQLite windows: buckets 1% wide, so p95 is within 0.5%."""


@dataclass
class _Source:
    """One grouping: spans by (workflow, node), or rollouts by workflow."""

    table: str
    latency: str
    status: str
    rollout_id: str
    node: str
    join: str
    time: str
    extra_where: str = ""


_SPANS = _Source(
    table="span s",
    latency="s.duration_ms",
    status="s.status",
    rollout_id="s.rollout_id",
    node="COALESCE(s.node, s.name)",
    join="JOIN rollout r ON r.id = s.rollout_id",
    time="s.started_at",
    extra_where=_NODE_SPANS,
)
_ROLLOUTS = _Source(
    table="rollout r",
    latency="r.latency_ms",
    status="r.status",
    rollout_id="r.id",
    node="CAST(NULL AS TEXT)",
    join="",
    time="r.started_at",
)


class _Query:
    """Builds the SQL of one grouping for a window; the time column may skip its index."""

    def __init__(
        self,
        src: _Source,
        dialect: str,
        since: datetime,
        until: datetime | None,
        workflow: str | None,
    ) -> None:
        self.src, self.dialect = src, dialect
        self.params: dict[str, Any] = {"since": _bind(since, dialect)}
        self.time_col = src.time
        conds = []
        if until is not None:
            self.params["until"] = _bind(until, dialect)
        if workflow:
            self.params["wf"] = workflow
            conds.append("r.workflow = :wf")
        if src.extra_where:
            conds.append(src.extra_where)
        self.conds = conds
        self.until = until is not None

    def where(self, time_index: bool = True) -> str:
        col = self.time_col if time_index or self.dialect != "sqlite" else f"+{self.time_col}"
        conds = [f"{col} >= :since", *self.conds]
        if self.until:
            conds.append(f"{col} < :until")
        return " AND ".join(conds)

    def from_(self) -> str:
        return f"{self.src.table} {self.src.join}"


def _group(src: _Source) -> str:
    return "r.workflow" if src is _ROLLOUTS else f"r.workflow, {src.node}"


def _bind(value: datetime, dialect: str) -> Any:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    if dialect == "sqlite":  # the text SQLAlchemy stores for a UTC DateTime on SQLite
        return (
            value.astimezone(timezone.utc)
            .replace(tzinfo=None)
            .isoformat(sep=" ", timespec="microseconds")
        )
    return value


Groups = dict[tuple[str, Any], HotProblem]


def _aggregate_exact(store: Store, q: _Query) -> Groups:
    with store.engine.connect() as conn:
        return _aggregate_exact_on(conn, q)


def _aggregate_exact_on(conn: Any, q: _Query) -> Groups:
    """count, avg, errors and an exact p95 (percentile_cont semantics) per group."""
    src = q.src
    pg = q.dialect == "postgresql"
    p95 = f", percentile_cont(0.95) WITHIN GROUP (ORDER BY {src.latency})" if pg else ""
    sql = (
        f"SELECT r.workflow, {src.node} AS node, COUNT(*), AVG({src.latency}), "
        f"SUM(CASE WHEN {_ERROR.format(c=src.status)} THEN 1 ELSE 0 END){p95} "
        f"FROM {q.from_()} WHERE {q.where()} GROUP BY {_group(src)}"
    )
    out: Groups = {}
    for row in conn.execute(text(sql), q.params):
        p = HotProblem(row[0], row[1], int(row[2]), _f(row[3]), errors=int(row[4] or 0))
        if pg:
            p.p95_latency_ms = _f(row[5])
        out[(p.workflow, p.node)] = p
    if not pg:
        _sqlite_exact_p95(conn, q, out)
    return out


def _sqlite_exact_p95(conn: Any, q: _Query, out: Groups) -> None:
    """Rank each group's latencies with ROW_NUMBER() and read the two around 0.95*(n-1)."""
    src = q.src
    sql = (
        "SELECT wf, node, latency, rn, n FROM ("
        f"SELECT r.workflow AS wf, {src.node} AS node, {src.latency} AS latency, "
        f"ROW_NUMBER() OVER (PARTITION BY r.workflow, {src.node} ORDER BY {src.latency}) AS rn, "
        f"COUNT(*) OVER (PARTITION BY r.workflow, {src.node}) AS n "
        f"FROM {q.from_()} WHERE {q.where()} AND {src.latency} IS NOT NULL"
        ") WHERE rn - 1 > (n - 1) * 0.95 - 1 AND rn - 1 < (n - 1) * 0.95 + 1"
    )
    picks: dict[tuple[str, Any], dict[int, float]] = {}
    sizes: dict[tuple[str, Any], int] = {}
    for wf, node, latency, rn, n in conn.execute(text(sql), q.params):
        picks.setdefault((wf, node), {})[int(rn) - 1] = float(latency)
        sizes[(wf, node)] = int(n)
    for key, values in picks.items():
        position = 0.95 * (sizes[key] - 1)
        lo = math.floor(position)
        low, high = values.get(lo), values.get(lo + 1, values.get(lo))
        if key in out and low is not None and high is not None:
            out[key].p95_latency_ms = low + (position - lo) * (high - low)


def _aggregate_histogram(store: Store, q: _Query) -> Groups:
    """One pass over a large rollout window: exact count/avg/errors per group, p95 from a
    1%-wide log histogram (a window too large to sort quickly on SQLite)."""
    src = q.src
    bucket = f"CAST(ln(max({src.latency}, 0.001)) * {_BUCKETS_PER_E} AS INTEGER)"
    sql = (
        f"SELECT r.workflow, {src.node} AS node, {bucket} AS b, COUNT(*), "
        f"SUM({src.latency}), SUM(CASE WHEN {_ERROR.format(c=src.status)} THEN 1 ELSE 0 END) "
        f"FROM {q.from_()} WHERE {q.where(time_index=False)} "
        f"GROUP BY {_group(src)}, b"
    )
    with store.engine.connect() as conn:
        parts = [list(conn.execute(text(sql), q.params))]
    hist: dict[tuple[str, Any], dict[int, int]] = {}
    out: Groups = {}
    sums: dict[tuple[str, Any], float] = {}
    timed: dict[tuple[str, Any], int] = {}
    for rows in parts:
        for wf, node, b, n, total, errors in rows:
            key = (wf, node)
            p = out.get(key)
            if p is None:
                p = out[key] = HotProblem(wf, node, 0)
            p.calls += int(n)
            p.errors += int(errors or 0)
            if b is not None:
                sums[key] = sums.get(key, 0.0) + float(total or 0.0)
                timed[key] = timed.get(key, 0) + int(n)
                h = hist.setdefault(key, {})
                h[int(b)] = h.get(int(b), 0) + int(n)
    for key, p in out.items():
        if timed.get(key):
            p.avg_latency_ms = sums[key] / timed[key]
            p.p95_latency_ms = _histogram_p95(hist[key], timed[key])
    return out


def _aggregate_spans(store: Store, q: _Query) -> Groups:
    """Node-level spans read from ``ix_span_hot`` alone: no join to rollouts, no sort.

    The index holds exactly these spans (its WHERE is ``HOT_SPANS``, repeated verbatim so the
    planner may use it), ordered by (workflow, node, duration), so one pass gives count, mean
    and errors per group and the exact p95 (``percentile_cont`` semantics) is two rows read at
    an OFFSET inside each group.
    """
    conds = [f"({HOT_SPANS})", "s.started_at >= :since"]
    if q.until:
        conds.append("s.started_at < :until")
    if "wf" in q.params:
        conds.append("s.workflow = :wf")
    where = " AND ".join(conds)
    node = "coalesce(s.node, s.name)"
    sql = (
        f"SELECT s.workflow, {node} AS node, COUNT(*), AVG(s.duration_ms), "
        f"SUM(CASE WHEN {_ERROR.format(c='s.status')} THEN 1 ELSE 0 END), COUNT(s.duration_ms) "
        f"FROM span s WHERE {where} GROUP BY s.workflow, {node}"
    )
    pick = (
        f"SELECT s.duration_ms FROM span s WHERE {where} AND s.workflow IS NOT DISTINCT FROM :g_wf "
        f"AND {node} = :g_node AND s.duration_ms IS NOT NULL "
        f"ORDER BY s.duration_ms LIMIT 2 OFFSET :g_lo"
    )
    if q.dialect == "sqlite":
        pick = pick.replace("IS NOT DISTINCT FROM", "IS")
    out: Groups = {}
    with store.engine.connect() as conn:
        for wf, name, n, avg, errors, timed in conn.execute(text(sql), q.params).all():
            p = out[(wf, name)] = HotProblem(wf, name, int(n), _f(avg), errors=int(errors or 0))
            if not timed:
                continue
            position = 0.95 * (int(timed) - 1)
            lo = math.floor(position)
            values = [
                float(v)
                for (v,) in conn.execute(
                    text(pick), {**q.params, "g_wf": wf, "g_node": name, "g_lo": lo}
                )
            ]
            if values:
                high = values[1] if len(values) > 1 else values[0]
                p.p95_latency_ms = values[0] + (position - lo) * (high - values[0])
    if any(wf is None for wf, _ in out):
        # Spans written without their workflow (by a third-party writer): attribute them
        # through their rollout, the slower way, and only them.
        out = {key: p for key, p in out.items() if key[0] is not None}
        orphans = copy.copy(q)
        orphans.conds = [*q.conds, "s.workflow IS NULL"]
        for key, p in _aggregate_exact(store, orphans).items():
            mine = out.get(key)
            out[key] = p if mine is None else _combine(mine, p)
    return out


def _combine(a: HotProblem, b: HotProblem) -> HotProblem:
    """Two partial aggregates of one group (p95: the larger of the two, a conservative bound)."""
    calls = a.calls + b.calls
    avg = None
    if a.avg_latency_ms is not None or b.avg_latency_ms is not None:
        avg = ((a.avg_latency_ms or 0) * a.calls + (b.avg_latency_ms or 0) * b.calls) / calls
    out = HotProblem(a.workflow, a.node, calls, avg, errors=a.errors + b.errors)
    p95s = [v for v in (a.p95_latency_ms, b.p95_latency_ms) if v is not None]
    out.p95_latency_ms = max(p95s) if p95s else None
    return out


def _histogram_p95(hist: dict[int, int], n: int) -> float:
    rank = math.floor(0.95 * (n - 1))  # 0-based rank of the lower neighbour
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen > rank:
            return math.exp((b + 0.5) / _BUCKETS_PER_E)
    return math.exp((max(hist) + 0.5) / _BUCKETS_PER_E)  # pragma: no cover


def _feedback_rows(store: Store, q: _Query, low_rating_max: float) -> list[tuple]:
    """Ratings and implicit satisfaction per group, driven from the (small) feedback table."""
    src = q.src
    params = {**q.params, "low": low_rating_max}
    rows: list[tuple] = []
    ratings = outcomes.as_sql(outcomes.rollout_ratings(), store.engine.dialect)
    for kind, per_rollout in (
        # a rollout's rating: its lowest explicit rating (store.outcomes)
        ("rating", f"SELECT o.rollout_id AS rid, o.rating AS value FROM ({ratings}) o"),
        (
            "implicit",
            "SELECT f.rollout_id AS rid, AVG(f.value) AS value FROM feedback f "
            "WHERE f.source = 'implicit' AND f.value IS NOT NULL GROUP BY f.rollout_id",
        ),
    ):
        join = "CROSS JOIN" if q.dialect == "sqlite" else "JOIN"  # SQLite: drive from feedback
        if src is _SPANS:
            body = (
                f"SELECT DISTINCT r.workflow AS wf, {src.node} AS node, fb.rid, fb.value "
                f"FROM ({per_rollout}) fb {join} rollout r ON r.id = fb.rid "
                f"{join} span s ON s.rollout_id = r.id WHERE {q.where()}"
            )
        else:
            body = (
                f"SELECT r.workflow AS wf, {src.node} AS node, fb.rid, fb.value "
                f"FROM ({per_rollout}) fb {join} rollout r ON r.id = fb.rid WHERE {q.where()}"
            )
        agg = (
            "COUNT(*), SUM(CASE WHEN value <= :low THEN 1 ELSE 0 END)"
            if kind == "rating"
            else "AVG(value), 0"
        )
        sql = f"SELECT wf, node, {agg} FROM ({body}) per GROUP BY wf, node"
        with store.engine.connect() as conn:
            rows.extend((kind, *row) for row in conn.execute(text(sql), params))
    return rows


def _merge_feedback(groups: Groups, rows: list[tuple]) -> None:
    for kind, wf, node, a, b in rows:
        p = groups.get((wf, node))
        if p is None:
            continue
        if kind == "rating":
            p.rated, p.low_rated = int(a), int(b or 0)
        else:
            p.implicit_satisfaction = _f(a)


def _sqlite_has_ln(conn: Any) -> bool:
    try:
        conn.execute(text("SELECT ln(2.0)")).scalar()
    except Exception:
        return False
    return True


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def _breaches(p: HotProblem, config: FlywheelConfig) -> list[str]:
    a = config.analysis
    out = []
    if p.avg_latency_ms is not None and p.avg_latency_ms > a.latency_ms_max:
        out.append(f"avg latency {p.avg_latency_ms:.0f} ms > {a.latency_ms_max:g} ms")
    if p.p95_latency_ms is not None and p.p95_latency_ms > a.latency_ms_max:
        out.append(f"p95 latency {p.p95_latency_ms:.0f} ms > {a.latency_ms_max:g} ms")
    if p.error_rate > a.error_rate_max:
        out.append(f"error rate {p.error_rate:.1%} > {a.error_rate_max:.1%}")
    low = p.low_rating_rate
    if low is not None and low > a.low_rating_rate_max:
        out.append(f"low-rating rate {low:.1%} > {a.low_rating_rate_max:.1%}")
    sat = p.implicit_satisfaction
    if sat is not None and sat < a.implicit_satisfaction_min:
        out.append(f"implicit satisfaction {sat:.2f} < {a.implicit_satisfaction_min:g}")
    return out


def hot_problems(
    store: Store,
    config: FlywheelConfig,
    workflow: str | None = None,
    since: datetime | None = None,
    *,
    until: datetime | None = None,
    include_all: bool = False,
    nodes: bool = True,
    exact_limit: int = 50_000,
) -> list[HotProblem]:
    """The hot groups (or every group with ``include_all``), worst first.

    ``since`` defaults to ``analysis.since_minutes`` ago; groups under ``analysis.min_calls``
    are never hot (they are listed with ``include_all``, without breaches). Node-level spans are
    read from ``ix_span_hot`` with an exact p95; on SQLite a rollout window of more than
    ``exact_limit`` rows is aggregated in one pass with p95 from a 1%-wide histogram (within 0.5%).
    """
    if since is None:
        since = datetime.now(timezone.utc) - timedelta(minutes=config.analysis.since_minutes)
    low_max = config.triggers.low_rating.max_rating
    sources = [_ROLLOUTS, _SPANS] if nodes else [_ROLLOUTS]
    with store.engine.connect() as conn:
        ln_ok = store.dialect == "sqlite" and _sqlite_has_ln(conn)
        plans = []
        for src in sources:
            q = _Query(src, store.dialect, since, until, workflow)
            large = False
            # Spans always read ix_span_hot; only rollouts may need the histogram pass.
            if ln_ok and src is not _SPANS:  # a bounded count: is the window too big to sort?
                table = src.table.split()[0]
                n = conn.execute(
                    text(
                        f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} WHERE started_at >= :since"
                        " LIMIT :cap) AS w"
                    ),
                    {"since": q.params["since"], "cap": exact_limit + 1},
                ).scalar()
                large = int(n or 0) > exact_limit
            plans.append((q, large))
    # The aggregations and the feedback joins are independent queries: run them side by side
    # (each on its own connection; the SQLite driver releases the GIL while it works).
    with ThreadPoolExecutor(max(1, 2 * len(plans))) as pool:
        jobs = []
        for q, large in plans:
            if q.src is _SPANS:
                agg = pool.submit(_aggregate_spans, store, q)
            elif large:
                agg = pool.submit(_aggregate_histogram, store, q)
            else:
                agg = pool.submit(_aggregate_exact, store, q)
            jobs.append((agg, pool.submit(_feedback_rows, store, q, low_max)))
        groups: Groups = {}
        for agg, fb in jobs:
            found = agg.result()
            _merge_feedback(found, fb.result())
            groups.update(found)
    out = []
    for p in groups.values():
        if p.calls >= config.analysis.min_calls:
            p.breaches = _breaches(p, config)
        if include_all or p.breaches:
            out.append(p)
    out.sort(
        key=lambda p: (
            -len(p.breaches),
            -p.error_rate,
            -(p.p95_latency_ms or 0.0),
            p.workflow,
            p.node is not None,
            p.node or "",
        )
    )
    return out
