"""A new PostgreSQL store is partitioned by time from the start, and everything records and
reads through it as through plain tables."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from flywheel_middleware.cli import main
from flywheel_middleware.store import partitions
from flywheel_middleware.store.database import Store


@pytest.mark.postgres
def test_a_new_postgres_store_records_and_reads_through_its_partitions(postgres_url):
    import flywheel_middleware as fw

    fw.configure(store_url=postgres_url, writer="thread")
    try:
        with fw.rollout("qa", input="How long is the warranty?") as answer:
            with fw.span("search_docs", kind="tool", input={"q": "warranty"}):
                pass
            with fw.span("chat", kind="llm", model="gpt-test") as llm:
                llm.set_usage(11, 22)
                with fw.span("cite", kind="tool"):
                    pass
            answer.set_output("Two years.")
        fw.feedback(answer.id, rating=5)
        assert fw.flush()
    finally:
        fw.shutdown()

    store = Store(postgres_url)
    week = f"p{partitions.period_start(datetime.now(timezone.utc), 'week'):%Y%m%d}"
    where = {
        table: [
            (row.part, row.n)
            for row in store.execute(
                f"SELECT tableoid::regclass::text AS part, count(*) AS n FROM {table} GROUP BY 1"
            )
        ]
        for table in ("rollout", "span", "feedback")
    }
    assert where == {
        "rollout": [(f"rollout_{week}", 1)],
        "span": [(f"span_{week}", 3)],
        "feedback": [(f"feedback_{week}", 1)],
    }
    store.dispose()

    result = CliRunner().invoke(main, ["show", answer.id, "--store", postgres_url])
    assert result.exit_code == 0, result.output
    assert "tool search_docs" in result.output and "model=gpt-test" in result.output
    assert "feedback [explicit] rating=5" in result.output


@pytest.mark.postgres
def test_a_rollout_insert_looks_its_id_up_by_index_even_in_a_new_store(postgres_url):
    """The trigger that keeps one row per rollout id would otherwise keep, for its session, a
    plan made while the partitions were empty: a scan of the week's rollouts per insert."""
    Store(postgres_url).dispose()  # created; its session's scan counts leave with it
    store = Store(postgres_url)
    with store.engine.begin() as conn:
        for i in range(200):
            conn.execute(
                text(
                    "INSERT INTO rollout (id, workflow, status, started_at) "
                    "VALUES (:id, 'qa', 'succeeded', now() - :i * interval '1 second')"
                ),
                {"id": f"r{i}", "i": i},
            )
        scans = conn.execute(
            text(
                "SELECT sum(seq_scan) AS seq, sum(idx_scan) AS idx FROM pg_stat_xact_user_tables "
                "WHERE schemaname = current_schema() AND relname LIKE 'rollout%'"
            )
        ).one()
    assert scans.seq == 0 and scans.idx >= 200
    store.dispose()


@pytest.mark.postgres
def test_a_partitioned_table_is_analyzed_once_it_outgrows_its_statistics(postgres_url):
    """Autovacuum analyzes each partition but never the partitioned table, whose statistics
    the planner uses for joins through it; the loop re-analyzes it as it grows."""
    store = Store(postgres_url)
    assert partitions.analyze_stale(store) == []
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO feedback (rollout_id, source, key, value, created_at) "
                "SELECT 'r' || g, 'explicit', 'rating', 1, now() FROM generate_series(1, 3000) g"
            )
        )
        for part in partitions.partition_list(store, "feedback"):  # as autovacuum would
            conn.execute(text(f'ANALYZE "{part.name}"'))
    assert partitions.analyze_stale(store) == ["feedback"]
    assert partitions.analyze_stale(store) == []  # analyzed with these rows: not stale
    store.dispose()


@pytest.mark.postgres
def test_two_transactions_inserting_one_rollout_id_keep_one_row(postgres_url):
    """Two replicas closing one trace at once: the second insert waits for the first's commit
    and is skipped, though neither could see the other's row when both began."""
    import threading
    from datetime import timedelta

    store = Store(postgres_url)
    now = datetime.now(timezone.utc)
    insert = text(
        "INSERT INTO rollout (id, workflow, status, started_at) "
        "VALUES ('abc', 'w', 'succeeded', :t) ON CONFLICT DO NOTHING"
    )
    first = store.engine.connect()
    first.execute(insert, {"t": now})
    second_done = threading.Event()

    def second() -> None:
        with store.engine.begin() as conn:
            conn.execute(insert, {"t": now + timedelta(seconds=5)})
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not second_done.wait(1.0)  # it waits for the first transaction
    first.commit()
    first.close()
    thread.join(30)
    assert second_done.is_set()
    assert store.execute("SELECT count(*) FROM rollout WHERE id = 'abc'")[0][0] == 1
    store.dispose()


@pytest.mark.postgres
def test_upkeep_gives_up_on_a_table_a_long_reader_holds_instead_of_stalling_writers(postgres_url):
    """Creating a partition needs an exclusive lock on its table: queued behind a long read,
    it would hold up every writer behind it. Upkeep gives up after its lock timeout."""
    from datetime import timedelta

    from sqlalchemy.exc import OperationalError

    store = Store(postgres_url)
    reader = store.engine.connect()
    reader.execute(text("SELECT count(*) FROM span"))  # an open transaction holding a read
    try:
        with pytest.raises(OperationalError, match="lock timeout"):
            partitions.maintain(store, now=datetime.now(timezone.utc) + timedelta(weeks=10))
    finally:
        reader.rollback()
        reader.close()
    report = partitions.maintain(store, now=datetime.now(timezone.utc) + timedelta(weeks=10))
    assert report.created  # once the reader is gone it goes through
    store.dispose()


@pytest.mark.postgres
def test_upkeep_gives_backfilled_and_far_future_rows_partitions_of_their_own(postgres_url):
    """Rows no partition covered (an import of old traces, a clock far ahead) wait in DEFAULT
    until upkeep creates their periods' partitions and moves them in; then retention drops
    the old ones whole."""
    from datetime import timedelta

    from flywheel_middleware.store import retention

    store = Store(postgres_url)
    now = datetime.now(timezone.utc)
    times = {
        "old": now - timedelta(days=200),
        "older": now - timedelta(days=201),  # the same week, or the one before
        "recent": now - timedelta(days=60),
        "future": now + timedelta(weeks=partitions.DEFAULT_AHEAD + 3),
    }
    with store.engine.begin() as conn:
        for rid, at in times.items():
            conn.execute(
                text(
                    "INSERT INTO rollout (id, workflow, status, started_at) "
                    "VALUES (:id, 'qa', 'succeeded', :at)"
                ),
                {"id": rid, "at": at},
            )
            conn.execute(
                text(
                    "INSERT INTO span (id, rollout_id, sequence, kind, name, status, started_at) "
                    "VALUES (:n, :id, 0, 'agent', 'agent', 'ok', :at)"
                ),
                {"n": len(rid), "id": rid, "at": at},
            )

    def in_default(table: str) -> int:
        return store.execute(f"SELECT count(*) FROM {table}_default")[0][0]

    assert in_default("rollout") == in_default("span") == 4
    report = partitions.maintain(store)
    expected = {
        f"{table}_p{partitions.period_start(at, 'week'):%Y%m%d}"
        for table in ("rollout", "span")
        for at in times.values()
    }
    assert expected <= set(report.created)
    assert sum(report.moved.values()) == 8
    assert in_default("rollout") == in_default("span") == 0
    placed = {
        row.id: row.part
        for row in store.execute("SELECT id, tableoid::regclass::text AS part FROM rollout")
    }
    assert placed == {
        rid: f"rollout_p{partitions.period_start(at, 'week'):%Y%m%d}" for rid, at in times.items()
    }
    assert partitions.maintain(store).created == []  # nothing left to do

    pruned = retention.prune(store, timedelta(days=90))
    old_weeks = {partitions.period_start(times[k], "week") for k in ("old", "older")}
    assert {f"rollout_p{w:%Y%m%d}" for w in old_weeks} <= set(pruned.dropped)
    left = {row.id for row in store.execute("SELECT id FROM rollout")}
    assert left == {"recent", "future"}
    store.dispose()
