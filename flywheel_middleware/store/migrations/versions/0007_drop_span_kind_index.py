"""drop ix_span_kind

No query reads spans by kind alone: the one that filters on kind (a dataset's LLM calls) finds
its rows by rollout first. The index only cost every span insert a random B-tree write, the
store's most frequent statement.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On a partitioned PostgreSQL table this drops the partitions' indexes with the parent's.
    op.drop_index("ix_span_kind", table_name="span")


def downgrade() -> None:
    op.create_index("ix_span_kind", "span", ["kind"], unique=False)
