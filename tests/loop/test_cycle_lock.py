"""Several hosts on one store: `flywheel run` and `flywheel cycle` run one cycle at a time (a
PostgreSQL advisory lock, a lease row on SQLite); the others wait and say whose cycle runs; a
killed holder's lock is released; every process's resolver sees one promotion."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from flywheel_middleware.loop import versions
from flywheel_middleware.store.database import Store

from .helpers import BASE, make_config

CLI = "from flywheel_middleware.cli import main; main()"
CYCLE_LINE = re.compile(r"^cycle (\d+) on (.+ pid (\d+)): (\S+) → (\S+)$")
HOLD = (
    "import sys, time\n"
    "from flywheel_middleware.store.database import Store\n"
    "from flywheel_middleware.store.leader import CycleLock\n"
    "lock = CycleLock(Store(sys.argv[1]))\n"
    "assert lock.try_acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


class Proc:
    """A child process whose output lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if re.search(pattern, line)), None)
            if found is not None:
                return found
            if self.popen.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 120) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(30)

    @property
    def pid(self) -> int:
        return self.popen.pid


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def _cycles(proc: Proc) -> list[tuple[int, datetime, datetime]]:
    out = []
    for line in proc.lines:
        found = CYCLE_LINE.match(line.strip())
        if found:
            assert int(found.group(3)) == proc.pid, line  # each names its own process
            start, end = (datetime.fromisoformat(found.group(i)) for i in (4, 5))
            out.append((proc.pid, start, end))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "seconds"),
    [("sqlite", 5), pytest.param("postgres", 20, marks=pytest.mark.postgres)],
)
def test_two_schedules_on_one_store_never_run_cycles_at_once(backend, seconds, tmp_path, request):
    url = (
        f"sqlite:///{tmp_path / 'flywheel.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    Store(url).dispose()  # the schema exists before both start
    procs = [
        Proc(["-c", CLI, "run", "--every", "1s", "--store", url], tmp_path, _env())
        for _ in range(2)
    ]
    try:
        for proc in procs:
            proc.wait_for(r"^cycle 1 on ")
        time.sleep(seconds)
        for proc in procs:
            proc.popen.send_signal(signal.SIGINT)
        for proc in procs:
            assert proc.finish() == 0, "\n".join(proc.lines)
            proc.wait_for(r"stopped after \d+ cycle")
    finally:
        for proc in procs:
            proc.stop()
    cycles = sorted(_cycles(procs[0]) + _cycles(procs[1]), key=lambda c: c[1])
    assert {pid for pid, _, _ in cycles} == {procs[0].pid, procs[1].pid}  # both took turns
    assert len(cycles) >= 4
    for (_, _, end), (_, start, _) in zip(cycles, cycles[1:], strict=False):
        assert end <= start, cycles  # no two cycles overlap
    for proc, other in (procs, procs[::-1]):
        for line in proc.lines:
            if line.startswith("waiting:"):  # one that waited named the other
                assert f"pid {other.pid}" in line, line


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_cycle_waits_for_the_holder_and_a_killed_holder_frees_it(backend, tmp_path, request):
    url = (
        f"sqlite:///{tmp_path / 'flywheel.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    env = _env(FLYWHEEL_CYCLE_LEASE="2")  # a dead holder's SQLite lease ends after 2 s
    holder = Proc(["-c", HOLD, url], tmp_path, env)
    cycle = None
    try:
        holder.wait_for("^held$")
        cycle = Proc(["-c", CLI, "cycle", "--store", url], tmp_path, env)
        waiting = cycle.wait_for("^waiting:")
        assert f"a cycle is running on {os.uname().nodename} pid {holder.pid}" in waiting
        time.sleep(1)
        assert cycle.popen.poll() is None  # still waiting while the holder lives
        holder.popen.send_signal(signal.SIGKILL)  # no chance to release anything
        assert cycle.finish() == 0, "\n".join(cycle.lines)
        assert any(line.startswith("report:") for line in cycle.lines), cycle.lines
    finally:
        holder.stop()
        if cycle is not None:
            cycle.stop()


@pytest.mark.slow
def test_resolvers_in_two_processes_see_one_promotion(store_url, tmp_path):
    config = make_config()
    config_path = tmp_path / "flywheel.yaml"
    config_path.write_text(yaml.safe_dump({"workflows": {"qa": {"config": BASE}}}), "utf-8")
    store = Store(store_url)
    v1 = versions.ensure_workflow(store, config, "qa")
    v2 = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 5}})
    watch = (
        "import sys, time\n"
        "import flywheel_middleware as fw\n"
        "fw.configure(config=sys.argv[1], store_url=sys.argv[2])\n"
        "print('serving', fw.resolve('qa', 'user-1').version_id, flush=True)\n"
        "while fw.resolve('qa', 'user-1').version_id != int(sys.argv[3]):\n"
        "    time.sleep(0.02)\n"
        "print('promoted seen at', time.time(), flush=True)\n"
    )
    ttl = 1.0
    env = _env(FLYWHEEL_RESOLVER_TTL=str(ttl))
    procs = [
        Proc(["-c", watch, config_path.read_text(), store_url, str(v2.id)], tmp_path, env)
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.wait_for("^serving").split()[1] == str(v1.id)
        promoted_at = time.time()
        versions.activate(store, "qa", v2.id, actor="test", reason="promotion")
        for proc in procs:
            assert proc.finish(60) == 0, "\n".join(proc.lines)
            seen = float(proc.wait_for("^promoted seen at").split()[-1])
            # the cache's TTL, plus a loaded machine's scheduling
            assert seen - promoted_at < ttl + 10
    finally:
        for proc in procs:
            proc.stop()
        store.dispose()


@pytest.mark.postgres
def test_a_holder_whose_session_is_cut_knows_it_lost_the_lock(postgres_url, monkeypatch, caplog):
    from sqlalchemy import text

    from flywheel_middleware.store import leader

    monkeypatch.setattr(leader, "PG_CHECK", 0.1)
    store = Store(postgres_url)
    name = f"cut-{os.getpid()}-{time.monotonic_ns()}"
    lock, other = leader.CycleLock(store, name=name), leader.CycleLock(store)
    assert lock.try_acquire() and not other.try_acquire()
    assert other.holder() == name
    with store.engine.begin() as conn:  # a failover, or an administrator's kill
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :app"
            ),
            {"app": f"flywheel cycle {name}"},
        )
    deadline = time.monotonic() + 30
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.lost and "lost the cycle lock" in caplog.text
    assert other.try_acquire()  # the server released it with the session
    lock.release()
    other.release()
    assert other.holder() is None
    store.dispose()
