"""The data model: SQLModel tables whose names and columns are the contract of the design.

Span ids are 63-bit integers (the SQLite rowid), so the hot table appends to its B-tree
instead of inserting at random positions; rollout ids are 32 hex digits ordered by time,
which is also the OpenTelemetry trace id of the rollout.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, Text, text
from sqlmodel import Field, SQLModel

# The spans hot-problem analysis looks at: named workflow nodes, top-level spans and agents.
HOT_SPANS = "node IS NOT NULL OR parent_id IS NULL OR kind = 'agent'"

# SQLite makes only "INTEGER PRIMARY KEY" an alias of the rowid; PostgreSQL needs 64 bits.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=nullable))


class Rollout(SQLModel, table=True):
    """One execution of a workflow for one request (a trace root)."""

    __tablename__ = "rollout"
    __table_args__ = (
        Index("ix_rollout_workflow_started", "workflow", "started_at"),
        Index("ix_rollout_experiment_variant", "experiment_id", "variant"),
        Index("ix_rollout_session", "session_id"),
        Index("ix_rollout_user", "user_id"),
    )

    id: str = Field(primary_key=True, max_length=32)
    workflow: str = Field(max_length=200)
    user_id: str | None = Field(default=None, max_length=200)
    session_id: str | None = Field(default=None, max_length=200)
    config_version_id: int | None = Field(default=None, sa_type=BigInt)
    experiment_id: int | None = Field(default=None, sa_type=BigInt)
    variant: str | None = Field(default=None, max_length=100)
    propensity: float | None = None
    input: Any = _json()
    output: Any = _json()
    status: str = Field(default="succeeded", max_length=20)
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime
    ended_at: datetime | None = None
    latency_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cost: float | None = None
    reward: float | None = None
    tags: Any = _json()
    metadata_: Any = Field(default=None, sa_column=Column("metadata", JSON))


class Span(SQLModel, table=True):
    """One operation inside a rollout."""

    __tablename__ = "span"
    __table_args__ = (
        Index("ix_span_rollout", "rollout_id"),
        Index("ix_span_started", "started_at"),
        Index("ix_span_kind", "kind"),
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

    id: int = Field(primary_key=True, sa_type=BigInt)
    rollout_id: str = Field(max_length=32)
    workflow: str | None = Field(default=None, max_length=200)
    trace_id: str | None = Field(default=None, max_length=32)
    parent_id: int | None = Field(default=None, sa_type=BigInt)
    sequence: int = 0
    kind: str = Field(default="chain", max_length=20)
    name: str = Field(max_length=500)
    node: str | None = Field(default=None, max_length=200)
    status: str = Field(default="ok", max_length=20)
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime
    ended_at: datetime | None = None
    duration_ms: float | None = None
    model: str | None = Field(default=None, max_length=200)
    input: Any = _json()
    output: Any = _json()
    input_tokens: int | None = None
    output_tokens: int | None = None
    attributes: Any = _json()


class Feedback(SQLModel, table=True):
    """A signal about a rollout or a span: a rating, a thumb, a business event, a judge's score."""

    __tablename__ = "feedback"
    __table_args__ = (
        Index("ix_feedback_rollout", "rollout_id"),
        Index("ix_feedback_created", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    rollout_id: str = Field(max_length=32)
    span_id: int | None = Field(default=None, sa_type=BigInt)
    source: str = Field(default="explicit", max_length=20)
    key: str = Field(default="rating", max_length=100)
    value: float | None = None
    comment: str | None = Field(default=None, sa_type=Text)
    user_id: str | None = Field(default=None, max_length=200)
    created_at: datetime
    metadata_: Any = Field(default=None, sa_column=Column("metadata", JSON))


class TelemetryEvent(SQLModel, table=True):
    """A raw implicit-feedback event from a user interface."""

    __tablename__ = "telemetry_event"
    __table_args__ = (
        Index("ix_telemetry_rollout", "rollout_id"),
        Index("ix_telemetry_session", "session_id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    session_id: str | None = Field(default=None, max_length=200)
    rollout_id: str | None = Field(default=None, max_length=32)
    event_type: str = Field(max_length=50)
    payload: Any = _json()
    client_ts: float | None = None
    received_at: datetime


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
]
