"""Agents traced by their own OpenTelemetry instrumentation, exporting OTLP/HTTP to a real
``flywheel serve``: a real AgentScope 2.x agent (its TracingMiddleware) and a LangChain chain
(OpenInference), each in its own process with no flywheel code in it, their model the loopback
OpenAI-protocol server. Each reply becomes one rollout that ``flywheel export`` reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.store.database import Store
from flywheel_middleware.testing.openai_server import OpenAIServer, Reply

from .conftest import free_port

pytestmark = pytest.mark.slow
AGENTS = Path(__file__).resolve().parent / "otlp_agents"
KEY = "otlp-key"


class Serve:
    """A ``flywheel serve`` process on a SQLite file, and that store read from here."""

    def __init__(self, tmp: Path) -> None:
        self.url = f"sqlite:///{tmp / 'serve.db'}"
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "FLYWHEEL_API_KEYS": KEY,
            "FLYWHEEL_SPILL_DIR": str(tmp / "spill"),
            "FLYWHEEL_OTLP_SETTLE": "0.3",
        }
        env.pop("FLYWHEEL_STORE_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from flywheel_middleware.cli import main; main()"]
            + ["serve", "--port", str(port), "--store", self.url],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "flywheel serve did not come up"
            time.sleep(0.1)
        self.store = Store(self.url)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        return self.store.execute(sql, params)

    def rollouts(self, workflow: str, count: int, timeout: float = 30) -> list[Any]:
        """The workflow's rollouts once ``count`` are stored (closed after their root span)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(
                "SELECT * FROM rollout WHERE workflow = :w ORDER BY started_at", w=workflow
            )
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def spans(self, rollout_id: str) -> list[Any]:
        return self.rows(
            "SELECT * FROM span WHERE rollout_id = :r ORDER BY started_at", r=rollout_id
        )

    def stop(self) -> None:
        self.store.dispose()
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    server = Serve(tmp_path_factory.mktemp("serve"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm() -> Iterator[OpenAIServer]:
    with OpenAIServer() as server:
        yield server


def run_agent(script: str, serve: Serve, llm: OpenAIServer, *questions: str) -> list[str]:
    """Run an agent script in its own process; the replies it printed, one per question."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, str(AGENTS / script), f"{serve.base}/v1/traces", KEY, llm.base_url]
        + list(questions),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def export_rows(serve: Serve, kind: str, workflow: str, out: Path) -> list[dict[str, Any]]:
    args = ["export", kind, "--workflow", workflow, "--out", str(out), "--store", serve.url]
    result = CliRunner().invoke(main, [*args, "--val-fraction", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_agentscope_agent_with_its_own_tracing(serve, llm, tmp_path) -> None:
    llm.enqueue(
        Reply(content=None, tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}]),
        "the sum is 5",
        "Paris is the capital of France.",
    )
    questions = ["add 2 and 3", "What is the capital of France?"]
    replies = run_agent("agentscope_agent.py", serve, llm, *questions)
    assert replies == ["the sum is 5", "Paris is the capital of France."]

    rollouts = serve.rollouts("bob-agent", 2)  # the resource's service.name
    assert len(rollouts) == 2, rollouts
    first, second = rollouts
    kinds = {r.id: sorted(s.kind for s in serve.spans(r.id)) for r in rollouts}
    assert kinds[first.id] == ["agent", "llm", "llm", "tool"]
    assert kinds[second.id] == ["agent", "llm"]
    for rollout in rollouts:
        spans = serve.spans(rollout.id)
        [root] = [s for s in spans if s.parent_id is None]
        assert root.kind == "agent" and root.name == "invoke_agent bob"
        assert {s.trace_id for s in spans} == {rollout.id} and len(rollout.id) == 32
        llms = [s for s in spans if s.kind == "llm"]
        assert {s.model for s in llms} == {"gpt-as"}
        assert all(s.input_tokens > 0 and s.output_tokens > 0 for s in llms)
        assert rollout.input_tokens == sum(s.input_tokens for s in llms)
        assert rollout.output_tokens == sum(s.output_tokens for s in llms)
        assert rollout.status == "succeeded"
    [tool] = [s for s in serve.spans(first.id) if s.kind == "tool"]
    assert tool.name == "execute_tool add" and json.loads(tool.input) == {"a": 2, "b": 3}

    tasks = export_rows(serve, "tasks", "bob-agent", tmp_path / "tasks.jsonl")
    assert [(t["main_query"], t["metadata"]["answer"]) for t in tasks] == list(
        zip(questions, replies, strict=True)
    )
    assert [t["task_id"] for t in tasks] == [first.id, second.id]

    # a browser rates the answer by its trace id, in any case
    rated = httpx.post(
        f"{serve.base}/v1/feedback",
        json={"rollout_id": second.id.upper(), "rating": 5},
        headers={"X-API-Key": KEY},
    )
    assert rated.status_code == 202, rated.text
    deadline = time.monotonic() + 10
    while not serve.rows("SELECT * FROM feedback") and time.monotonic() < deadline:
        time.sleep(0.1)
    [fb] = serve.rows("SELECT rollout_id, value FROM feedback")
    assert (fb.rollout_id, fb.value) == (second.id, 5.0)


def test_langchain_with_openinference(serve, llm, tmp_path) -> None:
    llm.enqueue("Four.", "Blue, mostly.")
    questions = ["What is 2 + 2?", "What colour is the sky?"]
    replies = run_agent("langchain_agent.py", serve, llm, *questions)
    assert replies == ["Four.", "Blue, mostly."]

    rollouts = serve.rollouts("lc-qa", 2)  # the resource's flywheel.workflow
    assert len(rollouts) == 2, rollouts
    for rollout, question, reply in zip(rollouts, questions, replies, strict=True):
        spans = serve.spans(rollout.id)
        [root] = [s for s in spans if s.parent_id is None]
        assert root.kind == "chain" and root.name == "RunnableSequence"
        [llm_span] = [s for s in spans if s.kind == "llm"]
        assert llm_span.model == "gpt-lc" and llm_span.name == "ChatOpenAI"
        assert llm_span.input_tokens > 0 and llm_span.output_tokens > 0
        messages = json.loads(llm_span.input)  # llm.input_messages.*, put back together
        assert [(m["role"], m["content"]) for m in messages] == [
            ("system", "Answer briefly."),
            ("user", question),
        ]
        assert (rollout.input_tokens, rollout.output_tokens) == (
            llm_span.input_tokens,
            llm_span.output_tokens,
        )
        assert json.loads(rollout.output)[-1] == {"role": "assistant", "content": reply}

    tasks = export_rows(serve, "tasks", "lc-qa", tmp_path / "tasks.jsonl")
    assert [(t["main_query"], t["metadata"]["answer"]) for t in tasks] == list(
        zip(questions, replies, strict=True)
    )
    sft = export_rows(serve, "sft", "lc-qa", tmp_path / "sft.jsonl")
    assert [row["messages"] for row in sft] == [
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]
        for q, a in zip(questions, replies, strict=True)
    ]
