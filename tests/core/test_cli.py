"""The core commands, run through click as a user would."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.config import load_config


@pytest.fixture
def recorded(fw, sqlite_url):
    """A good and a bad conversation, with spans, recorded through the public API."""
    with fw.rollout("support", user_id="u1", input="Where is order 42?") as good:
        with fw.span("agent", kind="agent"):
            with fw.span("lookup_order", kind="tool", input={"id": 42}) as tool:
                tool.set_output({"status": "shipped"})
            with fw.span("chat", kind="llm", model="gpt-test") as llm:
                llm.set_usage(11, 22)
        good.set_output("Order 42 has shipped.")
    with fw.rollout("support", user_id="u2", input="Cancel my plan") as bad:
        bad.set_output("I like turtles.")
    fw.feedback(good.id, rating=5)
    fw.feedback(bad.id, rating=1, comment="did not answer")
    fw.flush()
    return sqlite_url, good, bad


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_show_prints_a_readable_span_tree(recorded):
    url, good, _ = recorded
    result = run("show", good.id[:16], "--store", url)  # a unique prefix works
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    text = result.output
    assert f"support rollout {good.id}" in lines[0]
    agent = next(i for i, line in enumerate(lines) if "agent agent" in line)
    tool = next(i for i, line in enumerate(lines) if "tool lookup_order" in line)
    chat = next(i for i, line in enumerate(lines) if "llm chat" in line)
    assert agent < tool < chat
    indent = lambda line: len(line) - len(line.lstrip("│ ├└─"))  # noqa: E731
    assert indent(lines[tool]) > indent(lines[agent]) and indent(lines[chat]) == indent(lines[tool])
    assert "model=gpt-test" in lines[chat] and "tokens=11→22" in lines[chat]
    assert '"shipped"' in lines[tool]
    assert "feedback [explicit] rating=5" in text


def test_show_unknown_rollout_fails_clearly(recorded):
    url, *_ = recorded
    result = CliRunner().invoke(main, ["show", "nope", "--store", url])
    assert result.exit_code != 0 and "no rollout with id 'nope'" in result.output


def test_stats_and_bad_cases(recorded):
    url, good, bad = recorded
    result = run("--store", url, "stats")
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if "support" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:2] == ["support", "2"] and cells[4:7] == ["2", "3.00", "1"]
    result = run("bad-cases", "--store", url)
    assert bad.id in result.output and good.id not in result.output
    assert "I like turtles." in result.output and "did not answer" in result.output
    as_json = run("bad-cases", "--store", url, "--json")
    import json

    data = json.loads(as_json.output)
    assert [d["rollout_id"] for d in data] == [bad.id] and data[0]["rating"] == 1.0


def test_rollouts_lists_newest_first(recorded):
    url, good, bad = recorded
    out = run("rollouts", "--store", url).output
    assert out.index(bad.id) < out.index(good.id)


def test_init_writes_a_valid_commented_config(tmp_path):
    target = tmp_path / "flywheel.yaml"
    assert run("init", target).exit_code == 0
    text = target.read_text()
    assert "# flywheel-middleware configuration" in text
    config = load_config(target)
    assert "qa" in config.workflows and config.triggers.low_rating.window == 50
    again = CliRunner().invoke(main, ["init", str(target)])
    assert again.exit_code != 0 and "--force" in again.output


def test_db_upgrade_reports_the_revision(tmp_path):
    from flywheel_middleware.store.database import Store

    url = f"sqlite:///{tmp_path / 'new.db'}"
    head = Store(url, migrate=False).head_revision()
    result = run("db", "upgrade", "--store", url)
    assert result.exit_code == 0 and f"empty → {head}" in result.output
    assert f"{head} → {head}" in run("db", "upgrade", "--store", url).output


def test_bad_config_file_is_a_clean_cli_error(tmp_path):
    bad = tmp_path / "flywheel.yaml"
    bad.write_text("store:\n  ulr: sqlite:///x.db\n")
    result = CliRunner().invoke(main, ["stats", "--config", str(bad)])
    assert result.exit_code != 0
    assert "line 2: unknown key 'store.ulr'" in result.output and "Traceback" not in result.output


def test_rollouts_and_bad_cases_show_graph_state_as_question_and_answer(fw, sqlite_url):
    """A LangGraph-style state is shown as its question and final answer, not raw JSON."""
    state = {
        "messages": [
            {"type": "human", "content": "Where is order 42?"},
            {
                "type": "ai",
                "content": "",
                "tool_calls": [{"name": "lookup", "args": {}, "id": "c"}],
            },
            {"type": "tool", "content": "shipped", "tool_call_id": "c"},
            {"type": "ai", "content": "It shipped."},
        ]
    }
    with fw.rollout("graph", input={"messages": [["user", "Where is order 42?"]]}) as r:
        r.set_output(state)
    fw.feedback(r.id, rating=1)
    fw.flush()
    out = CliRunner().invoke(main, ["rollouts", "--store", sqlite_url], terminal_width=200).output
    assert "Where is order 42?" in out and "It shipped." in out and "messages" not in out
    out = run("bad-cases", "--store", sqlite_url).output
    assert "user: Where is order 42?" in " ".join(out.split())
    assert "agent: It shipped." in " ".join(out.split())


def test_show_reads_messages_as_text(fw, sqlite_url):
    """An answer recorded as OpenTelemetry GenAI messages (as OTLP ingest stores them) is shown
    as its text, not as JSON."""
    answer = [{"role": "assistant", "parts": [{"type": "text", "content": "Use Forgot password."}]}]
    with fw.rollout("qa", input="How do I reset my password?") as r:
        with fw.span("chat", kind="llm") as s:
            s.set_output(answer)
        r.set_output(answer)
    fw.flush()
    text = run("show", r.id, "--store", sqlite_url).output
    assert "output Use Forgot password." in " ".join(text.split())
    assert '"parts"' not in text
