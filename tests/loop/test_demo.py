"""The README's main command: the demo turns the flywheel (on a small setting: the suite's shared
run, which the dashboard test reads too)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlmodel import func, select

import flywheel_middleware as fw
from flywheel_middleware.cli import main
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.loop.datasets import meta_path
from flywheel_middleware.store.models import ChangeEvent, Rollout, Span, TelemetryEvent


@pytest.mark.slow
def test_demo_promotes_a_better_config_and_exports_datasets(demo_week):
    result, folder = demo_week, demo_week.folder
    store = fw.get_store()
    assert result.promotions, result.cycles
    assert result.final_version > result.first_version
    # the promoted config is one the customers liked better
    assert result.cycles[-1]["positive_rate"] > result.cycles[0]["positive_rate"]
    paths = {p for p, _, _ in result.changes}
    assert paths & {"rag.top_k", "prompts.system", "llm.temperature"}
    with store.session() as session:
        promote = session.exec(select(ChangeEvent).where(ChangeEvent.kind == "promote")).first()
        assert promote.actor == "controller:auto" and promote.evidence["stats"]
        kinds = set(session.exec(select(Span.kind).distinct()).all())
        assert {"retriever", "llm"} <= kinds  # traced by the LangChain handler
        tagged = session.exec(
            select(func.count()).select_from(Rollout).where(Rollout.experiment_id.is_not(None))
        ).one()
        assert tagged > 100
        assert session.exec(select(func.count()).select_from(TelemetryEvent)).one() > 300
    assert versions.active_version(store, "support_qa").version == result.final_version
    for kind in ("triplets", "sft", "preference", "tasks"):
        path = folder / "datasets" / f"support_qa.{kind}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines and json.loads(lines[0])
    # the default curation policy: no bad-rated answer, one task per question
    sft_path = folder / "datasets" / "support_qa.sft.jsonl"
    assert check_file(sft_path, "sft") == []  # the demo's own data passes the rules
    for name, kind in (
        ("preference", "preference"),
        ("tasks", "tasks"),
        ("tasks.val", "tasks"),
        ("triplets", "triplets"),
    ):
        assert check_file(folder / "datasets" / f"support_qa.{name}.jsonl", kind) == []
    provenance = [json.loads(x) for x in meta_path(sft_path).open()]
    assert all(r["reward"] is None or r["reward"] >= 0.5 for r in provenance)
    tasks = [
        json.loads(x)
        for name in ("support_qa.tasks.jsonl", "support_qa.tasks.val.jsonl")
        for x in (folder / "datasets" / name).open()
    ]
    queries = [t["main_query"].casefold() for t in tasks]
    assert len(queries) == len(set(queries))
    assert all(t["metadata"]["reward"] is None or t["metadata"]["reward"] >= 0.5 for t in tasks)
    assert len(list((folder / "reports").glob("cycle-*.md"))) == len(result.cycles) > 1


def test_demo_command_runs(tmp_path):
    try:
        out = CliRunner().invoke(
            main, ["demo", "--dir", str(tmp_path / "d"), "--cycles", "1", "--requests", "60"]
        )
        assert out.exit_code == 0, out.output + repr(out.exception)
        assert "what happened" in out.output and "started exp 1" in out.output
    finally:
        fw.shutdown()
