"""FlywheelMiddleware on real AgentScope 2.x agents whose OpenAIChatModel talks to a loopback server."""

from __future__ import annotations

import asyncio
import re

import pytest

pytest.importorskip("agentscope")

from agentscope.message import UserMsg  # noqa: E402
from flywheel_middleware.adapters.agentscope import FlywheelMiddleware  # noqa: E402

from flywheel_middleware.testing.openai_server import Reply  # noqa: E402


@pytest.mark.parametrize("stream", [True, False])
def test_reply_model_and_tool_spans(openai_server, captured, make_agent, stream: bool) -> None:
    openai_server.enqueue(
        Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}]),
        "the sum is 5",
    )
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="as"), stream=stream)
    msg = asyncio.run(agent.reply(UserMsg(name="user", content="add 2 and 3")))
    assert msg.get_text_content() == "the sum is 5"
    [c] = captured("as")
    assert c.rollout.status == "succeeded"
    assert c.rollout.session_id == agent.state.session_id
    [root] = c.roots
    assert root.kind == "agent" and root.name == "bob"
    kids = c.children(root)
    assert [s.kind for s in kids] == ["llm", "tool", "llm"]
    first, tool_span, second = kids
    assert first.model == "gpt-as" and first.name == "chat gpt-as"
    assert first.input_tokens > 0 and first.output_tokens == 4  # json of the tool arguments
    assert second.output_tokens == 4 and second.output[0]["text"] == "the sum is 5"
    assert any("add 2 and 3" in str(m) for m in first.input)
    assert first.attributes["tools"][0] == "add"
    assert tool_span.name == "add" and tool_span.input == {"a": 2, "b": 3}
    assert "5" in tool_span.output[0]["text"] and tool_span.status == "ok"
    assert c.rollout.output_tokens == 8
    if stream:
        assert first.attributes["stream"] is True
        assert second.attributes["time_to_first_token_ms"] >= 0


def test_attaches_to_active_rollout(fw, openai_server, captured, make_agent) -> None:
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="ignored"))

    async def run():
        with fw.rollout("outer", user_id="u1") as r:
            await agent.reply(UserMsg(name="user", content="hi"))
        return r

    r = asyncio.run(run())
    [c] = captured("outer")
    assert c.rollout.id == r.id and c.rollout.user_id == "u1"
    [root] = c.roots
    assert root.kind == "agent" and [s.kind for s in c.children(root)] == ["llm"]
    assert captured("ignored") == []


def test_model_error_recorded_and_reraised(openai_server, captured, make_agent) -> None:
    import openai

    openai_server.enqueue(Reply(status=400, error="no such model"))
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="err"), stream=False)
    agent.model_config.max_retries = 0
    with pytest.raises(openai.BadRequestError, match="no such model"):
        asyncio.run(agent.reply(UserMsg(name="user", content="hi")))
    [c] = captured("err")
    assert c.rollout.status == "failed"
    llm = [s for s in c.spans if s.kind == "llm"][0]
    assert llm.status == "error" and llm.error.startswith("BadRequestError")
    assert c.roots[0].status == "error"


def test_concurrent_agents_share_one_middleware(openai_server, captured, make_agent) -> None:
    openai_server.delay = 0.05
    openai_server.set_responder(
        lambda req: "echo: " + re.search(r"question \d", str(req.body["messages"])).group(0)
    )
    mw = FlywheelMiddleware(workflow="conc")
    agents = [make_agent(openai_server, mw, name=f"a{i}") for i in range(4)]

    async def run():
        return await asyncio.gather(
            *(a.reply(UserMsg(name="user", content=f"question {i}")) for i, a in enumerate(agents))
        )

    msgs = asyncio.run(run())
    assert [m.get_text_content() for m in msgs] == [f"echo: question {i}" for i in range(4)]
    assert openai_server.max_in_flight > 1
    rollouts = captured("conc")
    assert len(rollouts) == 4
    for c in rollouts:
        [root] = c.roots
        i = root.name[1:]
        [llm] = c.children(root)
        assert llm.output[0]["text"] == f"echo: question {i}"


def test_applies_workflow_config(fw, sqlite_url, openai_server, captured, make_agent) -> None:
    fw.configure(
        store_url=sqlite_url,
        config={
            "workflows": {
                "cfg": {
                    "config": {
                        "llm": {"temperature": 0.7, "max_tokens": 55, "model": "gpt-tuned"},
                        "prompt": {"system": "You are tuned bob.", "system_suffix": "Be brief."},
                    }
                }
            }
        },
    )
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="cfg"))
    asyncio.run(agent.reply(UserMsg(name="user", content="hi")))
    body = openai_server.requests[-1].body
    assert body["temperature"] == 0.7 and body["max_completion_tokens"] == 55
    assert body["model"] == "gpt-tuned"
    system = body["messages"][0]["content"][0]["text"]
    assert system.startswith("You are tuned bob.") and system.endswith("Be brief.")
    assert "You are bob." not in system
    assert agent.model.parameters.temperature is None and agent.model.model == "gpt-as"
    [c] = captured("cfg")
    llm = [s for s in c.spans if s.kind == "llm"][0]
    assert llm.model == "gpt-tuned" and llm.attributes["invocation_params"]["temperature"] == 0.7
    # apply_config=False leaves the agent alone
    agent2 = make_agent(openai_server, FlywheelMiddleware(workflow="cfg", apply_config=False))
    asyncio.run(agent2.reply(UserMsg(name="user", content="hi")))
    body = openai_server.requests[-1].body
    assert "temperature" not in body and body["model"] == "gpt-as"


def test_reply_stream_closed_early_ends_spans(openai_server, captured, make_agent) -> None:
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="early"))

    async def run():
        gen = agent.reply_stream(UserMsg(name="user", content="hello there"))
        first = await gen.__anext__()
        await gen.aclose()
        return first

    assert asyncio.run(run()) is not None
    [c] = captured("early")
    assert all(s.ended_at is not None for s in c.spans)
    assert c.rollout.status == "succeeded" and c.roots[0].kind == "agent"


def test_exports_carry_the_real_question_and_answer(fw, openai_server, make_agent, tmp_path):
    import json

    from flywheel_middleware.loop.dataset_rules import check_file
    from flywheel_middleware.loop.datasets import export

    openai_server.enqueue(
        Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}]),
        "the sum is 5",
    )
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="as2"))
    asyncio.run(agent.reply(UserMsg(name="user", content="add 2 and 3")))
    assert fw.flush(10)
    store = fw.get_store()
    export(store, "triplets", "as2", tmp_path / "t.jsonl")
    [t] = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert (t["prompt"], t["response"]) == ("add 2 and 3", "the sum is 5")
    export(store, "sft", "as2", tmp_path / "s.jsonl")
    assert check_file(tmp_path / "s.jsonl", "sft") == []
    [row] = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    messages = row["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["add 2 and 3"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[-1] == {"role": "assistant", "content": "the sum is 5"}
    [call] = [c for m in messages for c in m.get("tool_calls", [])]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {
        "a": 2,
        "b": 3,
    }
    [answer] = [m for m in messages if m["role"] == "tool"]
    assert answer["tool_call_id"] == call["id"] and "5" in answer["content"]
    export(store, "tasks", "as2", tmp_path / "k.jsonl", val_fraction=0)
    [task] = [json.loads(x) for x in (tmp_path / "k.jsonl").read_text().splitlines()]
    assert (task["main_query"], task["metadata"]["answer"]) == ("add 2 and 3", "the sum is 5")


def test_llm_input_is_the_prompt_at_call_time(openai_server, captured, make_agent) -> None:
    """AgentScope fills a turn's reply Msg in place after each model call; what a span
    recorded as the call's input must stay what the model was given."""
    from agentscope.middleware import MiddlewareBase

    from flywheel_middleware.messages import to_messages

    class Witness(MiddlewareBase):
        """What each model call was given, copied as JSON the moment it was called."""

        def __init__(self) -> None:
            self.given: list[list[dict]] = []

        async def on_model_call(self, agent, input_kwargs, next_handler):
            self.given.append([m.model_dump(mode="json") for m in input_kwargs["messages"]])
            return await next_handler()

    openai_server.enqueue(
        Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}]),
        "the sum is 5",
    )
    witness = Witness()
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="late"), witness)
    asyncio.run(agent.reply(UserMsg(name="user", content="add 2 and 3")))
    [c] = captured("late")
    first, second = [s for s in c.spans if s.kind == "llm"]
    assert [first.input, second.input] == witness.given
    # the first call was asked the question only; the second also had the tool's result
    assert [m["role"] for m in to_messages(first.input)] == ["system", "user"]
    turns = to_messages(second.input)
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "tool"]
    assert turns[-1]["content"] == "5"
    # while the agent's memory now holds the whole turn, answer included
    memory = to_messages([m.model_dump() for m in agent.state.context])
    assert memory[-1] == {"role": "assistant", "content": "the sum is 5"}


def test_a_reply_without_tools_exports_one_clean_turn(fw, openai_server, make_agent, tmp_path):
    """The reply Msg AgentScope opens before the model answers (holding only a runtime hint)
    is recorded as it was, and is no empty assistant turn in the sft row."""
    import json

    from flywheel_middleware.loop.dataset_rules import check_file
    from flywheel_middleware.loop.datasets import export

    openai_server.enqueue("hello back")
    agent = make_agent(openai_server, FlywheelMiddleware(workflow="plain"))
    asyncio.run(agent.reply(UserMsg(name="user", content="hello")))
    assert fw.flush(10)
    export(fw.get_store(), "sft", "plain", tmp_path / "s.jsonl")
    assert check_file(tmp_path / "s.jsonl", "sft") == []
    [row] = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert row["messages"] == [
        {"role": "system", "content": "You are bob."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello back"},
    ]
