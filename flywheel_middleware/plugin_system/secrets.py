"""The default redactor: API keys, tokens and passwords never reach the store.

On unless ``redaction: {secrets: false}``. It runs as a recorder transform (on the writer,
never on the agent's thread) over every free-text and JSON column of a span, rollout,
feedback or telemetry record: strings are scanned for known key formats, and a value under a
credential-named key (``authorization``, ``api_key``, ``password``, ``*_token``, ...) is
replaced whole. Containers are copied where something changed, never edited, so the agent's
own objects stay as they were. Plain ``re`` only: no plugin is loaded for it. It runs after
the redaction plugins and keeps what they wrote (``[REDACTED:email]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from flywheel_middleware.capture.serialize import to_jsonable
from flywheel_middleware.tables import RECORDED

REDACTED = "[REDACTED]"

# (name, pattern, needles). Group 1, when a pattern has one, is kept (``sk-proj-[REDACTED]``)
# so a reader still sees what kind of secret was there. A pattern runs only on text that holds
# one of its needles (a ``str`` search is several times cheaper than a regex pass); the needles
# of a case-blind pattern (``(?i)``) are looked for in the lower-cased text.
PATTERNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("openai_anthropic", r"(sk-(?<![\w-]sk-)(?:proj-|ant-|svcacct-|admin-)?)[\w\-]{16,}", ("sk-",)),
    ("github", r"(gh[pousr]_(?<![\w-]gh._))\w{20,}", ("gh",)),
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

# The columns scanned: every free-text and JSON column of the recorded tables.
_COLUMNS = {
    name: tuple(c.name for c in table.columns if c.type in ("json", "longtext"))
    for name, table in RECORDED.items()
}
_SCALARS = (int, float, bool, type(None))
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
        self._patterns += [(re.compile(p), (), False) for p in patterns]  # always run
        self._keys = frozenset(KEYS) | {_normal_key(k) for k in keys}
        self._always = bool(self._patterns[len(PATTERNS) :])  # a user's pattern has no needle
        self._line_needles = _line_needles(self._keys)
        self._key_verdicts: dict[str, bool] = {}
        self._seen: dict[str, str] = {}  # long text -> the text redacted

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

    def may_hold_secrets(self, line: bytes) -> bool:
        """Whether a record's JSON text (its journal line) holds anything a secret would
        (a pattern's needle, a credential-named key): the recorder runs ``redact_record``
        only on those, so a record with none costs one search of its text, not a walk."""
        if self._always:
            return True
        lowered = line.lower()
        return any(all(n in lowered for n in group) for group in self._line_needles)

    # -- values and records ------------------------------------------------------------------

    def value(self, value: Any, _depth: int = 0) -> Any:
        """``value`` with its secrets replaced: the same object when it held none, else a copy.
        An object that is not plain data becomes its JSON form (what the writer stores)."""
        cls = value.__class__
        if cls is str:
            return self.text(value)
        if cls in _SCALARS:
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

    def redact_record(self, record: Any) -> None:
        """The recorder transform: scrub the record's free-text and JSON columns in place."""
        for column in _COLUMNS.get(record.TABLE, ()):
            old = getattr(record, column, None)
            if old is None:
                continue
            new = self.value(old)
            if new is not old:
                setattr(record, column, new)


# What a record's lower-cased JSON text holds when a pattern could match: each group's
# needles all present. Looser than the patterns (``sk-`` is in "task-"), never tighter.
_PATTERN_NEEDLES: tuple[tuple[bytes, ...], ...] = (
    (b"sk-",),
    *((f"gh{c}_".encode(),) for c in "pousr"),
    (b"github_pat_",),
    (b"xox",),
    (b"akia",),
    (b"asia",),
    (b"aiza",),
    (b"eyj",),
    (b"bearer",),
    (b"://", b"@"),
    (b"private key",),
    *((word.encode(),) for word in ("api_key", "api-key", "apikey", "passw", "passwd")),
    *((word.encode(),) for word in ("secret", "access_token", "access-token", "auth_token")),
    (b"auth-token",),
    (b"accesstoken",),
    (b"authtoken",),
)


def _line_needles(keys: Iterable[str]) -> tuple[tuple[bytes, ...], ...]:
    """The patterns' needles, and each credential key as a JSON key would spell it (its
    words joined by ``_``, ``-``, ``.`` or a space), ending at the key's closing quote."""
    spelled = set()
    for key in keys:
        for joint in "_-. ":
            spelled.add((key.replace("_", joint) + '"').encode())
    return _PATTERN_NEEDLES + tuple((k,) for k in sorted(spelled))


def _kept_under_secret_key(value: Any) -> bool:
    """None, a flag, or what a redactor already replaced (``[REDACTED:email]``)."""
    if value is None or value.__class__ is bool:
        return True
    return isinstance(value, str) and value.startswith(REDACTED[:-1])


def _replacement(match: re.Match[str]) -> str:
    kept = match.group(1) if match.re.groups else None
    return f"{kept}{REDACTED}" if kept else REDACTED


def install_secret_redaction(recorder: Any, redaction: Any) -> bool:
    """Add the default redactor to ``recorder`` unless ``redaction.secrets`` is off (True
    when added). ``redaction`` is the YAML's ``redaction:`` section."""
    if not redaction.secrets:
        return False
    redactor = SecretRedactor(redaction.patterns, redaction.keys)
    recorder.add_transform(redactor.redact_record, applies_to=redactor.may_hold_secrets)
    return True
