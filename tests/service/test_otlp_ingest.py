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


def attr(key: str, value: Any) -> dict[str, Any]:
    """An OTLP/JSON attribute as a JavaScript exporter writes it (64-bit integers as text)."""
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def json_span(
    trace_id: str, span_id: str, parent: str, name: str, start: int, attrs: dict[str, Any]
) -> dict[str, Any]:
    """An OTLP/JSON span: camelCase, hex ids, times as text, enums as numbers."""
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


def json_body(resource: dict[str, Any], spans: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [attr(k, v) for k, v in resource.items()],
                    "droppedAttributesCount": 0,
                },
                "scopeSpans": [{"scope": {"name": "hand", "version": "1.0.0"}, "spans": spans}],
            }
        ]
    }


def js_exporter_body(trace_id: str) -> dict[str, Any]:
    """OTLP/JSON as @opentelemetry/exporter-trace-otlp-http sends it for a GenAI agent."""
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
    resource = {"service.name": "support-web", "telemetry.sdk.language": "nodejs"}
    return json_body(
        resource,
        [
            json_span(trace_id, "AAAAAAAAAAAAAAA2", "A1A1A1A1A1A1A1A1", "execute_tool", 1, tool),
            json_span(trace_id, "00f067aa0ba902b7", "a1a1a1a1a1a1a1a1", "chat gpt-js", 6, chat),
            json_span(trace_id, "a1a1a1a1a1a1a1a1", "", "invoke_agent support", 0, agent),
        ],
    )


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
    event = {"event_type": "copy", "rollout_id": trace_id, "payload": {"chars": 18}}
    assert otlp.post("/v1/telemetry", json=event, headers=JSON).status_code == 202
    [ev] = stored(fw, "SELECT rollout_id FROM telemetry_event", 1)
    assert ev.rollout_id == trace_id.lower()


def test_openllmetry_spans_and_their_flattened_messages(fw, otlp, tmp_path) -> None:
    from flywheel_middleware.loop.datasets import export

    trace_id, question, answer = "0af7651916cd43dd8448eb211c80319c", "What is 2 + 3?", "2 + 3 = 5"
    call = {"id": "call_1", "name": "add", "arguments": '{"a": 2, "b": 3}'}
    workflow = {
        "traceloop.span.kind": "workflow",
        "traceloop.entity.name": "calc",
        "traceloop.entity.input": json.dumps(
            {"inputs": {"question": question}, "tags": [], "metadata": {}, "kwargs": {}}
        ),
        "traceloop.entity.output": json.dumps({"outputs": answer, "kwargs": {}}),
    }
    first = {
        "llm.request.type": "chat",
        "gen_ai.request.model": "gpt-ll",
        "gen_ai.response.model": "gpt-ll-0613",
        "gen_ai.prompt.0.role": "user",
        "gen_ai.prompt.0.content": question,
        "gen_ai.completion.0.role": "assistant",
        **{f"gen_ai.completion.0.tool_calls.0.{k}": v for k, v in call.items()},
        "gen_ai.usage.prompt_tokens": 9,
        "gen_ai.usage.completion_tokens": 5,
    }
    tool = {
        "traceloop.span.kind": "tool",
        "traceloop.entity.input": json.dumps({"args": [], "kwargs": {"a": 2, "b": 3}}),
        "traceloop.entity.output": "5",
    }
    second = {
        "llm.request.type": "chat",
        "gen_ai.request.model": "gpt-ll",
        "gen_ai.prompt.0.role": "user",
        "gen_ai.prompt.0.content": question,
        "gen_ai.prompt.1.role": "assistant",
        **{f"gen_ai.prompt.1.tool_calls.0.{k}": v for k, v in call.items()},
        "gen_ai.prompt.2.role": "tool",
        "gen_ai.prompt.2.content": "5",
        "gen_ai.prompt.2.tool_call_id": "call_1",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": answer,
        "gen_ai.usage.prompt_tokens": 20,
        "gen_ai.usage.completion_tokens": 6,
    }
    root = "0000000000000a01"
    spans = [  # the later model call has the smaller span id: order comes from start times
        json_span(trace_id, "f000000000000001", root, "openai.chat", 2, first),
        json_span(trace_id, "0000000000000b03", root, "add.tool", 8, tool),
        json_span(trace_id, "1000000000000002", root, "openai.chat", 12, second),
        json_span(trace_id, root, "", "calc.workflow", 0, workflow),
    ]
    body = json.dumps(json_body({"service.name": "calc-svc"}, spans))
    assert otlp.post("/v1/traces", content=body, headers=JSON).status_code == 200
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert rollout.workflow == "calc-svc" and (rollout.input_tokens, rollout.output_tokens) == (
        29,
        11,
    )
    assert json.loads(rollout.input) == [{"role": "user", "content": question}]
    assert json.loads(rollout.output) == [{"role": "assistant", "content": answer}]
    rows = fw.get_store().execute("SELECT * FROM span ORDER BY sequence")
    assert [(s.name, s.kind) for s in rows] == [
        ("calc.workflow", "chain"),
        ("openai.chat", "llm"),
        ("add.tool", "tool"),
        ("openai.chat", "llm"),
    ]
    assert rows[1].model == "gpt-ll-0613" and json.loads(rows[1].output) == [
        {"role": "assistant", "content": "", "tool_calls": [call]}
    ]
    assert not any(k.startswith("gen_ai.prompt.") for k in json.loads(rows[3].attributes or "{}"))
    export(fw.get_store(), "sft", "calc-svc", tmp_path / "sft.jsonl")
    [row] = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": call["arguments"]},
    }
    assert row["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [tool_call]},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
        {"role": "assistant", "content": answer},
    ]


def test_an_openinference_model_call_is_a_rollout_of_its_own(fw, otlp) -> None:
    trace_id = "a3ce929d0e0e47364bf92f3577b34da6"
    flat = {
        "openinference.span.kind": "LLM",
        "llm.model_name": "gpt-oi",
        "llm.input_messages.0.message.role": "system",
        "llm.input_messages.0.message.content": "Be brief.",
        "llm.input_messages.1.message.role": "user",
        "llm.input_messages.1.message.contents.0.message_content.type": "text",
        "llm.input_messages.1.message.contents.0.message_content.text": "Weather in Paris?",
        "llm.output_messages.0.message.role": "assistant",
        "llm.output_messages.0.message.tool_calls.0.tool_call.id": "c9",
        "llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "weather",
        "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": '{"city": "Paris"}',
        "llm.token_count.prompt": 14,
        "llm.token_count.completion": 7,
    }
    span = json_span(trace_id, "00000000000000c1", "", "ChatOpenAI", 0, flat)
    body = json.dumps(json_body({"service.name": "oi-svc"}, [span]))
    assert otlp.post("/v1/traces", content=body, headers=JSON).status_code == 200
    [rollout] = stored(fw, "SELECT * FROM rollout", 1)
    assert (rollout.input_tokens, rollout.output_tokens) == (14, 7)
    assert json.loads(rollout.input) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    call = {
        "id": "c9",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
    }
    assert json.loads(rollout.output) == [
        {"role": "assistant", "content": "", "tool_calls": [call]}
    ]
    [row] = fw.get_store().execute("SELECT kind, model FROM span")
    assert (row.kind, row.model) == ("llm", "gpt-oi")


@pytest.mark.parametrize(
    ("value", "role", "expected"),
    [
        ({"inputs": {"question": "q?"}, "tags": [], "metadata": {}, "kwargs": {}}, "user", "q?"),
        ({"outputs": {"text": "a."}, "kwargs": {}}, "assistant", "a."),
        ({"args": ["q?"], "kwargs": {}}, "user", "q?"),
        ({"args": [], "kwargs": {"query": "q?"}}, "user", "q?"),
    ],
)
def test_openllmetry_entity_values_read_as_messages(value, role, expected) -> None:
    from flywheel_middleware.messages import to_messages

    assert to_messages(value, role) == [{"role": role, "content": expected}]


def test_spans_that_cannot_be_taken_are_a_partial_success(fw, otlp) -> None:
    data = js_exporter_body("5b8efff798038103d269b633813fc60c")
    spans = data["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["spanId"] = "not-hex"
    spans[1]["traceId"] = "00000000000000000000000000000000"
    nul = {"gen_ai.tool.call.result": '{"text": "a\\u0000b"}'}  # no store keeps a NUL
    spans.append(
        json_span(spans[2]["traceId"], "00000000000000d1", spans[2]["spanId"], "t", 3, nul)
    )
    r = otlp.post("/v1/traces", content=json.dumps(data), headers=JSON)
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "3"
    assert "span 'execute_tool': span id must be 8 bytes" in partial["errorMessage"]
    assert "span 'chat gpt-js': trace id must be 16 bytes" in partial["errorMessage"]
    assert "span 't': a NUL character" in partial["errorMessage"]
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


def _nested(depth: int) -> bytes:
    value = {"stringValue": "x"}
    for _ in range(depth):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    span = json_span("5b8efff798038103d269b633813fc60c", "00f067aa0ba902b7", "", "n", 0, {})
    span["attributes"] = [{"key": "deep", "value": value}]
    return json.dumps(json_body({}, [span])).encode()


NESTED_TOO_DEEP = _nested(60)


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
        (JSON, NESTED_TOO_DEEP, 400, "Message too deep"),
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


def test_bodies_past_the_limit_are_413_compressed_or_not(fw, monkeypatch) -> None:
    from flywheel_middleware.service.app import create_app

    monkeypatch.setenv("FLYWHEEL_OTLP_MAX_BYTES", "4096")
    with TestClient(create_app(api_keys=[API_KEY])) as client:
        bomb = gzip.compress(b"\0" * 1_000_000)  # 1 MB of zeros in about 1 kB
        headers = {**PROTOBUF, "Content-Encoding": "gzip"}
        r = client.post("/v1/traces", content=bomb, headers=headers)
        assert r.status_code == 413
        assert (
            "larger than 4096 bytes once decompressed"
            in status_pb2.Status.FromString(r.content).message
        )
        r = client.post("/v1/traces", content=b"\0" * 5000, headers=JSON)
        assert r.status_code == 413 and "the limit is 4096" in r.json()["message"]


def test_long_values_fit_their_columns_on_sqlite_and_postgresql(fw_any, monkeypatch) -> None:
    from flywheel_middleware.service.app import create_app

    monkeypatch.setenv("FLYWHEEL_OTLP_SETTLE", "0")
    trace_id = "6e0c63257de34c926f9efcd03974a7b1"
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m" * 300,
        "flywheel.workflow": "w" * 300,
        "user.id": "u" * 300,
        "gen_ai.usage.input_tokens": 3,
    }
    span = json_span(trace_id, "00000000000000e1", "", "n" * 700, 0, attrs)
    body = json.dumps(json_body({"service.name": "s"}, [span]))
    with TestClient(create_app(api_keys=[API_KEY])) as client:
        assert client.post("/v1/traces", content=body, headers=JSON).status_code == 200
        [rollout] = stored(fw_any, "SELECT * FROM rollout", 1)
    assert (rollout.id, rollout.workflow, rollout.user_id) == (trace_id, "w" * 200, "u" * 200)
    [row] = fw_any.get_store().execute("SELECT name, model, workflow FROM span")
    assert (row.name, row.model, row.workflow) == ("n" * 500, "m" * 200, "w" * 200)


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
