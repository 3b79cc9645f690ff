"""What ``flywheel serve`` acknowledges is kept: a 2xx comes only once the request's records are
in the journal (or the store), so a service killed with SIGKILL right after answering, while
its database refuses writes, loses none of them; the next service on the same journal folder
stores them."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .serve_process import spawn_serve, wait_up

KEY = "ack-key"
REQUESTS = 12
SPANS_PER_REQUEST = 16


def start_serve(tmp_path: Path, db: Path) -> tuple[subprocess.Popen, str]:
    """``flywheel serve`` on ``db`` with a journal pass every 5 s: only the acknowledgement
    itself journals a request soon."""
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"store: {{url: 'sqlite:///{db}', journal_interval: 5}}\n")
    proc, base = spawn_serve(
        config, {"FLYWHEEL_API_KEYS": KEY, "FLYWHEEL_SPILL_DIR": str(tmp_path / "spill")}
    )
    wait_up(proc, base)
    return proc, base


def otlp_request(n: int) -> bytes:
    """One request of ``SPANS_PER_REQUEST`` spans of trace ``n``, the root last."""
    payload = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "acked"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": f"{n + 1:032x}",
                                "spanId": f"{n * 100 + i + 1:016x}",
                                "parentSpanId": "" if i == 0 else f"{n * 100 + 1:016x}",
                                "name": "invoke_agent" if i == 0 else f"chat {i}",
                                "startTimeUnixNano": str(time.time_ns() + i),
                                "endTimeUnixNano": str(time.time_ns() + 1000 + i),
                            }
                            for i in reversed(range(SPANS_PER_REQUEST))
                        ]
                    }
                ],
            }
        ]
    }
    return json.dumps(payload).encode()


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill_while_the_database_refuses(tmp_path) -> None:
    db = tmp_path / "flywheel.db"
    proc, base = start_serve(tmp_path, db)
    headers = {"X-API-Key": KEY}
    blocker = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # the store refuses every write from now on
        for n in range(REQUESTS):
            r = httpx.post(
                f"{base}/v1/traces",
                content=otlp_request(n),
                headers={**headers, "Content-Type": "application/json"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        r = httpx.post(
            f"{base}/v1/feedback",
            json={"rollout_id": f"{1:032x}", "rating": 1, "comment": "kept"},
            headers=headers,
        )
        assert r.status_code == 202, r.text
        r = httpx.post(
            f"{base}/v1/telemetry",
            json={"session_id": "s-1", "event_type": "copy", "payload": {"n": 1}},
            headers=headers,
        )
        assert r.status_code == 202, r.text
        os.killpg(proc.pid, signal.SIGKILL)  # at once, as the OOM killer would
        proc.wait(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    proc, base = start_serve(tmp_path, db)  # replays the dead service's journal
    try:
        deadline = time.monotonic() + 60
        con = sqlite3.connect(db)
        while True:
            spans = con.execute("SELECT count(DISTINCT id) FROM span").fetchone()[0]
            comments = con.execute("SELECT comment FROM feedback").fetchall()
            events = con.execute("SELECT count(*) FROM telemetry_event").fetchone()[0]
            if spans == REQUESTS * SPANS_PER_REQUEST and comments and events:
                break
            assert time.monotonic() < deadline, (spans, comments, events)
            time.sleep(0.2)
        con.close()
        assert comments == [("kept",)] and events == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
