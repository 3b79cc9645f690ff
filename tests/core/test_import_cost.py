"""What the capture API costs to import, and what recording pulls in, measured on sys.modules
in a fresh interpreter (the API/SDK split of the design's Layout)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("sqlalchemy", "sqlmodel", "alembic", "fastapi", "uvicorn", "numpy", "sklearn")


def _modules_after(code: str, cwd) -> list[str]:
    """The modules loaded once ``code`` ran in a new interpreter, sorted."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules if m.split(".")[0] in HEAVY})


def test_importing_the_api_and_the_adapters_loads_nothing_heavy(tmp_path):
    modules = _modules_after("import flywheel_middleware", tmp_path)
    assert _heavy(modules) == []
    assert not [m for m in modules if m.startswith("flywheel_middleware.store")]
    modules = _modules_after(
        """
        import flywheel_middleware
        from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
        from flywheel_middleware.adapters.openai import wrap_openai
        """,
        tmp_path,
    )
    assert _heavy(modules) == []
    ours = [m for m in modules if m.startswith("flywheel_middleware.")]
    for layer in ("store", "recording", "loop", "learn", "plugin_system", "plugins"):
        assert not [m for m in ours if m.startswith(f"flywheel_middleware.{layer}")], layer


def test_recording_langchain_calls_without_yaml_loads_no_plugin_and_no_loop(tmp_path):
    """The recorder starts the store (SQLAlchemy is expected then), but neither the loop nor
    a built-in plugin: nothing in a default configuration needs them."""
    modules = _modules_after(
        """
        import flywheel_middleware as fw
        from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_core.prompts import ChatPromptTemplate

        handler = FlywheelCallbackHandler(workflow="qa")
        model = FakeListChatModel(responses=["a", "b", "c", "d"])
        chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | model
        model.invoke("hi", config={"callbacks": [handler]})  # a root call: one call record
        chain.invoke({"q": "hi"}, config={"callbacks": [handler]})  # a rollout with children
        assert fw.flush(60)
        assert fw.get_store().execute("SELECT COUNT(*) FROM rollout")[0][0] == 2
        """,
        tmp_path,
    )
    assert "sqlalchemy" in modules  # it did record
    assert not [m for m in modules if m.startswith("flywheel_middleware.plugins.")]
    assert not [
        m
        for m in modules
        if m.startswith(("flywheel_middleware.loop", "flywheel_middleware.learn"))
    ]
