"""span.workflow and the hot-problem index

Spans carry their rollout's workflow, so the hot-problem aggregation reads one table; a
partial, covering index on (workflow, coalesce(node, name), duration_ms, started_at, status)
over node-level spans lets SQLite answer it without a sort.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HOT_SPANS = "node IS NOT NULL OR parent_id IS NULL OR kind = 'agent'"


def upgrade() -> None:
    op.add_column("span", sa.Column("workflow", sa.String(length=200), nullable=True))
    op.execute(
        "UPDATE span SET workflow = (SELECT rollout.workflow FROM rollout "
        "WHERE rollout.id = span.rollout_id) WHERE workflow IS NULL"
    )
    op.create_index(
        "ix_span_hot",
        "span",
        ["workflow", sa.text("coalesce(node, name)"), "duration_ms", "started_at", "status"],
        sqlite_where=sa.text(HOT_SPANS),
        postgresql_where=sa.text(HOT_SPANS),
    )


def downgrade() -> None:
    op.drop_index("ix_span_hot", table_name="span")
    with op.batch_alter_table("span") as batch:
        batch.drop_column("workflow")
