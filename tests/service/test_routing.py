"""Thompson-sampling routing: eligibility, load, learning, the floor, and fw.route on real stores."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import bindparam, text

from flywheel_middleware.config import FlywheelConfig, RoutingConfig
from flywheel_middleware.learn.routing import NoEligibleAgentError, Router, simulate, update_routing


def routing(**kw) -> RoutingConfig:
    agents = kw.pop(
        "agents",
        [
            {"id": "alice", "skills": ["billing", "general"], "capacity": 4},
            {"id": "bob", "skills": ["billing", "general"], "capacity": 4},
            {"id": "carol", "skills": ["tech"], "capacity": 4},
        ],
    )
    return RoutingConfig(agents=agents, **kw)


def test_eligibility_by_skills():
    r = Router(routing(), seed=1)
    assert r.eligible(["billing"]) == ["alice", "bob"]
    assert r.eligible(["billing", "general"]) == ["alice", "bob"]
    assert r.eligible(["tech"]) == ["carol"]
    d = r.choose(["tech"])
    assert d.agent_id == "carol" and d.probability == 1.0
    with pytest.raises(
        NoEligibleAgentError, match=r"no agent has all of the skills \['tech', 'billing'\]"
    ):
        r.choose(["tech", "billing"])


def test_thompson_shifts_traffic_to_the_better_agent_and_never_starves():
    cfg = routing(floor=0.05)
    router = Router(cfg, seed=2)
    decisions = simulate(router, {"alice": 0.8, "bob": 0.55}, 3000, skills=["billing"], seed=2)
    late = decisions[-1000:]
    share = lambda ds, a: sum(d.agent_id == a for d in ds) / len(ds)  # noqa: E731
    assert abs(decisions[0].probabilities["alice"] - 0.5) < 0.1  # no evidence: a coin flip
    assert share(late, "alice") > 0.85  # then exploits
    assert share(late, "bob") > 0.02  # but never starves the other: the floor
    assert min(d.probabilities["bob"] for d in decisions) >= 0.05 - 1e-9
    assert all(abs(sum(d.probabilities.values()) - 1) < 1e-9 for d in decisions)
    # the recorded probability is the probability the chosen agent had
    assert all(d.probability == d.probabilities[d.agent_id] for d in decisions)
    assert router.weight("alice", "billing") > router.weight("bob", "billing")
    assert cfg.weight_min <= router.weight("bob") <= cfg.weight_max


def test_it_follows_a_change_when_the_other_agent_improves():
    router = Router(routing(floor=0.1), seed=5)
    simulate(router, {"alice": 0.8, "bob": 0.4}, 300, skills=["billing"], seed=5)
    # bob gets much better; the floor keeps sampling him, so the posterior catches up
    decisions = simulate(router, {"alice": 0.6, "bob": 0.95}, 3000, skills=["billing"], seed=6)
    late = decisions[-500:]
    assert sum(d.agent_id == "bob" for d in late) / len(late) > 0.6


def test_load_penalty_and_capacity():
    cfg = routing(load_penalty=4.0, floor=0.0)
    r = Router(cfg, seed=3)
    probs, used = r.probabilities(["billing"], load={"alice": 3, "bob": 0})
    assert probs["bob"] > 0.7 and used == {"alice": 3.0, "bob": 0.0}
    probs, _ = r.probabilities(["billing"], load={"alice": 4, "bob": 1})  # alice at capacity
    assert probs == {"bob": 1.0, "alice": 0.0}
    # in-flight requests count as load until released
    held = [r.choose(["billing"]) for _ in range(8)]
    assert {d.agent_id for d in held} == {"alice", "bob"}
    assert sum(d.agent_id == "alice" for d in held) == 4  # both fill up to capacity 4
    for d in held:
        d.release()
    assert r.probabilities(["billing"])[1] == {"alice": 0.0, "bob": 0.0}


def test_fw_route_records_the_decision_and_update_routing_learns(fw_any):
    fw = fw_any
    config = FlywheelConfig.model_validate({"routing": routing(floor=0.05).model_dump()})
    fw.configure(store_url=fw.get_store().url, config=config)
    import random

    rng = random.Random(4)
    truth = {"alice": 0.85, "bob": 0.35}
    ids = []
    for _ in range(120):
        with fw.rollout("support") as r:
            with fw.route(["billing"]) as d:
                r.set_output(f"answer from {d.agent_id}")
        ids.append((r.id, d.agent_id))
    fw.flush()
    row = fw.get_store().execute("SELECT metadata FROM rollout WHERE id = :i", {"i": ids[0][0]})[0][
        0
    ]
    import json

    meta = json.loads(row) if isinstance(row, str) else row
    route = meta["route"]
    assert (
        route["agent"] == ids[0][1]
        and route["skills"] == ["billing"]
        and route["policy"] == "thompson"
    )
    assert (
        set(route["probabilities"]) == {"alice", "bob"}
        and route["probability"] == route["probabilities"][route["agent"]]
    )

    for rid, agent in ids:
        fw.feedback(rid, 5 if rng.random() < truth[agent] else 1)
    fw.flush()
    out = update_routing(fw.get_store(), config)
    assert out["routed_rollouts"] == 120 and out["rewarded"] == 120
    again = update_routing(fw.get_store(), config)  # idempotent: nothing counted twice
    assert again["weights"] == out["weights"]
    rows = {
        (a, s): (w, al, be, n)
        for a, s, w, al, be, n in fw.get_store().execute(
            "SELECT agent_id, skill, weight, alpha, beta, n FROM routing_weight"
        )
    }
    n_alice = sum(a == "alice" for _, a in ids)
    assert rows[("alice", "billing")][3] == n_alice and rows[("alice", "*")][3] == n_alice
    assert rows[("alice", "billing")][0] > rows[("bob", "billing")][0]
    assert all(
        config.routing.weight_min <= v[0] <= config.routing.weight_max for v in rows.values()
    )

    # the serving process picks the new posteriors up and prefers alice
    from flywheel_middleware.learn import routing as routing_mod

    routing_mod.invalidate_routers()
    picks = []
    for _ in range(200):
        d = fw.route(["billing"])
        d.release()
        picks.append(d.agent_id)
    assert picks.count("alice") > 140 and picks.count("bob") > 0


def test_route_without_agents_says_what_to_configure(fw):
    with pytest.raises(NoEligibleAgentError, match="routing.agents"):
        fw.route(["billing"])


def test_old_evidence_is_discounted_or_windowed(fw):
    config = FlywheelConfig.model_validate({"routing": routing().model_dump()})
    fw.configure(store_url=fw.get_store().url, config=config)
    old, new = [], []
    for i in range(60):
        agent = "alice" if i % 2 else "bob"
        with fw.rollout("support") as r:
            r.set_metadata("route", {"agent": agent, "skills": ["billing"], "probability": 0.5})
        (old if i < 30 else new).append((r.id, agent))
    fw.flush()
    # the old half: bob was great and alice poor; the new half: the other way round
    for rid, agent in old:
        fw.feedback(rid, 5 if agent == "bob" else 1)
    for rid, agent in new:
        fw.feedback(rid, 5 if agent == "alice" else 1)
    fw.flush()
    ten_days_ago = datetime.now(timezone.utc) - timedelta(days=10)
    with fw.get_store().engine.begin() as conn:
        conn.execute(
            text("UPDATE rollout SET started_at = :t WHERE id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"t": ten_days_ago, "ids": [rid for rid, _ in old]},
        )
    flat = update_routing(fw.get_store(), config)["weights"]
    assert flat["alice/billing"] == pytest.approx(
        flat["bob/billing"]
    )  # all evidence counts the same
    recent = update_routing(fw.get_store(), config, half_life_days=2)["weights"]
    assert recent["alice/billing"] > 1.7 and recent["bob/billing"] < 0.3
    windowed = update_routing(fw.get_store(), config, window_days=5)
    assert windowed["rewarded"] == 30

    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    out = CliRunner().invoke(
        main, ["routing", "update", "--store", fw.get_store().url, "--window-days", "5"]
    )
    assert out.exit_code == 0, out.output
    assert "30 of 30 routed rollouts had a reward" in out.output and "alice" in out.output
    out = CliRunner().invoke(main, ["routing", "show", "--store", fw.get_store().url])
    assert out.exit_code == 0 and "bob" in out.output


def test_concurrent_routing_is_safe():
    import threading

    router = Router(routing(), seed=9)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                with router.choose(["billing"]) as d:
                    assert abs(sum(d.probabilities.values()) - 1) < 1e-9
                router.observe(d.agent_id, d.skills, 1.0 if d.agent_id == "alice" else 0.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert router.in_flight == {"alice": 0, "bob": 0}
    n = router.posteriors[("alice", "*")][2] + router.posteriors[("bob", "*")][2]
    assert n == 1600


def test_implicit_signals_train_routing_when_nobody_rates(fw):
    from flywheel_middleware.learn.implicit import record_events

    config = FlywheelConfig.model_validate({"routing": routing().model_dump()})
    fw.configure(store_url=fw.get_store().url, config=config)
    for i in range(20):
        agent = "alice" if i % 2 else "bob"
        with fw.rollout("support") as r:
            r.set_metadata("route", {"agent": agent, "skills": ["billing"], "probability": 0.5})
        kind = "copy" if agent == "alice" else "escalate"
        record_events(
            [
                {"event_type": "dwell", "rollout_id": r.id, "payload": {"ms": 6000}},
                {"event_type": "click", "rollout_id": r.id, "payload": {"kind": kind}},
            ],
            fw.get_recorder(),
        )
    fw.flush()
    assert update_routing(fw.get_store(), config, use_implicit=False)["rewarded"] == 0
    out = update_routing(fw.get_store(), config)
    assert out["rewarded"] == 20
    # the rule: copy + a real read = 0.85, escalate + a real read = 0.3
    assert out["weights"]["alice/billing"] > 1.4 and out["weights"]["bob/billing"] < 0.8
