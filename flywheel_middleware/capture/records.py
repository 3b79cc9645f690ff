"""Plain records the hot path hands to the recorder.

They are slotted objects with no validation: building one costs a few hundred nanoseconds,
where a SQLModel instance costs tens of microseconds. Their columns come from ``tables``;
the recorder turns them into rows (``recording.rows``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import orjson

from flywheel_middleware.tables import FEEDBACK, ROLLOUT, SPAN, TELEMETRY_EVENT, Table


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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def datetime_to_ns(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - _EPOCH) // _MICROSECOND * 1000  # exact: a float timestamp loses the µs


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Record:
    """A row bound for one table: its ``COLUMNS`` in order, set from keywords."""

    __slots__ = ()
    TABLE: ClassVar[str]
    COLUMNS: ClassVar[tuple[str, ...]]
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # values for absent columns (callables are called)
    values: ClassVar[Callable[[Record], tuple]]  # the column values in order, as they are

    def __init__(self, **values: Any) -> None:
        """Set every column by keyword: the class's ``DEFAULTS`` where absent, else None.
        (Each record class gets this as straight-line code, see ``_column_init``.)"""
        raise TypeError(f"{type(self).__name__} has no columns")

    def __init_subclass__(cls, table: Table | None = None, **kwargs: Any) -> None:
        """``table``: the ``tables`` definition whose record this class is."""
        super().__init_subclass__(**kwargs)
        if table is not None:
            cls.TABLE, cls.COLUMNS, cls.DEFAULTS = table.name, table.record_columns, table.defaults
        if "COLUMNS" in cls.__dict__:
            cls.values = staticmethod(operator.attrgetter(*cls.COLUMNS))
            cls.__init__ = _column_init(cls)  # type: ignore[method-assign]

    @classmethod
    def from_values(cls, values: tuple) -> Record:
        """The record whose ``values()`` these are."""
        record = cls.__new__(cls)
        for name, value in zip(cls.COLUMNS, values, strict=True):
            setattr(record, name, value)
        return record

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.COLUMNS}


def _column_init(cls: type[Record]) -> Callable[..., None]:
    """``__init__(self, *, <each column>=None)`` for a record class, written out as one
    straight line of assignments: handles are built on the agent's thread, where a loop
    over twenty columns costs more than the rest of opening a span. Unknown keywords are
    refused by Python itself; a column left None takes the class's default."""
    lines = [f"def __init__(self, *, {', '.join(f'{c}=None' for c in cls.COLUMNS)}):"]
    namespace: dict[str, Any] = {}
    for column in cls.COLUMNS:
        if column not in cls.DEFAULTS:
            lines.append(f"    self.{column} = {column}")
            continue
        namespace[f"default_{column}"] = cls.DEFAULTS[column]
        fallback = f"default_{column}" + ("()" if callable(cls.DEFAULTS[column]) else "")
        lines.append(f"    self.{column} = {fallback} if {column} is None else {column}")
    exec(compile("\n".join(lines), f"<{cls.__name__}.__init__>", "exec"), namespace)  # noqa: S102
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__name__}.__init__"  # errors name the record
    init.__doc__ = f"Set the {cls.TABLE} columns by keyword (None takes the column's default)."
    return init


class SpanRecord(Record, table=SPAN):
    """A finished span. Times are ``time.time_ns()`` integers until written."""

    __slots__ = SPAN.record_columns


class RolloutRecord(Record, table=ROLLOUT):
    """A finished rollout."""

    __slots__ = ROLLOUT.record_columns


class FeedbackRecord(Record, table=FEEDBACK):
    """A feedback row."""

    __slots__ = FEEDBACK.record_columns


class TelemetryRecord(Record, table=TELEMETRY_EVENT):
    """A telemetry event row."""

    __slots__ = TELEMETRY_EVENT.record_columns


class CallRecord(Record):
    """A finished call that was a rollout with one span, recorded whole (``record_call``).

    One record on the agent's thread instead of two, and usually not even an object: it waits
    in the queue as its packed values (``pack_call``). The writer (thread or process) turns it
    into its span and rollout (``split_call``).
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


CALL_ROLLOUT_FIELDS = ("user_id", "session_id", "tags", "metadata")
CALL_SPAN_FIELDS = tuple(
    name for name in CallRecord.COLUMNS if name != "span_id" and name not in CALL_ROLLOUT_FIELDS
)
"""What a call record takes from its span (besides the span's id) and from its rollout."""


def rollout_status(error: str | None) -> str:
    """A finished rollout's status: failed when it ended with an error."""
    return "succeeded" if error is None else "failed"


def token_total(tokens_in: int | None, tokens_out: int | None) -> int | None:
    """A rollout's total tokens; None when neither count is known (0 counts as unknown) or
    one is not a number (the row builder stores such a count as NULL)."""
    if not (tokens_in or tokens_out):
        return None
    if not isinstance(tokens_in or 0, int) or not isinstance(tokens_out or 0, int):
        return None
    return (tokens_in or 0) + (tokens_out or 0)


def _call_sources(columns: tuple[str, ...], renames: dict[str, str]) -> tuple[int | None, ...]:
    """For each of ``columns``: where a call record's values hold it (None: not there)."""
    names = [renames.get(name, name) for name in columns]
    return tuple(CallRecord.COLUMNS.index(n) if n in CallRecord.COLUMNS else None for n in names)


_SPAN_SOURCES = _call_sources(SpanRecord.COLUMNS, {"id": "span_id"})
_ROLLOUT_SOURCES = _call_sources(
    RolloutRecord.COLUMNS, {"id": "rollout_id", "latency_ms": "duration_ms"}
)
_CALL = {name: i for i, name in enumerate(CallRecord.COLUMNS)}
_SPAN = {name: i for i, name in enumerate(SpanRecord.COLUMNS)}
_ROLLOUT = {name: i for i, name in enumerate(RolloutRecord.COLUMNS)}


def split_call(values: tuple) -> tuple[tuple, tuple]:
    """The ``values()`` of the span and of the rollout a call record's ``values`` stand for.

    Both take what the call holds under their column's name (the span's id is the call's
    span_id, the rollout's id its rollout_id, its latency the span's duration), and derive
    the span's status and the rollout's from the error, and the rollout's token counts
    (0 taken as unknown) and their total.
    """
    error = values[_CALL["error"]]
    tokens_in = values[_CALL["input_tokens"]] or None
    tokens_out = values[_CALL["output_tokens"]] or None
    span = [None if i is None else values[i] for i in _SPAN_SOURCES]
    span[_SPAN["sequence"]] = 0
    span[_SPAN["status"]] = "ok" if error is None else "error"
    rollout = [None if i is None else values[i] for i in _ROLLOUT_SOURCES]
    rollout[_ROLLOUT["status"]] = rollout_status(error)
    rollout[_ROLLOUT["input_tokens"]] = tokens_in
    rollout[_ROLLOUT["output_tokens"]] = tokens_out
    rollout[_ROLLOUT["total_tokens"]] = token_total(tokens_in, tokens_out)
    return tuple(span), tuple(rollout)


# Datetimes and dataclasses are refused, so they keep the JSON form ``serialize`` gives them.
PACK_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def pack_call(values: tuple) -> bytes | CallRecord:
    """A call record (its values in ``CallRecord.COLUMNS`` order) as it waits in the
    recorder's queue: a JSON array, which is also its form in the journal.

    Why: a queued record keeps its input and attribute containers alive until the writer
    takes it, and on a busy agent those survivors drive the cyclic GC (young collections,
    and in time full ones over the whole heap) on the agent's thread. A ``bytes`` object is
    not tracked by the GC at all. Values that are not plain data (an object, a datetime)
    keep the record as an object instead; the journal thread converts those.
    """
    try:
        return orjson.dumps(values, option=PACK_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: not plain data
        return CallRecord.from_values(values)  # type: ignore[return-value]


def unpack_record(item: Record | bytes) -> Record:
    """The record a queued item stands for (``pack_call``'s bytes become a ``CallRecord``)."""
    if item.__class__ is bytes:
        return CallRecord.from_values(tuple(orjson.loads(item)))  # type: ignore[arg-type]
    return item  # type: ignore[return-value]


def expand_calls(records: list[Record | bytes]) -> list[Record]:
    """The records with each call record (object or packed) replaced by its span and rollout
    records."""
    if not any(r.__class__ is bytes or r.TABLE == "call" for r in records):  # type: ignore[union-attr]
        return records  # type: ignore[return-value]  # the common batch: nothing to split
    out: list[Record] = []
    for item in records:
        record = unpack_record(item)
        if record.TABLE == "call":
            span, rollout = split_call(record.values(record))
            out += [SpanRecord.from_values(span), RolloutRecord.from_values(rollout)]
        else:
            out.append(record)
    return out


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TABLE: cls for cls in (SpanRecord, RolloutRecord, FeedbackRecord, TelemetryRecord)
}
