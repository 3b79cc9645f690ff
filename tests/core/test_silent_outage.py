"""A silent database outage becomes an error within bounded time, never a hang.

The proxy's black hole accepts connections and passes no byte: the server looks alive to TCP
and never answers, as behind a pooler or sidecar whose server died. Only the client's own
deadlines (connect timeout, ``Store.wait_limit``) end such a wait; keepalives and
``tcp_user_timeout`` cover a dead host, which a test cannot simulate without root.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from flywheel_middleware.config import config_from_dict
from flywheel_middleware.errors import StoreError
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.versions import StoreResolver
from flywheel_middleware.store.database import Store

from .tcp_proxy import NOT_BLOCKED, TcpProxy, through

BASE = {"llm": {"model": "m", "temperature": 0.9}}


def _call_within(seconds: float, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(elapsed, result or raised exception) of ``fn``; fails the test if it hangs."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s: a hang"
    return time.monotonic() - started, out[0]


# -- the proxy itself ------------------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """A loopback echo server: the proxy's upstream where no database is needed."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(100)


def test_cut_refuses_new_connections_at_once_and_resets_open_ones(echo):
    with TcpProxy(*echo) as proxy:
        open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert _roundtrip(open_conn, b"hello") == b"hello"
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert time.monotonic() - started < 1
        with pytest.raises(OSError):  # reset, or closed under it
            if not _roundtrip(open_conn, b"x"):
                raise ConnectionResetError("closed")
        proxy.restore()  # the same port accepts again
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert _roundtrip(again, b"back") == b"back"
        again.close()
        open_conn.close()


def test_a_black_hole_accepts_connections_but_passes_no_byte_until_restored(echo):
    with TcpProxy(*echo) as proxy:
        open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert _roundtrip(open_conn, b"before") == b"before"
        proxy.blackhole()
        new_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # accepted
        for conn in (open_conn, new_conn):
            conn.settimeout(0.5)
            conn.sendall(b"held")  # the write succeeds into buffers
            with pytest.raises(TimeoutError):  # the read never returns
                conn.recv(100)
        proxy.restore()
        for conn in (open_conn, new_conn):
            conn.settimeout(5)
            assert conn.recv(100) == b"held"  # held bytes flow on
            conn.close()


# -- the store -------------------------------------------------------------------------------


def _short(url: str, proxy: TcpProxy, **more: str) -> str:
    """Short timeouts through the URL, as a user would set them: a wait gives up after
    statement_timeout + WAIT_GRACE = 5.5 s, a connection attempt after 2 s."""
    return through(proxy, url, connect_timeout="2", options="-c statement_timeout=500", **more)


@pytest.fixture
def pg_proxy(postgres_url) -> Iterator[TcpProxy]:
    parts = urlsplit(postgres_url.replace("postgresql+psycopg", "http"))
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy


@pytest.mark.postgres
def test_connections_get_timeouts_and_the_urls_own_values_win(postgres_url, pg_proxy):
    store = Store(postgres_url)
    try:
        params = store.engine.raw_connection().driver_connection.info.get_parameters()
        assert {
            k: params.get(k) for k in ("connect_timeout", "keepalives", "tcp_user_timeout")
        } == {
            "connect_timeout": "5",
            "keepalives": "1",
            "tcp_user_timeout": "10000",
        }
        assert (params["keepalives_idle"], params["keepalives_interval"]) == ("5", "2")
        assert store.execute("SHOW statement_timeout") == [("30s",)]
        assert store.execute("SHOW search_path")[0][0].startswith("fwtest_")  # kept
        assert store.wait_limit == 35
    finally:
        store.dispose()
    store = Store(_short(postgres_url, pg_proxy, keepalives_idle="7"), migrate=False)
    try:
        params = store.engine.raw_connection().driver_connection.info.get_parameters()
        assert (params["connect_timeout"], params["keepalives_idle"]) == ("2", "7")
        assert store.execute("SHOW statement_timeout") == [("500ms",)]
        assert store.wait_limit == 5.5
    finally:
        store.dispose()


@pytest.mark.postgres
def test_a_query_into_a_black_hole_fails_instead_of_hanging(postgres_url, pg_proxy):
    store = Store(_short(postgres_url, pg_proxy))
    try:
        assert store.execute("SELECT 1") == [(1,)]  # a pooled connection, open through the proxy
        pg_proxy.blackhole()
        # the pooled connection's ping waits 5.5 s, the reconnect 2 s
        elapsed, outcome = _call_within(25, lambda: store.execute("SELECT 1"))
        assert isinstance(outcome, StoreError | OperationalError), outcome
        assert elapsed < 12
        elapsed, outcome = _call_within(25, lambda: _session_query(store))
        assert isinstance(outcome, OperationalError), outcome
        assert elapsed < 5
        pg_proxy.restore()
        assert store.execute("SELECT 2") == [(2,)]
    finally:
        store.dispose()


@pytest.mark.postgres
def test_a_statement_on_an_open_connection_fails_when_the_server_goes_silent(
    postgres_url, pg_proxy
):
    store = Store(_short(postgres_url, pg_proxy))
    try:
        conn = store.raw_connection()  # as the recorder writes: no ping before the statement
        cur = conn.cursor()
        cur.execute("SELECT 1")
        pg_proxy.blackhole()
        elapsed, outcome = _call_within(25, lambda: cur.execute("SELECT 1"))
        assert type(outcome).__name__ == "OperationalError", outcome
        assert "no answer from the server within 5.5 s" in str(outcome)
        assert 5 < elapsed < 8
        conn.invalidate()
    finally:
        pg_proxy.restore()
        store.dispose()


def _session_query(store: Store) -> Any:
    with store.session() as session:
        return session.execute(text("SELECT 1")).scalar()


def test_no_store_error_or_repr_shows_the_password():
    secret = "hunter2-secret"
    with pytest.raises(StoreError) as info:
        Store(f"mysql://user:{secret}@db.example/x")
    assert secret not in str(info.value) and "***" in str(info.value)
    store = Store(f"postgresql+psycopg://user:{secret}@127.0.0.1:1/x", migrate=False)
    assert secret not in repr(store) and "***" in repr(store)
    with pytest.raises(StoreError) as info:
        store.upgrade()  # nothing listens on port 1: cannot open
    assert secret not in str(info.value)
    store.dispose()


# -- the resolver ----------------------------------------------------------------------------


@pytest.mark.postgres
def test_the_resolver_serves_its_last_config_through_a_silent_outage_and_then_catches_up(
    postgres_url, pg_proxy, caplog
):
    config = config_from_dict({"workflows": {"qa": {"config": BASE}, "new": {"config": BASE}}})
    direct = Store(postgres_url)  # another process: the one that promotes
    proxied = Store(_short(postgres_url.replace("postgres@", "postgres:pw@"), pg_proxy))
    ttl = 0.5
    resolver = StoreResolver(proxied, config, ttl=ttl)
    try:
        first = resolver.resolve("qa", "u1")
        assert first.version_id is not None and resolver.stale_since is None
        candidate = versions.create_version(direct, "qa", {**BASE, "v": 2}, created_by="t")

        pg_proxy.blackhole()
        caplog.set_level(logging.INFO, logger="flywheel_middleware.loop.versions")
        started, slowest = time.monotonic(), 0.0
        while resolver.stale_since is None:  # the refresh fails within its wait limits
            assert time.monotonic() - started < 15, "the refresh never failed: it hangs"
            t = time.perf_counter()
            assert resolver.resolve("qa", "u1").version_id == first.version_id
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.01)
        assert slowest < NOT_BLOCKED  # never waited for the store
        assert resolver.last_refresh_error and "'qa'" in resolver.last_refresh_error
        assert resolver.stale_since <= time.time()
        # a workflow first asked for during the outage gets its YAML config at once
        t = time.perf_counter()
        assert resolver.resolve("new", "u1").config == BASE
        assert time.perf_counter() - t < NOT_BLOCKED

        versions.activate(direct, "qa", candidate.id, kind="promote")  # during the outage
        time.sleep(2 * ttl)  # more failed refreshes: still one warning
        assert resolver.resolve("qa", "u1").version_id == first.version_id
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "serving the last known configs" in warnings[0].message
        assert "pw" not in warnings[0].getMessage().replace("postgres:***", "")

        pg_proxy.restore()
        restored = time.monotonic()
        # a refresh under way ends within the 2 s connect timeout, the next starts within ttl
        while resolver.resolve("qa", "u1").version_id != candidate.id:
            assert time.monotonic() - restored < ttl + 2 + 1, "the promotion never arrived"
            time.sleep(0.01)
        # the workflow first asked for during the outage is retried too, then all is fresh
        while resolver.stale_since is not None:
            assert time.monotonic() - restored < 10, resolver.last_refresh_error
            time.sleep(0.01)
        assert resolver.last_refresh_error is None
    finally:
        pg_proxy.restore()
        proxied.dispose()
        direct.dispose()
