"""The data behind the dashboard, as JSON: one call per workflow.

Ratings and the positive-feedback rate follow ``store.outcomes`` (a rollout's rating is its
lowest explicit rating; it is positive when every explicit verdict on it is), so the dashboard
shows the figures the experiments and the triggers act on. A section whose query fails says
why and the rest still renders.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from itertools import pairwise
from typing import Any

from sqlalchemy import func
from sqlmodel import select

from flywheel_middleware import messages
from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.loop import analysis
from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.store import outcomes
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import (
    ChangeEvent,
    ConfigVersion,
    Feedback,
    Rollout,
    RoutingWeight,
)
from flywheel_middleware.store.queries import TRIGGER_KIND

log = logging.getLogger("flywheel_middleware.service")
MAX_POINTS = 50_000
TEXT_LIMIT = 240  # characters of a question or answer shown in a table cell


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


BUCKET_WIDTHS = (
    1,
    5,
    10,
    30,
    60,
    300,
    600,
    900,
    1800,
    3600,
    2 * 3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    86_400,
    2 * 86_400,
    7 * 86_400,
    14 * 86_400,
    30 * 86_400,
)  # seconds: the first that keeps a series within its bucket count is used
DEFAULT_BUCKETS = 48
MARKER_KINDS = ("promote", "rollback")  # version changes drawn on the time axis


def bucket_width(start: float, end: float, buckets: int) -> float:
    """The smallest round width (a second … a month) that covers ``start``–``end`` in at most
    ``buckets`` buckets aligned to multiples of it, so buckets follow the data's range."""

    def fits(width: float) -> bool:
        return (end // width) - (start // width) + 1 <= buckets

    width = float(next((w for w in BUCKET_WIDTHS if fits(w)), BUCKET_WIDTHS[-1]))
    while not fits(width):  # years of data: months doubled until they fit
        width *= 2
    return width


def _bucketize(
    points: list[tuple[float, float]], start: float, width: float, count: int
) -> list[dict[str, Any]]:
    sums = [[0.0, 0] for _ in range(count)]
    for t, v in points:
        i = min(count - 1, max(0, int((t - start) // width)))
        sums[i][0] += v
        sums[i][1] += 1
    return [
        {"t": start + (i + 0.5) * width, "value": (s / n) if n else None, "n": n}
        for i, (s, n) in enumerate(sums)
    ]


SERIES_COUNTS = {
    "rating": "rated rollouts",
    "positive": "rollouts with a verdict (rating or thumb)",
    "reward": "rollouts with a reward",
    "implicit": "implicit-satisfaction scores",
    "volume": "rollouts started",
    "error_rate": "rollouts started",
}
"""What each series' per-bucket ``n`` counts."""


def _levels(
    points: list[tuple[float, float]], cuts: list[float], start: float, end: float
) -> list[dict[str, Any]]:
    """The mean of ``points`` between consecutive ``cuts`` (the version changes): the level
    each change steps from and to."""
    edges = [start, *sorted(c for c in cuts if start < c < end), end]
    out = []
    for lo, hi in pairwise(edges):
        inside = [v for t, v in points if lo <= t < hi or (hi == end and t == end)]
        out.append(
            {
                "start": lo,
                "end": hi,
                "value": sum(inside) / len(inside) if inside else None,
                "n": len(inside),
            }
        )
    return out


def series(
    store: Store, workflow: str, buckets: int = DEFAULT_BUCKETS, cuts: list[float] | None = None
) -> dict[str, Any]:
    """Per time bucket of rollout start: mean rating, positive-feedback rate, reward, implicit
    satisfaction, volume and error rate, over the range the data covers.

    ``rating`` is the mean of the rated rollouts' ratings and ``positive`` the share of rollouts
    with a verdict whose outcome is positive, both by ``store.outcomes``; each bucket's ``n``
    counts what its value is over (``counts`` names it per series). Buckets are ``width``
    seconds, aligned to multiples of it, at most ``buckets`` of them. ``levels`` holds the
    exact means of rating, positive and reward between the times in ``cuts`` (version changes).
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
    out: dict[str, Any] = {"start": None, "end": None, "width": None, "counts": SERIES_COUNTS}
    if not times:
        return out | {name: [] for name in SERIES_COUNTS} | {"levels": {}}
    width = bucket_width(min(times), max(times), buckets)
    start = (min(times) // width) * width
    count = int(max(times) // width - min(times) // width) + 1

    def points(rows: Any) -> list[tuple[float, float]]:
        return [(_ts(t), float(v)) for t, v in rows if t is not None and v is not None]

    reward_pts = [(_ts(t), float(r)) for t, r, _ in rollouts if t is not None and r is not None]
    volume_pts = [(_ts(t), 1.0) for t, _, _ in rollouts if t is not None]
    error_pts = [(_ts(t), 1.0 if s == "failed" else 0.0) for t, _, s in rollouts if t is not None]
    volume = _bucketize(volume_pts, start, width, count)
    for b in volume:
        b["value"] = b["n"]
    series_points = {
        "rating": points(ratings),
        "positive": points(positive),
        "reward": reward_pts,
    }
    end = start + count * width
    return out | {
        "start": start,
        "end": end,
        "width": width,
        "rating": _bucketize(series_points["rating"], start, width, count),
        "positive": _bucketize(series_points["positive"], start, width, count),
        "reward": _bucketize(reward_pts, start, width, count),
        "implicit": _bucketize(points(implicit), start, width, count),
        "volume": volume,
        "error_rate": _bucketize(error_pts, start, width, count),
        "levels": {
            name: _levels(pts, cuts or [], start, end) for name, pts in series_points.items()
        },
    }


def hot_problems(store: Store, config: FlywheelConfig, workflow: str) -> dict[str, Any]:
    """The workflow's hot problems (``loop.analysis``) in its ``analysis.since_minutes`` window."""
    try:
        found = analysis.hot_problems(store, config, workflow=workflow)
    except Exception as exc:  # one failing section must not take the page down
        log.warning("dashboard: hot problems failed: %s", exc)
        return {"available": False, "reason": f"hot_problems failed: {type(exc).__name__}: {exc}"}
    return {
        "available": True,
        "since_minutes": config.analysis.since_minutes,
        "problems": [_problem_row(p) for p in found],
    }


def _problem_row(p: analysis.HotProblem) -> dict[str, Any]:
    row = _jsonable(p.as_dict())
    row["breaches"] = "; ".join(p.breaches)
    return row


def nodes(
    store: Store, config: FlywheelConfig, workflow: str, since: float | None
) -> dict[str, Any]:
    """Every node's calls, latency, errors and low ratings since ``since`` (the series' start),
    hot or not, so a healthy workflow shows its figures too."""
    if since is None:
        return {"available": True, "since": None, "nodes": []}
    try:
        found = analysis.hot_problems(
            store,
            config,
            workflow=workflow,
            since=datetime.fromtimestamp(since, timezone.utc),
            include_all=True,
        )
    except Exception as exc:  # one failing section must not take the page down
        log.warning("dashboard: per-node figures failed: %s", exc)
        return {
            "available": False,
            "reason": f"per-node figures failed: {type(exc).__name__}: {exc}",
        }
    rows = sorted(
        (_problem_row(p) for p in found), key=lambda r: (r["node"] is not None, r["node"] or "")
    )
    return {"available": True, "since": since, "nodes": rows}


def experiments(store: Store, config: FlywheelConfig, workflow: str) -> dict[str, Any]:
    """The workflow's five latest experiments with their per-variant statistics.

    Each variant carries ``rollouts`` (served: tagged with the variant) and ``rated`` (with a
    verdict, what the positive-feedback rate is over), as ``flywheel experiment show`` does.
    """
    try:
        out = []
        for exp in ex.list_experiments(store, workflow=workflow)[:5]:
            d = _jsonable(ex.experiment_stats(store, exp, config).as_dict())
            numbers = _version_numbers(store, {v["version_id"] for v in d["variants"].values()})
            for v in d["variants"].values():
                v["version"] = numbers.get(v["version_id"])
            d["started_at"] = _ts(exp.started_at)
            d["ended_at"] = _ts(exp.ended_at)
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


def _version_numbers(store: Store, ids: set[int]) -> dict[int, int]:
    if not ids:
        return {}
    with store.session() as session:
        rows = session.exec(
            select(ConfigVersion.id, ConfigVersion.version).where(ConfigVersion.id.in_(ids))
        ).all()
    return dict(rows)


def change_events(store: Store, workflow: str, limit: int = 20) -> list[dict[str, Any]]:
    """The latest changes, newest first. Version changes are listed one by one (with version
    numbers); events that change no version (trigger firings) are grouped per kind into one
    row: ``count`` of them, from ``first_at`` to ``at``, with the latest reason."""
    with store.session() as session:
        version_rows = session.exec(
            select(ChangeEvent)
            .where(ChangeEvent.workflow == workflow, ChangeEvent.kind != TRIGGER_KIND)
            .order_by(ChangeEvent.created_at.desc())
            .limit(limit)
        ).all()
        grouped = session.exec(
            select(
                ChangeEvent.kind,
                func.count(),
                func.min(ChangeEvent.created_at),
                func.max(ChangeEvent.created_at),
            )
            .where(ChangeEvent.workflow == workflow, ChangeEvent.kind == TRIGGER_KIND)
            .group_by(ChangeEvent.kind)
        ).all()
        latest = {
            kind: session.exec(
                select(ChangeEvent)
                .where(ChangeEvent.workflow == workflow, ChangeEvent.kind == kind)
                .order_by(ChangeEvent.created_at.desc())
                .limit(1)
            ).first()
            for kind, *_ in grouped
        }
    numbers = _version_numbers(
        store,
        {v for r in version_rows for v in (r.from_version_id, r.to_version_id) if v is not None},
    )
    out: list[dict[str, Any]] = [
        {
            "kind": r.kind,
            "from": r.from_version_id,
            "to": r.to_version_id,
            "from_version": numbers.get(r.from_version_id),
            "to_version": numbers.get(r.to_version_id),
            "actor": r.actor,
            "reason": r.reason,
            "at": _ts(r.created_at),
            "count": 1,
            "first_at": _ts(r.created_at),
        }
        for r in version_rows
    ]
    for kind, count, first, last in grouped:
        event = latest[kind]
        out.append(
            {
                "kind": kind,
                "from": None,
                "to": None,
                "from_version": None,
                "to_version": None,
                "actor": event.actor if event else None,
                "reason": event.reason if event else None,
                "at": _ts(last),
                "count": int(count),
                "first_at": _ts(first),
            }
        )
    out.sort(key=lambda c: -(c["at"] or 0))
    return out[:limit]


def markers(store: Store, workflow: str) -> list[dict[str, Any]]:
    """Promotions and rollbacks to draw on the time axis, oldest first."""
    with store.session() as session:
        rows = session.exec(
            select(ChangeEvent)
            .where(ChangeEvent.workflow == workflow, ChangeEvent.kind.in_(MARKER_KINDS))
            .order_by(ChangeEvent.created_at)
        ).all()
    numbers = _version_numbers(store, {r.to_version_id for r in rows if r.to_version_id})
    out = []
    for r in rows:
        to = numbers.get(r.to_version_id)
        verb = "promoted" if r.kind == "promote" else "rolled back to"
        out.append(
            {
                "at": _ts(r.created_at),
                "kind": r.kind,
                "to_version": to,
                "label": f"{verb} v{to}" if to is not None else verb,
                "reason": r.reason,
            }
        )
    return out


def _cut(text: str, limit: int = TEXT_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def bad_cases(
    store: Store, config: FlywheelConfig, workflow: str, limit: int = 6
) -> dict[str, Any]:
    """The latest low-rated rollouts (rated at most ``triggers.low_rating.max_rating``): what was
    asked and answered, read through the message normalizer, and the customer's comment."""
    low = config.triggers.low_rating.max_rating
    ratings_q = outcomes.rollout_ratings().subquery()
    try:
        with store.session() as session:
            rows = session.exec(
                select(
                    Rollout.id,
                    Rollout.started_at,
                    Rollout.input,
                    Rollout.output,
                    Rollout.config_version_id,
                    ratings_q.c.rating,
                )
                .join(ratings_q, ratings_q.c.rollout_id == Rollout.id)
                .where(Rollout.workflow == workflow, ratings_q.c.rating <= low)
                .order_by(Rollout.started_at.desc())
                .limit(limit)
            ).all()
            ids = [r[0] for r in rows]
            comments = dict(
                session.exec(
                    select(Feedback.rollout_id, Feedback.comment).where(
                        Feedback.rollout_id.in_(ids), Feedback.comment.is_not(None)
                    )
                ).all()
            )
    except Exception as exc:  # one failing section must not take the page down
        log.warning("dashboard: bad cases failed: %s", exc)
        return {"available": False, "reason": f"bad cases failed: {type(exc).__name__}: {exc}"}
    numbers = _version_numbers(store, {r[4] for r in rows if r[4] is not None})
    return {
        "available": True,
        "max_rating": low,
        "cases": [
            {
                "rollout_id": rid,
                "at": _ts(at),
                "question": _cut(messages.question_text(inp)),
                "answer": _cut(messages.answer_text(out)),
                "rating": rating,
                "comment": comments.get(rid),
                "version": numbers.get(version_id),
            }
            for rid, at, inp, out, version_id, rating in rows
        ],
    }


def workflow_view(
    store: Store, config: FlywheelConfig, workflow: str, *, buckets: int = DEFAULT_BUCKETS
) -> dict[str, Any]:
    """Everything the dashboard draws for one workflow."""
    changes_at = markers(store, workflow)
    data_series = series(store, workflow, buckets, [m["at"] for m in changes_at])
    return {
        "workflow": workflow,
        "generated_at": datetime.now(timezone.utc).timestamp(),
        "series": data_series,
        "markers": changes_at,
        "hot_problems": hot_problems(store, config, workflow),
        "nodes": nodes(store, config, workflow, data_series["start"]),
        "experiments": experiments(store, config, workflow),
        "routing": routing_weights(store),
        "changes": change_events(store, workflow),
        "bad_cases": bad_cases(store, config, workflow),
    }
