"""Adapter contract suite, shipped as a pytest plugin (entry point ``flywheel_contract``).

Loaded in every pytest run of a project that installs flywheel, so importing it must stay cheap
and it adds no tests unless a test module asks for the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def openai_server() -> Iterator[Any]:
    """A started loopback OpenAI-protocol server (``flywheel_middleware.testing.openai_server``)."""
    from .openai_server import openai_server_fixture

    yield from openai_server_fixture()
