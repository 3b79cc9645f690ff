"""Improvement triggers (seed 000): too many low ratings among the last N rollouts.

A firing is recorded as a ``ChangeEvent`` of kind ``trigger`` with its evidence. It fires
again only after ``window`` more rollouts have started, so one bad stretch is one event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func
from sqlmodel import select

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.store import outcomes
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, Feedback, Rollout
from flywheel_middleware.store.queries import TRIGGER_KIND


def low_rating_window(
    store: Store, workflow: str, window: int, max_rating: float
) -> dict[str, Any]:
    """Low-rated count among the last ``window`` rollouts (unrated ones count as not low, as in the seed).

    A rollout is low-rated when its rating — its lowest explicit rating (``store.outcomes``) —
    is at most ``max_rating`` (YAML ``triggers.low_rating.max_rating``).
    """
    last = (
        select(Rollout.id)
        .where(Rollout.workflow == workflow)
        .order_by(Rollout.started_at.desc())
        .limit(window)
        .subquery()
    )
    rating = outcomes.rollout_ratings().where(Feedback.rollout_id.in_(select(last.c.id))).subquery()
    with store.session() as session:
        size = session.exec(select(func.count()).select_from(last)).one()
        low_ids = session.exec(
            select(rating.c.rollout_id).where(rating.c.rating <= max_rating)
        ).all()
    return {
        "workflow": workflow,
        "window": size,
        "low": len(low_ids),
        "low_rollout_ids": list(low_ids),
    }


def check_low_rating_triggers(
    store: Store, config: FlywheelConfig, rollout_ids: Iterable[str] | None = None
) -> list[ChangeEvent]:
    """Evaluate the trigger for the workflows of ``rollout_ids`` (every workflow if None)."""
    rule = config.triggers.low_rating
    with store.session() as session:
        query = select(Rollout.workflow).distinct()
        if rollout_ids is not None:
            ids = list(rollout_ids)
            if not ids:
                return []
            query = query.where(Rollout.id.in_(ids))
        workflows = session.exec(query).all()
    fired = []
    for workflow in workflows:
        state = low_rating_window(store, workflow, rule.window, rule.max_rating)
        if state["low"] < rule.threshold:
            continue
        with store.session() as session:
            last = session.exec(
                select(ChangeEvent)
                .where(ChangeEvent.workflow == workflow, ChangeEvent.kind == TRIGGER_KIND)
                .order_by(ChangeEvent.created_at.desc())
                .limit(1)
            ).first()
            if last is not None:
                since = session.exec(
                    select(func.count())
                    .select_from(Rollout)
                    .where(Rollout.workflow == workflow, Rollout.started_at > last.created_at)
                ).one()
                if since < rule.window:
                    continue
            event = ChangeEvent(
                workflow=workflow,
                kind=TRIGGER_KIND,
                actor="trigger:low_rating",
                reason=(
                    f"{state['low']} of the last {state['window']} rollouts rated "
                    f"≤ {rule.max_rating:g} (threshold {rule.threshold})"
                ),
                evidence={
                    "rule": "low_rating",
                    "window": rule.window,
                    "threshold": rule.threshold,
                    "low": state["low"],
                    "rollout_ids": state["low_rollout_ids"][:50],
                },
                created_at=utcnow(),
            )
            session.add(event)
            fired.append(event)
    return fired
