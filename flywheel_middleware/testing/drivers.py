"""Contract-suite drivers for flywheel's own adapters (LangChain, OpenAI SDK, AgentScope 2.x).

They double as worked examples for third-party adapter authors. Each imports its framework
only when used.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from flywheel_middleware.testing.contract import AdapterDriver, ContractEnv

__all__ = ["AgentScopeDriver", "LangChainDriver", "OpenAIDriver", "DRIVERS"]


class LangChainDriver(AdapterDriver):
    """prompt | EchoChatModel | StrOutputParser, traced by FlywheelCallbackHandler."""

    name = "langchain"

    def __init__(self) -> None:
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate

        from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
        from flywheel_middleware.testing.fakes import EchoChatModel

        prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")])
        self.chain = prompt | EchoChatModel(delay=0.005) | StrOutputParser()
        self.handler = FlywheelCallbackHandler(workflow=ContractEnv.workflow)

    def _cfg(self, wrapped: bool = True) -> dict[str, Any]:
        return {"callbacks": [self.handler]} if wrapped else {}

    def run(self, env: ContractEnv, text: str) -> Any:
        return self.chain.invoke({"q": text}, config=self._cfg())

    def run_unwrapped(self, env: ContractEnv, text: str) -> Any:
        return self.chain.invoke({"q": text})

    def run_failing(self, env: ContractEnv, *, wrapped: bool = True) -> Any:
        return self.chain.invoke({"q": "boom"}, config=self._cfg(wrapped))

    def run_concurrent(self, env: ContractEnv, texts: list[str]) -> list[Any]:
        config = {**self._cfg(), "max_concurrency": 4}
        return self.chain.batch([{"q": t} for t in texts], config=config)


class OpenAIDriver(AdapterDriver):
    """The real openai SDK against the loopback server, wrapped by wrap_openai (and, for the
    config check only, ``wrap_openai(..., apply_config=True)``)."""

    name = "openai"
    supports_config = True

    def __init__(self) -> None:
        self._clients: dict[tuple[bool, bool], Any] = {}

    def _client(self, env: ContractEnv, wrapped: bool, configured: bool = False) -> Any:
        client = self._clients.get((wrapped, configured))
        if client is None:
            from flywheel_middleware.adapters.openai import wrap_openai

            client = env.server.client()
            if wrapped:
                client = wrap_openai(client, workflow=env.workflow, apply_config=configured)
            self._clients[(wrapped, configured)] = client
        return client

    def _call(self, env: ContractEnv, text: str, wrapped: bool, configured: bool = False) -> Any:
        messages = [{"role": "user", "content": text}]
        client = self._client(env, wrapped, configured)
        return client.chat.completions.create(model="m", messages=messages)

    def run(self, env: ContractEnv, text: str) -> Any:
        return self._call(env, text, True)

    def run_unwrapped(self, env: ContractEnv, text: str) -> Any:
        return self._call(env, text, False)

    def run_failing(self, env: ContractEnv, *, wrapped: bool = True) -> Any:
        from flywheel_middleware.testing.openai_server import Reply

        env.server.enqueue(Reply(status=400, error="the model refused the request"))
        return self._call(env, "fail", wrapped)

    def run_configured(self, env: ContractEnv, text: str) -> dict[str, Any]:
        self._call(env, text, True, configured=True)
        return env.server.requests[-1].body

    def run_concurrent(self, env: ContractEnv, texts: list[str]) -> list[Any]:
        env.server.delay = 0.02
        results: list[Any] = [None] * len(texts)

        def call(i: int) -> None:
            results[i] = self.run(env, texts[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        env.server.delay = 0.0
        return results

    def normalize(self, output: Any) -> Any:
        data = output.model_dump()
        data.pop("id", None)
        data.pop("created", None)
        return data

    def text_of(self, output: Any) -> str:
        return output.choices[0].message.content or ""

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


class AgentScopeDriver(AdapterDriver):
    """A real AgentScope 2.x Agent (OpenAIChatModel on the loopback server) with
    FlywheelMiddleware; applies the workflow config."""

    name = "agentscope"
    supports_config = True

    def _agent(self, env: ContractEnv, wrapped: bool, name: str = "contract_agent") -> Any:
        from agentscope.agent import Agent
        from agentscope.credential import OpenAICredential
        from agentscope.model import OpenAIChatModel

        from flywheel_middleware.adapters.agentscope import FlywheelMiddleware

        model = OpenAIChatModel(
            credential=OpenAICredential(api_key="sk-test", base_url=env.server.base_url),
            model="gpt-contract",
            stream=True,
            max_retries=0,
        )
        middlewares = [FlywheelMiddleware(workflow=env.workflow)] if wrapped else []
        agent = Agent(
            name=name, system_prompt="You are a test agent.", model=model, middlewares=middlewares
        )
        agent.model_config.max_retries = 0
        return agent

    @staticmethod
    def _echo_question(env: ContractEnv) -> None:
        """Answer with the user's text (AgentScope appends a system-reminder after it)."""

        def respond(req: Any) -> str:
            for message in req.body.get("messages", []):
                if message.get("role") == "user" and "system-reminder" not in str(message):
                    content = message.get("content")
                    if isinstance(content, list):
                        content = " ".join(str(p.get("text", "")) for p in content)
                    found = str(content)
            return f"echo: {found}"

        env.server.set_responder(respond)

    def _reply(self, env: ContractEnv, agent: Any, text: str) -> Any:
        from agentscope.message import UserMsg

        self._echo_question(env)
        return asyncio.run(agent.reply(UserMsg(name="user", content=text)))

    def run(self, env: ContractEnv, text: str) -> Any:
        return self._reply(env, self._agent(env, True), text)

    def run_unwrapped(self, env: ContractEnv, text: str) -> Any:
        return self._reply(env, self._agent(env, False), text)

    def run_failing(self, env: ContractEnv, *, wrapped: bool = True) -> Any:
        from flywheel_middleware.testing.openai_server import Reply

        env.server.enqueue(Reply(status=400, error="the model refused the request"))
        return self._reply(env, self._agent(env, wrapped), "fail")

    def run_concurrent(self, env: ContractEnv, texts: list[str]) -> list[Any]:
        from agentscope.message import UserMsg

        self._echo_question(env)
        env.server.delay = 0.02
        agents = [self._agent(env, True, name=f"agent_{i}") for i in range(len(texts))]

        async def main() -> list[Any]:
            return await asyncio.gather(
                *(
                    a.reply(UserMsg(name="user", content=t))
                    for a, t in zip(agents, texts, strict=True)
                )
            )

        try:
            return asyncio.run(main())
        finally:
            env.server.delay = 0.0

    def run_configured(self, env: ContractEnv, text: str) -> dict[str, Any]:
        self.run(env, text)
        return env.server.requests[-1].body

    def normalize(self, output: Any) -> Any:
        return (output.name, output.role, output.get_text_content())

    def text_of(self, output: Any) -> str:
        return output.get_text_content() or ""


DRIVERS: dict[str, type[AdapterDriver]] = {
    "langchain": LangChainDriver,
    "openai": OpenAIDriver,
    "agentscope": AgentScopeDriver,
}
