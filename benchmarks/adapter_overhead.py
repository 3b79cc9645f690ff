"""Per-call overhead of flywheel's capture adapters, against baselines measured in the same run.

LangChain: a fake chat model (``EchoChatModel``) invoked with no callbacks (the baseline),
then with a no-op ``BaseCallbackHandler`` (the floor LangChain's own callback dispatch costs),
langchain-core's ``RunCollectorCallbackHandler``, Langfuse's ``CallbackHandler`` (exporting to
nowhere), OpenInference's LangChain instrumentor (OTel ``BatchSpanProcessor`` to a no-op
exporter) and ``FlywheelCallbackHandler`` (recording into a real SQLite store on its writer
thread). Variants run interleaved in rounds; each figure is the median over rounds.
Targets: flywheel <= 2x the no-op floor and <= 1/4 of Langfuse's overhead. ``--otel-sdk``
first installs a global OTel SDK provider (as an APM or Langfuse 3 would), and adds
"OTel span" (one SDK span around each call) and "flywheel + OTel mirror" (flywheel with its
opt-in OTel mirroring switched on for that variant only).

OpenAI: ``chat.completions.create`` on the real SDK against the loopback server, plain client vs
``wrap_openai`` (plain and streaming), measured two ways (see ``OPENAI_METHODS``), with the
agent thread's and the writer thread's CPU apart. Target: <= 5% overhead.

    .venv/bin/python benchmarks/adapter_overhead.py [--calls 2000] [--rounds 7] [--only openai]
        [--otel-sdk]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


def _timed(fn: Callable[[], Any], calls: int, settle: Callable[[], Any] | None = None) -> tuple:
    """(wall, cpu) seconds per call over ``calls`` calls, ``settle()`` (flushing background
    work: flywheel's writer, an exporter) included. CPU is the whole process's time, so work a
    tracer pushes to its own threads counts, and other processes' load does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    if settle is not None:
        settle()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


class _NoExport:
    """An OTel SpanExporter that drops everything (so no network, no blocking)."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def install_otel_sdk() -> Any:
    """Install a global OTel SDK TracerProvider (BatchSpanProcessor to a no-op exporter)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_NoExport()))  # type: ignore[arg-type]
    trace.set_tracer_provider(provider)
    return provider


def langchain_variants(
    sdk: Any | None = None,
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (make a call, settle: flush what the tracer does in the background). ``sdk``:
    the global SDK provider ``--otel-sdk`` installed, adding the variants that use it."""
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

    import flywheel_middleware as fw
    from flywheel_middleware.testing.fakes import EchoChatModel

    model = EchoChatModel()
    nothing = lambda: None  # noqa: E731

    class NoOp(BaseCallbackHandler):
        pass

    noop = NoOp()
    collector = RunCollectorCallbackHandler()
    ours = FlywheelCallbackHandler(workflow="bench")
    variants: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {
        "untraced": (lambda: model.invoke("hello there"), nothing),
        "no-op handler": (
            lambda: model.invoke("hello there", config={"callbacks": [noop]}),
            nothing,
        ),
        "RunCollector": (
            lambda: model.invoke("hello there", config={"callbacks": [collector]}),
            collector.traced_runs.clear,
        ),
        "flywheel": (
            lambda: model.invoke("hello there", config={"callbacks": [ours]}),
            lambda: fw.flush(60),
        ),
    }
    if sdk is not None:
        from flywheel_middleware.capture import otel_mirror

        tracer = sdk.get_tracer("bench")

        def otel_span() -> Any:
            with tracer.start_as_current_span("chat"):
                return model.invoke("hello there")

        variants["OTel span"] = (otel_span, sdk.force_flush)
        variants["flywheel + OTel mirror"] = (
            variants["flywheel"][0],
            lambda: (fw.flush(60), sdk.force_flush()),
        )
        _INSTRUMENT["flywheel + OTel mirror"] = (
            lambda: otel_mirror.set_enabled(True),
            lambda: otel_mirror.set_enabled(False),
        )
    try:
        from langfuse import Langfuse
        from langfuse.langchain import CallbackHandler
        from opentelemetry.sdk.trace import TracerProvider

        client = Langfuse(
            public_key="pk-lf-bench",
            secret_key="sk-lf-bench",
            host="http://127.0.0.1:9",
            tracer_provider=TracerProvider(),
            span_exporter=_NoExport(),  # type: ignore[arg-type]
        )
        lf = CallbackHandler(public_key="pk-lf-bench")
        variants["Langfuse"] = (
            lambda: model.invoke("hello there", config={"callbacks": [lf]}),
            client.flush,
        )
    except Exception as exc:  # not installed or incompatible: say so, keep going
        print(f"(Langfuse skipped: {exc!r})")
    try:
        from openinference.instrumentation.langchain import LangChainInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_NoExport()))  # type: ignore[arg-type]
        instrumentor = LangChainInstrumentor()
        variants["OpenInference"] = (
            lambda: model.invoke("hello there"),
            provider.force_flush,
        )
        # instrumenting is global: switched on only while its variant runs (see _run_round)
        _INSTRUMENT["OpenInference"] = (
            lambda: instrumentor.instrument(tracer_provider=provider),
            instrumentor.uninstrument,
        )
    except Exception as exc:
        print(f"(OpenInference skipped: {exc!r})")
    return variants


_INSTRUMENT: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}


def _process_cpu(pid: int | None) -> float:
    """CPU seconds another process has used (Linux /proc), 0 where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def _writer_pid() -> int | None:
    """The pid of flywheel's writer process, if the recorder runs one."""
    import flywheel_middleware as fw

    return fw.get_recorder().writer_pid


def bench_langchain(
    calls: int, rounds: int, sdk: Any | None = None
) -> dict[str, list[tuple[float, float]]]:
    """name -> [(wall, cpu) seconds per call] for each round.

    Each round runs every variant once, in a new (seeded) order, so the machine's drift (this
    one is shared) hits all variants alike and is cancelled by comparing within the round. The
    flywheel variant's CPU includes its writer process's CPU, so nothing is hidden off-process.
    """
    variants = langchain_variants(sdk)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for name, (call, settle) in variants.items():  # warm up every path once
        on, off = _INSTRUMENT.get(name, (None, None))
        if on:
            on()
        _timed(call, 200, settle)
        if off:
            off()
    order, shuffle = list(variants), random.Random(7).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            call, settle = variants[name]
            on, off = _INSTRUMENT.get(name, (None, None))
            if on:
                on()
            pid = _writer_pid() if name.startswith("flywheel") else None
            child = _process_cpu(pid)
            wall, cpu = _timed(call, calls, settle)
            cpu += (_process_cpu(pid) - child) / calls
            results[name].append((wall, cpu))
            if off:
                off()
    return results


def paired_overheads(
    results: dict[str, list[tuple[float, float]]], which: int
) -> dict[str, list[float]]:
    """Per round, each variant's cost minus the untraced call's in the same round (µs)."""
    base = [r[which] for r in results["untraced"]]
    return {
        name: [(r[which] - b) * 1e6 for r, b in zip(runs, base, strict=True)]
        for name, runs in results.items()
    }


def _writer_cpu_clock() -> Callable[[], float] | None:
    """The CPU-time clock of flywheel's writer thread (Linux), or None where there is none."""
    import threading

    thread = next((t for t in threading.enumerate() if t.name == "flywheel-recorder"), None)
    try:
        clock = time.pthread_getcpuclockid(thread.ident)  # type: ignore[union-attr]
        time.clock_gettime(clock)
    except (AttributeError, OSError, TypeError):
        return None
    return lambda: time.clock_gettime(clock)


# The two ways the OpenAI figures are taken; each round runs every variant with both.
OPENAI_METHODS = {
    "continuous": "blocks of {continuous} calls with flywheel's writer on its own 0.2 s schedule, "
    "as in a running agent (each block's final flush is timed too)",
    "blocks": "the earlier figure: blocks of {calls} calls, then fw.flush() inside the timing, "
    "so most SQLite writing is serialized into the block instead of overlapping network waits",
}
# A 200-chunk stream takes about as long as this many short calls: its blocks are this much shorter.
LONG_SHARE = 10
# The interleaved method runs the long streams every this many iterations (enough samples for
# a median whose interval is a few points wide, at about the time the short calls take).
LONG_EVERY = 4
OPENAI_VARIANTS = ("plain", "wrapped", "plain stream", "plain stream+usage", "wrapped stream")


def _load_wrapper(path: str) -> Callable[..., Any]:
    """``wrap_openai`` from another version of ``adapters/openai.py`` (e.g. ``git show
    REV:adapters/openai.py > /tmp/old.py``), to measure it in the same run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flywheel_openai_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wrap_openai


def _tracing_floor(client: Any, messages: list[dict[str, str]]) -> Callable[[], Any]:
    """A plain call inside the least any adapter records for it through flywheel's tracing API:
    a root span (one rollout with one span, queued whole at its end) with its usage and
    answer. What that costs is the core's floor, under whatever the wrapper itself adds."""
    from flywheel_middleware.capture import handles as tracing

    create = client.chat.completions.create

    def call() -> Any:
        span = tracing.start_span(
            "chat.completions", "llm", workflow="bench-floor", input=messages, model="m"
        )
        result = create(model="m", messages=messages)
        span.input_tokens, span.output_tokens = (
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
        )
        message = result.choices[0].message
        span.output = {"role": message.role, "content": message.content}
        span.end()
        return result

    return call


def bench_openai(
    calls: int,
    rounds: int,
    continuous: int = 800,
    baseline: str | None = None,
    interleaved: int = 1500,
) -> tuple[dict[str, dict[str, list[tuple[float, ...]]]], Interleaved]:
    """The two block methods' figures and the ``interleaved`` method's. Blocks: method ->
    variant -> per round (wall, cpu, agent-thread cpu, writer-thread cpu, writer-process cpu)
    seconds per call, over ``rounds`` rounds that alternate the variants; cpu is this process's
    and the writer process's. The writer's thread CPU is NaN where the platform has no
    per-thread clock. ``baseline``: the path of
    another ``adapters/openai.py``, measured too (variants ``baseline``, ``baseline stream``)."""
    import openai
    from flywheel_middleware.adapters.openai import wrap_openai

    import flywheel_middleware as fw

    messages = [{"role": "user", "content": "hello there"}]
    # The server runs in its own process: in-process it would share the GIL with the client
    # and flywheel's writer thread, which no real deployment does.
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel_middleware.testing.openai_server"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = proc.stdout.readline().strip() if proc.stdout else ""
        plain = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        wrapped = wrap_openai(
            openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0),
            workflow="bench-openai",
        )

        def call(client: Any) -> Callable[[], Any]:
            return lambda: client.chat.completions.create(model="m", messages=messages)

        def stream(client: Any, prompt: Any = messages, **extra: Any) -> Callable[[], Any]:
            return lambda: list(
                client.chat.completions.create(model="m", messages=prompt, stream=True, **extra)
            )

        # The server echoes the prompt a word a chunk: this answer streams in 200 chunks.
        long_prompt = [{"role": "user", "content": " ".join(["word"] * 198)}]

        variants = {
            "plain": call(plain),
            "wrapped": call(wrapped),
            "plain stream": stream(plain),
            # what the usage chunk the wrapper asks for costs the client without flywheel
            "plain stream+usage": stream(plain, stream_options={"include_usage": True}),
            "wrapped stream": stream(wrapped),
            "plain long stream": stream(plain, long_prompt),
            "wrapped long stream": stream(wrapped, long_prompt),
        }
        variants["floor"] = _tracing_floor(
            openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0), messages
        )
        if baseline:
            other = _load_wrapper(baseline)(
                openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0),
                workflow="bench-openai-baseline",
            )
            variants["baseline"], variants["baseline stream"] = call(other), stream(other)
        for fn in variants.values():
            _timed(fn, 50, fw.flush)
        writer_clock = _writer_cpu_clock()
        nan = float("nan")

        def run(fn: Callable[[], Any], n: int, settle: Any) -> tuple[float, ...]:
            pid = _writer_pid()
            child = _process_cpu(pid)
            writer = writer_clock() if writer_clock else nan
            agent = time.thread_time()
            wall, cpu = _timed(fn, n, settle)
            agent = (time.thread_time() - agent) / n
            writer = (writer_clock() - writer) / n if writer_clock else nan
            child = (_process_cpu(pid) - child) / n
            return wall, cpu + child, agent, writer, child

        samples: dict[str, dict[str, list[tuple[float, ...]]]] = {
            method: {name: [] for name in variants} for method in OPENAI_METHODS
        }
        # Each round runs the variants in a new order (seeded): in a fixed order, work that
        # comes at intervals (a WAL checkpoint, a GC pass) keeps landing on the same variants.
        order, shuffle = list(variants), random.Random(20).shuffle
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                settle = None if name.startswith("plain") else fw.flush
                n = max(calls // LONG_SHARE, 2) if "long" in name else calls
                samples["blocks"][name].append(run(variants[name], n, settle))
            shuffle(order)
            for name in order:
                n = max(continuous // LONG_SHARE, 2) if "long" in name else continuous
                samples["continuous"][name].append(run(variants[name], n, fw.flush))

        # Each variant gets a client of its own here: a short call on a client that also
        # streams often opens a new connection, which alone moved the figures by 10%.
        def client(wrap: bool = False, **options: Any) -> Any:
            made = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
            return wrap_openai(made, workflow="bench-openai", **options) if wrap else made

        alone = {
            "plain": call(client()),
            "plain again": call(client()),
            "floor": _tracing_floor(client(), messages),
            "wrapped": call(client(True)),
            "plain stream": stream(client()),
            "plain stream+usage": stream(client(), stream_options={"include_usage": True}),
            "wrapped stream": stream(client(True)),
            # the same request as the caller's: what the wrapper's own code costs a stream
            "wrapped stream, no usage": stream(client(True, stream_usage=False)),
            "plain long stream": stream(client(), long_prompt),
            "wrapped long stream": stream(client(True), long_prompt),
        }
        for fn in alone.values():
            _timed(fn, 20, fw.flush)
        per_call = _interleaved(alone, interleaved, writer_clock)
    finally:
        proc.terminate()
        proc.wait(10)
    return samples, per_call


class Interleaved(NamedTuple):
    """The ``interleaved`` method's figures: each call's seconds, per variant, and the CPU
    seconds the writer's thread and process spent per recorded call."""

    times: dict[str, list[float]]
    writer_thread: float
    writer_process: float


def _interleaved(
    variants: dict[str, Callable[[], Any]], iterations: int, writer_clock: Any
) -> Interleaved:
    """Every variant once per iteration, in a new order each time, each call timed alone:
    the machine's drift (tens of percent within a minute here) then hits all variants alike.
    A second plain client (``plain again``) shows what this method cannot resolve. The
    writer's background work lands on whichever calls are in flight, so its CPU per recorded
    call is returned too, to be added by the reader."""
    import flywheel_middleware as fw

    times: dict[str, list[float]] = {n: [] for n in variants}
    order, shuffle, clock = list(variants), random.Random(21).shuffle, time.perf_counter
    fw.flush()
    pid = _writer_pid()
    child, thread = _process_cpu(pid), writer_clock() if writer_clock else float("nan")
    calls = 0
    for i in range(iterations):
        shuffle(order)
        for name in order:
            if "long" in name and i % LONG_EVERY:
                continue  # a 200-chunk stream takes about as long as ten short calls
            start = clock()
            variants[name]()
            times[name].append(clock() - start)
            calls += not name.startswith("plain")
    fw.flush()
    thread = (writer_clock() - thread) if writer_clock else float("nan")
    return Interleaved(times, thread / calls, (_process_cpu(pid) - child) / calls)


def _medians(
    samples: dict[str, dict[str, list[tuple[float, ...]]]],
) -> dict[str, dict[str, tuple[float, ...]]]:
    """Each figure's median over the rounds, per method and variant."""
    return {
        method: {
            name: tuple(statistics.median(column) for column in zip(*rows, strict=True))
            for name, rows in by_name.items()
        }
        for method, by_name in samples.items()
    }


def _paired_pct(rows: list[tuple[float, ...]], base: list[tuple[float, ...]]) -> str:
    """The wall overhead over ``base`` taken round by round (both ran in the same round):
    its median and the rounds' middle half, which shows how far the machine's noise goes."""
    pcts = sorted((r[0] / b[0] - 1) * 100 for r, b in zip(rows, base, strict=True))
    n = len(pcts)
    q1, q3 = pcts[n // 4], pcts[(3 * n) // 4]
    return f"paired {statistics.median(pcts):+.1f}%, middle half {q1:+.1f}..{q3:+.1f}%"


def isolated_costs(calls: int = 5000) -> tuple[float, float]:
    """(agent-thread µs, writer-thread µs) per LangChain call, measured without LangChain's
    dispatch or other threads: the handler's two callbacks called directly (records kept in a
    list), then those records turned into rows and written in one transaction. Min of 5 runs,
    so the figures are stable on a noisy machine."""
    import timeit
    import uuid

    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    import flywheel_middleware as fw
    from flywheel_middleware import runtime
    from flywheel_middleware.capture.records import expand_calls, ns_to_sqlite_text
    from flywheel_middleware.recording.rows import record_row

    kept: list[Any] = []

    class Keep:
        def enqueue(self, record: Any) -> None:
            kept.append(record)

    handler = FlywheelCallbackHandler(workflow="bench-isolated")
    messages = [[HumanMessage("hello there")]]
    metadata = {"ls_provider": "echo", "ls_model_name": "echo-1", "ls_model_type": "chat"}
    params = {"model": "echo-1", "temperature": 0.0, "_type": "echo-chat", "stop": None}
    usage = {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}
    message = AIMessage("echo: hello there", usage_metadata=usage)
    result = LLMResult(generations=[[ChatGeneration(message=message)]], llm_output={})
    ids = [uuid.uuid4() for _ in range(calls)]

    def run() -> None:
        for rid in ids:
            handler.on_chat_model_start(
                {"name": "EchoChatModel"},
                messages,
                run_id=rid,
                metadata=metadata,
                invocation_params=params,
                name="EchoChatModel",
            )
            handler.on_llm_end(result, run_id=rid)

    saved = runtime._state.recorder
    runtime._state.recorder = Keep()
    try:
        agent = min(timeit.repeat(run, number=1, repeat=5)) / calls
    finally:
        runtime._state.recorder = saved
    records = expand_calls(kept[-calls:])  # a one-span rollout is one call record
    store = fw.get_store()

    def write() -> None:
        by_table: dict[str, list[tuple]] = {}
        columns: dict[str, tuple] = {}
        for record in records:
            by_table.setdefault(record.TABLE, []).append(record_row(record, ns_to_sqlite_text))
            columns[record.TABLE] = record.COLUMNS
        conn = store.raw_connection()
        try:
            for table, rows in by_table.items():
                store.write_rows(conn, table, columns[table], rows)
            conn.rollback()  # measure the work, keep the benchmark store clean
        finally:
            conn.close()

    writer = min(timeit.repeat(write, number=1, repeat=5)) / calls
    return agent * 1e6, writer * 1e6


def isolated_openai_costs(calls: int = 5000) -> tuple[float, float]:
    """(agent-thread µs, writer-thread µs) per wrapped ``chat.completions.create``, without
    the network: the wrapper around a stub returning a parsed ``ChatCompletion`` (minus the
    stub itself), then the records' rows written in one transaction. Min of 5 runs."""
    import timeit

    from flywheel_middleware.adapters.openai import _Options, _sync_wrapper
    from openai.types.chat import ChatCompletion

    import flywheel_middleware as fw
    from flywheel_middleware import runtime
    from flywheel_middleware.capture.records import expand_calls, ns_to_sqlite_text
    from flywheel_middleware.recording.rows import record_row

    response = ChatCompletion.model_validate(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "echo: hello there"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
        }
    )

    def stub(**kwargs: Any) -> Any:
        return response

    wrapped = _sync_wrapper(stub, "chat", _Options("bench-isolated", True))
    messages = [{"role": "user", "content": "hello there"}]
    kept: list[Any] = []

    class Keep:
        def enqueue(self, record: Any) -> None:
            kept.append(record)

    def run(fn: Callable[..., Any]) -> Callable[[], None]:
        def loop() -> None:
            for _ in range(calls):
                fn(model="m", messages=messages)

        return loop

    saved = runtime._state.recorder
    runtime._state.recorder = Keep()
    try:
        bare = min(timeit.repeat(run(stub), number=1, repeat=5))
        agent = min(timeit.repeat(run(wrapped), number=1, repeat=5)) - bare
    finally:
        runtime._state.recorder = saved
    records = expand_calls(kept[-calls:])  # a call outside a rollout is one call record
    store = fw.get_store()

    def write() -> None:
        by_table: dict[str, list[tuple]] = {}
        columns: dict[str, tuple] = {}
        for record in records:
            by_table.setdefault(record.TABLE, []).append(record_row(record, ns_to_sqlite_text))
            columns[record.TABLE] = record.COLUMNS
        conn = store.raw_connection()
        try:
            for table, rows in by_table.items():
                store.write_rows(conn, table, columns[table], rows)
            conn.rollback()
        finally:
            conn.close()

    writer = min(timeit.repeat(write, number=1, repeat=5))
    return agent / calls * 1e6, writer / calls * 1e6


def report_openai(args: argparse.Namespace) -> None:
    """Run and print the OpenAI section (the store is configured by ``main``)."""
    rounds, per_call = bench_openai(
        args.openai_calls,
        args.openai_rounds,
        args.openai_continuous,
        args.openai_baseline,
        args.openai_interleaved,
    )
    oa = _medians(rounds)
    print(
        f"\nOpenAI SDK, loopback server in its own process, median of {args.openai_rounds} "
        "rounds, each running the variants in a new order; two methods:"
    )
    fmt = {"calls": args.openai_calls, "continuous": args.openai_continuous}
    for method, text in OPENAI_METHODS.items():
        print(f"  {method}: {text.format(**fmt)}")

    def pct(new: float, old: float) -> str:
        return f"{(new - old) / old * 100:+.1f}%"

    wrappers = ("wrapped", "baseline") if args.openai_baseline else ("wrapped",)
    kinds = [("", w) for w in wrappers] + [(" stream", w) for w in wrappers]
    for (kind, wrapper), method in itertools.product(kinds + [(" long stream", "wrapped")], oa):
        plain, ours = oa[method]["plain" + kind], oa[method][wrapper + kind]
        (pw, pc, pa, *_), (ww, wc, wa, wt, wp) = plain, ours
        threads = (
            ""
            if wt != wt
            else f"   agent thread {(wa - pa) * 1e6:+.0f}, writer thread {wt * 1e6:.0f}"
            f", process {wp * 1e6:.0f}"
        )
        label = f"create{kind}" + (" (baseline)" if wrapper == "baseline" else "")
        paired = _paired_pct(rounds[method][wrapper + kind], rounds[method]["plain" + kind])
        print(
            f"{label:<25}{method:<11} wall {pw * 1e6:6.0f} -> {ww * 1e6:6.0f} µs "
            f"({pct(ww, pw)}; {paired})   cpu {pc * 1e6:6.0f} -> {wc * 1e6:6.0f} µs "
            f"({pct(wc, pc)}){threads}   target <= 5%"
        )
    for method, by_name in oa.items():
        (pw, pc, pa, *_), (lw, lc, la, lt, _) = by_name["plain"], by_name["floor"]
        paired = _paired_pct(rounds[method]["floor"], rounds[method]["plain"])
        print(
            f"tracing floor ({method}): wall {pct(lw, pw)} ({paired}), cpu {pct(lc, pc)}, agent "
            f"thread {(la - pa) * 1e6:+.0f}, writer {lt * 1e6:.0f} µs: one root tracing.start_span "
            "(a rollout with one span, queued whole) around the plain client, no wrapper logic"
        )
    for method, by_name in oa.items():
        (pw, pc, *_), (uw, uc, *_) = by_name["plain stream"], by_name["plain stream+usage"]
        paired = _paired_pct(rounds[method]["plain stream+usage"], rounds[method]["plain stream"])
        print(
            f"without flywheel, asking for stream usage ({method}): wall {pct(uw, pw)} ({paired}), "
            f"cpu {pct(uc, pc)} (the chunk the wrapper asks for to record token counts)"
        )
    report_interleaved(per_call, args.openai_interleaved)
    agent_us, writer_us = isolated_openai_costs()
    plain_wall = oa["continuous"]["plain"][0] * 1e6
    print(
        f"isolated (min of 5): wrapper {agent_us:.1f} µs/call on the agent thread + rows "
        f"and SQLite {writer_us:.1f} µs/call on the writer thread = "
        f"{(agent_us + writer_us) / plain_wall * 100:.1f}% of the plain loopback call "
        f"({plain_wall:.0f} µs); hot caches: inside the SDK's call the same work costs "
        "several times that (the thread figures above)"
    )


def _median_ratio_interval(ours: list[float], base: list[float]) -> tuple[float, float]:
    """A 95% bootstrap interval of ``median(ours) / median(base) - 1``. Both lists hold one
    call per iteration, in order, so iterations are resampled as pairs (a slow moment of
    the machine stays in both)."""
    import numpy as np
    from scipy.stats import bootstrap

    def ratio(a: Any, b: Any, axis: int) -> Any:
        return np.median(a, axis=axis) / np.median(b, axis=axis) - 1

    interval = bootstrap(
        (ours, base), ratio, paired=True, vectorized=True, n_resamples=2000,
        method="percentile", rng=5,
    ).confidence_interval  # fmt: skip
    return float(interval.low), float(interval.high)


def report_interleaved(per_call: Interleaved, iterations: int) -> None:
    """The per-call interleaved figures: median and 10%-trimmed mean of each call's time."""
    from scipy.stats import trim_mean

    times = per_call.times
    print(
        f"interleaved: {iterations} iterations, every variant once in each (the long streams "
        f"every {LONG_EVERY}th), in a new order each time, each call timed alone; the writer's "
        f"background work lands on all {len(times)} variants alike: it used "
        f"{per_call.writer_thread * 1e6:.1f} µs of its thread's CPU and "
        f"{per_call.writer_process * 1e6:.1f} µs of its process's "
        "a recorded call, on top of the figures below if every microsecond were the agent's"
    )
    pairs = [("plain again", "plain"), ("floor", "plain"), ("wrapped", "plain")]
    pairs += [("plain stream+usage", "plain stream"), ("wrapped stream", "plain stream")]
    pairs += [
        ("wrapped stream", "plain stream+usage"),
        ("wrapped stream, no usage", "plain stream"),
    ]
    pairs += [("wrapped long stream", "plain long stream")]
    for name, base in pairs:
        ours, plain = times[name], times[base]
        med, pmed = statistics.median(ours), statistics.median(plain)
        trim, ptrim = trim_mean(ours, 0.1), trim_mean(plain, 0.1)
        low, high = _median_ratio_interval(ours, plain)
        print(
            f"  {name:<24} over {base:<18} median {pmed * 1e6:6.0f} -> {med * 1e6:6.0f} µs "
            f"({(med / pmed - 1) * 100:+.1f}%, 95% interval {low * 100:+.1f}..{high * 100:+.1f}%),"
            f" trimmed mean {(trim / ptrim - 1) * 100:+.1f}%"
            + ("   target <= 5%" if name.startswith("wrapped") else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="LangChain calls per round")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--openai-calls", type=int, default=100, help="per block (blocks)")
    parser.add_argument("--openai-continuous", type=int, default=800, help="per block (continuous)")
    parser.add_argument("--openai-rounds", type=int, default=11)
    parser.add_argument(
        "--openai-interleaved", type=int, default=1500, help="iterations (interleaved)"
    )
    parser.add_argument("--only", choices=("langchain", "openai"), help="run one section")
    parser.add_argument(
        "--openai-baseline", metavar="PATH", help="another adapters/openai.py to measure too"
    )
    parser.add_argument(
        "--otel-sdk",
        action="store_true",
        help="install a global OTel SDK provider first; add the OTel span and mirror variants",
    )
    args = parser.parse_args()

    import flywheel_middleware as fw

    with tempfile.TemporaryDirectory() as tmp:
        fw.configure(store_url=f"sqlite:///{Path(tmp) / 'bench.db'}")
        if args.only == "openai":
            report_openai(args)
            fw.shutdown()
            return
        sdk = install_otel_sdk() if args.otel_sdk else None
        lc = bench_langchain(args.calls, args.rounds, sdk)
        print(
            f"\nLangChain, fake chat model, {args.calls} calls x {args.rounds} rounds: medians"
            " of each round's figures; overheads are paired with the same round's untraced call"
            + ("; a global OTel SDK provider is installed" if sdk is not None else "")
        )
        print(f"{'variant':<24}{'wall µs':>10}{'overhead':>10}{'cpu µs':>10}{'overhead':>10}")
        paired = {label: paired_overheads(lc, i) for i, label in enumerate(("wall", "cpu"))}
        over = {
            label: {n: statistics.median(v) for n, v in p.items()} for label, p in paired.items()
        }
        for name, runs in lc.items():
            print(
                f"{name:<24}{statistics.median(r[0] for r in runs) * 1e6:>10.1f}"
                f"{over['wall'][name]:>+10.1f}"
                f"{statistics.median(r[1] for r in runs) * 1e6:>10.1f}{over['cpu'][name]:>+10.1f}"
            )
        for label, o in over.items():
            ours, floor = o["flywheel"], o["no-op handler"]
            ratios = sorted(
                f / n
                for f, n in zip(
                    paired[label]["flywheel"], paired[label]["no-op handler"], strict=True
                )
            )
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            line = (
                f"{label:>4}: flywheel / no-op floor = {ours / floor:.2f}x (target <= 2;"
                f" rounds' middle half {q1:.2f}-{q3:.2f}x)"
            )
            if "Langfuse" in o:
                line += f"; / Langfuse = {ours / o['Langfuse']:.2f} (target <= 0.25)"
            if "OpenInference" in o:
                line += f"; / OpenInference = {ours / o['OpenInference']:.2f}"
            line += f"; / RunCollector = {ours / o['RunCollector']:.2f}"
            print(line)
            if "flywheel + OTel mirror" in o:
                mirror = o["flywheel + OTel mirror"]
                print(
                    f"{label:>4}: flywheel + OTel mirror: mirroring adds {mirror - ours:+.1f} µs"
                    f" (one OTel SDK span adds {o['OTel span']:+.1f}); / no-op floor ="
                    f" {mirror / floor:.2f}x"
                    + (f"; / Langfuse = {mirror / o['Langfuse']:.2f}" if "Langfuse" in o else "")
                )
        rows = fw.get_store().execute("SELECT COUNT(*) FROM rollout WHERE workflow = 'bench'")[0][0]
        writer = fw.get_recorder().counters.writer
        print(
            f"(flywheel wrote {rows} rollouts to SQLite during the run, rows by its writer"
            f" {writer}; flushes are timed; its cpu includes the writer process's)"
        )

        agent_us, writer_us = isolated_costs()
        print(
            f"isolated (min of 5): flywheel callbacks {agent_us:.1f} µs/call on the agent "
            f"thread; rows + SQLite {writer_us:.1f} µs/call on the writer thread"
        )

        if args.only != "langchain":
            report_openai(args)
        fw.shutdown()


if __name__ == "__main__":
    main()
