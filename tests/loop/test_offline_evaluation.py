"""Offline evaluation from logged propensities: coverage in simulation, overlap, the CLI."""

from __future__ import annotations

import json
import random
import time
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from flywheel_middleware.capture.ids import new_rollout_id
from flywheel_middleware.cli import main
from flywheel_middleware.config import RoutingConfig
from flywheel_middleware.learn.routing import Router
from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.offline_evaluation import (
    EvaluationError,
    LoggedDecision,
    OverlapError,
    TargetPolicy,
    evaluate,
)
from flywheel_middleware.store.models import Rollout

from .helpers import BASE, make_config

# The simulated world: two contexts, three actions, a success rate per (context, action).
RATES = {
    "billing": {"a": 0.7, "b": 0.4, "c": 0.55},
    "shipping": {"a": 0.3, "b": 0.65, "c": 0.5},
}
# the logging policy mostly picks the weaker actions, so the logged value is far from the target's
LOGGING = {"billing": {"a": 0.1, "b": 0.6, "c": 0.3}, "shipping": {"a": 0.6, "b": 0.2, "c": 0.2}}
CONTEXT_SHARE = {"billing": 0.5, "shipping": 0.5}


def simulate_log(
    seed: int, users: int = 100, per_user: int = 4, logging: dict = LOGGING
) -> list[LoggedDecision]:
    """Users differ (each has a fixed +/-0.15 on every success rate), so their rollouts are
    correlated; each decision is drawn from the logging policy and its true probability kept."""
    rng = random.Random(seed)
    out = []
    for u in range(users):
        lift = rng.choice([-0.15, 0.15])
        for _ in range(per_user):
            ctx = rng.choice(sorted(CONTEXT_SHARE))
            probs = logging[ctx]
            actions = [a for a in probs if probs[a] > 0]
            action = rng.choices(actions, weights=[probs[a] for a in actions])[0]
            reward = float(rng.random() < RATES[ctx][action] + lift)
            out.append(LoggedDecision(f"u{u}", (ctx,), action, probs[action], probs, reward))
    return out


def test_estimates_cover_the_true_value_of_a_new_policy_about_95_percent():
    policy = TargetPolicy.parse(["billing:c", "shipping:b=3,a=1"])
    truth = 0.5 * RATES["billing"]["c"] + 0.5 * (
        0.75 * RATES["shipping"]["b"] + 0.25 * RATES["shipping"]["a"]
    )
    runs = 200
    covered = {"ips": 0, "snips": 0, "dr": 0}
    errors: dict[str, list[float]] = {"ips": [], "snips": [], "dr": [], "logged": []}
    for seed in range(runs):
        result = evaluate(simulate_log(seed), policy, level=0.95)
        for name in covered:
            est = getattr(result, name)
            covered[name] += est.low <= truth <= est.high
            errors[name].append(est.value - truth)
        errors["logged"].append(result.logged.value - truth)
        assert result.units == 100 and 0 < result.ess < result.decisions
    for name, hits in covered.items():
        assert 0.90 <= hits / runs <= 0.99, (name, hits / runs)
        bias = sum(errors[name]) / runs
        assert abs(bias) < 0.02, (name, bias)
    # what the logging policy earned is far from it: the estimates are not the logged mean
    assert sum(errors["logged"]) / runs < -0.08


def test_it_refuses_where_the_logging_policy_never_tried_the_action():
    no_c_in_shipping = {**LOGGING, "shipping": {"a": 0.5, "b": 0.5, "c": 0.0}}
    log = simulate_log(1, logging=no_c_in_shipping)
    with pytest.raises(OverlapError, match=r"never tried 'c' for context 'shipping'"):
        evaluate(log, TargetPolicy.parse(["*:c"]))
    with pytest.raises(OverlapError, match=r"'d' was never an option in the log"):
        evaluate(log, TargetPolicy.parse(["billing:a", "shipping:d"]))
    # the same policy restricted to where c was tried is fine
    assert evaluate(log, TargetPolicy.parse(["billing:c", "shipping:b"])).ips.value > 0
    with pytest.raises(EvaluationError, match="says nothing for context 'shipping'"):
        evaluate(log, TargetPolicy.parse(["billing:a"]))
    with pytest.raises(EvaluationError, match="not a number"):
        TargetPolicy.parse(["billing:a=lots"])


def test_the_router_keeps_its_floor_for_an_agent_at_capacity():
    config = RoutingConfig.model_validate(
        {"agents": [{"id": "x", "skills": ["s"], "capacity": 1}, {"id": "y", "skills": ["s"]}]}
    )
    probs, _ = Router(config, seed=1).probabilities(["s"], load={"x": 1, "y": 0})
    assert probs["x"] == pytest.approx(0.05) and probs["y"] == pytest.approx(0.95)


def _rollout(user_id: str, at: datetime, reward: float | None, **fields: object) -> Rollout:
    return Rollout(
        id=new_rollout_id(),
        workflow="qa",
        user_id=user_id,
        status="succeeded",
        started_at=at,
        reward=reward,
        **fields,
    )


def _routed(store, n: int = 400, seed: int = 3) -> None:
    """Rollouts routed by the real router, learning as it goes, with a floor of 0.1; desk
    'fast' resolves 80% of requests, 'slow' 40%."""
    config = RoutingConfig.model_validate(
        {
            "floor": 0.1,
            "agents": [
                {"id": "fast", "skills": ["billing"]},
                {"id": "slow", "skills": ["billing"]},
            ],
        }
    )
    router = Router(config, seed=seed)
    rng = random.Random(f"outcomes {seed}")  # not the router's own stream
    now = datetime.now(timezone.utc)
    with store.session() as session:
        for i in range(n):
            d = router.choose(["billing"])
            d.release()
            reward = float(rng.random() < {"fast": 0.8, "slow": 0.4}[d.agent_id])
            router.observe(d.agent_id, d.skills, reward)  # it learns: fast gets most traffic
            session.add(
                _rollout(
                    f"u{i % 150}",
                    now + timedelta(milliseconds=i),
                    None if i % 20 == 0 else reward,
                    metadata_={"route": d.as_metadata()},
                )
            )


def test_flywheel_evaluate_routing_prints_estimates_intervals_and_ess(store, tmp_path):
    _routed(store)
    args = ["evaluate", "routing", "--store", store.url, "--config", str(tmp_path / "none.yaml")]
    out = CliRunner().invoke(main, [*args, "--policy", "billing:slow"])
    assert out.exit_code == 0, out.output
    for text in ("IPS", "self-normalized IPS", "doubly robust", "95% interval"):
        assert text in out.output
    assert "effective sample size" in out.output and "with no reward" in out.output
    out = CliRunner().invoke(main, [*args, "--policy", "slow", "--json", "--level", "0.9"])
    data = json.loads(out.output)
    assert data["decisions"] == 380 and data["left_out"] == {"no reward": 20}
    assert data["level"] == 0.9 and 0 < data["effective_sample_size"] < 380
    for name in ("ips", "snips", "dr"):
        est = data["estimates"][name]
        assert est["low"] < 0.4 < est["high"], (name, est)  # slow's true rate
    assert data["estimates"]["logged"]["value"] > 0.6  # the router mostly chose fast
    # an agent the router never had: refused, with the reason, exit 1
    out = CliRunner().invoke(main, [*args, "--policy", "billing:nobody", "--json"])
    assert out.exit_code == 1 and "never an option" in json.loads(out.output)["refused"]
    out = CliRunner().invoke(main, [*args, "--policy", "billing:nobody"])
    assert out.exit_code == 1 and "refused" in out.output


def test_flywheel_evaluate_assignment_uses_the_weights_in_force(store, tmp_path):
    config = make_config()
    v1 = versions.ensure_workflow(store, config, "qa")
    cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}}, created_by="t")
    exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.25)
    rng = random.Random(5)
    # the rollouts come a second after the experiment's start event and end well before the
    # weight change below, however slowly a loaded machine writes them
    start = datetime.now(timezone.utc) + timedelta(seconds=1)
    rows = []
    for i in range(400):
        variant = "candidate-1" if rng.random() < 0.25 else "baseline"
        rate = 0.7 if variant == "candidate-1" else 0.5
        reward = float(rng.random() < rate)
        rows.append((variant, reward))
        with store.session() as session:
            session.add(
                _rollout(
                    f"user-{i}",
                    start + timedelta(milliseconds=i),
                    reward,
                    experiment_id=exp.id,
                    variant=variant,
                    propensity=0.25 if variant == "candidate-1" else 0.75,
                    config_version_id=cand.id if variant == "candidate-1" else v1.id,
                )
            )
    args = ["evaluate", "assignment", "--store", store.url, "--config", str(tmp_path / "n.yaml")]
    out = CliRunner().invoke(main, [*args, "--experiment", str(exp.id), "--policy", "candidate-1"])
    assert out.exit_code == 0, out.output
    assert f"experiment {exp.id} of qa" in out.output and "doubly robust" in out.output
    out = CliRunner().invoke(main, [*args, "--policy", "candidate-1", "--json"])
    data = json.loads(out.output)
    cand_rewards = [r for v, r in rows if v == "candidate-1"]
    assert data["estimates"]["snips"]["value"] == pytest.approx(
        sum(cand_rewards) / len(cand_rewards)
    )
    assert data["estimates"]["ips"]["low"] < 0.7 < data["estimates"]["ips"]["high"]
    assert data["units"] == 400
    # the candidate is dropped (weight 0) and traffic goes on: the later rollouts never
    # could have gone to it, so "all to candidate-1" is refused
    while datetime.now(timezone.utc) < start + timedelta(seconds=1.5):
        time.sleep(0.05)
    ex.set_weights(store, exp.id, {"candidate-1": 0.0})
    with store.session() as session:
        for i in range(50):
            later = datetime.now(timezone.utc) + timedelta(seconds=1, milliseconds=i)
            session.add(
                _rollout(
                    f"late-{i}",
                    later,
                    1.0,
                    experiment_id=exp.id,
                    variant="baseline",
                    propensity=1.0,
                )
            )
    out = CliRunner().invoke(main, [*args, "--workflow", "qa", "--policy", "candidate-1"])
    assert out.exit_code == 1
    assert "never tried 'candidate-1' in 50 of 450 decisions" in out.output
    out = CliRunner().invoke(main, [*args, "--policy", "baseline", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["decisions"] == 450
