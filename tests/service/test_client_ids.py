"""Feedback and telemetry a caller names with its own ``id`` are stored once, however often they
are sent: a client retrying after a 503 or a timeout, a redelivered webhook. On SQLite, and on
PostgreSQL whose new stores are partitioned (where the unique index alone cannot see a resend,
which is timed on arrival again)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from flywheel_middleware.errors import InvalidFeedbackError
from flywheel_middleware.tables import FEEDBACK, client_uid

from .conftest import API_KEY

AUTH = {"X-API-Key": API_KEY}


@pytest.fixture
def service(fw_any):
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    with TestClient(create_app(api_keys=[API_KEY])) as client:
        yield fw_any, client


def count(fw, sql: str) -> int:
    assert fw.flush(30)
    return fw.get_store().execute(sql)[0][0]


def test_feedback_sent_again_with_its_id_is_stored_once(service):
    fw, client = service
    body = {"rollout_id": "r-1", "rating": 2, "id": "form-7"}
    for _ in range(3):  # a retry, and one more after the first was written
        assert client.post("/v1/feedback", json=body, headers=AUTH).status_code == 202
        assert count(fw, "SELECT count(*) FROM feedback") == 1
    # the same id about another rollout, and feedback without an id, are other feedback
    other = {**body, "rollout_id": "r-2"}
    assert client.post("/v1/feedback", json=other, headers=AUTH).status_code == 202
    for _ in range(2):
        plain = {"rollout_id": "r-1", "thumbs": "up"}
        assert client.post("/v1/feedback", json=plain, headers=AUTH).status_code == 202
    assert fw.flush(30)
    rows = fw.get_store().execute(
        "SELECT rollout_id, key, count(*) FROM feedback GROUP BY rollout_id, key "
        "ORDER BY rollout_id, key"
    )
    assert [tuple(r) for r in rows] == [
        ("r-1", "rating", 1),
        ("r-1", "thumbs", 2),
        ("r-2", "rating", 1),
    ]


def test_telemetry_batch_resent_stores_each_named_event_once(service):
    fw, client = service
    batch = {
        "session_id": "s-1",
        "events": [
            {"event_type": "copy", "rollout_id": "r-1", "id": "1"},
            {"event_type": "dwell", "rollout_id": "r-1", "id": "2", "payload": {"ms": 900}},
            {"event_type": "click", "rollout_id": "r-1"},  # no id: each send is an event
        ],
    }
    for _ in range(2):
        assert client.post("/v1/telemetry", json=batch, headers=AUTH).status_code == 202
    assert count(fw, "SELECT count(*) FROM telemetry_event WHERE event_type = 'copy'") == 1
    assert count(fw, "SELECT count(*) FROM telemetry_event WHERE event_type = 'dwell'") == 1
    assert count(fw, "SELECT count(*) FROM telemetry_event WHERE event_type = 'click'") == 2
    # another session's small ids are its own
    other = {**batch, "session_id": "s-2"}
    assert client.post("/v1/telemetry", json=other, headers=AUTH).status_code == 202
    assert count(fw, "SELECT count(*) FROM telemetry_event WHERE event_type = 'copy'") == 2


def test_bad_ids_are_refused_with_the_field_named(service):
    fw, client = service
    for bad in ("", "x" * 201, 7):
        resp = client.post(
            "/v1/feedback", json={"rollout_id": "r-1", "rating": 5, "id": bad}, headers=AUTH
        )
        assert resp.status_code == 422 and "id" in resp.text, resp.text
    assert count(fw, "SELECT count(*) FROM feedback") == 0


def test_python_api_feedback_with_an_id_is_stored_once(fw_any):
    with fw_any.rollout("qa") as r:
        r.set_output("hi")
    for _ in range(2):  # a redelivered webhook handled twice
        fw_any.feedback(r.id, rating=4, id="webhook-evt-1")
    assert count(fw_any, "SELECT count(*) FROM feedback") == 1
    with pytest.raises(InvalidFeedbackError, match="feedback id"):
        fw_any.feedback(r.id, rating=4, id="")


@pytest.mark.postgres
def test_a_resend_days_later_meets_its_first_copy_in_another_partition(postgres_url):
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    import flywheel_middleware as fw
    from flywheel_middleware.service.app import create_app

    fw.configure(store_url=postgres_url)
    try:
        store = fw.get_store()
        earlier = datetime.now(timezone.utc) - timedelta(days=3)
        with store.engine.begin() as conn:  # the first copy, kept three days ago
            conn.execute(
                text(
                    "INSERT INTO feedback (rollout_id, source, key, value, created_at, uid) "
                    "VALUES ('r-1', 'explicit', 'rating', 1, :at, :uid)"
                ),
                {"at": earlier, "uid": client_uid(FEEDBACK.name, "form-7", "r-1")},
            )
        with TestClient(create_app(api_keys=[API_KEY])) as client:
            body = {"rollout_id": "r-1", "rating": 1, "id": "form-7"}
            assert client.post("/v1/feedback", json=body, headers=AUTH).status_code == 202
            assert count(fw, "SELECT count(*) FROM feedback") == 1
            body = {"rollout_id": "r-1", "rating": 1, "id": "form-8"}
            assert client.post("/v1/feedback", json=body, headers=AUTH).status_code == 202
            assert count(fw, "SELECT count(*) FROM feedback") == 2
    finally:
        fw.shutdown()
