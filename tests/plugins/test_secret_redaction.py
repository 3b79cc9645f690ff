"""The default secret redactor: on by default, configurable, with an off switch. Real runs
(LangChain, fw.span, feedback, the service's telemetry endpoint) into a real store, then every
row of every table is searched for the secret."""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path

import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool

from flywheel_middleware.testing.fakes import EchoChatModel


def fresh_key(prefix: str = "sk-proj-") -> str:
    return prefix + secrets.token_hex(24)


def stored_text(db: Path) -> str:
    """Every row of every table of the SQLite store, as one text."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(repr(row) for t in tables for row in con.execute(f'SELECT * FROM "{t}"'))
    finally:
        con.close()


@pytest.fixture
def run(tmp_path):
    """``run(yaml)`` configures the runtime on a fresh SQLite file; yields its path."""
    import flywheel_middleware as fw

    db = tmp_path / "flywheel.db"

    def configure(extra: str = "", writer: str = "auto") -> Path:
        fw.configure(config=f"store: {{url: 'sqlite:///{db}', writer: {writer}}}\n{extra}")
        return db

    yield configure
    fw.shutdown()


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_langchain_run_with_keys_in_metadata_and_tool_args_stores_none(run, writer) -> None:
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler

    import flywheel_middleware as fw

    db = run(writer=writer)
    key, tool_key, error_key = fresh_key(), fresh_key("sk-ant-"), fresh_key()

    @tool
    def call_api(url: str, api_key: str) -> dict:
        """Call an HTTP API with a key."""
        return {"status": 200, "echo": f"called {url} with {api_key}"}

    @tool
    def failing(query: str) -> str:
        """Fails, naming the key it was given."""
        raise ValueError(f"upstream refused key {error_key}")

    handler = FlywheelCallbackHandler(workflow="qa", metadata={"openai": key})
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | EchoChatModel()
    config = {"callbacks": [handler], "metadata": {"api_key": key, "note": f"uses {key}"}}
    answer = chain.invoke({"q": f"my key is {key}"}, config=config)
    assert key in answer.content  # the agent's own values are never changed
    call_api.invoke({"url": "https://api.example.com", "api_key": tool_key}, config=config)
    with pytest.raises(ValueError):
        failing.invoke({"query": "x"}, config={"callbacks": [handler]})
    EchoChatModel().invoke(f"a root call with {key}", config={"callbacks": [handler]})
    assert fw.flush(30)

    text = stored_text(db)
    assert text.count("'qa'") >= 4, "the runs were recorded"
    for secret in (key, tool_key, error_key):
        assert secret[10:] not in text
    assert "sk-proj-[REDACTED]" in text and "upstream refused key" in text
    spans = fw.get_store().execute("SELECT input, error FROM span WHERE name = 'call_api'")
    assert json.loads(spans[0][0]) == {"url": "https://api.example.com", "api_key": "[REDACTED]"}


def test_an_authorization_header_in_an_input_dict_is_redacted(run) -> None:
    import flywheel_middleware as fw

    db = run()
    token, curl_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    request = {
        "url": "https://api.example.com/v1/items",
        "headers": {"Authorization": f"Bearer {token}", "Accept": "application/json"},
        "command": f"curl -H 'Authorization: Bearer {curl_token}' https://api.example.com",
    }
    with fw.rollout("http", input=request) as r:
        with fw.span("fetch", kind="tool", input=request) as s:
            s.set_output({"ok": True})
    assert fw.flush(30)

    text = stored_text(db)
    assert token not in text and curl_token not in text
    [(stored,)] = fw.get_store().execute("SELECT input FROM span WHERE name = 'fetch'")
    assert json.loads(stored) == {
        "url": "https://api.example.com/v1/items",
        "headers": {"Authorization": "[REDACTED]", "Accept": "application/json"},
        "command": "curl -H 'Authorization: Bearer [REDACTED]' https://api.example.com",
    }
    assert request["headers"]["Authorization"] == f"Bearer {token}"  # the agent's dict is intact
    assert r.id


def test_feedback_metadata_and_telemetry_payloads_are_redacted(run) -> None:
    from fastapi.testclient import TestClient

    import flywheel_middleware as fw
    from flywheel_middleware.service.app import create_app

    db = run()
    key, password = fresh_key(), secrets.token_hex(8)
    with fw.rollout("qa") as r:
        pass
    fw.feedback(r.id, rating=2, comment=f"it printed {key}", metadata={"password": password})
    with TestClient(create_app(api_keys=["k-1"])) as client:
        resp = client.post(
            "/v1/telemetry",
            json={"session_id": "s1", "events": [{"event_type": "copy", "payload": {"text": key}}]},
            headers={"X-API-Key": "k-1"},
        )
        assert resp.status_code == 202
    assert fw.flush(30)

    text = stored_text(db)
    assert key[10:] not in text and password not in text
    [(comment, metadata)] = fw.get_store().execute("SELECT comment, metadata FROM feedback")
    assert comment == "it printed sk-proj-[REDACTED]"
    assert json.loads(metadata) == {"password": "[REDACTED]"}
    [(payload,)] = fw.get_store().execute("SELECT payload FROM telemetry_event")
    assert json.loads(payload) == {"text": "sk-proj-[REDACTED]"}


def test_the_off_switch_stores_everything_verbatim(run) -> None:
    import flywheel_middleware as fw

    db = run("redaction: {secrets: false}\n")
    key, token = fresh_key(), secrets.token_urlsafe(24)
    request = {"headers": {"Authorization": f"Bearer {token}"}, "api_key": key}
    with fw.span("fetch", kind="tool", input=request):
        pass
    assert fw.flush(30)
    [(stored,)] = fw.get_store().execute("SELECT input FROM span")
    assert json.loads(stored) == request
    assert key in stored_text(db)


def test_extra_patterns_and_keys_from_yaml(run) -> None:
    import flywheel_middleware as fw

    run("redaction:\n  patterns: ['(ACME-)[0-9]{6}']\n  keys: [ssn]\n")
    with fw.span(
        "lookup", kind="tool", input={"order": "ACME-123456", "customer_ssn": "078-05-1120"}
    ) as s:
        s.set_output(f"found {fresh_key()}")  # the defaults still apply
    assert fw.flush(30)
    [(stored, output)] = fw.get_store().execute("SELECT input, output FROM span")
    assert json.loads(stored) == {"order": "ACME-[REDACTED]", "customer_ssn": "[REDACTED]"}
    assert json.loads(output) == "found sk-proj-[REDACTED]"


def test_a_bad_extra_pattern_is_a_config_error_naming_it() -> None:
    from flywheel_middleware.config import parse_config
    from flywheel_middleware.errors import ConfigError

    with pytest.raises(ConfigError, match=r"redaction\.patterns.*'\(unclosed'"):
        parse_config("redaction: {patterns: ['(unclosed']}\n")


CASES = [
    ("key sk-proj-" + "a1B2" * 10 + " ok", "key sk-proj-[REDACTED] ok"),
    ("sk-ant-api03-" + "x" * 30, "sk-ant-[REDACTED]"),
    ("ghp_" + "A" * 36, "ghp_[REDACTED]"),
    ("xoxb-123456789012-abcdefghij", "xoxb-[REDACTED]"),
    ("id AKIAIOSFODNN7EXAMPLE", "id AKIA[REDACTED]"),
    ("AIza" + "b" * 35, "AIza[REDACTED]"),
    ("Authorization: Bearer abcdefghijklmnop", "Authorization: Bearer [REDACTED]"),
    ("postgresql://app:hunter2@db:5432/x", "postgresql://app:[REDACTED]@db:5432/x"),
    ("export OPENAI_API_KEY=abc123def", "export OPENAI_API_KEY=[REDACTED]"),
    ('{"password": "hunter22"}', '{"password": "[REDACTED]"}'),
    ("accesstoken=abcdef12", "accesstoken=[REDACTED]"),
    ("AuthToken: abcdef34", "AuthToken: [REDACTED]"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----", "[REDACTED]"),
    # ordinary text is left alone
    ("a task-management-system for the bearer of bad news", None),
    ("reset the password from the sign-in page", None),
    ("http://localhost:8080/items@2", None),
]
"""(text, what it is stored as; None: stored as it is)."""


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_what_the_default_patterns_catch_and_leave(text, expected) -> None:
    from flywheel_middleware.recording.secrets import SecretRedactor

    redacted = SecretRedactor().text(text)
    if expected is None:
        assert redacted is text
    else:
        assert redacted == expected


def test_values_are_copied_where_changed_and_kept_where_not() -> None:
    from flywheel_middleware.recording.secrets import SecretRedactor

    redactor = SecretRedactor()
    clean = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "input_tokens": 3}
    assert redactor.value(clean) is clean
    mixed = {"keep": clean, "x-api-key": "k", "access_token": 12345, "secret": None, "flag": True}
    out = redactor.value(mixed)
    assert out == {"keep": clean, "x-api-key": "[REDACTED]", "access_token": "[REDACTED]"} | {
        "secret": None,
        "flag": True,
    }
    assert out["keep"] is clean and mixed["x-api-key"] == "k"
    cyclic: list = []
    cyclic.append(cyclic)
    assert "[REDACTED]" in json.dumps(redactor.value(cyclic))  # bounded, never a RecursionError


@pytest.mark.parametrize(
    "key",
    ["Proxy-Authorization", "openai.api.key", "Set Cookie", "TO\u212aEN", "user.Session-ID"],
)
def test_a_secret_key_deep_in_a_value_is_found_whatever_its_spelling(key) -> None:
    """Values are first searched as lower-cased JSON text; a key in any spelling that counts
    as secret (separators, case, a Kelvin sign that lower-cases to k, an extra key from YAML)
    must still send the value through the full walk."""
    from flywheel_middleware.recording.secrets import SecretRedactor

    redactor = SecretRedactor(keys=["session_id"])
    value = {"calls": [{"request": {"headers": {key: "v4lue", "Accept": "json"}}}]}
    out = redactor.value(value)
    assert out["calls"][0]["request"]["headers"] == {key: "[REDACTED]", "Accept": "json"}
    assert SecretRedactor().value({"t": [1, {"a": "ghp_" + "A" * 36}]}) == {
        "t": [1, {"a": "ghp_[REDACTED]"}]
    }
    odd = {"set": {"sk-proj-" + "a1B2" * 10}}  # not plain JSON: walked, its member scanned
    assert "[REDACTED]" in json.dumps(SecretRedactor().value(odd))
    # an extra key with a character JSON escapes is not searched for in JSON text
    for extra in ('my"cred', "corp\\cred", "tab\tcred"):
        assert SecretRedactor(keys=[extra]).value({"h": {extra: "hunter2"}}) == {
            "h": {extra: "[REDACTED]"}
        }


def test_every_case_is_redacted_on_its_way_to_the_store(run) -> None:
    """Through the recorder, which first looks for a secret's traces in a record's JSON text."""
    import flywheel_middleware as fw

    run()
    for index, (text, _) in enumerate(CASES):
        with fw.span(f"case-{index}", kind="tool", input={"command": text}):
            pass
    assert fw.flush(30)
    rows = dict(fw.get_store().execute("SELECT name, input FROM span"))
    for index, (text, expected) in enumerate(CASES):
        assert json.loads(rows[f"case-{index}"]) == {"command": expected or text}, text
