"""A child process that writes the recorder's span and rollout rows into a SQLite file.

Why: turning records into rows and binding them to SQLite is most of what recording costs,
and on the writer thread that work holds the GIL the agent needs. With a writer process the
recorder's thread only pickles each batch's column values (a fraction of the work); the child
builds the rows (``recording.rows``) and writes them on another core. It imports the cheap
capture API and ``store.sqlite_rows`` (no SQLAlchemy), so it starts in tens of milliseconds.

The protocol is request/reply over the child's stdin/stdout, in frames of a 4-byte length
and a message; a request is marshalled (plain data, the common case, and the cheapest to
encode) or else pickled, and says which by its first byte. Messages::

    parent: ("values", [(table, values), ...]) | ("rows", [(table, row), ...]) | ("stop",)
    child:  ("ready", pid) | ("ok", {table: written}, rejected) | ("retry", error)
            | ("unpicklable", error)

One request is one transaction and the reply comes after its commit, so the parent keeps
every record until it is on disk. Only span and rollout rows come here: their primary keys
make a batch sent again after a crash add nothing.
"""

from __future__ import annotations

import logging
import marshal
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, BinaryIO

from flywheel_middleware.capture.records import (
    RECORD_TYPES,
    Record,
    ns_to_sqlite_text,
)
from flywheel_middleware.recording.rows import record_rows, rows_of
from flywheel_middleware.store.sqlite_rows import apply_pragmas, insert_rows

log = logging.getLogger("flywheel_middleware.recording.writer_process")

SHIPPED_TABLES = frozenset({"span", "rollout", "call"})  # a call record is one of each
_HEADER = struct.Struct("<I")

# Run by ``python -c`` with the folder that holds the package (the host may have found it on
# a path of its own); the current directory is dropped so no file there shadows a module.
_BOOT = """\
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]
sys.path.append(sys.argv[1])  # after the standard library and site-packages
from flywheel_middleware.recording.writer_process import main
main(sys.argv[2:])
"""


class WriterGone(Exception):
    """The writer process exited or stopped answering; the recorder writes in-thread instead."""


class WriterBusy(Exception):
    """The child could not write (database locked or unreachable); retried like a store error."""


def _send(stream: BinaryIO, message: Any) -> None:
    data = message if isinstance(message, bytes) else _encode(message)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> bytes | None:
    """One frame's bytes, or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None


# -- the parent's side ---------------------------------------------------------------------


def can_spawn() -> bool:
    """Whether the child can run: ``sys.executable`` is a Python (not, say, uwsgi) and this
    package is plain files it can import (not inside a zip)."""
    exe = sys.executable
    name = os.path.basename(exe or "").lower()
    python = bool(exe) and os.path.isfile(exe) and name.startswith(("python", "pypy"))
    return python and Path(__file__).is_file()


def _encode(message: tuple) -> bytes:
    try:
        return b"M" + marshal.dumps(message)
    except ValueError:  # not plain data (an object, a str subclass): pickle it
        return b"P" + pickle.dumps(message, protocol=5)


def _decode(data: bytes) -> Any:
    return marshal.loads(data[1:]) if data[:1] == b"M" else pickle.loads(data[1:])


def values_payload(records: list[Record | bytes]) -> bytes:
    """The batch as raw column values: what the child is normally sent (a packed call
    record goes as its marshalled bytes, which the child loads)."""
    items = [("call", r) if r.__class__ is bytes else (r.TABLE, r.values(r)) for r in records]
    return _encode(("values", items))


def rows_payload(records: list[Record | bytes]) -> bytes:
    """The batch as finished rows (plain text and numbers), for values that will not pickle
    here or unpickle there (a lock, a class defined in ``__main__``)."""
    rows = record_rows(records, ns_to_sqlite_text)
    return _encode(("rows", rows))


class WriterProcess:
    """The parent's handle on one writer child; used by the recorder's writer thread only."""

    def __init__(self, db_path: Path, spill_dir: Path) -> None:
        self.db_path = db_path
        self.spill_dir = spill_dir
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        _live.add(self)

    def start(self) -> None:
        package_dir = str(Path(__file__).resolve().parents[2])
        argv = [sys.executable, "-c", _BOOT, package_dir, str(self.db_path), str(self.spill_dir)]
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as exc:
            raise WriterGone(f"could not start the writer process: {exc}") from exc
        reply = self._read()
        if reply[0] != "ready":
            raise WriterGone(f"the writer process answered {reply!r} at start")
        self.pid = reply[1]

    def request(self, payload: bytes) -> tuple:
        """Send one batch and wait for its reply (after the child's commit)."""
        if self._proc is None:
            self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            _send(proc.stdin, payload)
        except (OSError, ValueError) as exc:
            raise WriterGone(
                f"the writer process is gone ({exc}, exit code {proc.poll()})"
            ) from exc
        return self._read()

    def _read(self) -> tuple:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            data = _receive(proc.stdout)
        except (OSError, ValueError):
            data = None
        if data is None:
            raise WriterGone(f"the writer process exited (exit code {proc.poll()})")
        return _decode(data)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to finish and wait for it (everything it acknowledged is committed)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            _send(proc.stdin, ("stop",))
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _detach(self) -> None:
        """In a forked child of the host: drop the pipes (the parent's writer is not ours)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        os.close(stream.fileno())
                except (OSError, ValueError):
                    pass


_live: weakref.WeakSet[WriterProcess] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=lambda: [w._detach() for w in list(_live)])


# -- the child's side ----------------------------------------------------------------------


def _write(conn: sqlite3.Connection, request: tuple, cache: dict[str, str], dead_dir: str) -> tuple:
    kind, items = request
    by_table: dict[str, list[tuple]] = defaultdict(list)
    rejected = 0
    if kind == "values":
        for table, values in items:
            try:
                if values.__class__ is bytes:  # a call record packed on the agent's thread
                    values = marshal.loads(values)
                for row_table, row in rows_of(table, values, ns_to_sqlite_text):
                    by_table[row_table].append(row)
            except Exception as exc:  # a value no row can hold: count it, keep the rest
                rejected += 1
                print(
                    f"flywheel writer: a {table} record could not be stored: {exc!r}",
                    file=sys.stderr,
                )
    else:
        for table, row in items:
            by_table[table].append(row)
    try:
        cur = conn.cursor()
        for table, rows in by_table.items():
            insert_rows(cur, table, RECORD_TYPES[table].COLUMNS, rows, cache)
        conn.commit()
    except sqlite3.OperationalError as exc:  # locked, disk full, I/O: the parent retries
        conn.rollback()
        return ("retry", repr(exc))
    except Exception as exc:  # rows the database rejects (or cannot bind): the rest are written
        conn.rollback()
        written, bad = _one_by_one(conn, by_table)
        if bad:
            _keep_rejected(dead_dir, bad, exc)
        return ("ok", written, rejected + len(bad))
    return ("ok", {table: len(rows) for table, rows in by_table.items()}, rejected)


def _one_by_one(
    conn: sqlite3.Connection, by_table: dict[str, list[tuple]]
) -> tuple[dict[str, int], list[tuple[str, tuple]]]:
    written: dict[str, int] = defaultdict(int)
    bad: list[tuple[str, tuple]] = []
    single: dict[str, str] = {}
    for table, rows in by_table.items():
        for row in rows:
            try:
                insert_rows(conn.cursor(), table, RECORD_TYPES[table].COLUMNS, [row], single)
                conn.commit()
                written[table] += 1
            except Exception:
                conn.rollback()
                bad.append((table, row))
    return dict(written), bad


def _keep_rejected(dead_dir: str, bad: list[tuple[str, tuple]], exc: BaseException) -> None:
    """The same dead-letter file the recorder writes: nothing the store refused is lost."""
    os.makedirs(dead_dir, exist_ok=True)
    path = os.path.join(dead_dir, f"dead-{os.getpid()}.pickle")
    with open(path, "ab") as fh:
        pickle.dump(bad, fh)
    print(
        f"flywheel writer: the store rejected {len(bad)} rows ({exc}); kept in {path}",
        file=sys.stderr,
    )


def main(argv: list[str]) -> None:
    """The child: answer requests until ``stop`` or the parent goes away (end of stdin)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host; it stops us itself
    db_path, dead_dir = argv
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the protocol
    requests = sys.stdin.buffer
    conn = sqlite3.connect(db_path, timeout=5)
    apply_pragmas(conn)
    cache: dict[str, str] = {}
    _send(replies, ("ready", os.getpid()))
    while True:
        data = _receive(requests)
        if data is None:
            break
        try:
            request = _decode(data)
        except Exception as exc:  # a class the child cannot import: the parent sends rows
            _send(replies, ("unpicklable", repr(exc)))
            continue
        if request[0] == "stop":
            break
        _send(replies, _write(conn, request, cache, dead_dir))
    conn.close()
