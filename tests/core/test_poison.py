"""One bad record costs at most itself: its batch is written, and the counters tell the truth."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from flywheel_middleware.adapters.openai import wrap_openai
from sqlalchemy import create_engine, text

import flywheel_middleware as fw
from flywheel_middleware.capture.ids import new_rollout_id
from flywheel_middleware.capture.records import FeedbackRecord, TelemetryRecord
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.store.database import Store
from flywheel_middleware.testing.openai_server import OpenAIServer


def _gateway_reply(text_: str) -> dict:
    """What a real-looking OpenAI-compatible gateway sends: usage it could not count."""
    return {
        "id": "chatcmpl-gw",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "gw-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text_},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": "n/a", "completion_tokens": 7, "total_tokens": "n/a"},
    }


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_poisoned_batch_loses_nothing_but_the_poison(store_url, tmp_path, writer):
    if writer == "process" and not store_url.startswith("sqlite"):
        pytest.skip("the writer process serves SQLite files")
    fw.configure(store_url=store_url, writer=writer, flush_interval=5.0)
    try:
        with OpenAIServer() as server:
            server.enqueue(_gateway_reply("from the gateway"))
            client = wrap_openai(server.client(), workflow="poison")
            for i in range(50):
                with fw.rollout("poison", input=f"q{i}"):
                    with fw.span("step", kind="tool") as step:
                        step.set_output({"i": i})
            answer = client.chat.completions.create(
                model="gw-model", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content == "from the gateway"  # the host is untouched
            with fw.rollout("poison", input="locked"):
                with fw.span("holds a lock", kind="tool") as held:
                    held.set_output({"lock": threading.Lock()})
            for i in range(50):
                with fw.rollout("poison", input=f"r{i}"):
                    pass
            assert fw.flush(60)
        counters = fw.get_recorder().counters
        assert counters.dead_lettered == 0 and counters.lost == 0
        assert counters.coerced >= 1  # "n/a" became NULL, with a note
    finally:
        fw.shutdown()
    engine = create_engine(store_url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM rollout WHERE workflow = 'poison'")).scalar()
        llm = conn.execute(
            text("SELECT input_tokens, output_tokens FROM span WHERE model = 'gw-model'")
        ).all()
        locked = conn.execute(text("SELECT output FROM span WHERE name = 'holds a lock'")).scalar()
    engine.dispose()
    assert n == 102
    assert llm == [(None, 7)]
    assert "lock" in str(locked)


class CommitEater:
    """A TCP proxy to PostgreSQL that, once armed, forwards the next COMMIT and then cuts the
    connection before the server's reply reaches the client: the commit happened, the client
    cannot know."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.eaten = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            muted = threading.Event()  # set: the server's replies are dropped
            for src, dst, to_server in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, to_server, muted), daemon=True
                ).start()

    def _pipe(
        self, src: socket.socket, dst: socket.socket, to_server: bool, muted: threading.Event
    ) -> None:
        try:
            while data := src.recv(65536):
                eat = to_server and self.armed.is_set() and b"COMMIT\x00" in data
                if eat:
                    self.armed.clear()
                    muted.set()
                if not to_server and muted.is_set():
                    continue
                dst.sendall(data)
                if eat:
                    time.sleep(0.3)  # the server commits; its reply is never relayed
                    for sock in (src, dst):
                        sock.shutdown(socket.SHUT_RDWR)
                    self.eaten.set()
                    return
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.postgres
def test_a_lost_commit_reply_duplicates_nothing(postgres_url, tmp_path):
    parts = urlsplit(postgres_url.replace("postgresql+psycopg", "http"))
    proxy = CommitEater(parts.hostname, parts.port)
    proxied = postgres_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    try:
        store = Store(proxied)
        recorder = Recorder(store, spill_dir=tmp_path / "j", flush_interval=0.01)
        rollout_id = new_rollout_id()
        proxy.armed.set()
        now = time.time_ns()
        for i in range(9):
            recorder.enqueue(
                FeedbackRecord(rollout_id=rollout_id, key="k", value=i, created_at=now)
            )
            recorder.enqueue(
                TelemetryRecord(rollout_id=rollout_id, event_type="e", received_at=now)
            )
        assert recorder.flush(60)
        assert proxy.eaten.is_set() and recorder.counters.retried >= 1
        assert recorder.close(timeout=30)
    finally:
        proxy.close()
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        feedback = conn.execute(
            text("SELECT COUNT(*) FROM feedback WHERE rollout_id = :r"), {"r": rollout_id}
        ).scalar()
        events = conn.execute(
            text("SELECT COUNT(*) FROM telemetry_event WHERE rollout_id = :r"), {"r": rollout_id}
        ).scalar()
    engine.dispose()
    assert (feedback, events) == (9, 9)


def test_values_too_deep_or_not_unicode_are_stored_not_set_aside(tmp_path):
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    recorder = Recorder(Store(url), spill_dir=tmp_path / "j")
    now = time.time_ns()
    odd = {"deep": deep, "surrogate": "half a pair: \ud800!"}
    for i, value in enumerate(odd.values()):
        rollout_id = f"{i + 1:032x}"
        recorder.enqueue(FeedbackRecord(rollout_id=rollout_id, key="k", metadata=value))
        recorder.enqueue(TelemetryRecord(event_type="odd", payload=value, received_at=now))
    assert recorder.close(timeout=30)
    assert recorder.counters.dead_lettered == 0
    engine = create_engine(url)
    with engine.connect() as conn:
        feedback = conn.execute(text("SELECT metadata FROM feedback ORDER BY rollout_id")).all()
        events = conn.execute(text("SELECT COUNT(*) FROM telemetry_event")).scalar()
    engine.dispose()
    assert events == 2 and len(feedback) == 2
    assert "nested too deep" in feedback[0][0]
    assert "half a pair: \ufffd!" in feedback[1][0]
