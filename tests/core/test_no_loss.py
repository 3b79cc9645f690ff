"""No loss: a heavy concurrent load, then the process exits without calling flush()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from sqlalchemy import create_engine, text

LOAD = textwrap.dedent(
    """
    import asyncio, sys, threading
    import flywheel_middleware as fw

    THREADS, ROLLOUTS, SPANS, ASYNC = (int(a) for a in sys.argv[2:6])
    # a queue a fraction of the load: the producers outpace the journal thread and wait on it
    fw.configure(store_url=sys.argv[1], queue_size=THREADS * ROLLOUTS * SPANS // 4)

    def worker(t):
        for i in range(ROLLOUTS):
            with fw.rollout("load", user_id=f"t{t}", input=f"{t}-{i}") as r:
                with fw.span("root", kind="agent") as root:
                    for j in range(SPANS - 1):
                        with fw.span(f"child-{j}", kind="tool", input=r.id):
                            pass

    async def one(i):
        async with fw.rollout("load-async", input=f"a-{i}") as r:
            async with fw.span("root", kind="agent"):
                for j in range(SPANS - 1):
                    async with fw.span(f"child-{j}", kind="tool", input=r.id):
                        await asyncio.sleep(0)

    async def main():
        await asyncio.gather(*(one(i) for i in range(ASYNC)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    asyncio.run(main())
    for t in threads:
        t.join()
    print("exiting without flush", flush=True)
    """
)
THREADS, ROLLOUTS, SPANS, ASYNC = 8, 250, 10, 200


def _run_load(url: str, tmp_path) -> None:
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    done = subprocess.run(
        [sys.executable, str(script), url, *map(str, (THREADS, ROLLOUTS, SPANS, ASYNC))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exiting without flush" in done.stdout


@pytest.mark.slow
def test_nothing_is_lost_when_the_process_exits_without_flush(store_url, tmp_path):
    _run_load(store_url, tmp_path)
    engine = create_engine(store_url)
    with engine.connect() as conn:
        rollouts = dict(
            conn.execute(text("SELECT workflow, COUNT(*) FROM rollout GROUP BY workflow")).all()
        )
        assert rollouts == {"load": THREADS * ROLLOUTS, "load-async": ASYNC}
        spans = conn.execute(text("SELECT id, rollout_id, parent_id, name, input FROM span")).all()
    engine.dispose()
    total = THREADS * ROLLOUTS + ASYNC
    assert len(spans) == total * SPANS
    per_rollout = Counter(s.rollout_id for s in spans)
    assert len(per_rollout) == total and set(per_rollout.values()) == {SPANS}
    roots = {s.rollout_id: s.id for s in spans if s.name == "root"}
    for s in spans:
        if s.name == "root":
            assert s.parent_id is None
        else:
            # each child recorded its own rollout's id as input: no span crossed rollouts
            assert s.input == f'"{s.rollout_id}"' or s.input == s.rollout_id
            assert s.parent_id == roots[s.rollout_id]
