"""Message shapes as real frameworks produce them (LangGraph state, LCEL, the Responses API,
OpenTelemetry GenAI parts, AgentScope 2.x), read by the normalizer and through the exports,
whose sft files must pass ``export --check``."""

from __future__ import annotations

import json
from typing import TypedDict

import pytest
from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
from flywheel_middleware.adapters.openai import wrap_openai
from langchain_core.documents import Document
from langchain_core.messages import AIMessage

from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.loop.datasets import export
from flywheel_middleware.messages import Unknown, answer_text, question_text, to_messages
from flywheel_middleware.testing.fakes import EchoChatModel
from flywheel_middleware.testing.openai_server import Reply

from .test_messages import ToolCallingModel


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def valid_sft(path) -> list[dict]:
    """The rows of an sft file that passes ``export --check``."""
    rows = read(path)
    assert check_file(path, "sft") == [], rows
    return rows


def react_agent(answers, tool_result: str):
    from langchain_core.tools import tool
    from langgraph.prebuilt import create_react_agent

    @tool
    def lookup(order_id: str) -> str:
        """Look an order up."""
        return tool_result

    return create_react_agent(ToolCallingModel.make(answers), [lookup])


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WEATHER_CALL = Reply(
    content=None, tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]
)

# -- the answer, not the question -------------------------------------------------------------


def test_state_with_question_and_answer_reads_each_from_its_key() -> None:
    """Graph state, LCEL ``assign`` and AgentExecutor outputs hold the question beside the
    answer; each side reads its own key."""
    for state in (
        {"question": "Q?", "context": [], "answer": "A."},
        {"question": "Q?", "answer": "A."},
        {"input": "Q?", "output": "A."},
    ):
        assert (question_text(state), answer_text(state)) == ("Q?", "A."), state
    unknown = Unknown()
    assert answer_text({"input": "Q?", "chat_history": []}, unknown) == ""  # no answer there
    assert unknown.count == 1


class RagState(TypedDict):
    """The state of LangGraph's RAG tutorial."""

    question: str
    context: list[Document]
    answer: str


def test_langgraph_rag_tutorial_state_exports_the_answer_not_the_question(fw, tmp_path) -> None:
    from langgraph.graph import START, StateGraph

    model = EchoChatModel()

    def retrieve(state: RagState) -> dict:
        return {"context": [Document(page_content="Refunds take 5 days.")]}

    def generate(state: RagState) -> dict:
        docs = "\n".join(d.page_content for d in state["context"])
        return {"answer": model.invoke(f"Context: {docs}\nQ: {state['question']}").content}

    graph = StateGraph(RagState).add_sequence([retrieve, generate])
    graph.add_edge(START, "retrieve")
    question = "How long do refunds take?"
    handler = FlywheelCallbackHandler(workflow="rag")
    out = graph.compile().invoke({"question": question}, config={"callbacks": [handler]})
    assert out["answer"] != question
    assert fw.flush(10)
    store = fw.get_store()
    export(store, "triplets", "rag", tmp_path / "t.jsonl")
    [triplet] = read(tmp_path / "t.jsonl")
    assert (triplet["prompt"], triplet["response"]) == (question, out["answer"])
    export(store, "tasks", "rag", tmp_path / "k.jsonl", val_fraction=0)
    [task] = read(tmp_path / "k.jsonl")
    assert (task["main_query"], task["metadata"]["answer"]) == (question, out["answer"])
    export(store, "sft", "rag", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert row["messages"][-1] == {"role": "assistant", "content": out["answer"]}


def test_lcel_passthrough_assign_output_exports_the_answer(fw, tmp_path) -> None:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    chain = RunnablePassthrough.assign(answer=prompt | EchoChatModel() | StrOutputParser())
    handler = FlywheelCallbackHandler(workflow="lcel")
    out = chain.invoke({"question": "Where is my parcel?"}, config={"callbacks": [handler]})
    assert fw.flush(10)
    export(fw.get_store(), "triplets", "lcel", tmp_path / "t.jsonl")
    [triplet] = read(tmp_path / "t.jsonl")
    assert (triplet["prompt"], triplet["response"]) == ("Where is my parcel?", out["answer"])


def test_langgraph_messages_given_as_one_string_export_the_question(fw, tmp_path) -> None:
    """``{"messages": "text"}`` is valid LangGraph input (add_messages makes it a user turn)."""
    agent = react_agent([AIMessage("It ships today.")], "unused")
    handler = FlywheelCallbackHandler(workflow="str")
    agent.invoke({"messages": "Where is order 42?"}, config={"callbacks": [handler]})
    assert fw.flush(10)
    result = export(fw.get_store(), "triplets", "str", tmp_path / "t.jsonl")
    assert result.unknown.count == 0, str(result.unknown)
    [triplet] = read(tmp_path / "t.jsonl")
    assert (triplet["prompt"], triplet["response"]) == ("Where is order 42?", "It ships today.")


def test_a_title_call_after_the_answer_does_not_become_the_sft_row(fw, tmp_path) -> None:
    """A chat graph answers, then asks the model for a title kept in state: the sft row is
    the conversation that produced the answer."""
    from langgraph.graph import START, MessagesState, StateGraph

    class ChatState(MessagesState):
        title: str

    answerer = ToolCallingModel.make([AIMessage("Refunds take 5 days.")])
    titler = ToolCallingModel.make([AIMessage("Refund timing")])

    def answer(state: ChatState) -> dict:
        return {"messages": [answerer.invoke(state["messages"])]}

    def title(state: ChatState) -> dict:
        text = state["messages"][-1].content
        return {"title": titler.invoke(f"A 3-word title for: {text}").content}

    graph = StateGraph(ChatState).add_sequence([answer, title])
    graph.add_edge(START, "answer")
    handler = FlywheelCallbackHandler(workflow="titled")
    out = graph.compile().invoke(
        {"messages": [("user", "How long do refunds take?")]}, config={"callbacks": [handler]}
    )
    assert out["title"] == "Refund timing"
    assert fw.flush(10)
    export(fw.get_store(), "sft", "titled", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert row["messages"] == [
        {"role": "user", "content": "How long do refunds take?"},
        {"role": "assistant", "content": "Refunds take 5 days."},
    ]


# -- the Responses API ------------------------------------------------------------------------


def test_responses_tool_loop_as_openai_documents_it_exports_valid_sft(
    fw, openai_server, tmp_path
) -> None:
    """OpenAI's documented loop: ``input += response.output``, then a function_call_output
    with the item's ``call_id`` (the item's own ``id`` is "fc_…")."""
    openai_server.enqueue(WEATHER_CALL, "It is sunny in Paris.")
    client = wrap_openai(openai_server.client(), workflow="resp")
    question = "What is the weather in Paris?"
    with fw.rollout("resp", user_id="u1", input=question) as r:
        items: list = [{"role": "user", "content": question}]
        first = client.responses.create(model="m", input=items, tools=[WEATHER])
        items += first.output
        call = first.output[0]
        assert call.id != call.call_id
        items.append(
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24C"}
        )
        final = client.responses.create(model="m", input=items, tools=[WEATHER])
        r.set_output(final.output_text)
    assert fw.flush(10)
    export(fw.get_store(), "sft", "resp", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    user, asked, answered, final_turn = row["messages"]
    assert [c["id"] for c in asked["tool_calls"]] == [call.call_id]
    assert answered == {"role": "tool", "content": "sunny, 24C", "tool_call_id": call.call_id}
    assert final_turn == {"role": "assistant", "content": "It is sunny in Paris."}
    # the flat Responses tool definition reaches the row in chat's shape, schema and all
    assert row["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER[k] for k in ("name", "description", "parameters")},
        }
    ]


# GPT-5's custom tools: a free-form input, and the output answering the call's call_id
CUSTOM_TOOL_TURN = [
    {
        "type": "custom_tool_call",
        "id": "ctc_1",
        "call_id": "call_9",
        "name": "code_exec",
        "input": "print(6*7)",
    },
    {"type": "custom_tool_call_output", "call_id": "call_9", "output": "42"},
]


def test_responses_tool_outputs_are_tool_turns_and_references_no_turn() -> None:
    question = "Run my script, then click OK."
    items = [
        {"role": "user", "content": question},
        {"type": "item_reference", "id": "msg_0"},
        *CUSTOM_TOOL_TURN,
        {
            "type": "computer_call",
            "id": "cu_1",
            "call_id": "call_10",
            "action": {"type": "click", "x": 3, "y": 4},
            "pending_safety_checks": [],
            "status": "completed",
        },
        {
            "type": "computer_call_output",
            "call_id": "call_10",
            "output": {"type": "input_text", "text": "clicked"},
        },
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
    ]
    messages = to_messages(items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool"]
    calls = [c for m in messages for c in m.get("tool_calls", [])]
    assert [(c["id"], c["function"]["name"]) for c in calls] == [
        ("call_9", "code_exec"),
        ("call_10", "computer"),
    ]
    assert json.loads(calls[0]["function"]["arguments"]) == {"input": "print(6*7)"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"type": "click", "x": 3, "y": 4}
    assert [(m["tool_call_id"], m["content"]) for m in messages if m["role"] == "tool"] == [
        ("call_9", "42"),
        ("call_10", "clicked"),
    ]
    assert question_text(items) == question


def test_responses_custom_tool_output_is_not_read_as_the_users_question(
    fw, openai_server, tmp_path
) -> None:
    """GPT-5 custom tools: the tool's output is a tool turn, the question stays the user's."""
    client = wrap_openai(openai_server.client(), workflow="custom")
    openai_server.enqueue("The script printed 42.")
    question = "Run my script and tell me what it prints."
    client.responses.create(
        model="m",
        input=[
            {"role": "user", "content": question},
            *CUSTOM_TOOL_TURN,
        ],
    )
    assert fw.flush(10)
    store = fw.get_store()
    export(store, "tasks", "custom", tmp_path / "k.jsonl", val_fraction=0)
    [task] = read(tmp_path / "k.jsonl")
    assert (task["main_query"], task["metadata"]["answer"]) == (question, "The script printed 42.")
    export(store, "sft", "custom", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]


# -- sft rows that pass their own --check -----------------------------------------------------


def test_react_agent_whose_tool_returns_nothing_exports_valid_sft(fw, tmp_path) -> None:
    """A tool that finds nothing returns "": the tool turn says it was empty."""
    call = {"name": "lookup", "args": {"order_id": "42"}, "id": "call_1"}
    agent = react_agent([AIMessage("", tool_calls=[call]), AIMessage("No such order.")], "")
    handler = FlywheelCallbackHandler(workflow="react")
    agent.invoke({"messages": [("user", "Where is order 42?")]}, config={"callbacks": [handler]})
    assert fw.flush(10)
    result = export(fw.get_store(), "sft", "react", tmp_path / "s.jsonl")
    assert result.count == 1
    [row] = valid_sft(tmp_path / "s.jsonl")
    [tool] = [m for m in row["messages"] if m["role"] == "tool"]
    assert tool == {"role": "tool", "content": "(empty)", "tool_call_id": "call_1"}


def test_anthropic_streamed_tool_use_block_exports_the_real_arguments(fw, tmp_path) -> None:
    """langchain-anthropic's streamed AIMessage keeps the raw tool_use block with ``input: {}``
    and the arguments in ``partial_json``; the parsed arguments are in ``tool_calls``."""
    streamed = AIMessage(
        content=[
            {"type": "text", "text": "Let me look.", "index": 0},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "lookup",
                "input": {},
                "index": 1,
                "partial_json": '{"order_id": "42"}',
            },
        ],
        tool_calls=[{"name": "lookup", "args": {"order_id": "42"}, "id": "toolu_1"}],
    )
    agent = react_agent([streamed, AIMessage("It ships today.")], "order 42 ships today")
    handler = FlywheelCallbackHandler(workflow="anth")
    agent.invoke({"messages": [("user", "Where is order 42?")]}, config={"callbacks": [handler]})
    assert fw.flush(10)
    export(fw.get_store(), "sft", "anth", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    [asked] = [m for m in row["messages"] if m.get("tool_calls")]
    assert asked["content"] == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in asked["tool_calls"]] == [
        {"order_id": "42"}
    ]


def test_openai_chat_with_an_image_only_follow_up_exports_valid_sft(
    fw, openai_server, tmp_path
) -> None:
    """A user sends text, then a screenshot alone: the user turn keeps its image part."""
    client = wrap_openai(openai_server.client(), workflow="vision")
    openai_server.enqueue("Send me a screenshot.", "That is the billing page.")
    image = {"type": "image_url", "image_url": {"url": "https://example.com/shot.png"}}
    with fw.rollout("vision", user_id="u1", input="What page is this?") as r:
        messages: list = [{"role": "user", "content": "What page is this?"}]
        first = client.chat.completions.create(model="m", messages=messages)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": [image]},
        ]
        final = client.chat.completions.create(model="m", messages=messages)
        r.set_output(final.choices[0].message.content)
    assert fw.flush(10)
    export(fw.get_store(), "sft", "vision", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert row["messages"][-2] == {"role": "user", "content": [image]}
    assert row["messages"][-1] == {"role": "assistant", "content": "That is the billing page."}


def test_image_parts_of_each_api_become_chat_image_parts() -> None:
    url = "https://example.com/shot.png"
    responses = {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "this page?"},
            {"type": "input_image", "image_url": url, "detail": "low"},
        ],
    }
    assert to_messages(responses)[0]["content"] == [
        {"type": "text", "text": "this page?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
    ]
    genai = {"role": "user", "parts": [{"type": "uri", "modality": "image", "uri": url}]}
    assert to_messages(genai)[0]["content"] == [{"type": "image_url", "image_url": {"url": url}}]
    assert question_text([{"role": "user", "content": "What page?"}, responses]) == "this page?"


def test_genai_messages_with_a_reasoning_part_export_valid_sft(fw, tmp_path) -> None:
    """An assistant message of a ``reasoning`` part alone is no chat turn."""
    question = "What is 6 times 7?"
    with fw.rollout("genai") as r:
        r.set_input([{"role": "user", "parts": [{"type": "text", "content": question}]}])
        r.set_output(
            [
                {"role": "assistant", "parts": [{"type": "reasoning", "content": "6*7=42"}]},
                {
                    "role": "assistant",
                    "parts": [{"type": "text", "content": "42."}],
                    "finish_reason": "stop",
                },
            ]
        )
    assert fw.flush(10)
    export(fw.get_store(), "sft", "genai", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert row["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "42."},
    ]


GENAI_UNNAMED_CALLS = [
    {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris and Rome?"}]},
    {
        "role": "assistant",
        "parts": [
            {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Paris"}},
            {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Rome"}},
        ],
    },
    {
        "role": "tool",
        "parts": [
            {"type": "tool_call_response", "response": {"sky": "sunny"}},
            {"type": "tool_call_response", "response": {"sky": "rainy"}},
        ],
    },
]


def test_genai_tool_calls_without_ids_get_stable_ids_their_responses_use() -> None:
    messages = to_messages(GENAI_UNNAMED_CALLS)
    ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert len(set(ids)) == 2 and all(ids)
    assert [m["tool_call_id"] for m in messages[2:]] == ids  # answered in order
    assert [c["id"] for c in to_messages(GENAI_UNNAMED_CALLS)[1]["tool_calls"]] == ids


def test_genai_tool_calls_without_ids_export_valid_sft(fw, tmp_path) -> None:
    """OTel GenAI semconv makes a tool_call part's ``id`` optional (Gemini gives none)."""
    with fw.rollout("gem") as r:
        r.set_input(GENAI_UNNAMED_CALLS)
        r.set_output(
            [
                {
                    "role": "assistant",
                    "parts": [{"type": "text", "content": "Sunny, then rainy."}],
                    "finish_reason": "stop",
                }
            ]
        )
    assert fw.flush(10)
    result = export(fw.get_store(), "sft", "gem", tmp_path / "s.jsonl")
    assert result.count == 1
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert [m["content"] for m in row["messages"] if m["role"] == "tool"] == [
        '{"sky": "sunny"}',
        '{"sky": "rainy"}',
    ]


# -- AgentScope 2.x ---------------------------------------------------------------------------


def _find(order_id: str) -> str:
    """Find an order's notes.

    Args:
        order_id: the order
    """
    return ""  # no notes on this order


def test_agentscope_parallel_calls_and_an_empty_tool_result_export_valid_sft(
    fw, openai_server, tmp_path
) -> None:
    pytest.importorskip("agentscope")
    import asyncio

    from agentscope.agent import Agent
    from agentscope.credential import OpenAICredential
    from agentscope.message import UserMsg
    from agentscope.model import OpenAIChatModel
    from agentscope.permission import PermissionBehavior, PermissionDecision
    from agentscope.tool import FunctionTool, Toolkit
    from flywheel_middleware.adapters.agentscope import FlywheelMiddleware

    async def build():
        model = OpenAIChatModel(
            credential=OpenAICredential(api_key="sk-test", base_url=openai_server.base_url),
            model="gpt-as",
            stream=False,
            max_retries=0,
        )
        toolkit = Toolkit()
        allow = PermissionDecision(behavior=PermissionBehavior.ALLOW, message="ok")
        await toolkit.add_tool(FunctionTool(_find, name="find", permission=allow))
        return Agent(
            name="bob",
            system_prompt="You are bob.",
            model=model,
            toolkit=toolkit,
            middlewares=[FlywheelMiddleware(workflow="asx")],
        )

    openai_server.enqueue(
        Reply(
            content=None,
            tool_calls=[
                {"name": "find", "arguments": {"order_id": "1"}},
                {"name": "find", "arguments": {"order_id": "2"}},
            ],
        ),
        "Neither order has notes.",
    )
    agent = asyncio.run(build())
    msg = asyncio.run(agent.reply(UserMsg(name="user", content="Notes on orders 1 and 2?")))
    assert msg.get_text_content() == "Neither order has notes."
    assert fw.flush(10)
    result = export(fw.get_store(), "sft", "asx", tmp_path / "s.jsonl")
    assert result.count == 1, str(result.unknown)
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert [m["content"] for m in row["messages"] if m["role"] == "tool"] == ["(empty)"] * 2
    assert row["messages"][-1] == {"role": "assistant", "content": "Neither order has notes."}


@pytest.mark.parametrize("output_version", ["v0", "responses/v1", "v1"])
def test_chatopenai_on_the_responses_api_in_a_react_agent_exports_valid_sft(
    fw, openai_server, tmp_path, output_version
) -> None:
    """langchain-openai's ChatOpenAI(use_responses_api=True) in LangGraph's ReAct agent, with
    each of its message output versions (content blocks carry the item ids and call_ids)."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    @tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        return f"sunny in {city}"

    openai_server.enqueue(WEATHER_CALL, "It is sunny in Paris.")
    model = ChatOpenAI(
        model="gpt-test",
        base_url=openai_server.base_url,
        api_key="sk-test",
        use_responses_api=True,
        output_version=output_version,
        max_retries=0,
    )
    handler = FlywheelCallbackHandler(workflow="lcr")
    question = "What is the weather in Paris?"
    out = create_react_agent(model, [get_weather]).invoke(
        {"messages": [("user", question)]}, config={"callbacks": [handler]}
    )
    assert "sunny" in out["messages"][-1].text
    assert fw.flush(10)
    store = fw.get_store()
    export(store, "sft", "lcr", tmp_path / "s.jsonl")
    [row] = valid_sft(tmp_path / "s.jsonl")
    assert row["messages"][-1] == {"role": "assistant", "content": "It is sunny in Paris."}
    export(store, "triplets", "lcr", tmp_path / "t.jsonl")
    [triplet] = read(tmp_path / "t.jsonl")
    assert (triplet["prompt"], triplet["response"]) == (question, "It is sunny in Paris.")
