"""A child process that writes the recorder's rows into a SQLite file.

Why: turning records into rows and binding them to SQLite is most of what recording costs,
and on the writer thread that work holds the GIL the agent needs. With a writer process the
recorder's thread only passes on the journal's lines (JSON, as the journal thread encoded
them); the child builds the rows (``recording.rows``) and writes them on another core. It
imports the cheap capture API and ``store.sqlite_rows`` (no SQLAlchemy), so it starts in tens
of milliseconds.

The protocol is request/reply over the child's stdin/stdout, in frames of a 4-byte length
and a message. A request is ``L`` and journal lines, or ``S`` (stop); a reply is a JSON
object: ``{"ready": pid}``, ``{"written": {table: n}, "rejected": n, "coerced": n}`` or
``{"retry": error}``. Nothing is pickled or marshalled either way.

One request is one transaction and the reply comes after its commit, so the parent keeps
every record until it is on disk. Rows are idempotent (primary keys, and the ``uid`` of
feedback and telemetry), so a batch sent again after a crash adds nothing.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import sys
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from flywheel_middleware.capture.records import RECORD_TYPES, ns_to_sqlite_text
from flywheel_middleware.recording.journal import dead_letter, rows_from_lines
from flywheel_middleware.recording.secrets import SecretRedactor
from flywheel_middleware.store.sqlite_rows import (
    PRAGMAS,
    WRITER_PRAGMAS,
    apply_pragmas,
    insert_rows,
)

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


def _send(stream: BinaryIO, data: bytes) -> None:
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


class WriterProcess:
    """The parent's handle on one writer child; used by the recorder's writer thread only."""

    def __init__(
        self, db_path: Path, journal_dir: Path, secrets: SecretRedactor | None = None
    ) -> None:
        self.db_path = db_path
        self.journal_dir = journal_dir
        self.secrets = secrets  # the child builds the same redactor from its settings
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        _live.add(self)

    def start(self) -> None:
        package_dir = str(Path(__file__).resolve().parents[2])
        argv = [sys.executable, "-c", _BOOT, package_dir, str(self.db_path), str(self.journal_dir)]
        if self.secrets is not None:
            argv.append(orjson.dumps(self.secrets.settings()).decode())
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as exc:
            raise WriterGone(f"could not start the writer process: {exc}") from exc
        reply = self._read()
        if "ready" not in reply:
            raise WriterGone(f"the writer process answered {reply!r} at start")
        self.pid = reply["ready"]

    def request(self, lines: bytes) -> dict[str, Any]:
        """Send journal lines and wait for the reply (after the child's commit)."""
        if self._proc is None:
            self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            _send(proc.stdin, b"L" + lines)
        except (OSError, ValueError) as exc:
            raise WriterGone(
                f"the writer process is gone ({exc}, exit code {proc.poll()})"
            ) from exc
        return self._read()

    def _read(self) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            data = _receive(proc.stdout)
        except (OSError, ValueError):
            data = None
        if data is None:
            raise WriterGone(f"the writer process exited (exit code {proc.poll()})")
        return orjson.loads(data)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to finish and wait for it (everything it acknowledged is committed)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            _send(proc.stdin, b"S")
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


def _write(
    conn: sqlite3.Connection,
    lines: bytes,
    cache: dict[str, str],
    dead_dir: str,
    secrets: SecretRedactor | None,
) -> dict:
    found = rows_from_lines(lines, ns_to_sqlite_text, secrets.scrub if secrets else None)
    by_table, notes, bad = found.by_table, found.notes, found.bad
    try:
        cur = conn.cursor()
        for table, rows in by_table.items():
            insert_rows(cur, table, RECORD_TYPES[table].COLUMNS, rows, cache)
        conn.commit()
        written = {table: len(rows) for table, rows in by_table.items()}
    except sqlite3.OperationalError as exc:  # locked, disk full, I/O: the parent retries
        conn.rollback()
        return {"retry": repr(exc)}
    except Exception as exc:  # rows the database rejects (or cannot bind): the rest are written
        conn.rollback()
        written, refused = _one_by_one(conn, by_table)
        bad += [
            {
                "table": table,
                "row": dict(zip(RECORD_TYPES[table].COLUMNS, row, strict=True)),
                "error": f"the store refused it: {exc}",
            }
            for table, row in refused
        ]
    if bad:
        _set_aside(dead_dir, bad, secrets)
    if notes:
        print(f"flywheel writer: {len(notes)} values coerced, e.g. {notes[0]}", file=sys.stderr)
    return {"written": written, "rejected": len(bad), "coerced": len(notes)}


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
            except sqlite3.OperationalError:
                conn.rollback()
                raise
            except Exception:
                conn.rollback()
                bad.append((table, row))
    return dict(written), bad


def _set_aside(dead_dir: str, bad: list[dict[str, Any]], secrets: SecretRedactor | None) -> None:
    """The recorder's dead-letter file: nothing the store refused is lost."""
    try:
        path = dead_letter(Path(dead_dir), bad, secrets.value if secrets else None)
    except Exception as exc:
        print(
            f"flywheel writer: {len(bad)} rows set aside could not be saved: {exc}", file=sys.stderr
        )
        return
    print(f"flywheel writer: {len(bad)} records set aside in {path}", file=sys.stderr)


def main(argv: list[str]) -> None:
    """The child: answer requests until ``stop`` or the parent goes away (end of stdin)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host; it stops us itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a group's SIGTERM too: the parent closes us
    db_path, dead_dir, *redaction = argv
    secrets = SecretRedactor(**orjson.loads(redaction[0])) if redaction else None
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the protocol
    requests = sys.stdin.buffer
    conn = sqlite3.connect(db_path, timeout=5)
    apply_pragmas(conn, PRAGMAS + WRITER_PRAGMAS)
    cache: dict[str, str] = {}
    _send(replies, orjson.dumps({"ready": os.getpid()}))
    while True:
        data = _receive(requests)
        if data is None or data[:1] == b"S":
            break
        try:
            reply = _write(conn, data[1:], cache, dead_dir, secrets)
        except sqlite3.OperationalError as exc:
            conn.rollback()
            reply = {"retry": repr(exc)}
        _send(replies, orjson.dumps(reply))
    conn.close()
