"""What time partitions cost the recorder and save retention, on PostgreSQL, in the same run.

    .venv/bin/python benchmarks/partitioned_store.py --postgres URL [--spans 200000] [--weeks 8]

Two fresh schemas get the same rows: ``plain`` (a store made before partitioning was the
default: migrated to 0005 with one row, so 0006 leaves its tables plain) and ``partitioned``
(a new store, partitioned by its migration; ``flywheel db maintain`` then creates partitions
for every week the rows fall in). For each it measures:

- write: span records (and one rollout per 20 spans) spread over ``--weeks`` weeks, handed
  to the recorder and timed until ``flush()`` returns: rows per second;
- retried: the same records again (a replayed journal): the time to find every row stored;
- prune: ``prune(older_than=...)`` removing the oldest half of the weeks: seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import RolloutRecord, SpanRecord, datetime_to_ns
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.store import partitions, retention
from flywheel_middleware.store.database import Store


def make_records(spans: int, weeks: int) -> list:
    now = datetime.now(timezone.utc)
    step = timedelta(weeks=weeks) / spans
    records: list = []
    rollout = new_rollout_id()
    for i in range(spans):
        at = datetime_to_ns(now - timedelta(weeks=weeks) + i * step)
        if i % 20 == 0:
            rollout = new_rollout_id()
            records.append(RolloutRecord(id=rollout, workflow="bench", started_at=at))
        records.append(
            SpanRecord(
                id=new_span_id(),
                rollout_id=rollout,
                kind="tool",
                name="lookup_order",
                started_at=at,
                ended_at=at + 500_000,
                input={"order_id": i},
                output={"status": "shipped"},
            )
        )
    return records


def write(store: Store, records: list, journal: str) -> float:
    recorder = Recorder(store, spill_dir=journal, writer="thread")
    start = time.perf_counter()
    for record in records:
        recorder.enqueue(record)
    assert recorder.flush(600), "the recorder did not finish"
    elapsed = time.perf_counter() - start
    recorder.close(timeout=60)
    return elapsed


def plain_store_before_0006(url: str) -> None:
    """A store as one made before partitioning was the default: at 0005, with a row."""
    old = Store(url, migrate=False)
    old.upgrade("0005")
    with old.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO rollout (id, workflow, status, started_at) "
                "VALUES ('old-store', 'bench', 'succeeded', '2020-01-01 00:00:00+00')"
            )
        )
    old.dispose()


def run(base: str, spans: int, weeks: int) -> None:
    records = make_records(spans, weeks)
    admin = sa.create_engine(base)
    print(f"{spans} spans + {spans // 20} rollouts over {weeks} weeks")
    print(f"{'store':<12} {'write rows/s':>13} {'replay s':>9} {'prune s':>8} {'pruned':>8}")
    for kind in ("plain", "partitioned"):
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in base else "?"
        url = f"{base}{sep}options=-csearch_path%3D{schema}"
        if kind == "plain":
            plain_store_before_0006(url)
        store = Store(url)
        try:
            if kind == "partitioned":  # partitions for every week the rows fall in
                first = datetime.now(timezone.utc) - timedelta(weeks=weeks)
                partitions.maintain(store, now=first, ahead=weeks + 1)
            with store.engine.connect() as conn:
                assert partitions.is_partitioned(conn, "span") == (kind == "partitioned"), kind
            with tempfile.TemporaryDirectory() as journal:
                seconds = write(store, records, journal)
                replay = write(store, records, journal)
            rows = store.execute(
                "SELECT (SELECT count(*) FROM span) + (SELECT count(*) FROM rollout)"
            )
            expected = len(records) + (1 if kind == "plain" else 0)  # the old store's row
            assert rows[0][0] == expected, f"{kind}: {rows[0][0]} rows for {expected}"
            start = time.perf_counter()
            report = retention.prune(store, timedelta(weeks=weeks / 2))
            pruned = time.perf_counter() - start
            print(
                f"{kind:<12} {len(records) / seconds:>13,.0f} {replay:>9.2f} {pruned:>8.2f} "
                f"{sum(report.deleted.values()):>8}"
            )
        finally:
            store.dispose()
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--postgres",
        default=os.environ.get("FLYWHEEL_TEST_POSTGRES_URL"),
        help="postgresql+psycopg://... (default: $FLYWHEEL_TEST_POSTGRES_URL)",
    )
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument("--weeks", type=int, default=8)
    args = parser.parse_args()
    if not args.postgres:
        print("partitioned_store: skipped, it needs PostgreSQL (--postgres URL)")
        return
    run(args.postgres, args.spans, args.weeks)


if __name__ == "__main__":
    main()
