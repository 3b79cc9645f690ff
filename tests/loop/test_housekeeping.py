"""`flywheel run` keeps the store while it holds the cycle lock: partitions created ahead on
PostgreSQL and retention per ``retention.keep``, at its first cycle and then once a day."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import yaml
from click.testing import CliRunner
from sqlalchemy import text

from flywheel_middleware.cli import main
from flywheel_middleware.store import partitions

from .helpers import add_rollouts


def _run(tmp_path, store_url, retention: dict | None, cycles: int) -> str:
    path = tmp_path / "flywheel.yaml"
    config: dict = {"controller": {"report_dir": str(tmp_path / "reports")}}
    if retention is not None:
        config["retention"] = retention
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path), "--store", store_url, "run", "--every", "0.01s"]
    result = CliRunner().invoke(main, [*args, "--cycles", str(cycles)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output.count("report: ") == cycles  # every cycle ran
    return result.output


def _old_and_new(store, n_old: int, n_new: int) -> None:
    add_rollouts(
        store,
        experiment_id=None,
        variant=None,
        n=n_old,
        positive=0,
        start=datetime.now(timezone.utc) - timedelta(days=200),
    )
    add_rollouts(store, experiment_id=None, variant=None, n=n_new, positive=0)


def _rollouts(store) -> int:
    return store.execute("SELECT count(*) AS n FROM rollout")[0].n


def test_run_keeps_the_store_at_its_first_cycle_then_daily(store, store_url, tmp_path, monkeypatch):
    _old_and_new(store, 3, 2)
    out = _run(tmp_path, store_url, None, 3)  # no retention.keep: nothing is pruned
    assert "pruned" not in out and _rollouts(store) == 5
    if store.dialect == "postgresql":  # a new store is partitioned: created ahead already,
        # and the old rows' week gets partitions of its own, once
        old_week = partitions.period_start(datetime.now(timezone.utc) - timedelta(days=200), "week")
        assert out.count("housekeeping: partitions: 2 created") == 1
        assert f"rollout_p{old_week:%Y%m%d}, feedback_p{old_week:%Y%m%d}" in out
    else:
        assert "housekeeping" not in out

    out = _run(tmp_path, store_url, {"keep": "90d"}, 3)
    assert out.count("housekeeping: pruned rows older than") == 1  # first cycle only
    assert "rollout 3, span 0, feedback 3, telemetry_event 0" in out
    assert _rollouts(store) == 2

    monkeypatch.setenv("FLYWHEEL_HOUSEKEEPING_EVERY", "0.001s")  # due at every cycle
    _old_and_new(store, 1, 0)
    out = _run(tmp_path, store_url, {"keep": "90d"}, 2)
    assert out.count("housekeeping: pruned rows older than") == 2
    assert "rollout 1, span 0" in out and "rollout 0, span 0" in out
    if store.dialect == "postgresql":
        assert out.count("housekeeping: partitions:") == 2


def test_a_failing_chore_is_reported_and_the_cycles_run(store, store_url, tmp_path):
    _old_and_new(store, 2, 1)
    with store.engine.begin() as conn:  # a guard on the table makes every delete fail
        if store.dialect == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER keep_feedback BEFORE DELETE ON feedback "
                    "BEGIN SELECT RAISE(ABORT, 'feedback is kept'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION keep_feedback() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'feedback is kept'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER keep_feedback BEFORE DELETE ON feedback "
                    "FOR EACH ROW EXECUTE FUNCTION keep_feedback()"
                )
            )
            # and a table squatting on the name of a partition maintain creates ahead
            week = partitions.period_start(datetime.now(timezone.utc), "week")
            name = f"span_p{week + timedelta(weeks=partitions.DEFAULT_AHEAD):%Y%m%d}"
            conn.execute(text(f'DROP TABLE "{name}"'))
            conn.execute(text(f'CREATE TABLE "{name}" (x int)'))
    out = _run(tmp_path, store_url, {"keep": "90d"}, 2)
    # reported at each of the two cycles: a failed upkeep is tried again at the next cycle
    assert out.count("housekeeping failed: prune:") == 2 and "feedback is kept" in out
    if store.dialect == "postgresql":
        assert out.count("housekeeping failed: maintain:") == 2 and "already exists" in out
    assert "cycle 2 on" in out
