"""Every export format written from a real store, read back and checked field by field."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from flywheel_middleware.config import parse_config
from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.loop.datasets import (
    ExportError,
    export,
    meta_path,
    parse_since,
    qa_hash,
    split_of,
)
from flywheel_middleware.loop.rewards import compute_rewards

from .helpers import record


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_with_provenance(path) -> list[dict]:
    """Each row merged with its line of the provenance sidecar."""
    rows, meta = read(path), read(meta_path(path))
    assert len(rows) == len(meta)
    return [{**row, **more} for row, more in zip(rows, meta, strict=True)]


@pytest.fixture
def populated(fw_any):
    ids = {
        "good": record(fw_any, "What is 2+2?", "4", rating=5, version=1),
        "bad": record(fw_any, "What is 2+2?", "5", rating=1, version=2),
        "mid": record(fw_any, "What is 2+2?", "four", rating=3, version=2),
        "chat": record(
            fw_any,
            {"question": "Capital of France?"},
            {"answer": "Paris"},
            rating=4,
            version=1,
            llm_messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
        ),
        "unrated": record(fw_any, "Hi", "Hello!", version=1),
        "failed": record(fw_any, "Crash?", None, fail=True),
        "other": record(fw_any, "What is 2+2?", "4", rating=5, workflow="other"),
    }
    fw_any.flush()
    compute_rewards(fw_any.get_store(), parse_config(""))
    return fw_any, ids


def test_triplets(populated, tmp_path) -> None:
    fw, ids = populated
    result = export(fw.get_store(), "triplets", "qa", tmp_path / "t.jsonl", bad_below=None)
    rows = read(tmp_path / "t.jsonl")
    assert result.count == len(rows) == 5  # the failed rollout and the other workflow are out
    by_id = {r["metadata"]["rollout_id"]: r for r in rows}
    assert set(by_id) == {ids[k] for k in ("good", "bad", "mid", "chat", "unrated")}
    assert by_id[ids["good"]] == {
        "prompt": "What is 2+2?",
        "response": "4",
        "reward": 1.0,
        "metadata": {"rollout_id": ids["good"], "config_version_id": 1, "workflow": "qa"},
    }
    bad = by_id[ids["bad"]]
    assert bad["reward"] == 0.0 and bad["metadata"]["config_version_id"] == 2
    assert by_id[ids["chat"]]["prompt"] == "Capital of France?"
    assert by_id[ids["chat"]]["response"] == "Paris"
    assert by_id[ids["unrated"]]["reward"] is None
    # by default the bad-rated answer (reward 0 < 0.5) is left out, the unrated one kept
    default = export(fw.get_store(), "triplets", "qa", tmp_path / "d.jsonl")
    assert {r["metadata"]["rollout_id"] for r in read(tmp_path / "d.jsonl")} == {
        ids[k] for k in ("good", "mid", "chat", "unrated")
    }
    assert (default.bad, default.unrated) == (1, 0)
    only_rewarded = export(fw.get_store(), "triplets", "qa", tmp_path / "r.jsonl", min_reward=0.5)
    assert {r["metadata"]["rollout_id"] for r in read(tmp_path / "r.jsonl")} == {
        ids["good"],
        ids["mid"],
        ids["chat"],
    }
    assert (only_rewarded.bad, only_rewarded.unrated) == (1, 1)


def test_sft_uses_llm_span_messages(populated, tmp_path) -> None:
    fw, ids = populated
    export(fw.get_store(), "sft", "qa", tmp_path / "sft.jsonl")
    assert check_file(tmp_path / "sft.jsonl", "sft") == []  # what OpenAI's upload accepts
    rows = {r["rollout_id"]: r for r in read_with_provenance(tmp_path / "sft.jsonl")}
    assert rows[ids["chat"]]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    assert rows[ids["chat"]]["config_version_id"] == 1
    assert rows[ids["good"]]["messages"] == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert rows[ids["good"]]["reward"] == 1.0


def test_preference_pairs(populated, tmp_path) -> None:
    fw, ids = populated
    result = export(fw.get_store(), "preference", "qa", tmp_path / "p.jsonl")
    assert check_file(tmp_path / "p.jsonl", "preference") == []
    rows = read_with_provenance(tmp_path / "p.jsonl")
    assert result.count == 1 and len(rows) == 1
    [pair] = rows
    assert pair["input"] == {"messages": [{"role": "user", "content": "What is 2+2?"}]}
    assert pair["preferred_output"] == [{"role": "assistant", "content": "4"}]
    assert pair["non_preferred_output"] == [{"role": "assistant", "content": "5"}]
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (1.0, 0.0)
    assert pair["chosen_rollout_id"] == ids["good"]
    assert pair["rejected_rollout_id"] == ids["bad"]
    assert (pair["chosen_config_version_id"], pair["rejected_config_version_id"]) == (1, 2)
    trl = tmp_path / "trl.jsonl"
    export(fw.get_store(), "preference", "qa", trl, preference_format="trl")
    assert check_file(trl, "trl") == []
    [row] = read(trl)
    assert (row["prompt"][0]["content"], row["chosen"][0]["content"]) == ("What is 2+2?", "4")
    none = export(fw.get_store(), "preference", "qa", tmp_path / "p2.jsonl", min_margin=1.5)
    assert none.count == 0 and read(tmp_path / "p2.jsonl") == []


def test_tasks_dedupe_and_deterministic_split(fw_any, tmp_path) -> None:
    ids = [record(fw_any, f"question {i % 30}", f"answer {i % 30}") for i in range(60)]
    fw_any.flush()
    out = tmp_path / "tasks.jsonl"
    result = export(
        fw_any.get_store(), "tasks", "qa", out, seed=7, val_fraction=0.3, env_type="qa_env"
    )
    train, val = read(out), read(tmp_path / "tasks.val.jsonl")
    assert result.count == 30 and result.duplicates == 30
    assert result.counts == {"train": len(train), "validation": len(val)}
    assert 0 < len(val) < 30
    rows = train + val
    assert len({r["metadata"]["qa_hash"] for r in rows}) == 30
    first_ids = set(ids[:30])  # the first occurrence (oldest) of each pair is kept
    for r in rows:
        assert set(r) == {"main_query", "init_messages", "task_id", "env_type", "metadata"}
        q, a = r["main_query"], r["metadata"]["answer"]
        assert r["metadata"]["qa_hash"] == qa_hash(q, a)
        assert r["init_messages"] == [] and r["env_type"] == "qa_env"
        assert r["task_id"] == r["metadata"]["rollout_id"] in first_ids
        assert q.replace("question", "answer") == a
    assert all(r["metadata"]["split"] == "validation" for r in val)
    assert all(r["metadata"]["split"] == "train" for r in train)
    # same seed: the same split, byte for byte; another seed: another split
    again = export(
        fw_any.get_store(),
        "tasks",
        "qa",
        tmp_path / "b.jsonl",
        seed=7,
        val_fraction=0.3,
        env_type="qa_env",
    )
    assert (tmp_path / "b.jsonl").read_bytes() == out.read_bytes()
    assert again.counts == result.counts
    other = export(
        fw_any.get_store(), "tasks", "qa", tmp_path / "c.jsonl", seed=8, val_fraction=0.3
    )
    assert {r["task_id"] for r in read(tmp_path / "c.val.jsonl")} != {r["task_id"] for r in val}
    assert other.count == 30


def test_export_with_filters_and_a_failing_filter(populated, tmp_path) -> None:
    fw, ids = populated
    cfg = parse_config(
        "plugins: ['tests.plugins.broken_plugin']\n"
        "filters:\n"
        "  - type: dedupe\n    params: {fields: [input]}\n"
        "  - type: json_schema\n    enabled: false\n    params: {schema: {type: object}}\n"
        "  - type: always_fails\n"
    )
    result = export(
        fw.get_store(), "triplets", "qa", tmp_path / "f.jsonl", config=cfg, filters=True
    )
    rows = read(tmp_path / "f.jsonl")
    # the bad-rated answer is out before the filters; dedupe on input keeps the first
    # "What is 2+2?" of the rest; the broken filter is reported, not fatal
    assert {r["metadata"]["rollout_id"] for r in rows} == {
        ids["good"],
        ids["chat"],
        ids["unrated"],
    }
    assert result.dropped == {"dedupe": 1} and result.bad == 1
    assert len(result.failures) == 1
    assert "always_fails" in result.failures[0] and "filter exploded" in result.failures[0]


def test_bad_arguments() -> None:
    with pytest.raises(ExportError, match="unknown export kind 'csv'.*triplets"):
        export(None, "csv", "qa", "x.jsonl")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="--since 'yesterday'"):
        parse_since("yesterday")
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("2026-01-01") == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert split_of("abc", 1, 0.0) == "train"


def test_sft_and_triplets_from_a_real_langchain_chain(fw, tmp_path) -> None:
    """The LangChain adapter's llm span (system + user messages) becomes the SFT conversation."""
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    chain = prompt | FakeListChatModel(responses=["Paris"])
    handler = FlywheelCallbackHandler(workflow="lcqa")
    chain.invoke({"question": "Capital of France?"}, config={"callbacks": [handler]})
    fw.flush()
    export(fw.get_store(), "sft", "lcqa", tmp_path / "sft.jsonl")
    assert check_file(tmp_path / "sft.jsonl", "sft") == []
    [row] = read_with_provenance(tmp_path / "sft.jsonl")
    assert row["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    export(fw.get_store(), "triplets", "lcqa", tmp_path / "t.jsonl")
    [t] = read(tmp_path / "t.jsonl")
    assert (t["prompt"], t["response"], t["metadata"]["rollout_id"]) == (
        "Capital of France?",
        "Paris",
        row["rollout_id"],
    )


def test_export_through_the_rubric_judge_remembers_verdicts(fw_any, tmp_path) -> None:
    from sqlmodel import select

    from flywheel_middleware.store.models import Feedback
    from flywheel_middleware.testing.openai_server import OpenAIServer

    good = record(fw_any, "Is the sky blue?", "Yes, on a clear day.")
    record(fw_any, "Is fire cold?", "Yes.")
    record(fw_any, "What is 1+1?", "banana")
    fw_any.flush()

    def respond(request) -> str:
        answer = request.body["messages"][-1]["content"].rsplit("\n", 1)[-1]
        return {"Yes, on a clear day.": "GOOD: correct", "Yes.": "BAD: wrong"}.get(answer, "hmm")

    with OpenAIServer() as server:
        server.set_responder(respond)

        def config(rubric: str):
            return parse_config(
                f"filters:\n  - type: llm_rubric\n    params: {{base_url: '{server.base_url}', "
                f"model: judge, retry_wait: 0, custom_rubrics: '{rubric}'}}\n"
            )

        store = fw_any.get_store()
        result = export(
            store, "triplets", "qa", tmp_path / "a.jsonl", config=config("r1"), filters=True
        )
        assert [r["metadata"]["rollout_id"] for r in read(tmp_path / "a.jsonl")] == [good]
        assert result.dropped == {"llm_rubric": 2} and len(server.requests) == 3
        # GOOD and BAD verdicts are stored as judge feedback and reused; the garbage one is asked again
        export(store, "sft", "qa", tmp_path / "b.jsonl", config=config("r1"), filters=True)
        assert len(server.requests) == 4
        assert check_file(tmp_path / "b.jsonl", "sft") == []
        # other rubrics: other verdicts, judged afresh
        export(store, "tasks", "qa", tmp_path / "c.jsonl", config=config("r2"), filters=True)
        assert len(server.requests) == 7
    with store.session() as s:
        stored = s.exec(select(Feedback).where(Feedback.source == "judge")).all()
    assert sorted((f.value, f.comment) for f in stored) == [
        (0.0, "wrong"),
        (0.0, "wrong"),
        (1.0, "correct"),
        (1.0, "correct"),
    ]
