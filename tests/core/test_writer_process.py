"""The writer process: span and rollout rows of a SQLite file store are written by a child.

What must hold: the rows are the ones the writer thread would write; a child that dies, a value
that will not pickle, or a class the child cannot import loses nothing; the thread remains
where a child cannot work (in-memory SQLite, ``writer="thread"``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import types

import pytest
from sqlalchemy import create_engine, text

from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import (
    CallRecord,
    FeedbackRecord,
    RolloutRecord,
    SpanRecord,
    pack_call,
)
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.store.database import Store


def _one_span_rollout(
    recorder: Recorder, *, start: int, end: int, span: dict, rollout: dict
) -> str:
    """Queue a rollout of workflow ``wp`` with one span straight into ``recorder``."""
    rollout_id = new_rollout_id()
    times = {"workflow": "wp", "started_at": start, "ended_at": end}
    recorder.enqueue(SpanRecord(id=new_span_id(), rollout_id=rollout_id, **times, **span))
    recorder.enqueue(RolloutRecord(id=rollout_id, **times, **rollout))
    return rollout_id


def _record(recorder: Recorder, n: int, tag: str, output: object = None) -> list[str]:
    """``n`` rollouts of one tool span each, queued straight into ``recorder``."""
    ids = []
    for i in range(n):
        now = time.time_ns()
        span = {
            "name": "tool",
            "kind": "tool",
            "attributes": {"k": [1, 2.5, None, "x"]},
            "output": output if output is not None else {"answer": i},
        }
        rollout = {"input": {"q": f"{tag}-{i}", "n": i}, "output": f"out-{i}"}
        ids.append(_one_span_rollout(recorder, start=now, end=now, span=span, rollout=rollout))
    return ids


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(sql))]
    engine.dispose()
    return rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_sqlite_file_store_is_written_by_a_child_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    rec = Recorder(Store(url), flush_interval=0.01)
    assert rec.counters.writer == "process"
    _record(rec, 30, "a")
    assert rec.flush(30)
    pid = rec.writer_pid
    assert pid is not None and pid != os.getpid() and _alive(pid)
    assert rec.counters.by_table == {"span": 30, "rollout": 30}
    assert rec.close(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:  # it stops with the recorder
        time.sleep(0.05)
    assert not _alive(pid)
    assert _rows(url, "SELECT COUNT(*) FROM span")[0][0] == 30


def test_the_child_writes_exactly_the_rows_the_writer_thread_writes(tmp_path):
    """The same records through both writers give identical rows, column for column."""
    columns = "name, kind, status, input, output, attributes, started_at, ended_at, workflow"
    got = {}
    for mode in ("process", "thread"):
        url = f"sqlite:///{tmp_path / f'{mode}.db'}"
        rec = Recorder(Store(url), flush_interval=0.01, writer=mode)
        assert rec.counters.writer == mode
        _one_span_rollout(
            rec,
            start=1_700_000_000_123_456_789,
            end=1_700_000_001_000_000_000,
            span={
                "name": "chat",
                "kind": "llm",
                "model": "m",
                "attributes": {"params": {"t": 0.5, "stop": None, "nan": float("nan")}},
                "output": {"text": "héllo", "n": [1, 2]},
            },
            rollout={"input": {"q": "same"}, "output": "done"},
        )
        assert rec.close(timeout=30)
        got[mode] = _rows(url, f"SELECT {columns} FROM span")
    assert got["process"] == got["thread"]
    assert '"nan":null' in got["process"][0][5]  # JSON has no NaN: null, as JSON.stringify writes


def test_a_killed_child_loses_nothing_and_the_thread_takes_over(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    rec = Recorder(Store(url), flush_interval=0.01)
    _record(rec, 20, "before")
    assert rec.flush(30)
    os.kill(rec.writer_pid, signal.SIGKILL)
    _record(rec, 25, "after")
    assert rec.flush(30)
    assert rec.counters.writer == "thread"
    assert rec.writer_pid is None  # so the thread goes back to its poll, not a wake per lull
    _record(rec, 5, "later")
    assert rec.close(timeout=30)
    assert _rows(url, "SELECT COUNT(*) FROM rollout")[0][0] == 50
    assert _rows(url, "SELECT COUNT(*) FROM span")[0][0] == 50


def test_ctrl_c_for_the_host_does_not_stop_the_child(tmp_path):
    url = f"sqlite:///{tmp_path / 'i.db'}"
    rec = Recorder(Store(url), flush_interval=0.01)
    _record(rec, 3, "a")
    assert rec.flush(30)
    os.kill(rec.writer_pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole group
    time.sleep(0.2)
    _record(rec, 3, "b")
    assert rec.flush(30)
    assert rec.counters.writer == "process"
    assert rec.close(timeout=30)
    assert _rows(url, "SELECT COUNT(*) FROM rollout")[0][0] == 6


def test_values_that_do_not_pickle_or_unpickle_are_stored_as_their_text(tmp_path):
    """A lock will not pickle here; a class from a module the child lacks will not unpickle."""
    module = types.ModuleType("fw_only_in_the_parent")

    class Answer:
        def __init__(self, text: str) -> None:
            self.text = text

        def __repr__(self) -> str:
            return f"Answer({self.text!r})"

    Answer.__module__ = module.__name__
    Answer.__qualname__ = "Answer"
    module.Answer = Answer
    sys.modules[module.__name__] = module
    try:
        url = f"sqlite:///{tmp_path / 'p.db'}"
        rec = Recorder(Store(url), flush_interval=0.01)
        _record(rec, 2, "lock", output={"lock": threading.Lock()})
        _record(rec, 2, "cls", output=Answer("forty-two"))
        _record(rec, 2, "plain")
        assert rec.close(timeout=30)
    finally:
        del sys.modules[module.__name__]
    outputs = [r[0] for r in _rows(url, "SELECT output FROM span ORDER BY started_at")]
    assert len(outputs) == 6
    assert "_thread.lock" in outputs[0] and "_thread.lock" in outputs[1]
    assert outputs[2:4] == ["\"Answer('forty-two')\""] * 2
    assert outputs[4:] == ['{"answer":0}', '{"answer":1}']
    assert rec.counters.writer == "process"  # the child stayed up throughout


def test_a_row_the_database_rejects_is_kept_and_the_rest_written(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    rec = Recorder(Store(url), flush_interval=0.01, spill_dir=tmp_path / "spill")
    ids = _record(rec, 3, "ok")
    # wider than any SQLite integer: stored as NULL, with a note
    wide = new_rollout_id()
    rec.enqueue(RolloutRecord(id=wide, workflow="wp", input_tokens=2**70, started_at=1))
    # no workflow: the NOT NULL constraint refuses this one row
    rec.enqueue(RolloutRecord(id=new_rollout_id(), workflow=None, started_at=1))
    assert rec.close(timeout=30)
    assert rec.counters.dead_lettered == 1
    assert rec.counters.coerced == 1
    stored = dict(_rows(url, "SELECT id, input_tokens FROM rollout"))
    assert sorted(stored) == sorted([*ids, wide]) and stored[wide] is None
    (dead,) = (tmp_path / "spill").rglob("dead-*.jsonl")
    (entry,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert entry["table"] == "rollout" and entry["row"]["workflow"] is None
    assert "NOT NULL" in entry["error"]


def test_feedback_is_written_in_the_host_after_its_rollout(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    rec = Recorder(Store(url), flush_interval=0.01)
    seen = []
    rec.add_listener(lambda by_table: seen.extend(sorted(by_table)))
    [rid] = _record(rec, 1, "f")
    rec.enqueue(FeedbackRecord(rollout_id=rid, value=5))
    assert rec.close(timeout=30)
    assert _rows(url, "SELECT rollout_id, value FROM feedback") == [(rid, 5.0)]
    assert {"rollout", "span", "feedback"} <= set(seen)  # listeners see every table


def test_the_thread_writes_where_a_child_cannot_or_is_not_wanted(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 't.db'}"
    assert Recorder(Store("sqlite://"), writer="process").counters.writer == "thread"  # memory
    thread = Recorder(Store(url), flush_interval=0.01, writer="thread")
    monkeypatch.setattr(sys, "executable", "/usr/bin/uwsgi")  # embedded: no Python to run
    embedded = Recorder(Store(url), flush_interval=0.01)
    for rec in (thread, embedded):
        assert rec.counters.writer == "thread" and rec.writer_pid is None
        _record(rec, 2, "t")
        assert rec.close(timeout=30)
    assert _rows(url, "SELECT COUNT(*) FROM rollout")[0][0] == 4


def test_an_unknown_writer_mode_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="writer must be one of"):
        Recorder(Store(f"sqlite:///{tmp_path / 'x.db'}"), writer="fork")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_host_child_writes_through_its_own_writer(tmp_path):
    import flywheel_middleware as fw

    url = f"sqlite:///{tmp_path / 'fork.db'}"
    fw.configure(store_url=url)
    try:
        with fw.rollout("parent"):
            pass
        assert fw.flush(30)
        parent_writer = fw.get_recorder().writer_pid
        pid = os.fork()
        if pid == 0:  # the forked child: records, flushes, reports its writer's pid, leaves
            code = 1
            try:
                with fw.rollout("child"):
                    pass
                ok = fw.flush(30)
                child_writer = fw.get_recorder().writer_pid
                code = 0 if ok and child_writer not in (None, parent_writer) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with fw.rollout("parent-again"):
            pass
        assert fw.flush(30)
        assert fw.get_recorder().writer_pid == parent_writer
        workflows = sorted(r[0] for r in _rows(url, "SELECT workflow FROM rollout"))
        assert workflows == ["child", "parent", "parent-again"]
    finally:
        fw.shutdown()


def _call(i: int, error: str | None = None) -> CallRecord:
    return CallRecord(
        span_id=10_000 + i, rollout_id=f"{i:032x}", workflow="wp", kind="llm", name="chat",
        error=error, started_at=1_700_000_000_000_000_000 + i, ended_at=1_700_000_000_500_000_000,
        duration_ms=500.0, model="m", input=[{"role": "user", "content": f"q{i}"}],
        output={"role": "assistant", "content": "a"}, input_tokens=3, output_tokens=None,
        attributes={"invocation_params": {"t": 0.1}}, user_id="u1", tags=["x"],
    )  # fmt: skip


def _packed(i: int, error: str | None = None) -> bytes:
    call = _call(i, error)
    packed = pack_call(call.values(call))
    assert packed.__class__ is bytes
    return packed


@pytest.mark.parametrize("make", [_call, _packed], ids=["object", "packed"])
def test_a_call_record_becomes_the_same_span_and_rollout_rows_in_both_writers(tmp_path, make):
    """``tracing.record_call`` queues one record for a one-span rollout (packed to bytes where
    its values allow); both writers split it into the same rows."""
    got = {}
    for mode in ("process", "thread"):
        url = f"sqlite:///{tmp_path / f'{mode}.db'}"
        rec = Recorder(Store(url), flush_interval=0.01, writer=mode)
        rec.enqueue(make(1))
        rec.enqueue(make(2, error="ValueError: bad"))
        assert rec.close(timeout=30)
        assert rec.counters.by_table == {"span": 2, "rollout": 2}
        got[mode] = (
            _rows(url, "SELECT * FROM span ORDER BY id"),
            _rows(url, "SELECT * FROM rollout ORDER BY id"),
        )
    assert got["process"] == got["thread"]
    spans, rollouts = got["process"]
    assert [(s[0], s[1], s[8]) for s in spans] == [
        (10_001, f"{1:032x}", "ok"),
        (10_002, f"{2:032x}", "error"),
    ]
    statuses = [(r[10], r[15], r[16], r[17]) for r in rollouts]  # status, tokens in/out/total
    assert statuses == [("succeeded", 3, None, 3), ("failed", 3, None, 3)]


def test_a_call_record_is_a_span_row_and_a_rollout_row():
    """What the one row builder makes of a call record: the span keeps the call's own token
    counts, the rollout takes 0 as unknown; times given as datetimes are converted too."""
    from datetime import datetime, timezone

    from flywheel_middleware.capture.records import ns_to_sqlite_text
    from flywheel_middleware.recording.rows import rows_of
    from flywheel_middleware.tables import ROLLOUT, SPAN

    bare = CallRecord(
        span_id=7, rollout_id="f" * 32, workflow="wp", kind="tool", name="t",
        started_at=datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc), ended_at=None,
        input_tokens=0, output_tokens=0, error="KeyError: 'x'", input={"q": [1, None]},
    )  # fmt: skip
    [(span_table, span_row), (rollout_table, rollout_row)] = rows_of(
        "call", bare.values(bare), ns_to_sqlite_text
    )
    span = dict(zip(SPAN.record_columns, span_row, strict=True))
    rollout = dict(zip(ROLLOUT.record_columns, rollout_row, strict=True))
    assert (span_table, rollout_table) == ("span", "rollout")
    assert (span["id"], span["rollout_id"], span["sequence"], span["status"]) == (
        7,
        "f" * 32,
        0,
        "error",
    )
    assert (span["input_tokens"], span["output_tokens"]) == (0, 0)
    assert span["started_at"] == rollout["started_at"] == "2026-01-02 03:04:05.678000"
    assert span["input"] == rollout["input"] == '{"q":[1,null]}'
    assert (rollout["id"], rollout["status"], rollout["error"]) == (
        "f" * 32,
        "failed",
        "KeyError: 'x'",
    )
    assert (rollout["input_tokens"], rollout["output_tokens"], rollout["total_tokens"]) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize("make", [_call, _packed], ids=["object", "packed"])
def test_call_records_kept_on_disk_at_exit_come_back_as_their_rows(tmp_path, make):
    import sqlite3

    path = tmp_path / "spill.db"
    first = Recorder(Store(f"sqlite:///{path}"), flush_interval=0.01, exit_timeout=0.5)
    blocker = sqlite3.connect(path, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    for i in range(5):
        first.enqueue(make(i))
    assert first.close(timeout=0.5) is False
    blocker.rollback()
    blocker.close()
    second = Recorder(Store(f"sqlite:///{path}"), flush_interval=0.01)
    assert second.flush(30)
    assert second.counters.replayed == 10  # five spans and five rollouts
    assert _rows(f"sqlite:///{path}", "SELECT COUNT(*) FROM rollout")[0][0] == 5
    second.close()


def test_the_yaml_writer_setting_is_checked_and_reaches_the_recorder(tmp_path, monkeypatch):
    import flywheel_middleware as fw
    from flywheel_middleware.config import parse_config
    from flywheel_middleware.errors import ConfigError

    with pytest.raises(ConfigError, match="writer"):
        parse_config("store: {writer: fork}\n", source="f.yaml")
    config = tmp_path / "flywheel.yaml"
    # the file's setting, then the environment's, which overrides the file
    for in_file, in_env in (("thread", None), ("process", "thread")):
        if in_env:
            monkeypatch.setenv("FLYWHEEL_WRITER", in_env)
        config.write_text(f"store: {{url: 'sqlite:///{tmp_path / 'y.db'}', writer: {in_file}}}\n")
        fw.configure(str(config))
        try:
            assert fw.get_recorder().counters.writer == "thread"
        finally:
            fw.shutdown()


def test_a_queued_call_holds_no_object_the_cyclic_gc_tracks():
    """Queued records that keep containers alive make the GC run on the agent's thread; a
    packed call is one bytes object. A value marshal refuses keeps the record as an object."""
    import gc

    call = _call(1)
    assert gc.is_tracked(call) and gc.is_tracked(call.input)
    packed = pack_call(call.values(call))
    assert packed.__class__ is bytes and not gc.is_tracked(packed)

    class Custom:
        pass

    odd = _call(2)
    odd.output = Custom()
    kept = pack_call(odd.values(odd))
    assert isinstance(kept, CallRecord) and kept.output is odd.output


def test_through_tracing_a_call_is_queued_packed_and_stored(tmp_path, monkeypatch):
    import flywheel_middleware as fw

    monkeypatch.setenv("FLYWHEEL_STORE_URL", f"sqlite:///{tmp_path / 'q.db'}")
    fw.configure()
    try:
        rec = fw.get_recorder()
        queued = []
        monkeypatch.setattr(
            rec, "enqueue", lambda item: queued.append(item) or Recorder.enqueue(rec, item)
        )
        rid = fw.record_call(
            workflow="wp",
            name="chat",
            kind="llm",
            start_ns=time.time_ns(),
            input={"q": 1},
            output="a",
        )
        assert [item.__class__ for item in queued] == [bytes]
        assert fw.flush(30)
        got = _rows(f"sqlite:///{tmp_path / 'q.db'}", "SELECT id, input, output FROM rollout")
        assert got == [(rid, '{"q":1}', '"a"')]
    finally:
        fw.shutdown()


def test_a_first_record_after_a_lull_is_written_without_waiting_for_the_poll(tmp_path):
    """The writer process's recorder is woken by the first record into an empty queue, so a
    quiet agent's record lands within the gathering window, not the (long) poll interval."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    rec = Recorder(Store(url), flush_interval=30.0)
    assert rec.counters.writer == "process"
    time.sleep(0.2)  # the writer is asleep on its 30 s poll
    rec.enqueue(_packed(1))
    deadline = time.monotonic() + 10
    while rec.counters.written < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.counters.written == 2  # its span and rollout, long before the 30 s poll
    assert rec.close(timeout=30)


def test_a_listener_of_some_tables_sees_only_those(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    rec = Recorder(Store(url), flush_interval=0.01)
    everything, feedback_only = [], []
    rec.add_listener(lambda by_table: everything.append(sorted(by_table)))
    rec.add_listener(lambda by_table: feedback_only.append(sorted(by_table)), tables=["feedback"])
    rec.enqueue(_packed(1))
    assert rec.flush(30)
    rec.enqueue(FeedbackRecord(rollout_id=f"{1:032x}", value=4))
    assert rec.close(timeout=30)
    assert ["rollout", "span"] in everything and ["feedback"] in everything  # calls split
    assert feedback_only == [["feedback"]]
