"""``POST /v1/traces``: OTLP/HTTP bodies as exporters send them (the OTel SDK's protobuf
encoder, gzip, a JavaScript exporter's JSON) become one rollout per trace, whatever the order
and however often their spans arrive; what cannot be taken is refused the way OTLP says."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .conftest import API_KEY

PROTOBUF = {"Content-Type": "application/x-protobuf", "X-API-Key": API_KEY}
JSON = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
READ_KEY = "read-only-key"


@pytest.fixture
def otlp(fw, monkeypatch) -> Any:
    """A TestClient on the service, traces closing 0.5 s after their root span."""
    from flywheel_middleware.service.app import create_app

    monkeypatch.setenv("FLYWHEEL_OTLP_SETTLE", "0.5")
    monkeypatch.setenv("FLYWHEEL_OTLP_GRACE", "0.5")
    with TestClient(create_app(api_keys=[API_KEY], read_keys=[READ_KEY])) as client:
        yield client


def stored(fw, sql: str, count: int, timeout: float = 10) -> list[Any]:
    """The rows of ``sql`` once at least ``count`` are stored (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        assert fw.flush(10)
        rows = fw.get_store().execute(sql)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def sdk_trace(service: str = "svc") -> tuple[list[Any], str]:
    """A finished trace from the OTel SDK: an agent, two chats and a tool; its spans in the
    order they ended (children first) and its trace id."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("hand")
    question = json.dumps([{"role": "user", "parts": [{"type": "text", "content": "2+3?"}]}])
    answer = json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "5"}]}])
    agent_attrs = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.input.messages": question,
        "gen_ai.output.messages": answer,
        "user.id": "u-7",
    }
    with tracer.start_as_current_span("invoke_agent calc", attributes=agent_attrs) as root:
        for n in (1, 2):
            attrs = {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "m-1",
                "gen_ai.usage.input_tokens": 10 * n,
                "gen_ai.usage.output_tokens": n,
            }
            with tracer.start_as_current_span(f"chat {n}", attributes=attrs):
                pass
            if n == 1:
                tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "add"}
                with tracer.start_as_current_span("execute_tool add", attributes=tool):
                    pass
    provider.shutdown()
    return list(exporter.get_finished_spans()), format(root.get_span_context().trace_id, "032x")


def body(spans: list[Any]) -> bytes:
    return encode_spans(spans).SerializeToString()


def test_a_trace_in_three_requests_in_reverse_order_is_one_rollout(fw, otlp) -> None:
    spans, trace_id = sdk_trace()
    chunks = [spans[0:2], spans[2:3], spans[3:]]  # the root ended last
    for chunk in reversed(chunks):
        r = otlp.post("/v1/traces", content=body(chunk), headers=PROTOBUF)
        assert r.status_code == 200, r.content
        assert r.headers["content-type"] == "application/x-protobuf"
        assert not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.id == trace_id and rollout.workflow == "svc" and rollout.user_id == "u-7"
    assert (rollout.input_tokens, rollout.output_tokens, rollout.total_tokens) == (30, 3, 33)
    assert json.loads(rollout.input) == [{"role": "user", "content": "2+3?"}]
    assert json.loads(rollout.output) == [{"role": "assistant", "content": "5"}]
    rows = fw.get_store().execute("SELECT * FROM span ORDER BY started_at")
    assert sorted(s.name for s in rows) == sorted(s.name for s in spans)
    assert [s.kind for s in rows] == ["agent", "llm", "tool", "llm"]
    root = rows[0]
    assert root.parent_id is None and all(s.parent_id == root.id for s in rows[1:])
    assert {s.model for s in rows if s.kind == "llm"} == {"m-1"}


def test_a_trace_sent_twice_is_one_rollout_without_duplicate_spans(fw, otlp) -> None:
    spans, trace_id = sdk_trace()
    for _ in range(2):
        assert otlp.post("/v1/traces", content=body(spans), headers=PROTOBUF).status_code == 200
    assert len(stored(fw, "SELECT * FROM rollout", 1)) == 1
    # a third copy after the rollout was written
    assert otlp.post("/v1/traces", content=body(spans), headers=PROTOBUF).status_code == 200
    time.sleep(0.6)
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.id == trace_id and (rollout.input_tokens, rollout.output_tokens) == (30, 3)
    assert len(fw.get_store().execute("SELECT id FROM span")) == len(spans) == 4


def test_gzip_compressed_protobuf(fw, otlp) -> None:
    spans, trace_id = sdk_trace("zipped")
    zipped = gzip.compress(body(spans))
    headers = {**PROTOBUF, "Content-Encoding": "gzip"}
    assert otlp.post("/v1/traces", content=zipped, headers=headers).status_code == 200
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.id == trace_id and rollout.workflow == "zipped"


def js_exporter_body(trace_id: str) -> dict[str, Any]:
    """OTLP/JSON as @opentelemetry/exporter-trace-otlp-http sends it: camelCase, hex ids,
    64-bit integers as strings, enums as numbers."""

    def attr(key: str, value: Any) -> dict[str, Any]:
        if isinstance(value, bool):
            return {"key": key, "value": {"boolValue": value}}
        if isinstance(value, int):
            return {"key": key, "value": {"intValue": str(value)}}
        return {"key": key, "value": {"stringValue": value}}

    def span(span_id: str, parent: str, name: str, start: int, attrs: dict[str, Any]) -> dict:
        return {
            "traceId": trace_id,
            "spanId": span_id,
            "parentSpanId": parent,
            "name": name,
            "kind": 1,
            "startTimeUnixNano": str(1_760_000_000_000_000_000 + start * 1_000_000),
            "endTimeUnixNano": str(1_760_000_000_000_000_000 + (start + 5) * 1_000_000),
            "attributes": [attr(k, v) for k, v in attrs.items()],
            "droppedAttributesCount": 0,
            "events": [],
            "droppedEventsCount": 0,
            "status": {"code": 0},
            "links": [],
            "droppedLinksCount": 0,
        }

    question = [{"role": "user", "parts": [{"type": "text", "content": "Where is my order?"}]}]
    answer = [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "It ships tomorrow."}],
            "finish_reason": "stop",
        }
    ]
    agent = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "support",
        "flywheel.workflow": "support-js",
        "gen_ai.conversation.id": "conv-42",
        "gen_ai.input.messages": json.dumps(question),
        "gen_ai.output.messages": json.dumps(answer),
    }
    chat = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-js",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 4,
        "gen_ai.input.messages": json.dumps(question),
        "gen_ai.output.messages": json.dumps(answer),
    }
    tool = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "lookup_order",
        "gen_ai.tool.call.arguments": '{"order": 42}',
        "gen_ai.tool.call.result": '{"status": "packed"}',
    }
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        attr("service.name", "support-web"),
                        attr("telemetry.sdk.language", "nodejs"),
                    ],
                    "droppedAttributesCount": 0,
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "support-agent", "version": "1.0.0"},
                        "spans": [
                            span("AAAAAAAAAAAAAAA2", "A1A1A1A1A1A1A1A1", "execute_tool", 1, tool),
                            span("00f067aa0ba902b7", "a1a1a1a1a1a1a1a1", "chat gpt-js", 6, chat),
                            span("a1a1a1a1a1a1a1a1", "", "invoke_agent support", 0, agent),
                        ],
                    }
                ],
            }
        ]
    }


def test_a_javascript_exporters_json_body(fw, otlp, tmp_path) -> None:
    from flywheel_middleware.loop.datasets import export

    trace_id = "4BF92F3577B34DA6A3CE929D0E0E4736"  # hex ids; the case is the sender's
    r = otlp.post("/v1/traces", content=json.dumps(js_exporter_body(trace_id)), headers=JSON)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {}
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.id == trace_id.lower()
    assert (rollout.workflow, rollout.session_id) == ("support-js", "conv-42")
    assert (rollout.input_tokens, rollout.output_tokens) == (12, 4)
    spans = {s.name: s for s in fw.get_store().execute("SELECT * FROM span")}
    assert {n: s.kind for n, s in spans.items()} == {
        "invoke_agent support": "agent",
        "chat gpt-js": "llm",
        "execute_tool": "tool",
    }
    assert spans["chat gpt-js"].model == "gpt-js" and spans["chat gpt-js"].input_tokens == 12
    assert json.loads(spans["execute_tool"].input) == {"order": 42}
    assert json.loads(spans["execute_tool"].output) == {"status": "packed"}
    assert spans["chat gpt-js"].duration_ms == 5.0
    export(fw.get_store(), "tasks", "support-js", tmp_path / "t.jsonl", val_fraction=0)
    [task] = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert (task["main_query"], task["metadata"]["answer"]) == (
        "Where is my order?",
        "It ships tomorrow.",
    )
    rated = otlp.post("/v1/feedback", json={"rollout_id": trace_id, "thumbs": "up"}, headers=JSON)
    assert rated.status_code == 202
    [fb] = stored(fw, "SELECT rollout_id, value FROM feedback", 1)
    assert (fb.rollout_id, fb.value) == (trace_id.lower(), 1.0)


def test_spans_that_cannot_be_taken_are_a_partial_success(fw, otlp) -> None:
    data = js_exporter_body("5b8efff798038103d269b633813fc60c")
    spans = data["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["spanId"] = "not-hex"
    spans[1]["traceId"] = "00000000000000000000000000000000"
    r = otlp.post("/v1/traces", content=json.dumps(data), headers=JSON)
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "2"
    assert "span 'execute_tool': span id must be 8 bytes" in partial["errorMessage"]
    assert "span 'chat gpt-js': trace id must be 16 bytes" in partial["errorMessage"]
    rows = stored(fw, "SELECT name FROM span", 1)
    assert [s.name for s in rows] == ["invoke_agent support"]


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        ({"Content-Type": "application/x-protobuf"}, 401, "missing or wrong API key"),
        ({**PROTOBUF, "X-API-Key": "wrong"}, 401, "missing or wrong API key"),
        ({**PROTOBUF, "X-API-Key": READ_KEY}, 403, "may only read"),
    ],
)
def test_unauthenticated_otlp_is_refused(fw, otlp, headers, status, fragment) -> None:
    spans, _ = sdk_trace()
    r = otlp.post("/v1/traces", content=body(spans), headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/x-protobuf"  # a google.rpc.Status
    assert fragment in status_pb2.Status.FromString(r.content).message
    time.sleep(0.2)
    assert fw.flush(10)
    assert fw.get_store().execute("SELECT id FROM span") == []
    assert fw.get_store().execute("SELECT id FROM rollout") == []


@pytest.mark.parametrize(
    ("headers", "content", "status", "fragment"),
    [
        ({**JSON, "Content-Type": "text/plain"}, b"{}", 415, "content type 'text/plain'"),
        ({**PROTOBUF, "Content-Encoding": "br"}, b"x", 415, "Content-Encoding 'br'"),
        (PROTOBUF, b"\xff\xff\xff", 400, "not an OTLP protobuf trace export request"),
        ({**PROTOBUF, "Content-Encoding": "gzip"}, b"plain", 400, "not valid gzip"),
        (JSON, b'{"resourceSpans": [', 400, "not valid JSON"),
        (JSON, b"[]", 400, "an OTLP/JSON body is an object"),
        (JSON, b'{"resourceSpans": 3}', 400, "not an OTLP trace export request"),
    ],
)
def test_bodies_that_cannot_be_read_name_the_problem(fw, otlp, headers, content, status, fragment):
    r = otlp.post("/v1/traces", content=content, headers=headers)
    assert r.status_code == status, r.content
    if r.headers["content-type"] == "application/json":
        message = r.json()["message"]
    else:
        message = status_pb2.Status.FromString(r.content).message
    assert fragment in message, message


def test_a_trace_whose_root_never_comes_closes_after_the_grace_period(fw, otlp) -> None:
    spans, trace_id = sdk_trace()
    children = [s for s in spans if s.parent is not None]
    assert otlp.post("/v1/traces", content=body(children), headers=PROTOBUF).status_code == 200
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.id == trace_id and json.loads(rollout.metadata)["root_missing"] is True
    assert (rollout.input_tokens, rollout.output_tokens) == (30, 3)


def test_open_traces_are_closed_when_the_service_stops(fw, monkeypatch) -> None:
    from flywheel_middleware.service.app import create_app

    monkeypatch.setenv("FLYWHEEL_OTLP_SETTLE", "600")
    spans, trace_id = sdk_trace()
    with TestClient(create_app(api_keys=[API_KEY])) as client:
        assert client.post("/v1/traces", content=body(spans), headers=PROTOBUF).status_code == 200
        assert fw.flush(10) and fw.get_store().execute("SELECT id FROM rollout") == []
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.id == trace_id and rollout.input_tokens == 30
