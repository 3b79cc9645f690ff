"""Memory of an agent process while its store is down: bounded by ``max_buffer_mb``.

    .venv/bin/python benchmarks/outage_memory.py [--seconds 20] [--kb 16] [--rate 200]

A SQLite store is locked (``BEGIN EXCLUSIVE`` from another connection) for ``--seconds``
while rollouts with ``--kb`` KB inputs are recorded at ``--rate`` a second; then the lock
goes and everything is flushed. For each setting it prints the process's resident memory
before, at the end of the outage and after, how much the recorder held in memory at its
peak, and how many records went to the journal instead. Each setting runs in a fresh
process, so one does not inherit another's heap.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

RUN = textwrap.dedent(
    """
    import json, sqlite3, sys, time
    import flywheel_middleware as fw

    url, seconds, kb, rate, durability, max_mb = sys.argv[1:7]
    seconds, kb, rate, max_mb = float(seconds), int(kb), float(rate), float(max_mb)

    def rss_mb():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    fw.configure(store_url=url, durability=durability, max_buffer_mb=max_mb)
    pad = "x" * (kb * 1024)
    for i in range(50):  # warm up: modules, the writer, the schema
        with fw.rollout("outage-memory", input={"i": i, "pad": pad}):
            pass
    fw.flush(30)
    before = rss_mb()
    lock = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=1)
    lock.execute("BEGIN EXCLUSIVE")
    recorder = fw.get_recorder()
    peak_buffer, n = 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with fw.rollout("outage-memory", input={"i": n, "pad": pad}):
            pass
        n += 1
        peak_buffer = max(peak_buffer, recorder.counters.buffered_bytes)
        time.sleep(1 / rate)
    during = rss_mb()
    lock.rollback()
    lock.close()
    flushed = fw.flush(120)
    after = rss_mb()
    c = recorder.counters
    print(json.dumps({
        "rollouts": n, "flushed": flushed, "rss_before": before, "rss_outage": during,
        "rss_after": after, "peak_buffer_mb": peak_buffer / 2**20, "spilled": c.spilled,
        "lost": c.lost, "written": c.written,
    }))
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--kb", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200)
    args = parser.parse_args()
    settings = [("journal", 64), ("journal", 16), ("memory", 64)]
    print(f"store locked {args.seconds:g} s; rollouts with {args.kb} KB inputs at {args.rate:g}/s")
    print(
        f"{'durability':<10} {'max MB':>6} {'rollouts':>8} {'RSS before':>10} "
        f"{'in outage':>9} {'after':>7} {'peak held MB':>12} {'to journal':>10} {'lost':>5}"
    )
    for durability, max_mb in settings:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RUN,
                    f"sqlite:///{tmp}/outage.db",
                    str(args.seconds),
                    str(args.kb),
                    str(args.rate),
                    durability,
                    str(max_mb),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=tmp,
            )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{durability:<10} {max_mb:>6g} {r['rollouts']:>8} {r['rss_before']:>9.0f}M "
            f"{r['rss_outage']:>8.0f}M {r['rss_after']:>6.0f}M {r['peak_buffer_mb']:>12.1f} "
            f"{r['spilled']:>10} {r['lost']:>5}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
