"""Records into database rows: the one row builder both writers use (the recorder's thread
and the writer process), from records or from the journal's lines.

A row is a record's values in ``tables`` column order, with JSON columns as JSON text and
times through the store's conversion (SQLite's text or an aware datetime).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flywheel_middleware.capture.records import Record, datetime_to_ns, split_call
from flywheel_middleware.capture.serialize import to_json_text
from flywheel_middleware.tables import RECORDED

TimeConv = Callable[[int | None], Any]


def _positions(table: str, *column_types: str) -> tuple[int, ...]:
    """Where a record of ``table`` holds its columns of ``column_types``."""
    columns = [c for c in RECORDED[table].columns if not c.generated]
    return tuple(i for i, column in enumerate(columns) if column.type in column_types)


_JSON_AT = {table: _positions(table, "json") for table in RECORDED}
TIME_AT = {table: _positions(table, "time") for table in RECORDED}
"""Where a record of each table holds times (ns integers, or datetimes until encoded)."""
_NUMBER_AT = {
    table: tuple(
        (i, int if c.type in ("int", "bigint") else float, c.name)
        for i, c in enumerate(c for c in RECORDED[table].columns if not c.generated)
        if c.type in ("int", "bigint", "float")
    )
    for table in RECORDED
}
_INT64 = 2**63


def _number(value: Any, kind: type) -> int | float | None:
    """``value`` as the column's number, or None when it is none (``"n/a"``, a dict)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    if kind is int:
        if number != int(number) or not -_INT64 <= number < _INT64:
            return None
        return int(number)
    return float(number)


def build_row(
    table: str, values: tuple | list, time_conv: TimeConv, notes: list[str] | None = None
) -> tuple:
    """The row of ``table`` for a record's ``values()``.

    A number column holding something else (an API's ``"prompt_tokens": "n/a"``) is stored
    as its number when it reads as one, else as NULL, with a line in ``notes``: one odd
    value must not cost the whole record, nor its batch.
    """
    row = list(values)
    for i, kind, name in _NUMBER_AT[table]:
        value = row[i]
        if value is None or (
            value.__class__ is kind and (kind is float or -_INT64 <= value < _INT64)
        ):
            continue
        row[i] = _number(value, kind)
        if notes is not None and (row[i] is None or row[i] != value):
            notes.append(f"{table}.{name}: {value!r:.60} stored as {row[i]!r}")
    for i in _JSON_AT[table]:
        if row[i] is not None:
            row[i] = to_json_text(row[i])
    for i in TIME_AT[table]:
        value = row[i]
        if value is not None:
            row[i] = time_conv(value if value.__class__ is int else datetime_to_ns(value))
    return tuple(row)


def rows_of(
    table: str, values: tuple | list, time_conv: TimeConv, notes: list[str] | None = None
) -> list[tuple[str, tuple]]:
    """The ``(table, row)`` pairs a queued record's values stand for: two for a call record
    (its span and its rollout), else one."""
    if table == "call":
        span, rollout = split_call(values)
        return [
            ("span", build_row("span", span, time_conv, notes)),
            ("rollout", build_row("rollout", rollout, time_conv, notes)),
        ]
    return [(table, build_row(table, values, time_conv, notes))]


def record_row(record: Record, time_conv: TimeConv) -> tuple:
    """The row of a span, rollout, feedback or telemetry record."""
    return build_row(record.TABLE, record.values(record), time_conv)
