"""The recorder: a bounded queue on the agent's side, one writer thread on the store's side.

Rules it keeps (the design's hot path):
- ``enqueue`` never touches the database and never raises into the caller;
- a full queue waits briefly (backpressure), then spills to a local file: nothing is dropped;
- one batch is one transaction; a database error is retried with tenacity and the batch kept;
- on a SQLite file the span and rollout rows are written by a child process
  (``writer_process``), which leaves this process only the pickling of each batch; that
  writer is woken by the first record after a lull, then gathers a batch (by rate, capped);
- a one-span call waits in the queue packed to bytes (``records.pack_call``), so queued
  records keep no containers alive for the cyclic GC to scan on the agent's thread;
- ``flush()`` and interpreter exit write everything; what cannot be written by the exit deadline
  stays in a spill file that the next recorder on the same store replays.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import pickle
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from flywheel_middleware.capture.records import (
    RECORD_TYPES,
    Record,
    expand_calls,
    ns_to_datetime,
    ns_to_sqlite_text,
    unpack_record,
)
from flywheel_middleware.recording.rows import record_row, record_rows
from flywheel_middleware.recording.writer_process import (
    SHIPPED_TABLES,
    WriterBusy,
    WriterGone,
    WriterProcess,
    can_spawn,
    rows_payload,
    values_payload,
)
from flywheel_middleware.store.database import Store

log = logging.getLogger("flywheel_middleware.recording.recorder")

BatchListener = Callable[[dict[str, list[Record]]], None]
WRITER_MODES = ("auto", "process", "thread")
# A round trip to the writer process has a fixed cost (this process's time, and a commit in
# the child's), so its batches gather: up to _GATHER_RECORDS records, for at most _GATHER_MAX
# seconds; too short a window makes small batches that each pay that cost (docs/adapters.md
# has the figures). A flush, a close or a full queue cuts the window short.
_GATHER_RECORDS = 512
_GATHER_MAX = 0.5


@dataclass
class RecorderCounters:
    """What the recorder has done since it started; read it for monitoring.

    ``queued`` counts records taken off the queue or spilled (``Recorder.pending`` is what
    still waits), ``written`` what reached the store, ``retried`` failed write attempts;
    ``writer`` says who writes span and rollout rows (``process`` or ``thread``).
    """

    queued: int = 0
    written: int = 0
    batches: int = 0
    retried: int = 0
    spilled: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    last_error: str | None = None
    writer: str = "thread"
    by_table: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "by_table"}
        out["by_table"] = dict(self.by_table)
        return out


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


def _is_retryable(exc: BaseException) -> bool:
    """Connection, lock and server errors are retried; a row the database rejects is not."""
    if isinstance(exc, WriterBusy):
        return True
    name = type(exc).__name__
    module = type(exc).__module__
    if name in ("OperationalError", "InterfaceError", "ConnectionError", "ConnectionTimeout"):
        return True
    if module.startswith("psycopg") and name in ("AdminShutdown", "CannotConnectNow"):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


class Recorder:
    """Hands finished records to one background writer; see the module docstring for the rules."""

    def __init__(
        self,
        store: Store,
        *,
        queue_size: int = 100_000,
        batch_size: int = 2_000,
        flush_interval: float = 0.2,
        backpressure_timeout: float = 0.05,
        spill_dir: str | os.PathLike[str] | None = None,
        exit_timeout: float = 60.0,
        writer: str = "auto",
    ) -> None:
        """``writer``: ``auto`` (a writer process on a SQLite file, else this process's
        thread), ``process`` (the same, warning where it cannot) or ``thread``."""
        if writer not in WRITER_MODES:
            raise ValueError(f"writer must be one of {WRITER_MODES}, not {writer!r}")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.backpressure_timeout = backpressure_timeout
        self.exit_timeout = exit_timeout
        self.counters = RecorderCounters()
        self.queue_size = queue_size
        # A deque: append and popleft are atomic, so producers take no lock and wake no one;
        # the writer polls every ``flush_interval`` (or at once when woken by flush/full).
        self._buf: deque[Any] = deque()
        self._wake = threading.Event()
        self._listeners: list[tuple[BatchListener, frozenset[str] | None]] = []
        self._transforms: list[Callable[[Record], None]] = []
        key = hashlib.sha1(store.url.encode()).hexdigest()[:12]
        base = (
            Path(spill_dir)
            if spill_dir
            else Path(os.environ.get("FLYWHEEL_SPILL_DIR", ".flywheel/spill"))
        )
        self.spill_dir = base / key
        self._spill_lock = threading.Lock()
        self._spill_file: Any = None
        self._spill_path: Path | None = None
        self._give_up = threading.Event()
        self._stopped = threading.Event()
        self._conn: Any = None
        self._time_conv = ns_to_sqlite_text if store.dialect == "sqlite" else ns_to_datetime
        self._pid = os.getpid()
        self._process: WriterProcess | None = None
        self._urgent = False  # a flush, close or full queue is waiting: no gathering
        self.gather_records, self.gather_max = _GATHER_RECORDS, _GATHER_MAX
        if writer != "thread" and store.sqlite_path is not None and can_spawn():
            self._process = WriterProcess(store.sqlite_path, self.spill_dir)
            self.counters.writer = "process"
        elif writer == "process":
            log.warning("flywheel: a writer process needs a SQLite file store; using a thread")
        self._thread = threading.Thread(target=self._run, name="flywheel-recorder", daemon=True)
        self._thread.start()
        _live_recorders.add(self)

    # -- the caller's side ---------------------------------------------------------------

    def enqueue(self, record: Record | bytes) -> None:
        """Queue a finished record (or a call record packed by ``records.pack_call``).
        Never raises, never does I/O unless the queue stays full."""
        try:
            buf = self._buf
            n = len(buf)
            if n < self.queue_size:
                buf.append(record)
                if not n and self._process is not None:  # first after a lull: start gathering
                    self._wake.set()
                return
            self._urgent = True
            self._wake.set()
            deadline = time.monotonic() + self.backpressure_timeout
            while time.monotonic() < deadline:  # backpressure: give the writer a moment
                time.sleep(0.001)
                if len(buf) < self.queue_size:
                    buf.append(record)
                    return
            self._spill([record])
        except Exception:  # the host agent must never see our failure
            log.exception("flywheel recorder could not queue a record")

    def add_transform(self, transform: Callable[[Record], None]) -> None:
        """Run ``transform(record)`` on the writer thread before a record is stored (redaction)."""
        self._transforms.append(transform)

    def add_listener(self, listener: BatchListener, tables: Collection[str] | None = None) -> None:
        """Call ``listener(records_by_table)`` on the writer thread after each written batch.

        ``tables``: only these tables' records, and only when there are some; a listener of
        feedback alone spares the writer unpacking the call records sent to its process."""
        self._listeners.append((listener, frozenset(tables) if tables is not None else None))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything queued so far (and any spill); True when it all landed in time."""
        if not self._thread.is_alive():
            return not self._buf
        marker = _Flush()
        self._urgent = True
        self._buf.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid while one writes span and rollout rows, else None."""
        process = self._process
        return process.pid if process is not None else None

    def close(self, timeout: float | None = None) -> bool:
        """Flush, stop the writer, and leave in a spill file whatever the store would not take."""
        if self._stopped.is_set():
            return True
        timeout = self.exit_timeout if timeout is None else timeout
        ok = self.flush(timeout)
        self._give_up.set()
        self._stopped.set()
        self._urgent = True
        self._buf.append(None)
        self._wake.set()
        # The writer may be inside one database call (bounded by the busy/connect timeouts);
        # wait for it, so its batch is either written or spilled, never dropped.
        self._thread.join(timeout=30)
        if self._process is not None:
            self._process.stop()
        # Anything still queued (the store stayed down) goes to the spill file for next time.
        leftovers = []
        while self._buf:
            item = self._buf.popleft()
            if isinstance(item, (Record, bytes)):
                leftovers.append(item)
            elif isinstance(item, _Flush):
                item.done.set()
        if leftovers:
            self._spill(leftovers)
        self._close_spill_file()
        _live_recorders.discard(self)
        return ok and not leftovers

    # -- spill files ---------------------------------------------------------------------

    def _spill(self, records: list[Record], *, fresh: bool = True) -> None:
        """Append records to this process's spill file; ``fresh`` ones never reached the queue."""
        if fresh:
            self.counters.queued += len(records)
        rows = record_rows(records, self._time_conv)
        with self._spill_lock:
            if self._spill_file is None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                self._spill_path = self.spill_dir / f"{os.getpid()}-{time.time_ns()}.spill"
                self._spill_file = open(self._spill_path, "ab")  # noqa: SIM115
            pickle.dump(rows, self._spill_file, protocol=pickle.HIGHEST_PROTOCOL)
            self._spill_file.flush()
            self.counters.spilled += len(rows)
        log.warning(
            "flywheel recorder queue full: spilled %d records to %s", len(rows), self._spill_path
        )

    def _close_spill_file(self) -> None:
        with self._spill_lock:
            if self._spill_file is not None:
                self._spill_file.close()
                self._spill_file = None
                self._spill_path = None

    def _claim_spill_files(self) -> list[Path]:
        """Take every spill file for this store (ours and dead processes'), renaming to claim."""
        if not self.spill_dir.is_dir():
            return []
        self._close_spill_file()
        claimed = []
        for path in sorted(self.spill_dir.glob("*.spill")):
            target = path.with_suffix(f".replay-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(path, target)
            except OSError:
                continue  # another process took it
            claimed.append(target)
        return claimed

    def _replay_spill(self) -> None:
        for path in self._claim_spill_files():
            batches: list[list[tuple[str, tuple]]] = []
            with open(path, "rb") as fh:
                while True:
                    try:
                        batches.append(pickle.load(fh))
                    except EOFError:
                        break
                    except Exception:
                        log.error("flywheel: a torn record at the end of %s was skipped", path)
                        break
            rows = [row for batch in batches for row in batch]
            by_table: dict[str, list[tuple]] = defaultdict(list)
            for table, row in rows:
                by_table[table].append(row)
            try:
                self._retrying(lambda rows=by_table: self._write_once(rows))
            except Exception:
                os.rename(path, path.with_suffix(".spill"))  # keep it for the next attempt
                raise
            os.remove(path)
            self.counters.replayed += len(rows)

    # -- the writer's side ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._replay_spill()
        except Exception as exc:
            self.counters.last_error = repr(exc)
        buf = self._buf
        last_batch, rate = 0.0, 0.0  # when the last batch left; records a second lately
        while True:
            if not buf:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                if not buf:
                    if self._spill_path is not None and not self._give_up.is_set():
                        self._safe(self._replay_spill)
                    continue
                if self._process is not None and not self._urgent:  # a first record: gather
                    last_batch = time.monotonic()
                    continue
            elif self._process is not None and len(buf) < self.gather_records:
                # Wait as long as the recent rate says the batch needs to fill, within the cap;
                # only a flush, a close or a full queue cuts it short (records do not wake us
                # while the queue is not empty).
                since = time.monotonic() - last_batch
                need = (self.gather_records - len(buf)) / rate if rate else self.gather_max
                pause = min(self.gather_max - since, need)
                self._wake.clear()
                if pause > 0 and not self._urgent and self._wake.wait(pause):
                    self._wake.clear()
            self._urgent = False
            now = time.monotonic()
            rate = len(buf) / max(now - last_batch, 1e-3)
            last_batch = now
            batch: list[Record] = []
            markers: list[_Flush] = []
            stop = False
            while buf and len(batch) < self.batch_size:
                item = buf.popleft()
                if isinstance(item, _Flush):
                    markers.append(item)
                    break  # write what came before the marker, then answer it
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self.counters.queued += len(batch)
            self._safe(lambda b=batch: self._write_records(b))
            if markers:
                if self._spill_path is not None or any(self.spill_dir.glob("*.spill")):
                    self._safe(self._replay_spill)
                for m in markers:
                    m.done.set()
            if stop:
                return

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            self.counters.last_error = repr(exc)
            log.exception("flywheel recorder writer error")

    def _write_records(self, batch: list[Record]) -> None:
        if not batch:
            return
        if self._transforms:  # redaction sees span and rollout records, never a call record
            batch = self._transformed(expand_calls(batch))
        if self._process is not None:
            shipped: list[Record | bytes] = []
            rest: list[Record | bytes] = []
            for r in batch:
                (shipped if r.__class__ is bytes or r.TABLE in SHIPPED_TABLES else rest).append(r)
            if shipped and self._ship(shipped):
                batch = rest
        if not batch:
            return
        batch = expand_calls(batch)
        by_table: dict[str, list[tuple]] = defaultdict(list)
        by_kind: dict[str, list[Record]] = defaultdict(list)
        for record in batch:
            try:
                by_table[record.TABLE].append(record_row(record, self._time_conv))
                by_kind[record.TABLE].append(record)
            except Exception:
                self.counters.dead_lettered += 1
                log.exception("flywheel: a record could not be serialized: %r", record)
        try:
            self._retrying(lambda: self._write_once(by_table))
        except Exception:
            # The store gave up (closing with the database down): keep the rows for next time.
            flat = [r for rs in by_kind.values() for r in rs]
            self._spill(flat, fresh=False)
            return
        self._tell_listeners(by_kind)

    def _transformed(self, batch: list[Record]) -> list[Record]:
        """Records after the redaction transforms; one that fails them is not stored."""
        kept = []
        for record in batch:
            try:
                for transform in self._transforms:
                    transform(record)
                kept.append(record)
            except Exception:
                self.counters.dead_lettered += 1
                log.exception("flywheel: a record could not be redacted: %r", record)
        return kept

    def _tell_listeners(self, by_kind: dict[str, list[Record]]) -> None:
        for listener, tables in self._listeners:
            if tables is not None:
                wanted = {t: rs for t, rs in by_kind.items() if t in tables}
                if not wanted:
                    continue
            try:
                listener(by_kind if tables is None else wanted)
            except Exception:
                log.exception("flywheel batch listener failed")

    def _ship(self, records: list[Record]) -> bool:
        """Have the writer process store span and rollout records; False when it is gone
        (the caller then writes them in this thread, from now on)."""
        process = self._process
        assert process is not None
        try:
            payload = values_payload(records)
        except Exception:  # a value pickle refuses (a lock, a local class): send finished rows
            payload = rows_payload(records)

        def attempt() -> tuple:
            nonlocal payload
            reply = process.request(payload)
            if reply[0] == "unpicklable":  # e.g. a class from the host's __main__
                payload = rows_payload(records)
                reply = process.request(payload)
            if reply[0] == "retry":
                raise WriterBusy(reply[1])
            return reply

        try:
            _, written, rejected = self._retrying(attempt)
        except WriterGone as exc:
            log.warning("flywheel: %s; writing in this process from now on", exc)
            self._process = None
            self.counters.writer = "thread"
            process.stop(timeout=1)
            return False
        except Exception:
            self._spill(records, fresh=False)  # closing with the store down: kept for next time
            return True
        for table, n in written.items():
            self.counters.by_table[table] += n
            self.counters.written += n
        self.counters.dead_lettered += rejected
        self.counters.batches += 1
        if any(tables is None or tables & SHIPPED_TABLES for _, tables in self._listeners):
            by_kind: dict[str, list[Record]] = defaultdict(list)
            for item in records:
                record = unpack_record(item)
                by_kind[record.TABLE].append(record)
            self._tell_listeners(by_kind)
        return True

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` retried while the store is unavailable, until it works or we give up.

        The first attempt runs bare: setting up a tenacity loop costs more than a small batch.
        """
        try:
            return fn()
        except Exception as exc:
            if not _is_retryable(exc) or self._give_up.is_set():
                raise
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
        return retrying(fn)

    def _note_failure(self, exc: BaseException | None, attempt: int) -> None:
        self.counters.retried += 1
        self.counters.last_error = repr(exc)
        self._drop_connection()
        if attempt in (1, 10) or attempt % 50 == 0:
            log.warning("flywheel store unavailable (%s); retrying, nothing is lost", exc)

    def _write_once(self, by_table: dict[str, list[tuple]]) -> None:
        if self._conn is None:
            self._conn = self.store.raw_connection()
        conn = self._conn
        try:
            for table, rows in by_table.items():
                cls = RECORD_TYPES[table]
                self.store.write_rows(conn, table, cls.COLUMNS, rows)
            conn.commit()
        except BaseException as exc:
            try:
                conn.rollback()
            except Exception:
                self._drop_connection()
            if not _is_retryable(exc):
                self._dead_letter(by_table, exc)
                return
            raise
        n = 0
        for table, rows in by_table.items():
            self.counters.by_table[table] += len(rows)
            n += len(rows)
        self.counters.written += n
        self.counters.batches += 1

    def _dead_letter(self, by_table: dict[str, list[tuple]], exc: BaseException) -> None:
        """Rows the database rejects are written one by one; the rejected ones go to a file."""
        conn = self._conn
        bad: list[tuple[str, tuple]] = []
        for table, rows in by_table.items():
            cls = RECORD_TYPES[table]
            for row in rows:
                try:
                    self.store.write_rows(conn, table, cls.COLUMNS, [row])
                    conn.commit()
                    self.counters.written += 1
                    self.counters.by_table[table] += 1
                except Exception:
                    conn.rollback()
                    bad.append((table, row))
        if bad:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"dead-{os.getpid()}.pickle"
            with open(path, "ab") as fh:
                pickle.dump(bad, fh)
            self.counters.dead_lettered += len(bad)
            log.error("flywheel: the store rejected %d rows (%s); kept in %s", len(bad), exc, path)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate() if hasattr(conn, "invalidate") else conn.close()
            except Exception:
                pass


_live_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for recorder in list(_live_recorders):
        if recorder._pid == os.getpid():
            recorder.close()
