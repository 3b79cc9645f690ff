"""The ingestion API: every bad request is a 4xx with a message and stores nothing; good ones are stored once."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flywheel_middleware.recording.secrets import SecretRedactor

from .conftest import API_KEY

AUTH = {"X-API-Key": API_KEY}
HYPOTHESIS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def client_any(fw_any):
    """A client on each backend in turn (SQLite, and PostgreSQL when configured)."""
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    with TestClient(create_app(api_keys=[API_KEY])) as c:
        yield c


def telemetry_rows(fw) -> int:
    fw.flush()
    return fw.get_store().execute("SELECT count(*) FROM telemetry_event")[0][0]


def feedback_rows(fw) -> int:
    fw.flush()
    return fw.get_store().execute("SELECT count(*) FROM feedback")[0][0]


def assert_client_error(resp, status: int | None = None) -> dict:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


# -- examples that show each rule --------------------------------------------------------


def test_single_event_as_sendbeacon_text_plain_is_stored(fw, client):
    body = json.dumps(
        {"event_type": "dwell", "rollout_id": "r1", "session_id": "s1", "payload": {"ms": 1200}}
    )
    resp = client.post(
        f"/v1/telemetry?key={API_KEY}",
        content=body,
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert resp.status_code == 202 and resp.json() == {"accepted": 1}
    fw.flush()
    row = fw.get_store().execute(
        "SELECT rollout_id, session_id, event_type, payload FROM telemetry_event"
    )
    assert [(r[0], r[1], r[2], json.loads(r[3])) for r in row] == [
        ("r1", "s1", "dwell", {"ms": 1200})
    ]


def test_batch_envelope_and_list_apply_defaults(fw, client):
    batch = {
        "session_id": "s9",
        "rollout_id": "rb",
        "events": [
            {"event_type": "click", "payload": {"kind": "copy"}},
            {"event_type": "scroll", "rollout_id": "other", "payload": {"depth": 0.5}},
        ],
    }
    assert client.post("/v1/telemetry", json=batch, headers=AUTH).status_code == 202
    assert (
        client.post(
            "/v1/telemetry",
            json=[{"event_type": "copy", "session_id": "s10"}],
            headers={"Authorization": f"Bearer {API_KEY}"},
        ).status_code
        == 202
    )
    fw.flush()
    rows = fw.get_store().execute(
        "SELECT session_id, rollout_id, event_type FROM telemetry_event ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("s9", "rb", "click"),
        ("s9", "other", "scroll"),
        ("s10", None, "copy"),
    ]


@pytest.mark.parametrize(
    ("headers", "path", "expected"),
    [
        ({}, "/v1/telemetry", "missing or wrong API key"),
        ({"X-API-Key": "nope"}, "/v1/telemetry", "missing or wrong API key"),
        ({"Authorization": "Bearer nope"}, "/v1/feedback", "missing or wrong API key"),
        ({}, "/v1/telemetry?key=wrong", "missing or wrong API key"),
    ],
)
def test_unauthenticated_writes_are_401(fw, client, headers, path, expected):
    body = assert_client_error(
        client.post(path, json={"event_type": "x", "session_id": "s"}, headers=headers), 401
    )
    assert expected in body["error"]
    assert telemetry_rows(fw) == 0


def test_no_keys_configured_refuses_writes(fw, monkeypatch):
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    monkeypatch.delenv("FLYWHEEL_API_KEYS", raising=False)
    c = TestClient(create_app())
    body = assert_client_error(
        c.post("/v1/telemetry", json={"event_type": "x", "session_id": "s"}), 401
    )
    assert "FLYWHEEL_API_KEYS" in body["error"]
    monkeypatch.setenv("FLYWHEEL_API_KEYS", "a, b")
    c = TestClient(create_app())
    assert (
        c.post(
            "/v1/telemetry", json={"event_type": "x", "session_id": "s"}, headers={"X-API-Key": "b"}
        ).status_code
        == 202
    )


def test_oversize_body_is_413_and_stores_nothing(fw, client):
    big = {"event_type": "x", "session_id": "s", "payload": {"blob": "a" * 300_000}}
    body = assert_client_error(client.post("/v1/telemetry", json=big, headers=AUTH), 413)
    assert "limit" in body["error"]
    many = {"session_id": "s", "events": [{"event_type": "x"}] * 501}
    body = assert_client_error(client.post("/v1/telemetry", json=many, headers=AUTH), 413)
    assert "at most 500 events" in body["error"]

    # chunked upload without a Content-Length is bounded too
    def chunks():
        for _ in range(40):
            yield b" " * 10_000

    assert_client_error(client.post("/v1/telemetry", content=chunks(), headers=AUTH), 413)
    assert telemetry_rows(fw) == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"event_type": 5, "session_id": "s"}, "event_type: Input should be a valid string"),
        (
            {"event_type": "x", "session_id": "s", "client_ts": "12"},
            "client_ts: Input should be a valid number",
        ),
        (
            {"event_type": "x", "session_id": "s", "payload": [1]},
            "payload: Input should be a valid dictionary",
        ),
        ({"event_type": "x" * 51, "session_id": "s"}, "event_type: String should match pattern"),
        ({"event_type": "x", "rollout_id": "r" * 33}, "rollout_id: String should match pattern"),
        (
            {"event_type": "x", "session_id": "s" * 201},
            "session_id: String should have at most 200 characters",
        ),
        (
            {"event_type": "x", "session_id": "s", "colour": "red"},
            "colour: Extra inputs are not permitted",
        ),
        ({"event_type": "x"}, "needs a rollout_id or a session_id"),
        ({"event_type": "x", "session_id": "s", "payload": {"k": "v" * 5000}}, "the limit is 4000"),
        (
            {"session_id": "s", "events": [{"event_type": "ok"}, {"event_type": None}]},
            "events[1].event_type",
        ),
        ({"session_id": "s", "events": []}, "no events"),
        ("just a string", "got a JSON str"),
    ],
)
def test_wrong_typed_fields_are_422_naming_the_field(fw, client, body, fragment):
    out = assert_client_error(client.post("/v1/telemetry", json=body, headers=AUTH), 422)
    assert fragment in " ".join([out["error"], *out.get("problems", [])])
    assert telemetry_rows(fw) == 0


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (
            rb'{"event_type": "x", "session_id": "s\u0000"}',
            "session_id: the text contains a NUL character",
        ),
        (
            rb'{"event_type": "x", "session_id": "s", "payload": {"\ud800": 1}}',
            "payload: a key contains a lone UTF-16 surrogate",
        ),
        (
            rb'{"events": [{"event_type": "x", "session_id": "s", "payload": {"a": ["ok", "\udfff"]}}]}',
            "events[0].payload.a[1]: the text contains a lone UTF-16 surrogate",
        ),
    ],
)
def test_text_no_store_can_keep_is_422(fw_any, raw, fragment):
    """NUL and lone surrogates would be rejected by the database after the 202: refuse them up front."""
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    fw = fw_any
    client = TestClient(create_app(api_keys=[API_KEY]))
    out = assert_client_error(client.post("/v1/telemetry", content=raw, headers=AUTH), 422)
    assert fragment in out["error"]
    # a valid emoji written as a surrogate pair is fine, and is stored
    ok = client.post(
        "/v1/telemetry", content=rb'{"event_type": "x", "session_id": "\ud83d\ude00"}', headers=AUTH
    )
    assert ok.status_code == 202
    assert telemetry_rows(fw) == 1
    assert fw.get_recorder().counters.dead_lettered == 0


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "fragment"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (
            b'{"event_type": "x", "session_id": "s", "client_ts": NaN}',
            "text/plain",
            400,
            "NaN is not valid JSON",
        ),
        (b"\xff\xfe", "text/plain", 400, "not UTF-8"),
        (b"", "text/plain", 400, "empty"),
        (b"[" * 100_000, "application/json", 413, "nested deeper than 64 levels"),
        (b'{"event_type": "x", "session_id": "s"}', "application/xml", 415, "not accepted"),
    ],
)
def test_malformed_bodies_are_4xx(fw, client, raw, ctype, status, fragment):
    out = assert_client_error(
        client.post("/v1/telemetry", content=raw, headers={**AUTH, "Content-Type": ctype}), status
    )
    assert fragment in out["error"]
    assert telemetry_rows(fw) == 0


def test_cors_allow_list(fw):
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    c = TestClient(create_app(api_keys=[API_KEY], cors_origins=["https://shop.example"]))
    ok = c.post(
        "/v1/telemetry",
        json={"event_type": "x", "session_id": "s"},
        headers={**AUTH, "Origin": "https://shop.example"},
    )
    assert ok.status_code == 202
    assert ok.headers["access-control-allow-origin"] == "https://shop.example"
    bad = c.post(
        "/v1/telemetry",
        json={"event_type": "x", "session_id": "s"},
        headers={**AUTH, "Origin": "https://evil.example"},
    )
    assert "not in service.cors_origins" in assert_client_error(bad, 403)["error"]
    pre = c.options(
        "/v1/feedback",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key",
        },
    )
    assert (
        pre.status_code == 200
        and pre.headers["access-control-allow-origin"] == "https://shop.example"
    )
    assert telemetry_rows(fw) == 1


def test_feedback_endpoint(fw, client):
    with fw.rollout("qa", user_id="u1") as r:
        r.set_output("hello")
    fw.flush()
    assert (
        client.post(
            "/v1/feedback", json={"rollout_id": r.id, "rating": 4, "comment": "ok"}, headers=AUTH
        ).status_code
        == 202
    )
    assert (
        client.post(
            "/v1/feedback",
            content=json.dumps({"rollout_id": r.id, "thumbs": "up"}),
            headers={**AUTH, "Content-Type": "text/plain"},
        ).status_code
        == 202
    )
    assert (
        client.post(
            "/v1/feedback",
            json={"rollout_id": r.id, "key": "resolved", "value": 1, "source": "business"},
            headers=AUTH,
        ).status_code
        == 202
    )
    # an unknown rollout cannot be told without the database: accepted, the recorder reports it
    unknown = client.post("/v1/feedback", json={"rollout_id": "f" * 32, "rating": 5}, headers=AUTH)
    assert unknown.status_code == 202, unknown.text
    out = assert_client_error(
        client.post("/v1/feedback", json={"rollout_id": r.id, "rating": 9}, headers=AUTH), 422
    )
    assert "rating" in out["problems"][0]
    out = assert_client_error(
        client.post(
            "/v1/feedback", json={"rollout_id": r.id, "rating": 3, "thumbs": "up"}, headers=AUTH
        ),
        422,
    )
    assert "not rating and thumbs" in out["error"]
    out = assert_client_error(
        client.post(
            "/v1/feedback", json={"rollout_id": r.id, "source": "gossip", "rating": 3}, headers=AUTH
        ),
        422,
    )
    assert "source" in out["problems"][0]
    fw.flush()
    rows = fw.get_store().execute(
        "SELECT key, value, source FROM feedback WHERE rollout_id = :r ORDER BY id", {"r": r.id}
    )
    assert [tuple(x) for x in rows] == [
        ("rating", 4.0, "explicit"),
        ("thumbs", 1.0, "explicit"),
        ("resolved", 1.0, "business"),
    ]


def test_config_health_and_openapi(fw, client):
    import flywheel_middleware as fwm

    fwm.configure(
        store_url=fw.get_store().url,
        config={"workflows": {"qa": {"config": {"llm": {"temperature": 0.2}}}}},
    )
    r = client.get("/v1/config/qa", params={"unit": "user-7"}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["config"] == {"llm": {"temperature": 0.2}}
    assert r.json()["workflow"] == "qa"
    assert_client_error(client.get("/v1/config/qa"), 401)
    assert (
        "unknown workflow"
        in assert_client_error(client.get("/v1/config/nope", headers=AUTH), 404)["error"]
    )
    h = client.get("/v1/health").json()
    assert h["status"] == "ok" and h["store"] == "sqlite" and "recorder" in h
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/telemetry"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "text/plain"}
    assert "TelemetryEventIn" in spec["components"]["schemas"]
    assert spec["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/FeedbackIn"}


# -- property-based ---------------------------------------------------------------------

ident = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=32)


def clean_text(max_size: int):
    """Text a database can keep: no NUL and no lone surrogates."""
    return st.text(
        st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=max_size
    )


clean_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.integers(min_value=10**30, max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | clean_text(30)
)
clean_value = st.recursive(
    clean_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(clean_text(8), c, max_size=4),
    max_leaves=12,
)
# text no database keeps (NUL, lone surrogates) and an emoji that is fine
json_leaf = clean_leaf | st.sampled_from(["\x00", "a\ud800", "\udfff", "\U0001f600"])
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
valid_event = st.fixed_dictionaries(
    {"event_type": st.from_regex(r"\A[a-z][a-z_\-]{0,20}\Z"), "session_id": ident},
    optional={
        "rollout_id": ident,
        "client_ts": st.floats(0, 2e12, allow_nan=False),
        "payload": st.dictionaries(clean_text(10), clean_value, max_size=5),
    },
)
# Bodies that are mostly valid with a chance of any kind of damage.
damaged_event = st.one_of(
    *[valid_event] * 8,  # about half the events are valid, so whole valid batches are common
    valid_event.map(lambda e: {**e, "event_type": 7}),
    valid_event.map(lambda e: {**e, "client_ts": "soon"}),
    valid_event.map(lambda e: {**e, "session_id": ["a"]}),
    valid_event.map(lambda e: {**e, "rollout_id": "x" * 40}),
    valid_event.map(lambda e: {**e, "unexpected": True}),
    valid_event.map(lambda e: {k: v for k, v in e.items() if k != "event_type"}),
    st.dictionaries(st.text(max_size=12), json_value, max_size=5),
    json_value,
)
body_shape = st.one_of(
    damaged_event,
    st.lists(damaged_event, max_size=6),
    st.fixed_dictionaries(
        {"events": st.lists(damaged_event, max_size=6)},
        optional={"session_id": ident | json_leaf, "rollout_id": ident | json_leaf},
    ),
)


def expected_events(body) -> int | None:
    """How many events a body holds if every one is valid, else None (the server's oracle)."""
    from pydantic import ValidationError

    from flywheel_middleware.service.app import ApiError, check_json, parse_telemetry

    try:
        check_json(body)
        return len(parse_telemetry(body, 500))
    except (ApiError, ValidationError):
        return None


@HYPOTHESIS
@given(
    body=body_shape,
    ctype=st.sampled_from(["application/json", "text/plain;charset=UTF-8", "text/plain"]),
    authed=st.sampled_from([True, True, True, False]),
)
def test_any_json_body_is_all_or_nothing(fw_any, client_any, body, ctype, authed):
    fw, client = fw_any, client_any
    before = telemetry_rows(fw)
    headers = {"Content-Type": ctype, **(AUTH if authed else {})}
    resp = client.post("/v1/telemetry", content=json.dumps(body), headers=headers)
    assert resp.status_code < 500, resp.text
    event(f"status {resp.status_code}")
    stored = telemetry_rows(fw) - before
    if resp.status_code == 202:
        assert authed
        assert stored == resp.json()["accepted"] == expected_events(body)
    else:
        assert_client_error(resp)
        assert stored == 0
        if authed:
            assert expected_events(body) is None


@HYPOTHESIS
@given(
    raw=st.binary(max_size=300),
    ctype=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]),
)
def test_arbitrary_bytes_never_5xx(fw, client, raw, ctype):
    before = telemetry_rows(fw)
    resp = client.post("/v1/telemetry", content=raw, headers={**AUTH, "Content-Type": ctype})
    assert resp.status_code < 500
    if resp.status_code != 202:
        assert_client_error(resp)
        assert telemetry_rows(fw) == before


@HYPOTHESIS
@given(events=st.lists(valid_event, min_size=1, max_size=20))
def test_valid_batches_are_stored_exactly_once_field_for_field(fw_any, client_any, events):
    fw, client = fw_any, client_any
    import uuid

    marker = uuid.uuid4().hex
    events = [{**e, "session_id": marker} for e in events]
    resp = client.post("/v1/telemetry", json={"events": events}, headers=AUTH)
    assert resp.status_code == 202
    fw.flush()
    rows = fw.get_store().execute(
        "SELECT event_type, rollout_id, client_ts, payload FROM telemetry_event WHERE session_id = :s ORDER BY id",
        {"s": marker},
    )
    assert len(rows) == len(events)
    for row, ev in zip(rows, events, strict=True):
        assert row[0] == ev["event_type"] and row[1] == ev.get("rollout_id")
        assert row[2] == pytest.approx(ev.get("client_ts")) if "client_ts" in ev else row[2] is None
        stored_payload = (
            json.loads(row[3]) if isinstance(row[3], str) else row[3]
        )  # PG returns dicts
        # as sent, after the default redactor (a key named like a credential is scrubbed)
        assert stored_payload == SecretRedactor().value(ev.get("payload"))


valid_feedback = st.one_of(
    st.fixed_dictionaries(
        {"rollout_id": st.just("REAL"), "rating": st.integers(1, 5) | st.floats(1, 5)}
    ),
    st.fixed_dictionaries(
        {"rollout_id": st.just("REAL"), "thumbs": st.sampled_from(["up", "down", True, False])}
    ),
    st.fixed_dictionaries(
        {
            "rollout_id": st.just("REAL"),
            "key": st.text(string.ascii_letters, min_size=1, max_size=20),
        },
        optional={
            "value": st.floats(-1e6, 1e6) | st.booleans(),
            "source": st.sampled_from(["business", "judge", "rule"]),
        },
    ),
).flatmap(
    lambda d: st.fixed_dictionaries(
        {k: st.just(v) for k, v in d.items()},
        optional={
            "comment": clean_text(50),
            "user_id": ident,
            "metadata": st.dictionaries(clean_text(5), clean_leaf, max_size=3),
        },
    )
)
damaged_feedback = st.fixed_dictionaries(
    {},
    optional={
        "rollout_id": st.just("REAL") | ident | json_leaf,
        "rating": st.integers(-2, 8)
        | st.floats(allow_nan=False)
        | st.text(max_size=3)
        | st.booleans(),
        "thumbs": st.sampled_from(["up", "down", "sideways", True, False, 1]),
        "key": st.text(max_size=120) | st.integers(),
        "value": json_leaf,
        "comment": st.text(max_size=20) | st.integers(),
        "source": st.sampled_from(["explicit", "business", "judge", "nonsense", 3]),
        "extra": json_leaf,
    },
)
feedback_body = valid_feedback | damaged_feedback | json_value


@pytest.fixture
def real_rollout(fw) -> str:
    with fw.rollout("qa") as r:
        pass
    fw.flush()
    return r.id


@HYPOTHESIS
@given(body=feedback_body)
def test_feedback_never_5xx_and_stores_at_most_one(fw, client, real_rollout, body):
    if isinstance(body, dict) and body.get("rollout_id") == "REAL":
        body = {**body, "rollout_id": real_rollout}
    before = feedback_rows(fw)
    resp = client.post("/v1/feedback", content=json.dumps(body), headers=AUTH)
    assert resp.status_code < 500, resp.text
    event(f"status {resp.status_code}")
    stored = feedback_rows(fw) - before
    if resp.status_code == 202:  # an unknown rollout too: the service cannot tell it
        assert stored <= 1
        if body["rollout_id"] == real_rollout:
            assert stored == 1
    else:
        assert_client_error(resp)
        assert stored == 0
