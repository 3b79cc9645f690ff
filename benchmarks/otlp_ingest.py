"""Spans per second through ``POST /v1/traces`` (OTLP/HTTP protobuf) with zero loss, and the same
spans through the Python API in the same run as the ceiling.

The server is ``flywheel serve`` (uvicorn, one process) on a fresh SQLite store (or a fresh
schema on PostgreSQL with ``--postgres URL``). Traces are
agent runs of ``--spans-per-trace`` spans (an ``invoke_agent`` root with its question and answer
as GenAI messages, ``chat`` spans with a model and token counts, ``execute_tool`` spans), their
spans in the order an SDK exports them (children before their root) and cut into export
requests of ``--batch`` spans, encoded beforehand so the client costs little. Client threads
post them over keep-alive connections. The clock stops when every span and every trace's
rollout is in the database; zero loss is checked by counting distinct span ids and rollouts
there, and the token totals of every rollout against what was sent.

The ceiling records the same traces with ``fw.rollout`` / ``fw.span`` in this process (same
names, kinds, models, token counts, inputs and outputs) into another fresh store, until
``fw.flush()`` returns. CPU seconds per span (the server and its writer process; this process
for the ceiling) are printed too: unlike spans per second, other load on the machine does not
change them much. On SQLite, the stored span rows are then inserted again into a fresh store by
the writer's own statement: SQLite's own cost of keeping them, the floor under both.

    .venv/bin/python benchmarks/otlp_ingest.py [--spans 204800] [--batch 512] [--threads 2]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from ingest_load import KEY, free_port, start_server  # flywheel serve on a store, for benchmarks
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

WORKFLOW = "bench-agent"
EPOCH_NS = 1_760_000_000_000_000_000


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def make_traces(count: int, spans_per_trace: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    """``count`` agent runs, each a list of span descriptions, children first, root last."""
    rng = random.Random(seed)
    traces = []
    for t in range(count):
        trace_id = rng.getrandbits(128).to_bytes(16, "big")
        root_id = rng.getrandbits(64).to_bytes(8, "big")
        start = EPOCH_NS + t * 10_000_000
        question = f"Where is order {t}? It was due on day {t % 30}."
        answer = f"Order {t} ships tomorrow from warehouse {t % 7}."
        children = []
        for i in range(spans_per_trace - 1):
            s = start + (i + 1) * 100_000
            if i % 2 == 0:
                attrs = {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "gpt-bench",
                    "gen_ai.usage.input_tokens": 50 + i,
                    "gen_ai.usage.output_tokens": 10 + i,
                    "gen_ai.input.messages": json.dumps(
                        [{"role": "user", "parts": [{"type": "text", "content": question}]}]
                    ),
                    "gen_ai.output.messages": json.dumps(
                        [{"role": "assistant", "parts": [{"type": "text", "content": answer}]}]
                    ),
                }
                name, kind = "chat gpt-bench", "llm"
            else:
                attrs = {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "lookup_order",
                    "gen_ai.tool.call.arguments": json.dumps({"order": t}),
                    "gen_ai.tool.call.result": json.dumps({"order": t, "status": "packed"}),
                }
                name, kind = "execute_tool lookup_order", "tool"
            children.append(
                {
                    "trace_id": trace_id,
                    "span_id": rng.getrandbits(64).to_bytes(8, "big"),
                    "parent": root_id,
                    "name": name,
                    "kind": kind,
                    "start": s,
                    "end": s + 80_000,
                    "attrs": attrs,
                }
            )
        root = {
            "trace_id": trace_id,
            "span_id": root_id,
            "parent": b"",
            "name": "invoke_agent support",
            "kind": "agent",
            "start": start,
            "end": start + spans_per_trace * 100_000 + 50_000,
            "attrs": {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "support",
                "gen_ai.conversation.id": f"s-{t % 100}",
                "gen_ai.input.messages": json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": question}]}]
                ),
                "gen_ai.output.messages": json.dumps(
                    [{"role": "assistant", "parts": [{"type": "text", "content": answer}]}]
                ),
            },
        }
        traces.append([*children, root])
    return traces


def encode_batches(traces: list[list[dict[str, Any]]], batch: int) -> list[bytes]:
    """Export request bodies of ``batch`` spans each, in the order the spans ended."""
    flat = [span for trace in traces for span in trace]
    bodies = []
    for i in range(0, len(flat), batch):
        request = ExportTraceServiceRequest()
        rs = request.resource_spans.add()
        rs.resource.attributes.append(kv("service.name", WORKFLOW))
        ss = rs.scope_spans.add()
        ss.scope.name = "bench"
        for d in flat[i : i + batch]:
            ss.spans.append(
                Span(
                    trace_id=d["trace_id"],
                    span_id=d["span_id"],
                    parent_span_id=d["parent"],
                    name=d["name"],
                    kind=Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=d["start"],
                    end_time_unix_nano=d["end"],
                    attributes=[kv(k, v) for k, v in d["attrs"].items()],
                )
            )
        bodies.append(request.SerializeToString())
    return bodies


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and every process below it (the
    server and its writer process): a figure the other load on the machine does not inflate."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree = {pid}
    grew = True
    while grew:
        below = {p for p, parent in parents.items() if parent in tree} - tree
        grew = bool(below)
        tree |= below
    return sum(used.get(p, 0.0) for p in tree)


def post_all(url: str, bodies: list[bytes], threads: int) -> dict[str, Any]:
    """Post every body from ``threads`` threads; latencies, rejected spans and failures."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    rejected = [0]
    lock = threading.Lock()
    headers = {"Content-Type": "application/x-protobuf", "X-API-Key": KEY}

    def work(part: list[bytes]) -> None:
        lat = []
        with httpx.Client(timeout=60) as client:
            for body in part:
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/traces", content=body, headers=headers)
                lat.append(time.perf_counter() - t0)
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.content[:200]!r}")
                    else:
                        reply = ExportTraceServiceResponse.FromString(r.content)
                        rejected[0] += reply.partial_success.rejected_spans
        with lock:
            latencies.extend(lat)

    workers = [threading.Thread(target=work, args=(bodies[t::threads],)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"latencies": sorted(latencies), "failures": failures, "rejected": rejected[0]}


class Stores:
    """Fresh stores, one per run: SQLite files in ``workdir``, or schemas on the PostgreSQL
    server at ``postgres`` (dropped at the end)."""

    def __init__(self, workdir: Path, postgres: str | None) -> None:
        self.workdir = workdir
        self.postgres = postgres
        self.schemas: list[str] = []

    def new(self, name: str) -> str:
        if not self.postgres:
            return f"sqlite:///{self.workdir / name}.db"
        schema = f"fwbench_{name}_{uuid.uuid4().hex[:8]}"
        with sa.create_engine(self.postgres).begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        self.schemas.append(schema)
        sep = "&" if "?" in self.postgres else "?"
        return f"{self.postgres}{sep}options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        if self.schemas:
            with sa.create_engine(self.postgres).begin() as conn:
                for schema in self.schemas:
                    conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def counts(url: str) -> tuple[int, int, int]:
    """Distinct span ids, rollouts and the rollouts' input tokens stored at ``url``."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            spans = conn.execute(sa.text("SELECT count(DISTINCT id) FROM span")).scalar()
            rollouts, tokens = conn.execute(
                sa.text("SELECT count(*), coalesce(sum(input_tokens), 0) FROM rollout")
            ).one()
    except sa.exc.OperationalError:  # the schema is not there yet
        return 0, 0, 0
    finally:
        engine.dispose()
    return spans, rollouts, int(tokens)


def run_http(
    traces: list, bodies: list[bytes], threads: int, workdir: Path, url: str
) -> dict[str, Any]:
    port = free_port()
    os.environ["FLYWHEEL_OTLP_SETTLE"] = "0.2"  # for the server: rollouts close soon
    proc = start_server(url, port, workdir)
    base = f"http://127.0.0.1:{port}"
    spans = sum(len(t) for t in traces)
    try:
        cpu_before = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        sent = post_all(base, bodies, threads)
        send_s = time.perf_counter() - t0
        deadline = time.monotonic() + 300
        while True:
            stored = counts(url)
            if stored[0] >= spans and stored[1] >= len(traces):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        total_s = time.perf_counter() - t0
        cpu_s = cpu_seconds(proc.pid) - cpu_before
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lat = sent["latencies"]
    return {
        "spans": spans,
        "requests": len(bodies),
        "stored_spans": stored[0],
        "stored_rollouts": stored[1],
        "stored_input_tokens": stored[2],
        "rejected": sent["rejected"],
        "failures": len(sent["failures"]),
        "first_failure": sent["failures"][0] if sent["failures"] else None,
        "accept_spans_per_s": spans / send_s,
        "end_to_end_spans_per_s": spans / total_s,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
        "send_s": send_s,
        "total_s": total_s,
        "server_cpu_us_per_span": cpu_s / spans * 1e6,
    }


def run_store_floor(stored_url: str, workdir: Path, batch: int) -> dict[str, Any] | None:
    """The span rows the endpoint stored, inserted again into a fresh SQLite store by the
    writer process's own statement and pragmas, one transaction per ``batch`` rows, rows in
    the order they were stored: SQLite's own cost of keeping them (its B-trees and indexes),
    with no decoding, mapping, journal or IPC. No front end can store spans faster than this
    on this machine; None on PostgreSQL, whose inserts cost another process."""
    if not stored_url.startswith("sqlite:"):
        return None
    import sqlite3

    from flywheel_middleware.store.database import Store
    from flywheel_middleware.store.sqlite_rows import (
        PRAGMAS,
        WRITER_PRAGMAS,
        apply_pragmas,
        insert_rows,
    )

    source = sqlite3.connect(stored_url.removeprefix("sqlite:///"))
    columns = [row[1] for row in source.execute("PRAGMA table_info(span)")]
    quoted = ", ".join(f'"{c}"' for c in columns)
    rows = source.execute(f"SELECT {quoted} FROM span ORDER BY rowid").fetchall()
    source.close()
    path = workdir / "floor.db"
    Store(f"sqlite:///{path}").dispose()  # the schema at head
    conn = sqlite3.connect(path, isolation_level=None)
    apply_pragmas(conn, PRAGMAS + WRITER_PRAGMAS)
    cache: dict[str, str] = {}
    cur = conn.cursor()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(rows), batch):
        cur.execute("BEGIN")
        insert_rows(cur, "span", columns, rows[start : start + batch], cache)
        cur.execute("COMMIT")
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    conn.close()
    return {"spans_per_s": len(rows) / wall, "cpu_us_per_span": cpu / len(rows) * 1e6}


def run_ingest_code(bodies: list[bytes]) -> dict[str, Any]:
    """The endpoint's own work on the same bodies in this process, no HTTP and no store:
    decode, map every span, assemble the traces (records counted, not kept)."""
    from flywheel_middleware.capture.otlp_traces import TraceAssembler
    from flywheel_middleware.service.otlp import PROTOBUF, decode, ingest

    tables: collections.Counter[str] = collections.Counter()
    assembler = TraceAssembler(lambda record: tables.update((record.TABLE,)), settle=0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for body in bodies:
        ingest(decode(body, PROTOBUF), assembler)
        assembler.close_due()  # what the assembler's thread does as traces fall due
    assembler.close_all()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    spans = tables["span"]
    return {"spans_per_s": spans / wall, "cpu_us_per_span": cpu / spans * 1e6}


def run_python_api(traces: list, url: str) -> dict[str, Any]:
    """The same traces through ``fw.rollout`` / ``fw.span`` in this process."""
    import flywheel_middleware as fw

    fw.configure(store_url=url)
    fw.get_recorder()  # started before the clock
    spans = sum(len(t) for t in traces)
    # what an agent holds: messages and tool values as Python data (parsed before the clock)
    plan = []
    for trace in traces:
        root = trace[-1]["attrs"]
        children = []
        for d in trace[:-1]:
            attrs = d["attrs"]
            if d["kind"] == "llm":
                io = (attrs["gen_ai.input.messages"], attrs["gen_ai.output.messages"])
                usage = (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"])
            else:
                io = (attrs["gen_ai.tool.call.arguments"], attrs["gen_ai.tool.call.result"])
                usage = None
            children.append((d["name"], d["kind"], *map(json.loads, io), usage))
        question = json.loads(root["gen_ai.input.messages"])
        answer = json.loads(root["gen_ai.output.messages"])
        plan.append((question, answer, children))
    cpu0 = cpu_seconds(os.getpid())
    t0 = time.perf_counter()
    for question, answer, children in plan:
        with fw.rollout(WORKFLOW, input=question) as rollout:
            with fw.span("invoke_agent support", kind="agent") as agent:
                agent.set_input(question)
                for name, kind, value_in, value_out, usage in children:
                    with fw.span(name, kind=kind) as span:
                        if usage is not None:
                            span.set_model("gpt-bench")
                            span.set_usage(*usage)
                        span.set_input(value_in)
                        span.set_output(value_out)
                agent.set_output(answer)
            rollout.set_output(answer)
    record_s = time.perf_counter() - t0
    assert fw.flush(300), "the recorder did not drain"
    total_s = time.perf_counter() - t0
    cpu_s = cpu_seconds(os.getpid()) - cpu0
    fw.shutdown()
    stored = counts(url)
    # fw.rollout adds no span of its own: each trace stored as its spans and one rollout
    return {
        "spans": spans,
        "stored_spans": stored[0],
        "stored_rollouts": stored[1],
        "stored_input_tokens": stored[2],
        "record_spans_per_s": spans / record_s,
        "end_to_end_spans_per_s": spans / total_s,
        "total_s": total_s,
        "cpu_us_per_span": cpu_s / spans * 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=204_800, help="spans in all")
    ap.add_argument("--batch", type=int, default=512, help="spans per export request")
    ap.add_argument("--spans-per-trace", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="client threads (connections)")
    ap.add_argument(
        "--postgres",
        metavar="URL",
        help="store on this PostgreSQL server (fresh schemas) instead of SQLite files",
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    traces = make_traces(args.spans // args.spans_per_trace, args.spans_per_trace)
    bodies = encode_batches(traces, args.batch)
    expected_tokens = sum(s["attrs"].get("gen_ai.usage.input_tokens", 0) for t in traces for s in t)
    with tempfile.TemporaryDirectory(prefix="fw-otlp-bench-") as tmp:
        workdir = Path(tmp)
        stores = Stores(workdir, args.postgres)
        try:
            otlp_store = stores.new("otlp")
            http = run_http(traces, bodies, args.threads, workdir, otlp_store)
            floor = run_store_floor(otlp_store, workdir, args.batch)
            api = run_python_api(traces, stores.new("api"))
            code = run_ingest_code(bodies)
        finally:
            stores.drop()
    http["lossless"] = (
        http["stored_spans"] == http["spans"]
        and http["stored_rollouts"] == len(traces)
        and http["stored_input_tokens"] == expected_tokens
        and not http["rejected"]
        and not http["failures"]
    )
    api["lossless"] = api["stored_spans"] == api["spans"] and api["stored_rollouts"] == len(traces)
    ratio = http["end_to_end_spans_per_s"] / api["end_to_end_spans_per_s"]
    if args.json:
        figures = {
            "otlp_http": http,
            "python_api": api,
            "ingest_code": code,
            "store_floor": floor,
            "ratio": ratio,
        }
        print(json.dumps(figures, indent=2))
    else:
        mb = sum(map(len, bodies)) / 1e6
        print(
            f"{http['spans']} spans in {len(traces)} traces, {len(bodies)} requests of "
            f"{args.batch} spans ({mb:.1f} MB protobuf), {args.threads} client threads"
        )
        print(
            f"POST /v1/traces: {http['end_to_end_spans_per_s']:,.0f} spans/s stored "
            f"({http['accept_spans_per_s']:,.0f} spans/s accepted; request p50 "
            f"{http['p50_ms']:.0f} ms, p99 {http['p99_ms']:.0f} ms); "
            f"lossless={http['lossless']} ({http['stored_spans']} spans, "
            f"{http['stored_rollouts']} rollouts, rejected {http['rejected']}, "
            f"failures {http['failures']}); server CPU {http['server_cpu_us_per_span']:.1f} "
            f"us/span"
        )
        print(
            f"Python API:      {api['end_to_end_spans_per_s']:,.0f} spans/s stored "
            f"({api['record_spans_per_s']:,.0f} spans/s recorded); lossless={api['lossless']}; "
            f"CPU {api['cpu_us_per_span']:.1f} us/span"
        )
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            f"ingest code alone (decode, map, assemble; no HTTP, no store): "
            f"{code['spans_per_s']:,.0f} spans/s, CPU {code['cpu_us_per_span']:.1f} us/span"
        )
        if floor:
            print(
                f"SQLite alone (the stored span rows inserted again, one transaction per batch): "
                f"{floor['spans_per_s']:,.0f} spans/s, CPU {floor['cpu_us_per_span']:.1f} us/span"
            )
        print(f"OTLP / Python API: {ratio:.2f}")
    return 0 if http["lossless"] and api["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
