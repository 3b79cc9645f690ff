"""``${VAR}`` in a workflow config is stored in config versions and served by ``GET /v1/config``
as the reference, and filled in only by the resolver of the agent's process."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import textwrap

import pytest

WORKFLOW_YAML = """
store: {{url: '{url}'}}
workflows:
  qa:
    config:
      llm:
        model: gpt-4.1-mini
        api_key: ${{FW_TEST_LLM_KEY}}
        base_url: ${{FW_TEST_LLM_BASE:-https://api.openai.com/v1}}
"""
STORED_LLM = {
    "model": "gpt-4.1-mini",
    "api_key": "${FW_TEST_LLM_KEY}",
    "base_url": "${FW_TEST_LLM_BASE:-https://api.openai.com/v1}",
}


@pytest.fixture
def runtime(sqlite_url):
    import flywheel_middleware as fw

    yield fw, sqlite_url
    fw.shutdown()


def test_an_env_reference_is_stored_and_served_as_written_and_filled_in_the_agent(
    runtime, monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    from flywheel_middleware.service.app import create_app

    fw, url = runtime
    key = "sk-proj-" + secrets.token_hex(20)
    monkeypatch.setenv("FW_TEST_LLM_KEY", key)
    monkeypatch.delenv("FW_TEST_LLM_BASE", raising=False)
    fw.configure(config=WORKFLOW_YAML.format(url=url))

    resolution = fw.resolve("qa", "user-1")
    assert resolution.config["llm"] == {
        "model": "gpt-4.1-mini",
        "api_key": key,
        "base_url": "https://api.openai.com/v1",
    }
    with fw.rollout("qa", user_id="user-2") as r:
        assert r.config["llm"]["api_key"] == key

    [(stored,)] = fw.get_store().execute("SELECT config FROM config_version")
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored == {"llm": STORED_LLM}

    with TestClient(create_app(api_keys=["k-1"])) as client:
        resp = client.get("/v1/config/qa", params={"unit": "user-1"}, headers={"X-API-Key": "k-1"})
    assert resp.status_code == 200
    assert resp.json()["config"] == {"llm": STORED_LLM}
    assert key not in resp.text
    assert fw.flush(30)
    dump = fw.get_store().execute("SELECT * FROM config_version")
    assert key not in repr(dump)


def test_processes_with_different_values_share_one_version(runtime, tmp_path) -> None:
    """Two real processes, each with its own value: each gets its value, one version exists."""
    fw, url = runtime
    (tmp_path / "flywheel.yaml").write_text(WORKFLOW_YAML.format(url=url))
    script = textwrap.dedent(
        """
        import flywheel_middleware as fw
        fw.configure("flywheel.yaml")
        res = fw.resolve("qa", "u1")
        print(res.config["llm"]["api_key"], res.version_id)
        """
    )
    seen = []
    for value in ("sk-first-process-value-0000", "sk-second-process-value-111"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env={**os.environ, "FW_TEST_LLM_KEY": value},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        seen.append(done.stdout.split())
    assert [s[0] for s in seen] == ["sk-first-process-value-0000", "sk-second-process-value-111"]
    assert seen[0][1] == seen[1][1]  # the same version id
    fw.configure(store_url=url)
    assert fw.get_store().execute("SELECT COUNT(*) FROM config_version")[0][0] == 1


def test_while_the_store_is_unreachable_the_yaml_config_is_filled_in_too(
    tmp_path, monkeypatch
) -> None:
    from flywheel_middleware.config import parse_config
    from flywheel_middleware.loop.versions import StoreResolver, stored_config
    from flywheel_middleware.store.database import Store

    monkeypatch.setenv("FW_TEST_LLM_KEY", "sk-during-an-outage-0123456789")
    gone = tmp_path / "gone.db"
    gone.mkdir()  # SQLite cannot open a directory: every read fails
    store = Store(f"sqlite:///{gone}", migrate=False)
    config = parse_config(WORKFLOW_YAML.format(url=f"sqlite:///{gone}"))
    resolution = StoreResolver(store, config, background=False).resolve("qa", "u1")
    assert resolution.version_id is None  # served from the YAML
    assert resolution.config["llm"]["api_key"] == "sk-during-an-outage-0123456789"
    assert stored_config(store, config, "qa", resolution) == {"llm": STORED_LLM}
    store.dispose()


def test_an_unset_variable_is_named_and_never_raised_into_the_agent(
    runtime, monkeypatch, caplog
) -> None:
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
    from langchain_core.prompts import ChatPromptTemplate

    from flywheel_middleware.config import MissingEnvError, expand_env
    from flywheel_middleware.testing.fakes import EchoChatModel

    fw, url = runtime
    monkeypatch.delenv("FW_TEST_LLM_KEY", raising=False)
    fw.configure(config=WORKFLOW_YAML.format(url=url))  # loading does not need the value
    with caplog.at_level(logging.WARNING):
        resolution = fw.resolve("qa", "u1")
        with fw.rollout("qa", user_id="u2") as r:
            config = r.config
            chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | EchoChatModel()
            chain.invoke({"q": "hi"}, config={"callbacks": [FlywheelCallbackHandler()]})
    assert resolution.config["llm"]["api_key"] == "${FW_TEST_LLM_KEY}"
    assert config["llm"]["api_key"] == "${FW_TEST_LLM_KEY}"
    assert resolution.config["llm"]["base_url"] == "https://api.openai.com/v1"
    named = [rec for rec in caplog.records if "FW_TEST_LLM_KEY" in rec.getMessage()]
    assert named and all("workflow 'qa'" in rec.getMessage() for rec in named)

    with pytest.raises(MissingEnvError, match="FW_TEST_LLM_KEY is not set") as info:
        expand_env({"llm": {"api_key": "${FW_TEST_LLM_KEY}"}}, "flywheel.yaml")
    assert info.value.name == "FW_TEST_LLM_KEY"


def test_other_sections_are_still_filled_in_at_load(monkeypatch) -> None:
    from flywheel_middleware.config import parse_config

    monkeypatch.setenv("FW_TEST_SERVICE_KEY", "k-from-env")
    config = parse_config(
        "service: {api_keys: ['${FW_TEST_SERVICE_KEY}']}\n"
        "workflows: {qa: {config: {key: '${FW_TEST_SERVICE_KEY}'}}}\n"
    )
    assert config.service.api_keys == ["k-from-env"]
    assert config.workflows["qa"].config == {"key": "${FW_TEST_SERVICE_KEY}"}
