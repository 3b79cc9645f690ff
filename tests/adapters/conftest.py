"""Read back what the adapters recorded, from the real store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Captured:
    rollout: Any
    spans: list[Any] = field(default_factory=list)

    def by_name(self, name: str) -> Any:
        matches = [s for s in self.spans if s.name == name]
        assert len(matches) == 1, f"{len(matches)} spans named {name!r}: {self.spans}"
        return matches[0]

    def children(self, span: Any) -> list[Any]:
        return [s for s in self.spans if s.parent_id == span.id]

    @property
    def roots(self) -> list[Any]:
        return [s for s in self.spans if s.parent_id is None]


@pytest.fixture
def captured(fw):
    """``captured()`` flushes the recorder and returns every rollout with its spans."""
    from sqlmodel import select

    from flywheel_middleware.store.models import Rollout, Span

    def read(workflow: str | None = None) -> list[Captured]:
        assert fw.flush(10), "recorder did not flush"
        with fw.get_store().session() as session:
            q = select(Rollout).order_by(Rollout.started_at)
            rollouts = list(session.exec(q).all())
            spans = list(session.exec(select(Span).order_by(Span.sequence)).all())
        orphans = {s.rollout_id for s in spans} - {r.id for r in rollouts}
        assert not orphans, f"spans recorded under unknown rollouts {orphans}"
        if workflow:
            rollouts = [r for r in rollouts if r.workflow == workflow]
        return [Captured(r, [s for s in spans if s.rollout_id == r.id]) for r in rollouts]

    return read


def _add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


@pytest.fixture
def make_agent():
    """``make_agent(server, *middlewares, stream=True, name="bob")``: a real AgentScope 2.x
    Agent whose OpenAIChatModel talks to the loopback server, with an ``add`` tool allowed."""
    pytest.importorskip("agentscope")
    import asyncio

    from agentscope.agent import Agent
    from agentscope.credential import OpenAICredential
    from agentscope.model import OpenAIChatModel
    from agentscope.permission import PermissionBehavior, PermissionDecision
    from agentscope.tool import FunctionTool, Toolkit

    def make(server: Any, *middlewares: Any, stream: bool = True, name: str = "bob") -> Any:
        async def build() -> Any:
            model = OpenAIChatModel(
                credential=OpenAICredential(api_key="sk-test", base_url=server.base_url),
                model="gpt-as",
                stream=stream,
                max_retries=0,
            )
            toolkit = Toolkit()
            allow = PermissionDecision(behavior=PermissionBehavior.ALLOW, message="ok")
            await toolkit.add_tool(FunctionTool(_add, name="add", permission=allow))
            return Agent(
                name=name,
                system_prompt="You are bob.",
                model=model,
                toolkit=toolkit,
                middlewares=list(middlewares),
            )

        return asyncio.run(build())

    return make
