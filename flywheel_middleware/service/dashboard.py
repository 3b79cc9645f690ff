"""The data behind the dashboard, as JSON: one call per workflow.

Sections come from other parts of the flywheel (hot problems from ``analysis``, experiments
from ``experiments``); when one is missing or fails, its section says why and the rest still
renders.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func
from sqlmodel import select

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
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and value != value:
        return None
    return value


def workflows(store: Any) -> list[dict[str, Any]]:
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


def series(store: Any, workflow: str, buckets: int = 24) -> dict[str, Any]:
    """Mean rating, reward, implicit satisfaction, volume and error rate per time bucket."""
    with store.session() as session:
        rollouts = session.exec(
            select(Rollout.started_at, Rollout.reward, Rollout.status)
            .where(Rollout.workflow == workflow)
            .order_by(Rollout.started_at.desc())
            .limit(MAX_POINTS)
        ).all()
        ratings = session.exec(
            select(Feedback.created_at, Feedback.value)
            .join(Rollout, Rollout.id == Feedback.rollout_id)
            .where(
                Rollout.workflow == workflow, Feedback.key == "rating", Feedback.value.is_not(None)
            )
            .order_by(Feedback.created_at.desc())
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
    times = [_ts(r[0]) for r in rollouts if r[0] is not None] + [
        _ts(r[0]) for r in ratings if r[0] is not None
    ]
    if not times:
        return {
            "start": None,
            "end": None,
            "rating": [],
            "reward": [],
            "volume": [],
            "error_rate": [],
        }
    start, end = min(times), max(times)
    if end - start < 1:
        end = start + 1
    rating_pts = [(_ts(t), float(v)) for t, v in ratings if t is not None]
    reward_pts = [(_ts(t), float(r)) for t, r, _ in rollouts if t is not None and r is not None]
    volume_pts = [(_ts(t), 1.0) for t, _, _ in rollouts if t is not None]
    error_pts = [(_ts(t), 1.0 if s == "failed" else 0.0) for t, _, s in rollouts if t is not None]
    volume = _bucketize(volume_pts, start, end, buckets)
    for b in volume:
        b["value"] = b["n"]
    return {
        "start": start,
        "end": end,
        "rating": _bucketize(rating_pts, start, end, buckets),
        "reward": _bucketize(reward_pts, start, end, buckets),
        "implicit": _bucketize(
            [(_ts(t), float(v)) for t, v in implicit if t is not None], start, end, buckets
        ),
        "volume": volume,
        "error_rate": _bucketize(error_pts, start, end, buckets),
    }


def hot_problems(store: Any, config: Any, workflow: str) -> dict[str, Any]:
    try:
        analysis = importlib.import_module("flywheel_middleware.loop.analysis")  # optional here
    except ImportError:
        return {"available": False, "reason": "flywheel_middleware.loop.analysis is not installed"}
    fn = getattr(analysis, "hot_problems", None)
    if fn is None:
        return {"available": False, "reason": "analysis.hot_problems is missing"}
    try:
        params = inspect.signature(fn).parameters
        kwargs: dict[str, Any] = {}
        if "workflow" in params:
            kwargs["workflow"] = workflow
        if "config" in params:
            kwargs["config"] = config
        first = next(iter(params), None)
        result = fn(store, **kwargs) if first in ("store", "s") else fn(store, config, **kwargs)
        rows = []
        for item in list(result) if not isinstance(result, dict) else [result]:
            row = _jsonable(item)
            if isinstance(row, dict):
                for prop in ("error_rate", "low_rating_rate"):  # properties asdict leaves out
                    if prop not in row and hasattr(item, prop):
                        row[prop] = _jsonable(getattr(item, prop))
                if isinstance(row.get("breaches"), list):
                    row["breaches"] = "; ".join(str(b) for b in row["breaches"])
            rows.append(row)
        if isinstance(rows, list):
            rows = [
                r for r in rows if not isinstance(r, dict) or r.get("workflow") in (None, workflow)
            ]
        return {"available": True, "problems": rows}
    except Exception as exc:
        log.warning("dashboard: hot problems failed: %s", exc)
        return {"available": False, "reason": f"hot_problems failed: {type(exc).__name__}: {exc}"}


def experiments(store: Any, config: Any, workflow: str) -> dict[str, Any]:
    try:
        exps = importlib.import_module("flywheel_middleware.loop.experiments")
    except ImportError:
        return {
            "available": False,
            "reason": "flywheel_middleware.loop.experiments is not installed",
        }
    try:
        found = exps.list_experiments(store, workflow=workflow)[:5]
        out = []
        for exp in found:
            stats = exps.experiment_stats(store, exp, config)
            d = _jsonable(stats.as_dict())
            d["started_at"] = _ts(exp.started_at)
            d["decision"] = _jsonable(exp.decision)
            out.append(d)
        return {"available": True, "experiments": out}
    except Exception as exc:
        log.warning("dashboard: experiments failed: %s", exc)
        return {"available": False, "reason": f"experiments failed: {type(exc).__name__}: {exc}"}


def routing_weights(store: Any) -> list[dict[str, Any]]:
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


def change_events(store: Any, workflow: str, limit: int = 20) -> list[dict[str, Any]]:
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


def workflow_view(store: Any, config: Any, workflow: str, *, buckets: int = 24) -> dict[str, Any]:
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
