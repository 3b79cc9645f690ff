"""time_partitions

On PostgreSQL, rollout, span, feedback and telemetry_event become tables partitioned by time
(weekly, with a DEFAULT partition and partitions created ahead) while they are empty, so a new
store is partitioned from the start at no cost. An older store whose tables hold rows keeps
them as they are, with a warning: converting copies each table while writers wait, so a person
chooses when (``flywheel db maintain --partition``). SQLite has no partitions: nothing to do.

Downgrade leaves partitioned tables partitioned: the 0005 schema reads and writes them the same
way (``flywheel db maintain --partition`` made them at 0005 too), and undoing it would copy
every row.

Revision ID: 0006
Revises: 0005
"""

import logging

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

log = logging.getLogger("flywheel_middleware.store.migrations")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    from flywheel_middleware.store import partitions

    holding = partitions.partition_new_store(conn)
    if holding:
        log.warning(
            "the growing tables stay unpartitioned because some hold rows (%s): "
            "`flywheel db maintain --partition` converts them when you choose (it copies each "
            "table while writers wait)",
            ", ".join(holding),
        )


def downgrade() -> None:
    pass
