"""Schemathesis against the service's own OpenAPI description: no 5xx, data the schema forbids is
rejected with a 4xx, and whatever is accepted is stored exactly once (a record named with an
``id`` the run already sent, at most once).

(Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.)
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import negative_data_rejection  # noqa: E402

from flywheel_middleware.config import FlywheelConfig  # noqa: E402
from flywheel_middleware.service.app import create_app  # noqa: E402
from flywheel_middleware.tables import CLIENT_UID_MARK  # noqa: E402

from .conftest import API_KEY  # noqa: E402

# The app's handlers use the runtime the `fw` fixture configures, so one app serves every test.
APP = create_app(FlywheelConfig(), api_keys=[API_KEY])
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))


def cases(path: str, method: str):
    op = SCHEMA[path][method]
    return st.one_of(
        op.as_strategy(generation_mode=GenerationMode.POSITIVE),
        op.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )


def _rows(fw, table: str) -> tuple[int, int]:
    """Rows without and with a caller's id."""
    fw.flush()
    named = f"uid LIKE '{CLIENT_UID_MARK}%'"
    (unnamed, with_id), *_ = fw.get_store().execute(
        f"SELECT count(*) - count(CASE WHEN {named} THEN 1 END), "
        f"count(CASE WHEN {named} THEN 1 END) FROM {table}"
    )
    return unnamed, with_id


def _named(body) -> int:
    """The records of a request body that carry a caller's id."""
    records = body.get("events", body) if isinstance(body, dict) else body
    records = records if isinstance(records, list) else [records]
    return sum(isinstance(r, dict) and r.get("id") is not None for r in records)


@pytest.mark.parametrize(
    ("path", "table"), [("/v1/telemetry", "telemetry_event"), ("/v1/feedback", "feedback")]
)
def test_writes_follow_the_openapi_description(fw, path, table):
    @FUZZ
    @given(case=cases(path, "POST"))
    def run(case):
        before = _rows(fw, table)
        response = case.call_and_validate(
            headers={"X-API-Key": API_KEY}, checks=[not_a_server_error, negative_data_rejection]
        )
        after = _rows(fw, table)
        unnamed, named = after[0] - before[0], after[1] - before[1]
        if response.status_code == 202:
            sent_named = _named(case.body)
            assert unnamed == response.json()["accepted"] - sent_named
            assert 0 <= named <= sent_named
        else:
            assert 400 <= response.status_code < 500 and response.json()["error"]
            assert unnamed == named == 0

    run()


@pytest.mark.parametrize(
    "path", ["/v1/config/{workflow}", "/v1/health", "/v1/dashboard/workflows/{workflow}"]
)
def test_reads_never_fail(fw, path):
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases(path, "GET"))
    def run(case):
        case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=[not_a_server_error])

    run()
