"""The adapter contract suite over flywheel's own adapters (LangChain, OpenAI SDK, AgentScope)."""

from __future__ import annotations

import pytest

from flywheel_middleware.testing.contract import AdapterContract
from flywheel_middleware.testing.drivers import DRIVERS


@pytest.fixture(params=sorted(DRIVERS))
def flywheel_driver(request: pytest.FixtureRequest):
    pytest.importorskip({"langchain": "langchain_core"}.get(request.param, request.param))
    return DRIVERS[request.param]()


class TestAdapterContract(AdapterContract):
    """Every behaviour of the contract, once per adapter."""
