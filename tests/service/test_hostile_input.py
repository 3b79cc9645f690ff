"""Hostile JSON gets a 4xx that names the field and the limit, and ingestion needs no database:
feedback and telemetry are accepted during an outage and stored once it ends."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone

import httpx
import pytest

from flywheel_middleware.config import parse_config
from flywheel_middleware.store.models import Rollout

from .conftest import API_KEY, LiveServer
from .test_ingest_api import assert_client_error, feedback_rows, telemetry_rows

AUTH = {"X-API-Key": API_KEY}


def nested(levels: int, leaf: str = "1", opener: str = '{"a":', closer: str = "}") -> str:
    """JSON text ``levels`` containers deep."""
    return opener * levels + leaf + closer * levels


def feedback_body(metadata: str) -> str:
    return '{"rollout_id": "r1", "rating": 5, "metadata": ' + metadata + "}"


@pytest.mark.parametrize(
    ("opener", "closer", "leaf"), [('{"a":', "}", "1"), ("[", "]", "1"), ('{"a":[', "]}", "1")]
)
def test_deep_feedback_metadata_is_413_naming_the_field_and_the_limit(
    fw, client, opener, closer, leaf
):
    body = feedback_body(nested(950, leaf, opener, closer))
    out = assert_client_error(client.post("/v1/feedback", content=body, headers=AUTH), 413)
    assert out["error"].startswith("metadata")
    assert "deeper than 64 levels" in out["error"] and "service.max_json_depth" in out["error"]
    assert feedback_rows(fw) == 0


def test_deep_telemetry_payload_is_413_naming_the_event(fw, client):
    events = [
        {"event_type": "dwell", "session_id": "s", "payload": {"ms": 1}},
        {"event_type": "dwell", "session_id": "s", "payload": "PAYLOAD"},
    ]
    body = json.dumps({"events": events}).replace('"PAYLOAD"', nested(950))
    out = assert_client_error(client.post("/v1/telemetry", content=body, headers=AUTH), 413)
    assert out["error"].startswith("events[1].payload.a")
    assert "64" in out["error"]
    assert telemetry_rows(fw) == 0


def test_depth_up_to_the_limit_passes_and_brackets_in_strings_do_not_count(fw, client):
    fine = feedback_body(nested(62))  # the body's own object makes 63 levels
    assert client.post("/v1/feedback", content=fine, headers=AUTH).status_code == 202
    too_deep = feedback_body(nested(64))
    assert_client_error(client.post("/v1/feedback", content=too_deep, headers=AUTH), 413)
    text = json.dumps({"event_type": "copy", "session_id": "s", "payload": {"t": "[{" * 900}})
    assert client.post("/v1/telemetry", content=text, headers=AUTH).status_code == 202
    assert feedback_rows(fw) == 1 and telemetry_rows(fw) == 1


def test_too_many_keys_or_values_is_413_naming_the_limit(fw, client):
    wide = {f"k{i}": i for i in range(1001)}
    body = json.dumps({"rollout_id": "r1", "rating": 5, "metadata": wide})
    out = assert_client_error(client.post("/v1/feedback", content=body, headers=AUTH), 413)
    assert out["error"] == (
        "metadata: an object with 1001 keys; the limit is 1000 (service.max_json_keys)"
    )
    many = {"event_type": "scroll", "session_id": "s", "payload": {"depths": [0] * 10_001}}
    out = assert_client_error(client.post("/v1/telemetry", json=many, headers=AUTH), 413)
    assert "more than 10000 JSON values (service.max_json_items)" in out["error"]
    assert out["error"].startswith("payload.depths[")
    assert feedback_rows(fw) == 0 and telemetry_rows(fw) == 0


def test_the_limits_come_from_the_service_section(fw):
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    config = parse_config("service: {max_json_depth: 8, max_json_keys: 3, max_json_items: 20}\n")
    client = TestClient(create_app(config, api_keys=[API_KEY]))
    deep = client.post("/v1/feedback", content=feedback_body(nested(8)), headers=AUTH)
    assert "deeper than 8 levels" in assert_client_error(deep, 413)["error"]
    wide = {"rollout_id": "r1", "rating": 5, "metadata": {"a": 1, "b": 2, "c": 3, "d": 4}}
    out = assert_client_error(client.post("/v1/feedback", json=wide, headers=AUTH), 413)
    assert "the limit is 3" in out["error"]
    long = {"event_type": "x", "session_id": "s", "payload": {"v": list(range(30))}}
    out = assert_client_error(client.post("/v1/telemetry", json=long, headers=AUTH), 413)
    assert "more than 20 JSON values" in out["error"]
    ok = {"rollout_id": "r1", "rating": 5, "metadata": {"a": [1, [2, [3]]]}}
    assert client.post("/v1/feedback", json=ok, headers=AUTH).status_code == 202
    assert feedback_rows(fw) == 1


# -- a database outage ------------------------------------------------------------------------

ROLLOUT_ID = "0123456789abcdef0123456789abcdef"


def post_during_outage(url: str) -> None:
    """Feedback and a telemetry event, each answered 202 well within the store's wait limits."""
    started = time.monotonic()
    with httpx.Client(base_url=url, headers=AUTH, timeout=4) as http:
        fb = http.post("/v1/feedback", json={"rollout_id": ROLLOUT_ID, "rating": 2})
        ev = http.post(
            "/v1/telemetry",
            json={"event_type": "copy", "rollout_id": ROLLOUT_ID, "payload": {"n": 3}},
        )
    assert fb.status_code == 202, fb.text
    assert ev.status_code == 202, ev.text
    assert time.monotonic() - started < 4


def seed_unseen_rollout(fw) -> None:
    """A rollout this process never recorded: only the store knows it."""
    with fw.get_store().session() as s:
        s.add(Rollout(id=ROLLOUT_ID, workflow="qa", started_at=datetime.now(timezone.utc)))


def assert_stored_after(fw) -> None:
    assert fw.flush(60)
    rows = fw.get_store().execute(
        "SELECT key, value FROM feedback WHERE rollout_id = :r", {"r": ROLLOUT_ID}
    )
    assert [tuple(r) for r in rows] == [("rating", 2.0)]
    assert telemetry_rows(fw) == 1


def test_sqlite_locked_feedback_is_accepted_and_stored_after(fw, app):
    seed_unseen_rollout(fw)
    with LiveServer(app) as live:
        blocker = sqlite3.connect(fw.get_store().sqlite_path, check_same_thread=False)
        blocker.execute("BEGIN EXCLUSIVE")  # no writer gets in now
        try:
            post_during_outage(live.url)
            assert feedback_rows_now(fw) == 0
        finally:
            blocker.rollback()
            blocker.close()
        assert_stored_after(fw)


def feedback_rows_now(fw) -> int:
    return fw.get_store().execute("SELECT count(*) FROM feedback")[0][0]


@pytest.mark.postgres
def test_postgres_unreachable_feedback_is_accepted_and_stored_after(postgres_url):
    from sqlalchemy.engine import make_url

    import flywheel_middleware as fw
    from flywheel_middleware.service.app import create_app
    from tests.core.tcp_proxy import TcpProxy

    direct = make_url(postgres_url)
    proxy = TcpProxy(direct.host or "127.0.0.1", direct.port or 5432)
    proxy.start()
    proxied = direct.set(host="127.0.0.1", port=proxy.port).update_query_dict(
        {"connect_timeout": "2"}
    )
    fw.configure(store_url=proxied.render_as_string(hide_password=False))
    try:
        seed_unseen_rollout(fw)
        with LiveServer(create_app(api_keys=[API_KEY])) as live:
            proxy.cut()  # connections reset, new ones refused: reads and writes fail
            try:
                post_during_outage(live.url)
            finally:
                proxy.start()
            assert_stored_after(fw)
    finally:
        fw.shutdown()
        proxy.cut()
