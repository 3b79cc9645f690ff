"""One chat client for every plugin that calls an LLM (judges, prompt rewriters).

It talks to any OpenAI-compatible endpoint through the ``openai`` SDK (imported lazily, so the
core does not depend on it) or wraps a LangChain chat model (anything with ``.invoke`` /
``.ainvoke``), so nothing is hard-wired to one vendor. Retries are tenacity's, not the SDK's,
so one policy covers both backends.

    client = ChatClient.from_params({"base_url": "http://127.0.0.1:8000/v1", "model": "m"})
    text = client.complete([{"role": "user", "content": "hi"}], temperature=0.2)
    text = await client.acomplete("hi")
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from flywheel_middleware.errors import ConfigError, PluginError

Message = dict[str, str]
Messages = str | Sequence[Message | tuple[str, str]]


class LLMParams(BaseModel):
    """Connection settings; plugin ``Params`` that call an LLM subclass this (flat keys in YAML)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://host/v1"
    )
    model: str = Field("gpt-4.1-mini", description="model name sent to the endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key")
    chat_model: str | None = Field(
        None,
        description="dotted path 'pkg.mod:attr' of a LangChain chat model (or a factory returning one)",
    )
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(2, ge=0, le=10, description="extra attempts after a failed request")
    retry_wait: float = Field(0.5, ge=0, description="first back-off in seconds (doubles)")
    max_tokens: int | None = Field(None, ge=1)


class LLMError(PluginError):
    """The endpoint could not be reached or answered with an error after all retries."""


def import_object(path: str) -> Any:
    """Import ``pkg.mod:attr`` or ``pkg.mod.attr``; errors name the path."""
    module_name, _, attr = path.partition(":")
    if not attr:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{path!r} is not a dotted path like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} (from {path!r}): {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even in a thread that runs an event loop.

    For plugins whose work is async (a judge asking many answers concurrently) behind a sync
    hook (``Filter.filter``, ``RewardSource.score``): with no running loop it is
    ``asyncio.run``; inside one (a notebook, an async server) the coroutine runs on its own
    loop in a helper thread, and its result or exception comes back here.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="flywheel-plugin-async")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def normalize_messages(messages: Messages) -> list[Message]:
    """A string becomes one user message; (role, content) tuples become dicts."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out: list[Message] = []
    for message in messages:
        if isinstance(message, tuple):
            role, content = message
            out.append({"role": role, "content": content})
        elif isinstance(message, dict):
            out.append({"role": message["role"], "content": message.get("content") or ""})
        else:  # a LangChain message object
            role = {"human": "user", "ai": "assistant"}.get(message.type, message.type)
            out.append({"role": role, "content": str(message.content)})
    return out


def _retryable(exc: BaseException) -> bool:
    """Retry transport errors, rate limits and 5xx; not bad requests or auth failures."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status == 408 or status == 409 or status == 429 or status >= 500
    return not isinstance(exc, ConfigError | TypeError | ValueError | KeyError)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # LangChain content blocks
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return "" if content is None else str(content)


class ChatClient:
    """A chat completion client: ``complete`` (sync) and ``acomplete`` (async) return text."""

    def __init__(
        self,
        params: LLMParams | None = None,
        *,
        chat_model: Any = None,
    ) -> None:
        self.params = params or LLMParams()
        if chat_model is None and self.params.chat_model:
            chat_model = import_object(self.params.chat_model)
            if isinstance(chat_model, type) or (
                callable(chat_model) and not hasattr(chat_model, "invoke")
            ):
                chat_model = chat_model()
        if chat_model is not None and not (
            hasattr(chat_model, "invoke") or hasattr(chat_model, "ainvoke")
        ):
            raise ConfigError(
                f"chat_model {type(chat_model).__name__} has neither .invoke nor .ainvoke"
            )
        self.chat_model = chat_model
        self._sync_client: Any = None
        self._async_clients: dict[int, tuple[Any, Any]] = {}

    @classmethod
    def from_params(
        cls, params: LLMParams | dict[str, Any] | BaseModel | None = None, *, chat_model: Any = None
    ) -> ChatClient:
        """Build from ``LLMParams``, a dict, or any plugin Params that has the same fields."""
        if params is None:
            return cls(LLMParams(), chat_model=chat_model)
        if isinstance(params, LLMParams):
            return cls(params, chat_model=chat_model)
        data = params.model_dump() if isinstance(params, BaseModel) else dict(params)
        known = {k: v for k, v in data.items() if k in LLMParams.model_fields}
        return cls(LLMParams(**known), chat_model=chat_model)

    @property
    def backend(self) -> str:
        return "langchain" if self.chat_model is not None else "openai"

    # -- openai SDK ---------------------------------------------------------------------

    def _api_key(self) -> str:
        key = os.environ.get(self.params.api_key_env)
        if key:
            return key
        if self.params.base_url:
            return "not-needed"  # local OpenAI-compatible servers usually ignore the key
        raise ConfigError(
            f"environment variable {self.params.api_key_env} is not set "
            "(set it, or give base_url for a local endpoint, or api_key_env)"
        )

    def _openai(self) -> Any:
        try:
            import openai
        except ImportError:
            raise PluginError(
                "the openai package is needed for an OpenAI-compatible endpoint: "
                "pip install 'flywheel-middleware[openai]' (or pass a LangChain chat model)"
            ) from None
        return openai

    def _sync(self) -> Any:
        if self._sync_client is None:
            self._sync_client = self._openai().OpenAI(
                base_url=self.params.base_url,
                api_key=self._api_key(),
                timeout=self.params.timeout,
                max_retries=0,
            )
        return self._sync_client

    def _async(self) -> Any:
        # An httpx async client belongs to one event loop: keep one per running loop.
        loop = asyncio.get_running_loop()
        cached = self._async_clients.get(id(loop))
        if cached is None or cached[0] is not loop:
            client = self._openai().AsyncOpenAI(
                base_url=self.params.base_url,
                api_key=self._api_key(),
                timeout=self.params.timeout,
                max_retries=0,
            )
            # drop clients of loops that are gone
            self._async_clients = {
                k: v for k, v in self._async_clients.items() if not v[0].is_closed()
            }
            cached = (loop, client)
            self._async_clients[id(loop)] = cached
        return cached[1]

    def _request(self, messages: list[Message], temperature: float | None, **kw: Any) -> dict:
        body: dict[str, Any] = {"model": self.params.model, "messages": messages}
        if temperature is not None:
            body["temperature"] = temperature
        max_tokens = kw.pop("max_tokens", None) or self.params.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        body.update(kw)
        return body

    # -- retries ------------------------------------------------------------------------

    def _retrying(self, cls: type) -> Any:
        return cls(
            stop=stop_after_attempt(self.params.retries + 1),
            wait=wait_exponential(multiplier=self.params.retry_wait, max=30),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )

    # -- public API ---------------------------------------------------------------------

    def complete(self, messages: Messages, *, temperature: float | None = None, **kw: Any) -> str:
        """Send the messages, return the assistant's text; raises LLMError after retries."""
        msgs = normalize_messages(messages)
        try:
            for attempt in self._retrying(Retrying):
                with attempt:
                    return self._complete_once(msgs, temperature, **kw)
        except (ConfigError, LLMError):
            raise
        except Exception as exc:
            raise LLMError(f"LLM request to {self._where()} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def acomplete(
        self, messages: Messages, *, temperature: float | None = None, **kw: Any
    ) -> str:
        """The async twin of ``complete`` (a sync-only LangChain model runs in a thread)."""
        msgs = normalize_messages(messages)
        try:
            async for attempt in self._retrying(AsyncRetrying):
                with attempt:
                    return await self._acomplete_once(msgs, temperature, **kw)
        except (ConfigError, LLMError):
            raise
        except Exception as exc:
            raise LLMError(f"LLM request to {self._where()} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _where(self) -> str:
        if self.chat_model is not None:
            return f"LangChain model {type(self.chat_model).__name__}"
        return f"{self.params.base_url or 'api.openai.com'} (model {self.params.model})"

    def _complete_once(self, msgs: list[Message], temperature: float | None, **kw: Any) -> str:
        if self.chat_model is not None:
            if not hasattr(self.chat_model, "invoke"):
                return asyncio.run(self._acomplete_once(msgs, temperature, **kw))
            result = self._lc_call(self.chat_model.invoke, msgs, temperature, kw)
            return _content_text(getattr(result, "content", result))
        response = self._sync().chat.completions.create(**self._request(msgs, temperature, **kw))
        return _content_text(response.choices[0].message.content)

    async def _acomplete_once(
        self, msgs: list[Message], temperature: float | None, **kw: Any
    ) -> str:
        if self.chat_model is not None:
            if hasattr(self.chat_model, "ainvoke"):
                result = await self._alc_call(msgs, temperature, kw)
            else:
                result = await asyncio.to_thread(
                    self._lc_call, self.chat_model.invoke, msgs, temperature, kw
                )
            return _content_text(getattr(result, "content", result))
        client = self._async()
        response = await client.chat.completions.create(**self._request(msgs, temperature, **kw))
        return _content_text(response.choices[0].message.content)

    @staticmethod
    def _lc_messages(msgs: list[Message]) -> list[tuple[str, str]]:
        role = {"user": "human", "assistant": "ai"}
        return [(role.get(m["role"], m["role"]), m["content"]) for m in msgs]

    def _lc_call(self, fn: Any, msgs: list[Message], temperature: float | None, kw: dict) -> Any:
        extra = dict(kw)
        if temperature is not None:
            extra["temperature"] = temperature
        try:
            return fn(self._lc_messages(msgs), **extra)
        except TypeError:
            if not extra:
                raise
            return fn(self._lc_messages(msgs))  # a model that takes no call-time settings

    async def _alc_call(self, msgs: list[Message], temperature: float | None, kw: dict) -> Any:
        extra = dict(kw)
        if temperature is not None:
            extra["temperature"] = temperature
        try:
            return await self.chat_model.ainvoke(self._lc_messages(msgs), **extra)
        except TypeError:
            if not extra:
                raise
            return await self.chat_model.ainvoke(self._lc_messages(msgs))

    def close(self) -> None:
        """Close the sync HTTP client (async clients close with their loop)."""
        if self._sync_client is not None:
            try:
                self._sync_client.close()
            except Exception:
                pass
            self._sync_client = None
