"""The data behind the dashboard, as JSON: one call per workflow.

Ratings and the positive-feedback rate follow ``store.outcomes`` (a rollout's rating is its
lowest explicit rating; it is positive when every explicit verdict on it is), so the dashboard
shows the figures the experiments and the triggers act on. A section whose query fails says
why and the rest still renders.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func
from sqlmodel import select

from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.loop import analysis
from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.store import outcomes
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, Feedback, Rollout, RoutingWeight

log = logging.getLogger("flywheel_middleware.service")
MAX_POINTS = 50_000


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _jsonable(value: Any) -> Any:
    """Plain data (``as_dict`` output, stored JSON) made JSON-safe: datetimes as ISO text, NaN as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and value != value:
        return None
    return value


def workflows(store: Store) -> list[dict[str, Any]]:
    with store.session() as session:
        rows = session.exec(
            select(Rollout.workflow, func.count(), func.max(Rollout.started_at)).group_by(
                Rollout.workflow
            )
        ).all()
    return [
        {"workflow": wf, "rollouts": n, "last": _ts(last)}
        for wf, n, last in sorted(rows, key=lambda r: -r[1])
    ]


def _bucketize(
    points: list[tuple[float, float]], start: float, end: float, buckets: int
) -> list[dict[str, Any]]:
    width = max(1e-9, (end - start) / buckets)
    sums = [[0.0, 0] for _ in range(buckets)]
    for t, v in points:
        i = min(buckets - 1, max(0, int((t - start) / width)))
        sums[i][0] += v
        sums[i][1] += 1
    return [
        {"t": start + (i + 0.5) * width, "value": (s / n) if n else None, "n": n}
        for i, (s, n) in enumerate(sums)
    ]


def series(store: Store, workflow: str, buckets: int = 24) -> dict[str, Any]:
    """Per time bucket of rollout start: mean rating, positive-feedback rate, reward, implicit
    satisfaction, volume and error rate.

    ``rating`` is the mean of the rated rollouts' ratings and ``positive`` the share of rollouts
    with a verdict whose outcome is positive, both by ``store.outcomes``; ``n`` counts them.
    """
    ratings_q = (
        outcomes.rollout_ratings()
        .join(Rollout, Rollout.id == Feedback.rollout_id)
        .where(Rollout.workflow == workflow)
        .subquery()
    )
    outcomes_q = (
        outcomes.rollout_outcomes()
        .join(Rollout, Rollout.id == Feedback.rollout_id)
        .where(Rollout.workflow == workflow)
        .subquery()
    )
    with store.session() as session:
        rollouts = session.exec(
            select(Rollout.started_at, Rollout.reward, Rollout.status)
            .where(Rollout.workflow == workflow)
            .order_by(Rollout.started_at.desc())
            .limit(MAX_POINTS)
        ).all()
        ratings = session.exec(
            select(Rollout.started_at, ratings_q.c.rating)
            .join(ratings_q, ratings_q.c.rollout_id == Rollout.id)
            .order_by(Rollout.started_at.desc())
            .limit(MAX_POINTS)
        ).all()
        positive = session.exec(
            select(Rollout.started_at, outcomes_q.c.positive)
            .join(outcomes_q, outcomes_q.c.rollout_id == Rollout.id)
            .order_by(Rollout.started_at.desc())
            .limit(MAX_POINTS)
        ).all()
        implicit = session.exec(
            select(Rollout.started_at, Feedback.value)
            .join(Rollout, Rollout.id == Feedback.rollout_id)
            .where(
                Rollout.workflow == workflow,
                Feedback.source == "implicit",
                Feedback.value.is_not(None),
            )
            .order_by(Rollout.started_at.desc())
            .limit(MAX_POINTS)
        ).all()
    times = [_ts(r[0]) for r in rollouts if r[0] is not None]
    if not times:
        return {
            "start": None,
            "end": None,
            "rating": [],
            "positive": [],
            "reward": [],
            "implicit": [],
            "volume": [],
            "error_rate": [],
        }
    start, end = min(times), max(times)
    if end - start < 1:
        end = start + 1

    def points(rows: Any) -> list[tuple[float, float]]:
        return [(_ts(t), float(v)) for t, v in rows if t is not None and v is not None]

    reward_pts = [(_ts(t), float(r)) for t, r, _ in rollouts if t is not None and r is not None]
    volume_pts = [(_ts(t), 1.0) for t, _, _ in rollouts if t is not None]
    error_pts = [(_ts(t), 1.0 if s == "failed" else 0.0) for t, _, s in rollouts if t is not None]
    volume = _bucketize(volume_pts, start, end, buckets)
    for b in volume:
        b["value"] = b["n"]
    return {
        "start": start,
        "end": end,
        "rating": _bucketize(points(ratings), start, end, buckets),
        "positive": _bucketize(points(positive), start, end, buckets),
        "reward": _bucketize(reward_pts, start, end, buckets),
        "implicit": _bucketize(points(implicit), start, end, buckets),
        "volume": volume,
        "error_rate": _bucketize(error_pts, start, end, buckets),
    }


def hot_problems(store: Store, config: FlywheelConfig, workflow: str) -> dict[str, Any]:
    """The workflow's hot problems (``loop.analysis``), as rows for a table."""
    try:
        found = analysis.hot_problems(store, config, workflow=workflow)
    except Exception as exc:  # one failing section must not take the page down
        log.warning("dashboard: hot problems failed: %s", exc)
        return {"available": False, "reason": f"hot_problems failed: {type(exc).__name__}: {exc}"}
    rows = []
    for p in found:
        row = _jsonable(p.as_dict())
        row["breaches"] = "; ".join(p.breaches)
        rows.append(row)
    return {"available": True, "problems": rows}


def experiments(store: Store, config: FlywheelConfig, workflow: str) -> dict[str, Any]:
    """The workflow's five latest experiments with their per-variant statistics."""
    try:
        out = []
        for exp in ex.list_experiments(store, workflow=workflow)[:5]:
            d = _jsonable(ex.experiment_stats(store, exp, config).as_dict())
            d["started_at"] = _ts(exp.started_at)
            d["decision"] = _jsonable(exp.decision)
            out.append(d)
    except Exception as exc:  # one failing section must not take the page down
        log.warning("dashboard: experiments failed: %s", exc)
        return {"available": False, "reason": f"experiments failed: {type(exc).__name__}: {exc}"}
    return {"available": True, "experiments": out}


def routing_weights(store: Store) -> list[dict[str, Any]]:
    with store.session() as session:
        rows = session.exec(
            select(RoutingWeight).order_by(RoutingWeight.agent_id, RoutingWeight.skill)
        ).all()
    out = []
    for r in rows:
        a, b = r.alpha, r.beta
        mean = a / (a + b) if a + b > 0 else None
        # a 90% interval from the normal approximation of the Beta posterior
        var = a * b / ((a + b) ** 2 * (a + b + 1)) if a + b > 0 else 0
        half = 1.645 * var**0.5
        out.append(
            {
                "agent": r.agent_id,
                "skill": r.skill,
                "weight": r.weight,
                "mean": mean,
                "low": None if mean is None else max(0.0, mean - half),
                "high": None if mean is None else min(1.0, mean + half),
                "n": r.n,
                "updated_at": _ts(r.updated_at),
            }
        )
    return out


def change_events(store: Store, workflow: str, limit: int = 20) -> list[dict[str, Any]]:
    with store.session() as session:
        rows = session.exec(
            select(ChangeEvent)
            .where(ChangeEvent.workflow == workflow)
            .order_by(ChangeEvent.created_at.desc())
            .limit(limit)
        ).all()
    return [
        {
            "kind": r.kind,
            "from": r.from_version_id,
            "to": r.to_version_id,
            "actor": r.actor,
            "reason": r.reason,
            "at": _ts(r.created_at),
        }
        for r in rows
    ]


def workflow_view(
    store: Store, config: FlywheelConfig, workflow: str, *, buckets: int = 24
) -> dict[str, Any]:
    """Everything the dashboard draws for one workflow."""
    return {
        "workflow": workflow,
        "generated_at": datetime.now(timezone.utc).timestamp(),
        "series": series(store, workflow, buckets),
        "hot_problems": hot_problems(store, config, workflow),
        "experiments": experiments(store, config, workflow),
        "routing": routing_weights(store),
        "changes": change_events(store, workflow),
    }
