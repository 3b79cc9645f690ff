"""The loopback OpenAI server answers the real ``openai`` SDK on every endpoint we use."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Literal

import openai
import pytest

from flywheel_middleware.testing.openai_server import OpenAIServer, Reply


def test_chat_plain_and_usage(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    out = client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hello there"}]
    )
    assert out.choices[0].message.content == "echo: hello there"
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 3
    assert openai_server.requests[-1].body["model"] == "m1"


def test_chat_stream_with_and_without_usage(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    openai_server.enqueue("one two three")
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert all(c.choices for c in chunks)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 1


def test_tool_calls_and_errors(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    openai_server.enqueue(
        Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 1}}]),
        Reply(status=429, error="slow down"),
    )
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and call.function.arguments == '{"a": 1}'
    with pytest.raises(openai.RateLimitError, match="slow down"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_responses_plain_and_stream(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    openai_server.set_responder(lambda req: f"R:{req.last_user_text()}")
    resp = client.responses.create(model="m", input="hi you")
    assert resp.output_text == "R:hi you" and resp.usage.input_tokens == 2
    events = list(client.responses.create(model="m", input="a b", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "R:a b"
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.output_tokens == 2


def test_embeddings_float_and_base64(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    default = client.embeddings.create(model="e", input=["a", "b"])  # SDK asks for base64
    floats = client.embeddings.create(model="e", input=["a", "b"], encoding_format="float")
    assert len(default.data) == 2 and len(default.data[0].embedding) == 8
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-5)
    assert default.data[0].embedding != default.data[1].embedding


def test_counts_concurrent_requests() -> None:
    with OpenAIServer() as server:
        server.delay = 0.2
        client = server.client()

        def call() -> None:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.max_in_flight == 4 and len(server.requests) == 4


def test_async_client_stream(openai_server: OpenAIServer) -> None:
    async def main() -> str:
        client = openai_server.async_client()
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "async hi"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(main()) == "echo: async hi"


def test_structured_outputs_fit_the_schema(openai_server: OpenAIServer) -> None:
    from pydantic import BaseModel

    class Item(BaseModel):
        name: str
        count: int
        score: float
        ok: bool
        kind: Literal["a", "b"]
        note: str | None

    class Order(BaseModel):
        items: list[Item]
        total: int

    client = openai_server.client()
    messages = [{"role": "user", "content": "two words"}]
    chat = client.chat.completions.parse(model="m", messages=messages, response_format=Order)
    item = Item(
        name="echo: two words", count=3, score=3.0, ok=True, kind="a", note="echo: two words"
    )
    assert chat.choices[0].message.parsed == Order(items=[item], total=3)
    resp = client.responses.parse(model="m", input="two words", text_format=Order)
    assert resp.output_parsed == Order(items=[item], total=3)
    raw = client.chat.completions.create(
        model="m", messages=messages, response_format={"type": "json_object"}
    )
    assert json.loads(raw.choices[0].message.content) == {"answer": "echo: two words"}
    openai_server.enqueue('{"items": [], "total": 0}')  # a scripted answer is sent as given
    chat = client.chat.completions.parse(model="m", messages=messages, response_format=Order)
    assert chat.choices[0].message.parsed == Order(items=[], total=0)


def test_refusal(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    openai_server.enqueue(Reply(refusal="no can do"), Reply(refusal="no can do"))
    messages = [{"role": "user", "content": "x"}]
    out = client.chat.completions.create(model="m", messages=messages)
    assert out.choices[0].message.refusal == "no can do"
    assert out.choices[0].message.content is None
    with client.chat.completions.stream(model="m", messages=messages) as stream:
        types = [e.type for e in stream]
    assert "refusal.done" in types
    assert stream.get_final_completion().choices[0].message.refusal == "no can do"


def test_responses_stream_function_call_events(openai_server: OpenAIServer) -> None:
    client = openai_server.client()
    openai_server.enqueue(
        Reply(content="calling", tool_calls=[{"name": "add", "arguments": {"a": 1}}])
    )
    with client.responses.stream(model="m", input="x") as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types.count("response.output_item.added") == 2
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"a": 1}' and done.output_index == 1
    final = stream.get_final_response()
    assert final.output_text == "calling" and final.output[1].name == "add"
