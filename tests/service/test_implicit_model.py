"""Session features, the fallback rule, and the calibrated satisfaction model against it."""

from __future__ import annotations

import json
import random

import pytest

from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.learn import implicit as imp


def ev(event_type, rollout="r1", session="s1", **payload):
    return {
        "event_type": event_type,
        "rollout_id": rollout,
        "session_id": session,
        "payload": payload,
    }


def test_features_follow_the_seed_table_per_rollout_and_session():
    events = [
        ev("dwell", ms=4000),
        ev("dwell", ms=1500),
        ev("click", kind="more-info"),
        ev("click", kind="escalate"),
        ev("click", kind="copy"),
        ev("copy", chars=40),  # the copy button's own copy event is not counted twice
        ev("click", kind="regenerate"),
        ev("click", kind="thumbs-up"),
        ev("scroll", depth=0.4),
        ev("scroll", depth=0.9),
        ev("mouse", moves=30, ms=10_000),
        ev("mouse", moves=10, ms=10_000),
        ev("dwell", rollout="r2", ms=800),
        ev("escalate", rollout="r2"),
        ev("scroll", rollout="r2", depth=85),  # a percentage
        ev("dwell", rollout=None, session="s2", ms=100),
    ]
    per = imp.features_by(events)
    a = per["r1"].values
    assert a["dwell_total_s"] == pytest.approx(5.5)
    assert a["dwell_max_s"] == pytest.approx(4.0)
    assert a["dwell_count"] == 2
    assert a["clicks_total"] == 5
    assert (a["clicks_more_info"], a["escalations"], a["regenerates"], a["clicks_other"]) == (
        1,
        1,
        1,
        1,
    )
    assert a["copies"] == 1
    assert a["scroll_depth"] == pytest.approx(0.9)
    assert a["mouse_per_s"] == pytest.approx(2.0)
    b = per["r2"].values
    assert (b["escalations"], b["scroll_depth"], b["dwell_total_s"]) == (1, 0.85, 0.8)
    sessions = imp.features_by(events, key="session_id")
    assert sessions["s1"].values["dwell_count"] == 3
    assert sessions["s2"].values["dwell_total_s"] == pytest.approx(0.1)
    assert set(per) == {"r1", "r2"}


def test_malformed_payload_values_are_ignored_not_fatal():
    f = imp.features_by(
        [ev("dwell", ms="long"), ev("scroll", depth=None), ev("mouse", moves=float("nan"), ms=5)]
    )
    assert f["r1"].values["dwell_total_s"] == 0 and f["r1"].values["scroll_depth"] == 0
    assert f["r1"].events == 3


def test_fallback_rule_is_the_documented_one():
    def score(*events):
        return imp.rule_score(imp.features_by(list(events))["r1"])

    assert score(ev("dwell", ms=3000)) == pytest.approx(0.5)
    assert score(ev("dwell", ms=3000), ev("copy", chars=5)) == pytest.approx(0.75)
    assert score(ev("dwell", ms=3000), ev("click", kind="regenerate")) == pytest.approx(0.3)
    assert score(ev("dwell", ms=3000), ev("click", kind="escalate")) == pytest.approx(0.2)
    assert score(ev("dwell", ms=9000), ev("scroll", depth=0.95)) == pytest.approx(0.65)
    assert score(ev("dwell", ms=300)) == pytest.approx(0.4)
    many = [ev("click", kind="escalate")] * 5
    assert score(ev("dwell", ms=3000), *many) == pytest.approx(0.0)


def populate(
    fw, n: int, seed: int = 7, satisfied_rate: float = 0.55, workflow: str = "support"
) -> list[tuple[str, bool]]:
    """Simulated traffic: satisfaction drives both the UI signals and the 1-5 rating."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        satisfied = rng.random() < satisfied_rate
        with fw.rollout(workflow, session_id=f"s{i}") as r:
            r.set_output("an answer")
        imp.record_events(
            imp.simulate_events(satisfied, rng, rollout_id=r.id, session_id=f"s{i}"),
            fw.get_recorder(),
        )
        out.append((r.id, satisfied))
    fw.flush()
    for rid, satisfied in out:
        fw.feedback(rid, rng.choice([4, 5, 5]) if satisfied else rng.choice([1, 2, 2, 3]))
    fw.flush()
    return out


@pytest.mark.slow
def test_model_beats_the_rule_on_held_out_data_and_is_calibrated(fw):
    populate(fw, 1000)
    config = FlywheelConfig()
    result = imp.train(fw.get_store(), config, seed=0)
    assert result.model is not None and result.version == 1
    assert result.n_labels == 1000 and 170 < result.n_test < 330
    m, r = result.model_metrics, result.rule_metrics
    assert m["n"] == r["n"] == result.n_test
    assert m["auc"] > r["auc"] + 0.05, (m, r)
    assert m["brier"] < r["brier"] and m["log_loss"] < r["log_loss"]
    # calibrated: in each band of predicted probability the observed rate is close
    data = imp.labelled_set(fw.get_store())
    held = [i for i, rid in enumerate(data.rollout_ids) if imp.held_out(rid)]
    scores = [result.model.score(data.features[i]) for i in held]
    labels = [data.labels[i] for i in held]
    observed = sum(labels) / len(labels)
    tolerance = 3 * (observed * (1 - observed) / len(labels)) ** 0.5 + 0.02  # sampling noise
    assert abs(sum(scores) / len(scores) - observed) < tolerance
    for lo, hi in ((0.0, 0.3), (0.7, 1.0)):
        band = [(s, y) for s, y in zip(scores, labels, strict=True) if lo <= s < hi]
        assert len(band) > 20
        assert abs(sum(s for s, _ in band) / len(band) - sum(y for _, y in band) / len(band)) < 0.12

    # stored as plain JSON (no pickle), versioned, and reloaded with the same scores
    row = fw.get_store().execute("SELECT name, version, payload, metrics FROM model_artifact")
    assert [(x[0], x[1]) for x in row] == [("implicit_satisfaction", 1)]
    payload = json.loads(row[0][2]) if isinstance(row[0][2], str) else row[0][2]
    assert payload["features"] == list(imp.FEATURES) and len(payload["coef"]) == len(imp.FEATURES)
    loaded = imp.load_model(fw.get_store())
    assert loaded.version == 1
    assert [loaded.score(data.features[i]) for i in held[:20]] == pytest.approx(scores[:20])
    assert imp.train(fw.get_store(), config).version == 2

    ev_out = imp.evaluate(fw.get_store(), config)
    assert ev_out["model_version"] == 2 and ev_out["model"]["auc"] > ev_out["rule"]["auc"]


def test_only_explicit_ratings_are_labels(fw):
    with fw.rollout("support") as r:
        pass
    imp.record_events([ev("dwell", rollout=r.id, ms=3000)], fw.get_recorder())
    fw.flush()
    fw.feedback(r.id, key="rating", value=5, source="judge")
    fw.flush()
    assert imp.labels_for(fw.get_store()) == {}
    fw.feedback(r.id, thumbs="down")
    fw.flush()
    assert imp.labels_for(fw.get_store()) == {r.id: 0}
    assert imp.labelled_set(fw.get_store()).rollout_ids == [r.id]


def test_too_few_labels_falls_back_to_the_rule(fw):
    populate(fw, 30)
    config = FlywheelConfig()
    result = imp.train(fw.get_store(), config)
    assert result.model is None and "need 50" in result.reason
    assert imp.load_model(fw.get_store()) is None
    assert imp.Scorer.from_store(fw.get_store(), config).method == "rule"


@pytest.mark.slow
def test_implicit_reward_source_through_the_plugin_manager(fw):
    from flywheel_middleware.loop.rewards import compute_rewards

    ids = populate(fw, 300, seed=3)
    config = FlywheelConfig.model_validate(
        {"rewards": [{"type": "implicit"}], "implicit": {"min_labels": 100}}
    )
    store = fw.get_store()

    rule_run = compute_rewards(store, config, [rid for rid, _ in ids[:50]], write=False)
    feats = imp.rollout_features(store, [rid for rid, _ in ids[:50]])
    for rid, _ in ids[:50]:
        assert rule_run[rid].sources["implicit"] == pytest.approx(imp.rule_score(feats[rid]))

    imp.train(store, config)
    model = imp.load_model(store)
    run = compute_rewards(store, config, [rid for rid, _ in ids])
    for rid, _ in ids[:50]:
        assert run[rid].sources["implicit"] == pytest.approx(model.score(feats[rid]))
    # the reward is written on the rollout and kept as implicit feedback
    rows = store.execute(
        "SELECT count(*) FROM feedback WHERE source = 'implicit' AND key = 'implicit'"
    )
    assert rows[0][0] == 300
    sat = [run[rid].value for rid, s in ids if s]
    unsat = [run[rid].value for rid, s in ids if not s]
    assert sum(sat) / len(sat) > sum(unsat) / len(unsat) + 0.2

    # a rollout without telemetry: no opinion
    with fw.rollout("support") as bare:
        pass
    fw.flush()
    assert (
        compute_rewards(store, config, [bare.id], write=False)[bare.id].sources.get("implicit")
        is None
    )


@pytest.mark.slow
def test_cli_train_and_evaluate_report_auc(fw, tmp_path):
    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    populate(fw, 400, seed=11)
    url = fw.get_store().url
    runner = CliRunner()
    out = runner.invoke(main, ["implicit", "train", "--store", url, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["version"] == 1 and data["model"]["auc"] > data["rule"]["auc"]
    out = runner.invoke(main, ["implicit", "evaluate", "--store", url])
    assert out.exit_code == 0, out.output
    assert "AUC" in out.output and "model v1" in out.output and "fallback rule" in out.output


@pytest.mark.slow
def test_a_workflow_can_have_its_own_model(fw):
    from flywheel_middleware.loop.rewards import compute_rewards

    support = populate(fw, 300, seed=21, workflow="support")
    sales = populate(fw, 30, seed=22, workflow="sales")
    config = FlywheelConfig.model_validate(
        {"rewards": [{"type": "implicit"}], "implicit": {"min_labels": 100}}
    )
    store = fw.get_store()
    result = imp.train(store, config, workflow="support")
    assert result.n_labels == 300 and result.version == 1
    names = [r[0] for r in store.execute("SELECT name FROM model_artifact")]
    assert names == ["implicit_satisfaction:support"]
    assert imp.Scorer.from_store(store, config, "support").method == "model v1 (support)"
    assert imp.Scorer.from_store(store, config, "sales").method == "rule"  # no shared model yet
    assert imp.train(store, config, workflow="sales").model is None  # 30 labels are too few

    run = compute_rewards(store, config, [rid for rid, _ in support[:20] + sales[:20]], write=False)
    model = imp.load_model(store, name="implicit_satisfaction:support")
    feats = imp.rollout_features(store, [rid for rid, _ in support[:20] + sales[:20]])
    for rid, _ in support[:20]:
        assert run[rid].sources["implicit"] == pytest.approx(model.score(feats[rid]))
    for rid, _ in sales[:20]:
        assert run[rid].sources["implicit"] == pytest.approx(imp.rule_score(feats[rid]))
    out = imp.evaluate(store, config, workflow="support")
    assert out["model_version"] == 1 and out["n_labels"] == 300
