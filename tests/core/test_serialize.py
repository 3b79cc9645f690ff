"""JSON columns: orjson's text for plain data, the stdlib's for everything else, never a failure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import uuid
from collections import namedtuple

from hypothesis import given
from hypothesis import strategies as st

from flywheel_middleware.capture.serialize import to_json_text, to_jsonable

_stdlib = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(plain)
def test_plain_data_encodes_to_the_same_json_as_the_stdlib(value):
    try:
        expected = _stdlib(value)
    except UnicodeEncodeError:  # pragma: no cover - lone surrogates never reach here
        return
    text = to_json_text(value)
    if value is None:
        assert text is None  # SQL NULL, not JSON null
        return
    assert json.loads(text) == json.loads(expected)
    if not any(isinstance(v, float) for v in _leaves(value)):
        assert text == expected  # byte for byte (floats may spell an exponent differently)


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    when: dt.datetime


Pair = namedtuple("Pair", "a b")


def test_values_orjson_would_spell_differently_keep_their_previous_text():
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)
    cases = {
        "nan": ({"x": math.nan, "y": None}, '{"x":"nan","y":null}'),
        "inf": ([math.inf], '["inf"]'),
        "datetime": ({"t": when}, '{"t":"2026-01-02T03:04:05.000006+00:00"}'),
        "dataclass": (Point(1, when), '{"x":1,"when":"2026-01-02T03:04:05.000006+00:00"}'),
        "int keys": ({1: "a", None: "b"}, '{"1":"a","null":"b"}'),
        "huge int": ([2**70], f"[{2**70}]"),
        "namedtuple": (Pair(1, "x"), '[1,"x"]'),
        "enum": ({"c": Colour.RED}, '{"c":"red"}'),
        "uuid": (uuid.UUID(int=1), '"00000000-0000-0000-0000-000000000001"'),
        "bytes": (b"hi", json.dumps(to_jsonable(b"hi"), separators=(",", ":"))),
    }
    for name, (value, expected) in cases.items():
        assert to_json_text(value) == expected, name


def test_large_and_circular_values_are_capped_not_raised():
    big = {"text": "x" * 100_000}
    assert len(to_json_text(big)) < 40_000
    loop: list = []
    loop.append(loop)
    assert to_json_text(loop).startswith("[")
    deep: list = []
    cur = deep
    for _ in range(400):
        cur.append([])
        cur = cur[0]
    assert json.loads(to_json_text(deep))
    assert to_json_text(None) is None
    assert to_json_text("\ud800") is not None
