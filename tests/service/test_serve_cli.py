"""``flywheel serve`` as a real process: it serves, takes writes with a key, and loses nothing on shutdown."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import free_port


@pytest.mark.slow
def test_flywheel_serve_process(tmp_path):
    db = tmp_path / "serve.db"
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_API_KEYS": "k-1,k-2",
        "FLYWHEEL_SPILL_DIR": str(tmp_path / "spill"),
    }
    env.pop("FLYWHEEL_STORE_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from flywheel_middleware.cli import main; main()",
            "serve",
            "--port",
            str(port),
            "--store",
            f"sqlite:///{db}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "flywheel serve did not come up"
            time.sleep(0.1)
        assert "<title>flywheel dashboard</title>" in httpx.get(base + "/").text
        js = httpx.get(base + "/flywheel.js")
        assert (
            js.status_code == 200
            and "sendBeacon" in js.text
            and js.headers["content-type"].startswith("text/javascript")
        )
        assert httpx.get(base + "/openapi.json").json()["info"]["title"] == "flywheel-middleware"
        body = (
            '{"session_id": "s", "events": ['
            + ",".join(['{"event_type": "scroll", "payload": {"depth": 0.5}}'] * 300)
            + "]}"
        )
        assert (
            httpx.post(
                base + "/v1/telemetry?key=k-2", content=body, headers={"Content-Type": "text/plain"}
            ).status_code
            == 202
        )
        assert httpx.post(base + "/v1/telemetry", content=body).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down; the recorder flushes at exit
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"flywheel service on http://127.0.0.1:" in out
    con = sqlite3.connect(db)
    assert (
        con.execute("SELECT count(*) FROM telemetry_event WHERE session_id = 's'").fetchone()[0]
        == 300
    )
    con.close()
