"""The LangChain handler on real langchain-core runnables, a real chat model class and LangGraph."""

from __future__ import annotations

import asyncio
from typing import TypedDict

import pytest
from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnableParallel
from langchain_core.tools import tool

from flywheel_middleware.testing.fakes import EchoChatModel, FakeModelError


def qa_chain(model=None):
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{question}")])
    return prompt | (model or EchoChatModel()) | StrOutputParser()


def test_chain_spans_tree_model_usage(captured) -> None:
    handler = FlywheelCallbackHandler(workflow="qa", user_id="u1")
    out = qa_chain().invoke({"question": "what is up"}, config={"callbacks": [handler]})
    assert out == "echo: what is up"
    [c] = captured("qa")
    assert c.rollout.status == "succeeded" and c.rollout.user_id == "u1"
    assert c.rollout.input == {"question": "what is up"}
    assert c.rollout.output == "echo: what is up"
    [root] = c.roots
    assert root.name == "RunnableSequence"
    names = [s.name for s in c.children(root)]
    assert names == ["ChatPromptTemplate", "EchoChatModel", "StrOutputParser"]
    llm = c.by_name("EchoChatModel")
    assert llm.kind == "llm" and llm.model == "echo-1"
    assert (llm.input_tokens, llm.output_tokens) == (5, 4)
    assert llm.input[-1]["content"] == "what is up"
    assert llm.output["content"] == "echo: what is up"
    assert (c.rollout.input_tokens, c.rollout.output_tokens) == (5, 4)
    assert not handler._spans, "finished runs must not stay in the handler"


def test_error_recorded_and_reraised_unchanged(captured) -> None:
    handler = FlywheelCallbackHandler(workflow="qa")
    with pytest.raises(FakeModelError, match="boom") as info:
        qa_chain().invoke({"question": "boom"}, config={"callbacks": [handler]})
    assert type(info.value) is FakeModelError
    [c] = captured("qa")
    assert c.rollout.status == "failed" and "FakeModelError" in c.rollout.error
    llm = c.by_name("EchoChatModel")
    assert llm.status == "error" and llm.error.startswith("FakeModelError: fake model failed")
    assert c.roots[0].status == "error"


def test_attaches_to_active_rollout(fw, captured) -> None:
    handler = FlywheelCallbackHandler(workflow="ignored")
    with fw.rollout("outer", user_id="u2") as r:
        with fw.span("prep", kind="tool"):
            pass
        qa_chain().invoke({"question": "a"}, config={"callbacks": [handler]})
        qa_chain().invoke({"question": "b"}, config={"callbacks": [handler]})
    [c] = captured()
    assert c.rollout.id == r.id and c.rollout.workflow == "outer"
    assert [s.name for s in c.roots] == ["prep", "RunnableSequence", "RunnableSequence"]
    assert c.rollout.input_tokens == 6


def test_batch_max_concurrency_keeps_rollouts_apart(captured) -> None:
    handler = FlywheelCallbackHandler(workflow="qa")
    questions = [{"question": f"q{i}"} for i in range(8)]
    outs = qa_chain(EchoChatModel(delay=0.02)).batch(
        questions, config={"callbacks": [handler], "max_concurrency": 4}
    )
    assert outs == [f"echo: q{i}" for i in range(8)]
    rollouts = captured("qa")
    assert len(rollouts) == 8
    for c in rollouts:
        q = c.rollout.input["question"]
        assert c.rollout.output == f"echo: {q}"
        assert len(c.spans) == 4 and len(c.roots) == 1
        assert c.by_name("EchoChatModel").input[-1]["content"] == q
        assert c.by_name("EchoChatModel").parent_id == c.roots[0].id


def test_abatch_and_parallel_branches(captured) -> None:
    handler = FlywheelCallbackHandler(workflow="par")
    model = EchoChatModel(delay=0.01)
    par = RunnableParallel(
        short=ChatPromptTemplate.from_messages([("human", "short {q}")]) | model,
        long=ChatPromptTemplate.from_messages([("human", "long {q}")]) | model,
    )

    async def main():
        return await par.abatch([{"q": str(i)} for i in range(5)], config={"callbacks": [handler]})

    outs = asyncio.run(main())
    assert [o["short"].content for o in outs] == [f"echo: short {i}" for i in range(5)]
    rollouts = captured("par")
    assert len(rollouts) == 5
    for c in rollouts:
        q = c.rollout.input["q"]
        [root] = c.roots
        branches = c.children(root)
        assert sorted(b.name for b in branches) == ["RunnableSequence", "RunnableSequence"]
        for branch in branches:
            [_, llm] = c.children(branch)
            assert llm.kind == "llm"
            assert llm.input[-1]["content"].endswith(f" {q}")
            assert llm.output["content"] == "echo: " + llm.input[-1]["content"]


def test_astream_records_time_to_first_token(captured) -> None:
    handler = FlywheelCallbackHandler(workflow="stream")

    async def main():
        chain = qa_chain(EchoChatModel(delay=0.02))
        return [
            c async for c in chain.astream({"question": "x y"}, config={"callbacks": [handler]})
        ]

    chunks = asyncio.run(main())
    assert "".join(chunks) == "echo: x y"
    [c] = captured("stream")
    llm = c.by_name("EchoChatModel")
    assert 0 < llm.attributes["time_to_first_token_ms"] <= llm.duration_ms
    assert (llm.input_tokens, llm.output_tokens) == (4, 3)
    assert llm.model == "echo-1"


def test_tool_and_retriever_and_tags(captured) -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    class Docs(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager):
            return [Document(page_content=f"doc about {query}")]

    handler = FlywheelCallbackHandler(workflow="tools")
    cfg = {"callbacks": [handler], "tags": ["t1"], "metadata": {"session_id": "s9", "k": 1}}
    assert add.invoke({"a": 2, "b": 3}, config=cfg) == 5
    docs = Docs().invoke("cats", config=cfg)
    assert docs[0].page_content == "doc about cats"
    c_tool, c_ret = captured("tools")
    tool_span = c_tool.by_name("add")
    assert tool_span.kind == "tool" and tool_span.input == {"a": 2, "b": 3}
    assert tool_span.output == 5
    assert tool_span.attributes["tags"] == ["t1"]
    assert tool_span.attributes["metadata"] == {"session_id": "s9", "k": 1}
    assert c_tool.rollout.session_id == "s9" and c_tool.rollout.tags == ["t1"]
    ret = c_ret.by_name("Docs")
    assert ret.kind == "retriever" and ret.input == "cats"
    assert ret.output[0]["page_content"] == "doc about cats"


def test_failing_tool_inside_chain(captured) -> None:
    def explode(_):
        raise ValueError("bad input")

    handler = FlywheelCallbackHandler(workflow="t")
    chain = RunnableLambda(lambda x: x + 1) | RunnableLambda(explode)
    with pytest.raises(ValueError, match="bad input"):
        chain.invoke(1, config={"callbacks": [handler]})
    [c] = captured("t")
    failed = [s for s in c.spans if s.status == "error"]
    assert {s.name for s in failed} == {"RunnableSequence", "explode"}
    assert all(s.error == "ValueError: bad input" for s in failed)


def test_langgraph_nodes(captured) -> None:
    langgraph = pytest.importorskip("langgraph.graph")

    class State(TypedDict):
        question: str
        answer: str

    model = EchoChatModel()

    def retrieve(state: State) -> dict:
        return {"question": state["question"] + " (ctx)"}

    def answer(state: State) -> dict:
        return {"answer": model.invoke(state["question"]).content}

    graph = langgraph.StateGraph(State)
    graph.add_node("retrieve", retrieve)
    graph.add_node("answer", answer)
    graph.add_edge(langgraph.START, "retrieve")
    graph.add_edge("retrieve", "answer")
    graph.add_edge("answer", langgraph.END)
    app = graph.compile()
    handler = FlywheelCallbackHandler(workflow="graph")
    out = app.invoke({"question": "hi"}, config={"callbacks": [handler]})
    assert out["answer"] == "echo: hi (ctx)"
    [c] = captured("graph")
    [root] = c.roots
    assert root.name == "LangGraph"
    node_spans = {s.name: s for s in c.spans if s.kind == "node"}
    assert set(node_spans) == {"retrieve", "answer"}
    assert all(s.parent_id == root.id for s in node_spans.values())
    llm = c.by_name("EchoChatModel")
    assert llm.node == "answer" and llm.parent_id == node_spans["answer"].id
    assert node_spans["retrieve"].node == "retrieve"
    assert c.rollout.output["answer"] == "echo: hi (ctx)"


def test_model_called_directly_is_one_rollout_with_one_span(captured) -> None:
    """A root run with no children is recorded whole at its end (the pending-root path)."""
    handler = FlywheelCallbackHandler(workflow="direct", tags=["t0"], metadata={"team": "a"})
    config = {"callbacks": [handler], "metadata": {"user_id": "u9"}, "tags": ["t1"]}
    reply = EchoChatModel().invoke("hello there", config=config)
    assert reply.content == "echo: hello there"
    with pytest.raises(FakeModelError):
        EchoChatModel().invoke("boom now", config={"callbacks": [handler]})
    chunks = list(EchoChatModel(delay=0.01).stream("a b c", config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == "echo: a b c"
    ok, failed, streamed = captured("direct")
    assert not handler._spans, "finished runs must not stay in the handler"
    [span] = ok.spans
    assert (span.kind, span.name, span.model, span.parent_id) == (
        "llm",
        "EchoChatModel",
        "echo-1",
        None,
    )
    assert (span.input_tokens, span.output_tokens) == (2, 3)
    assert span.input == [{"role": "user", "content": "hello there"}]
    assert span.output["content"] == "echo: hello there"
    assert span.attributes["invocation_params"]["model"] == "echo-1"
    assert span.attributes["tags"] == ["t1"]
    r = ok.rollout
    assert (r.status, r.user_id, r.tags) == ("succeeded", "u9", ["t0", "t1"])
    assert r.metadata_ == {"team": "a", "user_id": "u9"}
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (2, 3, 5)
    assert r.input == span.input and r.output == span.output
    assert r.latency_ms == pytest.approx(span.duration_ms) and r.latency_ms > 0
    [bad] = failed.spans
    assert bad.status == "error" and bad.error.startswith("FakeModelError: fake model failed")
    assert failed.rollout.status == "failed" and failed.rollout.error == bad.error
    [st] = streamed.spans
    assert 0 < st.attributes["time_to_first_token_ms"] <= st.duration_ms


def test_pending_root_opens_once_for_concurrent_children(captured) -> None:
    """Children of one root starting on several threads at once share one rollout."""
    handler = FlywheelCallbackHandler(workflow="fanout")
    branches = {f"b{i}": RunnableLambda(lambda x, i=i: f"{x}-{i}") for i in range(8)}
    out = RunnableParallel(branches).invoke(
        "x", config={"callbacks": [handler], "max_concurrency": 8}
    )
    assert out == {f"b{i}": f"x-{i}" for i in range(8)}
    [c] = captured("fanout")
    [root] = c.roots
    assert root.name.startswith("RunnableParallel")
    children = c.children(root)
    assert [s.name for s in children] == ["RunnableLambda"] * 8
    assert all(s.parent_id == root.id and s.rollout_id == c.rollout.id for s in children)
    assert c.rollout.started_at == root.started_at
