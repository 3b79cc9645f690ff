"""Incremental curation: a controller's curate step over a long history costs what the new data costs.

    python benchmarks/curation_incremental.py [--sizes 5000,50000] [--new 1000]

For each history size, a fresh SQLite store gets that many old rollouts spread over the past 60
days (30% rated), the controller's curation runs once (the first, full pass), then the same
``--new`` rollouts arrive today and one curate step is timed. The baseline, measured in the same
run, is what a cycle cost before: a full export of every kind. Target: the step over the largest
history costs about the same as over the smallest (ratio near 1), while the full export grows
with the history.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from flywheel_middleware.config import parse_config
from flywheel_middleware.loop.curation import curate_datasets
from flywheel_middleware.loop.datasets import KINDS, export
from flywheel_middleware.store.database import Store

QUESTIONS = 500


def ts(dt: datetime) -> str:
    return dt.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def insert(db: Path, first: int, count: int, start: datetime, span: timedelta, seed: int) -> None:
    """``count`` rollouts with ids from ``first``, started evenly over ``span`` from ``start``."""
    rng = random.Random(seed)
    conn = sqlite3.connect(db)
    rollouts, feedback = [], []
    step = span / max(count, 1)
    for i in range(first, first + count):
        t0 = start + step * (i - first)
        q = rng.randrange(QUESTIONS)
        rollouts.append(
            (
                f"{i:032x}",
                "qa",
                f"u{i % 2000}",
                json.dumps({"messages": [{"role": "user", "content": f"How do I do task {q}?"}]}),
                json.dumps({"content": f"Answer {i} to task {q}."}),
                "succeeded",
                ts(t0),
                ts(t0 + timedelta(seconds=1)),
            )
        )
        if rng.random() < 0.3:
            feedback.append((f"{i:032x}", "explicit", "rating", float(rng.randint(1, 5)), ts(t0)))
    conn.executemany(
        "INSERT INTO rollout (id, workflow, user_id, input, output, status, started_at, ended_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rollouts,
    )
    conn.executemany(
        "INSERT INTO feedback (rollout_id, source, key, value, created_at) VALUES (?, ?, ?, ?, ?)",
        feedback,
    )
    conn.commit()
    conn.close()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(size: int, new: int, folder: Path) -> dict[str, float]:
    db = folder / f"h{size}.db"
    store = Store(f"sqlite:///{db}")
    config = parse_config("")
    now = datetime.now(timezone.utc)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    insert(db, 0, size, today - timedelta(days=60), timedelta(days=59), seed=size)
    out = folder / f"datasets-{size}"
    first = timed(lambda: curate_datasets(store, config, "qa", out))
    insert(db, size, new, today, min(now - today, timedelta(hours=1)), seed=7)  # same new data
    step = timed(lambda: curate_datasets(store, config, "qa", out))
    full = timed(lambda: [export(store, k, "qa", folder / f"full-{size}.{k}.jsonl") for k in KINDS])
    store.dispose()
    return {"first": first, "step": step, "full": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--new", type=int, default=1000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = {size: run(size, args.new, Path(tmp)) for size in sizes}
    print(f"{'history':>9} {'first pass':>11} {'curate step':>12} {'full export':>12}")
    for size, r in results.items():
        print(f"{size:>9,} {r['first']:>10.2f}s {r['step']:>11.3f}s {r['full']:>11.2f}s")
    small, large = results[sizes[0]], results[sizes[-1]]
    print(
        f"\n{sizes[-1]:,} vs {sizes[0]:,} rollouts, same {args.new:,} new ones: "
        f"curate step x{large['step'] / small['step']:.2f}, "
        f"full export (the old cycle) x{large['full'] / small['full']:.2f}"
    )


if __name__ == "__main__":
    main()
