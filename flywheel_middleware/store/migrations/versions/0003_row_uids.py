"""feedback.uid and telemetry_event.uid

A client-made id, unique, on the two tables whose primary key the database assigns: a batch
retried after a lost COMMIT reply, or replayed from the journal, inserts each row once.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = {"feedback": "ux_feedback_uid", "telemetry_event": "ux_telemetry_uid"}


def upgrade() -> None:
    for table, index in TABLES.items():
        op.add_column(table, sa.Column("uid", sa.String(length=32), nullable=True))
        op.create_index(index, table, ["uid"], unique=True)


def downgrade() -> None:
    for table, index in TABLES.items():
        op.drop_index(index, table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("uid")
