"""The controller: modes (suggest / experiment / auto), generation, reports."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.controller import run_cycle
from flywheel_middleware.store.models import ChangeEvent, Experiment

from .helpers import BASE, add_rollouts, make_config


def _config(tmp_path, **extra):
    return make_config(
        controller={"report_dir": str(tmp_path / "reports"), "dataset_dir": str(tmp_path / "data")},
        **extra,
    )


def _winner_experiment(store, config):
    v1 = versions.ensure_workflow(store, config, "qa")
    cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}}, created_by="t")
    exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.3)
    add_rollouts(
        store, experiment_id=exp.id, variant="baseline", n=600, positive=240, version_id=v1.id
    )
    add_rollouts(
        store, experiment_id=exp.id, variant="candidate-1", n=600, positive=420, version_id=cand.id
    )
    return v1, cand, exp


def test_experiment_mode_never_promotes_by_itself(store, tmp_path):
    config = _config(tmp_path)
    v1, cand, exp = _winner_experiment(store, config)
    for _ in range(3):
        report = run_cycle(store, config, "experiment", curate_data=False)
        [d] = report.decisions
        assert (d["action"], d["variant"], d["applied"]) == (
            "promote",
            "candidate-1",
            "awaiting approval",
        )
        assert d["approve"] == f"flywheel promote {exp.id} candidate-1"
        assert versions.active_version(store, "qa").id == v1.id
        assert ex.get_experiment(store, exp.id).status == "running"
    text = Path(report.report_path).read_text(encoding="utf-8")
    assert f"flywheel promote {exp.id} candidate-1" in text and "awaiting approval" in text
    with store.session() as session:
        assert not session.exec(select(ChangeEvent).where(ChangeEvent.kind == "promote")).all()
    # the same evidence in auto mode promotes, with the evidence on the ChangeEvent
    report = run_cycle(store, config, "auto", curate_data=False)
    assert report.promoted and versions.active_version(store, "qa").id == cand.id
    promote = versions.deployment_history(store, "qa")[-1]
    assert promote.kind == "promote" and promote.actor == "controller:auto"
    assert promote.evidence["stats"]["variants"]["candidate-1"]["rated"] == 600
    assert ex.get_experiment(store, exp.id).status == "promoted"


def test_suggest_mode_changes_nothing(store, tmp_path):
    config = _config(tmp_path)
    v1 = versions.ensure_workflow(store, config, "qa")
    add_rollouts(store, experiment_id=None, variant=None, n=100, positive=20, version_id=v1.id)
    report = run_cycle(store, config, "suggest", curate_data=False)
    assert report.problems and report.proposals and report.proposals[0]["candidates"]
    assert not report.started
    assert [v.id for v in versions.list_versions(store, "qa")] == [v1.id]
    with store.session() as session:
        assert not session.exec(select(Experiment)).all()
    assert "report only" in Path(report.report_path).read_text(encoding="utf-8")


def test_hot_problem_starts_an_experiment_with_small_traffic(store, tmp_path):
    config = _config(tmp_path)
    v1 = versions.ensure_workflow(store, config, "qa")
    add_rollouts(store, experiment_id=None, variant=None, n=100, positive=20, version_id=v1.id)
    report = run_cycle(store, config, "experiment")
    [started] = report.started
    exp = ex.get_experiment(store, started["experiment_id"])
    assert [v["name"] for v in exp.variants] == ["baseline", "candidate-1", "candidate-2"]
    assert [v["weight"] for v in exp.variants] == [0.6, 0.2, 0.2]
    authors = {versions.get_version(store, v["version_id"]).created_by for v in exp.variants[1:]}
    assert authors == {"mutator:param"}
    # a second cycle does not start another experiment for the same workflow
    again = run_cycle(store, config, "experiment", curate_data=False)
    assert not again.started and again.decisions[0]["action"] == "continue"


def test_a_clear_loser_is_stopped_in_experiment_mode(store, tmp_path):
    config = _config(tmp_path)
    v1 = versions.ensure_workflow(store, config, "qa")
    cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 5}})
    exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.3)
    add_rollouts(
        store, experiment_id=exp.id, variant="baseline", n=600, positive=420, version_id=v1.id
    )
    add_rollouts(
        store, experiment_id=exp.id, variant="candidate-1", n=600, positive=240, version_id=cand.id
    )
    report = run_cycle(store, config, "experiment", curate_data=False)
    assert report.decisions[0]["applied"] == "rejected"
    assert ex.get_experiment(store, exp.id).status == "rejected"
    assert versions.active_version(store, "qa").id == v1.id


def test_too_many_candidates_for_the_traffic_run_as_many_as_fit(store, tmp_path):
    config = _config(tmp_path)
    config.workflows["qa"].experiment.candidate_traffic = 0.5  # 2 candidates × 50% = all traffic
    config.workflows["qa"].tunable["llm.temprature"] = config.workflows["qa"].tunable.pop(
        "llm.temperature"
    )  # a typo: not a key of the config
    v1 = versions.ensure_workflow(store, config, "qa")
    add_rollouts(store, experiment_id=None, variant=None, n=100, positive=20, version_id=v1.id)
    report = run_cycle(store, config, "experiment", curate_data=False)
    [started] = report.started
    exp = ex.get_experiment(store, started["experiment_id"])
    assert [v["weight"] for v in exp.variants] == [0.5, 0.5]
    assert len(versions.list_versions(store, "qa")) == 2  # no version made for the other one
    notes = "\n".join(report.notes)
    assert "2 candidates × 50% traffic leave nothing for the baseline" in notes
    assert "'llm.temprature' is not in the active config (v1)" in notes
    text = Path(report.report_path).read_text(encoding="utf-8")
    assert "leave nothing for the baseline" in text and "llm.temprature" in text


def test_a_failed_experiment_start_is_a_note_and_the_report_is_still_written(
    store, tmp_path, monkeypatch
):
    config = _config(tmp_path)
    v1 = versions.ensure_workflow(store, config, "qa")
    add_rollouts(store, experiment_id=None, variant=None, n=100, positive=20, version_id=v1.id)

    def refuse(*args, **kwargs):  # e.g. another process started one a moment ago
        raise ex.ExperimentError("workflow 'qa' already has a running experiment (7)")

    monkeypatch.setattr(ex, "start_experiment", refuse)
    report = run_cycle(store, config, "experiment", curate_data=False)
    assert not report.started
    assert "qa: could not start an experiment: workflow 'qa' already has" in "\n".join(report.notes)
    assert "could not start an experiment" in Path(report.report_path).read_text("utf-8")


def _headings_stand_alone(text):
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every heading is its own paragraph
        if line.startswith("#") and i:
            assert lines[i - 1] == "", (i, line)


def test_the_report_is_markdown_a_person_can_read(store, tmp_path):
    config = _config(tmp_path)
    quiet = run_cycle(store, config, "experiment", curate_data=False)  # nothing running yet
    _headings_stand_alone(Path(quiet.report_path).read_text(encoding="utf-8"))
    v1, cand, exp = _winner_experiment(store, config)
    report = run_cycle(store, config, "experiment", curate_data=False)
    text = Path(report.report_path).read_text(encoding="utf-8")
    _headings_stand_alone(text)
    assert "| candidate-1 | 0.30 | 600 | 70.0%" in text  # the evidence table
    assert "To approve: `flywheel promote" in text


def test_curate_notes_rollouts_of_an_unknown_message_shape(store, tmp_path):
    """A rollout whose question cannot be read is named in the report, not exported empty."""
    from datetime import datetime, timezone

    from flywheel_middleware.loop.controller import CycleReport, curate
    from flywheel_middleware.store.models import Rollout

    config = _config(tmp_path)
    versions.ensure_workflow(store, config, "qa")
    add_rollouts(store, experiment_id=None, variant=None, n=3, positive=3)
    with store.session() as session:
        session.add(
            Rollout(
                id="odd",
                workflow="qa",
                input={"weird": [1, 2]},
                output={"numbers": [3]},
                status="succeeded",
                started_at=datetime.now(timezone.utc),
            )
        )
        session.commit()
    now = datetime.now(timezone.utc)
    report = CycleReport(mode="experiment", started_at=now)
    curate(store, config, ["qa"], now, report)
    notes = [n for n in report.notes if "unknown message shape" in n]
    assert notes and all('{"weird": [1, 2]}' in n for n in notes)
    triplets = Path(tmp_path / "data" / "qa.triplets.jsonl").read_text().splitlines()
    assert len(triplets) == 3 and "weird" not in "".join(triplets)
