"""Nothing acknowledged is lost: real signals, a crash, a process that leaves a journal.

A producer process records rollouts one by one and prints each one's number (with the time)
after ``fw.rollout`` returned: what it printed is what it was acknowledged. After the
producer ends (SIGTERM, os._exit, SIGKILL), a fresh process's bare ``fw.flush()`` replays
what it left, and the store must hold every acknowledged rollout exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from flywheel_middleware.recording.journal import journal_dir

PRODUCER = textwrap.dedent(
    """
    import os, sys, time
    import flywheel_middleware as fw

    fw.configure(store_url=sys.argv[1])
    end = sys.argv[2]
    i = 0
    while True:
        with fw.rollout("durable", input={"n": i, "pad": "x" * 200}):
            with fw.span("step", kind="tool"):
                pass
        print(i, time.time(), flush=True)
        i += 1
        if end == "exit" and i == 5000:
            time.sleep(0.3)  # longer than the journal's interval, then no goodbye at all
            os._exit(0)
    """
)

REPLAY = textwrap.dedent(
    """
    import sys
    import flywheel_middleware as fw

    fw.configure(store_url=sys.argv[1])
    assert fw.flush(120), "the replay did not finish"
    print("replayed", fw.get_recorder().counters.replayed)
    """
)


def _spawn(tmp_path: Path, source: str, *args: str) -> subprocess.Popen[str]:
    """``source`` run as a script of its own in ``tmp_path``, its output piped as text."""
    script = tmp_path / f"script_{abs(hash(source))}.py"
    script.write_text(source)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def _start(tmp_path: Path, url: str, end: str) -> subprocess.Popen[str]:
    return _spawn(tmp_path, PRODUCER, url, end)


def _load_then(
    proc: subprocess.Popen[str], n: int, stop: Callable[[], None]
) -> list[tuple[int, float]]:
    """Let the producer acknowledge ``n`` rollouts, ``stop`` it, and return every
    ``(number, time)`` it printed."""
    assert proc.stdout is not None
    lines = [proc.stdout.readline()]
    busy_until = time.monotonic() + 1.0  # under load for a while, not only for a burst
    while len(lines) < n or time.monotonic() < busy_until:
        line = proc.stdout.readline()
        assert line, f"the producer ended early: {proc.stderr.read() if proc.stderr else ''}"
        lines.append(line)
    stop()
    rest = proc.stdout.read()  # what the reader's buffer and the pipe still hold
    proc.wait(timeout=120)
    acked = []
    for line in [*lines, *rest.splitlines(keepends=True)]:
        parts = line.split()
        if len(parts) == 2 and line.endswith("\n"):  # a line cut by the kill is no ack
            acked.append((int(parts[0]), float(parts[1])))
    return acked


class _Kill:
    """SIGKILL the producer, noting when."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.at = proc, 0.0

    def __call__(self) -> None:
        self.at = time.time()
        self.proc.kill()


def _replay(tmp_path: Path, url: str) -> int:
    script = tmp_path / "replay.py"
    script.write_text(REPLAY)
    done = subprocess.run(
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def _stored(url: str, unfinished: int = 1) -> list[int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT input FROM rollout WHERE workflow = 'durable'")).all()
        spans = conn.execute(text("SELECT COUNT(*) FROM span WHERE name = 'step'")).scalar()
    engine.dispose()
    numbers = [json.loads(r[0])["n"] if isinstance(r[0], str) else r[0]["n"] for r in rows]
    # each rollout with its one span, nothing twice (the end may interrupt a rollout on each
    # thread: never acknowledged, its span or its failed rollout alone is stored)
    assert abs(spans - len(numbers)) <= unfinished
    return numbers


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_load_loses_nothing_acknowledged(store_url, tmp_path, how):
    proc = _start(tmp_path, store_url, "signal")
    acked = _load_then(proc, 3000, lambda: proc.send_signal(getattr(signal, how)))
    if how == "SIGTERM":
        assert proc.returncode == -signal.SIGTERM  # still ends the way its sender expects
    _replay(tmp_path, store_url)
    stored = _stored(store_url)
    assert len(stored) == len(set(stored))
    missing = {n for n, _ in acked} - set(stored)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged rollouts lost"


def test_os_exit_mid_load_loses_nothing_acknowledged_before_the_journal_interval(
    store_url, tmp_path
):
    proc = _start(tmp_path, store_url, "exit")
    out, err = proc.communicate(timeout=120)
    acked = [line.split() for line in out.splitlines()]
    assert proc.returncode == 0 and len(acked) == 5000
    replayed = _replay(tmp_path, store_url)
    stored = _stored(store_url)
    assert sorted(stored) == list(range(5000))
    assert replayed > 0  # the exit left them in the journal, not in the store


def test_sigkill_loses_at_most_the_last_fraction_of_a_second(store_url, tmp_path):
    """No record in the new process: its bare flush finds and replays what the killed one left."""
    proc = _start(tmp_path, store_url, "kill")
    kill = _Kill(proc)
    acked = _load_then(proc, 3000, kill)
    journal = journal_dir(store_url, None, os.environ["FLYWHEEL_SPILL_DIR"])
    assert any(p.suffix == ".journal" for p in journal.iterdir())
    _replay(tmp_path, store_url)
    assert not any(p.suffix == ".journal" for p in journal.iterdir())  # replayed, then deleted
    stored = set(_stored(store_url))
    old_enough = {n for n, t in acked if t < kill.at - 0.2}
    assert len(old_enough) > 1000
    missing = old_enough - stored
    assert not missing, f"{len(missing)} rollouts acknowledged 0.2 s before the kill were lost"


def test_serve_keeps_every_accepted_event_through_sigterm(tmp_path):
    import urllib.request

    url = f"sqlite:///{tmp_path / 'serve.db'}"
    port = _free_port()
    env = {**os.environ, "FLYWHEEL_API_KEYS": "k-1"}
    main = "from flywheel_middleware.cli import main; main()"
    serve = subprocess.Popen(
        [sys.executable, "-c", main, "serve", "--port", str(port), "--store", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/v1/health", serve)
        accepted = 0
        for batch in range(40):
            events = [
                {"event_type": "dwell", "session_id": f"s{batch}", "payload": {"i": i}}
                for i in range(50)
            ]
            body = json.dumps({"events": events}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/telemetry",
                data=body,
                headers={"Content-Type": "application/json", "X-API-Key": "k-1"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 202
                accepted += len(events)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
    _replay(tmp_path, url)
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT COUNT(*) FROM telemetry_event")).scalar()
    engine.dispose()
    assert stored == accepted == 2000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(address: str, proc: subprocess.Popen[str]) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with urllib.request.urlopen(address, timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.2)


def test_db_replay_writes_what_a_killed_process_left(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    proc = _start(tmp_path, url, "kill")
    kill = _Kill(proc)
    acked = _load_then(proc, 2000, kill)
    main = "from flywheel_middleware.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", main, "db", "replay", "--store", url],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join(done.stdout.split())  # as one line, however the console wrapped it
    assert re.search(r": [1-9]\d* rows replayed from ", said), done.stdout + done.stderr
    assert {n for n, t in acked if t < kill.at - 0.2} <= set(_stored(url))


THREADS_THEN_SIGTERM = textwrap.dedent(
    """
    import sys, threading, time
    import flywheel_middleware as fw

    fw.configure(store_url=sys.argv[1])

    def agent(t):  # threads that go on recording while the signal closes the recorder
        i = 0
        while True:
            with fw.rollout("durable", input={"n": t * 1_000_000 + i}):
                with fw.span("step", kind="tool"):
                    pass
            sys.stdout.write(f"{t * 1_000_000 + i} {time.time()}\\n")  # one write: no interleaving
            sys.stdout.flush()
            i += 1
            time.sleep(0.001)  # a steady pace: the close drains what they record, not a flood

    for t in range(4):
        threading.Thread(target=agent, args=(t,), daemon=True).start()
    time.sleep(60)
    """
)


def test_threads_recording_while_sigterm_closes_the_recorder_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    proc = _spawn(tmp_path, THREADS_THEN_SIGTERM, url)
    acked = _load_then(proc, 3000, lambda: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == -signal.SIGTERM
    _replay(tmp_path, url)
    missing = {n for n, _ in acked} - set(_stored(url, unfinished=4))
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged rollouts lost"


CHAINED_HANDLER = textwrap.dedent(
    """
    import signal, sys, time
    import flywheel_middleware as fw

    fw.configure(store_url=sys.argv[1])
    ours = signal.getsignal(signal.SIGTERM)
    calls = 0

    def app_handler(signum, frame):  # an application's handler that chains to the last one
        global calls
        calls += 1
        print("app handler", calls, flush=True)
        ours(signum, frame)

    signal.signal(signal.SIGTERM, app_handler)
    for i in range(100):  # the first record starts the recorder on the main thread
        with fw.rollout("durable", input={"n": i}):
            with fw.span("step", kind="tool"):
                pass
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_handler_installed_after_ours_keeps_its_place_and_runs_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'chain.db'}"
    proc = _spawn(tmp_path, CHAINED_HANDLER, url)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert out.splitlines() == ["app handler 1"]
    assert sorted(_stored(url)) == list(range(100))


POOL = textwrap.dedent(
    """
    import multiprocessing, sys
    import flywheel_middleware as fw

    def task(k):
        for i in range(200):
            with fw.rollout("durable", input={"n": k * 1000 + i}):
                with fw.span("step", kind="tool"):
                    pass

    if __name__ == "__main__":
        fw.configure(store_url=sys.argv[1])
        with fw.rollout("durable", input={"n": -1}):
            with fw.span("step", kind="tool"):
                pass
        pool = multiprocessing.get_context("fork").Pool(4)
        pool.map(task, range(8))
        pool.close()  # each worker leaves on the pool's sentinel with os._exit, past atexit
        pool.join()
        print("flushed", fw.flush(60))
    """
)


def test_pool_workers_that_end_with_os_exit_keep_their_records(tmp_path):
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    pool = _spawn(tmp_path, POOL, url)
    out, err = pool.communicate(timeout=120)
    assert pool.returncode == 0 and "flushed True" in out, err[-3000:]
    stored = sorted(_stored(url))
    assert stored == [-1] + [k * 1000 + i for k in range(8) for i in range(200)]
