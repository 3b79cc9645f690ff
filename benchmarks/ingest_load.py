"""Loopback load on POST /v1/telemetry: events per second, request latency, and proof that nothing was lost.

The server is ``flywheel serve`` (uvicorn, one process) on a fresh SQLite store; clients are
separate processes with keep-alive httpx connection pools. Every event carries a unique
(client, sequence) pair, so after the recorder drains, counting distinct pairs in the database
proves every accepted event was stored exactly once. The same run measures a baseline —
one event per request, as an unbatched ``sendBeacon`` would send — and prints the ratio.

    .venv/bin/python benchmarks/ingest_load.py [--events 200000] [--batch 50] [--clients 2 --threads 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_url: str, port: int, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "FLYWHEEL_API_KEYS": KEY, "FLYWHEEL_SPILL_DIR": str(workdir / "spill")}
    cmd = [
        sys.executable,
        "-c",
        "from flywheel_middleware.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--store",
        store_url,
        "--log-level",
        "error",
    ]
    proc = subprocess.Popen(
        cmd, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def client_proc(
    url: str, client_id: int, requests: int, batch: int, threads: int, out: mp.Queue
) -> None:
    """Send ``requests`` batches from ``threads`` threads; report latencies and failures."""
    import httpx

    per_thread = [
        requests // threads + (1 if t < requests % threads else 0) for t in range(threads)
    ]
    latencies: list[float] = []
    failures: list[str] = []
    accepted = [0]
    lock = threading.Lock()
    seq_base = [0]
    for n in per_thread:
        seq_base.append(seq_base[-1] + n * batch)

    def work(t: int) -> None:
        lat: list[float] = []
        ok = 0
        seq = seq_base[t]
        with httpx.Client(
            base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=2)
        ) as c:
            for _ in range(per_thread[t]):
                events = [
                    {
                        "event_type": "dwell",
                        "rollout_id": f"r{client_id}x{(seq + k) // 7}",
                        "session_id": f"s{client_id}",
                        "client_ts": 1.7e12 + seq + k,
                        "payload": {"ms": 1000 + k, "c": client_id, "i": seq + k},
                    }
                    for k in range(batch)
                ]
                body = json.dumps({"events": events} if batch > 1 else events[0])
                seq += batch
                t0 = time.perf_counter()
                r = c.post(
                    f"/v1/telemetry?key={KEY}", content=body, headers={"Content-Type": "text/plain"}
                )
                lat.append(time.perf_counter() - t0)
                if r.status_code == 202:
                    ok += r.json()["accepted"]
                else:
                    with lock:
                        failures.append(f"{r.status_code} {r.text[:200]}")
        with lock:
            latencies.extend(lat)
            accepted[0] += ok

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    out.put(
        {
            "latencies": latencies,
            "failures": failures,
            "accepted": accepted[0],
            "start": start,
            "elapsed": time.perf_counter() - start,
        }
    )


def health(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/health", timeout=10).json()


def run_load(
    url: str, db: Path, events: int, batch: int, clients: int, threads: int, label: str
) -> dict:
    before = health(url)["recorder"]["written"]
    requests_total = events // batch
    per_client = [
        requests_total // clients + (1 if i < requests_total % clients else 0)
        for i in range(clients)
    ]
    q: mp.Queue = mp.Queue()
    id_base = int(time.time() * 1000) % 1_000_000 * 100
    procs = [
        mp.Process(target=client_proc, args=(url, id_base + i, per_client[i], batch, threads, q))
        for i in range(clients)
    ]
    wall0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    send_wall = time.perf_counter() - wall0
    sent = sum(per_client) * batch
    accepted = sum(r["accepted"] for r in results)
    failures = [f for r in results for f in r["failures"]]
    # wait for the recorder to write everything it accepted
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        written = health(url)["recorder"]["written"] - before
        if written >= accepted:
            break
        time.sleep(0.05)
    drain_wall = time.perf_counter() - wall0
    ids = sorted({id_base + i for i in range(clients)})
    con = sqlite3.connect(db)
    marks = ",".join("?" for _ in ids)
    rows, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT json_extract(payload,'$.c') || ':' || json_extract(payload,'$.i')) "
        f"FROM telemetry_event WHERE json_extract(payload,'$.c') IN ({marks})",
        ids,
    ).fetchone()
    con.close()
    lat = sorted(x for r in results for x in r["latencies"])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "label": label,
        "batch": batch,
        "requests": len(lat),
        "sent": sent,
        "accepted": accepted,
        "stored_rows": rows,
        "stored_distinct": distinct,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "ingest_eps": accepted / send_wall,
        "end_to_end_eps": rows / drain_wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1000 if lat else float("nan"),
        "send_s": send_wall,
        "drain_s": drain_wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000, help="events in the batched run")
    ap.add_argument("--batch", type=int, default=50, help="events per request")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--threads", type=int, default=4, help="threads (connections) per client")
    ap.add_argument(
        "--baseline-events", type=int, default=10_000, help="events in the one-per-request baseline"
    )
    ap.add_argument(
        "--target", type=float, default=5_000.0, help="events/s the batched run should sustain"
    )
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fw-ingest-") as tmp:
        workdir = Path(tmp)
        db = workdir / "bench.db"
        url_store = f"sqlite:///{db}"
        port = free_port()
        server = start_server(url_store, port, workdir)
        url = f"http://127.0.0.1:{port}"
        try:
            run_load(url, db, 2_000, args.batch, 1, 2, "warm-up")
            base = run_load(
                url,
                db,
                args.baseline_events,
                1,
                args.clients,
                args.threads,
                "baseline: 1 event/request",
            )
            main_run = run_load(
                url,
                db,
                args.events,
                args.batch,
                args.clients,
                args.threads,
                f"batched: {args.batch} events/request",
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    print(
        f"ingest load on POST /v1/telemetry — {os.cpu_count()} CPUs, uvicorn 1 process, SQLite store, "
        f"{args.clients} client processes x {args.threads} connections; "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        "(clients and server share the CPUs)"
    )
    header = f"{'run':<32}{'events':>9}{'accepted/s':>12}{'stored/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'stored':>9}{'distinct':>9}{'lost':>6}{'4xx/5xx':>8}"
    print(header)
    print("-" * len(header))
    ok = True
    for r in (base, main_run):
        lost = r["accepted"] - r["stored_distinct"]
        dup = r["stored_rows"] - r["stored_distinct"]
        ok &= lost == 0 and dup == 0 and r["failures"] == 0 and r["accepted"] == r["sent"]
        print(
            f"{r['label']:<32}{r['sent']:>9}{r['ingest_eps']:>12,.0f}{r['end_to_end_eps']:>10,.0f}"
            f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{r['stored_rows']:>9}{r['stored_distinct']:>9}{lost:>6}{r['failures']:>8}"
        )
        if r["first_failure"]:
            print(f"   first failure: {r['first_failure']}")
    ratio = main_run["end_to_end_eps"] / base["end_to_end_eps"]
    print(f"batched vs baseline (stored events/s): {ratio:.1f}x")
    target_met = main_run["end_to_end_eps"] >= args.target
    print(
        f"target ≥ {args.target:,.0f} events/s stored with zero loss: "
        f"{'MET' if target_met and ok else 'NOT MET'} ({main_run['end_to_end_eps']:,.0f} events/s, "
        f"{main_run['accepted'] - main_run['stored_distinct']} lost, {main_run['stored_rows'] - main_run['stored_distinct']} duplicated)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
