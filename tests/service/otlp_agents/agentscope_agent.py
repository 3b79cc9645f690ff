"""A real AgentScope 2.x agent traced by its own TracingMiddleware, exporting OTLP/HTTP.

No flywheel code in this process: ``python agentscope_agent.py ENDPOINT KEY LLM_URL QUESTION...``
asks the agent each question in turn (its model is OpenAI-protocol at LLM_URL, it may call
``add``), prints each reply's text on a line, and flushes the exporter before it exits.
"""

from __future__ import annotations

import asyncio
import sys

from agentscope.agent import Agent
from agentscope.credential import OpenAICredential
from agentscope.message import UserMsg
from agentscope.middleware import TracingMiddleware
from agentscope.model import OpenAIChatModel
from agentscope.permission import PermissionBehavior, PermissionDecision
from agentscope.tool import FunctionTool, Toolkit
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


async def main(endpoint: str, key: str, llm_url: str, questions: list[str]) -> None:
    model = OpenAIChatModel(
        credential=OpenAICredential(api_key="sk-test", base_url=llm_url),
        model="gpt-as",
        stream=True,
        max_retries=0,
    )
    toolkit = Toolkit()
    allow = PermissionDecision(behavior=PermissionBehavior.ALLOW, message="ok")
    await toolkit.add_tool(FunctionTool(add, name="add", permission=allow))
    agent = Agent(
        name="bob",
        system_prompt="You are bob.",
        model=model,
        toolkit=toolkit,
        middlewares=[TracingMiddleware()],
    )
    for question in questions:
        reply = await agent.reply(UserMsg(name="user", content=question))
        print(reply.get_text_content(), flush=True)


if __name__ == "__main__":
    endpoint, key, llm_url, *questions = sys.argv[1:]
    provider = TracerProvider(resource=Resource.create({"service.name": "bob-agent"}))
    exporter = OTLPSpanExporter(endpoint=endpoint, headers={"Authorization": f"Bearer {key}"})
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    asyncio.run(main(endpoint, key, llm_url, questions))
    provider.shutdown()  # exports what is left
