"""The Studio importer on Studio-shaped SQLite databases of both span_table schemas."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.importers.agentscope_studio import (
    StudioImportError,
    import_studio,
    span_id_for,
)
from flywheel_middleware.loop.dataset_rules import check_file
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.queries import spans_of

T0 = 1_764_000_000_000_000_000  # ns
TRACE = "0af7651916cd43dd8448eb211c80319c"

COMMON = """
CREATE TABLE run_table (id varchar PRIMARY KEY, project varchar, name varchar,
  timestamp varchar, run_dir varchar, pid integer, status varchar);
CREATE TABLE reply_table (replyId varchar PRIMARY KEY, replyRole varchar, replyName varchar,
  run_id varchar, createdAt varchar, finishedAt varchar);
CREATE TABLE message_table (id varchar PRIMARY KEY, run_id varchar, replyId varchar,
  msg text, speech text);
"""


def _common_rows(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO run_table VALUES ('run1','shop','deploy-1','2025-12-01 10:00:00','/r',1,'done')"
    )
    replies = [
        ("rp-u1", "user", "user", "2025-12-01T10:00:01Z", "2025-12-01T10:00:01Z"),
        ("rp-a1", "assistant", "Friday", "2025-12-01T10:00:02Z", "2025-12-01T10:00:04Z"),
        ("rp-u2", "user", "user", "2025-12-01T10:01:00Z", "2025-12-01T10:01:00Z"),
        ("rp-a2", "assistant", "Friday", "2025-12-01T10:01:01Z", "2025-12-01T10:01:03Z"),
    ]
    for rid, role, name, c, f in replies:
        conn.execute(
            "INSERT INTO reply_table VALUES (?,?,?,?,?,?)", (rid, role, name, "run1", c, f)
        )
    msgs = [
        ("m1", "rp-u1", {"name": "user", "role": "user", "content": "where is order 42?"}),
        (
            "m2",
            "rp-a1",
            {
                "name": "Friday",
                "role": "assistant",
                "content": [{"type": "text", "text": "Order 42 ships today."}],
            },
        ),
        ("m3", "rp-u2", {"name": "user", "role": "user", "content": "thanks"}),
        ("m4", "rp-a2", {"name": "Friday", "role": "assistant", "content": "You're welcome."}),
    ]
    for mid, reply, msg in msgs:
        conn.execute(
            "INSERT INTO message_table VALUES (?,?,?,?,?)",
            (mid, "run1", reply, json.dumps(msg), None),
        )


def make_new_db(path: Path) -> Path:
    """Studio since Dec 2025: OTLP-shaped span_table with nested-JSON attributes."""
    conn = sqlite3.connect(path)
    conn.executescript(
        COMMON
        + """
CREATE TABLE span_table (id varchar PRIMARY KEY, traceId varchar, spanId varchar,
  traceState varchar, parentSpanId varchar, flags integer, name varchar, kind integer,
  startTimeUnixNano varchar, endTimeUnixNano varchar, latencyNs integer, attributes text,
  events text, links text, status text, resource text, scope text, statusCode integer,
  serviceName varchar, operationName varchar, instrumentationName varchar,
  instrumentationVersion varchar, model varchar, inputTokens integer, outputTokens integer,
  totalTokens integer, conversationId varchar);
"""
    )
    _common_rows(conn)
    spans = [
        (
            "s1",
            "a1b2c3d4e5f60718",
            None,
            "invoke_agent Friday",
            0,
            3_000_000_000,
            {
                "gen_ai": {
                    "operation": {"name": "invoke_agent"},
                    "input": {"messages": '[{"role":"user","content":"where is order 42?"}]'},
                    "output": {
                        "messages": '[{"role":"assistant","content":"Order 42 ships today."}]'
                    },
                },
                "agentscope": {"reply_id": "rp-a1"},
            },
            None,
            None,
            None,
            1,
        ),
        (
            "s2",
            "0000000000000abc",
            "a1b2c3d4e5f60718",
            "chat qwen-max",
            100_000_000,
            1_000_000_000,
            {
                "gen_ai": {
                    "operation": {"name": "chat"},
                    "request": {"model": "qwen-max", "temperature": 0.3},
                }
            },
            "qwen-max",
            30,
            8,
            1,
        ),
        (
            "s3",
            "0000000000000def",
            "a1b2c3d4e5f60718",
            "execute_tool lookup",
            1_100_000_000,
            1_200_000_000,
            {
                "gen_ai": {
                    "operation": {"name": "execute_tool"},
                    "tool": {"call": {"arguments": '{"order": 42}'}},
                }
            },
            None,
            None,
            None,
            2,
        ),
    ]
    for sid, span_id, parent, name, start, end, attrs, model, tin, tout, code in spans:
        conn.execute(
            "INSERT INTO span_table (id, traceId, spanId, parentSpanId, name, kind,"
            " startTimeUnixNano, endTimeUnixNano, latencyNs, attributes, status, statusCode,"
            " model, inputTokens, outputTokens, conversationId) VALUES"
            " (?,?,?,?,?,1,?,?,?,?,?,?,?,?,?,?)",
            (
                sid,
                TRACE,
                span_id,
                parent,
                name,
                str(T0 + start),
                str(T0 + end),
                end - start,
                json.dumps(attrs),
                json.dumps({"code": code, "message": "tool failed" if code == 2 else ""}),
                code,
                model,
                tin,
                tout,
                "run1",
            ),
        )
    conn.commit()
    conn.close()
    return path


def make_old_db(path: Path) -> Path:
    """Studio before Dec 2025: AgentScope 1.x spans, flat attributes, run_id column."""
    conn = sqlite3.connect(path)
    conn.executescript(
        COMMON
        + """
CREATE TABLE span_table (id varchar PRIMARY KEY, traceId varchar, parentSpanId varchar,
  run_id varchar, name varchar, spanKind varchar, attributes text, startTime varchar,
  endTime varchar, latencyMs real, status varchar, statusMessage varchar, events text);
"""
    )
    _common_rows(conn)
    rows = [
        (
            "1111111111111111",
            None,
            "ReActAgent.reply",
            "AGENT",
            {
                "input": "Msg(name='user', content='where is order 42?')",
                "output": "Msg(name='Friday', content='Order 42 ships today.')",
                "project.run_id": "run1",
            },
            "2025-11-01T10:00:00.000Z",
            "2025-11-01T10:00:02.500Z",
            2500.0,
            "OK",
            None,
        ),
        (
            "2222222222222222",
            "1111111111111111",
            "OpenAIChatModel.__call__",
            "LLM",
            {
                "model": "qwen-plus",
                "gen_ai.usage.input_tokens": 12,
                "gen_ai.usage.output_tokens": 5,
            },
            "2025-11-01T10:00:00.100Z",
            "2025-11-01T10:00:01.000Z",
            900.0,
            "OK",
            None,
        ),
        (
            "3333333333333333",
            "1111111111111111",
            "Toolkit.call_tool_function",
            "TOOL",
            {"input": '{"order": 42}'},
            "2025-11-01T10:00:01.100Z",
            "2025-11-01T10:00:01.200Z",
            100.0,
            "ERROR",
            "timeout talking to ERP",
        ),
    ]
    for sid, parent, name, kind, attrs, start, end, lat, status, message in rows:
        conn.execute(
            "INSERT INTO span_table VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                sid,
                "trace-old-1",
                parent,
                "run1",
                name,
                kind,
                json.dumps(attrs),
                start,
                end,
                lat,
                status,
                message,
                "[]",
            ),
        )
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def target(store_url: str):
    s = Store(store_url)
    yield s
    s.dispose()


def _all_rollouts(store: Store) -> list:
    return store.execute(
        "SELECT id, workflow, session_id, input_tokens, output_tokens, status, "
        "metadata FROM rollout ORDER BY started_at"
    )


def test_new_schema(tmp_path: Path, target: Store) -> None:
    db = make_new_db(tmp_path / "database.sqlite")
    result = import_studio(target, db, "support")
    assert result.schema.startswith("otlp") and result.traces == 1
    # rp-a1 is covered by the trace (agentscope.reply_id); rp-a2 has no trace
    assert result.replies == 1
    assert (result.rollouts_added, result.spans_added) == (2, 4)
    rows = _all_rollouts(target)
    traced = [r for r in rows if r[0] == TRACE][0]
    assert traced[1] == "support" and traced[2] == "run1" and (traced[3], traced[4]) == (30, 8)
    meta = json.loads(traced[6]) if isinstance(traced[6], str) else traced[6]
    assert meta["studio_project"] == "shop" and meta["source"] == "agentscope-studio"
    spans = spans_of(target, TRACE)
    by_name = {s.name: s for s in spans}
    root = by_name["invoke_agent Friday"]
    assert root.kind == "agent" and root.parent_id is None
    assert root.output == [{"role": "assistant", "content": "Order 42 ships today."}]
    chat = by_name["chat qwen-max"]
    assert chat.kind == "llm" and chat.model == "qwen-max" and chat.parent_id == root.id
    assert chat.attributes["gen_ai.request.temperature"] == 0.3
    assert abs(chat.duration_ms - 900.0) < 1e-6
    tool = by_name["execute_tool lookup"]
    assert tool.kind == "tool" and tool.status == "error" and tool.error == "tool failed"
    assert tool.input == {"order": 42}
    [untraced] = [r for r in rows if r[0] != TRACE]
    [agent_span] = spans_of(target, untraced[0])
    assert agent_span.name == "Friday" and agent_span.input == "thanks"
    assert {s.workflow for s in [*spans, agent_span]} == {"support"}


def test_old_schema_and_idempotence(tmp_path: Path, target: Store) -> None:
    db = make_old_db(tmp_path / "database.sqlite")
    first = import_studio(target, db, "support")
    assert first.schema.startswith("legacy")
    # no reply id on 1.x spans: both assistant replies also become rollouts of their own
    assert (first.traces, first.replies) == (1, 2)
    assert (first.rollouts_added, first.spans_added) == (3, 5)
    again = import_studio(target, db, "support")
    assert (again.rollouts_added, again.spans_added) == (0, 0)
    spans = {s.name: s for s in spans_of(target, first_trace_id(target))}
    root = spans["ReActAgent.reply"]
    assert root.kind == "agent" and root.id == span_id_for("1111111111111111")
    llm = spans["OpenAIChatModel.__call__"]
    assert llm.kind == "llm" and llm.model == "qwen-plus" and llm.parent_id == root.id
    assert (llm.input_tokens, llm.output_tokens) == (12, 5)
    assert llm.duration_ms == 900.0
    tool = spans["Toolkit.call_tool_function"]
    assert tool.status == "error" and tool.error == "timeout talking to ERP"
    inputs = sorted(str(r[0]) for r in target.execute("SELECT input FROM rollout"))
    assert any("where is order 42?" in i for i in inputs)


def first_trace_id(store: Store) -> str:
    rows = store.execute("SELECT rollout_id FROM span WHERE name = 'ReActAgent.reply'")
    return rows[0][0]


def test_cli_import_twice(tmp_path: Path) -> None:
    db = make_new_db(tmp_path / "database.sqlite")
    url = f"sqlite:///{tmp_path / 'fw.db'}"
    runner = CliRunner()
    args = ["import", "agentscope-studio", str(db), "--workflow", "support", "--store", url]
    out = runner.invoke(main, args)
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())  # rich wraps long paths at the console width
    assert "2 new rollouts, 4 new spans" in said
    out = runner.invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "0 new rollouts, 0 new spans" in " ".join(out.output.split())


def test_clear_errors(tmp_path: Path, target: Store) -> None:
    with pytest.raises(StudioImportError, match="no such file"):
        import_studio(target, tmp_path / "missing.sqlite", "w")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all")
    with pytest.raises(StudioImportError, match="not a SQLite database"):
        import_studio(target, junk, "w")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).executescript("CREATE TABLE foo (x);").close()
    with pytest.raises(StudioImportError, match="none of AgentScope Studio's tables"):
        import_studio(target, other, "w")
    out = CliRunner().invoke(
        main, ["import", "agentscope-studio", str(other), "-w", "w", "--store", target.url]
    )
    assert out.exit_code != 0 and "none of AgentScope Studio's tables" in out.output


def _with_genai_parts(db: Path) -> Path:
    """The current Studio schema as AgentScope 2.x writes it: GenAI ``parts`` messages."""
    conn = sqlite3.connect(db)
    [(attrs,)] = conn.execute("SELECT attributes FROM span_table WHERE id = 's1'").fetchall()
    attrs = json.loads(attrs)
    attrs["gen_ai"]["input"]["messages"] = json.dumps(
        [{"role": "user", "parts": [{"type": "text", "content": "where is order 42?"}]}]
    )
    attrs["gen_ai"]["output"]["messages"] = json.dumps(
        [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": "Order 42 ships today."}],
                "finish_reason": "stop",
            }
        ]
    )
    conn.execute("UPDATE span_table SET attributes = ? WHERE id = 's1'", (json.dumps(attrs),))
    conn.commit()
    conn.close()
    return db


@pytest.mark.parametrize("make", [lambda p: _with_genai_parts(make_new_db(p)), make_old_db])
def test_exports_of_both_schemas_carry_the_real_text(tmp_path: Path, target: Store, make) -> None:
    from flywheel_middleware.loop.datasets import export

    import_studio(target, make(tmp_path / "database.sqlite"), "support")
    export(target, "triplets", "support", tmp_path / "t.jsonl")
    triplets = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert ("where is order 42?", "Order 42 ships today.") in {
        (t["prompt"], t["response"]) for t in triplets
    }
    export(target, "sft", "support", tmp_path / "s.jsonl")
    export(target, "tasks", "support", tmp_path / "k.jsonl", val_fraction=0)
    for name, kind in (("s", "sft"), ("k", "tasks"), ("t", "triplets")):
        assert check_file(tmp_path / f"{name}.jsonl", kind) == []
    sft = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    tasks = [json.loads(x) for x in (tmp_path / "k.jsonl").read_text().splitlines()]
    assert [m["content"] for m in sft[0]["messages"]][-2:] == [
        "where is order 42?",
        "Order 42 ships today.",
    ]
    assert any(t["main_query"] == "where is order 42?" for t in tasks)
    texts = [t["prompt"] for t in triplets] + [t["response"] for t in triplets]
    texts += [m["content"] for r in sft for m in r["messages"]]
    assert all(t.strip() and not t.startswith(("Msg(", "{", "[")) for t in texts), texts
