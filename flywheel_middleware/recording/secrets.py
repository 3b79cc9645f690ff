"""The default redactor: API keys, tokens and passwords never reach the store.

On unless ``redaction: {secrets: false}``. It runs where rows are built from the journal's
lines (the writer process on a SQLite file, else the recorder's writer thread), never on the
agent's thread nor the journal thread, over every free-text and JSON column of a span,
rollout, feedback or telemetry record: strings are scanned for known key formats, and a value
under a credential-named key (``authorization``, ``api_key``, ``password``, ``*_token``, ...)
is replaced whole. Plain ``re`` only: no plugin is loaded for it. It runs after the redaction
plugins and keeps what they wrote (``[REDACTED:email]``). Until a record is stored, it sits
unredacted in the journal, which only this user can read and which is deleted once stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from flywheel_middleware.capture.records import CallRecord
from flywheel_middleware.capture.serialize import to_jsonable
from flywheel_middleware.tables import RECORDED

REDACTED = "[REDACTED]"

# (name, pattern, needles). Group 1, when a pattern has one, is kept (``sk-proj-[REDACTED]``)
# so a reader still sees what kind of secret was there. A pattern runs only on text that holds
# one of its needles (a ``str`` search is several times cheaper than a regex pass); the needles
# of a case-blind pattern (``(?i)``) are looked for in the lower-cased text.
PATTERNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("openai_anthropic", r"(sk-(?<![\w-]sk-)(?:proj-|ant-|svcacct-|admin-)?)[\w\-]{16,}", ("sk-",)),
    ("github", r"(gh[pousr]_(?<![\w-]gh._))\w{20,}", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    ("github_pat", r"(github_pat_)\w{20,}", ("github_pat_",)),
    ("slack", r"(xox[abprs]-)[A-Za-z0-9\-]{10,}", ("xox",)),
    ("aws_access_key", r"(A[KS]IA(?<!\wA.IA))[A-Z0-9]{16}\b", ("AKIA", "ASIA")),
    ("google_api_key", r"(AIza)[\w\-]{35}", ("AIza",)),
    ("jwt", r"eyJ[\w\-]{8,}\.[\w\-]{8,}\.[\w\-]{8,}", ("eyJ",)),
    ("bearer", r"(earer(?<=\b[Bb]earer)\s+)[A-Za-z0-9._~+/\-]{12,}=*", ("earer",)),
    ("url_password", r"(://[^\s/:@]*:)[^\s/@]+(?=@)", ("://",)),
    (
        "private_key",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
        ("PRIVATE KEY",),
    ),
    (
        "assignment",  # password=..., "api_key": "...", X-API-Key: ...
        r"(?i)(?<![a-z0-9])((?:(?:x-)?api[_-]?key|password|passwd|client[_-]?secret|secret[_-]?key"
        r"|access[_-]?token|auth[_-]?token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]{4,}",
        ("api", "pass", "secret", "token"),
    ),
)
"""What a secret looks like in free text."""

KEYS: tuple[str, ...] = (
    "authorization",
    "proxy_authorization",
    "api_key",
    "apikey",
    "x_api_key",
    "password",
    "passwd",
    "secret",
    "token",
    "cookie",
    "set_cookie",
    "private_key",
)
"""Keys whose values are secrets, normalised (lower case, ``-``/``.``/space as ``_``); a key
ending in ``_<one of these>`` counts too (``openai_api_key``, ``access_token``)."""

# Where a journal line's values hold the free-text and JSON columns of its table (a call
# record's columns are its span's and its rollout's).
_TYPES = {c.name: c.type for table in RECORDED.values() for c in table.columns}
_SCANNED = {
    table: tuple(i for i, name in enumerate(columns) if _TYPES.get(name) in ("json", "longtext"))
    for table, columns in {
        **{name: table.record_columns for name, table in RECORDED.items()},
        "call": CallRecord.COLUMNS,
    }.items()
}
_SCALARS = (int, float, bool, type(None))
# orjson would write these its own way (a dataclass without its _fields, a datetime as text):
# they raise instead, so such values are walked as the writer stores them.
_PLAIN_DATA_ONLY = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
_KEY_CACHE_LIMIT = 10_000
_MAX_DEPTH = 100
_CACHED_LENGTHS = (200, 20_000)  # texts this long are remembered ...
_CACHED_TEXTS = 512  # ... this many at a time


def _normal_key(key: str) -> str:
    return key.lower().replace("-", "_").replace(".", "_").replace(" ", "_")


class SecretRedactor:
    """Scrubs secrets from record values; ``patterns`` and ``keys`` add to the defaults."""

    def __init__(self, patterns: Iterable[str] = (), keys: Iterable[str] = ()) -> None:
        compiled = [(re.compile(p), needles) for _, p, needles in PATTERNS]
        self._patterns = [(c, n, bool(c.flags & re.IGNORECASE)) for c, n in compiled]
        self._extra_patterns, self._extra_keys = tuple(patterns), frozenset(keys)
        self._patterns += [(re.compile(p), (), False) for p in self._extra_patterns]  # always run
        self._keys = frozenset(KEYS) | {_normal_key(k) for k in self._extra_keys}
        self._key_verdicts: dict[str, bool] = {}
        self._seen: dict[str, str] = {}  # long text -> the text redacted
        self._gate = _gate_needles(self._patterns, self._keys)

    # -- what is a secret --------------------------------------------------------------------

    def secret_key(self, key: str) -> bool:
        """Whether the value under ``key`` is a secret as a whole."""
        verdict = self._key_verdicts.get(key)
        if verdict is None:
            normal = _normal_key(key)
            verdict = normal in self._keys or any(normal.endswith(f"_{k}") for k in self._keys)
            if len(self._key_verdicts) >= _KEY_CACHE_LIMIT:
                self._key_verdicts.clear()
            self._key_verdicts[key] = verdict
        return verdict

    def text(self, text: str) -> str:
        """``text`` with every secret replaced (the same object when it holds none).

        Long texts are remembered: a chat history repeats every earlier message (and the
        system prompt) in each later call."""
        if not _CACHED_LENGTHS[0] <= len(text) <= _CACHED_LENGTHS[1]:
            return self._scan(text)
        known = self._seen.get(text)
        if known is None:
            known = self._scan(text)
            if len(self._seen) >= _CACHED_TEXTS:
                self._seen.clear()
            self._seen[text] = known
        return text if known == text else known

    def _scan(self, text: str) -> str:
        lowered = None
        for pattern, needles, case_blind in self._patterns:
            if needles:
                if case_blind:
                    if lowered is None:
                        lowered = text.lower()
                    haystack = lowered
                else:
                    haystack = text
                for needle in needles:
                    if needle in haystack:
                        break
                else:
                    continue
            text = pattern.sub(_replacement, text)
        return text

    # -- values and records ------------------------------------------------------------------

    def might_hold_secret(self, value: dict | list) -> bool:
        """False only when no key or text in plain JSON data can be a secret: none of the
        needles is in its lower-cased JSON text. One pass over that text costs a fraction of
        walking the value, and almost every span holds no secret."""
        if self._gate is None:
            return True
        try:
            text = orjson.dumps(value, option=_PLAIN_DATA_ONLY).decode().lower()
        except TypeError:  # not plain data (or past orjson's limits): walk it
            return True
        return any(needle in text for needle in self._gate)

    def value(self, value: Any, _depth: int = 0) -> Any:
        """``value`` with its secrets replaced: the same object when it held none, else a copy.
        An object that is not plain data becomes its JSON form (what the writer stores)."""
        cls = value.__class__
        if cls is str:
            return self.text(value)
        if cls in _SCALARS:
            return value
        if _depth == 0 and cls in (dict, list) and not self.might_hold_secret(value):
            return value
        if _depth >= _MAX_DEPTH:  # a cycle, or nesting no scan should follow: keep nothing
            return f"{REDACTED} (nested too deep to scan)"
        deeper = _depth + 1
        if isinstance(value, dict):
            out = None
            for key, item in value.items():
                if isinstance(key, str) and self.secret_key(key):
                    new = item if _kept_under_secret_key(item) else REDACTED
                else:
                    new = self.value(item, deeper)
                if new is not item:
                    if out is None:
                        out = dict(value)
                    out[key] = new
            return value if out is None else out
        if isinstance(value, list | tuple):
            items = [self.value(item, deeper) for item in value]
            if all(new is old for new, old in zip(items, value, strict=True)):
                return value
            return items
        if isinstance(value, str):  # a str subclass (an enum member)
            scrubbed = self.text(value)
            return value if scrubbed == value else scrubbed
        if isinstance(value, bytes | bytearray):
            return value
        return self.value(to_jsonable(value), deeper)

    def scrub(self, table: str, values: list) -> list:
        """A journal line's values with the secrets of their text and JSON columns replaced
        (the list itself, changed in place)."""
        for i in _SCANNED.get(table, ()):
            old = values[i]
            if old is not None:
                values[i] = self.value(old)
        return values

    def settings(self) -> dict[str, list[str]]:
        """What makes another process's redactor the same as this one."""
        return {"patterns": list(self._extra_patterns), "keys": sorted(self._extra_keys)}


def _gate_needles(
    patterns: list[tuple[re.Pattern[str], tuple[str, ...], bool]], keys: Iterable[str]
) -> tuple[str, ...] | None:
    """Lower-case strings one of which is in the lower-cased JSON text of any value that holds
    a secret: each pattern's needles (a pattern runs only where one is), and the longest part
    of each secret key (a key is a secret when its normalised form ends with one; each part
    survives lower-casing as it is). None when a pattern has no needles (it always runs) or a
    needle is not ASCII (lower-casing may then depend on context)."""
    needles = set()
    for _, pattern_needles, _ in patterns:
        if not pattern_needles:
            return None
        needles.update(n.lower() for n in pattern_needles)
    for key in keys:
        needles.add(max(key.split("_"), key=len))
    if not all(needles) or not all(n.isascii() and _json_as_is(n) for n in needles):
        return None
    # A needle holding another is found whenever it is: the shorter one is enough.
    return tuple(sorted(n for n in needles if not any(m != n and m in n for m in needles)))


def _json_as_is(needle: str) -> bool:
    """Whether JSON text holds ``needle`` as it is (no quote, backslash or control character
    that JSON escapes)."""
    return orjson.dumps(needle).decode() == f'"{needle}"'


def _kept_under_secret_key(value: Any) -> bool:
    """None, a flag, or what a redactor already replaced (``[REDACTED:email]``)."""
    if value is None or value.__class__ is bool:
        return True
    return isinstance(value, str) and value.startswith(REDACTED[:-1])


def _replacement(match: re.Match[str]) -> str:
    kept = match.group(1) if match.re.groups else None
    return f"{kept}{REDACTED}" if kept else REDACTED


def secret_redactor(redaction: Any) -> SecretRedactor | None:
    """The default redactor the YAML's ``redaction:`` section asks for (None when off)."""
    if not redaction.secrets:
        return None
    return SecretRedactor(redaction.patterns, redaction.keys)
