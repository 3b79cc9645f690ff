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

# Per table, per record column: how its value is converted ("json", "time" or as it is).
_CONVERSIONS = {
    name: tuple(
        c.type if c.type in ("json", "time") else None for c in t.columns if not c.generated
    )
    for name, t in RECORDED.items()
}


def build_row(table: str, values: tuple, time_conv: TimeConv) -> tuple:
    """The row of ``table`` for a record's ``values()``."""
    return tuple(
        value
        if value is None or conversion is None
        else to_json_text(value)
        if conversion == "json"
        else time_conv(value if value.__class__ is int else datetime_to_ns(value))
        for value, conversion in zip(values, _CONVERSIONS[table], strict=True)
    )


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
