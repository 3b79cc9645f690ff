"""Reward sources and their weighted combination, written back to the store (SQLite and PG)."""

from __future__ import annotations

import pytest
from sqlmodel import select

from flywheel_middleware.config import parse_config
from flywheel_middleware.errors import ConfigError, PluginError
from flywheel_middleware.loop.rewards import combine, compute_rewards
from flywheel_middleware.store.models import Feedback, Rollout

from .helpers import record, sample


def rules_yaml(extra: str = "") -> str:
    return f"""
rewards:
  - type: explicit_rating
    weight: 2
  - type: rule
    name: long_enough
    params: {{expression: 'status == "succeeded" and len(output_text) >= 10'}}
  - type: business_event
    params: {{keys: {{resolved: positive, refunded: negative}}}}
{extra}"""


def test_combination_written_back(fw_any) -> None:
    a = record(fw_any, "q1", "a long enough answer", rating=5)  # explicit 1.0, rule 1.0
    b = record(fw_any, "q2", "short", rating=1, business={"refunded": 1.0})  # 0, 0, 0
    c = record(fw_any, "q3", "another long answer", business={"resolved": 1.0})  # -, 1, 1
    d = record(fw_any, "q4", "x", thumbs="up")  # explicit 1.0 (thumbs), rule 0.0
    e = record(fw_any, "q5", None, fail=True)  # rule 0 only
    fw_any.flush()
    config = parse_config(rules_yaml(), source="flywheel.yaml")
    store = fw_any.get_store()
    run = compute_rewards(store, config, workflow="qa")
    assert run.failures == []
    assert run[a].value == pytest.approx(1.0)
    assert run[a].sources == {"explicit_rating": 1.0, "long_enough": 1.0, "business_event": None}
    assert run[b].value == pytest.approx(0.0)
    assert run[c].value == pytest.approx(1.0) and run[c].contributors == [
        "long_enough",
        "business_event",
    ]
    assert run[d].value == pytest.approx(2 / 3)  # (2*1 + 1*0) / 3
    assert run[e].value == 0.0
    with store.session() as s:
        rows = {r.id: r for r in s.exec(select(Rollout))}
        assert rows[d].reward == pytest.approx(2 / 3)
        assert rows[d].metadata_["reward"]["sources"]["long_enough"] == 0.0
        assert rows[d].metadata_["reward"]["weights"]["explicit_rating"] == 2
        rule_fb = s.exec(select(Feedback).where(Feedback.source == "rule")).all()
    assert {(f.rollout_id, f.key, f.value) for f in rule_fb} == {
        (a, "long_enough", 1.0),
        (b, "long_enough", 0.0),
        (c, "long_enough", 1.0),
        (d, "long_enough", 0.0),
        (e, "long_enough", 0.0),
    }
    # recomputing replaces, never duplicates, the generated feedback
    compute_rewards(store, config, rollout_ids=[a, b])
    with store.session() as s:
        assert len(s.exec(select(Feedback).where(Feedback.source == "rule")).all()) == 5


def test_failing_source_is_contained(fw_any) -> None:
    a = record(fw_any, "q1", "long answer here", rating=4)
    fw_any.flush()
    config = parse_config(
        rules_yaml(
            "  - type: rule\n    name: broken\n"
            "    params: {callable: 'tests.plugins.test_rewards:_explode'}\n"
        )
    )
    run = compute_rewards(fw_any.get_store(), config)
    assert len(run.failures) == 1 and "broken" in run.failures[0] and "kaboom" in run.failures[0]
    assert run[a].value == pytest.approx((2 * 0.75 + 1.0) / 3)
    assert "broken" not in run[a].sources


def _explode(sample):
    raise RuntimeError("kaboom")


def test_default_is_explicit_rating(fw) -> None:
    a = record(fw, "q", "a", rating=3)
    b = record(fw, "q", "a")
    fw.flush()
    run = compute_rewards(fw.get_store(), parse_config(""))
    assert run[a].value == 0.5 and run[b].value is None


def test_safe_expression_rejects_code() -> None:
    from flywheel_middleware.plugins.rewards import EXPRESSION_NAMES, SafeExpression

    for bad, why in [
        ("__import__('os').system('true')", "only these functions"),
        ("output.__class__", "Attribute"),
        ("(lambda: 1)()", "only these functions"),
        ("open('/etc/passwd')", "only these functions"),
        ("secret_name > 1", "unknown name"),
    ]:
        with pytest.raises(ConfigError, match=why):
            SafeExpression(bad, EXPRESSION_NAMES)
    expr = SafeExpression(
        'any(s["kind"] == "tool" for s in spans) and regex("\\\\d+", output_text)',
        EXPRESSION_NAMES,
    )
    assert expr({"spans": [{"kind": "tool"}], "output_text": "order 42"}) is True
    assert expr({"spans": [{"kind": "llm"}], "output_text": "order 42"}) is False
    with pytest.raises(ConfigError, match="no repetition"):
        SafeExpression('len("a" * 1000000000) > 0', EXPRESSION_NAMES)({})
    missing = SafeExpression('output["answer"] == "x"', EXPRESSION_NAMES)
    assert missing({"output": {}}) is False  # a missing key is no value, not a crash


def test_rule_params_errors_name_the_key() -> None:
    from flywheel_middleware.plugin_system.manager import plugin_manager

    cfg = parse_config(
        "rewards:\n  - type: rule\n    params: {expression: 'x', callable: 'a:b'}\n",
        source="fw.yaml",
    )
    with pytest.raises(ConfigError, match=r"fw.yaml, line 3: rewards\[0\]\.params: .*exactly one"):
        plugin_manager(cfg).build_all("reward", cfg)
    cfg = parse_config("rewards:\n  - type: thumbs_magic\n", source="fw.yaml")
    with pytest.raises(PluginError, match="known reward types: .*explicit_rating.*rule"):
        plugin_manager(cfg).build_all("reward", cfg)


def test_llm_judge_scores_and_reuses_stored(fw) -> None:
    from flywheel_middleware.testing.openai_server import OpenAIServer

    a = record(fw, "what is 2+2?", "4")
    b = record(fw, "capital of France?", "Berlin")
    c = record(fw, "hello?", "hi")
    fw.flush()
    answers = {"4": '{"score": 9, "reason": "right"}', "Berlin": "score: 1", "hi": "no idea"}

    def respond(req):
        return answers[req.body["messages"][-1]["content"].rsplit("\n", 1)[-1]]

    with OpenAIServer() as server:
        server.set_responder(respond)
        cfg = parse_config(
            f"rewards:\n  - type: llm_judge\n    params: {{base_url: '{server.base_url}', "
            "model: judge, retry_wait: 0}\n"
        )
        run = compute_rewards(fw.get_store(), cfg)
        assert run[a].value == pytest.approx(8 / 9)
        assert run[b].value == 0.0
        assert run[c].value is None  # malformed score: no opinion
        n = len(server.requests)
        assert n == 3
        run = compute_rewards(fw.get_store(), cfg)  # stored judge scores are reused
        assert len(server.requests) == n + 1  # only the unscored one is asked again
    with fw.get_store().session() as s:
        judged = s.exec(select(Feedback).where(Feedback.source == "judge")).all()
    assert {(f.rollout_id, round(f.value, 6)) for f in judged} == {(a, round(8 / 9, 6)), (b, 0.0)}


def test_combine_and_explicit_mapping() -> None:
    from datetime import datetime, timezone

    from flywheel_middleware.plugins.rewards import ExplicitRating

    assert combine({"a": 1.0, "b": None, "c": 0.0}, {"a": 3, "c": 1}) == 0.75
    assert combine({"a": None}, {}) is None
    now = datetime.now(timezone.utc)
    s = sample("r", "q", "a")
    s.feedback = [
        Feedback(rollout_id="r", source="explicit", key="rating", value=v, created_at=now)
        for v in (1, 2, 3, 4, 5)
    ]
    assert ExplicitRating().score([s]) == [0.5]
    s.feedback = [Feedback(rollout_id="r", key="thumbs", value=0.0, created_at=now)]
    assert ExplicitRating().score([s]) == [0.0]
