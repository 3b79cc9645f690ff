"""Experiment statistics from real rows, and their intervals."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.experiments import ExperimentError, mean_interval, t_value, wilson

from .helpers import BASE, add_rollouts, make_config


def test_wilson_and_t_intervals_match_references():
    est = wilson(8, 10)
    assert (est.low, est.high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson(0, 20).low == pytest.approx(0.0, abs=1e-12) and wilson(
        0, 20
    ).high == pytest.approx(0.1611, abs=1e-4)
    for dof in (3, 5, 10, 30, 200):
        assert t_value(0.95, dof) == pytest.approx(sps.t.ppf(0.975, dof), rel=5e-3)
    xs = [1.0, 2.0, 4.0, 7.0, 11.0]
    est = mean_interval(sum(xs), sum(x * x for x in xs), len(xs))
    ref = sps.t.interval(0.95, len(xs) - 1, loc=5.0, scale=sps.sem(xs))
    assert (est.low, est.high) == (pytest.approx(ref[0], rel=1e-2), pytest.approx(ref[1], rel=1e-2))


def test_stats_per_variant_from_rollouts_and_feedback(store):
    config = make_config()
    v1 = versions.ensure_workflow(store, config, "qa")
    cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}})
    exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.3)
    add_rollouts(
        store,
        experiment_id=exp.id,
        variant="baseline",
        n=120,
        positive=60,
        failed=6,
        latency_ms=100,
        reward=0.25,
        version_id=v1.id,
    )
    add_rollouts(
        store,
        experiment_id=exp.id,
        variant="candidate-1",
        n=80,
        positive=60,
        latency_ms=200,
        reward=0.75,
        version_id=cand.id,
    )
    add_rollouts(store, experiment_id=None, variant=None, n=30, positive=0)  # not in it
    stats = ex.experiment_stats(store, exp.id, config)
    base, c = stats.baseline_stats, stats.variants["candidate-1"]
    assert (base.rollouts, base.rated, base.positive, base.failed) == (120, 120, 60, 6)
    assert (c.rollouts, c.rated, c.positive, c.failed) == (80, 80, 60, 0)
    assert base.positive_feedback_rate.value == pytest.approx(0.5)
    assert c.positive_feedback_rate.low < 0.75 < c.positive_feedback_rate.high
    assert base.error_rate.value == pytest.approx(0.05)
    assert c.success_rate.value == 1.0
    assert base.mean_reward.value == pytest.approx(0.25) and c.mean_reward.value == pytest.approx(
        0.75
    )
    assert base.latency_mean.value == pytest.approx(104.5)
    assert c.latency_mean.low < 204.5 < c.latency_mean.high
    assert c.latency_p95.value == pytest.approx(209.0)
    assert c.latency_p95.low <= 209.0 <= c.latency_p95.high
    assert c.tokens_mean.value == pytest.approx(30) and c.cost_mean.value == pytest.approx(0.001)
    assert stats.candidates == [c] and stats.min_samples == 50
    n, mean, var = c.metric("positive_feedback_rate")
    assert (n, mean, var) == (80, 0.75, pytest.approx(0.1875))
    assert math.isfinite(stats.as_dict()["variants"]["baseline"]["latency_p95_ms"]["value"])


def test_lifecycle_rules(store):
    config = make_config()
    versions.ensure_workflow(store, config, "qa")
    cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}})
    with pytest.raises(ExperimentError, match="between 0 and 1"):
        ex.start_experiment(store, "qa", [cand.id], traffic=1.0)
    exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.1)
    with pytest.raises(ExperimentError, match="already has a running experiment"):
        ex.start_experiment(store, "qa", [cand.id], traffic=0.1)
    ex.set_weights(store, exp.id, {"candidate-1": 0.3, "baseline": 0.7})
    assert ex.get_experiment(store, exp.id).variants[1]["weight"] == 0.3
    with pytest.raises(ExperimentError, match="no variant"):
        ex.set_weights(store, exp.id, {"nope": 1})
    with pytest.raises(ExperimentError, match="no variant 'nope'"):
        ex.promote(store, exp.id, "nope")
    stopped = ex.stop_experiment(store, exp.id, reason="enough")
    assert stopped.status == "stopped" and stopped.ended_at is not None
    with pytest.raises(ExperimentError, match="already stopped"):
        ex.stop_experiment(store, exp.id)
    assert [e.id for e in ex.list_experiments(store, workflow="qa", status="stopped")] == [exp.id]
