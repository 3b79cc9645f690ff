"""The controller curates only what changed, and its files equal a full export."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from flywheel_middleware.config import parse_config
from flywheel_middleware.loop.curation import curate_datasets
from flywheel_middleware.loop.datasets import KINDS, export, val_path

from .helpers import record


def rows(path) -> list[str]:
    """A file's rows, order aside (days are joined in day order, a full export by time)."""
    return sorted(json.dumps(json.loads(line), sort_keys=True) for line in path.open())


def full_export(store, folder) -> dict[str, list[str]]:
    out = {}
    for kind in KINDS:
        export(store, kind, "qa", folder / f"qa.{kind}.jsonl")
        out[kind] = rows(folder / f"qa.{kind}.jsonl")
    out["tasks.val"] = rows(val_path(folder / "qa.tasks.jsonl"))
    return out


def curated(folder) -> dict[str, list[str]]:
    out = {kind: rows(folder / f"qa.{kind}.jsonl") for kind in KINDS}
    out["tasks.val"] = rows(val_path(folder / "qa.tasks.jsonl"))
    return out


def move_to(store, ids: list[str], when: datetime) -> None:
    """Set up history: these rollouts started on an earlier day."""
    with store.engine.begin() as conn:
        for rid in ids:
            conn.execute(
                text("UPDATE rollout SET started_at = :t WHERE id = :id"), {"t": when, "id": rid}
            )


def test_a_cycle_reads_only_the_days_that_changed(fw_any, tmp_path) -> None:
    config = parse_config("")
    store = fw_any.get_store()
    old = []
    for i in range(6):
        old.append(record(fw_any, f"How do I reset plan {i}?", f"Open settings {i}.", rating=5))
        old.append(record(fw_any, f"How do I reset plan {i}?", f"Made up {i}.", rating=1))
    assert fw_any.flush(10)
    move_to(store, old, datetime.now(timezone.utc) - timedelta(days=6))
    out = tmp_path / "datasets"

    first = curate_datasets(store, config, "qa", out)
    assert first.days_read == 1
    assert curated(out) == full_export(store, tmp_path / "full1")
    assert len(rows(out / "qa.sft.jsonl")) == 6 and len(rows(out / "qa.preference.jsonl")) == 6

    again = curate_datasets(store, config, "qa", out)  # nothing new: nothing read
    assert again.days_read == 0 and curated(out) == full_export(store, tmp_path / "full2")

    # today: a new question, and a new answer to an old one
    record(fw_any, "Do you ship abroad?", "Yes, to 40 countries.", rating=5)
    record(fw_any, "How do I reset plan 0?", "Ask support.", rating=4)
    assert fw_any.flush(10)
    today = curate_datasets(store, config, "qa", out)
    assert today.days_read == 1  # today's only; the old day is not read again
    assert curated(out) == full_export(store, tmp_path / "full3")
    tasks = {json.loads(t)["main_query"]: json.loads(t) for t in rows(out / "qa.tasks.jsonl")}
    tasks.update({json.loads(t)["main_query"]: json.loads(t) for t in curated(out)["tasks.val"]})
    assert len(tasks) == 7  # one per question across days
    assert tasks["How do I reset plan 0?"]["metadata"]["answer"] == "Open settings 0."

    # late feedback on an old, good answer turns it bad: its day is read again
    fw_any.feedback(old[2], rating=1)
    fw_any.feedback(old[2], rating=1)  # with the first 5, a mean reward of 1/3
    assert fw_any.flush(10)
    late = curate_datasets(store, config, "qa", out)
    assert late.days_read == 1
    assert curated(out) == full_export(store, tmp_path / "full4")
    assert "Open settings 1." not in (out / "qa.sft.jsonl").read_text()


def test_deleted_parts_or_files_are_rebuilt(fw_any, tmp_path) -> None:
    config = parse_config("")
    store = fw_any.get_store()
    for i in range(3):
        record(fw_any, f"Where is invoice {i}?", f"Under billing {i}.", rating=5)
    assert fw_any.flush(10)
    out = tmp_path / "datasets"
    curate_datasets(store, config, "qa", out)
    (out / "qa.tasks.jsonl").unlink()
    rebuilt = curate_datasets(store, config, "qa", out)
    assert rebuilt.days_read == 0 and (out / "qa.tasks.jsonl").exists()
    for part in (out / ".parts" / "qa").iterdir():
        part.unlink()
    (out / ".parts" / "qa").rmdir()
    again = curate_datasets(store, config, "qa", out)
    assert again.days_read == 1 and curated(out) == full_export(store, tmp_path / "full")
