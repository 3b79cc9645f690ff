"""The journal: acknowledged records on local disk until the store has them.

Each recorder appends the records it was handed, as JSON lines, to segment files of its own
in a private directory per store; a segment is deleted once everything in it is in the
store. A process that dies without finishing (SIGKILL, ``os._exit``, a power cut before the
page cache reaches disk excepted) leaves its segments behind, and the next recorder on the
same store replays them. Writes of replayed rows are idempotent (primary keys and the
``uid`` of feedback and telemetry), so replaying a segment twice adds nothing.

Layout of a journal directory (0700, owned by the user; files 0600)::

    <pid>-<start>.lock              held (flock) by the live process that owns the prefix
    <pid>-<start>.<seq>.journal     its segments: one record per line, ``[table, values]``
                                    (a leading space: integers past 64 bits, read exactly)
    dead-<pid>.jsonl                rows the store refused, with the reason (never replayed)

Nothing here is ever unpickled or executed: a line is JSON, checked for shape before use,
and a directory or file owned by another user is refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from flywheel_middleware.capture.records import (
    PACK_OPTIONS,
    RECORD_TYPES,
    CallRecord,
    Record,
    datetime_to_ns,
)
from flywheel_middleware.capture.serialize import to_jsonable
from flywheel_middleware.errors import safe_url
from flywheel_middleware.recording.rows import TIME_AT, TimeConv, rows_of

log = logging.getLogger("flywheel_middleware.recording.journal")

SEGMENT_BYTES = 8 * 1024 * 1024
"""A segment is closed and a new one started past this size, so committed data is freed."""

_COLUMNS = {table: len(cls.COLUMNS) for table, cls in RECORD_TYPES.items()}
_COLUMNS["call"] = len(CallRecord.COLUMNS)


class UnsafeJournal(Exception):
    """A journal location another user could write: it is neither read nor written."""


def journal_dir(store_url: str, sqlite_path: Path | None, base: str | os.PathLike | None) -> Path:
    """Where a store's journal lives: ``base/<key>`` when a folder is configured, else beside
    a SQLite file (``<file>.flywheel-journal``), else under ``$XDG_STATE_HOME/flywheel``.

    Never the working directory: a shared or world-writable folder there would let another
    user plant files the agent reads.
    """
    key = hashlib.sha1(safe_url(store_url).encode()).hexdigest()[:12]
    if base:
        return Path(base) / key
    if sqlite_path is not None:
        return sqlite_path.with_name(sqlite_path.name + ".flywheel-journal")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "flywheel" / "journal" / key


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check that it is a directory of ours that no one else can
    write; raises ``UnsafeJournal`` naming what is wrong."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeJournal(f"journal location {path} is not a plain directory")
    if info.st_uid != os.getuid():
        raise UnsafeJournal(
            f"journal directory {path} belongs to uid {info.st_uid}, not to this user "
            f"({os.getuid()}); not using it"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, but created open by an older version or a umask
    return path


def _open_private(path: Path, flags: int) -> int:
    """A file descriptor on ``path``, refusing symlinks, FIFOs and devices (opened without
    blocking, then checked) and files of other users."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeJournal(f"{path} is not a regular file of this user; not reading it")
    return fd


# -- the data format -------------------------------------------------------------------------


def encode(item: Record | bytes) -> bytes:
    """One journal line (without its newline) for a queued record."""
    if item.__class__ is bytes:  # a call record packed by ``pack_call``: a JSON array already
        return b'["call",' + item + b"]"  # type: ignore[operator]
    table = item.TABLE  # type: ignore[union-attr]
    values = list(item.values(item))  # type: ignore[union-attr]
    for i in TIME_AT.get(table, ()):
        if values[i] is not None and values[i].__class__ is not int:
            values[i] = _time_ns(values[i])
    try:
        return orjson.dumps([table, values], option=PACK_OPTIONS, default=to_jsonable)
    except TypeError:  # an integer past 64 bits, deeper nesting than orjson takes
        # The stdlib keeps such integers exact; the leading space tells ``decode`` to read the
        # line with it too (orjson would make them floats).
        return b" " + json.dumps([table, to_jsonable(values)], separators=(",", ":")).encode()


def _time_ns(value: Any) -> int | None:
    try:
        return datetime_to_ns(value)
    except Exception:
        return None  # not a time at all: the row builder reports the missing value


class MalformedLine(ValueError):
    """A journal line that is not ``[table, values]`` of a known table."""


def decode(line: bytes) -> tuple[str, list]:
    """``(table, values)`` of a journal line; ``MalformedLine`` when it is anything else."""
    try:
        item = json.loads(line) if line[:1] == b" " else orjson.loads(line)
    except ValueError as exc:  # orjson.JSONDecodeError is one
        raise MalformedLine(f"not JSON: {exc}") from None
    if (
        not isinstance(item, list)
        or len(item) != 2
        or not isinstance(item[1], list)
        or _COLUMNS.get(item[0]) != len(item[1])
    ):
        raise MalformedLine(f"not a [table, values] pair of a known table: {line[:120]!r}")
    return item[0], item[1]


# -- segments ----------------------------------------------------------------------------------


@dataclass
class Segment:
    """One journal file this process appends to; deleted when sealed and all committed."""

    path: Path
    fd: int
    size: int = 0
    pending: int = 0  # chunks written here that the store does not have yet
    sealed: bool = False


@dataclass
class Chunk:
    """Records the journal thread handed on at once: their lines (dropped from memory when
    the buffer is over its size; then read back from the segment), and where they are."""

    data: bytes | None
    count: int
    nbytes: int
    segment: Segment | None = None
    offset: int = 0
    tables: dict[str, int] = field(default_factory=dict)


class JournalWriter:
    """This process's segments in one journal directory (used by the recorder's threads)."""

    def __init__(self, directory: Path) -> None:
        self.directory = ensure_private_dir(directory)
        self.prefix = f"{os.getpid()}-{time.time_ns()}"
        # Locked before it is visible under its name: a replaying process that finds the
        # lock file can never take it in the moment between its creation and its flock.
        hidden = directory / f".{self.prefix}.lock-new"
        self._lock_fd = _open_private(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.rename(hidden, directory / f"{self.prefix}.lock")
        self._seq = 0
        self.active: Segment | None = None
        self.segments: list[Segment] = []

    def append(self, data: bytes) -> tuple[Segment, int]:
        """Write ``data`` (whole lines) to the active segment; ``(segment, offset)``.
        Raises OSError (ENOSPC, EIO) with nothing half-counted."""
        segment = self.active
        if segment is None or segment.size >= SEGMENT_BYTES:
            segment = self._new_segment()
        offset = segment.size
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(segment.fd, view[written:])
        except OSError:
            if written:  # a torn line would fail to parse: cut the file back to its last line
                try:
                    os.ftruncate(segment.fd, offset)
                except OSError:
                    pass
            raise
        segment.size += written
        return segment, offset

    def _new_segment(self) -> Segment:
        old = self.active
        if old is not None:
            old.sealed = True
            if old.pending <= 0:  # the store already has all of it
                self._remove(old)
        self._seq += 1
        path = self.directory / f"{self.prefix}.{self._seq:06d}.journal"
        fd = _open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        segment = Segment(path=path, fd=fd)
        self.segments.append(segment)
        self.active = segment
        return segment

    def committed(self, segment: Segment) -> None:
        """A chunk of ``segment`` is in the store; delete the segment once it holds no more."""
        segment.pending -= 1
        if segment.pending <= 0 and segment.sealed:
            self._remove(segment)

    def _remove(self, segment: Segment) -> None:
        os.close(segment.fd)
        try:
            os.unlink(segment.path)
        except OSError:
            pass
        self.segments.remove(segment)
        if segment is self.active:
            self.active = None

    def read(self, chunk: Chunk) -> bytes:
        """A chunk's lines read back from its segment (they left memory)."""
        assert chunk.segment is not None
        return os.pread(chunk.segment.fd, chunk.nbytes, chunk.offset)

    def close(self) -> int:
        """Release the directory: delete the segments the store has in full, keep the rest
        for the next recorder; returns how many segments are kept."""
        kept = 0
        for segment in list(self.segments):
            if segment.pending <= 0:
                segment.sealed = True
                self._remove(segment)
            else:
                os.close(segment.fd)
                kept += 1
        self.segments.clear()
        self.active = None
        if not kept:
            try:
                os.unlink(self.directory / f"{self.prefix}.lock")
            except OSError:
                pass
        os.close(self._lock_fd)  # releases the flock: the segments are anyone's now
        return kept

    def detach(self) -> None:
        """In a forked child: close our copies without touching the parent's files."""
        for segment in self.segments:
            try:
                os.close(segment.fd)
            except OSError:
                pass
        try:
            os.close(self._lock_fd)
        except OSError:
            pass
        self.segments.clear()


# -- what a dead process left ------------------------------------------------------------------


def has_orphans(directory: Path) -> bool:
    """Whether ``directory`` holds journal segments (a dead process's, or a live one's)."""
    try:
        return any(p.name.endswith(".journal") for p in directory.iterdir())
    except OSError:
        return False


@dataclass
class Orphan:
    """Segments of a process that is gone, claimed (their lock held) by this one."""

    prefix: str
    segments: list[Path]
    lock_fd: int | None


def claim_orphans(directory: Path) -> list[Orphan]:
    """The segment sets in ``directory`` whose owner is gone; each is locked for the caller
    until ``release_orphan``. Live processes' segments are never touched."""
    if not directory.is_dir():
        return []
    ensure_private_dir(directory)
    by_prefix: dict[str, list[Path]] = {}
    for path in directory.iterdir():
        name = path.name
        if name.endswith(".journal"):
            by_prefix.setdefault(name.split(".", 1)[0], []).append(path)
        elif name.endswith(".lock"):
            by_prefix.setdefault(name[: -len(".lock")], [])
    orphans = []
    for prefix, segments in sorted(by_prefix.items()):
        lock_path = directory / f"{prefix}.lock"
        lock_fd = None
        if lock_path.exists():
            try:
                lock_fd = _open_private(lock_path, os.O_RDWR)
            except (OSError, UnsafeJournal) as exc:
                log.error("flywheel: skipping journal %s: %s", lock_path, exc)
                continue
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(lock_fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue  # its process is alive and writing: not ours to take
                raise
        orphans.append(Orphan(prefix, sorted(segments), lock_fd))
    return orphans


def release_orphan(directory: Path, orphan: Orphan, *, replayed: bool) -> None:
    """Delete a replayed orphan's files (or just unlock it when replay failed)."""
    if replayed:
        for path in orphan.segments:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.unlink(directory / f"{orphan.prefix}.lock")
        except FileNotFoundError:
            pass
    if orphan.lock_fd is not None:
        os.close(orphan.lock_fd)


@dataclass
class SegmentLines:
    """What reading one segment found: its good lines, and what was not usable."""

    lines: list[bytes]
    torn_tail: bytes = b""  # a last line without its newline: cut short by a crash
    malformed: list[tuple[bytes, str]] = field(default_factory=list)


def read_segment(path: Path) -> SegmentLines:
    """The lines of a segment, checked: a last line cut short by a crash is reported as a
    torn tail; any other line that is not a record is reported as malformed (kept aside)."""
    fd = _open_private(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    result = SegmentLines(lines=[])
    if not data:
        return result
    parts = data.split(b"\n")
    result.torn_tail = parts.pop()  # empty when the file ends with a newline, as writes do
    for line in parts:
        if not line:
            continue
        try:
            decode(line)
        except MalformedLine as exc:
            result.malformed.append((line, str(exc)))
            continue
        result.lines.append(line)
    return result


def iter_lines(data: bytes) -> Iterator[bytes]:
    """The non-empty lines of a chunk's data."""
    for line in data.split(b"\n"):
        if line:
            yield line


@dataclass
class LineRows:
    """The rows journal lines stand for, by table; the notes on values stored as NULL or a
    number; and the lines no row could be made of (each with its error)."""

    by_table: dict[str, list[tuple]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)


def rows_from_lines(
    data: bytes, time_conv: TimeConv, scrub: Callable[[str, list], list] | None = None
) -> LineRows:
    """Both writers' first step (the recorder's thread and the writer process); ``scrub``
    (the secret redactor's) sees each record's values before they become rows."""
    out = LineRows()
    for line in iter_lines(data):
        try:
            table, values = decode(line)
            if scrub is not None:
                values = scrub(table, values)
            for row_table, row in rows_of(table, values, time_conv, out.notes):
                out.by_table.setdefault(row_table, []).append(row)
        except Exception as exc:  # a line no row can be made of: set aside, alone
            out.bad.append({"line": line.decode("utf-8", "replace"), "error": repr(exc)})
    return out


def dead_letter(
    directory: Path,
    entries: list[dict[str, Any]],
    scrub: Callable[[Any], Any] | None = None,
) -> Path:
    """Append rows the store refused (or lines no row can be made of) to this process's
    dead-letter file, as JSON lines with the reason; returns its path. ``scrub`` (the secret
    redactor's) sees each entry first: these files are kept, unlike the journal's."""
    if scrub is not None:
        entries = [scrub(entry) for entry in entries]
    ensure_private_dir(directory)
    path = directory / f"dead-{os.getpid()}.jsonl"
    fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        payload = b"".join(_entry_line(entry) for entry in entries)
        os.write(fd, payload)
    finally:
        os.close(fd)
    return path


def _entry_line(entry: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(entry, default=to_jsonable, option=orjson.OPT_NON_STR_KEYS) + b"\n"
    except TypeError:  # an integer past 64 bits: the stdlib writes it exactly
        return json.dumps(to_jsonable(entry)).encode() + b"\n"
