"""Traces left open by a ``flywheel serve`` killed with SIGKILL get their rollout from the next
services on the store (``service.otlp_recovery``): exactly one each, as a live close builds it;
a trace still open in a live service is left to that service."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from flywheel_middleware.messages import to_messages

from .serve_process import spawn_serve, wait_up

KEY = "recovery-key"
HEADERS = {"X-API-Key": KEY, "Content-Type": "application/json"}
TIMING = {  # shared by every service, as replicas share their settings
    "FLYWHEEL_OTLP_SETTLE": "0.2",
    "FLYWHEEL_OTLP_GRACE": "3",
    "FLYWHEEL_OTLP_LATE": "1",
    "FLYWHEEL_OTLP_RECOVER_EVERY": "0.3",
}


def spawn(tmp_path: Path, url: str, spill: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """``flywheel serve`` on ``url`` with its journal in ``spill``."""
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"store: {{url: '{url}'}}\n")
    return spawn_serve(
        config, {"FLYWHEEL_API_KEYS": KEY, "FLYWHEEL_SPILL_DIR": str(spill), **TIMING, **env}
    )


def attrs(values: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, value in values.items():
        kind = "intValue" if isinstance(value, int) else "stringValue"
        out.append({"key": key, "value": {kind: value}})
    return out


def span(trace: int, n: int, parent: int | None, values: dict[str, Any]) -> dict[str, Any]:
    now = time.time_ns()
    return {
        "traceId": f"{trace:032x}",
        "spanId": f"{trace * 100 + n:016x}",
        "parentSpanId": f"{trace * 100 + parent:016x}" if parent else "",
        "name": "invoke_agent" if parent is None else f"chat {n}",
        "startTimeUnixNano": str(now - 1_000_000 + n),
        "endTimeUnixNano": str(now),
        "attributes": attrs(values),
    }


def root(trace: int, question: str, answer: str) -> dict[str, Any]:
    return span(
        trace,
        1,
        None,
        {
            "gen_ai.operation.name": "invoke_agent",
            "input.value": question,
            "output.value": answer,
            "user.id": f"user-{trace}",
            "session.id": f"session-{trace}",
        },
    )


def chat(trace: int, n: int, tokens_in: int, tokens_out: int, parent: int = 1) -> dict[str, Any]:
    return span(
        trace,
        n,
        parent,
        {
            "gen_ai.operation.name": "chat",
            "input.value": f"step {n} of {trace}",
            "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out,
        },
    )


def send(base: str, *spans: dict[str, Any]) -> None:
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": attrs({"service.name": "agent"})},
                "scopeSpans": [{"spans": list(spans)}],
            }
        ]
    }
    r = httpx.post(f"{base}/v1/traces", content=json.dumps(body), headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text


def rollouts(url: str) -> dict[str, dict[str, Any]]:
    from flywheel_middleware.store.database import Store

    store = Store(url, migrate=False)
    try:
        rows = store.execute(
            "SELECT id, input, output, user_id, session_id, input_tokens, output_tokens, "
            "total_tokens, workflow, metadata FROM rollout"
        )
    finally:
        store.dispose()
    out = {}
    for row in rows:
        values = dict(row._mapping)
        for key in ("input", "output", "metadata"):
            if isinstance(values[key], str):
                values[key] = json.loads(values[key])
        assert values["id"] not in out
        out[values["id"]] = values
    return out


def wait_for(url: str, ids: set[str], timeout: float = 30) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = rollouts(url)
        if ids <= found.keys():
            return found
        assert time.monotonic() < deadline, (ids, found.keys())
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def tid(trace: int) -> str:
    return f"{trace:032x}"


@pytest.mark.slow
def test_traces_open_in_a_killed_service_get_one_rollout_each(tmp_path, store_url) -> None:
    from flywheel_middleware.store.database import Store

    Store(url=store_url).dispose()  # migrated once here: two services start at the same time
    spill = tmp_path / "spill"
    # the service to be killed holds every trace open for a minute: none closes before SIGKILL;
    # a replica with its own journal folder runs beside it, recovering every 0.3 s
    hold_open = {"FLYWHEEL_OTLP_SETTLE": "60", "FLYWHEEL_OTLP_GRACE": "60"}
    killed, base = spawn(tmp_path, store_url, spill, **hold_open)
    replica, replica_base = spawn(tmp_path, store_url, tmp_path / "replica-spill")
    first = None
    try:
        wait_up(killed, base)
        wait_up(replica, replica_base)
        blocker = None
        if store_url.startswith("sqlite"):  # the store refuses writes: spans in the journal only
            blocker = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
        try:
            send(base, chat(1, 2, 10, 2), chat(1, 3, 20, 3))  # trace 1: children, then root
            send(base, root(1, "What is 2+2?", "4"))
            send(base, chat(2, 2, 5, 1, parent=9), chat(2, 3, 7, 2, parent=9))  # no root
            send(base, root(3, "Capital of France?", "Paris"), chat(3, 2, 1, 1))
            os.killpg(killed.pid, signal.SIGKILL)  # at once, as the OOM killer would
            killed.wait(timeout=30)
        finally:
            if blocker is not None:
                blocker.rollback()
                blocker.close()

        first, first_base = spawn(tmp_path, store_url, spill)  # replays the dead one's journal
        wait_up(first, first_base)
        found = wait_for(store_url, {tid(1), tid(2), tid(3)})
        assert found.keys() == {tid(1), tid(2), tid(3)}

        one, two, three = found[tid(1)], found[tid(2)], found[tid(3)]
        assert one["input"] == to_messages("What is 2+2?", "user")
        assert one["output"] == to_messages("4", "assistant")
        assert (one["user_id"], one["session_id"]) == ("user-1", "session-1")
        assert (one["input_tokens"], one["output_tokens"], one["total_tokens"]) == (30, 5, 35)
        assert one["metadata"]["spans"] == 3 and "root_missing" not in one["metadata"]
        assert one["metadata"]["recovered"] is True and one["workflow"] == "agent"
        assert two["metadata"]["root_missing"] is True
        assert two["input"] == to_messages("step 2 of 2", "user")
        assert (two["input_tokens"], two["output_tokens"]) == (12, 3)
        assert three["output"] == to_messages("Paris", "assistant")
        assert (three["input_tokens"], three["output_tokens"]) == (1, 1)

        # a trace open in the first service, its root still to come: the replica's passes
        # (every 0.3 s) leave it alone, and the first service closes it with its root
        send(first_base, chat(4, 2, 3, 1), chat(4, 3, 4, 1))
        time.sleep(2)
        assert tid(4) not in rollouts(store_url)
        send(first_base, root(4, "Still open?", "Yes"))
        four = wait_for(store_url, {tid(4)})[tid(4)]
        assert four["input"] == to_messages("Still open?", "user")
        assert (four["input_tokens"], four["output_tokens"]) == (7, 2)
        assert "recovered" not in four["metadata"] and "root_missing" not in four["metadata"]

        time.sleep(5)  # past trace 4's hold: more passes in both services change nothing
        assert rollouts(store_url) == {**found, tid(4): four}
    finally:
        for proc in (killed, first, replica):
            if proc is not None:
                stop(proc)
