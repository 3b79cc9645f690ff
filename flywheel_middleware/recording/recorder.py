"""The recorder: agent threads hand records over, a journal thread puts them on local disk,
a writer thread puts them in the store.

Rules it keeps (the design's hot path):
- ``enqueue`` appends to a deque: no lock, no I/O, never raises into the caller (only when
  the journal thread falls behind by a whole queue for ``backpressure_timeout`` does the
  caller journal its record itself);
- every ``journal_interval`` the journal thread takes what was queued, redacts it, encodes
  it as JSON lines and (``durability="journal"``) appends it to this process's journal
  segment: from then on a crash loses none of it, the next recorder on the store replays
  it (``journal`` has the files' rules);
- the writer thread writes those chunks to the store, one transaction a batch, retried
  with tenacity while the store is unavailable; a record no row can be made of, or a row
  the database refuses, goes alone to the dead-letter file and the rest is written;
- memory is bounded in bytes (``max_buffer_mb``): past it, journaled chunks leave memory and
  are read back when the store takes them; with no journal to fall back on, what cannot be
  kept is counted as ``lost`` and logged as an error;
- on a SQLite file the rows are built and written by a child process (``writer_process``),
  which is sent the journal's lines as they are;
- ``flush()`` waits for the store; ``close()`` (exit, SIGTERM: see ``exits``) journals
  everything, waits up to ``exit_timeout`` for the store and leaves the rest in the journal.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from flywheel_middleware.capture.records import (
    RECORD_TYPES,
    CallRecord,
    Record,
    expand_calls,
    ns_to_datetime,
    ns_to_sqlite_text,
)
from flywheel_middleware.recording import exits
from flywheel_middleware.recording.journal import (
    Chunk,
    JournalWriter,
    MalformedLine,
    UnsafeJournal,
    claim_orphans,
    dead_letter,
    decode,
    encode,
    iter_lines,
    journal_dir,
    read_segment,
    release_orphan,
    rows_from_lines,
)
from flywheel_middleware.recording.secrets import SecretRedactor
from flywheel_middleware.recording.writer_process import (
    WriterBusy,
    WriterGone,
    WriterProcess,
    can_spawn,
)
from flywheel_middleware.store.database import Store

log = logging.getLogger("flywheel_middleware.recording.recorder")

BatchListener = Callable[[dict[str, list[Record]]], None]
WRITER_MODES = ("auto", "process", "thread")
DURABILITY = ("journal", "memory")
_BATCH_BYTES = 4 * 1024 * 1024  # a batch also ends past this many bytes of lines
_ORPHAN_CHECK = 30.0  # seconds between looks for journals of processes that died meanwhile


@dataclass
class RecorderCounters:
    """What the recorder has done since it started; read it for monitoring.

    ``queued`` counts records taken off the queue, ``journaled`` those on local disk,
    ``written`` rows in the store, ``retried`` failed write attempts, ``spilled`` records
    whose copy left memory for the journal (byte bound, or a queue full for too long),
    ``replayed`` rows written from the
    journals of earlier processes, ``dead_lettered`` records or rows set aside in the
    dead-letter file, ``coerced`` values stored as NULL or a number (a token count of
    ``"n/a"``), ``lost`` records that could be neither kept nor journaled (disk full and
    memory full: also logged as errors), ``unjournaled`` records the journal refused (held
    in memory only until stored); ``writer`` says who writes rows.
    """

    queued: int = 0
    journaled: int = 0
    written: int = 0
    batches: int = 0
    retried: int = 0
    spilled: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    coerced: int = 0
    lost: int = 0
    unjournaled: int = 0
    buffered_bytes: int = 0
    last_error: str | None = None
    writer: str = "thread"
    by_table: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "by_table"}
        out["by_table"] = dict(self.by_table)
        return out


class _Flush:
    """A marker in the queue: ``journaled`` when everything before it is on disk (or handed
    on), ``done`` when it is in the store.

    A receipt's marker goes on to the writer only while some record is held in memory alone
    (the journal refused its chunk, or ``durability="memory"``); else it stops at the journal
    (``on_disk``), so acknowledging each request does not cut the writer's batches short."""

    __slots__ = ("journaled", "done", "receipt", "on_disk")

    def __init__(self, receipt: bool = False) -> None:
        self.journaled = threading.Event()
        self.done = threading.Event()
        self.receipt = receipt
        self.on_disk = False


class Receipt:
    """Taken before a service queues a request's records (``Recorder.receipt``); ``kept``
    then says whether they are on local disk (the journal) or in the store, which is what a
    2xx answer may promise: a process killed after it loses none of them."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._lost = recorder.counters.lost

    def kept(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every record queued so far is kept; False
        too when records were lost meanwhile (memory and journal full), as they may be these."""
        kept = self._recorder._wait_kept(timeout)
        return kept and self._recorder.counters.lost == self._lost


_STOP = "stop"  # the last item of the queue and of the backlog


class _GiveUp(Exception):
    """The recorder is closing and the store still refuses: the journal keeps the batch."""


def _is_retryable(exc: BaseException | None) -> bool:
    """Connection, lock and server errors are retried (also when wrapped, as ``StoreError``
    wraps a failed connect); a row the database rejects is not."""
    if isinstance(exc, WriterGone):  # not the store: the thread takes over at once
        return False
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, WriterBusy | ConnectionError | TimeoutError | OSError):
            return True
        name, module = type(exc).__name__, type(exc).__module__
        if name in ("OperationalError", "InterfaceError", "ConnectionTimeout"):
            return True
        if module.startswith("psycopg") and name in ("AdminShutdown", "CannotConnectNow"):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class Recorder:
    """Hands finished records to the journal and the store; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        queue_size: int = 100_000,
        batch_size: int = 2_000,
        flush_interval: float = 0.2,
        journal_interval: float = 0.05,
        max_buffer_mb: float = 64,
        durability: str = "journal",
        backpressure_timeout: float = 0.5,
        spill_dir: str | os.PathLike[str] | None = None,
        exit_timeout: float = 10.0,
        writer: str = "auto",
        handle_signals: bool = True,
        secrets: SecretRedactor | None = None,
    ) -> None:
        """``writer``: ``auto`` (a writer process on a SQLite file, else this process's
        thread), ``process`` (the same, warning where it cannot) or ``thread``.
        ``durability``: ``journal`` (every record on local disk within ``journal_interval``)
        or ``memory`` (the journal only for what memory or the exit deadline cannot hold).
        ``spill_dir``: a folder for the journal (default beside a SQLite file, else under
        ``$XDG_STATE_HOME/flywheel``). ``secrets``: the redactor every row passes before it
        is stored (``recording.secrets``; the runtime's follows ``redaction:``)."""
        if writer not in WRITER_MODES:
            raise ValueError(f"writer must be one of {WRITER_MODES}, not {writer!r}")
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, not {durability!r}")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.journal_interval = journal_interval
        self.max_buffer_bytes = int(max_buffer_mb * 1024 * 1024)
        self.durability = durability
        self.backpressure_timeout = backpressure_timeout
        self.exit_timeout = exit_timeout
        self.queue_size = queue_size
        self._chunk_records = min(batch_size, 1000)
        self.counters = RecorderCounters()
        self.journal_dir = journal_dir(store.url, store.sqlite_path, spill_dir)
        # Agent threads append here; only the journal thread takes from it.
        self._buf: deque[Any] = deque()
        self._journal_wake = threading.Event()
        self._room = threading.Event()  # set by the journal thread each time it drains
        self._stopping = False  # a signal or close came: journal each record at once
        # Chunks and markers between the journal thread and the writer thread.
        self._backlog: deque[Any] = deque()
        self._backlog_lock = threading.Lock()
        self._backlog_ready = threading.Event()
        self._in_flight: list[Chunk] = []  # the batch the writer is storing right now
        self._journal: JournalWriter | None = None
        self._journal_lock = threading.Lock()  # segment bookkeeping, shared by both threads
        self._journal_failing = False
        self._listeners: list[tuple[BatchListener, frozenset[str] | None]] = []
        self._transforms: list[Callable[[Record], None]] = []
        self.secrets = secrets
        self._give_up = threading.Event()
        self._closed = False
        self._conn: Any = None
        self._time_conv = ns_to_sqlite_text if store.dialect == "sqlite" else ns_to_datetime
        self.owner_pid = os.getpid()  # a forked child's copy is not its own
        self._process: WriterProcess | None = None
        if writer != "thread" and store.sqlite_path is not None and can_spawn():
            self._process = WriterProcess(store.sqlite_path, self.journal_dir, secrets)
            self.counters.writer = "process"
        elif writer == "process":
            log.warning("flywheel: a writer process needs a SQLite file store; using a thread")
        self._journal_thread = threading.Thread(
            target=self._journal_loop, name="flywheel-journal", daemon=True
        )
        self._writer_thread = threading.Thread(
            target=self._write_loop, name="flywheel-recorder", daemon=True
        )
        self._journal_thread.start()
        self._writer_thread.start()
        exits.watch(self, signals=handle_signals)

    # -- the caller's side ---------------------------------------------------------------

    def enqueue(self, record: Record | bytes) -> None:
        """Queue a finished record (or a call record packed by ``records.pack_call``).
        Never raises; does no I/O unless the queue stays full for ``backpressure_timeout``
        (then the caller journals the record itself)."""
        try:
            if self._closed:  # no journal thread any more: journal it here
                self._hand_on([record])
                return
            buf = self._buf
            if len(buf) < self.queue_size:
                buf.append(record)
                if self._stopping:
                    self._journal_wake.set()
                return
            deadline = time.monotonic() + self.backpressure_timeout
            while True:  # backpressure: sleep (off the GIL) until the journal thread drains
                self._room.clear()
                self._journal_wake.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._room.wait(remaining):
                    break
                if len(buf) < self.queue_size:
                    buf.append(record)
                    return
            # The journal thread is not keeping up: this thread journals the record itself
            # (local disk; the old "spill"), rather than lose what was acknowledged.
            self.counters.spilled += 1
            self._hand_on([record])
        except Exception:  # the host agent must never see our failure
            log.exception("flywheel recorder could not queue a record")

    def add_transform(self, transform: Callable[[Record], None]) -> None:
        """Run ``transform(record)`` on each record before it is journaled (redaction
        plugins), off the agent's thread."""
        self._transforms.append(transform)

    def add_listener(self, listener: BatchListener, tables: Collection[str] | None = None) -> None:
        """Call ``listener(records_by_table)`` on the writer thread after each written batch.

        ``tables``: only these tables' records, and only when there are some."""
        self._listeners.append((listener, frozenset(tables) if tables is not None else None))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything queued so far (and any journal left by a dead process) to the
        store; True when it all landed in time."""
        if not self._writer_thread.is_alive():
            return not self._buf and not self._backlog and not self._in_flight
        return self._mark().done.wait(timeout)

    def journal_now(self, timeout: float = 5.0) -> bool:
        """Have everything queued so far journaled (or handed on) before returning, and every
        later record journaled as it comes; for a signal handler before the process ends."""
        self._stopping = True
        if not self._journal_thread.is_alive():
            return not self._buf
        return self._mark().journaled.wait(timeout)

    def receipt(self) -> Receipt:
        """Take before queueing a request's records; ``Receipt.kept`` before answering it."""
        return Receipt(self)

    def _wait_kept(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self._journal_thread.is_alive():  # closed: close() journaled what it could
            return not self._buf and not self._held_in_memory_only()
        marker = self._mark(_Flush(receipt=True))
        if not marker.journaled.wait(timeout):
            return False
        return marker.on_disk or marker.done.wait(max(0.0, deadline - time.monotonic()))

    def _mark(self, marker: _Flush | None = None) -> _Flush:
        """A marker behind everything queued so far, the journal thread woken to it."""
        marker = marker or _Flush()
        self._buf.append(marker)
        self._journal_wake.set()
        return marker

    @property
    def pending(self) -> int:
        """Records not yet in the store (queued, or in chunks on their way)."""
        with self._backlog_lock:
            in_chunks = sum(c.count for c in self._backlog if isinstance(c, Chunk))
        return len(self._buf) + in_chunks

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid while one writes span and rollout rows, else None."""
        process = self._process
        return process.pid if process is not None else None

    def close(self, timeout: float | None = None) -> bool:
        """Journal everything, give the store up to ``timeout`` (default ``exit_timeout``)
        to take it, stop; what the store did not take stays in the journal for the next
        recorder. True when everything reached the store."""
        if self._closed:
            return True
        self._closed = True
        self._stopping = True
        timeout = self.exit_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        ok = self.flush(timeout)
        self._give_up.set()
        self._buf.append(_STOP)
        self._journal_wake.set()
        self._journal_thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self._backlog_ready.set()
        # The writer may be inside one database call: wait for it until the deadline (at
        # least a second), no longer; what it holds is journaled below either way.
        self._writer_thread.join(timeout=max(1.0, deadline - time.monotonic()))
        if self._process is not None:
            self._process.stop(timeout=max(1.0, deadline - time.monotonic()))
        left = self._keep_unwritten()
        with self._journal_lock:
            journal, self._journal = self._journal, None
            kept = journal.close() if journal is not None else 0
        if left:
            log.warning(
                "flywheel: %d records not yet in the store %s are kept in the journal %s "
                "(%d segments); the next recorder on this store, or `flywheel db replay`, "
                "writes them",
                left,
                self.store,
                self.journal_dir,
                kept,
            )
        exits.unwatch(self)
        return ok and not left

    def _keep_unwritten(self) -> int:
        """After the threads stopped (or were given up on): journal every record not yet in
        the store (queued, in chunks, in the writer's hands); returns how many wait there."""
        with self._backlog_lock:
            chunks = [c for c in self._backlog if isinstance(c, Chunk)]
            markers = [m for m in self._backlog if isinstance(m, _Flush)]
            self._backlog.clear()
        chunks += [c for c in self._in_flight if c not in chunks]
        queued = []
        while self._buf:  # records the journal thread did not get to (or that came later)
            item = self._buf.popleft()
            if isinstance(item, _Flush):
                markers.append(item)
            elif item is not _STOP:
                queued.append(item)
        left = 0
        for chunk in chunks:
            if chunk.segment is not None or self._journal_chunk(chunk):
                left += chunk.count
            else:
                self._report_lost(chunk.count, "could not be journaled at exit")
        if queued:
            before = self.counters.journaled
            self._hand_on(queued)  # encoded and journaled now, on this thread
            left += self.counters.journaled - before
        with self._backlog_lock:
            self._backlog.clear()  # what _hand_on put there is journaled: nothing to write
        for marker in markers:
            marker.journaled.set()
            marker.done.set()
        return left

    def _report_lost(self, count: int, why: str) -> None:
        self.counters.lost += count
        log.error("flywheel: %d records %s and are LOST", count, why)

    # -- the journal thread --------------------------------------------------------------

    def _journal_loop(self) -> None:
        started = time.monotonic()
        while True:
            # A pass every journal_interval, counted from the last pass's start (its own time
            # is not added to the wait); at once while producers outpace it.
            if len(self._buf) < self.queue_size // 4:
                interval = 0.005 if self._stopping else self.journal_interval
                delay = started + interval - time.monotonic()
                if delay > 0:
                    self._journal_wake.wait(delay)
            self._journal_wake.clear()
            started = time.monotonic()
            try:
                if self._journal_pass():
                    return
            except Exception as exc:  # never let the thread die: the next pass tries again
                self.counters.last_error = repr(exc)
                log.exception("flywheel journal thread error")

    def _journal_pass(self) -> bool:
        """Take everything queued and hand it on; True at the stop marker."""
        buf = self._buf
        group: list[Record | bytes] = []
        stop = False
        while buf:
            item = buf.popleft()
            if len(group) >= self._chunk_records:  # chunks of bounded size; and a full
                self._room.set()  # queue's producers may go on meanwhile
                self._hand_on(group)
                group = []
            if item.__class__ is _Flush or item is _STOP:
                self._hand_on(group)
                group = []
                if item is _STOP:
                    self._to_backlog(item)
                    stop = True
                    break
                if item.receipt and self._all_on_disk():
                    item.on_disk = True
                else:
                    self._to_backlog(item)
                item.journaled.set()
            else:
                group.append(item)
        self._room.set()
        self._hand_on(group)
        return stop

    def _all_on_disk(self) -> bool:
        """Whether every record not yet in the store is in the journal."""
        return self.durability == "journal" and not self._held_in_memory_only()

    def _held_in_memory_only(self) -> bool:
        """Whether a chunk waiting for the store (or being written) has no journal copy."""
        with self._backlog_lock:
            waiting = [*self._backlog, *self._in_flight]
        return any(isinstance(c, Chunk) and c.segment is None for c in waiting)

    def _hand_on(self, items: list[Record | bytes]) -> None:
        """Encode records into one chunk, journal it, put it in the writer's backlog."""
        if not items:
            return
        self.counters.queued += len(items)
        # redaction plugins see span and rollout records, never a call record
        records = self._transformed(expand_calls(items)) if self._transforms else items
        lines = [line for record in records if (line := self._encoded(record)) is not None]
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        chunk = Chunk(data=data, count=len(lines), nbytes=len(data))
        if self.durability == "journal" or self._closed:  # closed: nothing else will write it
            self._journal_chunk(chunk)
        self._to_backlog(chunk)
        self._bound_memory()

    def _encoded(self, item: Record | bytes) -> bytes | None:
        """A record's journal line; one that nothing JSON can say is set aside, alone."""
        try:
            return encode(item)
        except Exception as exc:
            self._set_aside(
                [{"table": getattr(item, "TABLE", "?"), "record": repr(item)[:2000]}],
                f"could not be encoded: {exc!r}",
            )
            return None

    def _transformed(self, records: list[Record]) -> list[Record]:
        """Records after the redaction transforms; one that fails them is set aside whole
        (never stored unredacted)."""
        kept = []
        for record in records:
            try:
                for transform in self._transforms:
                    transform(record)
                kept.append(record)
            except Exception as exc:
                self.counters.dead_lettered += 1
                log.error("flywheel: a %s record could not be redacted (%r)", record.TABLE, exc)
        return kept

    def _journal_chunk(self, chunk: Chunk) -> bool:
        """Append a chunk to this process's journal; False (and a loud log) when the disk
        refuses, the chunk then lives in memory only."""
        assert chunk.data is not None
        try:
            with self._journal_lock:
                if self._journal is None:
                    self._journal = JournalWriter(self.journal_dir)
                segment, offset = self._journal.append(chunk.data)
                segment.pending += 1
            chunk.segment, chunk.offset = segment, offset
        except (OSError, UnsafeJournal) as exc:
            self.counters.last_error = repr(exc)
            self.counters.unjournaled += chunk.count
            if not self._journal_failing:
                log.error(
                    "flywheel: cannot write the journal in %s (%s): records are in memory "
                    "only until the store has them; a crash now would lose them",
                    self.journal_dir,
                    exc,
                )
            self._journal_failing = True
            return False
        self.counters.journaled += chunk.count
        if self._journal_failing:
            self._journal_failing = False
            log.warning("flywheel: the journal in %s is writable again", self.journal_dir)
        return True

    def _to_backlog(self, item: Any) -> None:
        with self._backlog_lock:
            self._backlog.append(item)
            if isinstance(item, Chunk):
                self.counters.buffered_bytes += item.nbytes
        self._backlog_ready.set()

    def _bound_memory(self) -> None:
        """Keep the chunks held in memory under ``max_buffer_bytes``: the newest leave first
        (the writer needs them last), journaled ones by dropping their copy, the others by
        journaling them now; if even that fails they are lost, loudly."""
        if self.counters.buffered_bytes <= self.max_buffer_bytes:
            return
        with self._backlog_lock:
            held = [c for c in self._backlog if isinstance(c, Chunk) and c.data is not None]
        for chunk in reversed(held):
            if self.counters.buffered_bytes <= self.max_buffer_bytes:
                return
            if chunk.segment is None and not self._journal_chunk(chunk):
                with self._backlog_lock:
                    try:
                        self._backlog.remove(chunk)
                    except ValueError:
                        continue  # the writer took it meanwhile
                    self.counters.buffered_bytes -= chunk.nbytes
                self.counters.lost += chunk.count
                log.error(
                    "flywheel: memory (max_buffer_mb) and the journal are both full: "
                    "%d records were LOST",
                    chunk.count,
                )
                continue
            with self._backlog_lock:
                if chunk.data is not None:
                    chunk.data = None
                    self.counters.buffered_bytes -= chunk.nbytes
                    self.counters.spilled += chunk.count

    # -- the writer thread ---------------------------------------------------------------

    def _write_loop(self) -> None:
        self._replay_orphans()
        last_look = time.monotonic()
        while True:
            self._backlog_ready.wait(self.flush_interval)
            self._backlog_ready.clear()
            while True:
                chunks, markers, stop = self._take_batch()
                if not chunks and not markers and not stop:
                    if self._give_up.is_set():
                        return  # closed while this thread was held up: nothing more to do
                    break
                self._in_flight = chunks
                try:
                    written = not chunks or self._write_chunks(chunks)
                except Exception as exc:  # not the store's unavailability: never die of it
                    self.counters.last_error = repr(exc)
                    log.exception("flywheel: writing a batch failed; retrying it in 1 s")
                    self._put_back(chunks, markers, stop)
                    self._in_flight = []
                    if self._give_up.wait(1.0):
                        return  # closing: close() journals what is left
                    continue
                self._in_flight = []
                if not written:
                    self._put_back(chunks, markers, stop)
                    return  # giving up: close() keeps them in the journal
                if markers:
                    self._replay_orphans()
                for marker in markers:
                    marker.done.set()
                if stop:
                    return
            if time.monotonic() - last_look > _ORPHAN_CHECK:
                last_look = time.monotonic()
                self._replay_orphans()

    def _take_batch(self) -> tuple[list[Chunk], list[_Flush], bool]:
        """Chunks from the front of the backlog, up to ``batch_size`` records (and about
        ``_BATCH_BYTES``), stopping after a marker (what came before it is written, then it is answered)."""
        chunks: list[Chunk] = []
        markers: list[_Flush] = []
        count = nbytes = 0
        with self._backlog_lock:
            backlog = self._backlog
            while backlog:
                item = backlog[0]
                if isinstance(item, Chunk):
                    full = count + item.count > self.batch_size or nbytes > _BATCH_BYTES
                    if chunks and full:
                        break
                    chunks.append(backlog.popleft())
                    count += item.count
                    nbytes += item.nbytes
                    continue
                backlog.popleft()
                if item is _STOP:
                    return chunks, markers, True
                markers.append(item)
                break
        return chunks, markers, False

    def _put_back(self, chunks: list[Chunk], markers: list[_Flush], stop: bool) -> None:
        with self._backlog_lock:
            for item in reversed([*chunks, *markers] + ([_STOP] if stop else [])):
                self._backlog.appendleft(item)

    def _write_chunks(self, chunks: list[Chunk]) -> bool:
        """Store the chunks' records; False when closing with the store still down."""
        parts = []
        for chunk in chunks:
            if chunk.data is not None:
                parts.append(chunk.data)
            else:
                with self._journal_lock:
                    assert self._journal is not None
                    parts.append(self._journal.read(chunk))
        data = b"".join(parts)
        try:
            self._write_lines(data)
        except _GiveUp:
            return False
        with self._backlog_lock:
            for chunk in chunks:
                if chunk.data is not None:
                    chunk.data = None
                    self.counters.buffered_bytes -= chunk.nbytes
        with self._journal_lock:
            for chunk in chunks:
                if chunk.segment is not None and self._journal is not None:
                    self._journal.committed(chunk.segment)
        self._tell_listeners(data)
        return True

    def _write_lines(self, data: bytes) -> dict[str, int]:
        """Write journal lines to the store (the child writes them on a SQLite file);
        retried while the store is unavailable; raises ``_GiveUp`` when closing."""
        self._retrying(self.store.ensure_schema)
        if self._process is not None:
            written = self._ship(data)
            if written is not None:
                return written
        scrub = self.secrets.scrub if self.secrets is not None else None
        found = rows_from_lines(data, self._time_conv, scrub)
        if found.bad:
            self._set_aside(found.bad, "no row could be made of it")
        self._note_coerced(found.notes)
        self._retrying(lambda: self._write_once(found.by_table))
        return {table: len(rows) for table, rows in found.by_table.items()}

    def _ship(self, data: bytes) -> dict[str, int] | None:
        """Have the writer process store the lines; None when it is gone (the caller then
        writes them in this thread, from now on)."""
        process = self._process
        assert process is not None

        def attempt() -> dict:
            reply = process.request(data)
            if "retry" in reply:
                raise WriterBusy(reply["retry"])
            return reply

        try:
            reply = self._retrying(attempt)
        except WriterGone as exc:
            log.warning("flywheel: %s; writing in this process from now on", exc)
            self._process = None
            self.counters.writer = "thread"
            process.stop(timeout=1)
            return None
        written = reply["written"]
        for table, n in written.items():
            self.counters.by_table[table] += n
            self.counters.written += n
        self.counters.dead_lettered += reply["rejected"]
        self.counters.coerced += reply["coerced"]
        self.counters.batches += 1
        return written

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` retried while the store is unavailable, until it works or the recorder
        closes (then ``_GiveUp``). The first attempt runs bare: a tenacity loop costs more
        than a small batch."""
        try:
            return fn()
        except Exception as exc:
            if not _is_retryable(exc):
                raise
            if self._give_up.is_set():
                raise _GiveUp from exc
            self._note_failure(exc, 1)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self._note_failure(exc, state.attempt_number + 1)

        retrying = Retrying(
            retry=retry_if_exception(_is_retryable),
            wait=wait_exponential(multiplier=0.02, max=1.0),
            stop=lambda state: self._give_up.is_set(),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except Exception as exc:
            if _is_retryable(exc):
                raise _GiveUp from exc
            raise

    def _note_failure(self, exc: BaseException | None, attempt: int) -> None:
        self.counters.retried += 1
        self.counters.last_error = repr(exc)
        self._drop_connection()
        if attempt in (1, 10) or attempt % 50 == 0:
            where = "journaled" if self.durability == "journal" else "held in memory"
            log.warning("flywheel store unavailable (%s); retrying, records are %s", exc, where)

    def _write_once(self, by_table: dict[str, list[tuple]]) -> None:
        if self._conn is None:
            self._conn = self.store.raw_connection()
        conn = self._conn
        try:
            for table, rows in by_table.items():
                self.store.write_rows(conn, table, RECORD_TYPES[table].COLUMNS, rows)
            conn.commit()
        except BaseException as exc:
            try:
                conn.rollback()
            except Exception:
                self._drop_connection()
            if not _is_retryable(exc):
                self._one_by_one(by_table, exc)
                return
            raise
        n = 0
        for table, rows in by_table.items():
            self.counters.by_table[table] += len(rows)
            n += len(rows)
        self.counters.written += n
        self.counters.batches += 1

    def _one_by_one(self, by_table: dict[str, list[tuple]], exc: BaseException) -> None:
        """Rows the database rejects: each written alone, the refused ones set aside."""
        conn = self._conn
        bad: list[dict[str, Any]] = []
        for table, rows in by_table.items():
            columns = RECORD_TYPES[table].COLUMNS
            for row in rows:
                try:
                    self.store.write_rows(conn, table, columns, [row])
                    conn.commit()
                    self.counters.written += 1
                    self.counters.by_table[table] += 1
                except Exception as row_exc:
                    conn.rollback()
                    if _is_retryable(row_exc):
                        raise
                    row_error = f"the store refused it: {row_exc}"
                    bad.append(
                        {
                            "table": table,
                            "row": dict(zip(columns, row, strict=True)),
                            "error": row_error,
                        }
                    )
        if bad:
            self._set_aside(bad, f"the store refused it: {exc}")

    def _set_aside(self, entries: list[dict[str, Any]], reason: str) -> None:
        self.counters.dead_lettered += len(entries)
        for entry in entries:
            entry.setdefault("error", reason)
        try:
            path = dead_letter(
                self.journal_dir, entries, self.secrets.value if self.secrets else None
            )
        except (OSError, UnsafeJournal) as exc:
            log.error(
                "flywheel: %d records set aside (%s) could not be saved: %s",
                len(entries),
                reason,
                exc,
            )
            return
        log.error("flywheel: %d records set aside (%s); kept in %s", len(entries), reason, path)

    def _note_coerced(self, notes: list[str]) -> None:
        if notes:
            self.counters.coerced += len(notes)
            log.warning(
                "flywheel: %d values stored as NULL or a number, e.g. %s", len(notes), notes[0]
            )

    def _tell_listeners(self, data: bytes) -> None:
        if not self._listeners:
            return
        prefixes: tuple[bytes, ...] | None = ()
        for _, tables in self._listeners:
            if tables is None:
                prefixes = None
                break
            calls = ("call",) if tables & {"span", "rollout"} else ()  # a call is one of each
            prefixes += tuple(f'["{t}"'.encode() for t in (*tables, *calls))
        by_kind: dict[str, list[Record]] = defaultdict(list)
        for line in iter_lines(data):
            # only the lines of tables someone listens to are decoded (a line written by the
            # stdlib's fallback starts with a space)
            if prefixes is not None and not line.lstrip().startswith(prefixes):
                continue
            try:
                table, values = decode(line)
            except MalformedLine:
                continue
            if table == "call":
                for record in expand_calls([CallRecord.from_values(tuple(values))]):
                    by_kind[record.TABLE].append(record)
            else:
                by_kind[table].append(RECORD_TYPES[table].from_values(tuple(values)))
        for listener, tables in self._listeners:
            chosen = (
                by_kind if tables is None else {t: rs for t, rs in by_kind.items() if t in tables}
            )
            if not chosen:
                continue
            try:
                listener(chosen)
            except Exception:
                log.exception("flywheel batch listener failed")

    # -- journals of processes that are gone ----------------------------------------------

    def _replay_orphans(self) -> None:
        """Write what dead processes left in this store's journal, then delete it."""
        if self._give_up.is_set():
            return  # closing: this process's own leftovers would count as orphans now
        try:
            orphans = claim_orphans(self.journal_dir)
        except (OSError, UnsafeJournal) as exc:
            self.counters.last_error = repr(exc)
            log.error("flywheel: not replaying the journal in %s: %s", self.journal_dir, exc)
            return
        for orphan in orphans:
            replayed = False
            try:
                for path in orphan.segments:
                    self._replay_segment(path)
                replayed = True
            except _GiveUp:
                return
            except UnsafeJournal as exc:  # another user's file: never read, said each time
                self.counters.last_error = repr(exc)
                log.error("flywheel: not replaying %s: %s", orphan.prefix, exc)
            except Exception as exc:
                self.counters.last_error = repr(exc)
                log.exception(
                    "flywheel: replaying %s failed; kept for the next attempt", orphan.prefix
                )
            finally:
                release_orphan(self.journal_dir, orphan, replayed=replayed)

    def _replay_segment(self, path: Path) -> None:
        found = read_segment(path)
        bad = [
            {
                "line": line.decode("utf-8", "replace"),
                "error": f"malformed line in {path.name}: {why}",
            }
            for line, why in found.malformed
        ]
        if found.torn_tail:
            log.warning("flywheel: the last record of %s was cut short by a crash", path)
            cut = found.torn_tail.decode("utf-8", "replace")
            bad.append({"line": cut, "error": f"cut short by a crash at the end of {path.name}"})
        if bad:
            self._set_aside(bad, "unreadable journal line")
        lines = found.lines
        for start in range(0, len(lines), self.batch_size):
            data = b"\n".join(lines[start : start + self.batch_size]) + b"\n"
            written = self._write_lines(data)
            self.counters.replayed += sum(written.values())
            self._tell_listeners(data)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate() if hasattr(conn, "invalidate") else conn.close()
            except Exception:
                pass

    def forget_after_fork(self) -> None:
        """A forked child must not touch its parent's journal or writer."""
        self._closed = True
        if self._journal is not None:
            self._journal.detach()
            self._journal = None
