"""The default curation policy, right after ``fw.feedback`` (no ``flywheel rewards`` run)."""

from __future__ import annotations

import json

from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.loop.datasets import export, meta_path, val_path

from .helpers import record

QUESTIONS = 12


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def key(task: dict) -> str:
    return " ".join(task["main_query"].casefold().split())


def rated_store(fw) -> dict[str, str]:
    """Each question answered well (5), fairly (4) and badly (1); some asked in other spellings."""
    ids: dict[str, str] = {}
    for i in range(QUESTIONS):
        question = f"What is the price of plan {i}?"
        asked = question if i % 3 else f"  what is the PRICE of plan {i}? "
        ids[f"bad {i}"] = record(fw, question, f"bad answer {i}", rating=1)
        ids[f"good {i}"] = record(fw, asked, f"good answer {i}", rating=5)
        ids[f"fair {i}"] = record(fw, question, f"fair answer {i}", rating=4)
    ids["unrated"] = record(fw, "Do you ship abroad?", "Yes, to 40 countries.")
    assert fw.flush(10)
    return ids


def test_default_policy_right_after_feedback(fw_any, tmp_path) -> None:
    rated_store(fw_any)
    store = fw_any.get_store()

    triplets = export(store, "triplets", "qa", tmp_path / "t.jsonl")
    rows = read(tmp_path / "t.jsonl")
    assert triplets.refreshed == 3 * QUESTIONS  # rewards computed from the feedback
    assert triplets.bad == QUESTIONS and len(rows) == 2 * QUESTIONS + 1
    assert not [r for r in rows if r["response"].startswith("bad")]
    assert all(r["reward"] in (1.0, 0.75) for r in rows if r["prompt"] != "Do you ship abroad?")

    export(store, "sft", "qa", tmp_path / "s.jsonl")
    assert check_file(tmp_path / "s.jsonl", "sft") == []
    answers = [r["messages"][-1]["content"] for r in read(tmp_path / "s.jsonl")]
    assert len(answers) == 2 * QUESTIONS + 1 and not [a for a in answers if "bad" in a]

    tasks = export(store, "tasks", "qa", tmp_path / "k.jsonl", val_fraction=0.4, seed=3)
    train, val = read(tmp_path / "k.jsonl"), read(tmp_path / "k.val.jsonl")
    assert train and val and tasks.count == QUESTIONS + 1  # one task per question
    keys = [key(t) for t in train + val]
    assert len(set(keys)) == len(keys)
    assert not {t["main_query"] for t in train} & {t["main_query"] for t in val}
    for task in train + val:
        if task["main_query"] != "Do you ship abroad?":
            number = task["main_query"].rstrip("? ").rsplit(" ", 1)[-1]
            assert task["metadata"]["answer"] == f"good answer {number}"
            assert task["metadata"]["reward"] == 1.0

    # every answer as its own task: still no question on both sides, each on its side above
    export(
        store, "tasks", "qa", tmp_path / "all.jsonl", val_fraction=0.4, seed=3, per_question=False
    )
    side = {key(t): "train" for t in read(tmp_path / "all.jsonl")}
    for t in read(tmp_path / "all.val.jsonl"):
        assert side.get(key(t)) != "train", f"{t['main_query']!r} is on both sides"
        side[key(t)] = "validation"
    assert side == {key(t): t["metadata"]["split"] for t in train + val}

    prefs = export(store, "preference", "qa", tmp_path / "p.jsonl", preference_format="trl")
    pairs = read(tmp_path / "p.jsonl")
    provenance = read(meta_path(tmp_path / "p.jsonl"))
    assert prefs.count == len(pairs) == len(provenance) == QUESTIONS  # the unrated: no pair
    for pair, meta in zip(pairs, provenance, strict=True):
        number = pair["prompt"][0]["content"].rstrip("? ").rsplit(" ", 1)[-1]
        assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == (
            f"good answer {number}",
            f"bad answer {number}",
        )
        assert meta["chosen_reward"] > meta["rejected_reward"]


def test_new_feedback_makes_a_reward_stale_and_switches_the_best_answer(fw, tmp_path) -> None:
    ids = rated_store(fw)
    store = fw.get_store()
    export(store, "tasks", "qa", tmp_path / "a.jsonl", val_fraction=0)
    assert export(store, "tasks", "qa", tmp_path / "b.jsonl", val_fraction=0).refreshed == 0
    fw.feedback(ids["good 1"], thumbs="down")  # (1.0 + 0.0) / 2 = 0.5 < the fair 0.75
    assert fw.flush(10)
    again = export(store, "tasks", "qa", tmp_path / "c.jsonl", val_fraction=0)
    assert again.refreshed == 1
    [task] = [t for t in read(tmp_path / "c.jsonl") if t["main_query"].endswith("plan 1?")]
    assert task["metadata"]["answer"] == "fair answer 1" and task["metadata"]["reward"] == 0.75


def test_each_part_of_the_policy_switches_off(fw, tmp_path) -> None:
    rated_store(fw)
    store = fw.get_store()
    stored = export(store, "triplets", "qa", tmp_path / "r.jsonl", refresh=False)
    assert stored.refreshed == 0 and all(r["reward"] is None for r in read(tmp_path / "r.jsonl"))
    everything = export(store, "triplets", "qa", tmp_path / "t.jsonl", bad_below=None)
    assert everything.count == 3 * QUESTIONS + 1
    rated = export(store, "triplets", "qa", tmp_path / "o.jsonl", rated_only=True)
    assert rated.count == 2 * QUESTIONS and rated.unrated == 1
    pairs = export(store, "tasks", "qa", tmp_path / "k.jsonl", per_question=False, bad_below=None)
    assert pairs.count == 3 * QUESTIONS + 1
    wide = export(store, "preference", "qa", tmp_path / "p.jsonl", min_margin=1.01)
    assert wide.count == 0


def test_an_empty_validation_split_is_said(fw, tmp_path) -> None:
    """AgentJet refuses an empty file: an export whose questions all fell in train says so."""
    record(fw, "Do you ship abroad?", "Yes, to 40 countries.", rating=5)
    assert fw.flush(10)
    result = export(fw.get_store(), "tasks", "qa", tmp_path / "k.jsonl", val_fraction=0.01)
    assert result.counts == {"train": 1, "validation": 0}
    assert any("k.val.jsonl is empty" in w for w in result.warnings)


def test_a_preference_pair_never_sets_an_answer_against_itself(fw, tmp_path) -> None:
    """The same text rated 5 by one user and 1 by another is no preference; a different
    answer is paired with it instead, and a question with one answer text gets no pair."""
    for rating in (5, 1):
        record(fw, "Can I pay by card?", "Yes, all major cards.", rating=rating)
        record(fw, "Is there a free plan?", "Yes, up to 3 seats.", rating=rating)
    record(fw, "Can I pay by card?", "Only by bank transfer.", rating=3)
    assert fw.flush(10)
    result = export(fw.get_store(), "preference", "qa", tmp_path / "p.jsonl")
    pairs = read(tmp_path / "p.jsonl")
    assert result.count == len(pairs) == 1
    [pair] = pairs
    assert pair["input"]["messages"][0]["content"] == "Can I pay by card?"
    assert pair["preferred_output"] != pair["non_preferred_output"]
    assert {pair["preferred_output"][0]["content"], pair["non_preferred_output"][0]["content"]} == {
        "Yes, all major cards.",
        "Only by bank transfer.",
    }


def test_the_task_answer_is_the_best_rated_even_when_that_answer_was_given_before(
    fw, tmp_path
) -> None:
    """The same answer given twice (rated 3, later 5) and another once (rated 4): the task's
    answer is the repeated one, whose best rating is the best."""
    record(fw, "How do I cancel?", "Settings > Plan > Cancel.", rating=3)
    record(fw, "How do I cancel?", "Write to support.", rating=4)
    record(fw, "How do I cancel?", "Settings > Plan > Cancel.", rating=5)
    assert fw.flush(10)
    export(fw.get_store(), "tasks", "qa", tmp_path / "t.jsonl", val_fraction=0)
    [task] = read(tmp_path / "t.jsonl")
    assert task["metadata"]["answer"] == "Settings > Plan > Cancel."
    assert task["metadata"]["reward"] == 1.0


def test_one_question_in_nfc_and_nfd_is_one_task(fw, tmp_path) -> None:
    """'café' typed precomposed (NFC) and as e + combining accent (NFD, macOS input) is one
    question: one task, on one side of the split."""
    for spelling in ("Where is the caf\u00e9?", "Where is the cafe\u0301?"):
        record(fw, spelling, f"Answer to {spelling!r}.", rating=5)
    assert fw.flush(10)
    export(fw.get_store(), "tasks", "qa", tmp_path / "t.jsonl", val_fraction=0.5, seed=1)
    tasks = read(tmp_path / "t.jsonl") + read(val_path(tmp_path / "t.jsonl"))
    assert len(tasks) == 1, [t["main_query"] for t in tasks]
