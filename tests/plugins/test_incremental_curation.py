"""The controller curates only what changed, and its files equal a full export."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import text

from flywheel_middleware.config import parse_config
from flywheel_middleware.loop.curation import curate_datasets
from flywheel_middleware.loop.datasets import KINDS, export, val_path

from .helpers import record


def rows(path) -> list[str]:
    """A file's rows, order aside (days are joined in day order, a full export by time)."""
    return sorted(json.dumps(json.loads(line), sort_keys=True) for line in path.open())


def full_export(store, folder, workflow="qa", **kw) -> dict[str, list[str]]:
    out = {}
    for kind in KINDS:
        export(store, kind, workflow, folder / f"{workflow}.{kind}.jsonl", **kw)
        out[kind] = rows(folder / f"{workflow}.{kind}.jsonl")
    out["tasks.val"] = rows(val_path(folder / f"{workflow}.tasks.jsonl"))
    return out


def curated(folder, base="qa") -> dict[str, list[str]]:
    out = {kind: rows(folder / f"{base}.{kind}.jsonl") for kind in KINDS}
    out["tasks.val"] = rows(val_path(folder / f"{base}.tasks.jsonl"))
    return out


def move_to(store, ids, when) -> None:
    """Set up history: these rollouts started at ``when`` (stored as the recorder stores UTC)."""
    naive = when.astimezone(timezone.utc).replace(tzinfo=None)
    with store.engine.begin() as conn:
        for rid in ids:
            conn.execute(
                text("UPDATE rollout SET started_at = :t WHERE id = :id"), {"t": naive, "id": rid}
            )
            conn.execute(  # and its feedback was given then
                text("UPDATE feedback SET created_at = :t WHERE rollout_id = :id"),
                {"t": naive, "id": rid},
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


def test_a_rollout_stamped_in_the_future_does_not_hide_todays(fw, tmp_path) -> None:
    """A rollout stamped 5 days ahead (a client with a skewed clock) must not move the
    look-back window into the future, past today's new rollouts."""
    config = parse_config("")
    store = fw.get_store()
    skewed = record(fw, "Clock skew question?", "Skewed answer.")
    record(fw, "First question?", "First answer.")
    assert fw.flush(10)
    move_to(store, [skewed], datetime.now(timezone.utc) + timedelta(days=5))
    out = tmp_path / "datasets"
    curate_datasets(store, config, "qa", out)
    assert curated(out) == full_export(store, tmp_path / "full1")

    record(fw, "A new question today?", "A new answer today.")  # not rated (yet)
    assert fw.flush(10)
    curate_datasets(store, config, "qa", out)
    assert "A new answer today." in (out / "qa.sft.jsonl").read_text()


def test_a_deleted_old_part_is_rebuilt(fw, tmp_path) -> None:
    """One old day's part removed (disk clean-up, a partial copy): the next cycle rebuilds
    that day."""
    config = parse_config("")
    store = fw.get_store()
    old = record(fw, "Old question?", "Old answer.", rating=5)
    assert fw.flush(10)
    old_day = datetime.now(timezone.utc) - timedelta(days=6)
    move_to(store, [old], old_day)
    record(fw, "Today's question?", "Today's answer.", rating=5)
    assert fw.flush(10)
    out = tmp_path / "datasets"
    curate_datasets(store, config, "qa", out)
    (out / ".parts" / "qa" / f"{old_day.date().isoformat()}.sft.jsonl").unlink()
    record(fw, "New question?", "New answer.")
    assert fw.flush(10)
    curate_datasets(store, config, "qa", out)
    assert curated(out) == full_export(store, tmp_path / "full")


def test_workflows_a_slash_b_and_a_underscore_b_keep_their_own_files(fw, tmp_path) -> None:
    """Two workflows whose names differ by '/' vs '_' get their own parts and files."""
    config = parse_config("")
    store = fw.get_store()
    record(fw, "Question of support/qa?", "Answer of support/qa.", workflow="support/qa", rating=5)
    record(fw, "Question of support_qa?", "Answer of support_qa.", workflow="support_qa", rating=5)
    assert fw.flush(10)
    out = tmp_path / "datasets"
    curate_datasets(store, config, "support/qa", out)
    curate_datasets(store, config, "support_qa", out)
    files = list(out.glob("*.sft.jsonl"))
    texts = "".join(f.read_text() for f in files)
    assert "Answer of support/qa." in texts and "Answer of support_qa." in texts


def test_a_studio_history_imported_after_the_first_cycle_reaches_the_datasets(fw, tmp_path) -> None:
    """A Studio history imported after the first cycle starts long before the look-back:
    the import makes the next cycle read every day, so it reaches the datasets."""
    from flywheel_middleware.importers.agentscope_studio import import_studio
    from tests.adapters.test_agentscope_studio import make_new_db

    config = parse_config("")
    store = fw.get_store()
    record(fw, "Live question?", "Live answer.", workflow="support", rating=5)
    assert fw.flush(10)
    out = tmp_path / "datasets"
    curate_datasets(store, config, "support", out)
    import_studio(store, make_new_db(tmp_path / "studio.sqlite"), "support")
    record(fw, "Next live question?", "Next live answer.", workflow="support", rating=5)
    assert fw.flush(10)
    curate_datasets(store, config, "support", out)
    full = full_export(store, tmp_path / "full", workflow="support")
    assert "Order 42 ships today." in "".join(full["triplets"])
    assert curated(out, "support") == full


def test_failover_hosts_with_their_own_dataset_dir_keep_their_files_current(fw, tmp_path) -> None:
    """Two hosts taking turns at the cycle (docs/deploy.md), each with its own dataset folder:
    each folder keeps its own watermark, so neither keeps an answer since rated bad."""
    config = parse_config("")
    store = fw.get_store()
    rid = record(fw, "How do I delete my account?", "Invoices are under Billing.", rating=4)
    assert fw.flush(10)
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    curate_datasets(store, config, "qa", host_a)
    assert "Invoices are under Billing." in (host_a / "qa.sft.jsonl").read_text()
    fw.feedback(rid, rating=1)
    fw.feedback(rid, rating=1)  # mean 2 of 5: reward 0.25, bad
    assert fw.flush(10)
    curate_datasets(store, config, "qa", host_b)  # B's turn
    assert "Invoices are under Billing." not in (host_b / "qa.sft.jsonl").read_text()
    record(fw, "Where are invoices?", "Under Billing.", rating=5)
    assert fw.flush(10)
    curate_datasets(store, config, "qa", host_b)  # B again
    curate_datasets(store, config, "qa", host_a)  # A's turn
    assert curated(host_a) == full_export(store, tmp_path / "full")


def test_a_long_non_ascii_workflow_name_is_curated(fw, tmp_path) -> None:
    """A 90-character CJK workflow name (270 bytes) is shortened for the file system."""
    workflow = "客服" * 45
    record(fw, "Where is my invoice?", "Under Billing.", workflow=workflow, rating=5)
    assert fw.flush(10)
    result = curate_datasets(fw.get_store(), parse_config(""), workflow, tmp_path / "d")
    assert any("Under Billing." in Path(f).read_text() for f in result.files)


def test_flywheel_rewards_with_new_sources_reaches_old_days(fw, sqlite_url, tmp_path) -> None:
    """`flywheel rewards` recomputes with new sources (a new rating scale turns an old answer,
    3 of 5, bad at 3 of 1..9): the controller's next cycle reads every day again."""
    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    store = fw.get_store()
    old = record(fw, "How do I export my data?", "Maybe try the menu.", rating=3)
    assert fw.flush(10)
    move_to(store, [old], datetime.now(timezone.utc) - timedelta(days=6))
    record(fw, "Today's question?", "Today's answer.", rating=5)
    assert fw.flush(10)
    out = tmp_path / "datasets"
    curate_datasets(store, parse_config(""), "qa", out)
    assert "Maybe try the menu." in (out / "qa.sft.jsonl").read_text()

    rescaled = "rewards:\n  - type: explicit_rating\n    params: {scale_min: 1, scale_max: 9}\n"
    cfg = tmp_path / "flywheel.yaml"
    cfg.write_text(f"store: {{url: '{sqlite_url}'}}\n{rescaled}")
    done = CliRunner().invoke(main, ["--config", str(cfg), "rewards", "-w", "qa"])
    assert done.exit_code == 0, done.output
    curate_datasets(store, parse_config(rescaled), "qa", out)
    full = full_export(store, tmp_path / "full", config=parse_config(rescaled))
    assert "Maybe try the menu." not in "".join(full["sft"])
    assert curated(out) == full


def test_a_day_the_judge_could_not_judge_is_read_again(fw, tmp_path) -> None:
    """An LLM judge that answers garbage gives error verdicts (dropped by on_error: drop): the
    cycle reports it and reads that day again, so the samples come back once the judge works."""
    from flywheel_middleware.testing.openai_server import OpenAIServer

    record(fw, "Is the sky blue?", "Yes, on a clear day.", rating=5)
    assert fw.flush(10)
    verdict = {"text": "the judge is down"}
    with OpenAIServer() as server:
        server.set_responder(lambda request: verdict["text"])
        config = parse_config(
            f"filters:\n  - type: llm_rubric\n    params: {{base_url: '{server.base_url}', "
            "model: judge, retry_wait: 0}\n"
        )
        out = tmp_path / "datasets"
        first = curate_datasets(store := fw.get_store(), config, "qa", out)
        assert first.days_read == 1 and not rows(out / "qa.sft.jsonl")
        assert any("could not judge 1 of 1" in note for note in first.notes), first.notes
        verdict["text"] = "GOOD: correct"
        again = curate_datasets(store, config, "qa", out)
    assert again.days_read == 1  # read again though nothing in the store changed
    assert "Yes, on a clear day." in (out / "qa.sft.jsonl").read_text()
