"""Spans per second through the recorder, beside the raw driver ceiling, in the same run.

    .venv/bin/python benchmarks/store_throughput.py [--spans 200000] [--postgres URL]

For each backend it writes the same span rows three ways, each into a fresh schema made by
``Store`` (so the ceiling pays for the same table and indexes):

- ceiling: pre-built tuples through the bare driver (``sqlite3.executemany`` / psycopg ``COPY``),
  in batches of 2,000, one transaction each;
- recorder: finished span records handed to ``Recorder.enqueue`` and written by its thread
  (conversion to rows included), timed from the first enqueue until ``flush()`` returns;
- end to end: the same count of ``fw.span`` blocks opened and closed by the caller, then flushed.

It also reports the caller-side cost of recording one span (median of ``with fw.span(...)``).
Targets (issue 2): SQLite recorder >= 50% of its ceiling and >= 30,000 spans/s; PostgreSQL
>= 30,000 spans/s; caller cost <= 10 µs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid

import sqlalchemy as sa

import flywheel_middleware as fw
from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import SpanRecord, ns_to_datetime, ns_to_sqlite_text
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.recording.rows import record_row
from flywheel_middleware.store.database import Store

BATCH = 2_000


def make_records(n: int) -> list[SpanRecord]:
    now = time.time_ns()
    rollout = new_rollout_id()
    return [
        SpanRecord(
            id=new_span_id(),
            rollout_id=rollout,
            parent_id=None,
            sequence=i,
            kind="tool",
            name="lookup_order",
            node="support",
            started_at=now + i * 1000,
            ended_at=now + i * 1000 + 500,
            duration_ms=0.0005,
            input={"order_id": i},
            output={"status": "shipped"},
        )
        for i in range(n)
    ]


def ceiling_sqlite(store: Store, rows: list[tuple]) -> float:
    import sqlite3

    path = store.engine.url.database
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    cols = ", ".join(SpanRecord.COLUMNS)
    sql = f"INSERT INTO span ({cols}) VALUES ({', '.join('?' for _ in SpanRecord.COLUMNS)})"
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        conn.executemany(sql, rows[i : i + BATCH])
        conn.commit()
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


def ceiling_postgres(store: Store, rows: list[tuple]) -> float:
    raw = store.raw_connection()
    cur = raw.cursor()
    cols = ", ".join(f'"{c}"' for c in SpanRecord.COLUMNS)
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        with cur.copy(f"COPY span ({cols}) FROM STDIN") as copy:
            for row in rows[i : i + BATCH]:
                copy.write_row(row)
        raw.commit()
    elapsed = time.perf_counter() - start
    raw.close()
    return len(rows) / elapsed


def through_recorder(store: Store, records: list[SpanRecord]) -> float:
    recorder = Recorder(store, queue_size=len(records) + 10)
    start = time.perf_counter()
    for r in records:
        recorder.enqueue(r)
    assert recorder.flush(600), "flush timed out"
    elapsed = time.perf_counter() - start
    assert recorder.counters.written == len(records), recorder.counters
    recorder.close()
    return len(records) / elapsed


def _busy_agent() -> tuple[threading.Event, threading.Thread]:
    """A CPU-bound thread standing in for an agent that keeps the GIL busy."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for _ in range(1000):
                x += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    return stop, thread


def while_agent_busy(url: str, n: int) -> tuple[float, float]:
    """Rows/s of per-row ``executemany`` and of the recorder while the agent thread spins."""
    import sqlite3

    store = Store(url)
    rows = [record_row(r, ns_to_sqlite_text) for r in make_records(BATCH)]  # one batch: it is slow
    conn = sqlite3.connect(store.engine.url.database)
    cols = ", ".join(SpanRecord.COLUMNS)
    sql = f"INSERT INTO span ({cols}) VALUES ({', '.join('?' for _ in SpanRecord.COLUMNS)})"
    stop, thread = _busy_agent()
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        conn.executemany(sql, rows[i : i + BATCH])
        conn.commit()
    per_row = len(rows) / (time.perf_counter() - start)
    conn.execute("DELETE FROM span")
    conn.commit()
    conn.close()
    ours = through_recorder(store, make_records(n))
    stop.set()
    thread.join()
    return per_row, ours


def end_to_end(url: str, n: int) -> float:
    fw.configure(store_url=url, queue_size=n + 10)
    start = time.perf_counter()
    with fw.rollout("bench"):
        for i in range(n):
            with fw.span("lookup_order", kind="tool", input={"order_id": i}) as s:
                s.set_output({"status": "shipped"})
    assert fw.flush(600)
    elapsed = time.perf_counter() - start
    written = fw.get_recorder().counters.by_table["span"]
    fw.shutdown()
    assert written == n, written
    return n / elapsed


def caller_cost_us(url: str, n: int = 50_000) -> float:
    fw.configure(store_url=url, queue_size=n + 10)
    samples = []
    perf = time.perf_counter_ns
    with fw.rollout("bench-caller"):
        for _ in range(n):
            t = perf()
            with fw.span("s", kind="tool"):
                pass
            samples.append(perf() - t)
    fw.flush(600)
    fw.shutdown()
    return statistics.median(samples) / 1000


def fresh_postgres(base: str) -> tuple[str, str]:
    schema = f"fwbench_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", schema


def drop_postgres(base: str, schema: str) -> None:
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "FLYWHEEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="PostgreSQL URL ('' to skip)",
    )
    args = parser.parse_args()
    n = args.spans
    work = tempfile.mkdtemp(prefix="fw-bench-")
    os.environ["FLYWHEEL_SPILL_DIR"] = os.path.join(work, "spill")
    results = []
    try:
        records = make_records(n)
        sqlite_rows = [record_row(r, ns_to_sqlite_text) for r in records]
        urls = [f"sqlite:///{work}/{name}.db" for name in ("ceiling", "recorder", "e2e", "caller")]
        ceiling = ceiling_sqlite(Store(urls[0]), sqlite_rows)
        ours = through_recorder(Store(urls[1]), make_records(n))
        e2e = end_to_end(urls[2], n)
        results.append(("sqlite", ceiling, ours, e2e))
        cost = caller_cost_us(urls[3])
        busy = while_agent_busy(f"sqlite:///{work}/busy.db", min(n, 20_000))

        if args.postgres:
            try:
                made = [fresh_postgres(args.postgres) for _ in range(3)]
            except Exception as exc:  # no server: say so, keep the SQLite figures
                print(f"PostgreSQL skipped: {exc.__class__.__name__}: {exc}".splitlines()[0])
                made = []
            if made:
                try:
                    pg_rows = [record_row(r, ns_to_datetime) for r in make_records(n)]
                    pg_ceiling = ceiling_postgres(Store(made[0][0]), pg_rows)
                    pg_ours = through_recorder(Store(made[1][0]), make_records(n))
                    pg_e2e = end_to_end(made[2][0], n)
                    results.append(("postgresql", pg_ceiling, pg_ours, pg_e2e))
                finally:
                    for _, schema in made:
                        drop_postgres(args.postgres, schema)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nstore throughput, {n:,} spans each (batches of {BATCH:,}); python {sys.version.split()[0]}"
    )
    print(
        f"{'backend':<11} {'raw ceiling/s':>14} {'recorder/s':>12} {'ratio':>7} {'fw.span e2e/s':>14}"
    )
    for backend, ceiling, ours, e2e in results:
        print(
            f"{backend:<11} {ceiling:>14,.0f} {ours:>12,.0f} {ours / ceiling:>7.0%} {e2e:>14,.0f}"
        )
    print(
        f"\nsqlite while the agent thread is CPU-bound: per-row executemany {busy[0]:,.0f} rows/s, "
        f"recorder (multi-row statements) {busy[1]:,.0f} spans/s"
    )
    print(f"caller-side cost of one span (median of `with fw.span(...)`): {cost:.2f} µs")
    print(
        "targets: sqlite recorder >= 50% of ceiling and >= 30,000/s; postgresql >= 30,000/s; caller <= 10 µs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
