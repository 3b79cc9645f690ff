"""A database that is locked or unreachable for a few seconds mid-load loses nothing."""

from __future__ import annotations

import sqlite3
import time
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text

from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import RolloutRecord, SpanRecord
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.store.database import Store

from .tcp_proxy import TcpProxy, through


def _record(recorder: Recorder, n_rollouts: int, spans_each: int, tag: str) -> None:
    for i in range(n_rollouts):
        rollout_id, now = new_rollout_id(), time.time_ns()
        for j in range(spans_each):
            recorder.enqueue(
                SpanRecord(
                    id=new_span_id(),
                    rollout_id=rollout_id,
                    workflow="outage",
                    name=f"s{j}",
                    kind="tool",
                    sequence=j,
                    started_at=now,
                    ended_at=now,
                )  # fmt: skip
            )
        recorder.enqueue(
            RolloutRecord(
                id=rollout_id, workflow="outage", input=f"{tag}-{i}", started_at=now, ended_at=now
            )
        )


def _counts(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        result = (
            conn.execute(text("SELECT COUNT(*) FROM rollout")).scalar(),
            conn.execute(text("SELECT COUNT(*) FROM span")).scalar(),
        )
    engine.dispose()
    return result


def test_sqlite_locked_for_seconds_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "locked.db"
    url = f"sqlite:///{path}"
    store = Store(url)
    recorder = Recorder(store, queue_size=500, flush_interval=0.01, max_buffer_mb=0.05)
    _record(recorder, 50, 9, "before")
    assert recorder.flush(10)

    blocker = sqlite3.connect(path, timeout=1, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # nobody else can write now
    started = time.monotonic()
    _record(recorder, 300, 9, "during")  # 3,000 records, far past 50 KB: must leave memory
    time.sleep(max(0.0, 3 - (time.monotonic() - started)))  # locked for at least 3 seconds
    assert recorder.counters.written == 500  # nothing got through while locked
    blocker.rollback()
    blocker.close()
    assert recorder.close(timeout=60)
    assert recorder.counters.spilled > 0  # read back from the journal
    assert recorder.counters.lost == 0
    assert _counts(url) == (350, 3150)
    assert list(recorder.journal_dir.iterdir()) == []  # all written: the journal is gone


@pytest.mark.postgres
@pytest.mark.parametrize("outage", ["cut", "blackhole"])
def test_postgres_unreachable_for_seconds_loses_nothing(postgres_url, outage):
    """Refused and reset (``cut``), or silent (``blackhole``): a write into a silent server
    fails by the store's wait limit (here 5.5 s, from the URL's statement_timeout) and is
    retried, so the writer never hangs."""
    parts = urlsplit(postgres_url.replace("postgresql+psycopg", "http"))
    proxy = TcpProxy(parts.hostname, parts.port)
    proxy.start()
    store = Store(
        through(proxy, postgres_url, connect_timeout="2", options="-c statement_timeout=500")
    )
    recorder = Recorder(store, queue_size=1000, flush_interval=0.01)
    _record(recorder, 50, 9, "before")
    assert recorder.flush(10)

    getattr(proxy, outage)()
    _record(recorder, 200, 9, "during")
    deadline = time.monotonic() + (3 if outage == "cut" else 15)
    while recorder.counters.retried == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the writer keeps failing to reach the server meanwhile
    assert recorder.counters.retried > 0
    proxy.restore()
    _record(recorder, 50, 9, "after")
    assert recorder.close(timeout=60)
    proxy.close()
    assert _counts(postgres_url) == (300, 2700)
    assert recorder.counters.written == 300 + 2700


def test_store_down_at_exit_spills_and_the_next_recorder_replays(tmp_path):
    url = f"sqlite:///{tmp_path / 'spill.db'}"
    store = Store(url)
    first = Recorder(store, flush_interval=0.01, exit_timeout=0.5)
    blocker = sqlite3.connect(tmp_path / "spill.db", timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    _record(first, 20, 4, "x")
    assert first.close(timeout=0.5) is False  # could not write: kept on disk instead
    assert list(first.journal_dir.glob("*.journal"))
    blocker.rollback()
    blocker.close()
    second = Recorder(Store(url), flush_interval=0.01)  # e.g. the next process start
    assert second.flush(30)
    assert second.counters.replayed == 100
    assert _counts(url) == (20, 80)
    second.close()
