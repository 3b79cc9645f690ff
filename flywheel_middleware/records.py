"""Plain records the hot path hands to the recorder.

They are slotted objects with no validation: building one costs a few hundred nanoseconds,
where a SQLModel instance costs tens of microseconds. The writer thread turns them into rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar

from .serialize import to_json_text


def ns_to_datetime(ns: int | None) -> datetime | None:
    """Aware UTC datetime (what every table stores) from a time.time_ns() value."""
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)


def ns_to_sqlite_text(ns: int | None) -> str | None:
    """The text SQLAlchemy stores for a UTC DateTime on SQLite, made without strftime."""
    if ns is None:
        return None
    return (
        datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
        .replace(tzinfo=None)
        .isoformat(sep=" ", timespec="microseconds")
    )


def datetime_to_ns(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1e9)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Record:
    """A row bound for one table; ``COLUMNS`` names the columns ``to_row`` fills in order."""

    __slots__ = ()
    TABLE: ClassVar[str]
    COLUMNS: ClassVar[tuple[str, ...]]
    JSON_COLUMNS: ClassVar[frozenset[str]] = frozenset()
    TIME_COLUMNS: ClassVar[frozenset[str]] = frozenset()

    def to_row(self, time_conv: Callable[[int | None], Any] = ns_to_datetime) -> tuple:
        """Column values in order; times (ns integers or datetimes) go through ``time_conv``."""
        out = []
        for name in self.COLUMNS:
            value = getattr(self, name)
            if name in self.JSON_COLUMNS:
                value = to_json_text(value)
            elif name in self.TIME_COLUMNS and value is not None:
                if not isinstance(value, int):
                    value = datetime_to_ns(value)
                value = time_conv(value)
            out.append(value)
        return tuple(out)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.COLUMNS}


class SpanRecord(Record):
    """A finished span. Times are ``time.time_ns()`` integers until written."""

    __slots__ = (
        "id",
        "rollout_id",
        "trace_id",
        "parent_id",
        "sequence",
        "kind",
        "name",
        "node",
        "status",
        "error",
        "started_at",
        "ended_at",
        "duration_ms",
        "model",
        "input",
        "output",
        "input_tokens",
        "output_tokens",
        "attributes",
    )
    TABLE = "span"
    COLUMNS = __slots__
    JSON_COLUMNS = frozenset({"input", "output", "attributes"})
    TIME_COLUMNS = frozenset({"started_at", "ended_at"})

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.pop(name, None))
        if values:
            raise TypeError(f"unknown span fields: {sorted(values)}")
        if self.sequence is None:
            self.sequence = 0
        if self.status is None:
            self.status = "ok"


class RolloutRecord(Record):
    """A finished rollout."""

    __slots__ = (
        "id",
        "workflow",
        "user_id",
        "session_id",
        "config_version_id",
        "experiment_id",
        "variant",
        "propensity",
        "input",
        "output",
        "status",
        "error",
        "started_at",
        "ended_at",
        "latency_ms",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost",
        "reward",
        "tags",
        "metadata",
    )
    TABLE = "rollout"
    COLUMNS = __slots__
    JSON_COLUMNS = frozenset({"input", "output", "tags", "metadata"})
    TIME_COLUMNS = frozenset({"started_at", "ended_at"})

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.pop(name, None))
        if values:
            raise TypeError(f"unknown rollout fields: {sorted(values)}")
        if self.status is None:
            self.status = "succeeded"


class FeedbackRecord(Record):
    __slots__ = (
        "rollout_id",
        "span_id",
        "source",
        "key",
        "value",
        "comment",
        "user_id",
        "created_at",
        "metadata",
    )
    TABLE = "feedback"
    COLUMNS = __slots__
    JSON_COLUMNS = frozenset({"metadata"})
    TIME_COLUMNS = frozenset({"created_at"})

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.pop(name, None))
        if values:
            raise TypeError(f"unknown feedback fields: {sorted(values)}")


class TelemetryRecord(Record):
    __slots__ = ("session_id", "rollout_id", "event_type", "payload", "client_ts", "received_at")
    TABLE = "telemetry_event"
    COLUMNS = __slots__
    JSON_COLUMNS = frozenset({"payload"})
    TIME_COLUMNS = frozenset({"received_at"})

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.pop(name, None))
        if values:
            raise TypeError(f"unknown telemetry fields: {sorted(values)}")


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TABLE: cls for cls in (SpanRecord, RolloutRecord, FeedbackRecord, TelemetryRecord)
}
