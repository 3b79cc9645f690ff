"""Plain records the hot path hands to the recorder.

They are slotted objects with no validation: building one costs a few hundred nanoseconds,
where a SQLModel instance costs tens of microseconds. The writer thread turns them into rows.
"""

from __future__ import annotations

import marshal
import operator
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar

from flywheel_middleware.capture.serialize import to_json_text


def ns_to_datetime(ns: int | None) -> datetime | None:
    """Aware UTC datetime (what every table stores) from a time.time_ns() value."""
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)


_second_text: dict[int, str] = {}


def ns_to_sqlite_text(ns: int | None) -> str | None:
    """The text SQLAlchemy stores for a UTC DateTime on SQLite; the seconds part is cached."""
    if ns is None:
        return None
    sec, rest = divmod(ns, 1_000_000_000)
    prefix = _second_text.get(sec)
    if prefix is None:
        if len(_second_text) > 4096:
            _second_text.clear()
        prefix = datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        _second_text[sec] = prefix
    return f"{prefix}.{rest // 1000:06d}"


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
    _row_builder: ClassVar[Callable[..., tuple]]
    _values_row_builder: ClassVar[Callable[..., tuple]]
    values: ClassVar[Callable[[Record], tuple]]  # the column values in order, as they are
    JSON_COLUMNS: ClassVar[frozenset[str]] = frozenset()
    TIME_COLUMNS: ClassVar[frozenset[str]] = frozenset()
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # the table's NOT NULL defaults (callables are called)

    def __init__(self, **values: Any) -> None:
        """Set every column from ``values``: the class's ``DEFAULTS`` where absent, else None."""
        for name in self.COLUMNS:
            value = values.pop(name, None)
            if value is None and name in self.DEFAULTS:
                default = self.DEFAULTS[name]
                value = default() if callable(default) else default
            setattr(self, name, value)
        if values:
            raise TypeError(f"unknown {self.TABLE} fields: {sorted(values)}")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "COLUMNS" in cls.__dict__:
            cls._row_builder = staticmethod(_compile_row_builder(cls, "r.{name}"))
            cls._values_row_builder = staticmethod(_compile_row_builder(cls, "r[{index}]"))
            cls.values = staticmethod(operator.attrgetter(*cls.COLUMNS))

    def to_row(self, time_conv: Callable[[int | None], Any] = ns_to_datetime) -> tuple:
        """Column values in order; JSON columns as text, times through ``time_conv``."""
        return self._row_builder(self, time_conv, to_json_text, _time)

    @classmethod
    def row_from_values(
        cls, values: tuple, time_conv: Callable[[int | None], Any] = ns_to_datetime
    ) -> tuple:
        """``to_row`` of the record whose ``values()`` these are (the writer process gets those)."""
        return cls._values_row_builder(values, time_conv, to_json_text, _time)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.COLUMNS}


def _time(value: Any, conv: Callable[[int | None], Any]) -> Any:
    if value is None:
        return None
    if not isinstance(value, int):
        value = datetime_to_ns(value)
    return conv(value)


def _compile_row_builder(cls: type[Record], access: str) -> Callable[..., tuple]:
    """One straight-line function per record type: no per-column loop on the writer thread.

    ``access`` spells how column ``{name}`` (number ``{index}``) is read from the argument: an
    attribute of a record, or an item of its ``values()`` tuple.
    """
    parts = []
    for index, name in enumerate(cls.COLUMNS):
        # None (most optional columns) and int times (every hot-path record) are tested inline:
        # a function call per column is a good part of the writer's time per row.
        get = access.format(name=name, index=index)
        if name in cls.JSON_COLUMNS:
            parts.append(f"(None if (v := {get}) is None else j(v))")
        elif name in cls.TIME_COLUMNS:
            parts.append(f"(tc(v) if (v := {get}).__class__ is int else t(v, tc))")
        else:
            parts.append(get)
    source = f"def build(r, tc, j, t):\n    return ({', '.join(parts)},)\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<row builder {cls.__name__}>", "exec"), namespace)  # noqa: S102
    return namespace["build"]


class SpanRecord(Record):
    """A finished span. Times are ``time.time_ns()`` integers until written."""

    __slots__ = (
        "id",
        "rollout_id",
        "workflow",
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
    DEFAULTS = {"sequence": 0, "kind": "chain", "status": "ok"}


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
    DEFAULTS = {"status": "succeeded"}


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
    DEFAULTS = {"source": "explicit", "key": "rating", "created_at": time.time_ns}


class TelemetryRecord(Record):
    __slots__ = ("session_id", "rollout_id", "event_type", "payload", "client_ts", "received_at")
    TABLE = "telemetry_event"
    COLUMNS = __slots__
    JSON_COLUMNS = frozenset({"payload"})
    TIME_COLUMNS = frozenset({"received_at"})
    DEFAULTS = {"received_at": time.time_ns}


class CallRecord(Record):
    """A finished call that was a rollout with one span, recorded whole (``record_call``).

    One record on the agent's thread instead of two, and usually not even an object: it waits
    in the queue as its packed values (``pack_call``). The writer (thread or process) turns it
    into its span and rollout rows (``split``).
    """

    __slots__ = (
        "span_id",
        "rollout_id",
        "workflow",
        "kind",
        "name",
        "node",
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
        "user_id",
        "session_id",
        "tags",
        "metadata",
    )
    TABLE = "call"
    COLUMNS = __slots__

    def split(self) -> tuple[SpanRecord, RolloutRecord]:
        error = self.error
        span_status, rollout_status, tokens_in, tokens_out, total = _call_outcome(
            error, self.input_tokens, self.output_tokens
        )
        span = SpanRecord.__new__(SpanRecord)
        span.id = self.span_id
        span.rollout_id = self.rollout_id
        span.workflow = self.workflow
        span.trace_id = span.parent_id = None
        span.sequence = 0
        span.kind = self.kind
        span.name = self.name
        span.node = self.node
        span.status = span_status
        span.error = error
        span.started_at = self.started_at
        span.ended_at = self.ended_at
        span.duration_ms = self.duration_ms
        span.model = self.model
        span.input = self.input
        span.output = self.output
        span.input_tokens = self.input_tokens
        span.output_tokens = self.output_tokens
        span.attributes = self.attributes
        rollout = RolloutRecord.__new__(RolloutRecord)
        rollout.id = self.rollout_id
        rollout.workflow = self.workflow
        rollout.user_id = self.user_id
        rollout.session_id = self.session_id
        rollout.config_version_id = rollout.experiment_id = rollout.variant = None
        rollout.propensity = rollout.cost = rollout.reward = None
        rollout.input = self.input
        rollout.output = self.output
        rollout.status = rollout_status
        rollout.error = error
        rollout.started_at = self.started_at
        rollout.ended_at = self.ended_at
        rollout.latency_ms = self.duration_ms
        rollout.input_tokens, rollout.output_tokens = tokens_in, tokens_out
        rollout.total_tokens = total
        rollout.tags = self.tags
        rollout.metadata = self.metadata
        return span, rollout

    @classmethod
    def from_values(cls, values: tuple) -> CallRecord:
        record = cls.__new__(cls)
        for name, value in zip(cls.COLUMNS, values, strict=True):
            setattr(record, name, value)
        return record


def _call_outcome(
    error: str | None, tokens_in: int | None, tokens_out: int | None
) -> tuple[str, str, int | None, int | None, int | None]:
    """What a call's span and rollout derive from it: the span's status, the rollout's, and
    the rollout's token counts (0 taken as unknown) with their total."""
    tokens_in, tokens_out = tokens_in or None, tokens_out or None
    total = (tokens_in or 0) + (tokens_out or 0) if tokens_in or tokens_out else None
    if error is None:
        return "ok", "succeeded", tokens_in, tokens_out, total
    return "error", "failed", tokens_in, tokens_out, total


def call_rows(values: tuple, time_conv: Callable[[int | None], Any]) -> tuple[tuple, tuple]:
    """The span row and the rollout row of a call record's ``values()``: what ``split`` and
    two ``to_row`` calls give, in one pass. Why: the writer process gets every call this way,
    and the shared input and output are then serialized once, not once for each row."""
    (span_id, rollout_id, workflow, kind, name, node, error, started, ended, duration,
     model, input_, output, tokens_in, tokens_out, attributes, user_id, session_id, tags,
     metadata) = values  # fmt: skip
    span_status, rollout_status, rollout_in, rollout_out, total = _call_outcome(
        error, tokens_in, tokens_out
    )
    input_text, output_text = to_json_text(input_), to_json_text(output)
    started, ended = _time(started, time_conv), _time(ended, time_conv)
    span = (
        span_id, rollout_id, workflow, None, None, 0, kind, name, node, span_status, error,
        started, ended, duration, model, input_text, output_text, tokens_in, tokens_out,
        to_json_text(attributes),
    )  # fmt: skip
    rollout = (
        rollout_id, workflow, user_id, session_id, None, None, None, None, input_text,
        output_text, rollout_status, error, started, ended, duration, rollout_in, rollout_out,
        total, None, None, to_json_text(tags), to_json_text(metadata),
    )  # fmt: skip
    return span, rollout


def pack_call(**values: Any) -> bytes | CallRecord:
    """A call record (its ``CallRecord.COLUMNS`` by name) as it waits in the recorder's queue:
    its values marshalled.

    Why: a queued record keeps its input and attribute containers alive until the writer
    takes it, and on a busy agent those survivors drive the cyclic GC (young collections,
    and in time full ones over the whole heap) on the agent's thread. A ``bytes`` object is
    not tracked by the GC at all. Values marshal will not take (an object, a ``str``
    subclass) keep the record as an object instead.
    """
    ordered = tuple(values[name] for name in CallRecord.COLUMNS)
    try:
        return marshal.dumps(ordered)
    except ValueError:
        return CallRecord.from_values(ordered)


def unpack_record(item: Record | bytes) -> Record:
    """The record a queued item stands for (``pack_call``'s bytes become a ``CallRecord``)."""
    return CallRecord.from_values(marshal.loads(item)) if item.__class__ is bytes else item  # type: ignore[arg-type]


def expand_calls(records: list[Record | bytes]) -> list[Record]:
    """The records with each call record (object or packed) replaced by its span and rollout
    records."""
    if not any(r.__class__ is bytes or r.TABLE == "call" for r in records):  # type: ignore[union-attr]
        return records  # type: ignore[return-value]
    out: list[Record] = []
    for item in records:
        record = unpack_record(item)
        if record.TABLE == "call":
            out.extend(record.split())  # type: ignore[attr-defined]
        else:
            out.append(record)
    return out


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TABLE: cls for cls in (SpanRecord, RolloutRecord, FeedbackRecord, TelemetryRecord)
}
