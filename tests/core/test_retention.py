"""Growth: time partitions on PostgreSQL (`flywheel db maintain`) and retention
(`flywheel db prune`), which removes exactly the old rows no running experiment needs."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from flywheel_middleware.capture.ids import new_rollout_id
from flywheel_middleware.capture.records import (
    FeedbackRecord,
    RolloutRecord,
    SpanRecord,
    TelemetryRecord,
    datetime_to_ns,
)
from flywheel_middleware.cli import main
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.service import otlp_recovery
from flywheel_middleware.store import partitions, retention
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ConfigVersion, Experiment

from .test_migrations import store_from_0005_with_rows
from .test_poison import CommitEater

NOW = datetime.now(timezone.utc)
TABLES = ("rollout", "span", "feedback", "telemetry_event")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _experiment(store: Store, status: str) -> int:
    with store.session() as session:
        exp = Experiment(
            workflow="qa",
            status=status,
            baseline_version_id=1,
            variants=[{"name": "baseline", "version_id": 1, "weight": 1.0}],
            started_at=NOW - timedelta(days=400),
        )
        session.add(exp)
        session.flush()
        return int(exp.id)


_span_ids = iter(range(10_000, 1_000_000))


def _rollout(rid: str, experiment_id: int | None, started_at: int, **values) -> RolloutRecord:
    """A rollout, in ``experiment_id``'s baseline when it has one."""
    variant = "baseline" if experiment_id else None
    return RolloutRecord(
        id=rid, experiment_id=experiment_id, variant=variant, started_at=started_at, **values
    )


def _records(age: timedelta, experiment_id: int | None, n: int, tag: str) -> tuple[list, list]:
    """``n`` rollouts started ``age`` ago, each with two spans, a rating and a click."""
    ns = datetime_to_ns(NOW - age)
    records, ids = [], []
    for i in range(n):
        rid = new_rollout_id()
        ids.append(rid)
        at = ns + i * 1000
        records.append(_rollout(rid, experiment_id, at, workflow="qa", input=tag))
        for _ in range(2):
            records.append(SpanRecord(id=next(_span_ids), rollout_id=rid, name=tag, started_at=at))
        records.append(FeedbackRecord(rollout_id=rid, key="rating", value=4.0, created_at=at))
        records.append(TelemetryRecord(rollout_id=rid, event_type="click", received_at=at))
    return records, ids


def _write(store: Store, records: list, tmp_path) -> None:
    recorder = Recorder(store, spill_dir=tmp_path / "journal", writer="thread")
    for record in records:
        recorder.enqueue(record)
    assert recorder.close(timeout=60)
    assert recorder.counters.dead_lettered == 0


def _remaining(store: Store) -> dict[str, set]:
    with store.engine.connect() as conn:
        out = {"rollout": set(conn.execute(text("SELECT id FROM rollout")).scalars())}
        for table in TABLES[1:]:
            rows = conn.execute(
                text(f"SELECT rollout_id FROM {table} WHERE rollout_id IS NOT NULL")
            ).scalars()
            out[table] = set(rows)
        out["orphan events"] = set(
            conn.execute(
                text("SELECT event_type FROM telemetry_event WHERE rollout_id IS NULL")
            ).scalars()
        )
    return out


def _older_store(url: str) -> Store:
    """A PostgreSQL store made before partitioning was the default: its tables held rows
    when it was upgraded, so they stayed plain (here emptied again)."""
    store = store_from_0005_with_rows(url)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM span"))
        conn.execute(text("DELETE FROM rollout"))
    assert partitions.partition_list(store, "rollout") == []
    return store


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("postgres-older", marks=pytest.mark.postgres),
        pytest.param("postgres-older-converted", marks=pytest.mark.postgres),
    ]
)
def backend(request, tmp_path):
    """SQLite; a new PostgreSQL store (partitioned from the start: these old rows land in the
    DEFAULT partition); an older one with plain tables; and one converted with its rows."""
    if request.param == "sqlite":
        return request.param, f"sqlite:///{tmp_path / 'flywheel.db'}"
    url = request.getfixturevalue("postgres_url")
    if request.param.startswith("postgres-older"):
        _older_store(url).dispose()
    return request.param, url


def test_prune_removes_exactly_the_old_rows_no_running_experiment_needs(backend, tmp_path):
    kind, url = backend
    store = Store(url)
    if kind == "postgres":
        assert partitions.partition_list(store, "span")[-1].name == "span_default"
    elif kind.startswith("postgres-older"):
        assert partitions.partition_list(store, "span") == []
    running, stopped = _experiment(store, "running"), _experiment(store, "stopped")
    with store.session() as session:
        session.add(
            ConfigVersion(
                workflow="qa",
                version=1,
                config={"llm": {"model": "m"}},
                config_hash="h" * 64,
                created_at=NOW - timedelta(days=365),
            )
        )
    old_plain, old_plain_ids = _records(timedelta(days=200), None, 3, "old")
    old_stopped, old_stopped_ids = _records(timedelta(days=150), stopped, 2, "old stopped")
    old_running, old_running_ids = _records(timedelta(days=120), running, 2, "old running")
    recent, recent_ids = _records(timedelta(days=10), None, 3, "recent")
    orphans = [
        TelemetryRecord(
            event_type="old scroll", received_at=datetime_to_ns(NOW - timedelta(days=95))
        ),
        TelemetryRecord(
            event_type="new scroll", received_at=datetime_to_ns(NOW - timedelta(days=85))
        ),
    ]
    _write(store, old_plain + old_stopped + old_running + recent + orphans, tmp_path)
    if kind == "postgres-older-converted":
        report = partitions.maintain(store, partition=True, interval="week")
        assert set(report.converted) == set(TABLES)
        assert report.converted["span"] == 2 * 10  # every row copied

    out = json.loads(
        _cli("db", "prune", "--older-than", "90d", "--batch", "2", "--store", url, "--json")
    )

    kept = set(old_running_ids) | set(recent_ids)
    left = _remaining(store)
    for table in TABLES:
        assert left[table] == kept, table
    assert left["orphan events"] == {"new scroll"}
    removed = len(old_plain_ids) + len(old_stopped_ids)
    assert out["deleted"] == {
        "rollout": removed,
        "span": 2 * removed,
        "feedback": removed,
        "telemetry_event": removed + 1,
    }
    assert out["kept_for_experiments"] == {
        "rollout": 2,
        "span": 4,
        "feedback": 2,
        "telemetry_event": 2,
    }
    with store.engine.connect() as conn:  # the loop's history stays
        assert conn.execute(text("SELECT count(*) FROM config_version")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM experiment")).scalar() == 2
    if kind == "postgres-older-converted":
        dropped = set(out["dropped_partitions"])
        week = partitions.period_start(NOW - timedelta(days=200), "week")
        assert f"span_p{week:%Y%m%d}" in dropped  # gone whole
        week = partitions.period_start(NOW - timedelta(days=120), "week")
        assert f"span_p{week:%Y%m%d}" not in dropped  # an experiment's rows are in it
    else:
        assert out["dropped_partitions"] == []
    again = json.loads(_cli("db", "prune", "--older-than", "90d", "--store", url, "--json"))
    assert set(again["deleted"].values()) == {0}
    store.dispose()


def test_prune_takes_the_age_from_the_config_and_names_bad_ages(tmp_path):
    url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    store = Store(url)
    records, _ = _records(timedelta(days=40), None, 2, "old")
    _write(store, records + _records(timedelta(days=1), None, 1, "new")[0], tmp_path)
    config = tmp_path / "flywheel.yaml"
    config.write_text("retention: {keep: 30d}\n", encoding="utf-8")
    out = json.loads(_cli("db", "prune", "--config", str(config), "--store", url, "--json"))
    assert out["deleted"]["rollout"] == 2 and _remaining(store)["rollout"] != set()
    runner = CliRunner()
    bad = runner.invoke(main, ["db", "prune", "--older-than", "ninety days", "--store", url])
    assert bad.exit_code == 2 and "'ninety days' is not a duration" in bad.output
    (tmp_path / "empty.yaml").write_text("{}\n", encoding="utf-8")
    unset = runner.invoke(
        main, ["db", "prune", "--config", str(tmp_path / "empty.yaml"), "--store", url]
    )
    assert unset.exit_code == 2 and "--older-than 90d" in unset.output
    config.write_text("retention: {keep: soon}\n", encoding="utf-8")
    invalid = runner.invoke(main, ["db", "prune", "--config", str(config), "--store", url])
    assert invalid.exit_code != 0 and "retention.keep" in invalid.output
    store.dispose()


@pytest.mark.postgres
def test_maintain_creates_partitions_ahead_idempotently_and_rehomes_stray_rows(
    postgres_url, tmp_path
):
    store = _older_store(postgres_url)
    out = _cli("db", "maintain", "--store", postgres_url)
    assert "not partitioned" in out and "--partition" in out  # a person converts it
    with store.engine.begin() as conn:  # what a reporting role was given stays given
        conn.execute(text("GRANT SELECT ON span TO PUBLIC"))
    first = json.loads(
        _cli("db", "maintain", "--partition", "--ahead", "3", "--store", postgres_url, "--json")
    )
    assert first["converted"] == dict.fromkeys(TABLES, 0)
    this_week = partitions.period_start(NOW, "week")
    for table in TABLES:
        names = [p.name for p in partitions.partition_list(store, table)]
        weeks = [this_week + timedelta(weeks=i) for i in range(4)]
        assert names == [f"{table}_p{w:%Y%m%d}" for w in weeks] + [f"{table}_default"]
    with store.engine.connect() as conn:
        granted = "SELECT has_table_privilege('public', 'span', 'SELECT')"
        assert conn.execute(text(granted)).scalar() is True
    again = json.loads(_cli("db", "maintain", "--ahead", "3", "--store", postgres_url, "--json"))
    assert again == {"converted": {}, "created": [], "moved": {}, "not_partitioned": []}

    # a span from beyond the partitions lands in DEFAULT; maintain later gives it its own
    later = NOW + timedelta(weeks=8)
    far, (far_id,) = _records(timedelta(weeks=-8), None, 1, "from the future")
    _write(store, far, tmp_path)
    report = partitions.maintain(store, ahead=0, now=later)
    home = f"span_p{partitions.period_start(later, 'week'):%Y%m%d}"
    assert report.moved[home] == 2
    with store.engine.connect() as conn:
        where = conn.execute(
            text("SELECT DISTINCT tableoid::regclass::text FROM span WHERE rollout_id = :r"),
            {"r": far_id},
        ).scalars()
        assert list(where) == [home]
        assert conn.execute(text("SELECT count(*) FROM span")).scalar() == 2
    assert partitions.maintain(store, ahead=0, now=later).created == []
    store.dispose()


@pytest.mark.postgres
def test_maintain_and_prune_from_two_hosts_at_once_both_succeed(postgres_url, tmp_path):
    stores = [_older_store(postgres_url), Store(postgres_url)]
    old, _ = _records(timedelta(days=6), None, 2, "old")
    _write(stores[0], old, tmp_path)
    results: list = []

    def both(job) -> None:
        threads = [threading.Thread(target=lambda s=s: results.append(job(s))) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

    both(lambda s: partitions.maintain(s, partition=True, interval="day"))
    assert len(results) == 2
    converted = [table for r in results for table in r.converted]
    assert sorted(converted) == sorted(TABLES)  # each table converted once, by one of them
    results.clear()
    both(lambda s: retention.prune(s, timedelta(days=3)))
    assert len(results) == 2
    assert sum(r.deleted["span"] for r in results) == 4  # each old row removed once
    dropped = results[0].dropped + results[1].dropped
    assert dropped and len(dropped) == len(set(dropped))  # each old partition dropped once
    assert all(partitions.partition_list(stores[0], table) for table in TABLES)
    for store in stores:
        store.dispose()


def test_maintain_on_sqlite_says_partitions_are_postgresql_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    result = CliRunner().invoke(main, ["db", "maintain", "--store", url])
    assert result.exit_code == 1 and "PostgreSQL feature" in result.output


@pytest.mark.postgres
def test_a_partitioned_store_takes_retried_and_replayed_batches_once(postgres_url, tmp_path):
    store = Store(postgres_url)  # partitioned from the start
    records, ids = _records(timedelta(0), None, 5, "now")
    _write(store, records, tmp_path)
    _write(store, records, tmp_path)  # a replayed journal: the same rows again
    # a trace closed by a second replica, from a later first span: the same rollout id
    # with another start (and a start in another week) is kept once
    for days in (0.01, 6):
        again = RolloutRecord(
            id=ids[0],
            workflow="qa",
            started_at=records[0].started_at + int(days * 86400e9),
        )
        _write(store, [again], tmp_path)
    parts = urlsplit(postgres_url.replace("postgresql+psycopg", "http"))
    proxy = CommitEater(parts.hostname, parts.port)
    proxied = postgres_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    more, more_ids = _records(timedelta(0), None, 5, "retried")
    try:
        recorder = Recorder(Store(proxied), spill_dir=tmp_path / "j2", flush_interval=0.01)
        proxy.armed.set()  # the first commit's reply is lost: the batch is sent again
        for record in more:
            recorder.enqueue(record)
        assert recorder.flush(60)
        assert proxy.eaten.is_set() and recorder.counters.retried >= 1
        assert recorder.close(timeout=30)
    finally:
        proxy.close()
    with store.engine.connect() as conn:
        counts = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() for table in TABLES
        }
        kind = conn.execute(text("SELECT relkind FROM pg_class WHERE oid = 'span'::regclass"))
        assert kind.scalar() == "p"
    assert counts == {"rollout": 10, "span": 20, "feedback": 10, "telemetry_event": 10}
    assert len(set(ids) | set(more_ids)) == 10
    store.dispose()


def _trace(
    start: datetime,
    spans: tuple[timedelta, ...],
    *,
    experiment_id: int | None = None,
    rollout: bool = True,
    feedback: tuple[timedelta, ...] = (),
    events: tuple[timedelta, ...] = (),
) -> tuple[str, list]:
    """An ingested trace (``trace_id = rollout_id``): its rollout started at ``start`` (unless
    not written yet), spans, feedback and events that far after it."""
    rid = new_rollout_id()

    def at(delta: timedelta) -> int:
        return datetime_to_ns(start + delta)

    records: list = []
    if rollout:
        records.append(_rollout(rid, experiment_id, at(timedelta(0)), workflow="agent"))
    for delta in spans:
        records.append(
            SpanRecord(
                id=next(_span_ids), rollout_id=rid, trace_id=rid, name="s", started_at=at(delta)
            )
        )
    for delta in feedback:
        records.append(
            FeedbackRecord(rollout_id=rid, key="rating", value=1.0, created_at=at(delta))
        )
    for delta in events:
        records.append(TelemetryRecord(rollout_id=rid, event_type="click", received_at=at(delta)))
    return rid, records


def _rows(store: Store) -> dict[str, dict[str, int]]:
    """Per table, how many rows each rollout id has."""
    with store.engine.connect() as conn:
        return {
            table: dict(
                conn.execute(
                    text(
                        f"SELECT {'id' if table == 'rollout' else 'rollout_id'}, count(*) "
                        f"FROM {table} GROUP BY 1"
                    )
                ).all()
            )
            for table in TABLES
        }


def test_prune_takes_a_straddling_rollouts_younger_rows_and_keeps_every_other_trace(
    backend, tmp_path
):
    """A week kept; the cutoff just after a week starts, so on a converted store the pruned
    rollout ``dropped`` lies in a partition dropped whole, ``deleted`` in one pruned by rows."""
    kind, url = backend
    store = Store(url)
    running = _experiment(store, "running")
    keep = timedelta(days=7)
    week = partitions.period_start(NOW - timedelta(days=21), "week")
    cutoff = week + timedelta(minutes=30)
    now = cutoff + keep
    m, h = timedelta(minutes=1), timedelta(hours=1)
    dropped, a = _trace(
        cutoff - h, (0 * m, 10 * m, 70 * m, 4 * h), feedback=(3 * h,), events=(3 * h,)
    )
    deleted, b = _trace(cutoff - 10 * m, (0 * m, 20 * m, 23 * h), feedback=(1 * m, h), events=(h,))
    needed, c = _trace(
        cutoff - 10 * m,
        (0 * m, 20 * m, 5 * h),
        experiment_id=running,
        feedback=(1 * m, h),
        events=(h,),
    )
    young, d = _trace(cutoff + h, (0 * m, h), feedback=(h,), events=(h,))
    # traces whose rollout is not written yet: one open in a service, one that recovery
    # will rebuild, just past the window the prune reads
    live, e = _trace(now - h, (0 * m, 10 * m), rollout=False)
    unclosed, f = _trace(cutoff + retention.TRACE_BOUND + m, (0 * m, h), rollout=False)
    scroll = TelemetryRecord(event_type="scroll", received_at=datetime_to_ns(cutoff + h))
    _write(store, a + b + c + d + e + f + [scroll], tmp_path)
    if kind == "postgres-older-converted":
        partitions.maintain(store, partition=True, interval="week")

    report = retention.prune(store, keep, batch=2, now=now)

    assert _rows(store) == {
        "rollout": {needed: 1, young: 1},
        "span": {needed: 3, young: 2, live: 2, unclosed: 2},
        "feedback": {needed: 2, young: 1},
        "telemetry_event": {needed: 1, young: 1, None: 1},
    }
    assert report.deleted == {"rollout": 2, "span": 7, "feedback": 3, "telemetry_event": 2}
    assert report.kept == {"rollout": 1, "span": 1, "feedback": 1, "telemetry_event": 0}
    if kind == "postgres-older-converted":
        before = partitions.period_start(cutoff - h, "week")
        assert f"rollout_p{before:%Y%m%d}" in report.dropped
        assert f"span_p{before:%Y%m%d}" in report.dropped
    # the OTLP service's recovery finds only the traces still to be closed: nothing of the
    # pruned ones to rebuild as partial rollouts
    lookback = otlp_recovery.orphan_ids(store, datetime_to_ns(cutoff - keep), datetime_to_ns(now))
    assert sorted(lookback) == sorted([live, unclosed])
    again = retention.prune(store, keep, now=now)
    assert set(again.deleted.values()) == {0}
    store.dispose()


def test_prune_never_reaches_rows_young_enough_to_await_their_rollout(backend, tmp_path):
    """With a short ``keep`` the straddling rows read end ``RECENT`` before now: a trace there
    may still be open in a service or wait for recovery."""
    _kind, url = backend
    store = Store(url)
    keep = timedelta(hours=60)
    cutoff = NOW - keep
    m, h = timedelta(minutes=1), timedelta(hours=1)
    pruned, a = _trace(cutoff - 10 * m, (0 * m, 20 * m, 11 * h), feedback=(h,), events=(h,))
    waiting, b = _trace(NOW - retention.RECENT + m, (0 * m, h), rollout=False)
    assert NOW - retention.RECENT + m < cutoff + retention.TRACE_BOUND  # within a trace's span
    _write(store, a + b, tmp_path)

    report = retention.prune(store, keep, now=NOW)

    assert _rows(store) == {
        "rollout": {},
        "span": {waiting: 2},
        "feedback": {},
        "telemetry_event": {},
    }
    assert report.deleted == {"rollout": 1, "span": 3, "feedback": 1, "telemetry_event": 1}
    assert otlp_recovery.orphan_ids(store, datetime_to_ns(cutoff), datetime_to_ns(NOW)) == [waiting]
    store.dispose()
