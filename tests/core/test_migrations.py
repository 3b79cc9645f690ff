"""Schema changes ship as Alembic migrations; an old store upgrades in place, data kept."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from flywheel_middleware.cli import main
from flywheel_middleware.store import partitions
from flywheel_middleware.store.database import Store


def test_a_0001_store_with_data_upgrades_to_head_and_backfills(store_url):
    old = Store(store_url, migrate=False)
    old.upgrade("0001")
    assert old.current_revision() == "0001"
    with old.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO rollout (id, workflow, status, started_at) "
                "VALUES ('r1', 'support', 'succeeded', '2026-01-01 00:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO span (id, rollout_id, sequence, kind, name, status, started_at) "
                "VALUES (7, 'r1', 0, 'agent', 'agent', 'ok', '2026-01-01 00:00:00')"
            )
        )
    old.dispose()

    store = Store(store_url)  # opening upgrades to head
    assert store.current_revision() == store.head_revision() > "0001"
    assert store.execute("SELECT workflow FROM span WHERE id = 7")[0].workflow == "support"
    catalog = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if store.dialect == "sqlite"
        else "SELECT indexname AS name FROM pg_indexes WHERE tablename = 'span'"
    )
    assert "ix_span_hot" in {row.name for row in store.execute(catalog)}
    store.dispose()


def test_the_newest_migration_creates_the_tables_the_models_define(store_url):
    """The tables' one definition (``tables`` and the models) and the migrations agree:
    a store upgraded to head has every table, column, type, nullability and index."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    store = Store(store_url)
    try:
        with store.engine.connect() as conn:
            children = set()
            if store.dialect == "postgresql":
                children = set(conn.execute(text(_PARTITIONS)).scalars())
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    # partitions are the parent's storage, not tables of their own
                    "include_name": lambda name, kind, _: (
                        not (kind == "table" and name in children)
                    ),
                },
            )
            differences = compare_metadata(context, SQLModel.metadata)
    finally:
        store.dispose()
    if store.dialect == "postgresql":
        differences = _beyond_the_partition_key(differences)
    assert differences == []


_PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE c.relnamespace = current_schema()::regnamespace"
)


def _beyond_the_partition_key(differences: list) -> list:
    """The differences left once a partitioned table's unique indexes may end with its time
    column (PostgreSQL wants the partition key in each of them)."""
    added = {d[1].name: d[1] for d in differences if d[0] == "add_index"}
    removed = {d[1].name: d[1] for d in differences if d[0] == "remove_index"}
    widened = {
        name
        for name, index in removed.items()
        if name in added
        and [c.name for c in index.columns]
        == [c.name for c in added[name].columns] + [partitions.TIME_COLUMN[index.table.name]]
    }
    assert widened == {"ux_feedback_uid", "ux_telemetry_uid"}
    return [d for d in differences if not (d[0].endswith("_index") and d[1].name in widened)]


GROWING = tuple(partitions.TIME_COLUMN)


def _partitioned(store: Store) -> set[str]:
    rows = store.execute(
        "SELECT c.relname AS name FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "WHERE c.relnamespace = current_schema()::regnamespace"
    )
    return {row.name for row in rows}


def _alembic(url: str, action: str, revision: str) -> None:
    """Alembic's own command, as an operator would run it against the store."""
    from alembic import command
    from alembic.config import Config

    from flywheel_middleware.store import migrations

    cfg = Config()
    cfg.set_main_option("script_location", migrations.__path__[0])
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    getattr(command, action)(cfg, revision)


@pytest.mark.postgres
def test_a_new_postgres_store_is_partitioned_and_a_downgrade_keeps_it_working(postgres_url):
    store = Store(postgres_url)
    assert _partitioned(store) == set(GROWING)
    week = partitions.period_start(datetime.now(timezone.utc), "week")
    for table in GROWING:
        names = [p.name for p in partitions.partition_list(store, table)]
        ahead = [week + timedelta(weeks=i) for i in range(partitions.DEFAULT_AHEAD + 1)]
        assert names == [f"{table}_p{w:%Y%m%d}" for w in ahead] + [f"{table}_default"]
    store.dispose()

    # the 0005 schema reads and writes partitioned tables: a downgrade leaves them be, and
    # upgrading again changes nothing; further down, the older migrations still apply
    _alembic(postgres_url, "downgrade", "0005")
    store = Store(postgres_url)  # back at head
    assert store.current_revision() == store.head_revision() and _partitioned(store) == set(GROWING)
    store.dispose()
    _alembic(postgres_url, "downgrade", "base")
    store = Store(postgres_url)
    assert _partitioned(store) == set(GROWING)  # a fresh store again
    store.dispose()


def store_from_0005_with_rows(url: str) -> Store:
    """A PostgreSQL store made at 0005 (before partitioning was the default), with a rollout
    and its span, opened (so upgraded) by this version."""
    old = Store(url, migrate=False)
    old.upgrade("0005")
    with old.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO rollout (id, workflow, status, started_at) "
                "VALUES ('r1', 'support', 'succeeded', '2026-01-01 00:00:00+00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO span (id, rollout_id, sequence, kind, name, status, started_at) "
                "VALUES (7, 'r1', 0, 'agent', 'agent', 'ok', '2026-01-01 00:00:00+00')"
            )
        )
    old.dispose()
    return Store(url)


@pytest.mark.postgres
def test_an_older_postgres_store_with_rows_stays_plain_until_a_person_converts_it(
    postgres_url, caplog
):
    with caplog.at_level(logging.WARNING, logger="flywheel_middleware.store.migrations"):
        store = store_from_0005_with_rows(postgres_url)
    assert store.current_revision() == store.head_revision()
    assert _partitioned(store) == set()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "unpartitioned because some hold rows (rollout, span)" in warning
    assert "flywheel db maintain --partition" in warning
    assert [tuple(r) for r in store.execute("SELECT id, workflow FROM rollout")] == [
        ("r1", "support")
    ]

    result = CliRunner().invoke(
        main, ["db", "maintain", "--partition", "--store", postgres_url, "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["converted"] == {
        "rollout": 1,
        "span": 1,
        "feedback": 0,
        "telemetry_event": 0,
    }
    assert _partitioned(store) == set(GROWING)
    assert store.execute("SELECT rollout_id FROM span WHERE id = 7")[0].rollout_id == "r1"
    store.dispose()
