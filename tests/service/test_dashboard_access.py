"""The dashboard's JSON and the resolver need a read (or write) key once any key is configured;
dashboard views are computed one at a time, shared and cached, so they cannot starve the
resolver."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, insert

from flywheel_middleware.config import parse_config
from flywheel_middleware.service.app import create_app
from flywheel_middleware.service.views import ViewCache, ViewsBusy
from flywheel_middleware.store.models import Feedback, Rollout

from .conftest import API_KEY, LiveServer
from .test_dashboard import seed_store

READ_KEY = "read-only-key-456"
AS_WRITER = {"X-API-Key": API_KEY}
AS_READER = {"X-API-Key": READ_KEY}
WORKFLOWS = {"workflows": {"qa": {"config": {"llm": {"temperature": 0.2}}}}}


@pytest.fixture
def keyed(fw):
    """The runtime with a ``qa`` workflow, and a service with one write and one read key."""
    fw.configure(store_url=fw.get_store().url, config=WORKFLOWS)
    with TestClient(create_app(api_keys=[API_KEY], read_keys=[READ_KEY])) as client:
        yield client


@pytest.mark.parametrize(
    "path", ["/v1/dashboard/workflows", "/v1/dashboard/workflows/qa", "/v1/config/qa"]
)
def test_reads_need_a_read_or_write_key(keyed, path):
    assert keyed.get(path).status_code == 401
    assert keyed.get(path, headers={"X-API-Key": "wrong"}).status_code == 401
    assert "read or write key" in keyed.get(path).json()["error"]
    assert keyed.get(path, headers=AS_READER).status_code == 200
    assert keyed.get(path, headers={"Authorization": f"Bearer {READ_KEY}"}).status_code == 200
    assert keyed.get(path, params={"key": READ_KEY}).status_code == 200
    assert keyed.get(path, headers=AS_WRITER).status_code == 200


def test_a_read_key_cannot_write(fw, keyed):
    with fw.rollout("qa") as r:
        pass
    for path, body in [
        ("/v1/feedback", {"rollout_id": r.id, "rating": 5}),
        ("/v1/telemetry", {"event_type": "copy", "rollout_id": r.id}),
    ]:
        refused = keyed.post(path, json=body, headers=AS_READER)
        assert refused.status_code == 403 and "may only read" in refused.json()["error"]
        assert keyed.post(path, json=body, headers=AS_WRITER).status_code == 202
    fw.flush()
    assert fw.get_store().execute("SELECT count(*) FROM feedback")[0][0] == 1


def test_keys_from_the_config_and_the_environment(fw, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_READ_KEYS", " env-reader , ")
    monkeypatch.delenv("FLYWHEEL_API_KEYS", raising=False)
    config = parse_config("service: {read_keys: [yaml-reader]}\n")
    client = TestClient(create_app(config))
    for key in ("env-reader", "yaml-reader"):
        ok = client.get("/v1/dashboard/workflows", headers={"X-API-Key": key})
        assert ok.status_code == 200
    assert client.get("/v1/dashboard/workflows").status_code == 401
    # read keys only: nobody may write
    no_writes = client.post(
        "/v1/feedback", json={"rollout_id": "r", "rating": 5}, headers={"X-API-Key": "env-reader"}
    )
    assert no_writes.status_code == 401


def test_with_no_key_at_all_reading_stays_open(fw, monkeypatch):
    monkeypatch.delenv("FLYWHEEL_API_KEYS", raising=False)
    monkeypatch.delenv("FLYWHEEL_READ_KEYS", raising=False)
    seed_store(fw.get_store())
    client = TestClient(create_app(parse_config("")))
    assert client.get("/v1/dashboard/workflows").json()[0]["rollouts"] == 360
    assert client.get("/v1/dashboard/workflows/support").status_code == 200
    assert client.post("/v1/telemetry", json={"event_type": "x"}).status_code == 401


def test_openapi_describes_the_keys(keyed):
    spec = keyed.get("/openapi.json").json()
    for path in ("/v1/dashboard/workflows", "/v1/dashboard/workflows/{workflow}"):
        assert {"ApiKeyHeader": []} in spec["paths"][path]["get"]["security"]
    assert "404" not in spec["paths"]["/v1/feedback"]["post"]["responses"]


def test_a_view_is_cached_and_shared(fw, keyed):
    seed_store(fw.get_store())
    first = keyed.get("/v1/dashboard/workflows/support", headers=AS_READER).json()
    again = keyed.get("/v1/dashboard/workflows/support", headers=AS_WRITER).json()
    assert again["generated_at"] == first["generated_at"]  # served from the cache
    other = keyed.get("/v1/dashboard/workflows/support", params={"buckets": 6}, headers=AS_READER)
    assert other.json()["generated_at"] > first["generated_at"]  # its own view
    assert len(other.json()["series"]["volume"]) <= 6 < len(first["series"]["volume"])


def test_view_cache_computes_once_serves_stale_while_refreshing_and_bounds_its_queue():
    calls: list[str] = []
    gate = threading.Event()

    def slow(tag: str):
        def compute():
            gate.wait(10)
            calls.append(tag)
            return f"{tag}-{len(calls)}"

        return compute

    async def scenario():
        cache = ViewCache(ttl=0.2, max_pending=2)
        burst = [asyncio.create_task(cache.get("k", slow("k"))) for _ in range(8)]
        await asyncio.sleep(0.05)
        other = asyncio.create_task(cache.get("j", slow("j")))
        await asyncio.sleep(0.05)
        with pytest.raises(ViewsBusy):  # "k" and "j" are waiting: a third key must wait
            await cache.get("x", slow("x"))
        gate.set()
        assert set(await asyncio.gather(*burst)) == {"k-1"}  # one computation for eight
        assert await other == "j-2"
        assert await cache.get("k", slow("k")) == "k-1"  # fresh: no computation
        await asyncio.sleep(0.25)
        assert await cache.get("k", slow("k")) == "k-1"  # stale: served, refresh started
        for _ in range(100):
            if len(calls) == 3:
                break
            await asyncio.sleep(0.02)
        assert await cache.get("k", slow("k")) == "k-3"

        def broken():
            raise RuntimeError("the database went away")

        with pytest.raises(RuntimeError, match="went away"):
            await cache.get("b", broken)
        assert await cache.get("b", lambda: "back") == "back"  # a failure is not kept

    asyncio.run(scenario())
    assert calls == ["k", "j", "k"]


def seed_many(store, n: int) -> None:
    now = datetime.now(timezone.utc)
    rollouts = [
        {
            "id": f"{i:032x}",
            "workflow": "support",
            "status": "succeeded",
            "started_at": now - timedelta(seconds=i),
            "reward": (i % 10) / 10,
        }
        for i in range(n)
    ]
    ratings = [
        {
            "rollout_id": f"{i:032x}",
            "key": "rating",
            "value": float(1 + i % 5),
            "source": "explicit",
            "created_at": now,
        }
        for i in range(n)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(Rollout.__table__), rollouts)
        conn.execute(insert(Feedback.__table__), ratings)


def test_dashboard_requests_do_not_starve_the_resolver(fw):
    fw.configure(store_url=fw.get_store().url, config=WORKFLOWS)
    seed_many(fw.get_store(), 8_000)
    done: list[int] = []
    computers: set[int] = set()  # the threads that computed a view's series

    @event.listens_for(fw.get_store().engine, "before_cursor_execute")
    def watch(conn, cursor, statement, *args):
        if statement.startswith("SELECT rollout.started_at, rollout.reward, rollout.status"):
            computers.add(threading.get_ident())

    def dashboard(buckets: int) -> None:
        r = httpx.get(
            f"{live.url}/v1/dashboard/workflows/support",
            params={"buckets": buckets},
            headers=AS_READER,
            timeout=120,
        )
        done.append(r.status_code)

    def resolve() -> float:
        started = time.monotonic()
        r = httpx.get(f"{live.url}/v1/config/qa", headers=AS_READER, timeout=60)
        assert r.status_code == 200 and r.json()["config"] == {"llm": {"temperature": 0.2}}
        return time.monotonic() - started

    with LiveServer(create_app(api_keys=[API_KEY], read_keys=[READ_KEY])) as live:
        resolve()  # the resolver in use, as in production
        threads = [threading.Thread(target=dashboard, args=(10 + i,)) for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        waits = sorted(resolve() for _ in range(5))
        still_running = 16 - len(done)
        for t in threads:
            t.join(120)
    assert still_running > 0, "the dashboard requests ended before the resolver was asked"
    assert len(computers) == 1, f"{len(computers)} threads computed dashboard views"
    # sixteen views computing at once share the interpreter sixteen ways; one at a time, two
    assert waits[2] < 0.5 and waits[-1] < 2, f"the resolver waited {waits} behind the dashboard"
    assert done == [200] * 16


@pytest.mark.chromium
@pytest.mark.slow
def test_the_page_asks_for_a_key_and_renders_with_a_read_key(fw, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    seed_store(fw.get_store())
    with LiveServer(create_app(api_keys=[API_KEY], read_keys=[READ_KEY])) as live:
        chrome.get("about:blank")
        chrome.get(f"{live.url}/?workflow=support")
        chrome.execute_script("sessionStorage.clear()")
        chrome.refresh()
        WebDriverWait(chrome, 15).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-needs-key='true']"))
        )
        field = chrome.find_element(By.ID, "key")
        assert field.is_displayed()
        field.send_keys(READ_KEY)
        chrome.find_element(By.CSS_SELECTOR, "#key-form button").click()
        WebDriverWait(chrome, 15).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready='support']"))
        )
        assert not chrome.find_element(By.ID, "key-form").is_displayed()
        chrome.execute_script("sessionStorage.clear()")
        chrome.get("about:blank")
        chrome.get(f"{live.url}/?workflow=support#key={READ_KEY}")  # a link that carries it
        WebDriverWait(chrome, 15).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready='support']"))
        )
        assert READ_KEY not in chrome.current_url  # taken out of the address bar
