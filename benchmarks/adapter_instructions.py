"""Instructions a LangChain or OpenAI SDK call costs the agent's process, counted by callgrind.

Wall-clock figures on a shared machine drift by tens of percent within a minute
(``adapter_overhead.py`` pairs its rounds to cope). Instruction counts do not drift: the same
program and inputs count the same whatever else the machine is doing. Each variant runs in its
own process under callgrind with the same set-up and the same number of calls; its cost per
call over the untraced run's is its overhead. Every thread of the process is counted
(flywheel's writer thread too); the writer *process* is not, and ``flywheel (thread writer)``
shows what writing in-process costs instead.

The OpenAI section runs the real SDK over an in-memory HTTP transport (the SDK's own httpx
``MockTransport`` answering with canned OpenAI-format bodies), so only the client's side is
counted, and only the timed calls: callgrind starts counting after the set-up and warm-up.

    .venv/bin/python benchmarks/adapter_instructions.py [--calls 2000] [--openai-calls 300]
    [--only langchain|openai]     # LangChain about 3 min a variant, OpenAI under a minute
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


# The OpenAI variants; each process builds every client and warms every variant (the same
# set-up in all), then counts only its own variant's calls.
OPENAI_VARIANTS = (
    "plain",
    "floor",
    "wrapped",
    "plain stream",
    "plain stream+usage",
    "wrapped stream",
    "plain long stream",
    "wrapped long stream",
)

_OPENAI_DRIVER = """
import json, os, subprocess, sys
import openai
try:
    import httpx2 as httpx  # what openai 3.x is built on
except ImportError:
    import httpx
import flywheel_middleware as fw
from flywheel_middleware.capture import handles as tracing
from flywheel_middleware.adapters.openai import wrap_openai

def dumps(body):
    return json.dumps(body, separators=(",", ":"))  # the API's compact JSON

def chunk(delta, finish=None, usage=False):
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage:
        body["usage"] = None
    return "data: " + dumps(body) + "\\n\\n"

def stream(usage, pieces=("echo:", " hello", " there")):
    events = [chunk({"role": "assistant", "content": ""}, usage=usage)]
    events += [chunk({"content": p}, usage=usage) for p in pieces]
    events.append(chunk({}, "stop", usage=usage))
    if usage:
        tokens = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "choices": [], "usage": tokens}
        events.append("data: " + dumps(body) + "\\n\\n")
    return ("".join(events) + "data: [DONE]\\n\\n").encode()

LONG = ["echo:"] + [" word"] * 199  # an answer of 200 tokens, one chunk each
STREAMS = {(False, False): stream(False), (True, False): stream(True),
           (False, True): stream(False, LONG), (True, True): stream(True, LONG)}
COMPLETION = dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "echo: hello there"}}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}).encode()

def answer(request):
    body = json.loads(request.content)
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        long = body["messages"][0]["content"] == "long"
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=STREAMS[usage, long])
    return httpx.Response(200, headers={"content-type": "application/json"}, content=COMPLETION)

def client():
    return openai.OpenAI(base_url="http://openai.invalid/v1", api_key="sk-bench", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(answer)))

variant, calls = sys.argv[1], int(sys.argv[2])
fw.configure(store_url=os.environ["BENCH_STORE_URL"])
plain, floor_client = client(), client()
wrapped = wrap_openai(client(), workflow="bench")
messages = [{"role": "user", "content": "hello there"}]
long = [{"role": "user", "content": "long"}]

def floor():
    span = tracing.start_span("chat.completions", "llm", workflow="bench-floor", input=messages, model="m")
    result = floor_client.chat.completions.create(model="m", messages=messages)
    span.input_tokens = result.usage.prompt_tokens
    span.output_tokens = result.usage.completion_tokens
    span.output = {"role": "assistant", "content": result.choices[0].message.content}
    span.end()

usage = {"include_usage": True}
variants = {
    "plain": lambda: plain.chat.completions.create(model="m", messages=messages),
    "floor": floor,
    "wrapped": lambda: wrapped.chat.completions.create(model="m", messages=messages),
    "plain stream": lambda: list(
        plain.chat.completions.create(model="m", messages=messages, stream=True)),
    "plain stream+usage": lambda: list(plain.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options=usage)),
    "wrapped stream": lambda: list(
        wrapped.chat.completions.create(model="m", messages=messages, stream=True)),
    "plain long stream": lambda: list(
        plain.chat.completions.create(model="m", messages=long, stream=True)),
    "wrapped long stream": lambda: list(
        wrapped.chat.completions.create(model="m", messages=long, stream=True)),
}
for fn in variants.values():  # the same warm-up in every process
    for _ in range(20):
        fn()
fw.flush()
fn = variants[variant]
toggle = ["callgrind_control", "--instr=on", str(os.getpid())]
subprocess.run(toggle, capture_output=True, check=True)
for _ in range(calls):
    fn()
subprocess.run(toggle[:1] + ["--instr=off", toggle[2]], capture_output=True, check=True)
fw.flush()
"""


def count(
    variant: str, calls: int, tmp: Path, driver: str = _DRIVER, from_start: bool = True
) -> int:
    """Instructions callgrind counted for one run of the driver (``from_start=False``: only
    after the driver turns counting on itself)."""
    out = tmp / f"callgrind.{abs(hash(variant))}"
    env = {**os.environ, **VARIANTS.get(variant, {})}
    env["BENCH_STORE_URL"] = f"sqlite:///{tmp / (str(abs(hash(variant))) + '.db')}"
    counting = [] if from_start else ["--instr-atstart=no"]
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", *counting, f"--callgrind-out-file={out}", sys.executable]
        + ["-c", driver, variant, str(calls)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    found = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if not found:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{result.stderr}")
    return int(found.group(1))


def langchain_section(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        totals = {name: count(name, calls, Path(tmp)) for name in VARIANTS}
    base = totals["untraced"]  # the same set-up and imports as every other run
    over = {name: (total - base) / calls for name, total in totals.items()}
    print(f"\nLangChain, fake chat model, {calls} calls: instructions per call (callgrind)")
    print(f"{'variant':<26}{'overhead':>12}{'x no-op floor':>15}")
    for name, extra in over.items():
        ratio = extra / over["no-op handler"] if over["no-op handler"] else float("nan")
        print(f"{name:<26}{extra:>+12,.0f}{ratio:>15.2f}")


def openai_section(calls: int) -> None:
    """Two variants at a time (this machine has two cores; counts do not depend on it)."""
    from concurrent.futures import ThreadPoolExecutor

    long_calls = max(calls // 10, 1)  # a long stream costs some 40 short calls
    runs = {name: long_calls if "long" in name else calls for name in OPENAI_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(count, name, n, Path(tmp), _OPENAI_DRIVER, False)
            for name, n in runs.items()
        }
        per_call = {name: f.result() / runs[name] for name, f in futures.items()}
    print(
        f"\nOpenAI SDK over an in-memory transport, {calls} calls ({long_calls} long "
        "streams): instructions per call of the agent's process (callgrind, timed calls only)"
    )
    print(f"{'variant':<22}{'instructions':>14}{'over plain':>14}{'%':>8}")
    for name, total in per_call.items():
        plain = name.replace("wrapped", "plain").replace("+usage", "")
        base = per_call[plain if "stream" in name else "plain"]
        print(f"{name:<22}{total:>14,.0f}{total - base:>+14,.0f}{(total / base - 1) * 100:>+7.1f}%")
    print(
        "floor: a root tracing.start_span around the plain client (the least an adapter records); "
        "plain stream+usage: an unwrapped stream asking for the usage chunk the wrapper asks "
        "for; long stream: a 200-chunk answer (the others have 3 content chunks)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="LangChain calls per variant")
    parser.add_argument("--openai-calls", type=int, default=300, help="OpenAI calls per variant")
    parser.add_argument("--only", choices=("langchain", "openai"), help="run one section")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("adapter_instructions: valgrind is not installed; skipped")
        return
    if args.only != "openai":
        langchain_section(args.calls)
    if args.only != "langchain":
        openai_section(args.openai_calls)


if __name__ == "__main__":
    main()
