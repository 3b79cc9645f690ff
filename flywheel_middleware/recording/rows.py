"""Records into database rows: the one row builder both writers use (the recorder's thread
and the writer process), and what the spill and dead-letter files hold.

A row is a record's values in ``tables`` column order, with JSON columns as JSON text and
times through the store's conversion (SQLite's text or an aware datetime).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flywheel_middleware.capture.records import Record, datetime_to_ns, expand_calls, split_call
from flywheel_middleware.capture.serialize import to_json_text
from flywheel_middleware.tables import RECORDED

TimeConv = Callable[[int | None], Any]


def _positions(table: str, column_type: str) -> tuple[int, ...]:
    """Where a record of ``table`` holds its columns of ``column_type``."""
    columns = [c for c in RECORDED[table].columns if not c.generated]
    return tuple(i for i, column in enumerate(columns) if column.type == column_type)


_JSON_AT = {table: _positions(table, "json") for table in RECORDED}
_TIME_AT = {table: _positions(table, "time") for table in RECORDED}


def build_row(table: str, values: tuple, time_conv: TimeConv) -> tuple:
    """The row of ``table`` for a record's ``values()``."""
    row = list(values)
    for i in _JSON_AT[table]:
        if row[i] is not None:
            row[i] = to_json_text(row[i])
    for i in _TIME_AT[table]:
        value = row[i]
        if value is not None:
            row[i] = time_conv(value if value.__class__ is int else datetime_to_ns(value))
    return tuple(row)


def rows_of(table: str, values: tuple, time_conv: TimeConv) -> list[tuple[str, tuple]]:
    """The ``(table, row)`` pairs a queued record's values stand for: two for a call record
    (its span and its rollout), else one."""
    if table == "call":
        span, rollout = split_call(values)
        return [
            ("span", build_row("span", span, time_conv)),
            ("rollout", build_row("rollout", rollout, time_conv)),
        ]
    return [(table, build_row(table, values, time_conv))]


def record_row(record: Record, time_conv: TimeConv) -> tuple:
    """The row of a span, rollout, feedback or telemetry record."""
    return build_row(record.TABLE, record.values(record), time_conv)


def record_rows(records: list[Record | bytes], time_conv: TimeConv) -> list[tuple[str, tuple]]:
    """The ``(table, row)`` pairs of queued records (call records split into their two)."""
    return [(r.TABLE, record_row(r, time_conv)) for r in expand_calls(records)]
