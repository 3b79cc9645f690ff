"""One definition of a positive outcome: every consumer agrees on the same feedback rows.

The rows below hold every case the rule has to decide (boundaries, several verdicts on one
rollout, feedback that is not a verdict). Each consumer — experiments, the dashboard, the
implicit model's labels, routing, the explicit_rating reward, triggers, hot problems, stats
and bad cases — reads them through its own public API, and all must say what
``store.outcomes`` says.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from flywheel_middleware.config import config_from_dict
from flywheel_middleware.learn import implicit, routing
from flywheel_middleware.loop import analysis, experiments, rewards, triggers
from flywheel_middleware.service import dashboard
from flywheel_middleware.store import outcomes, queries
from flywheel_middleware.store.models import Experiment, Feedback, Rollout

E, J, B, I = "explicit", "judge", "business", "implicit"  # noqa: E741

# (feedback rows as (source, key, value), positive outcome, the rollout's rating)
CASES: list[tuple[list[tuple[str, str, float | None]], bool | None, float | None]] = [
    ([(E, "rating", 5)], True, 5),
    ([(E, "rating", 4)], True, 4),  # the lowest positive rating
    ([(E, "rating", 3)], False, 3),  # rated, neither positive nor low
    ([(E, "rating", 2)], False, 2),  # the highest low rating
    ([(E, "rating", 1)], False, 1),
    ([(E, "thumbs", 1.0)], True, None),
    ([(E, "thumbs", 0.0)], False, None),
    ([(E, "thumbs", 0.5)], True, None),  # the midpoint reads as up
    ([(E, "thumbs", 0.4)], False, None),
    ([(E, "rating", 5), (E, "rating", 1)], False, 1),  # the worst verdict decides
    ([(E, "rating", 5), (E, "thumbs", 0.0)], False, 5),
    ([(E, "rating", 4), (E, "thumbs", 1.0)], True, 4),
    ([(E, "rating", 2), (J, "rating", 5)], False, 2),  # a judge's rating is no verdict
    ([(J, "rating", 5)], None, None),
    ([(J, "rating", 1)], None, None),
    ([(B, "resolved", 1.0)], None, None),  # business keys have no fixed direction
    ([(B, "refunded", 1.0), (E, "thumbs", 1.0)], True, None),
    ([(I, "satisfaction", 0.9)], None, None),  # a model's guess, not a verdict
    ([(E, "comment", None)], None, None),
    ([(E, "rating", None)], None, None),
    ([], None, None),
]


def rows(spec):
    return [SimpleNamespace(source=s, key=k, value=v) for s, k, v in spec]


@pytest.mark.parametrize(("spec", "positive", "rating"), CASES)
def test_the_rule_for_one_rollout(spec, positive, rating):
    assert outcomes.rollout_outcome(rows(spec)) is positive
    assert outcomes.rollout_rating(rows(spec)) == rating
    low = outcomes.is_low(outcomes.rollout_rating(rows(spec)))
    assert low == (rating is not None and rating <= 2)
    assert not (low and positive)  # a bad case is never a success


NOW = datetime.now(timezone.utc).replace(microsecond=0)


def seed(store) -> dict[str, tuple[str, bool | None, float | None]]:
    """Each case twice (once per variant), tagged with an experiment and a routed agent."""
    expected = {}
    with store.session() as s:
        exp = Experiment(
            workflow="qa",
            status="running",
            baseline_version_id=1,
            variants=[
                {"name": "baseline", "version_id": 1, "weight": 0.5},
                {"name": "candidate-1", "version_id": 2, "weight": 0.5},
            ],
            unit="user_id",
            metrics={"seed": "x"},
            started_at=NOW - timedelta(hours=1),
        )
        s.add(exp)
        s.flush()
        i = 0
        for variant in ("baseline", "candidate-1"):
            for spec, positive, rating in CASES:
                rid = f"{i:032x}"
                t = NOW - timedelta(minutes=30) + timedelta(seconds=i)
                s.add(
                    Rollout(
                        id=rid,
                        workflow="qa",
                        experiment_id=exp.id,
                        variant=variant,
                        status="succeeded",
                        started_at=t,
                        ended_at=t,
                        latency_ms=100.0,
                        metadata_={"route": {"agent": variant, "skills": []}},
                    )
                )
                for source, key, value in spec:
                    s.add(
                        Feedback(rollout_id=rid, source=source, key=key, value=value, created_at=t)
                    )
                expected[rid] = (variant, positive, rating)
                i += 1
    return expected


def test_every_consumer_agrees_on_the_same_feedback_rows(store):
    expected = seed(store)
    config = config_from_dict({"analysis": {"min_calls": 1}})
    # -- the positive side -----------------------------------------------------------------
    want = {rid: int(p) for rid, (_, p, _) in expected.items() if p is not None}
    per_variant = {
        v: (
            sum(1 for r, (vv, p, _) in expected.items() if vv == v and p is not None),
            sum(1 for r, (vv, p, _) in expected.items() if vv == v and p),
        )
        for v in ("baseline", "candidate-1")
    }
    assert per_variant["baseline"] == (14, 6)

    # experiments: positive_feedback_rate per variant
    (exp,) = experiments.list_experiments(store, workflow="qa")
    stats = experiments.experiment_stats(store, exp, config)
    for name, (rated, positive) in per_variant.items():
        v = stats.variants[name]
        assert (v.rated, v.positive) == (rated, positive), name
        assert v.positive_feedback_rate.value == pytest.approx(positive / rated)

    # the dashboard's positive-feedback rate (one bucket: every rollout)
    series = dashboard.series(store, "qa", buckets=1)
    (bucket,) = series["positive"]
    assert bucket["n"] == len(want)
    assert bucket["value"] == pytest.approx(sum(want.values()) / len(want))
    assert bucket["value"] == pytest.approx(stats.variants["baseline"].positive_feedback_rate.value)

    # the implicit model's labels: the same outcome, rollout by rollout
    assert implicit.labels_for(store) == want
    assert implicit.labels_for(store, workflow="qa") == want

    # routing learns success from the same outcomes (no stored reward, no telemetry)
    routing.update_routing(store, config, use_implicit=False)
    posteriors = routing.load_posteriors(store)
    for name, (rated, positive) in per_variant.items():
        assert posteriors[(name, "*")] == [1.0 + positive, 1.0 + rated - positive, rated]

    # the explicit_rating reward: graded, but a positive outcome always earns >= 0.75
    run = rewards.compute_rewards(store, config_from_dict({}), write=False)
    for rid, (_, positive, _) in expected.items():
        value = run[rid].value
        assert (value is None) == (positive is None), rid
        if positive:
            assert value >= 0.75, rid  # the reward of a 4

    # -- the low side (triggers.low_rating.max_rating, default 2) ---------------------------
    ratings = {rid: r for rid, (_, _, r) in expected.items() if r is not None}
    low = {rid for rid, r in ratings.items() if r <= 2}
    window = triggers.low_rating_window(store, "qa", window=100, max_rating=2)
    assert set(window["low_rollout_ids"]) == low and window["low"] == len(low)
    (wf_stats,) = queries.stats(store, low_rating_max=2)
    assert (wf_stats.rated, wf_stats.low_rated) == (len(ratings), len(low))
    assert wf_stats.avg_rating == pytest.approx(sum(ratings.values()) / len(ratings))
    (rating_bucket,) = series["rating"]
    assert rating_bucket["value"] == pytest.approx(wf_stats.avg_rating)
    assert rating_bucket["n"] == len(ratings)
    hot = analysis.hot_problems(
        store, config, "qa", since=NOW - timedelta(hours=1), include_all=True, nodes=False
    )
    (whole,) = [p for p in hot if p.node is None]
    assert (whole.rated, whole.low_rated) == (len(ratings), len(low))
    assert {c.rollout.id for c in queries.bad_cases(store, max_rating=2)} == low


def test_thresholds_the_user_configures_still_apply(store):
    expected = seed(store)
    ratings = {rid: r for rid, (_, _, r) in expected.items() if r is not None}
    # triggers.low_rating.max_rating: 3
    window = triggers.low_rating_window(store, "qa", window=100, max_rating=3)
    assert window["low"] == sum(1 for r in ratings.values() if r <= 3)
    (wf_stats,) = queries.stats(store, low_rating_max=3)
    assert wf_stats.low_rated == window["low"]
    # implicit.positive_rating: 5 (a 4 is then not a satisfied label)
    labels = implicit.labels_for(store, positive_rating=5)
    four = [rid for rid, (_, _, r) in expected.items() if r == 4]
    assert four and all(labels[rid] == 0 for rid in four)
    assert sum(labels.values()) == sum(
        1
        for _, p, r in expected.values()
        if p and (r is None or r >= 5)  # positives whose ratings (if any) are all 5
    )


def test_the_explicit_rating_defaults_are_the_outcome_vocabulary():
    from flywheel_middleware.plugins.rewards import ExplicitParams

    p = ExplicitParams()
    assert (p.rating_key, p.thumbs_key) == (outcomes.RATING_KEY, outcomes.THUMBS_KEY)
    assert (p.scale_min, p.scale_max) == (outcomes.RATING_MIN, outcomes.RATING_MAX)
    # the reward of the lowest positive rating is the bar a positive outcome always clears
    span = outcomes.RATING_MAX - outcomes.RATING_MIN
    assert (outcomes.POSITIVE_RATING - outcomes.RATING_MIN) / span == 0.75
