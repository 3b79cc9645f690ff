"""Small, real framework models for tests: they run the framework's own code, minus the network.

``EchoChatModel`` is a langchain-core ``BaseChatModel`` that answers ``"echo: <last message>"``,
reports ``usage_metadata`` and a model name like a provider integration does, streams word by
word, and raises ``FakeModelError`` when the last message contains ``"boom"``. Importing this
module imports langchain-core.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

__all__ = ["EchoChatModel", "FakeModelError"]


class FakeModelError(RuntimeError):
    """Raised by the fake models on a message containing ``boom``."""


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", p)) if isinstance(p, dict) else str(p) for p in content)


class EchoChatModel(BaseChatModel):
    """A chat model that echoes, reports usage and model name, and can be told to fail."""

    model_name: str = "echo-1"
    delay: float = 0.0
    temperature: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "echo-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_model_name"] = self.model_name
        return params

    def _answer(self, messages: list[BaseMessage]) -> tuple[str, int]:
        last = _text(messages[-1]) if messages else ""
        if "boom" in last:
            raise FakeModelError(f"fake model failed on {last!r}")
        prompt_tokens = sum(len(_text(m).split()) for m in messages)
        return f"echo: {last}", prompt_tokens

    def _message(self, text: str, prompt_tokens: int) -> AIMessage:
        out_tokens = len(text.split())
        return AIMessage(
            content=text,
            usage_metadata={
                "input_tokens": prompt_tokens,
                "output_tokens": out_tokens,
                "total_tokens": prompt_tokens + out_tokens,
            },
            response_metadata={"model_name": self.model_name},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.delay:
            time.sleep(self.delay)
        text, prompt_tokens = self._answer(messages)
        return ChatResult(generations=[ChatGeneration(message=self._message(text, prompt_tokens))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        text, prompt_tokens = self._answer(messages)
        return ChatResult(generations=[ChatGeneration(message=self._message(text, prompt_tokens))])

    def _chunks(self, messages: list[BaseMessage]) -> list[ChatGenerationChunk]:
        text, prompt_tokens = self._answer(messages)
        words = text.split(" ")
        chunks = []
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunks.append(ChatGenerationChunk(message=AIMessageChunk(content=piece)))
        out_tokens = len(text.split())
        chunks.append(
            ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    usage_metadata={
                        "input_tokens": prompt_tokens,
                        "output_tokens": out_tokens,
                        "total_tokens": prompt_tokens + out_tokens,
                    },
                    response_metadata={"model_name": self.model_name},
                )
            )
        )
        return chunks

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages):
            if self.delay:
                time.sleep(self.delay / 4)
            if run_manager is not None and chunk.message.content:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages):
            if self.delay:
                await asyncio.sleep(self.delay / 4)
            if run_manager is not None and chunk.message.content:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
