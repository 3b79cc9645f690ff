"""One definition of a positive outcome: which feedback says a rollout went well, or badly.

Every part of the flywheel that asks "did this answer satisfy the user?" imports this module:
the experiments' ``positive_feedback_rate`` (the default objective), the ``explicit_rating``
reward source, routing's fallback reward, the implicit model's training labels, the low-rating
triggers, hot problems, ``flywheel stats``, bad cases and the dashboard. None of them writes its
own threshold, so they cannot disagree about the same feedback rows.

**What counts.** Only a user's explicit verdict: feedback with source ``explicit`` and key
``rating`` (1–5) or ``thumbs`` (1.0 up, 0.0 down), with a value. Other feedback is not a
verdict on the answer: ``implicit`` scores are a model's guess at satisfaction (trained *on*
these verdicts, so counting them would be circular), ``judge`` and ``rule`` scores are our own
opinion of the answer, and ``business`` keys have no fixed direction (``resolved`` = 1 is good,
``refunded`` = 1 is bad) — the ``business_event`` reward source, where each key's direction
is configured, is where they count.

**One row.** A rating is positive at ``POSITIVE_RATING`` (4 of 5) or above: on a 1–5 scale 4
and 5 are the satisfied answers, 3 is neutral, and the seeds' low ratings are ``<= 2``
(``LOW_RATING``, the default of ``triggers.low_rating.max_rating``). So positive and low never
overlap, and a 3 is rated but neither. A thumb is up at ``THUMBS_UP`` (0.5) or above: thumbs
are stored as 1.0 / 0.0, and a value given through ``key="thumbs", value=...`` reads as the
nearer of the two.

**Several rows on one rollout.** The worst verdict decides: a rollout is a positive outcome
when it has at least one verdict and every verdict on it is positive, and its rating is its
*lowest* rating. One unhappy reaction is enough to make an answer a bad case (that is what the
triggers and bad-case mining look for), so with this rule a rollout can never count as a
success in an experiment and as a bad case in a trigger at once; it is also the conservative
choice for promotion (more clicks on an answer cannot make it look better), and a user who
rates twice is judged by the complaint.

The SQL forms (``rollout_outcomes``, ``rollout_ratings``) and the Python forms
(``rollout_outcome``, ``rollout_rating``) are built from the same constants. A threshold a user
sets in the YAML configuration (``triggers.low_rating.max_rating``,
``implicit.positive_rating``) is passed in as a parameter; it is configuration, not a second
definition.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.sql import ColumnElement, Select

from flywheel_middleware.store.models import Feedback

EXPLICIT_SOURCE = "explicit"
"""The feedback source of a user's own verdict (``fw.feedback``'s default)."""
RATING_KEY = "rating"
THUMBS_KEY = "thumbs"
VERDICT_KEYS: tuple[str, ...] = (RATING_KEY, THUMBS_KEY)
"""The keys of explicit feedback that judge the answer (comments and business keys do not)."""

RATING_MIN = 1.0
RATING_MAX = 5.0
POSITIVE_RATING = 4.0
"""The lowest rating that is a positive outcome (4 and 5 of 5)."""
LOW_RATING = 2.0
"""The highest rating that is a low rating (the seeds' ``<= 2``); YAML may set another."""
THUMBS_UP = 0.5
"""A thumb at or above this is up (thumbs are stored as 1.0 up and 0.0 down)."""


# -- Python: one row, one rollout -------------------------------------------------------------


def is_verdict(source: str | None, key: str | None, value: float | None) -> bool:
    """Whether one feedback row is a user's verdict on the answer (see the module docstring)."""
    return source == EXPLICIT_SOURCE and key in VERDICT_KEYS and value is not None


def thumbs_up(value: float) -> bool:
    """Whether a thumbs value is up."""
    return value >= THUMBS_UP


def is_positive(key: str, value: float, *, positive_rating: float = POSITIVE_RATING) -> bool:
    """Whether one verdict (``is_verdict``) is positive: a rating >= 4, or a thumb up."""
    if key == RATING_KEY:
        return value >= positive_rating
    return key == THUMBS_KEY and thumbs_up(value)


def rollout_outcome(
    feedback: Iterable[Any], *, positive_rating: float = POSITIVE_RATING
) -> bool | None:
    """A rollout's outcome from its feedback rows (objects with source, key and value).

    True when every verdict is positive, False when one is not, None when there is no verdict.
    """
    verdicts = [f for f in feedback if is_verdict(f.source, f.key, f.value)]
    if not verdicts:
        return None
    return all(is_positive(f.key, f.value, positive_rating=positive_rating) for f in verdicts)


def rollout_rating(feedback: Iterable[Any]) -> float | None:
    """A rollout's rating: the lowest explicit rating among its feedback rows, or None."""
    ratings = [
        f.value for f in feedback if f.key == RATING_KEY and is_verdict(f.source, f.key, f.value)
    ]
    return min(ratings) if ratings else None


def is_low(rating: float | None, max_rating: float = LOW_RATING) -> bool:
    """Whether a rollout's rating (``rollout_rating``) is low: rated, and at most ``max_rating``."""
    return rating is not None and rating <= max_rating


# -- SQL: the same rules as expressions over the feedback table -------------------------------


def verdict_filter() -> ColumnElement[bool]:
    """WHERE clause of the feedback rows that are verdicts (``is_verdict``)."""
    return and_(
        Feedback.source == EXPLICIT_SOURCE,
        Feedback.key.in_(VERDICT_KEYS),
        Feedback.value.is_not(None),
    )


def rating_filter() -> ColumnElement[bool]:
    """WHERE clause of the explicit ratings."""
    return and_(
        Feedback.source == EXPLICIT_SOURCE,
        Feedback.key == RATING_KEY,
        Feedback.value.is_not(None),
    )


def thumbs_filter() -> ColumnElement[bool]:
    """WHERE clause of the explicit thumbs."""
    return and_(
        Feedback.source == EXPLICIT_SOURCE,
        Feedback.key == THUMBS_KEY,
        Feedback.value.is_not(None),
    )


def positive_row(positive_rating: float = POSITIVE_RATING) -> ColumnElement[int]:
    """1 for a positive verdict row, else 0 (``is_positive``; use with ``verdict_filter``)."""
    return case(
        (and_(Feedback.key == RATING_KEY, Feedback.value >= positive_rating), 1),
        (and_(Feedback.key == THUMBS_KEY, Feedback.value >= THUMBS_UP), 1),
        else_=0,
    )


def rollout_outcomes(positive_rating: float = POSITIVE_RATING) -> Select[Any]:
    """One row per rollout with a verdict: ``rollout_id`` and ``positive`` (1 or 0).

    ``rollout_outcome`` in SQL: the minimum over the rollout's verdicts (every one positive).
    Add joins and WHERE clauses (a workflow, an experiment, a set of ids) before ``.subquery()``.
    """
    return (
        select(
            Feedback.rollout_id.label("rollout_id"),
            func.min(positive_row(positive_rating)).label("positive"),
        )
        .where(verdict_filter())
        .group_by(Feedback.rollout_id)
    )


def rollout_ratings() -> Select[Any]:
    """One row per rated rollout: ``rollout_id`` and ``rating``, its lowest explicit rating."""
    return (
        select(
            Feedback.rollout_id.label("rollout_id"),
            func.min(Feedback.value).label("rating"),
        )
        .where(rating_filter())
        .group_by(Feedback.rollout_id)
    )


def as_sql(statement: Select[Any], dialect: Any) -> str:
    """A statement above as literal SQL text, for queries written as text (hot problems)."""
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
