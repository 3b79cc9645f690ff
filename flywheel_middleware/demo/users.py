"""Simulated customers: they ask, read, rate some answers and leave implicit UI signals."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from flywheel_middleware.capture.records import TelemetryRecord
from flywheel_middleware.demo.agent import Article

ESCALATION = "colleague"


@dataclass
class Reaction:
    rating: int | None
    comment: str | None
    events: list[tuple[str, dict]]
    correct: bool


def react(
    rng: random.Random,
    article: Article,
    answer: str,
    rate_probability: float,
    resolved: bool | None = None,
) -> Reaction:
    """What a customer does with an answer: a 1–5 rating (sometimes) and UI events.

    ``resolved`` says whether the human desk an escalation went to solved the problem.
    """
    correct = answer.strip() == article.answer
    escalated = ESCALATION in answer
    if correct:
        rating = rng.choices([5, 4, 3], weights=[60, 30, 10])[0]
        comment = None
        events = [("dwell", {"ms": rng.randint(8_000, 20_000)}), ("scroll", {"depth": 1.0})]
        if rng.random() < 0.4:
            events.append(("copy", {"chars": len(answer)}))
    elif escalated and resolved:
        rating = rng.choices([4, 3, 2], weights=[40, 40, 20])[0]
        comment = "a colleague sorted it out, eventually"
        events = [("dwell", {"ms": rng.randint(3_000, 8_000)}), ("escalate", {})]
    elif escalated:
        rating = rng.choice([1, 2])
        comment = "handed over and still not solved"
        events = [("dwell", {"ms": rng.randint(3_000, 8_000)}), ("escalate", {})]
    else:
        rating = rng.choices([1, 2, 3], weights=[60, 30, 10])[0]
        comment = rng.choice(
            [
                f"wrong answer, I asked about {article.keyword}",
                "that's not what I asked",
                "made-up information",
            ]
        )
        events = [("dwell", {"ms": rng.randint(1_000, 4_000)}), ("scroll", {"depth": 0.3})]
        if rng.random() < 0.5:
            events.append(("regenerate", {}))
        if rng.random() < 0.25:
            events.append(("click", {"kind": "escalate"}))
    if rng.random() >= rate_probability:
        rating, comment = None, None
    return Reaction(rating, comment, events, correct)


def send_telemetry(recorder: object, rollout_id: str, session_id: str, events: list) -> None:
    """Queue the UI events as the browser snippet would send them."""
    now = time.time()
    for i, (event_type, payload) in enumerate(events):
        recorder.enqueue(  # type: ignore[attr-defined]
            TelemetryRecord(
                session_id=session_id,
                rollout_id=rollout_id,
                event_type=event_type,
                payload=payload,
                client_ts=now + i * 0.5,
            )
        )
