"""Shared set-up for the loop tests: a workflow config and rows with known outcomes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import insert, text

from flywheel_middleware.capture.ids import new_rollout_id
from flywheel_middleware.config import FlywheelConfig, config_from_dict
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import Feedback, Rollout

BASE = {
    "llm": {"model": "m", "temperature": 0.9},
    "rag": {"top_k": 2},
    "nodes": {"qa_agent": {"enabled": True}},
}


def make_config(**overrides: Any) -> FlywheelConfig:
    data: dict[str, Any] = {
        "workflows": {
            "qa": {
                "config": BASE,
                "tunable": {
                    "llm.temperature": {"min": 0.0, "max": 1.0, "step": 0.1},
                    "rag.top_k": {"choices": [2, 3, 4, 5]},
                    "nodes.qa_agent.enabled": {"choices": [True, False]},
                },
                "experiment": {"candidate_traffic": 0.2, "max_candidates": 2, "min_samples": 50},
            }
        },
        "analysis": {"min_calls": 20},
    }
    data.update(overrides)
    return config_from_dict(data)


def add_rollouts(
    store: Store,
    *,
    experiment_id: int | None,
    variant: str | None,
    n: int,
    positive: int,
    latency_ms: float = 100.0,
    failed: int = 0,
    workflow: str = "qa",
    reward: float | None = None,
    version_id: int | None = None,
    start: datetime | None = None,
) -> list[str]:
    """``n`` rollouts of which ``positive`` are rated 5 and the rest 1; ``failed`` fail."""
    now = start or datetime.now(timezone.utc)
    ids = [new_rollout_id() for _ in range(n)]
    times = [now + timedelta(milliseconds=i) for i in range(n)]
    rollouts = [
        {
            "id": rid,
            "workflow": workflow,
            "user_id": f"u{i}",
            "config_version_id": version_id,
            "experiment_id": experiment_id,
            "variant": variant,
            "propensity": 0.5,
            "input": f"question {i}",
            "output": f"answer {i}",
            "status": "failed" if i < failed else "succeeded",
            "started_at": t,
            "ended_at": t,
            "latency_ms": latency_ms + (i % 10),
            "input_tokens": 10,
            "output_tokens": 20,
            "total_tokens": 30,
            "cost": 0.001,
            "reward": reward,
        }
        for i, (rid, t) in enumerate(zip(ids, times, strict=True))
    ]
    feedback = [
        {
            "rollout_id": rid,
            "source": "explicit",
            "key": "rating",
            "value": 5.0 if i < positive else 1.0,
            "comment": None if i < positive else "wrong answer",
            "created_at": t,
        }
        for i, (rid, t) in enumerate(zip(ids, times, strict=True))
    ]
    with store.engine.begin() as conn:  # one executemany per table: set-up, not the subject
        if rollouts:
            conn.execute(insert(Rollout.__table__), rollouts)
            conn.execute(insert(Feedback.__table__), feedback)
        if store.dialect == "postgresql":
            # what autovacuum does after a bulk load: without statistics the planner takes
            # thousands of fresh rows for a handful and nests its joins
            conn.execute(text("ANALYZE rollout"))
            conn.execute(text("ANALYZE feedback"))
    return ids
