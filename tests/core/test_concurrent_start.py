"""Several processes opening one new PostgreSQL store at the same moment (replicas of
``flywheel serve`` and a ``flywheel run`` deployed together) all start: one migrates, the
others find it done."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

OPEN_AT = """
import sys, time
from flywheel_middleware.store.database import Store
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all at once
store = Store(sys.argv[1])
print(store.current_revision() == store.head_revision())
"""


@pytest.mark.postgres
def test_processes_opening_a_new_postgres_store_together_all_start(postgres_url) -> None:
    at = time.time() + 3  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT, postgres_url, str(at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0 and out.strip() == "True", err[-2000:]
