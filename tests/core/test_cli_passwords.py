"""Store URLs in what commands print never show the password (``errors.safe_url``)."""

from __future__ import annotations

import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main

PASSWORD = "Pw-" + secrets.token_hex(8)


def with_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    "command",
    [["stats"], ["rollouts"], ["bad-cases"], ["db", "upgrade"], ["config", "show", "qa"]],
)
def test_a_failing_command_shows_no_store_password(command) -> None:
    url = f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:1/flywheel"  # nothing listens there
    result = cli(*command, "--store", url)
    assert result.exit_code != 0
    shown = result.output + repr(result.exception)
    assert PASSWORD not in shown


@pytest.mark.postgres
def test_commands_that_print_the_store_url_hide_its_password(postgres_url) -> None:
    url = with_password(postgres_url)  # trust auth: the password is ignored, the URL works
    for command in (["db", "upgrade"], ["stats"]):
        result = cli(*command, "--store", url)
        assert result.exit_code == 0, result.output
        assert PASSWORD not in result.output
        assert f"postgres:***@{urlsplit(url).hostname}" in result.output


@pytest.mark.postgres
@pytest.mark.slow
def test_flywheel_serve_start_up_line_hides_the_password(postgres_url, tmp_path) -> None:
    url = with_password(postgres_url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "FLYWHEEL_API_KEYS": "k-1", "PYTHONUNBUFFERED": "1"}
    env.pop("FLYWHEEL_STORE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flywheel_middleware.cli import main; main()", "serve"]
        + ["--port", str(port), "--store", url, "--log-level", "info"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    said: queue.Queue[str] = queue.Queue()  # a reader thread: select() misses buffered lines
    reader = threading.Thread(target=lambda: [said.put(line) for line in proc.stdout])
    reader.start()
    try:  # read until uvicorn says it serves: the start-up line and the server's logs
        deadline = time.monotonic() + 60
        while not any("Uvicorn running on" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            lines.append(said.get(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=30)
    while not said.empty():
        lines.append(said.get())
    output = "".join(lines)
    assert f"flywheel service on http://127.0.0.1:{port}/" in output
    assert "(store postgresql+psycopg://postgres:***@" in output
    assert PASSWORD not in output
