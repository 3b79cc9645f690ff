"""wrap_openai on the real openai SDK talking HTTP (SSE included) to a loopback server."""

from __future__ import annotations

import asyncio
import copy
import threading

import openai
import pytest
from flywheel_middleware.adapters.openai import wrap_openai

from flywheel_middleware.testing.openai_server import OpenAIServer, Reply

MSGS = [{"role": "user", "content": "hello world"}]


def test_chat_plain(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="qa")
    out = client.chat.completions.create(
        model="gpt-x", messages=MSGS, temperature=0.3, flywheel={"user_id": "u1"}
    )
    assert out.choices[0].message.content == "echo: hello world"
    sent = openai_server.requests[-1].body
    assert "flywheel" not in sent and sent["temperature"] == 0.3
    [c] = captured("qa")
    assert c.rollout.user_id == "u1" and c.rollout.status == "succeeded"
    [span] = c.spans
    assert span.kind == "llm" and span.model == "gpt-x"
    assert (span.input_tokens, span.output_tokens) == (2, 3)
    assert span.input == MSGS and span.output["content"] == "echo: hello world"
    assert span.attributes["invocation_params"] == {"temperature": 0.3}


def test_chat_stream_hides_the_usage_chunk_it_asked_for(openai_server: OpenAIServer, captured):
    plain = openai_server.client()
    wrapped = wrap_openai(openai_server.client(), workflow="s")
    openai_server.enqueue("a b c", "a b c")
    expect = [
        c.model_dump() for c in plain.chat.completions.create(model="m", messages=MSGS, stream=True)
    ]
    got = [
        c.model_dump()
        for c in wrapped.chat.completions.create(model="m", messages=MSGS, stream=True)
    ]
    for chunk in expect + got:
        chunk.pop("id"), chunk.pop("created"), chunk.pop("usage", None)
    assert got == expect
    assert openai_server.requests[-1].body["stream_options"] == {"include_usage": True}
    [c] = captured("s")
    [span] = c.spans
    assert (span.input_tokens, span.output_tokens) == (2, 3)
    assert span.output == {"role": "assistant", "content": "a b c"}
    assert span.attributes["time_to_first_token_ms"] >= 0


def test_stream_usage_requested_by_caller_is_kept(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="s")
    options = {"include_usage": True}
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MSGS, stream=True, stream_options=options
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert options == {"include_usage": True}
    [c] = captured("s")
    assert c.spans[0].output_tokens == 3


@pytest.mark.parametrize("asked", [False, True], ids=["caller-silent", "caller-asks"])
def test_stream_usage_off_sends_the_request_as_written(openai_server, captured, asked) -> None:
    """``stream_usage=False``: no ``stream_options`` is added; the caller sees what an
    unwrapped client sees; tokens are recorded only from a usage chunk the caller asked for."""
    extra = {"stream_options": {"include_usage": True}} if asked else {}
    plain = openai_server.client()
    wrapped = wrap_openai(openai_server.client(), workflow="su", stream_usage=False)
    openai_server.enqueue("a b c", "a b c")
    expect = [c.model_dump() for c in plain.chat.completions.create(
        model="m", messages=MSGS, stream=True, **extra)]  # fmt: skip
    got = [c.model_dump() for c in wrapped.chat.completions.create(
        model="m", messages=MSGS, stream=True, **extra)]  # fmt: skip
    assert openai_server.requests[-1].body.get("stream_options") == extra.get("stream_options")
    for chunk in expect + got:
        chunk.pop("id"), chunk.pop("created")
    assert got == expect
    [c] = captured("su")
    [span] = c.spans
    tokens = (2, 3) if asked else (None, None)
    assert (span.input_tokens, span.output_tokens) == tokens
    assert span.output == {"role": "assistant", "content": "a b c"}


def test_stream_usage_off_is_kept_by_derived_clients(openai_server, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="su2", stream_usage=False)
    list(client.with_options(timeout=5).chat.completions.create(
        model="m", messages=MSGS, stream=True))  # fmt: skip
    assert "stream_options" not in openai_server.requests[-1].body
    assert captured("su2")[0].spans[0].output == {
        "role": "assistant",
        "content": "echo: hello world",
    }


def test_callers_dicts_are_not_mutated(openai_server: OpenAIServer) -> None:
    client = wrap_openai(openai_server.client())
    messages = [{"role": "user", "content": "x"}]
    options = {"include_obfuscation": False}
    fly = {"user_id": "u"}
    before = copy.deepcopy((messages, options, fly))
    list(
        client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options=options, flywheel=fly
        )
    )
    assert (messages, options, fly) == before
    assert openai_server.requests[-1].body["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }


def test_error_recorded_and_reraised_unchanged(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="e")
    openai_server.enqueue(Reply(status=400, error="bad model"))
    with pytest.raises(openai.BadRequestError, match="bad model") as info:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert info.value.status_code == 400
    [c] = captured("e")
    assert c.rollout.status == "failed"
    assert c.spans[0].status == "error" and c.spans[0].error.startswith("BadRequestError")


def test_responses_plain_and_stream(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="r")
    resp = client.responses.create(model="m", input="one two", instructions="be nice")
    assert resp.output_text == "echo: one two"
    events = list(client.responses.create(model="m", input="three", stream=True))
    assert events[-1].type == "response.completed"
    first, second = captured("r")
    assert first.spans[0].input == {"instructions": "be nice", "input": "one two"}
    assert (first.spans[0].input_tokens, first.spans[0].output_tokens) == (4, 3)
    assert second.spans[0].output_tokens == 2 and second.spans[0].attributes["stream"] is True
    assert second.spans[0].output[0]["content"][0]["text"] == "echo: three"


def test_embeddings(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="emb")
    out = client.embeddings.create(model="e", input=["a b", "c"])
    assert len(out.data) == 2
    [c] = captured("emb")
    span = c.spans[0]
    assert span.kind == "embedding" and span.input_tokens == 3
    assert span.output == {"count": 2, "dimensions": 8}


def test_with_raw_response_passes_through(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.client(), workflow="raw")
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MSGS)
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content == "echo: hello world"
    assert captured("raw") == []


def test_attaches_to_active_rollout_and_threads(fw, openai_server: OpenAIServer, captured):
    client = wrap_openai(openai_server.client(), workflow="ignored")
    openai_server.delay = 0.05
    with fw.rollout("outer") as r, fw.span("agent", kind="agent") as parent:
        client.chat.completions.create(model="m", messages=MSGS)
    results = {}

    def call(i: int) -> None:
        msgs = [{"role": "user", "content": f"q{i}"}]
        results[i] = client.chat.completions.create(model="m", messages=msgs, user_id=f"u{i}")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert openai_server.max_in_flight > 1
    [c] = captured("outer")
    assert c.rollout.id == r.id
    assert c.by_name("chat.completions").parent_id == parent.id
    rest = captured("ignored")
    assert sorted(x.rollout.user_id for x in rest) == [f"u{i}" for i in range(6)]
    for x in rest:
        i = x.rollout.user_id[1:]
        assert x.spans[0].output["content"] == f"echo: q{i}"


def test_call_outside_a_rollout_is_queued_whole(
    fw, openai_server: OpenAIServer, monkeypatch, captured
) -> None:
    """A call outside any rollout is one packed call record on the queue (no rollout handle,
    no second record); its input is the list of messages as it was when the call was made,
    even if the caller adds to it while the answer streams in. Inside a rollout, or resolving
    a config, it is a span of its own as before."""
    from flywheel_middleware import runtime
    from flywheel_middleware.capture.handles import RolloutHandle, SpanHandle

    recorder = runtime.get_recorder()
    queued: list = []
    enqueue = recorder.enqueue
    monkeypatch.setattr(recorder, "enqueue", lambda item: (queued.append(item), enqueue(item)))
    client = wrap_openai(openai_server.client(), workflow="whole")
    messages = [{"role": "user", "content": "first"}]
    client.chat.completions.create(model="m", messages=messages, flywheel={"tags": ["t"]})
    stream = client.chat.completions.create(model="m", messages=messages, stream=True)
    messages.append({"role": "assistant", "content": ""})  # the caller goes on as it streams
    for chunk in stream:
        messages[-1]["content"] += chunk.choices[0].delta.content or ""
    assert [item.__class__ for item in queued] == [bytes, bytes]
    calls = captured("whole")
    assert [c.spans[0].input for c in calls] == [[{"role": "user", "content": "first"}]] * 2
    assert [c.rollout.tags for c in calls] == [["t"], None]
    assert calls[1].spans[0].attributes["stream"] is True
    assert (calls[1].rollout.input_tokens, calls[1].rollout.output_tokens) == (1, 2)

    queued.clear()
    with fw.rollout("outer"):
        client.chat.completions.create(model="m", messages=messages)
    configured = wrap_openai(openai_server.client(), workflow="whole", apply_config=True)
    configured.chat.completions.create(model="m", messages=messages)
    kinds = [item.__class__ for item in queued]
    assert kinds == [SpanHandle, RolloutHandle, SpanHandle, RolloutHandle]


def test_call_is_mirrored_to_an_otel_sdk_when_asked(
    openai_server: OpenAIServer, captured, otel_sdk
):
    """With mirroring on, a call outside any rollout opens its rollout, so OTel sees its
    workflow and model spans; with it off (the default) the SDK gets nothing."""
    from flywheel_middleware.capture import otel_mirror

    client = wrap_openai(openai_server.client(), workflow="mirrored")
    client.chat.completions.create(model="gpt-x", messages=MSGS)
    assert otel_sdk.finished() == []
    otel_mirror.set_enabled(True)
    client.chat.completions.create(model="gpt-x", messages=MSGS)
    list(client.chat.completions.create(model="gpt-x", messages=MSGS, stream=True))
    exporter = otel_sdk.exporter
    names = [s.name for s in exporter.get_finished_spans()]
    assert sorted(names) == ["chat.completions"] * 2  # each call is its trace's one span
    model = next(s for s in exporter.get_finished_spans() if s.name == "chat.completions")
    assert model.attributes["gen_ai.usage.output_tokens"] == 3
    assert [c.spans[0].output_tokens for c in captured("mirrored")] == [3, 3, 3]


def test_async_client_plain_and_stream(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.async_client(), workflow="a")

    async def main():
        out = await client.chat.completions.create(model="m", messages=MSGS)
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        chunks = [c async for c in stream]
        return out, chunks

    out, chunks = asyncio.run(main())
    assert out.choices[0].message.content == "echo: hello world"
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hello world"
    spans = [x.spans[0] for x in captured("a")]
    assert [s.output_tokens for s in spans] == [3, 3]
    assert spans[1].output["content"] == "echo: hello world"


def test_stream_stays_an_sdk_stream_and_early_close_ends_span(
    openai_server: OpenAIServer, captured
) -> None:
    client = wrap_openai(openai_server.client(), workflow="close")
    openai_server.enqueue("one two three four")
    with client.chat.completions.create(model="m", messages=MSGS, stream=True) as stream:
        assert isinstance(stream, openai.Stream)
        assert stream.response.status_code == 200
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
    [c] = captured("close")
    assert c.spans[0].ended_at is not None and c.rollout.status == "succeeded"


def test_async_responses_stream_and_embeddings(openai_server: OpenAIServer, captured) -> None:
    client = wrap_openai(openai_server.async_client(), workflow="ar")

    async def main():
        stream = await client.responses.create(model="m", input="x y", stream=True)
        assert isinstance(stream, openai.AsyncStream)
        events = [e async for e in stream]
        emb = await client.embeddings.create(model="e", input="a")
        return events, emb

    events, emb = asyncio.run(main())
    assert events[-1].type == "response.completed" and len(emb.data) == 1
    first, second = captured("ar")
    assert first.spans[0].output_tokens == 3 and first.spans[0].kind == "llm"
    assert second.spans[0].kind == "embedding" and second.spans[0].input_tokens == 1


def test_apply_config_overrides_params_and_system_prompt(
    fw, sqlite_url, openai_server: OpenAIServer, captured
) -> None:
    fw.configure(
        store_url=sqlite_url,
        config={
            "workflows": {
                "cfg": {
                    "config": {
                        "llm": {"model": "gpt-tuned", "temperature": 0.9, "max_tokens": 64},
                        "prompt": {"system": "Tuned system.", "system_suffix": "Be brief."},
                    }
                }
            }
        },
    )
    client = wrap_openai(openai_server.client(), workflow="cfg", apply_config=True)
    messages = [{"role": "system", "content": "Original."}, {"role": "user", "content": "hi"}]
    before = copy.deepcopy(messages)
    client.chat.completions.create(model="gpt-base", messages=messages, temperature=0.1)
    body = openai_server.requests[-1].body
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-tuned", 0.9, 64)
    assert body["messages"][0] == {"role": "system", "content": "Tuned system.\nBe brief."}
    assert messages == before, "the caller's messages were changed"
    client.responses.create(model="gpt-base", input="hi")
    body = openai_server.requests[-1].body
    assert body["instructions"] == "Tuned system.\nBe brief." and body["max_output_tokens"] == 64
    first, _ = captured("cfg")
    assert first.spans[0].model == "gpt-tuned"
    assert first.spans[0].input[0]["content"] == "Tuned system.\nBe brief."
    # without apply_config the request is untouched
    plain = wrap_openai(openai_server.client(), workflow="cfg")
    plain.chat.completions.create(model="gpt-base", messages=messages)
    assert openai_server.requests[-1].body["messages"] == before


# -- what a chat stream's caller sees, when the wrapper asks for usage --------------------------


def _view(chunk) -> dict:
    """Every public view of a chunk, with its id and time (numbered per request) made equal:
    what a caller may serialise or compare, unset fields left out or not."""
    same = chunk.model_copy(update={"id": "x", "created": 0})  # keeps the set fields
    return {
        "model_fields_set": sorted(chunk.model_fields_set),
        "to_dict": same.to_dict(),
        "to_json": same.to_json(),
        "exclude_unset": same.model_dump_json(exclude_unset=True),
        "model_dump": same.model_dump(),
        "usage": chunk.usage,
        "object": same,  # pydantic's ``==``: values and extras
    }


def _stream_dicts(client: openai.OpenAI, **kwargs) -> list[dict]:
    """The public views of every chunk a chat stream gives its caller."""
    stream = client.chat.completions.create(model="m", messages=MSGS, stream=True, **kwargs)
    return [_view(chunk) for chunk in stream]


async def _astream_dicts(client: openai.AsyncOpenAI, **kwargs) -> list[dict]:
    stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True, **kwargs)
    return [_view(chunk) async for chunk in stream]


_ASKS = {"stream_options": {"include_usage": True}}


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("asked", [False, True], ids=["caller-silent", "caller-asks"])
def test_chat_stream_chunks_are_the_unwrapped_ones_field_for_field(
    openai_server: OpenAIServer, captured, asked: bool, is_async: bool
) -> None:
    """The caller gets the chunks an unwrapped client gets, in every public view.

    Caller silent: the wrapper asks for usage, so the server sends a usage-only chunk (not
    passed on) and ``"usage": null`` in every other chunk; ``usage`` is still not among a
    chunk's set fields, nor in ``to_dict()`` / ``to_json()``. Caller asks: the request is
    theirs and every chunk, the usage one included, is passed on as it is."""
    extra = _ASKS if asked else {}
    openai_server.enqueue("a b", "a b")
    if is_async:
        plain, wrapped = openai_server.async_client(), openai_server.async_client()
        wrap_openai(wrapped, workflow="f")

        async def main():
            return await _astream_dicts(plain, **extra), await _astream_dicts(wrapped, **extra)

        expect, got = asyncio.run(main())
    else:
        plain, wrapped = openai_server.client(), wrap_openai(openai_server.client(), workflow="f")
        expect, got = _stream_dicts(plain, **extra), _stream_dicts(wrapped, **extra)
    sent_plain, sent = (r.body for r in openai_server.requests[-2:])
    assert sent_plain.get("stream_options") == extra.get("stream_options")
    assert sent["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in sent_plain.items() if k != "stream_options"
    }
    assert got == expect
    assert len(got) == (5 if asked else 4)  # role, "a", " b", finish (, usage)
    if asked:
        assert got[-1]["usage"].completion_tokens == 2 and got[-1]["to_dict"]["choices"] == []
        assert all("usage" in view["model_fields_set"] for view in got)
    else:
        assert all(view["to_dict"]["choices"] for view in got)
        assert all("usage" not in view["model_fields_set"] for view in got)
        assert all('"usage"' not in view["to_json"] for view in got)
    [c] = captured("f")
    span = c.spans[0]
    assert (span.input_tokens, span.output_tokens) == (2, 2)
    assert span.output == {"role": "assistant", "content": "a b"}


def test_chunk_without_choices_or_usage_is_shown(openai_server: OpenAIServer, captured) -> None:
    """Only the usage-only chunk is hidden: an Azure-style content-filter chunk (no choices,
    no usage) reaches the caller as it would without the wrapper."""
    prelude = [
        {
            "id": "",
            "object": "",
            "created": 0,
            "model": "",
            "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        }
    ]
    plain, wrapped = openai_server.client(), wrap_openai(openai_server.client(), workflow="az")
    openai_server.enqueue(Reply("a b", prelude=prelude), Reply("a b", prelude=prelude))
    expect, got = _stream_dicts(plain), _stream_dicts(wrapped)
    assert got == expect and got[0]["to_dict"]["choices"] == []
    assert got[0]["to_dict"]["prompt_filter_results"] == prelude[0]["prompt_filter_results"]
    [c] = captured("az")
    assert c.spans[0].output == {"role": "assistant", "content": "a b"}
    assert c.spans[0].output_tokens == 2


def test_usage_asked_through_extra_body_keeps_the_callers(
    openai_server: OpenAIServer, captured
) -> None:
    """Without the caller's ``stream_options`` the wrapper asks in ``extra_body`` (the SDK
    merges it as is); the caller's ``extra_body`` is kept, copied, and its own
    ``stream_options`` wins, with ``include_usage`` added unless it says so already."""
    client = wrap_openai(openai_server.client(), workflow="eb")
    extra = {"seed_hint": 7}
    list(client.chat.completions.create(model="m", messages=MSGS, stream=True, extra_body=extra))
    body = openai_server.requests[-1].body
    assert body["stream_options"] == {"include_usage": True} and body["seed_hint"] == 7
    assert extra == {"seed_hint": 7}
    extra = {"stream_options": {"include_obfuscation": False}}
    list(client.chat.completions.create(model="m", messages=MSGS, stream=True, extra_body=extra))
    assert openai_server.requests[-1].body["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    assert extra == {"stream_options": {"include_obfuscation": False}}
    extra = {"stream_options": {"include_usage": True}}
    chunks = list(
        client.chat.completions.create(model="m", messages=MSGS, stream=True, extra_body=extra)
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3, "caller's own"
    assert [c.spans[0].output_tokens for c in captured("eb")] == [3, 3, 3]


def test_stream_left_early_or_never_read_ends_its_span(
    openai_server: OpenAIServer, captured
) -> None:
    client = wrap_openai(openai_server.client(), workflow="left")
    openai_server.enqueue("one two three four")
    for chunk in client.chat.completions.create(model="m", messages=MSGS, stream=True):
        if chunk.choices[0].delta.content:
            break  # the stream is dropped mid-way
    stream = client.chat.completions.create(model="m", messages=MSGS, stream=True)
    del stream  # never read
    first, second = captured("left")
    assert first.spans[0].ended_at is not None and first.rollout.status == "succeeded"
    assert first.spans[0].output == {"role": "assistant", "content": "one"}
    assert second.spans[0].ended_at is not None and second.spans[0].output["content"] == ""


def test_stream_error_mid_way_is_recorded_and_reraised(openai_server: OpenAIServer, captured):
    client = wrap_openai(openai_server.client(), workflow="mid")
    error = {"error": {"message": "overloaded", "type": "server_error"}}
    openai_server.enqueue(Reply("a b", prelude=[error]))
    with pytest.raises(openai.APIError, match="overloaded"):
        list(client.chat.completions.create(model="m", messages=MSGS, stream=True))
    [c] = captured("mid")
    assert c.spans[0].status == "error" and c.rollout.status == "failed"


def test_stream_that_is_not_the_sdks_is_proxied_and_usage_hidden(fw, captured) -> None:
    """Anything but an ``openai.Stream`` (a test double, another client's iterator) is
    iterated through a proxy that hides the usage-only chunk by looking at the chunks."""
    from flywheel_middleware.adapters.openai import _Options, _sync_wrapper
    from openai.types.chat import ChatCompletionChunk

    def chunk(choices, usage=None):
        return ChatCompletionChunk.model_validate(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": choices,
                "usage": usage,
            }
        )

    parts = [
        chunk([{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        chunk([], {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}),
    ]
    create = _sync_wrapper(lambda **kw: iter(parts), "chat", _Options("proxy", True))
    got = list(create(model="m", messages=MSGS, stream=True))
    assert got == parts[:2]
    [c] = captured("proxy")
    assert (c.spans[0].input_tokens, c.spans[0].output_tokens) == (4, 1)
    assert c.spans[0].output == {"role": "assistant", "content": "hi"}


def test_async_stream_stays_an_sdk_stream_and_early_close_ends_span(
    openai_server: OpenAIServer, captured
) -> None:
    client = wrap_openai(openai_server.async_client(), workflow="aclose")
    openai_server.enqueue("one two three four", "five six")

    async def main():
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        assert isinstance(stream, openai.AsyncStream)
        async with stream as entered:
            assert entered is stream and stream.response.status_code == 200
            first = await stream.__anext__()
            second = await stream.__anext__()
        other = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        rest = [c async for c in other]
        await other.aclose()  # after the end: nothing left to record
        return first, second, rest

    first, second, rest = asyncio.run(main())
    assert first.choices[0].delta.role == "assistant" and second.choices[0].delta.content == "one"
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "five six"
    early, read = captured("aclose")
    assert early.spans[0].ended_at is not None and early.rollout.status == "succeeded"
    assert early.spans[0].output == {"role": "assistant", "content": "one"}
    assert read.spans[0].output == {"role": "assistant", "content": "five six"}
    assert read.spans[0].output_tokens == 2
