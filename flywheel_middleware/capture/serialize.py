"""Turn whatever an agent passes around into bounded JSON, off the agent's thread.

The caller only takes a cheap shallow snapshot (`snapshot`); the writer thread converts it
(`to_json_text`), so the agent never pays for serializing its own messages.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import json
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

MAX_STRING = 32_000
MAX_ITEMS = 1_000
MAX_DEPTH = 12


def snapshot(value: Any) -> Any:
    """Copy containers one level deep so later mutation by the agent does not leak in."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _valid_text(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate (half a UTF-16 pair, from a broken
    decoder) becomes U+FFFD, as no database or JSON encoder takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _short_repr(value: Any) -> str:
    """At most 200 characters of ``repr(value)``; a value too deep (or too odd) to repr
    becomes a placeholder naming its type."""
    try:
        return _truncate(repr(value), 200)
    except Exception:  # RecursionError among them
        return f"<{type(value).__name__} nested too deep to show>"


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"…[truncated {len(text) - limit} chars]"


def to_jsonable(value: Any, *, max_string: int = MAX_STRING, _depth: int = 0) -> Any:
    """A JSON-compatible copy of ``value``: strings capped, containers capped, unknowns as repr."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return (
            value if value == value and value not in (float("inf"), float("-inf")) else str(value)
        )
    if isinstance(value, str):
        return _truncate(_valid_text(value), max_string)
    if _depth >= MAX_DEPTH:
        return _short_repr(value)
    nxt = _depth + 1
    if isinstance(value, Mapping):
        out = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= MAX_ITEMS:
                out["…"] = f"{len(value) - MAX_ITEMS} more items"
                break
            out[str(k)] = to_jsonable(v, max_string=max_string, _depth=nxt)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        out_list = [to_jsonable(v, max_string=max_string, _depth=nxt) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            out_list.append(f"…{len(items) - MAX_ITEMS} more items")
        return out_list
    if isinstance(value, bytes | bytearray):
        head = base64.b64encode(bytes(value[:256])).decode()
        return {"type": "bytes", "size": len(value), "head_base64": head}
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, max_string=max_string, _depth=nxt)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), max_string=max_string, _depth=nxt)
    dump = getattr(value, "model_dump", None)  # pydantic v2, LangChain messages, OpenAI objects
    if callable(dump):
        try:
            return to_jsonable(dump(), max_string=max_string, _depth=nxt)
        except Exception:
            pass
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return to_jsonable(to_dict(), max_string=max_string, _depth=nxt)
        except Exception:
            pass
    try:
        return _truncate(repr(value), 2_000)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


_MAX_FAST_TEXT = 64_000
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _fallback(value: Any) -> Any:
    converted = to_jsonable(value)
    if converted is value:  # pragma: no cover - to_jsonable always converts unknown types
        raise TypeError
    return converted


_dumps_objects = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_fallback
).encode


# orjson encodes the plain data an agent passes around (str, int, float, bool, None, dict,
# list, tuple, and subclasses; enums and UUIDs as their value) several times faster than the
# stdlib, into the same text (floats may spell a small exponent differently, ``1e-7`` for
# ``1e-07``). Without ``default`` it raises on anything else, and datetimes and dataclasses are
# passed through to raise too, so those keep their stdlib/``to_jsonable`` encoding.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads


def to_json_text(value: Any) -> str | None:
    """The JSON text stored in a JSON column (None stays SQL NULL).

    orjson handles plain data; anything it rejects goes to the stdlib's C encoder, and
    anything large, circular, NaN or exotic through ``to_jsonable``, which caps sizes and
    never fails.
    """
    if value is None:
        return None
    try:
        raw = _orjson_dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: exotic type, huge int, deep nesting, surrogate
        raw = None
    # orjson writes NaN and infinities as null. Text with a null is kept only if it reads back
    # as the value itself (NaN equals nothing, so a NaN or an infinity fails the test and goes
    # to the stdlib encoder, which rejects them: ``to_jsonable`` keeps them as text). That
    # costs well under a microsecond, where the stdlib encoder costs several.
    if raw is not None and (b"null" not in raw or _orjson_loads(raw) == value):
        text = raw.decode()
        if len(text) <= _MAX_FAST_TEXT:
            return text
        return _dumps(to_jsonable(value))
    try:
        text = _dumps_objects(value)
    except (ValueError, TypeError, RecursionError):
        text = None
    if text is None or len(text) > _MAX_FAST_TEXT:
        text = _dumps(to_jsonable(value))
    return text
