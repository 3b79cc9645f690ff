"""The pre-live regression gate: candidates answer past questions before they get traffic."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlmodel import select

from flywheel_middleware.config import parse_config
from flywheel_middleware.errors import ConfigError
from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.controller import CYCLE_KIND, run_cycle
from flywheel_middleware.loop.regression_gate import GATE_KIND, run_gate
from flywheel_middleware.store.models import ChangeEvent

from .helpers import BASE, add_rollouts, make_config

JUDGE = {"type": "rule", "params": {"expression": 'contains(output_text, "RIGHT")'}}


def _difficulty(question: str) -> float:
    return int(hashlib.sha256(str(question).encode()).hexdigest()[:8], 16) / 2**32


def answer_by_temperature(config: dict, input: object) -> str:
    """A model that gets a question right when it is easier than its temperature is high."""
    if _difficulty(str(input)) >= float(config["llm"]["temperature"]):
        return f"RIGHT answer to {input}"
    return "a confident answer about something else"


def crash_when_hot(config: dict, input: object) -> str:
    if float(config["llm"]["temperature"]) > 0.8:
        raise TimeoutError("the model timed out")
    return answer_by_temperature(config, input)


def always_crash(config: dict, input: object) -> str:
    raise ValueError("model endpoint offline")


def _config(tmp_path: Path, runner: str = "answer_by_temperature", **evaluation: object):
    wf = {
        "config": {**BASE, "llm": {"model": "m", "temperature": 0.5}},
        "tunable": {"llm.temperature": {"choices": [0.1, 0.9]}},
        "experiment": {"candidate_traffic": 0.2, "max_candidates": 2, "min_samples": 50},
    }
    return make_config(
        workflows={"qa": wf},
        controller={"report_dir": str(tmp_path / "reports"), "dataset_dir": str(tmp_path / "d")},
        evaluation={"runner": f"{__name__}:{runner}", "judges": [JUDGE], **evaluation},
    )


def _history(store, config) -> versions.ConfigVersion:
    v1 = versions.ensure_workflow(store, config, "qa")
    # 200 distinct questions: 60 rated 5 (tasks, a tenth of them validation), 140 rated 1
    add_rollouts(store, experiment_id=None, variant=None, n=200, positive=60, version_id=v1.id)
    return v1


def _gate_events(store) -> list[ChangeEvent]:
    with store.session() as session:
        rows = session.exec(select(ChangeEvent).where(ChangeEvent.kind == GATE_KIND)).all()
    return sorted(rows, key=lambda e: e.to_version_id)


def test_the_gate_drops_a_worse_candidate_and_lets_a_better_one_through(store, tmp_path):
    config = _config(tmp_path, margin=0.05, max_cases=40)
    v1 = _history(store, config)
    report = run_cycle(store, config, "experiment", curate_data=False)

    [gate] = report.gates
    assert len(gate.cases) == 40
    assert {c.source for c in gate.cases} == {"validation", "bad case"}
    events = _gate_events(store)
    assert len(events) == 2 and all(e.from_version_id == v1.id for e in events)
    temps = {
        e.to_version_id: versions.get_version(store, e.to_version_id).config["llm"]["temperature"]
        for e in events
    }
    verdict = {temps[e.to_version_id]: e.evidence for e in events}
    assert verdict[0.1]["admitted"] and not verdict[0.9]["admitted"]
    assert verdict[0.9]["mean"] < verdict[0.9]["baseline_mean"] - 0.05
    assert verdict[0.1]["mean"] > verdict[0.1]["baseline_mean"]
    # the evidence holds every case's score for both configs, and the margin
    cases = verdict[0.9]["cases"]
    assert len(cases) == 40 and {"baseline", "candidate", "question", "source"} <= set(cases[0])
    assert verdict[0.9]["margin"] == 0.05
    mean = sum(c["candidate"] for c in cases) / len(cases)
    assert mean == pytest.approx(verdict[0.9]["mean"])

    # only the better candidate gets traffic
    [started] = report.started
    exp = ex.get_experiment(store, started["experiment_id"])
    served = [versions.get_version(store, v["version_id"]) for v in exp.variants[1:]]
    assert [v.config["llm"]["temperature"] for v in served] == [0.1]
    text = Path(report.report_path).read_text(encoding="utf-8")
    assert "Verify — regression gate" in text and "dropped" in text and "admitted" in text


def test_a_runner_that_raises_is_named_and_the_cycle_continues(store, tmp_path):
    config = _config(tmp_path, runner="always_crash")
    _history(store, config)
    report = run_cycle(store, config, "experiment", curate_data=False)
    runner = f"{__name__}:always_crash"
    assert any(runner in n and "model endpoint offline" in n for n in report.notes), report.notes
    assert not report.started and report.gates[0].error
    # nothing was spent: no version, no experiment; the cycle still wrote its report and event
    assert [v.version for v in versions.list_versions(store, "qa")] == [1]
    assert Path(report.report_path).exists()
    with store.session() as session:
        assert session.exec(select(ChangeEvent).where(ChangeEvent.kind == CYCLE_KIND)).first()


def test_a_runner_that_raises_on_one_candidate_drops_it_with_the_error(store, tmp_path):
    config = _config(tmp_path, runner="crash_when_hot")
    _history(store, config)
    report = run_cycle(store, config, "experiment", curate_data=False)
    events = {
        versions.get_version(store, e.to_version_id).config["llm"]["temperature"]: e
        for e in _gate_events(store)
    }
    hot = events[0.9].evidence
    assert not hot["admitted"] and hot["runner_errors"] == len(hot["cases"])
    assert "TimeoutError: the model timed out" in hot["cases"][0]["error"]
    assert f"{__name__}:crash_when_hot" in hot["cases"][0]["error"]
    assert events[0.1].evidence["admitted"] and len(report.started) == 1


def test_without_enough_cases_the_candidate_goes_on_unverified(store, tmp_path):
    config = _config(tmp_path, min_cases=500)
    _history(store, config)
    report = run_cycle(store, config, "experiment", curate_data=False)
    assert all(v.admitted and not v.verified for v in report.gates[0].verdicts)
    assert "unverified" in report.gates[0].verdicts[0].reason and report.started


def test_evaluation_config_errors_are_clear(store, tmp_path):
    with pytest.raises(ConfigError, match=r"f.yaml, line 1: evaluation.runner: Field required"):
        parse_config("evaluation: {judges: []}", "f.yaml")
    with pytest.raises(ConfigError, match="neither a dotted path"):
        parse_config('evaluation: {runner: "my agent"}', "f.yaml")
    with pytest.raises(ConfigError, match="evaluation.margin"):
        parse_config("evaluation: {runner: a.b, margin: -1}", "f.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'workflows.qa.evaluation.runer'"):
        parse_config("workflows: {qa: {evaluation: {runer: a.b}}}", "f.yaml")

    now = datetime.now(timezone.utc)
    config = _config(tmp_path, judges=[{"type": "rubric_judge"}])
    v1 = _history(store, config)
    run = run_gate(store, config, "qa", v1.config, [("c", v1.config)], now=now)
    assert "evaluation.judges[0].type: unknown reward type 'rubric_judge'" in run.error
    config = _config(tmp_path, runner="no_such_function")
    run = run_gate(store, config, "qa", v1.config, [("c", v1.config)], now=now)
    assert "has no attribute 'no_such_function'" in run.error
    config = _config(tmp_path)
    config.evaluation.runner = "support_agent"  # a bare name is an entry point
    run = run_gate(store, config, "qa", v1.config, [("c", v1.config)], now=now)
    assert "runner 'support_agent': no entry point of that name" in run.error
    config = _config(tmp_path, judges=[{"type": "explicit_rating"}])
    run = run_gate(store, config, "qa", v1.config, [("c", v1.config)], now=now)
    assert "no judge scored any answer" in run.error and "explicit_rating" in run.error


@pytest.mark.slow
def test_the_demo_agent_is_its_own_runner(tmp_path):
    import flywheel_middleware as fw
    from flywheel_middleware.demo import DemoSettings, run_demo

    try:
        result = run_demo(
            DemoSettings(folder=str(tmp_path / "demo"), cycles=1, requests_per_cycle=80)
        )
        [row] = result.cycles
        assert any(a.startswith("gate admitted") for a in row["actions"]), row["actions"]
        events = _gate_events(fw.get_store())
        assert events and {e.evidence["runner"] for e in events} == {
            "flywheel_middleware.demo.agent:run"
        }
        # the demo's judge grades against the knowledge base: scores are 0, 0.5 or 1
        scores = {c["baseline"] for e in events for c in e.evidence["cases"]}
        assert scores <= {0.0, 0.5, 1.0} and len(events[0].evidence["cases"]) >= 5
        text = Path(result.reports[0]).read_text(encoding="utf-8")
        assert "Verify — regression gate" in text
    finally:
        fw.shutdown()
