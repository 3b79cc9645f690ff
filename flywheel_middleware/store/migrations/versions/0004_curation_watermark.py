"""curation_watermark

How far the controller has curated each workflow's datasets, so a cycle re-reads only the days
whose rollouts or feedback changed since the last one.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "curation_watermark",
        sa.Column("workflow", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("workflow"),
    )


def downgrade() -> None:
    op.drop_table("curation_watermark")
