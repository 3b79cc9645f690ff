"""Instructions a LangChain call costs the agent's process, counted by valgrind's callgrind.

Wall-clock figures on a shared machine drift by tens of percent within a minute
(``adapter_overhead.py`` pairs its rounds to cope). Instruction counts do not drift: the same
program and inputs count the same whatever else the machine is doing. Each variant runs in its
own process under callgrind with the same set-up and the same number of calls; its cost per
call over the untraced run's is its overhead. Every thread of the process is counted
(flywheel's writer thread too); the writer *process* is not, and ``flywheel (thread writer)``
shows what writing in-process costs instead.

    .venv/bin/python benchmarks/adapter_instructions.py [--calls 2000]   # about 3 min a variant
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "untraced": {},
    "no-op handler": {},
    "flywheel": {},
    "flywheel (thread writer)": {"FLYWHEEL_WRITER": "thread"},
}

_DRIVER = """
import os, sys
import flywheel_middleware as fw
from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
from flywheel_middleware.testing.fakes import EchoChatModel
from langchain_core.callbacks import BaseCallbackHandler

class NoOp(BaseCallbackHandler):
    pass

variant, calls = sys.argv[1], int(sys.argv[2])
model = EchoChatModel()
handler = {"no-op handler": NoOp()}.get(variant) or (
    FlywheelCallbackHandler(workflow="bench") if variant.startswith("flywheel") else None
)
config = {"callbacks": [handler]} if handler else None
fw.configure(store_url=os.environ["BENCH_STORE_URL"])
with fw.rollout("warm"):  # the same set-up in every variant: store, recorder, writer started
    pass
fw.flush()
for _ in range(calls):
    model.invoke("hello there", config=config)
fw.flush()
"""


def count(variant: str, calls: int, tmp: Path) -> int:
    """Instructions callgrind counted for one run of the driver."""
    out = tmp / f"callgrind.{abs(hash(variant))}"
    env = {**os.environ, **VARIANTS[variant]}
    env["BENCH_STORE_URL"] = f"sqlite:///{tmp / (str(abs(hash(variant))) + '.db')}"
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        + ["-c", _DRIVER, variant, str(calls)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    found = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if not found:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{result.stderr}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("adapter_instructions: valgrind is not installed; skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        totals = {name: count(name, args.calls, Path(tmp)) for name in VARIANTS}
    base = totals["untraced"]  # the same set-up and imports as every other run
    over = {name: (total - base) / args.calls for name, total in totals.items()}
    print(f"\nLangChain, fake chat model, {args.calls} calls: instructions per call (callgrind)")
    print(f"{'variant':<26}{'overhead':>12}{'x no-op floor':>15}")
    for name, extra in over.items():
        ratio = extra / over["no-op handler"] if over["no-op handler"] else float("nan")
        print(f"{name:<26}{extra:>+12,.0f}{ratio:>15.2f}")


if __name__ == "__main__":
    main()
