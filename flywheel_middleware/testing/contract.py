"""The adapter contract suite, shipped as a pytest plugin (entry point ``flywheel_contract``).

Every capture adapter must keep these behaviours: one rollout per top-level call with one
root span and an ``llm`` span, outputs identical to the unwrapped framework's, token usage
captured, errors recorded and re-raised unchanged, no span under the wrong parent or rollout
when calls run concurrently, attachment to an active ``fw.rollout``, no exception reaching the
host when the store is broken, and (for adapters that apply configs) the resolved config used.

Use it for your own adapter: write an ``AdapterDriver`` subclass, provide it from a fixture
named ``flywheel_driver``, and subclass the suite in a test module::

    from flywheel_middleware.testing.contract import AdapterContract, AdapterDriver

    class MyDriver(AdapterDriver): ...

    @pytest.fixture
    def flywheel_driver():
        return MyDriver()

    class TestMyAdapter(AdapterContract):
        pass

The plugin is loaded in every pytest run of a project that installs flywheel, so importing it
must stay cheap (pytest and the standard library only) and it adds no tests by itself. It also
provides the ``openai_server`` fixture (a loopback OpenAI-protocol server).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["AdapterContract", "AdapterDriver", "Captured", "ContractEnv"]


# -- what a driver is ---------------------------------------------------------------------------


class AdapterDriver:
    """Knows how to make one framework do simple things, with and without the adapter.

    ``text`` arguments are short user messages; the model behind the driver must answer so
    that the answer contains the text (the loopback server and the fake models echo).
    """

    name = "adapter"
    supports_config = False

    def run(self, env: ContractEnv, text: str) -> Any:
        """One call through the adapter; returns what the host sees."""
        raise NotImplementedError

    def run_unwrapped(self, env: ContractEnv, text: str) -> Any:
        """The same call without the adapter."""
        raise NotImplementedError

    def run_failing(self, env: ContractEnv, *, wrapped: bool = True) -> Any:
        """A call that fails inside the framework (the exception must propagate)."""
        raise NotImplementedError

    def run_concurrent(self, env: ContractEnv, texts: list[str]) -> list[Any]:
        """Calls for all ``texts`` at once (threads, batch or asyncio); outputs in order."""
        raise NotImplementedError

    def run_configured(self, env: ContractEnv, text: str) -> dict[str, Any]:
        """One call under the config in ``env.config``; returns the request the model got."""
        raise NotImplementedError

    def normalize(self, output: Any) -> Any:
        """A comparable form of an output (drop ids and timestamps)."""
        return output

    def text_of(self, output: Any) -> str:
        return str(output)

    def close(self) -> None:
        """Release what the driver opened."""


# -- what the suite reads back --------------------------------------------------------------------


@dataclass
class Captured:
    """One stored rollout and its spans."""

    rollout: Any
    spans: list[Any] = field(default_factory=list)

    @property
    def roots(self) -> list[Any]:
        return [s for s in self.spans if s.parent_id is None]

    def of_kind(self, kind: str) -> list[Any]:
        return [s for s in self.spans if s.kind == kind]

    def children(self, span: Any) -> list[Any]:
        return [s for s in self.spans if s.parent_id == span.id]


CONTRACT_CONFIG = {
    "llm": {"temperature": 0.55, "max_tokens": 77},
    "prompt": {"system": "CONTRACT SYSTEM PROMPT"},
}


class ContractEnv:
    """A fresh store and runtime for one contract test, plus a lazily started loopback server."""

    workflow = "contract"

    def __init__(self, tmp_path: Any) -> None:
        import flywheel_middleware as fw

        self.fw = fw
        self.url = f"sqlite:///{tmp_path / 'contract.db'}"
        self.config = CONTRACT_CONFIG
        fw.configure(
            store_url=self.url, config={"workflows": {self.workflow: {"config": self.config}}}
        )
        self._server: Any = None

    @property
    def server(self) -> Any:
        if self._server is None:
            from flywheel_middleware.testing.openai_server import OpenAIServer

            self._server = OpenAIServer().start()
        return self._server

    def read(self) -> list[Captured]:
        """Flush, then every rollout with its spans (oldest first)."""
        from sqlmodel import select

        from flywheel_middleware.store.models import Rollout, Span

        assert self.fw.flush(10), "the recorder did not flush within 10 s"
        with self.fw.get_store().session() as session:
            rollouts = list(session.exec(select(Rollout).order_by(Rollout.started_at)).all())
            spans = list(session.exec(select(Span).order_by(Span.sequence)).all())
        return [Captured(r, [s for s in spans if s.rollout_id == r.id]) for r in rollouts]

    def close(self) -> None:
        self.fw.shutdown()
        if self._server is not None:
            self._server.stop()


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def openai_server() -> Iterator[Any]:
    """A started loopback OpenAI-protocol server (``flywheel_middleware.testing.openai_server``)."""
    from flywheel_middleware.testing.openai_server import openai_server_fixture

    yield from openai_server_fixture()


@pytest.fixture
def flywheel_contract_env(tmp_path: Any) -> Iterator[ContractEnv]:
    env = ContractEnv(tmp_path)
    yield env
    env.close()


# -- the suite ------------------------------------------------------------------------------------


class AdapterContract:
    """The behaviours every adapter keeps. Subclass it as ``Test...`` with a ``flywheel_driver``
    fixture in scope."""

    @pytest.fixture
    def env(self, flywheel_contract_env: ContractEnv, flywheel_driver: AdapterDriver) -> Any:
        yield flywheel_contract_env
        flywheel_driver.close()

    def test_span_tree_shape(self, env: ContractEnv, flywheel_driver: AdapterDriver) -> None:
        flywheel_driver.run(env, "tree shape")
        [c] = env.read()
        assert c.rollout.status == "succeeded"
        assert len(c.roots) == 1, f"expected one root span, got {[s.name for s in c.roots]}"
        ids = {s.id for s in c.spans}
        assert all(s.parent_id is None or s.parent_id in ids for s in c.spans), "orphan spans"
        llms = c.of_kind("llm")
        assert llms, f"no llm span among {[(s.kind, s.name) for s in c.spans]}"
        assert "tree shape" in _dumps(llms[0].input)
        assert "tree shape" in _dumps(llms[-1].output)
        assert all(s.ended_at is not None and s.status == "ok" for s in c.spans)

    def test_outputs_unchanged(self, env: ContractEnv, flywheel_driver: AdapterDriver) -> None:
        wrapped = flywheel_driver.run(env, "same output")
        plain = flywheel_driver.run_unwrapped(env, "same output")
        assert flywheel_driver.normalize(wrapped) == flywheel_driver.normalize(plain)
        assert "same output" in flywheel_driver.text_of(wrapped)

    def test_usage_captured(self, env: ContractEnv, flywheel_driver: AdapterDriver) -> None:
        flywheel_driver.run(env, "count my tokens")
        [c] = env.read()
        llms = c.of_kind("llm")
        assert all(s.input_tokens and s.output_tokens for s in llms), [
            (s.name, s.input_tokens, s.output_tokens) for s in llms
        ]
        assert c.rollout.input_tokens == sum(s.input_tokens for s in llms)
        assert c.rollout.output_tokens == sum(s.output_tokens for s in llms)

    def test_errors_recorded_and_reraised(
        self, env: ContractEnv, flywheel_driver: AdapterDriver
    ) -> None:
        with pytest.raises(Exception) as plain:
            flywheel_driver.run_failing(env, wrapped=False)
        with pytest.raises(Exception) as wrapped:
            flywheel_driver.run_failing(env, wrapped=True)
        assert type(wrapped.value) is type(plain.value)
        assert str(wrapped.value) == str(plain.value)
        [c] = env.read()
        assert c.rollout.status == "failed"
        name = type(wrapped.value).__name__
        failed = [s for s in c.spans if s.status == "error"]
        assert failed and all(s.error and name in s.error for s in failed), [
            (s.name, s.error) for s in failed
        ]

    def test_parenting_under_concurrency(
        self, env: ContractEnv, flywheel_driver: AdapterDriver
    ) -> None:
        texts = [f"parallel question {i}" for i in range(6)]
        outputs = flywheel_driver.run_concurrent(env, texts)
        assert [t in flywheel_driver.text_of(o) for t, o in zip(texts, outputs, strict=True)] == [
            True
        ] * len(texts)
        rollouts = env.read()
        assert len(rollouts) == len(texts)
        seen = set()
        for c in rollouts:
            assert len(c.roots) == 1
            ids = {s.id for s in c.spans}
            assert all(s.parent_id is None or s.parent_id in ids for s in c.spans)
            mine = [t for t in texts if t in _dumps(c.of_kind("llm")[0].input)]
            assert len(mine) == 1, f"rollout mixes calls: {mine}"
            for llm in c.of_kind("llm"):
                assert mine[0] in _dumps(llm.input) + _dumps(llm.output)
            seen.add(mine[0])
        assert seen == set(texts)

    def test_rollout_attachment(self, env: ContractEnv, flywheel_driver: AdapterDriver) -> None:
        with env.fw.rollout("outer", user_id="contract-user") as r:
            flywheel_driver.run(env, "first call")
            flywheel_driver.run(env, "second call")
        [c] = env.read()
        assert c.rollout.id == r.id and c.rollout.user_id == "contract-user"
        assert len(c.roots) == 2
        assert len(c.of_kind("llm")) >= 2

    def test_host_unharmed_when_store_broken(
        self, env: ContractEnv, flywheel_driver: AdapterDriver
    ) -> None:
        expected = flywheel_driver.normalize(flywheel_driver.run_unwrapped(env, "still works"))

        class Broken:
            """A backend whose every call fails, as a broken store or resolver would."""

            def __getattr__(self, name: str) -> Any:
                def broken(*args: Any, **kwargs: Any) -> Any:
                    raise RuntimeError("store is broken")

                return broken

        from flywheel_middleware.capture import backend

        working = backend.current()
        backend.install(Broken())
        try:
            self._run_with_broken_backend(env, flywheel_driver, expected)
        finally:
            backend.install(working)

    def _run_with_broken_backend(
        self, env: ContractEnv, flywheel_driver: AdapterDriver, expected: Any
    ) -> None:
        assert flywheel_driver.normalize(flywheel_driver.run(env, "still works")) == expected
        with pytest.raises(Exception) as plain:
            flywheel_driver.run_failing(env, wrapped=False)
        with pytest.raises(Exception) as wrapped:
            flywheel_driver.run_failing(env, wrapped=True)
        assert type(wrapped.value) is type(plain.value)

    def test_config_applied(self, env: ContractEnv, flywheel_driver: AdapterDriver) -> None:
        if not flywheel_driver.supports_config:
            pytest.skip(f"{flywheel_driver.name} records only; it does not apply configs")
        request = flywheel_driver.run_configured(env, "configured call")
        sent = _dumps(request)
        assert request.get("temperature") == env.config["llm"]["temperature"], sent
        assert str(env.config["llm"]["max_tokens"]) in sent
        assert env.config["prompt"]["system"] in sent
