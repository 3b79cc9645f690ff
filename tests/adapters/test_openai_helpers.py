"""wrap_openai and the SDK's helpers: ``parse`` (structured outputs), the ``.stream()`` context
managers, and clients derived with ``with_options()`` / ``copy()`` — real SDK, loopback HTTP.

Errors, concurrency and a broken store are checked for each of these entry points by the
contract suite (test_openai_contract.py); this module checks what each one records."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import openai
import pytest
from flywheel_middleware.adapters.openai import wrap_openai
from openai.lib.streaming.chat import ChatCompletionStreamManager
from pydantic import BaseModel

from flywheel_middleware.testing.openai_server import OpenAIServer, Reply

MSGS = [{"role": "user", "content": "solve this"}]


class Step(BaseModel):
    explanation: str
    words: int


class Answer(BaseModel):
    steps: list[Step]
    final: str


# The server fills every string of the schema with the echo text and every integer with its
# word count, so the expected answer is known.
EXPECTED = Answer(steps=[Step(explanation="echo: solve this", words=3)], final="echo: solve this")
ANSWER_JSON = json.dumps(EXPECTED.model_dump())
OUT = len(ANSWER_JSON.split())  # the server counts whitespace-separated words as tokens
_VOLATILE = {"id", "created", "created_at", "item_id"}


def scrub(value: Any) -> Any:
    """A comparable dump: ids and timestamps (which the server numbers per request) removed."""
    if isinstance(value, BaseModel):
        value = value.model_dump(warnings=False)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def clients(server: OpenAIServer, workflow: str, *, is_async: bool = False, **options: Any):
    make = server.async_client if is_async else server.client
    return make(), wrap_openai(make(), workflow=workflow, **options)


# -- parse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["chat", "beta.chat"])
def test_chat_parse(openai_server: OpenAIServer, captured, path: str) -> None:
    plain, wrapped = clients(openai_server, "parse")

    def parse(client: Any, **kwargs: Any) -> Any:
        completions = (
            client.beta.chat.completions if path == "beta.chat" else client.chat.completions
        )
        return completions.parse(model="gpt-p", messages=MSGS, response_format=Answer, **kwargs)

    expect = parse(plain)
    got = parse(wrapped, temperature=0.2, flywheel={"user_id": "u1", "tags": ["t"]})
    assert got.choices[0].message.parsed == EXPECTED
    assert isinstance(got, type(expect))
    assert scrub(got) == scrub(expect)
    body = openai_server.requests[-1].body
    assert body["response_format"]["json_schema"]["name"] == "Answer"
    assert "flywheel" not in body and "user_id" not in body
    [c] = captured("parse")
    assert c.rollout.user_id == "u1" and c.rollout.tags == ["t"]
    [span] = c.spans
    assert span.kind == "llm" and span.name == "chat.completions" and span.model == "gpt-p"
    assert (span.input_tokens, span.output_tokens) == (2, OUT)
    assert span.input == MSGS
    assert span.output == {"role": "assistant", "content": ANSWER_JSON}
    assert span.attributes["helper"] == "parse"
    assert span.attributes["invocation_params"] == {"response_format": "Answer", "temperature": 0.2}


def test_responses_parse(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "rparse")
    kwargs = {"model": "gpt-r", "input": "solve this", "instructions": "be exact"}
    expect = plain.responses.parse(text_format=Answer, **kwargs)
    got = wrapped.responses.parse(text_format=Answer, user_id="u2", **kwargs)
    assert got.output_parsed == EXPECTED and scrub(got) == scrub(expect)
    [c] = captured("rparse")
    [span] = c.spans
    assert c.rollout.user_id == "u2"
    assert span.input == {"instructions": "be exact", "input": "solve this"}
    assert span.output[0]["content"][0]["text"] == ANSWER_JSON
    assert (span.input_tokens, span.output_tokens) == (4, OUT)
    assert span.attributes["invocation_params"] == {"text_format": "Answer"}


def test_async_parse(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "aparse", is_async=True)

    async def main(client: Any) -> tuple[Any, Any]:
        chat = await client.chat.completions.parse(model="m", messages=MSGS, response_format=Answer)
        resp = await client.responses.parse(model="m", input="solve this", text_format=Answer)
        return chat, resp

    expect, got = asyncio.run(main(plain)), asyncio.run(main(wrapped))
    assert got[0].choices[0].message.parsed == EXPECTED and got[1].output_parsed == EXPECTED
    assert [scrub(x) for x in got] == [scrub(x) for x in expect]
    chat, resp = captured("aparse")
    assert chat.spans[0].output["content"] == ANSWER_JSON
    assert resp.spans[0].output[0]["content"][0]["text"] == ANSWER_JSON
    assert [c.spans[0].attributes["helper"] for c in (chat, resp)] == ["parse", "parse"]
    assert all(c.spans[0].output_tokens == OUT for c in (chat, resp))


def test_parse_refusal(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="refuse")
    openai_server.enqueue(Reply(refusal="I can't help with that"))
    out = client.chat.completions.parse(model="m", messages=MSGS, response_format=Answer)
    message = out.choices[0].message
    assert message.parsed is None and message.refusal == "I can't help with that"
    [c] = captured("refuse")
    assert c.spans[0].output == {
        "role": "assistant",
        "content": None,
        "refusal": "I can't help with that",
    }


def test_parse_with_raw_response_passes_through(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="raw")
    raw = client.chat.completions.with_raw_response.parse(
        model="m", messages=MSGS, response_format=Answer
    )
    assert raw.parse().choices[0].message.parsed == EXPECTED
    assert captured("raw") == []


# -- .stream() helpers ----------------------------------------------------------------------------


def _chat_events(client: Any, **kwargs: Any) -> tuple[list[Any], Any]:
    with client.chat.completions.stream(model="gpt-s", messages=MSGS, **kwargs) as stream:
        events = list(stream)
    return events, stream.get_final_completion()


def test_chat_stream_helper(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "chelper")
    expect, expect_final = _chat_events(plain)
    got, final = _chat_events(wrapped, flywheel={"session_id": "s1"})
    assert [e.type for e in got] == [e.type for e in expect]
    assert [scrub(e) for e in got] == [scrub(e) for e in expect]
    assert scrub(final) == scrub(expect_final) and final.usage is None
    body = openai_server.requests[-1].body
    assert body["stream_options"] == {"include_usage": True} and "flywheel" not in body
    assert not any(k.lower().startswith("x-flywheel") for k in openai_server.requests[-1].headers)
    [c] = captured("chelper")
    assert c.rollout.session_id == "s1"
    [span] = c.spans
    assert span.kind == "llm" and span.model == "gpt-s" and span.status == "ok"
    assert (span.input_tokens, span.output_tokens) == (2, 3)
    assert span.input == MSGS
    assert span.output == {"role": "assistant", "content": "echo: solve this"}
    assert span.attributes["helper"] == "stream" and span.attributes["stream"] is True
    assert 0 <= span.attributes["time_to_first_token_ms"] <= span.duration_ms
    assert span.attributes.get("invocation_params") is None, "the SDK's unset arguments leaked"


def test_beta_chat_stream_helper(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="beta")
    with client.beta.chat.completions.stream(model="m", messages=MSGS, user_id="u5") as stream:
        assert [e.type for e in stream][-1] == "content.done"
    [c] = captured("beta")
    [span] = c.spans
    assert c.rollout.user_id == "u5" and span.attributes["helper"] == "stream"
    assert span.output == {"role": "assistant", "content": "echo: solve this"}


def test_chat_stream_helper_structured_and_usage_kept(
    openai_server: OpenAIServer, captured
) -> None:
    plain, wrapped = clients(openai_server, "cstruct")
    opts = {"response_format": Answer, "stream_options": {"include_usage": True}}
    expect, expect_final = _chat_events(plain, **opts)
    got, final = _chat_events(wrapped, **opts)
    assert [scrub(e) for e in got] == [scrub(e) for e in expect]
    assert final.choices[0].message.parsed == EXPECTED and final.usage.completion_tokens == OUT
    [c] = captured("cstruct")
    assert c.spans[0].output["content"] == ANSWER_JSON and c.spans[0].output_tokens == OUT


def test_chat_stream_helper_stays_an_sdk_manager(openai_server: OpenAIServer) -> None:
    client = wrap_openai(openai_server.client())
    manager = client.chat.completions.stream(model="m", messages=MSGS)
    assert isinstance(manager, ChatCompletionStreamManager)
    with manager as stream:
        assert stream.get_final_completion().choices[0].message.content == "echo: solve this"


def test_stream_helper_left_early_ends_the_span(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="early")
    openai_server.enqueue("one two three four five")
    with client.chat.completions.stream(model="m", messages=MSGS) as stream:
        for event in stream:
            if event.type == "content.delta" and event.delta:
                break
    # ``stream`` is still referenced: the span ended when the ``with`` block was left
    [c] = captured("early")
    assert c.rollout.status == "succeeded"
    [span] = c.spans
    assert span.ended_at is not None and span.status == "ok"
    assert span.output == {"role": "assistant", "content": "one"}
    assert "time_to_first_token_ms" in span.attributes
    assert stream is not None


def test_async_chat_stream_helper(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "achelper", is_async=True)

    async def main(client: Any, **kwargs: Any) -> tuple[list[Any], Any]:
        async with client.chat.completions.stream(model="m", messages=MSGS, **kwargs) as stream:
            events = [e async for e in stream]
        return events, await stream.get_final_completion()

    expect, expect_final = asyncio.run(main(plain))
    got, final = asyncio.run(main(wrapped, user_id="u9"))
    assert [scrub(e) for e in got] == [scrub(e) for e in expect]
    assert scrub(final) == scrub(expect_final)
    [c] = captured("achelper")
    assert c.rollout.user_id == "u9"
    span = c.spans[0]
    assert (span.input_tokens, span.output_tokens) == (2, 3)
    assert span.output["content"] == "echo: solve this"
    assert span.attributes["helper"] == "stream" and "time_to_first_token_ms" in span.attributes


def _response_events(client: Any, **kwargs: Any) -> tuple[list[Any], Any]:
    with client.responses.stream(model="gpt-r", input="solve this", **kwargs) as stream:
        events = list(stream)
    return events, stream.get_final_response()


def test_responses_stream_helper(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "rhelper")
    expect, expect_final = _response_events(plain, text_format=Answer)
    got, final = _response_events(wrapped, text_format=Answer, flywheel={"user_id": "u3"})
    assert [scrub(e) for e in got] == [scrub(e) for e in expect]
    assert final.output_parsed == EXPECTED and scrub(final) == scrub(expect_final)
    [c] = captured("rhelper")
    assert c.rollout.user_id == "u3"
    [span] = c.spans
    assert span.model == "gpt-r" and (span.input_tokens, span.output_tokens) == (2, OUT)
    assert span.input == "solve this"
    assert span.output[0]["content"][0]["text"] == ANSWER_JSON
    assert span.attributes["helper"] == "stream"
    assert span.attributes["time_to_first_token_ms"] >= 0
    assert span.attributes["invocation_params"]["text"]["format"]["name"] == "Answer"


def test_responses_stream_helper_tool_call(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "rtool")
    tool = Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 1, "b": 2}}])
    openai_server.enqueue(tool, tool)
    expect, _ = _response_events(plain)
    got, final = _response_events(wrapped)
    assert [scrub(e) for e in got] == [scrub(e) for e in expect]
    assert "response.function_call_arguments.delta" in [e.type for e in got]
    assert final.output[0].name == "add"
    [c] = captured("rtool")
    span = c.spans[0]
    assert span.output[0]["arguments"] == '{"a": 1, "b": 2}'
    assert "time_to_first_token_ms" in span.attributes


def test_async_responses_stream_helper(openai_server: OpenAIServer, captured) -> None:
    plain, wrapped = clients(openai_server, "arhelper", is_async=True)

    async def main(client: Any) -> tuple[list[Any], Any]:
        async with client.responses.stream(model="m", input="solve this") as stream:
            events = [e async for e in stream]
        return events, await stream.get_final_response()

    (expect, expect_final), (got, final) = asyncio.run(main(plain)), asyncio.run(main(wrapped))
    assert [scrub(e) for e in got] == [scrub(e) for e in expect]
    assert scrub(final) == scrub(expect_final)
    [c] = captured("arhelper")
    assert c.spans[0].output_tokens == 3 and c.spans[0].attributes["helper"] == "stream"


def test_stream_helper_applies_config(fw, sqlite_url, openai_server: OpenAIServer, captured):
    fw.configure(
        store_url=sqlite_url,
        config={
            "workflows": {
                "cfg": {"config": {"llm": {"max_tokens": 64}, "prompt": {"system": "Tuned."}}}
            }
        },
    )
    client = wrap_openai(openai_server.client(), workflow="cfg", apply_config=True)
    messages = copy.deepcopy(MSGS)
    with client.chat.completions.stream(model="m", messages=messages) as stream:
        list(stream)
    body = openai_server.requests[-1].body
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
    assert body["messages"][0] == {"role": "system", "content": "Tuned."}
    assert messages == MSGS
    client.chat.completions.parse(model="m", messages=messages, response_format=Answer)
    assert openai_server.requests[-1].body["max_tokens"] == 64


def test_capture_content_off_for_helpers(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="private", capture_content=False)
    client.chat.completions.parse(model="m", messages=MSGS, response_format=Answer)
    with client.responses.stream(model="m", input="secret") as stream:
        list(stream)
    for c in captured("private"):
        [span] = c.spans
        assert span.input is None and span.output is None and span.output_tokens
        assert c.rollout.input is None and c.rollout.output is None


# -- derived clients ------------------------------------------------------------------------------


def test_with_options_and_copy_stay_wrapped(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="derived", capture_content=False)
    derived = client.with_options(timeout=5.0, max_retries=1)
    copied = client.copy(default_headers={"X-Team": "a"})
    assert derived is not client and derived.max_retries == 1 and derived.timeout == 5.0
    derived.chat.completions.create(model="m", messages=MSGS)
    copied.embeddings.create(model="e", input="x")
    headers = {k.lower(): v for k, v in openai_server.requests[-1].headers.items()}
    assert headers["x-team"] == "a"
    derived.with_options(timeout=3.0).responses.create(model="m", input="y")
    spans = [c.spans[0] for c in captured("derived")]
    assert [s.kind for s in spans] == ["llm", "embedding", "llm"]
    assert all(s.input is None for s in spans), "the derived client lost capture_content=False"
    assert client.with_options(timeout=1.0).with_options is not None


def test_async_with_options_stays_wrapped(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.async_client(), workflow="aderived")

    async def main() -> Any:
        derived = client.with_options(timeout=5.0)
        assert isinstance(derived, openai.AsyncOpenAI)
        return await derived.chat.completions.create(model="m", messages=MSGS, user_id="u4")

    out = asyncio.run(main())
    assert out.choices[0].message.content == "echo: solve this"
    [c] = captured("aderived")
    assert c.rollout.user_id == "u4" and c.spans[0].output_tokens == 3


def test_apply_config_survives_with_options(fw, sqlite_url, openai_server: OpenAIServer):
    fw.configure(
        store_url=sqlite_url,
        config={"workflows": {"cfg": {"config": {"llm": {"temperature": 0.9}}}}},
    )
    client = wrap_openai(openai_server.client(), workflow="cfg", apply_config=True)
    client.with_options(timeout=5.0).chat.completions.create(
        model="m", messages=MSGS, temperature=0.1
    )
    assert openai_server.requests[-1].body["temperature"] == 0.9


# -- the SDK's unset sentinels --------------------------------------------------


def test_sdk_sentinels_are_not_recorded(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="omit")
    client.chat.completions.create(
        model="m", messages=MSGS, temperature=openai.omit, top_p=openai.NOT_GIVEN, seed=3
    )
    client.responses.create(model="m", input="x", instructions=openai.omit)
    chat, resp = captured("omit")
    assert chat.spans[0].attributes["invocation_params"] == {"seed": 3}
    assert resp.spans[0].input == "x"
