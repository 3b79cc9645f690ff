"""The columns of the tables the hot path writes: span, rollout, feedback, telemetry_event.

The one place they are defined. The records capture builds (their slots, JSON and time
columns, defaults), the rows the recorder writes and the SQLModel models of the store all
follow from these definitions; a test checks that the newest migration creates exactly these
tables. Plain data: no SQLAlchemy here, so the capture layer can import it for free.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

TYPES = ("text", "longtext", "int", "bigint", "float", "json", "time")
"""What a column holds: short text (``max_length``), unbounded text, 32- and 64-bit integers,
a float, JSON (any value), a UTC time."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    max_length: int | None = None
    nullable: bool = True
    default: Any = None  # what a record stores when the value is absent (callables are called)
    primary_key: bool = False
    generated: bool = False  # an id the database assigns: not in the records

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"column {self.name!r}: type {self.type!r} is not one of {TYPES}")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]

    @property
    def record_columns(self) -> tuple[str, ...]:
        """The columns a record carries, in order (what the database assigns is left out)."""
        return tuple(c.name for c in self.columns if not c.generated)

    @property
    def defaults(self) -> dict[str, Any]:
        return {c.name: c.default for c in self.columns if c.default is not None}


def new_uid() -> str:
    """A client-made id for a row whose primary key the database assigns: a retried or
    replayed write of the same row is then recognised and inserted once."""
    return os.urandom(16).hex()


MAX_CLIENT_ID = 200  # characters of a caller's id for a row (see ``client_uid``)
CLIENT_UID_MARK = "k"
"""The first character of a uid made from a caller's id; ``new_uid``'s hex never starts so."""


def client_uid(table: str, key: str, *scope: str | None) -> str:
    """The uid of a row a caller names with ``key`` (the same feedback sent again by a
    retried request, a resubmitted form, a redelivered webhook), so it is stored once.
    ``scope`` (the rollout, the session) keeps one caller's small ids apart from another's."""
    named = "\x00".join((table, key, *(part or "" for part in scope)))
    return CLIENT_UID_MARK + hashlib.sha256(named.encode("utf-8")).hexdigest()[:31]


def _uid() -> Column:
    return Column("uid", "text", max_length=32, default=new_uid)


def _id(name: str = "id") -> Column:
    return Column(name, "bigint", nullable=False, primary_key=True, generated=True)


ROLLOUT = Table(
    "rollout",
    (
        Column("id", "text", max_length=32, nullable=False, primary_key=True),
        Column("workflow", "text", max_length=200, nullable=False),
        Column("user_id", "text", max_length=200),
        Column("session_id", "text", max_length=200),
        Column("config_version_id", "bigint"),
        Column("experiment_id", "bigint"),
        Column("variant", "text", max_length=100),
        Column("propensity", "float"),
        Column("input", "json"),
        Column("output", "json"),
        Column("status", "text", max_length=20, nullable=False, default="succeeded"),
        Column("error", "longtext"),
        Column("started_at", "time", nullable=False),
        Column("ended_at", "time"),
        Column("latency_ms", "float"),
        Column("input_tokens", "int"),
        Column("output_tokens", "int"),
        Column("total_tokens", "int"),
        Column("cost", "float"),
        Column("reward", "float"),
        Column("tags", "json"),
        Column("metadata", "json"),
    ),
)

SPAN = Table(
    "span",
    (
        Column("id", "bigint", nullable=False, primary_key=True),
        Column("rollout_id", "text", max_length=32, nullable=False),
        Column("workflow", "text", max_length=200),
        Column("trace_id", "text", max_length=32),
        Column("parent_id", "bigint"),
        Column("sequence", "int", nullable=False, default=0),
        Column("kind", "text", max_length=20, nullable=False, default="chain"),
        Column("name", "text", max_length=500, nullable=False),
        Column("node", "text", max_length=200),
        Column("status", "text", max_length=20, nullable=False, default="ok"),
        Column("error", "longtext"),
        Column("started_at", "time", nullable=False),
        Column("ended_at", "time"),
        Column("duration_ms", "float"),
        Column("model", "text", max_length=200),
        Column("input", "json"),
        Column("output", "json"),
        Column("input_tokens", "int"),
        Column("output_tokens", "int"),
        Column("attributes", "json"),
    ),
)

FEEDBACK = Table(
    "feedback",
    (
        _id(),
        Column("rollout_id", "text", max_length=32, nullable=False),
        Column("span_id", "bigint"),
        Column("source", "text", max_length=20, nullable=False, default="explicit"),
        Column("key", "text", max_length=100, nullable=False, default="rating"),
        Column("value", "float"),
        Column("comment", "longtext"),
        Column("user_id", "text", max_length=200),
        Column("created_at", "time", nullable=False, default=time.time_ns),
        Column("metadata", "json"),
        _uid(),
    ),
)

TELEMETRY_EVENT = Table(
    "telemetry_event",
    (
        _id(),
        Column("session_id", "text", max_length=200),
        Column("rollout_id", "text", max_length=32),
        Column("event_type", "text", max_length=50, nullable=False),
        Column("payload", "json"),
        Column("client_ts", "float"),
        Column("received_at", "time", nullable=False, default=time.time_ns),
        _uid(),
    ),
)

RECORDED = {t.name: t for t in (ROLLOUT, SPAN, FEEDBACK, TELEMETRY_EVENT)}
"""The tables the recorder writes, by name."""
