"""The journal's files: private, per process, never code, and honest when the disk is full."""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import RolloutRecord, SpanRecord
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.store.database import Store


def _record(recorder: Recorder, n: int, tag: str, pad: int = 0) -> list[str]:
    ids = []
    for i in range(n):
        rollout_id, now = new_rollout_id(), time.time_ns()
        recorder.enqueue(
            SpanRecord(
                id=new_span_id(), rollout_id=rollout_id, name="s", started_at=now, ended_at=now
            )
        )
        recorder.enqueue(
            RolloutRecord(
                id=rollout_id,
                workflow="journal",
                input={"tag": tag, "i": i, "pad": "x" * pad},
                started_at=now,
                ended_at=now,
            )
        )
        ids.append(rollout_id)
    return ids


class _Lock:
    """Hold a SQLite file's write lock (``BEGIN EXCLUSIVE``): the store refuses writes."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=1)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def _count(url: str, sql: str = "SELECT COUNT(*) FROM rollout") -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text(sql)).scalar()
    engine.dispose()
    return n


class _Exploit:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = Store(url)
    marker = tmp_path / "pwned"
    payload = pickle.dumps([_Exploit(marker)])
    journal = tmp_path / "journal"
    first = Recorder(store, spill_dir=journal, writer="thread")
    first.close()
    folder = first.journal_dir
    folder.mkdir(parents=True, exist_ok=True)
    # every place a spill or journal file was or is read from
    (folder / "4242-1.000001.journal").write_bytes(payload)
    (folder / "dead-4242.pickle").write_bytes(payload)
    (folder / "4243-1.spill").write_bytes(payload)
    legacy = tmp_path / ".flywheel" / "spill" / "0123456789ab"
    legacy.mkdir(parents=True)
    (legacy / "1-1.spill").write_bytes(payload)
    recorder = Recorder(store, spill_dir=journal, writer="thread")
    ids = _record(recorder, 10, "after")
    assert recorder.close(timeout=30)
    assert not marker.exists()
    assert _count(url) == len(ids)
    # the planted segment's bytes were set aside as malformed lines, not replayed or lost
    dead = list(folder.glob("dead-*.jsonl"))
    assert dead and "4242-1.000001.journal" in dead[0].read_text()
    assert not (folder / "4242-1.000001.journal").exists()


def test_journal_files_are_private_and_another_users_are_refused(tmp_path, caplog):
    if os.getuid() != 0:
        pytest.skip("making a file of another user needs root")
    url = f"sqlite:///{tmp_path / 'o.db'}"
    store = Store(url)
    lock = _Lock(tmp_path / "o.db")  # the store refuses: records wait in the journal
    recorder = Recorder(store, spill_dir=tmp_path / "j", writer="thread", exit_timeout=0.2)
    _record(recorder, 5, "kept")
    assert recorder.close() is False
    folder = recorder.journal_dir
    assert os.stat(folder).st_mode & 0o777 == 0o700
    files = list(folder.iterdir())
    assert files and all(os.stat(p).st_mode & 0o777 == 0o600 for p in files)
    # a segment another user put there is not read
    foreign = folder / "999-1.000001.journal"
    foreign.write_bytes(b'["rollout", []]\n')
    os.chown(foreign, 65534, 65534)
    lock.release()
    with caplog.at_level(logging.ERROR):
        second = Recorder(store, spill_dir=tmp_path / "j", writer="thread")
        assert second.flush(30)
        assert second.close(timeout=30)
    assert _count(url) == 5  # ours replayed
    assert foreign.exists() and "not a regular file of this user" in caplog.text
    # a whole directory owned by someone else: not used, records still reach the store
    other = tmp_path / "other"
    other.mkdir(mode=0o777)
    os.chown(other, 65534, 65534)
    third = Recorder(store, spill_dir=other, writer="thread")
    os.chown(third.journal_dir.parent, 65534, 65534)
    third.journal_dir.mkdir(mode=0o777, exist_ok=True)
    os.chown(third.journal_dir, 65534, 65534)
    _record(third, 3, "unsafe dir")
    with caplog.at_level(logging.ERROR):
        assert third.close(timeout=30)
    assert "belongs to uid 65534" in caplog.text
    assert _count(url) == 8


OTHER_PROCESS = textwrap.dedent(
    """
    import sys, time
    from flywheel_middleware.capture.ids import new_rollout_id
    from flywheel_middleware.capture.records import RolloutRecord
    from flywheel_middleware.recording.recorder import Recorder
    from flywheel_middleware.store.database import Store

    recorder = Recorder(Store(sys.argv[1]), spill_dir=sys.argv[2], writer="thread")
    for i in range(300):
        now = time.time_ns()
        recorder.enqueue(RolloutRecord(id=new_rollout_id(), workflow="other", started_at=now))
    recorder.journal_now()
    print("journaled", flush=True)
    sys.stdin.read()  # until the test says so
    assert recorder.close(timeout=30)
    print("closed", recorder.counters.written, flush=True)
    """
)


def test_processes_sharing_a_journal_directory_never_take_each_others_files(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    lock = _Lock(tmp_path / "s.db")
    script = tmp_path / "other.py"
    script.write_text(OTHER_PROCESS)
    other = subprocess.Popen(
        [sys.executable, str(script), url, str(tmp_path / "j")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "journaled"
        mine = Recorder(store, spill_dir=tmp_path / "j", writer="thread")
        _record(mine, 200, "mine")
        assert mine.flush(1) is False  # the store is still locked
        lock.release()
        assert mine.flush(30)
        assert mine.counters.replayed == 0  # the other process is alive: its files are its own
        assert mine.close(timeout=30)
        out, _ = other.communicate("", timeout=60)
        assert other.returncode == 0 and "closed 300" in out
    finally:
        if other.poll() is None:
            other.kill()
    assert _count(url, "SELECT COUNT(*) FROM rollout WHERE workflow = 'other'") == 300
    assert _count(url, "SELECT COUNT(*) FROM rollout WHERE workflow = 'journal'") == 200
    assert not list((tmp_path / "j").rglob("*.journal"))


def test_a_torn_or_damaged_segment_is_replayed_as_far_as_it_reads(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 't.db'}"
    store = Store(url)
    lock = _Lock(tmp_path / "t.db")
    first = Recorder(store, spill_dir=tmp_path / "j", writer="thread", exit_timeout=0.2)
    _record(first, 20, "torn")
    assert first.close() is False
    (segment,) = first.journal_dir.glob("*.journal")
    lines = segment.read_bytes().split(b"\n")
    lines[3] = b"\x00garbage{"  # damage in the middle: one record
    segment.write_bytes(b"\n".join(lines[:-1]) + b'\n["rollout", ["cut sh')  # and a torn end
    lock.release()
    with caplog.at_level(logging.WARNING):
        second = Recorder(store, spill_dir=tmp_path / "j", writer="thread")
        assert second.flush(30)
        assert second.close(timeout=30)
    assert "cut short by a crash" in caplog.text
    assert second.counters.dead_lettered == 2  # damaged and torn lines, set aside with why
    (dead,) = first.journal_dir.glob("dead-*.jsonl")
    assert "garbage" in dead.read_text() and "cut sh" in dead.read_text()
    spans = _count(url, "SELECT COUNT(*) FROM span")
    # every readable record of the segment; the damaged one too when the first recorder's
    # last write, begun before its close gave up waiting, went through once the lock was gone
    assert _count(url) + spans in (40 - 1, 40)


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_records_in_memory_and_says_so(tmp_path, tiny_disk, caplog):
    url = f"sqlite:///{tmp_path / 'full.db'}"
    store = Store(url)
    with caplog.at_level(logging.WARNING):
        recorder = Recorder(store, spill_dir=tiny_disk, writer="thread")
        ids = _record(recorder, 2500, "full", pad=1000)  # 2.5 MB into 64 KB of journal
        assert recorder.flush(60)
        assert recorder.close(timeout=30)
    assert _count(url) == len(ids)
    assert recorder.counters.lost == 0
    assert "cannot write the journal" in caplog.text
    assert "No space left on device" in caplog.text


def test_a_full_disk_and_full_memory_with_the_store_down_count_what_is_lost(
    tmp_path, tiny_disk, caplog
):
    url = f"sqlite:///{tmp_path / 'lost.db'}"
    store = Store(url)
    lock = _Lock(tmp_path / "lost.db")
    with caplog.at_level(logging.WARNING):
        recorder = Recorder(
            store, spill_dir=tiny_disk, writer="thread", max_buffer_mb=0.25, exit_timeout=30
        )
        ids = _record(recorder, 2500, "lost", pad=1000)
        deadline = time.monotonic() + 10
        while recorder.pending and recorder.counters.lost == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        lock.release()
        recorder.close()
    stored = _count(url) + _count(url, "SELECT COUNT(*) FROM span")
    assert recorder.counters.lost > 0
    assert stored + recorder.counters.lost == 2 * len(ids)  # every record accounted for
    assert "LOST" in caplog.text and "nothing is lost" not in caplog.text


def test_memory_is_bounded_in_bytes_during_an_outage(tmp_path):
    url = f"sqlite:///{tmp_path / 'mem.db'}"
    store = Store(url)
    lock = _Lock(tmp_path / "mem.db")
    recorder = Recorder(store, spill_dir=tmp_path / "j", writer="thread", max_buffer_mb=2)
    peak = 0
    for _ in range(20):
        _record(recorder, 100, "big", pad=16_000)  # 32 MB in all
        time.sleep(0.06)
        peak = max(peak, recorder.counters.buffered_bytes)
    assert peak <= 2 * 1024 * 1024 + 16_500 * 200  # the bound, and at most one chunk over
    assert recorder.counters.spilled > 0
    lock.release()
    assert recorder.close(timeout=60)
    assert _count(url) == 2000


def test_feedback_and_telemetry_written_twice_are_stored_once(store_url, tmp_path):
    """What a replay or a retry after a lost COMMIT reply does: the same rows again."""
    from flywheel_middleware.capture.records import FeedbackRecord, TelemetryRecord

    store = Store(store_url)
    rollout_id = new_rollout_id()
    rows = [
        FeedbackRecord(rollout_id=rollout_id, key="rating", value=4.0, created_at=time.time_ns()),
        TelemetryRecord(rollout_id=rollout_id, event_type="click", received_at=time.time_ns()),
    ]
    for _ in range(2):
        recorder = Recorder(store, spill_dir=tmp_path / "j", writer="thread")
        for row in rows:
            recorder.enqueue(row)
        assert recorder.close(timeout=30)
    uid = rows[0].uid
    assert uuid.UUID(hex=uid)  # a client-made id
    count = f"SELECT COUNT(*) FROM feedback WHERE rollout_id = '{rollout_id}'"
    assert _count(store_url, count) == 1
    count = f"SELECT COUNT(*) FROM telemetry_event WHERE rollout_id = '{rollout_id}'"
    assert _count(store_url, count) == 1


def test_a_fifo_planted_as_a_segment_neither_blocks_nor_is_read(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'fifo.db'}"
    store = Store(url)
    first = Recorder(store, spill_dir=tmp_path / "j", writer="thread")
    first.close()
    first.journal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fifo = first.journal_dir / "4242-1.000001.journal"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with caplog.at_level(logging.ERROR):
        recorder = Recorder(store, spill_dir=tmp_path / "j", writer="thread")
        ids = _record(recorder, 5, "after the fifo")
        assert recorder.flush(10)
        assert recorder.close(timeout=10)
    assert _count(url) == len(ids)
    assert "not a regular file" in caplog.text and fifo.exists()


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_refused_row_is_kept_without_its_secrets(tmp_path, writer):
    from flywheel_middleware.recording.secrets import SecretRedactor

    key = "sk-proj-" + "a1b2c3d4" * 6
    recorder = Recorder(
        Store(f"sqlite:///{tmp_path / 'dl.db'}"),
        spill_dir=tmp_path / "j",
        writer=writer,
        secrets=SecretRedactor(),
    )
    # no workflow: the NOT NULL constraint refuses the row, which goes to the dead letters
    recorder.enqueue(
        RolloutRecord(id=new_rollout_id(), workflow=None, input={"key": key}, started_at=1)
    )
    assert recorder.close(timeout=30)
    assert recorder.counters.dead_lettered == 1
    (dead,) = (tmp_path / "j").rglob("dead-*.jsonl")
    text = dead.read_text()
    assert "NOT NULL" in text and key not in text and "[REDACTED]" in text


def test_a_receipt_counts_the_journal_or_else_waits_for_the_store(tmp_path: Path) -> None:
    """What a service waits for before a 2xx: kept on local disk while the store refuses; and
    when the journal cannot be written either, not kept until the store has the records."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    lock = _Lock(tmp_path / "r.db")
    recorder = Recorder(store, spill_dir=tmp_path / "j", writer="thread", journal_interval=5)
    try:
        receipt = recorder.receipt()
        _record(recorder, 3, "journaled")
        assert receipt.kept(timeout=4)  # the journal pass is run for it, not 5 s later
        assert _count(url) == 0
    finally:
        lock.release()
        recorder.close()

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the journal folder should be")
    lock = _Lock(tmp_path / "r.db")
    recorder = Recorder(store, spill_dir=blocked / "j", writer="thread", exit_timeout=5)
    try:
        receipt = recorder.receipt()
        ids = _record(recorder, 3, "memory only")
        assert not receipt.kept(timeout=1)  # neither the journal nor the store has them
        assert recorder.counters.unjournaled >= 6
        # a retry whose records are all repeats queues nothing new: still not kept
        assert not recorder.receipt().kept(timeout=0.5)
        lock.release()
        assert receipt.kept(timeout=20)
        assert _count(url, f"SELECT COUNT(*) FROM rollout WHERE id = '{ids[-1]}'") == 1
    finally:
        recorder.close()


def test_a_receipt_is_not_kept_when_records_were_lost_meanwhile(tmp_path: Path) -> None:
    """Journal refusing, memory bound tiny: a chunk is dropped (counted lost); the receipt
    must say so even though the store comes back and takes the rest."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    (tmp_path / "file").write_text("not a folder")
    lock = _Lock(tmp_path / "r.db")
    recorder = Recorder(
        store, spill_dir=tmp_path / "file" / "j", writer="thread", max_buffer_mb=0.001
    )
    try:
        _record(recorder, 1, "first")  # the writer takes it and retries it, the store locked
        deadline = time.monotonic() + 20
        while recorder.counters.retried == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        receipt = recorder.receipt()
        _record(recorder, 2, "lost", pad=4000)  # waits behind it, past the memory bound
        assert not receipt.kept(timeout=1)
        lock.release()
        assert not receipt.kept(timeout=10) and recorder.counters.lost > 0
        assert recorder.receipt().kept(timeout=10)  # a later request is kept again
    finally:
        recorder.close()
