"""The adapter contract suite over wrap_openai's other entry points: ``parse`` (structured
outputs), the ``.stream()`` helpers, the async client and clients derived with
``with_options()``. Each driver is ``OpenAIDriver`` with another call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from flywheel_middleware.testing.contract import AdapterContract, ContractEnv
from flywheel_middleware.testing.drivers import OpenAIDriver


class Echo(BaseModel):
    answer: str
    words: int


def scrub(value: Any) -> Any:
    """A comparable dump: ids and timestamps (numbered per request by the server) removed."""
    if isinstance(value, BaseModel):
        value = value.model_dump(warnings=False)
    if isinstance(value, dict):
        return {
            k: scrub(v)
            for k, v in value.items()
            if k not in ("id", "created", "created_at", "item_id")
        }
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


class _Driver(OpenAIDriver):
    def _call(self, env: ContractEnv, text: str, wrapped: bool, configured: bool = False) -> Any:
        return self.call(self._client(env, wrapped, configured), text)

    def call(self, client: Any, text: str) -> Any:
        raise NotImplementedError

    def normalize(self, output: Any) -> Any:
        return scrub(output)


class ChatParse(_Driver):
    name = "chat.completions.parse"

    def call(self, client: Any, text: str) -> Any:
        messages = [{"role": "user", "content": text}]
        return client.chat.completions.parse(model="m", messages=messages, response_format=Echo)

    def text_of(self, output: Any) -> str:
        return output.choices[0].message.parsed.answer


class ResponsesParse(_Driver):
    name = "responses.parse"

    def call(self, client: Any, text: str) -> Any:
        return client.responses.parse(model="m", input=text, text_format=Echo)

    def text_of(self, output: Any) -> str:
        return output.output_parsed.answer


class ChatStream(_Driver):
    name = "chat.completions.stream"

    def call(self, client: Any, text: str) -> Any:
        messages = [{"role": "user", "content": text}]
        with client.chat.completions.stream(model="m", messages=messages) as stream:
            events = list(stream)
        return events, stream.get_final_completion()

    def text_of(self, output: Any) -> str:
        return output[1].choices[0].message.content


class ResponsesStream(_Driver):
    name = "responses.stream"

    def call(self, client: Any, text: str) -> Any:
        with client.responses.stream(model="m", input=text) as stream:
            events = list(stream)
        return events, stream.get_final_response()

    def text_of(self, output: Any) -> str:
        return output[1].output_text


class DerivedClient(_Driver):
    name = "with_options"

    def call(self, client: Any, text: str) -> Any:
        messages = [{"role": "user", "content": text}]
        derived = client.with_options(timeout=30.0).copy(max_retries=0)
        return derived.chat.completions.create(model="m", messages=messages)

    def text_of(self, output: Any) -> str:
        return output.choices[0].message.content


class AsyncChatStream(_Driver):
    """``AsyncOpenAI``: ``parse`` then the ``.stream()`` helper, one event loop per call."""

    name = "async"

    def _call(self, env: ContractEnv, text: str, wrapped: bool, configured: bool = False) -> Any:
        from flywheel_middleware.adapters.openai import wrap_openai

        async def main() -> Any:
            client = env.server.async_client()
            if wrapped:
                client = wrap_openai(client, workflow=env.workflow, apply_config=configured)
            try:
                return await self.acall(client, text)
            finally:
                await client.close()

        return asyncio.run(main())

    async def acall(self, client: Any, text: str) -> Any:
        messages = [{"role": "user", "content": text}]
        async with client.chat.completions.stream(model="m", messages=messages) as stream:
            events = [e async for e in stream]
        return events, await stream.get_final_completion()

    def text_of(self, output: Any) -> str:
        return output[1].choices[0].message.content


DRIVERS = [ChatParse, ResponsesParse, ChatStream, ResponsesStream, DerivedClient, AsyncChatStream]


@pytest.fixture(params=DRIVERS, ids=[d.name for d in DRIVERS])
def flywheel_driver(request: pytest.FixtureRequest) -> Any:
    return request.param()


class TestOpenAIEntryPoints(AdapterContract):
    """Every behaviour of the contract, once per entry point."""
