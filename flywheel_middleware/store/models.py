"""The data model: SQLModel tables whose names and columns are the contract of the design.

Span ids are 63-bit integers (the SQLite rowid), so the hot table appends to its B-tree
instead of inserting at random positions; rollout ids are 32 hex digits ordered by time,
which is also the OpenTelemetry trace id of the rollout.
"""

from __future__ import annotations

import types
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Float, Index, Integer, Text, text
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from flywheel_middleware import tables

# The spans hot-problem analysis looks at: named workflow nodes, top-level spans and agents.
HOT_SPANS = "node IS NOT NULL OR parent_id IS NULL OR kind = 'agent'"

# SQLite makes only "INTEGER PRIMARY KEY" an alias of the rowid; PostgreSQL needs 64 bits.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=nullable))


_SQL_TYPES: dict[str, Any] = {
    "longtext": Text,
    "int": Integer,
    "bigint": BigInt,
    "float": Float,
    "json": JSON,
    "time": UTCDateTime,
}
_PY_TYPES: dict[str, Any] = {
    "text": str,
    "longtext": str,
    "int": int,
    "bigint": int,
    "float": float,
    "json": Any,
    "time": datetime,
}


def _model(table: tables.Table, class_name: str, doc: str, *indexes: Index) -> type[SQLModel]:
    """The SQLModel table class of a table defined in ``tables`` (the one definition).

    ``metadata`` is reached as ``metadata_`` (SQLModel keeps ``metadata`` for itself).
    """
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {
        "__tablename__": table.name,
        "__table_args__": indexes,
        "__doc__": doc,
        "__module__": __name__,
        "__annotations__": annotations,
    }
    for column in table.columns:
        attr = "metadata_" if column.name == "metadata" else column.name
        sql_type = (
            AutoString(column.max_length) if column.type == "text" else _SQL_TYPES[column.type]
        )
        py_type = _PY_TYPES[column.type]
        annotations[attr] = py_type if not column.nullable else (py_type | None)
        sa_column = Column(
            column.name,
            sql_type,
            primary_key=column.primary_key,
            nullable=column.nullable and not column.primary_key,
            default=None if callable(column.default) else column.default,
        )
        if column.default is not None and not callable(column.default):
            namespace[attr] = Field(default=column.default, sa_column=sa_column)
        elif column.nullable or column.generated or column.default is not None:
            namespace[attr] = Field(default=None, sa_column=sa_column)
        else:
            namespace[attr] = Field(sa_column=sa_column)  # required
    return types.new_class(
        class_name, (SQLModel,), {"table": True}, lambda ns: ns.update(namespace)
    )


Rollout = _model(
    tables.ROLLOUT,
    "Rollout",
    "One execution of a workflow for one request (a trace root).",
    Index("ix_rollout_workflow_started", "workflow", "started_at"),
    Index("ix_rollout_experiment_variant", "experiment_id", "variant"),
    Index("ix_rollout_session", "session_id"),
    Index("ix_rollout_user", "user_id"),
)

Span = _model(
    tables.SPAN,
    "Span",
    "One operation inside a rollout.",
    Index("ix_span_rollout", "rollout_id"),
    Index("ix_span_started", "started_at"),
    # Hot problems group node-level spans by (workflow, node or name): this partial index
    # holds exactly those rows in that order, with what the aggregation reads, so SQLite
    # answers from the index alone without a sort, and p95 is an OFFSET into it.
    Index(
        "ix_span_hot",
        "workflow",
        text("coalesce(node, name)"),
        "duration_ms",
        "started_at",
        "status",
        sqlite_where=text(HOT_SPANS),
        postgresql_where=text(HOT_SPANS),
    ),
)

Feedback = _model(
    tables.FEEDBACK,
    "Feedback",
    "A signal about a rollout or a span: a rating, a thumb, a business event, a judge's score.",
    Index("ix_feedback_rollout", "rollout_id"),
    Index("ix_feedback_created", "created_at"),
    Index("ux_feedback_uid", "uid", unique=True),
)

TelemetryEvent = _model(
    tables.TELEMETRY_EVENT,
    "TelemetryEvent",
    "A raw implicit-feedback event from a user interface.",
    Index("ix_telemetry_rollout", "rollout_id"),
    Index("ix_telemetry_session", "session_id"),
    Index("ux_telemetry_uid", "uid", unique=True),
)


class ConfigVersion(SQLModel, table=True):
    """An immutable, versioned workflow configuration."""

    __tablename__ = "config_version"
    __table_args__ = (Index("ux_config_version", "workflow", "version", unique=True),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    workflow: str = Field(max_length=200)
    version: int
    config: Any = _json(nullable=False)
    config_hash: str = Field(max_length=64)
    parent_id: int | None = Field(default=None, sa_type=BigInt)
    created_by: str = Field(default="user", max_length=200)
    note: str | None = Field(default=None, sa_type=Text)
    created_at: datetime


class Deployment(SQLModel, table=True):
    """Which config version is active for each workflow."""

    __tablename__ = "deployment"

    workflow: str = Field(primary_key=True, max_length=200)
    active_version_id: int = Field(sa_type=BigInt)
    updated_at: datetime


class Experiment(SQLModel, table=True):
    """A running or finished comparison of config versions on live traffic."""

    __tablename__ = "experiment"
    __table_args__ = (Index("ix_experiment_workflow_status", "workflow", "status"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    workflow: str = Field(max_length=200)
    status: str = Field(default="running", max_length=20)
    baseline_version_id: int = Field(sa_type=BigInt)
    variants: Any = _json(nullable=False)
    unit: str = Field(default="user_id", max_length=20)
    metrics: Any = _json()
    started_at: datetime
    ended_at: datetime | None = None
    decision: Any = _json()


class ChangeEvent(SQLModel, table=True):
    """The audit log: activations, experiments, promotions, rollbacks and triggers."""

    __tablename__ = "change_event"
    __table_args__ = (Index("ix_change_event_workflow_created", "workflow", "created_at"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    workflow: str = Field(max_length=200)
    kind: str = Field(max_length=40)
    from_version_id: int | None = Field(default=None, sa_type=BigInt)
    to_version_id: int | None = Field(default=None, sa_type=BigInt)
    actor: str = Field(default="system", max_length=200)
    reason: str | None = Field(default=None, sa_type=Text)
    evidence: Any = _json()
    created_at: datetime


class RoutingWeight(SQLModel, table=True):
    """A routing weight per agent and skill, with the posterior it was drawn from."""

    __tablename__ = "routing_weight"

    agent_id: str = Field(primary_key=True, max_length=200)
    skill: str = Field(default="*", primary_key=True, max_length=200)
    weight: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    n: int = 0
    updated_at: datetime


class ModelArtifact(SQLModel, table=True):
    """A versioned learned model kept in the store (the implicit satisfaction model)."""

    __tablename__ = "model_artifact"
    __table_args__ = (Index("ux_model_artifact", "name", "version", unique=True),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    name: str = Field(max_length=200)
    version: int
    payload: Any = _json(nullable=False)
    metrics: Any = _json()
    created_at: datetime


class CurationWatermark(SQLModel, table=True):
    """How far the controller has curated a workflow's datasets: the rollout and feedback
    counts of each day it read, and the newest feedback it saw."""

    __tablename__ = "curation_watermark"

    workflow: str = Field(primary_key=True, max_length=200)
    state: Any = _json(nullable=False)
    updated_at: datetime


class CycleLease(SQLModel, table=True):
    """Who runs the control loop's cycle now, on a store without advisory locks (SQLite): a
    holder that stops renewing loses it at ``expires_at`` (epoch seconds)."""

    __tablename__ = "cycle_lease"

    name: str = Field(primary_key=True, max_length=100)
    holder: str = Field(max_length=300)
    acquired_at: datetime
    expires_at: float


ALL_TABLES = [
    Rollout,
    Span,
    Feedback,
    TelemetryEvent,
    ConfigVersion,
    Deployment,
    Experiment,
    ChangeEvent,
    RoutingWeight,
    ModelArtifact,
    CurationWatermark,
    CycleLease,
]
