"""The message normalizer on the shapes real frameworks record, and the exports built on it."""

from __future__ import annotations

import json

import pytest
from langchain_core.load import dumpd
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from flywheel_middleware.capture.serialize import to_jsonable
from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.loop.datasets import export
from flywheel_middleware.messages import Unknown, answer_text, question_text, to_messages
from flywheel_middleware.testing.openai_server import Reply

QUESTION = "Where is order 42?"
ANSWER = "Order 42 ships today."


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def lc_conversation() -> list:
    return [
        SystemMessage("be brief"),
        HumanMessage(QUESTION),
        AIMessage(
            "",
            tool_calls=[{"name": "lookup", "args": {"order_id": "42"}, "id": "call_1"}],
        ),
        ToolMessage("ships today", tool_call_id="call_1"),
        AIMessage(ANSWER),
    ]


EXPECTED = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": QUESTION},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"order_id": "42"}'},
            }
        ],
    },
    {"role": "tool", "content": "ships today", "tool_call_id": "call_1"},
    {"role": "assistant", "content": ANSWER},
]


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(to_jsonable(lc_conversation()), id="langchain-dumped"),
        pytest.param([dumpd(m) for m in lc_conversation()], id="langchain-lc-constructor"),
        pytest.param({"messages": to_jsonable(lc_conversation())}, id="graph-state"),
    ],
)
def test_langchain_messages_become_openai_chat(stored) -> None:
    assert to_messages(stored) == EXPECTED
    assert question_text(stored) == QUESTION
    assert answer_text(stored) == ANSWER


def test_tuples_openai_parts_responses_genai_and_agentscope() -> None:
    assert to_messages({"messages": [["user", QUESTION]]}) == [
        {"role": "user", "content": QUESTION}
    ]
    assert question_text([("system", "be brief"), ("human", QUESTION)]) == QUESTION
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    assert question_text(parts) == QUESTION
    responses_input = {
        "instructions": "be nice",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ships today"},
        ],
    }
    assert [m["role"] for m in to_messages(responses_input)] == [
        "system",
        "user",
        "assistant",
        "tool",
    ]
    assert question_text(responses_input) == QUESTION
    genai_in = [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": QUESTION}]},
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "t1", "name": "lookup", "arguments": {"id": 42}}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "t1", "response": "ok"}]},
    ]
    msgs = to_messages(genai_in)
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"id": 42}'}
    assert msgs[3] == {"role": "tool", "content": "ok", "tool_call_id": "t1"}
    assert question_text(genai_in) == QUESTION
    genai_out = [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": ANSWER}],
            "finish_reason": "stop",
        }
    ]
    assert answer_text(genai_out) == ANSWER
    assert question_text("Msg(name='user', content='where is order 42?', role='user')") == (
        "where is order 42?"
    )
    assert answer_text("Msg(name='Friday', content='Order 42 ships today.')") == ANSWER
    scope_msg = {
        "name": "Friday",
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "u1", "name": "lookup", "input": {"id": 42}},
            {"type": "text", "text": ANSWER},
        ],
    }
    assert answer_text(scope_msg) == ANSWER
    responses_output = [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": ANSWER}],
        },
    ]
    assert answer_text(responses_output) == ANSWER
    anthropic_user = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "ships today"}],
    }
    assert to_messages(anthropic_user) == [
        {"role": "tool", "content": "ships today", "tool_call_id": "tu_1"}
    ]
    assert to_messages(scope_msg)[0]["tool_calls"][0]["id"] == "u1"


def test_unknown_shapes_are_reported_not_emptied() -> None:
    unknown = Unknown()
    assert question_text({"weird": [1, 2]}, unknown) == ""
    assert answer_text(12.5, unknown) == ""
    assert unknown.count == 2 and unknown.example == {"weird": [1, 2]}
    assert "2 value(s)" in str(unknown)


class ToolCallingModel:
    """A fake chat model with tools, built on langchain-core's GenericFakeChatModel."""

    @staticmethod
    def make(answers):
        from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

        class Model(GenericFakeChatModel):
            def bind_tools(self, tools, **kwargs):
                return self

        return Model(messages=iter(answers))


def _langgraph_agent():
    prebuilt = pytest.importorskip("langgraph.prebuilt")
    from langchain_core.tools import tool

    @tool
    def lookup(order_id: str) -> str:
        """Look an order up."""
        return f"order {order_id} ships today"

    model = ToolCallingModel.make(
        [
            AIMessage(
                "", tool_calls=[{"name": "lookup", "args": {"order_id": "42"}, "id": "call_1"}]
            ),
            AIMessage(ANSWER),
        ]
    )
    return prebuilt.create_react_agent(model, [lookup])


def _rollouts(fw, workflow: str):
    from sqlmodel import select

    from flywheel_middleware.store.models import Rollout

    assert fw.flush(10)
    with fw.get_store().session() as session:
        return list(session.exec(select(Rollout).where(Rollout.workflow == workflow)).all())


def _assert_exports(fw, workflow: str, tmp_path, question: str, answer: str) -> None:
    assert fw.flush(10)
    tmp_path.mkdir(exist_ok=True)
    store = fw.get_store()
    export(store, "triplets", workflow, tmp_path / "t.jsonl")
    [triplet] = read(tmp_path / "t.jsonl")
    assert (triplet["prompt"], triplet["response"]) == (question, answer)
    export(store, "sft", workflow, tmp_path / "s.jsonl")
    [sft] = read(tmp_path / "s.jsonl")
    users = [m["content"] for m in sft["messages"] if m["role"] == "user"]
    assert users[-1] == question and sft["messages"][-1] == {"role": "assistant", "content": answer}
    for m in sft["messages"]:
        for call in m.get("tool_calls", []):
            assert call["type"] == "function" and isinstance(call["function"]["arguments"], str)
    export(store, "tasks", workflow, tmp_path / "k.jsonl", val_fraction=0)
    [task] = read(tmp_path / "k.jsonl")
    assert (task["main_query"], task["metadata"]["answer"]) == (question, answer)


def test_langgraph_react_agent_with_tuple_input_exports_real_text(fw, tmp_path) -> None:
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler

    agent = _langgraph_agent()
    handler = FlywheelCallbackHandler(workflow="graph")
    out = agent.invoke({"messages": [("user", QUESTION)]}, config={"callbacks": [handler]})
    assert out["messages"][-1].content == ANSWER
    [rollout] = _rollouts(fw, "graph")
    assert rollout.input == {"messages": [["user", QUESTION]]}
    _assert_exports(fw, "graph", tmp_path, QUESTION, ANSWER)
    [sft] = read(tmp_path / "s.jsonl")
    roles = [m["role"] for m in sft["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert sft["messages"][2]["tool_call_id"] == sft["messages"][1]["tool_calls"][0]["id"]
    # the fake model's bind_tools records no schemas: the called tool is declared by name
    assert sft["tools"] == [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    ]
    assert check_file(tmp_path / "s.jsonl", "sft") == []


LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look an order up.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}


def test_openai_chat_with_tool_calls_exports_real_text(fw, openai_server, tmp_path) -> None:
    from flywheel_middleware.adapters.openai import wrap_openai

    client = wrap_openai(openai_server.client(), workflow="oa")
    openai_server.enqueue(
        Reply(content=None, tool_calls=[{"name": "lookup", "arguments": {"order_id": "42"}}]),
        Reply(content=ANSWER),
    )
    with fw.rollout("oa") as r:
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ]
        r.set_input(messages)
        first = client.chat.completions.create(model="m", messages=messages, tools=[LOOKUP_TOOL])
        call = first.choices[0].message
        messages += [
            call.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "ships today"},
        ]
        final = client.chat.completions.create(model="m", messages=messages, tools=[LOOKUP_TOOL])
        r.set_output(final)
    _assert_exports(fw, "oa", tmp_path, QUESTION, ANSWER)
    [sft] = read(tmp_path / "s.jsonl")
    assert sft["tools"] == [LOOKUP_TOOL]  # the schema the agent gave the model
    assert check_file(tmp_path / "s.jsonl", "sft") == []
    assert [m["role"] for m in sft["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]


def test_openai_responses_and_genai_parts_export_real_text(fw, openai_server, tmp_path) -> None:
    from flywheel_middleware.adapters.openai import wrap_openai

    client = wrap_openai(openai_server.client(), workflow="resp")
    client.responses.create(
        model="m",
        instructions="be brief",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
    )
    _assert_exports(fw, "resp", tmp_path / "resp", QUESTION, f"echo: {QUESTION}")
    with fw.rollout("genai") as r:
        r.set_input([{"role": "user", "parts": [{"type": "text", "content": QUESTION}]}])
        r.set_output(
            [
                {
                    "role": "assistant",
                    "parts": [{"type": "text", "content": ANSWER}],
                    "finish_reason": "stop",
                }
            ]
        )
    _assert_exports(fw, "genai", tmp_path / "genai", QUESTION, ANSWER)


def test_unknown_shapes_are_counted_by_the_export(fw, sqlite_url, tmp_path) -> None:
    with fw.rollout("odd", input={"weird": [1, 2]}) as r:
        r.set_output({"numbers": [3]})
    _rollouts(fw, "odd")
    result = export(fw.get_store(), "triplets", "odd", tmp_path / "t.jsonl")
    assert result.count == 0 and read(tmp_path / "t.jsonl") == []
    assert result.unknown.count >= 1 and result.unknown.example == {"weird": [1, 2]}
    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    args = ["export", "sft", "--store", sqlite_url, "-w", "odd", "-o", str(tmp_path / "s.jsonl")]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0 and "unknown message shape" in shown.output
    assert '{"weird": [1, 2]}' in shown.output
    as_json = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert as_json["count"] == 0 and as_json["unknown_shapes"]["example"] == {"weird": [1, 2]}


def test_judges_and_filters_read_the_same_question_and_answer() -> None:
    """Sample.prompt_text/response_text (what filters and judges see) use the normalizer too."""
    from .helpers import sample

    state = {"messages": to_jsonable(lc_conversation())}
    s = sample("r1", {"messages": [["user", QUESTION]]}, state)
    assert (s.prompt_text, s.response_text) == (QUESTION, ANSWER)
    odd = sample("r2", {"weird": [1]}, 42)
    assert (odd.prompt_text, odd.response_text) == ('{"weird": [1]}', "42")
