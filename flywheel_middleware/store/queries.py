"""Read-side queries the CLI, the service and the tests share (aggregated in SQL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_
from sqlmodel import select

from flywheel_middleware.store import outcomes
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, Feedback, Rollout, Span

TRIGGER_KIND = "trigger"
"""The ChangeEvent kind a low-rating trigger writes (``flywheel_middleware.loop.triggers``)."""


@dataclass
class WorkflowStats:
    workflow: str
    rollouts: int = 0
    failed: int = 0
    avg_latency_ms: float | None = None
    rated: int = 0
    avg_rating: float | None = None
    low_rated: int = 0
    thumbs_up: int = 0
    thumbs_total: int = 0
    triggers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.failed / self.rollouts if self.rollouts else 0.0


def stats(
    store: Store, *, low_rating_max: float = outcomes.LOW_RATING, workflow: str | None = None
) -> list[WorkflowStats]:
    """Totals per workflow: rollouts, failures, latency, ratings, low ratings, thumbs, triggers.

    A rollout's rating is its lowest explicit rating and a thumb is up by the rule of
    ``store.outcomes``; ``avg_rating`` is the mean of the rated rollouts' ratings.
    """
    out: dict[str, WorkflowStats] = {}
    with store.session() as session:
        q = select(
            Rollout.workflow,
            func.count(),
            func.sum(case((Rollout.status == "failed", 1), else_=0)),
            func.avg(Rollout.latency_ms),
        ).group_by(Rollout.workflow)
        if workflow:
            q = q.where(Rollout.workflow == workflow)
        for wf, n, failed, lat in session.exec(q):
            out[wf] = WorkflowStats(wf, rollouts=n, failed=int(failed or 0), avg_latency_ms=lat)
        per_rollout = (
            outcomes.rollout_ratings()
            .add_columns(Rollout.workflow.label("workflow"))
            .join(Rollout, Rollout.id == Feedback.rollout_id)
            .group_by(Rollout.workflow)
            .subquery()
        )
        q2 = select(
            per_rollout.c.workflow,
            func.count(),
            func.avg(per_rollout.c.rating),
            func.sum(case((per_rollout.c.rating <= low_rating_max, 1), else_=0)),
        ).group_by(per_rollout.c.workflow)
        for wf, n, avg, low in session.exec(q2):
            if wf in out:
                out[wf].rated, out[wf].avg_rating, out[wf].low_rated = n, avg, int(low or 0)
        q3 = (
            select(
                Rollout.workflow,
                func.count(),
                func.sum(case((Feedback.value >= outcomes.THUMBS_UP, 1), else_=0)),
            )
            .join(Rollout, Rollout.id == Feedback.rollout_id)
            .where(outcomes.thumbs_filter())
            .group_by(Rollout.workflow)
        )
        for wf, n, ups in session.exec(q3):
            if wf in out:
                out[wf].thumbs_total, out[wf].thumbs_up = n, int(ups or 0)
        events = session.exec(
            select(ChangeEvent)
            .where(ChangeEvent.kind == TRIGGER_KIND)
            .order_by(ChangeEvent.created_at)
        ).all()
        for ev in events:
            if ev.workflow in out:
                out[ev.workflow].triggers.append(
                    {"at": ev.created_at, "reason": ev.reason, "evidence": ev.evidence}
                )
    return sorted(out.values(), key=lambda s: s.workflow)


@dataclass
class BadCase:
    rollout: Rollout
    rating: float | None
    comments: list[str]


def bad_cases(
    store: Store,
    *,
    workflow: str | None = None,
    max_rating: float = outcomes.LOW_RATING,
    limit: int = 50,
    since: datetime | None = None,
) -> list[BadCase]:
    """Rollouts rated ≤ ``max_rating`` or failed, worst first (lowest rating, then failures).

    A rollout's rating is its lowest explicit rating (``store.outcomes``).
    """
    with store.session() as session:
        ratings = outcomes.rollout_ratings().subquery()
        q = (
            select(Rollout, ratings.c.rating)
            .join(ratings, ratings.c.rollout_id == Rollout.id, isouter=True)
            .where(or_(ratings.c.rating <= max_rating, Rollout.status == "failed"))
        )
        if workflow:
            q = q.where(Rollout.workflow == workflow)
        if since is not None:
            q = q.where(Rollout.started_at >= since)
        q = q.order_by(
            case((ratings.c.rating.is_(None), 6.0), else_=ratings.c.rating),
            Rollout.started_at.desc(),
        ).limit(limit)
        rows = session.exec(q).all()
        ids = [r.id for r, _ in rows]
        comments: dict[str, list[str]] = {}
        if ids:
            for rid, text in session.exec(
                select(Feedback.rollout_id, Feedback.comment).where(
                    and_(Feedback.rollout_id.in_(ids), Feedback.comment.is_not(None))
                )
            ):
                comments.setdefault(rid, []).append(text)
    return [BadCase(r, rating, comments.get(r.id, [])) for r, rating in rows]


def list_rollouts(
    store: Store, *, workflow: str | None = None, limit: int = 20, status: str | None = None
) -> list[Rollout]:
    with store.session() as session:
        q = select(Rollout).order_by(Rollout.started_at.desc()).limit(limit)
        if workflow:
            q = q.where(Rollout.workflow == workflow)
        if status:
            q = q.where(Rollout.status == status)
        return list(session.exec(q).all())


def find_rollout(store: Store, rollout_id: str) -> Rollout | None:
    """A rollout by id, or by a unique prefix of at least 6 characters."""
    with store.session() as session:
        row = session.get(Rollout, rollout_id)
        if row is None and len(rollout_id) >= 6:
            matches = session.exec(
                select(Rollout).where(Rollout.id.startswith(rollout_id)).limit(2)
            ).all()
            row = matches[0] if len(matches) == 1 else None
        return row


def missing_rollouts(store: Store, rollout_ids: set[str]) -> set[str]:
    """Which of ``rollout_ids`` the store has no rollout for."""
    with store.session() as session:
        found = session.exec(select(Rollout.id).where(Rollout.id.in_(rollout_ids))).all()
    return rollout_ids - set(found)


def spans_of(store: Store, rollout_id: str) -> list[Span]:
    with store.session() as session:
        return list(
            session.exec(
                select(Span)
                .where(Span.rollout_id == rollout_id)
                .order_by(Span.sequence, Span.started_at)
            ).all()
        )


def feedback_of(store: Store, rollout_id: str) -> list[Feedback]:
    with store.session() as session:
        return list(
            session.exec(
                select(Feedback)
                .where(Feedback.rollout_id == rollout_id)
                .order_by(Feedback.created_at)
            ).all()
        )


@dataclass
class SpanNode:
    span: Span
    children: list[SpanNode] = field(default_factory=list)


def span_tree(spans: list[Span]) -> list[SpanNode]:
    """Arrange spans under their parents; orphans (parent not recorded) become roots."""
    nodes = {s.id: SpanNode(s) for s in spans}
    roots: list[SpanNode] = []
    for s in spans:
        parent = nodes.get(s.parent_id) if s.parent_id is not None else None
        (parent.children if parent is not None else roots).append(nodes[s.id])
    return roots
