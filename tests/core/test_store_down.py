"""A store that is down never holds up the agent: at start-up, or silent for seconds mid-load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text

import flywheel_middleware as fw

from .tcp_proxy import NOT_BLOCKED, TcpProxy, through


def _proxy_for(postgres_url: str) -> TcpProxy:
    parts = urlsplit(postgres_url.replace("postgresql+psycopg", "http"))
    proxy = TcpProxy(parts.hostname, parts.port)
    proxy.start()
    return proxy


def _counts(url: str, workflow: str) -> tuple[int, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rollouts = conn.execute(
            text("SELECT COUNT(*), COUNT(DISTINCT id) FROM rollout WHERE workflow = :w"),
            {"w": workflow},
        ).one()
        spans = conn.execute(
            text("SELECT COUNT(*) FROM span WHERE workflow = :w"), {"w": workflow}
        ).scalar()
    engine.dispose()
    assert rollouts[0] == rollouts[1]  # nothing twice
    return rollouts[0], spans


@pytest.mark.postgres
def test_ten_seconds_of_a_silent_postgres_cost_the_agent_nothing(postgres_url, tmp_path):
    proxy = _proxy_for(postgres_url)
    url = through(proxy, postgres_url, connect_timeout="2", options="-c statement_timeout=1000")
    fw.configure(store_url=url, flush_interval=0.05)
    slowest = 0.0
    done = 0

    def one_rollout(i: int) -> None:
        nonlocal slowest, done
        started = time.perf_counter()
        with fw.rollout("silent", input={"i": i}):
            with fw.span("step", kind="tool"):
                pass
        slowest = max(slowest, time.perf_counter() - started)
        done += 1

    try:
        for i in range(200):
            one_rollout(i)
        assert fw.flush(30)
        proxy.blackhole()
        silent_until = time.monotonic() + 10
        i = 200
        while time.monotonic() < silent_until:
            one_rollout(i)
            i += 1
            time.sleep(0.002)
        proxy.restore()
        assert fw.flush(60)
        retried = fw.get_recorder().counters.retried
    finally:
        fw.shutdown()
        proxy.close()
    assert retried > 0  # the writer did meet the silence
    assert slowest < NOT_BLOCKED, f"an agent call took {slowest * 1000:.0f} ms during the outage"
    assert _counts(postgres_url, "silent") == (done, done)


START_WITH_STORE_DOWN = textwrap.dedent(
    """
    import sys, time
    import flywheel_middleware as fw
    # loaded before the clock starts: the first call is timed for what it waits, not imports
    import flywheel_middleware.loop.versions, flywheel_middleware.runtime, sqlalchemy

    took = []
    for i in range(200):  # no fw.configure: the store comes from FLYWHEEL_STORE_URL
        started = time.perf_counter()
        with fw.rollout("down-at-start", input={"i": i}):
            with fw.span("step", kind="tool"):
                pass
        took.append(time.perf_counter() - started)
    print("first", took[0], "slowest-after", max(took[1:]), flush=True)
    sys.stdin.readline()  # the test brings the store back
    print("flushed", fw.flush(60), flush=True)
    """
)


@pytest.mark.postgres
@pytest.mark.parametrize("outage", ["cut", "blackhole"])
def test_a_store_down_at_start_up_neither_slows_nor_breaks_the_agent(
    postgres_url, tmp_path, outage
):
    proxy = _proxy_for(postgres_url)
    getattr(proxy, outage)()
    script = tmp_path / "agent.py"
    script.write_text(START_WITH_STORE_DOWN)
    env = {
        **os.environ,
        "FLYWHEEL_STORE_URL": through(
            proxy, postgres_url, connect_timeout="1", options="-c statement_timeout=1000"
        ),
    }
    agent = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        line = agent.stdout.readline()
        assert line.startswith("first"), agent.stderr.read()
        _, first, _, after = line.split()
        # the first call reads the config and gives the resolver its one bounded wait
        # (FIRST_LOAD_WAIT); after that no call waits on the network
        assert float(first) < 1.0 + 3.0
        assert float(after) < NOT_BLOCKED
        proxy.restore()
        out, err = agent.communicate("go\n", timeout=120)
        assert agent.returncode == 0, err[-3000:]
        assert "flushed True" in out
    finally:
        if agent.poll() is None:
            agent.kill()
        proxy.close()
    assert _counts(postgres_url, "down-at-start") == (200, 200)


@pytest.mark.postgres
def test_feedback_while_the_store_is_down_is_kept_and_an_unknown_rollout_reported(
    postgres_url, caplog
):
    from flywheel_middleware.capture.ids import new_rollout_id

    proxy = _proxy_for(postgres_url)
    fw.configure(store_url=through(proxy, postgres_url, connect_timeout="1"))
    try:
        proxy.cut()
        stranger = new_rollout_id()
        started = time.perf_counter()
        fw.feedback(stranger, rating=2)  # cannot be looked up: kept, not refused
        assert time.perf_counter() - started < 5
        proxy.restore()
        with caplog.at_level("WARNING", logger="flywheel_middleware"):
            assert fw.flush(60)
    finally:
        fw.shutdown()
        proxy.close()
    assert "feedback about 1 rollouts the store does not have (yet)" in caplog.text
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT value FROM feedback WHERE rollout_id = :r"), {"r": stranger}
        ).scalar()
    engine.dispose()
    assert stored == 2.0
