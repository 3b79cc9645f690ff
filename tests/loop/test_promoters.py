"""Promoters: the sequential test's error control and guardrails, and the seed's rule."""

from __future__ import annotations

import random

import pytest

from flywheel_middleware.config import Objective
from flywheel_middleware.loop.experiments import ExperimentStats, VariantStats
from flywheel_middleware.plugin_system.manager import plugin_manager

from .helpers import make_config


def _promoter(type_name: str, **params):
    config = make_config()
    return plugin_manager(config).build("promoter", {"type": type_name, "params": params})


def variant(name, n, positive, latency=100.0, failed=0, cost=None):
    v = VariantStats(
        name,
        1,
        0.5,
        rollouts=n,
        succeeded=n - failed,
        failed=failed,
        rated=n,
        positive=positive,
        latency_n=n,
        latency_sum=latency * n,
        latency_sumsq=(latency * latency + 25.0) * n,
    )
    if cost is not None:
        v.cost_n, v.cost_sum, v.cost_sumsq = n, cost * n, (cost * cost + 1e-8) * n
    return v


def stats(base, *cands, **objective):
    variants = {"baseline": base, **{c.name: c for c in cands}}
    return ExperimentStats(
        1, "qa", "running", variants, objective=Objective(**objective), min_samples=100
    )


BOUNDARIES = pytest.mark.parametrize("boundary", ["horizon", "mixture"])


@BOUNDARIES
def test_sequential_promotes_a_clear_winner_with_evidence(boundary):
    d = _promoter("sequential", boundary=boundary).decide(
        stats(variant("baseline", 2000, 1000), variant("candidate-1", 2000, 1200))
    )
    assert d.action == "promote" and d.variant == "candidate-1"
    ev = d.evidence["candidates"]["candidate-1"]
    low, high = ev["confidence_sequence"]
    assert 0 < low < 0.1 < high and ev["boundary"] == boundary
    if boundary == "mixture":
        assert ev["log_lr_better"] >= ev["log_threshold"]
    else:
        assert ev["z"] >= ev["z_boundary"] and ev["information_fraction"] > 0


def test_horizon_is_the_fixed_horizon_test_at_its_end_and_stricter_before():
    """At I ≥ I_max it promotes iff z ≥ Φ⁻¹(1 − α/2); earlier it needs z ≥ c·√(I_max / I)."""
    from flywheel_middleware.plugins.promoters import planned_information

    p = _promoter("sequential", alpha=0.05, min_effect=0.05, power=0.8)
    info_max = planned_information(0.05, 0.8, 0.05)
    assert info_max == pytest.approx(((1.959964 + 0.841621) / 0.05) ** 2, rel=1e-5)
    n = 1600  # I = n / (2 p(1−p)) ≈ 3200 ≥ I_max ≈ 3140 at p ≈ 0.5: past the horizon
    for positive, action in [(836, "reject"), (860, "promote")]:
        late = p.decide(stats(variant("baseline", n, 800), variant("candidate-1", n, positive)))
        ev = late.evidence["candidates"]["candidate-1"]
        assert ev["information_fraction"] >= 1
        assert ev["z_boundary"] == pytest.approx(1.96, abs=1e-3)
        assert late.action == action and (ev["z"] >= 1.96) == (action == "promote")
    assert (
        "planned horizon"
        in p.decide(stats(variant("baseline", n, 800), variant("candidate-1", n, 836))).reason
    )  # the horizon is the last look: not better there means futile
    n = 400  # a quarter of the way: the boundary is twice as far
    early = p.decide(stats(variant("baseline", n, 200), variant("candidate-1", n, 230)))
    ev = early.evidence["candidates"]["candidate-1"]
    assert 1.96 < ev["z"] < ev["z_boundary"] and early.action == "continue"
    assert ev["z_boundary"] == pytest.approx(1.959964 / ev["information_fraction"] ** 0.5)


@BOUNDARIES
def test_sequential_rejects_a_clearly_worse_candidate_and_waits_for_min_samples(boundary):
    p = _promoter("sequential", boundary=boundary)
    assert (
        p.decide(stats(variant("baseline", 2000, 1000), variant("candidate-1", 2000, 800))).action
        == "reject"
    )
    early = p.decide(stats(variant("baseline", 50, 10), variant("candidate-1", 50, 45)))
    assert (
        early.action == "continue"
        and "of 100 samples" in early.evidence["candidates"]["candidate-1"]["reason"]
    )


def test_guardrails_block_promotion():
    p = _promoter("sequential")
    slow = p.decide(
        stats(variant("baseline", 2000, 1000), variant("candidate-1", 2000, 1200, latency=300))
    )
    assert slow.action == "reject" and "latency" in slow.reason  # 3× slower beyond doubt
    bit_slow = p.decide(
        stats(
            variant("baseline", 2000, 1000, latency=100.0),
            variant("candidate-1", 2000, 1200, latency=121.0),
        )
    )
    assert bit_slow.action != "promote"
    errors = p.decide(
        stats(variant("baseline", 2000, 1000), variant("candidate-1", 2000, 1200, failed=200))
    )
    assert errors.action == "reject" and "error rate" in errors.reason
    guard = {"guardrails": {"cost_ratio_max": 1.1}}
    costly = p.decide(
        stats(
            variant("baseline", 2000, 1000, cost=0.01),
            variant("candidate-1", 2000, 1200, cost=0.02),
            **guard,
        )
    )
    assert costly.action == "reject" and "cost" in costly.reason


@pytest.mark.slow
@BOUNDARIES
def test_sequential_keeps_false_promotions_below_alpha_under_repeated_looks(boundary):
    """A/A: 300 experiments, the promoter checked after every batch of 50, up to 3000 each."""
    p = _promoter("sequential", boundary=boundary, alpha=0.05, max_samples=100_000)
    rng = random.Random(1)
    promoted = 0
    for _ in range(300):
        nb = kb = nc = kc = 0
        for _look in range(60):
            nb, nc = nb + 50, nc + 50
            kb += sum(rng.random() < 0.5 for _ in range(50))
            kc += sum(rng.random() < 0.5 for _ in range(50))
            d = p.decide(stats(variant("baseline", nb, kb), variant("candidate-1", nc, kc)))
            if d.action != "continue":
                promoted += d.action == "promote"
                break
    assert promoted / 300 <= 0.05


def test_threshold_is_the_seed_rule():
    p = _promoter("threshold")
    base = variant("baseline", 500, 250)
    assert p.decide(stats(base, variant("candidate-1", 500, 260))).action == "promote"  # +2.0 pts
    assert p.decide(stats(base, variant("candidate-1", 500, 259))).action == "continue"  # +1.8 pts
    assert p.decide(stats(base, variant("candidate-1", 500, 300, latency=121))).action == "continue"
    assert p.decide(stats(base, variant("candidate-1", 500, 300, latency=120))).action == "promote"
    assert (
        p.decide(stats(variant("baseline", 50, 10), variant("candidate-1", 50, 40))).action
        == "continue"
    )


@BOUNDARIES
def test_bonferroni_over_candidates_and_best_wins(boundary):
    p = _promoter("sequential", boundary=boundary)
    d = p.decide(
        stats(
            variant("baseline", 3000, 1500),
            variant("candidate-1", 3000, 1700),
            variant("candidate-2", 3000, 1900),
        )
    )
    assert d.action == "promote" and d.variant == "candidate-2"
    assert d.evidence["candidates"]["candidate-1"]["alpha"] == pytest.approx(0.025)


@BOUNDARIES
def test_reported_bounds_agree_with_the_decision(boundary):
    p = _promoter("sequential", boundary=boundary)
    for positive in range(1000, 1200, 7):
        d = p.decide(stats(variant("baseline", 2000, 1000), variant("candidate-1", 2000, positive)))
        low, high = d.evidence["candidates"]["candidate-1"]["confidence_sequence"]
        assert low <= (positive - 1000) / 2000 <= high
        assert (d.action == "promote") == (low > 0), (positive, low, d.action)


def noisy(v, sd):
    """The same variant with latencies spread by ``sd`` ms."""
    v.latency_sumsq = (v.latency_sum / v.latency_n) ** 2 * v.latency_n + sd * sd * v.latency_n
    return v


@BOUNDARIES
def test_better_but_over_a_guardrail_ends_at_the_last_look(boundary):
    """A gain that still breaks a guardrail at the horizon (or max_samples) is rejected, so
    the experiment ends instead of running forever."""
    p = _promoter("sequential", boundary=boundary, max_samples=3000)

    def decide(n):
        base = noisy(variant("baseline", n, n // 2, latency=100.0), 100)
        # 1.25× is over latency_ratio_max 1.2 at the point estimate, not beyond doubt
        cand = noisy(variant("candidate-1", n, n // 2 + n // 10, latency=125.0), 100)
        return p.decide(stats(base, cand))

    early = decide(1000)
    assert early.action == "continue" and "better, but latency 1.25×" in early.reason
    last = decide(3000)  # past the horizon (I ≈ 6000 > 3140) and at max_samples
    info = last.evidence["candidates"]["candidate-1"]
    assert last.action == "reject" and "better, but at" in info["reason"], info
    assert "latency 1.25× baseline" in info["reason"]
