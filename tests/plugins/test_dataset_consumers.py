"""Exported files, from a store filled through the public API, as their consumers read them:
AgentJet's tasks, Agent Lightning's triplets (their rules), and TRL's preference pairs loaded
by Hugging Face ``datasets``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.loop.datasets import export, val_path

from .helpers import record

QUESTIONS = 8


@pytest.fixture
def rated(fw):
    """Each question answered well (5) and badly (1), plus one unrated rollout and one whose
    question came as LangGraph state with tuple messages; rated through ``fw.feedback``."""
    for i in range(QUESTIONS):
        record(
            fw, f"How do I reset password {i}?", f"Open Settings → Security → Reset {i}.", rating=5
        )
        record(fw, f"How do I reset password {i}?", f"Invoices are under Billing {i}.", rating=1)
    record(fw, "Do you ship abroad?", "Yes, to 40 countries.")
    record(fw, {"messages": [("user", "Can I pay by card?")]}, "Yes, every major card.", rating=4)
    assert fw.flush(10)
    return fw.get_store()


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_exported_tasks_and_triplets_follow_their_consumers_rules(rated, tmp_path):
    tasks = tmp_path / "support.tasks.jsonl"
    export(rated, "tasks", "qa", tasks, val_fraction=0.3, seed=1)
    train, val = read(tasks), read(val_path(tasks))
    assert train and val and len(train) + len(val) == QUESTIONS + 2  # one task per question
    assert check_file(tasks, "tasks") == [] and check_file(val_path(tasks), "tasks") == []
    assert "Can I pay by card?" in {t["main_query"] for t in train + val}

    triplets = tmp_path / "support.triplets.jsonl"
    export(rated, "triplets", "qa", triplets)
    rows = read(triplets)
    assert len(rows) == QUESTIONS + 2 and check_file(triplets, "triplets") == []
    assert not [r for r in rows if r["response"].startswith("Invoices")]  # rated bad: left out
    for kind, path in (("tasks", tasks), ("triplets", triplets)):
        out = CliRunner().invoke(main, ["export", kind, "--check", str(path)])
        assert out.exit_code == 0, out.output


def test_a_hand_edited_tasks_file_is_reported_by_line(rated, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    export(rated, "tasks", "qa", tasks, val_fraction=0)
    rows = read(tasks)
    rows[1]["main_query"] = ""
    rows[2]["task_id"] = rows[0]["task_id"]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(main, ["export", "tasks", "--check", str(tasks)])
    assert out.exit_code == 1
    text = " ".join(out.output.split())
    assert "line 2: 'main_query' must be a non-empty string" in text
    assert f"line 3: task_id {rows[0]['task_id']!r} is already the id of line 1" in text


@pytest.mark.slow  # importing datasets (pandas, pyarrow) takes a few seconds
def test_trl_preference_pairs_load_into_trls_columns(rated, tmp_path, monkeypatch):
    """TRL's conversational preference format: prompt, chosen and rejected, each a list of
    {role, content} messages, as ``datasets.load_dataset("json", ...)`` reads the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")

    path = tmp_path / "support.trl.jsonl"
    result = export(rated, "preference", "qa", path, preference_format="trl")
    assert result.count == QUESTIONS and check_file(path, "trl") == []
    loaded = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert sorted(loaded.column_names) == ["chosen", "prompt", "rejected"]
    assert loaded.num_rows == QUESTIONS
    for row in loaded:
        for column, roles in (("prompt", ["user"]), ("chosen", ["assistant"])):
            assert [m["role"] for m in row[column]] == roles
        for column in ("prompt", "chosen", "rejected"):
            assert isinstance(row[column], list)
            for message in row[column]:
                assert set(message) == {"role", "content"}
                assert isinstance(message["content"], str) and message["content"].strip()
        number = row["prompt"][0]["content"].rstrip("?").rsplit(" ", 1)[-1]
        assert row["chosen"][0]["content"] == f"Open Settings → Security → Reset {number}."
        assert row["rejected"][0]["content"] == f"Invoices are under Billing {number}."
