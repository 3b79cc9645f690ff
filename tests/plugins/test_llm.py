"""The shared chat client against a real OpenAI-protocol HTTP server and a LangChain model."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from flywheel_middleware.errors import ConfigError
from flywheel_middleware.plugin_system.llm import ChatClient, LLMError
from flywheel_middleware.testing.openai_server import OpenAIServer, Reply


def test_openai_endpoint_sync_async_and_retry() -> None:
    with OpenAIServer() as server:
        server.set_responder(lambda req: "echo:" + req.body["messages"][-1]["content"])
        server.enqueue(Reply(status=500, error="boom"))  # the first request fails: retried
        client = ChatClient.from_params(
            {"base_url": server.base_url, "model": "judge-1", "retry_wait": 0}
        )
        assert client.complete("hi", temperature=0.3) == "echo:hi"
        assert len(server.requests) == 2
        assert server.requests[-1].body["model"] == "judge-1"
        assert server.requests[-1].body["temperature"] == 0.3
        out = asyncio.run(client.acomplete([("system", "be brief"), ("user", "yo")]))
        assert out == "echo:yo"
        assert server.requests[-1].body["messages"][0] == {"role": "system", "content": "be brief"}
        client.close()


def test_gives_up_after_retries_with_a_clear_error() -> None:
    with OpenAIServer() as server:
        server.enqueue(*[Reply(status=503, error="down")] * 10)
        client = ChatClient.from_params(
            {"base_url": server.base_url, "retries": 1, "retry_wait": 0}
        )
        with pytest.raises(LLMError, match="failed"):
            client.complete("hi")
        assert len(server.requests) == 2


def test_langchain_chat_model() -> None:
    client = ChatClient.from_params({}, chat_model=FakeListChatModel(responses=["a", "b"]))
    assert client.backend == "langchain"
    assert client.complete("x", temperature=0.1) == "a"
    assert asyncio.run(client.acomplete("y")) == "b"


def test_chat_model_by_dotted_path_and_bad_paths() -> None:
    client = ChatClient.from_params({"chat_model": "tests.plugins.test_llm:_make_model"})
    assert client.complete("x") == "from-factory"
    with pytest.raises(ConfigError, match="no_such_module"):
        ChatClient.from_params({"chat_model": "no_such_module:x"})


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    client = ChatClient.from_params({"api_key_env": "MY_JUDGE_KEY"})
    with pytest.raises(ConfigError, match="MY_JUDGE_KEY"):
        client.complete("hi")


def _make_model() -> FakeListChatModel:
    return FakeListChatModel(responses=["from-factory"])
