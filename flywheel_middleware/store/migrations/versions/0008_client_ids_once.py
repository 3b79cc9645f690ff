"""client ids kept once on partitioned PostgreSQL

Feedback and telemetry a caller names with its own id (``tables.client_uid``) are stored once
when sent again. SQLite and plain tables already refuse a second row with the same ``uid``; a
partitioned table's unique index is ``(uid, time)``, and a resent row is timed on arrival again,
so partitioned feedback and telemetry tables get the once-per-key trigger the rollout table has.

Revision ID: 0008
Revises: 0007
"""

from alembic import op
from sqlalchemy import text

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("feedback", "telemetry_event")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    from flywheel_middleware.store import partitions

    for table in TABLES:
        if partitions.is_partitioned(conn, table):
            partitions.ensure_once(conn, table)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    for table in TABLES:
        conn.execute(text(f'DROP TRIGGER IF EXISTS {table}_once ON "{table}"'))
        conn.execute(text(f"DROP FUNCTION IF EXISTS flywheel_{table}_once()"))
