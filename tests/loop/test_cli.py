"""The loop's commands through the real click entry point."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.cli.loop import parse_every
from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop import versions

from .helpers import BASE, add_rollouts, make_config


def _setup(tmp_path, store_url):
    path = tmp_path / "flywheel.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workflows": {
                    "qa": {
                        "config": BASE,
                        "tunable": {"rag.top_k": {"choices": [2, 3, 4]}},
                        "experiment": {"min_samples": 50},
                    }
                },
                "analysis": {"min_calls": 20},
                "controller": {"report_dir": str(tmp_path / "reports")},
            }
        )
    )
    runner = CliRunner()

    def run(*args, ok=True):
        result = runner.invoke(main, ["--config", str(path), "--store", store_url, *args])
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    return run


def test_config_experiment_promote_rollback_commands(store, store_url, tmp_path):
    run = _setup(tmp_path, store_url)
    out = run("config", "show", "qa").output
    assert "v1 ★" in out and '"top_k": 2' in out
    config = make_config()
    cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}}, created_by="person")
    out = run("config", "diff", "qa", "1", "2").output
    assert "rag.top_k" in out and "4" in out
    exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.3)
    add_rollouts(store, experiment_id=exp.id, variant="baseline", n=300, positive=120)
    add_rollouts(store, experiment_id=exp.id, variant="candidate-1", n=300, positive=210)
    out = run("experiment", "list").output
    assert f"{exp.id}" in out and "running" in out and "candidate-1 30%" in out
    out = run("experiment", "show", str(exp.id)).output
    assert "positive" in out and "70.0 [" in out and "sequential" in out and "promote" in out
    out = run("promote", str(exp.id)).output  # the variant the promoters favour
    assert "now serves v2" in out
    assert versions.active_version(store, "qa").id == cand.id
    out = run("rollback", "qa").output
    assert "v2 → v1" in out
    out = run("config", "show", "qa").output
    assert "deployment history" in out and "rollback" in out and "promote" in out
    run("config", "activate", "qa", "v2", "-m", "by hand")
    assert versions.active_version(store, "qa").version == 2
    bad = run("config", "activate", "qa", "v9", ok=False)
    assert bad.exit_code != 0 and "no config version 'v9'" in bad.output
    bad = run("promote", str(exp.id), ok=False)
    assert "already promoted" in bad.output
    assert config.workflows["qa"].config == BASE


def test_cycle_and_run_commands(store, store_url, tmp_path):
    run = _setup(tmp_path, store_url)
    assert "nothing to do" in run("cycle").output  # no traffic yet
    v1 = versions.ensure_workflow(store, make_config(), "qa")
    add_rollouts(store, experiment_id=None, variant=None, n=100, positive=10, version_id=v1.id)
    out = run("cycle", "--mode", "suggest").output
    assert "problem" in out and "suggested for qa" in out and "report:" in out
    out = run("run", "--every", "1s", "--cycles", "2", "--mode", "experiment").output
    assert out.count("flywheel cycle (experiment)") == 2 and "started experiment" in out
    out = run("experiment", "stop", "1").output
    assert "stopped" in out
    assert len(list((tmp_path / "reports").glob("cycle-*.md"))) == 4


def test_parse_every():
    assert parse_every("10m") == 600 and parse_every("30s") == 30 and parse_every("2h") == 7200
    import click
    import pytest

    with pytest.raises(click.BadParameter, match="not a duration"):
        parse_every("ten minutes")


def test_the_cli_choices_mirror_the_experiment_module():
    # cli/loop.py copies them so that `flywheel --help` need not import the loop.
    from flywheel_middleware.cli import loop as cli_loop

    assert cli_loop.EXPERIMENT_STATUSES == ex.STATUSES
    assert cli_loop.EXPERIMENT_UNITS == ex.UNITS


def test_experiment_start_force_and_a_rollback_that_stops_it(store, store_url, tmp_path):
    run = _setup(tmp_path, store_url)
    run("config", "show", "qa")
    versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 3}}, created_by="person")
    versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}}, created_by="person")
    out = run("experiment", "start", "qa", "v2", "#3", "--traffic", "0.1", "-m", "try k").output
    assert "started experiment 1 on qa: baseline v1 80%" in out
    assert "candidate-1 (v2) 10%, candidate-2 (v3) 10%; unit user_id" in out
    bad = run("experiment", "start", "qa", "v2", ok=False)
    assert bad.exit_code == 1 and "already has a running experiment (1)" in bad.output
    out = run("experiment", "force", "1", "candidate-2", "qa-anna", "qa-ben").output
    assert "candidate-2 is forced for qa-anna, qa-ben" in out
    from flywheel_middleware.loop.versions import StoreResolver

    assert StoreResolver(store, make_config()).resolve("qa", "qa-ben").variant == "candidate-2"
    bad = run("experiment", "force", "1", "candidate-9", "x", ok=False)
    assert "no variant 'candidate-9'" in bad.output
    # activating another version by hand stops the experiment (its baseline is gone)
    out = run("config", "activate", "qa", "3").output
    assert "v3 is active" in out and "experiment 1 was stopped" in out
    assert ex.get_experiment(store, 1).status == "stopped"
    run("experiment", "start", "qa", "v2", "--traffic", "0.2")
    out = run("rollback", "qa").output
    assert "rolled back v3 → v1" in out and "experiment 2 was stopped" in out


def test_bad_input_is_named_not_a_traceback(store, store_url, tmp_path):
    run = _setup(tmp_path, store_url)
    for args, message in [
        (("config", "activate", "qa", "abc"), "'abc' is not a config version"),
        (("config", "diff", "qa", "1", "two"), "'two' is not a config version"),
        (("config", "show", "qa", "--version", "#x"), "'#x' is not a config version"),
        (("config", "activate", "qa", "v9"), "has no config version 'v9'"),
        (("config", "show", "nope"), "unknown workflow 'nope'; known: qa"),
        (("experiment", "start", "qa", "v1"), "already the active version"),
        (("experiment", "start", "qa", "v1", "--traffic", "1.5"), "--traffic"),
        (("experiment", "show", "42"), "no experiment with id 42"),
        (("experiment", "stop", "42"), "no experiment with id 42"),
        (("promote", "42"), "no experiment with id 42"),
        (("run", "--every", "10x"), "Invalid value for '--every': '10x' is not a duration"),
        (("run", "--every", "0s"), "'--every': the interval must be positive"),
    ]:
        result = run(*args, ok=False)
        assert result.exit_code in (1, 2), (args, result.output)
        assert message in result.output, (args, result.output)
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit
        ), (args, repr(result.exception))


def test_without_workflows_the_error_says_where_to_declare_one(tmp_path):
    path = tmp_path / "flywheel.yaml"
    path.write_text("controller: {mode: suggest}\n")
    result = CliRunner().invoke(
        main, ["--config", str(path), "--store", f"sqlite:///{tmp_path / 'x.db'}", "config", "show"]
    )
    assert result.exit_code == 2
    assert "no workflows yet: declare one under workflows:" in result.output
    assert str(path) in " ".join(result.output.split())


def test_run_stops_cleanly_on_ctrl_c(store, store_url, tmp_path, monkeypatch):
    import flywheel_middleware.cli.loop as loop

    run = _setup(tmp_path, store_url)
    waits = []

    def interrupted(seconds):  # Ctrl-C while waiting for the next cycle
        waits.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_wait", interrupted)
    out = run("run", "--every", "10m").output
    assert out.count("flywheel cycle (suggest)") == 1 and "stopped after 1 cycle(s)" in out
    assert 590 < waits[0] <= 600  # the interval minus the cycle's own time
