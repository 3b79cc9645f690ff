"""Schema changes ship as Alembic migrations; an old store upgrades in place, data kept."""

from __future__ import annotations

from sqlalchemy import text

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
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, SQLModel.metadata)
    finally:
        store.dispose()
    assert differences == []
