"""FlywheelSpanProcessor on the real OTel SDK, with OpenInference, AgentScope's TracingMiddleware
and hand-made spans in the GenAI / AgentScope 1.x shapes."""

from __future__ import annotations

import asyncio

import pytest
from flywheel_middleware.adapters.otel import FlywheelSpanProcessor, otel_span_id, otel_trace_id
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode


@pytest.fixture
def provider(fw):
    tp = TracerProvider()
    tp.add_span_processor(FlywheelSpanProcessor(workflow="otel-wf"))
    yield tp
    tp.shutdown()


@pytest.fixture
def global_provider(fw, otel_sdk):
    """The process's global SDK provider, feeding a FlywheelSpanProcessor for this test."""
    otel_sdk.add(FlywheelSpanProcessor(workflow="otel-wf"))
    return otel_sdk.provider


def test_genai_spans_become_rollout_and_spans(provider, captured) -> None:
    tracer = provider.get_tracer("some.instrumentation")
    with tracer.start_as_current_span("invoke_agent bob") as agent_span:
        agent_span.set_attributes(
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.conversation.id": "conv-1",
                "gen_ai.input.messages": '[{"role": "user", "content": "hi"}]',
            }
        )
        with tracer.start_as_current_span("chat gpt-4o") as llm:
            llm.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.response.model": "gpt-4o-2024",
                    "gen_ai.usage.input_tokens": 7,
                    "gen_ai.usage.output_tokens": 3,
                    "gen_ai.request.temperature": 0.2,
                }
            )
        with tracer.start_as_current_span("execute_tool add") as tool:
            tool.set_attributes(
                {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.call.arguments": '{"a": 1}'}
            )
            tool.record_exception(ValueError("bad a"))
            tool.set_status(Status(StatusCode.ERROR, "bad a"))
    [c] = captured("otel-wf")
    ctx = agent_span.get_span_context()
    assert c.rollout.id == otel_trace_id(ctx.trace_id)
    assert c.rollout.session_id == "conv-1" and c.rollout.input == [
        {"role": "user", "content": "hi"}
    ]
    assert (c.rollout.input_tokens, c.rollout.output_tokens) == (7, 3)
    [root] = c.roots
    assert root.id == otel_span_id(ctx.span_id) and root.kind == "agent"
    llm_row, tool_row = sorted(c.children(root), key=lambda s: s.name)
    assert llm_row.kind == "llm" and llm_row.model == "gpt-4o-2024"
    assert (llm_row.input_tokens, llm_row.output_tokens) == (7, 3)
    assert llm_row.attributes["gen_ai.request.temperature"] == 0.2
    assert tool_row.kind == "tool" and tool_row.input == {"a": 1}
    assert tool_row.status == "error" and tool_row.error == "ValueError: bad a"
    assert {s.workflow for s in (root, llm_row, tool_row)} == {"otel-wf"}


def test_agentscope_1x_shaped_spans(provider, captured) -> None:
    tracer = provider.get_tracer("agentscope")
    with tracer.start_as_current_span("ReActAgent.reply") as span:
        span.set_attributes(
            {
                "span.kind": "AGENT",
                "project.run_id": "run-9",
                "input": "Msg(name='user', content='hello')",
                "output": "Msg(...)",
            }
        )
        with tracer.start_as_current_span("OpenAIChatModel.__call__"):
            pass
        with tracer.start_as_current_span("Toolkit.call_tool_function"):
            pass
    [c] = captured("otel-wf")
    assert c.rollout.session_id == "run-9"
    kinds = {s.name: s.kind for s in c.spans}
    assert kinds == {
        "ReActAgent.reply": "agent",
        "OpenAIChatModel.__call__": "llm",
        "Toolkit.call_tool_function": "tool",
    }
    assert c.roots[0].input == "Msg(name='user', content='hello')"


def test_openinference_langchain(provider, captured) -> None:
    from langchain_core.prompts import ChatPromptTemplate
    from openinference.instrumentation.langchain import LangChainInstrumentor

    from flywheel_middleware.testing.fakes import EchoChatModel

    instrumentor = LangChainInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | EchoChatModel()
        assert chain.invoke({"q": "a b"}).content == "echo: a b"
    finally:
        instrumentor.uninstrument()
    [c] = captured("otel-wf")
    [root] = c.roots
    assert root.kind == "chain" and root.name == "RunnableSequence"
    llm = [s for s in c.spans if s.kind == "llm"][0]
    assert llm.parent_id == root.id and llm.model == "echo-1"
    assert (llm.input_tokens, llm.output_tokens) == (2, 3)
    assert c.rollout.input == "a b"  # OpenInference flattens a one-key input


def test_skips_flywheel_spans_and_attaches_inside_rollout(fw, global_provider, captured) -> None:
    from flywheel_middleware.capture import otel_mirror

    otel_mirror.set_enabled(True)  # flywheel's own spans reach the processor, which skips them
    tracer = global_provider.get_tracer("other.lib")
    with fw.rollout("mine") as r:
        with fw.span("step", kind="tool") as step:
            with tracer.start_as_current_span("chat m") as s:
                s.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 2})
    rollouts = captured()
    assert [x.rollout.id for x in rollouts] == [r.id], "flywheel's own OTel spans were re-imported"
    [c] = rollouts
    chat = c.by_name("chat m")
    assert chat.parent_id == step.id and chat.kind == "llm"
    assert c.rollout.input_tokens == 2


def test_agentscope_tracing_middleware(global_provider, openai_server, captured, make_agent):
    from agentscope.message import UserMsg
    from agentscope.middleware import TracingMiddleware

    from flywheel_middleware.testing.openai_server import Reply

    openai_server.enqueue(
        Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}]),
        "the sum is 5",
    )
    agent = make_agent(openai_server, TracingMiddleware())
    msg = asyncio.run(agent.reply(UserMsg(name="user", content="add 2 and 3")))
    assert msg.get_text_content() == "the sum is 5"
    [c] = captured("otel-wf")
    [root] = c.roots
    assert root.kind == "agent" and root.name == "invoke_agent bob"
    kids = c.children(root)
    assert sorted(s.kind for s in kids) == ["llm", "llm", "tool"]
    llms = [s for s in kids if s.kind == "llm"]
    assert all(s.model == "gpt-as" and s.output_tokens == 4 for s in llms)
    tool = [s for s in kids if s.kind == "tool"][0]
    assert tool.name == "execute_tool add"
    assert c.rollout.output_tokens == 8


def test_processor_never_raises_into_the_instrumented_code(fw) -> None:
    class Broken:
        def enqueue(self, record):
            raise RuntimeError("store is broken")

        def flush(self, timeout=None):
            raise RuntimeError("store is broken")

    tp = TracerProvider()
    tp.add_span_processor(FlywheelSpanProcessor(recorder=Broken()))
    tracer = tp.get_tracer("x")
    with tracer.start_as_current_span("chat m") as span:
        span.set_attribute("gen_ai.operation.name", "chat")
    assert tp.force_flush() is False  # reported, not raised
    tp.shutdown()
