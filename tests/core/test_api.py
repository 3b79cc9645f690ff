"""The public API: rollouts, spans, traced functions, parenting across threads and tasks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flywheel_middleware.store import queries


def _spans(fw, rollout_id):
    fw.flush()
    return {s.name: s for s in queries.spans_of(fw.get_store(), rollout_id)}


def test_rollout_records_spans_under_the_right_parents(fw):
    with fw.rollout("qa", user_id="u1", session_id="s1", input={"q": "where is my order"}) as r:
        with fw.span("plan", kind="chain"):
            with fw.span("lookup", kind="tool", input={"id": 7}) as tool:
                tool.set_output({"status": "shipped"})
        with fw.span("answer", kind="llm", model="m-1") as llm:
            llm.set_usage(input_tokens=12, output_tokens=30)
        r.set_output("It shipped.")
    spans = _spans(fw, r.id)
    assert spans["plan"].parent_id is None
    assert spans["lookup"].parent_id == spans["plan"].id
    assert spans["answer"].parent_id is None
    assert [spans[n].sequence for n in ("plan", "lookup", "answer")] == [0, 1, 2]
    assert spans["lookup"].input == {"id": 7} and spans["lookup"].output == {"status": "shipped"}
    assert spans["answer"].model == "m-1" and spans["answer"].output_tokens == 30
    row = queries.find_rollout(fw.get_store(), r.id)
    assert (row.workflow, row.user_id, row.session_id, row.status) == (
        "qa",
        "u1",
        "s1",
        "succeeded",
    )
    assert row.input == {"q": "where is my order"} and row.output == "It shipped."
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (12, 30, 42)
    assert row.latency_ms >= 0 and row.ended_at >= row.started_at


def test_an_exception_marks_span_and_rollout_failed_and_propagates(fw):
    with pytest.raises(KeyError, match="missing"), fw.rollout("qa") as r:
        with fw.span("lookup", kind="tool"):
            raise KeyError("missing")
    spans = _spans(fw, r.id)
    assert spans["lookup"].status == "error" and "KeyError" in spans["lookup"].error
    row = queries.find_rollout(fw.get_store(), r.id)
    assert row.status == "failed" and "missing" in row.error


def test_traced_sync_and_async_functions(fw):
    @fw.traced(kind="tool")
    def add(a, b):
        return a + b

    @fw.traced(name="fetch", kind="retriever")
    async def fetch(q):
        await asyncio.sleep(0)
        return [q.upper()]

    with fw.rollout("qa") as r:
        assert add(2, b=3) == 5
        assert asyncio.run(fetch("x")) == ["X"]
    spans = _spans(fw, r.id)
    qual = "test_traced_sync_and_async_functions.<locals>.add"
    assert spans[qual].input == {"a": 2, "b": 3} and spans[qual].output == 5
    assert spans["fetch"].kind == "retriever" and spans["fetch"].output == ["X"]


def test_a_span_with_no_rollout_opens_one_implicitly(fw):
    with fw.span("standalone", kind="tool", workflow="adhoc") as s:
        s.set_output("done")
    fw.flush()
    row = queries.find_rollout(fw.get_store(), s.rollout.id)
    assert row.workflow == "adhoc" and row.output == "done"


async def test_concurrent_asyncio_rollouts_do_not_mix(fw):
    async def one(i):
        async with fw.rollout("qa", user_id=f"u{i}") as r, fw.span(f"outer-{i}"):
            await asyncio.sleep(0.001 * (i % 3))
            async with fw.span(f"inner-{i}"):
                await asyncio.sleep(0)
        return r

    rollouts = await asyncio.gather(*(one(i) for i in range(50)))
    fw.flush()
    for i, r in enumerate(rollouts):
        spans = {s.name: s for s in queries.spans_of(fw.get_store(), r.id)}
        assert set(spans) == {f"outer-{i}", f"inner-{i}"}
        assert spans[f"inner-{i}"].parent_id == spans[f"outer-{i}"].id


def test_threads_each_keep_their_own_rollout(fw):
    results = {}

    def work(i):
        with fw.rollout("qa", user_id=f"t{i}") as r:
            for j in range(20):
                with fw.span(f"s{j}"):
                    pass
        results[i] = r.id

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fw.flush()
    for rid in results.values():
        spans = queries.spans_of(fw.get_store(), rid)
        assert len(spans) == 20 and sorted(s.sequence for s in spans) == list(range(20))


def test_current_rollout_and_span(fw):
    assert fw.current_rollout() is None
    with fw.rollout("qa") as r:
        assert fw.current_rollout() is r
        with fw.span("x") as s:
            assert fw.current_span() is s and fw.current_rollout() is r
    assert fw.current_rollout() is None


def test_config_comes_from_the_workflow(tmp_path, sqlite_url):
    import flywheel_middleware as fw

    fw.configure(
        config={"workflows": {"qa": {"config": {"llm": {"temperature": 0.3}}}}},
        store_url=sqlite_url,
    )
    try:
        with fw.rollout("qa", user_id="u1") as r:
            assert r.config["llm"]["temperature"] == 0.3
        with fw.rollout("unknown") as r2:
            assert r2.config == {}
    finally:
        fw.shutdown()


def test_spans_are_mirrored_to_an_otel_sdk_when_asked(sqlite_url, otel_sdk):
    import flywheel_middleware as fw

    fw.configure(store_url=sqlite_url, otel=True)
    try:
        with fw.rollout("qa") as r, fw.span("chat", kind="llm", model="gpt-x") as s:
            s.set_usage(3, 4)
    finally:
        fw.shutdown()
    finished = {s.name: s for s in otel_sdk.finished()}
    assert set(finished) == {"workflow qa", "chat"}
    chat, root = finished["chat"], finished["workflow qa"]
    assert chat.parent.span_id == root.context.span_id
    assert chat.attributes["gen_ai.request.model"] == "gpt-x"
    assert chat.attributes["gen_ai.usage.output_tokens"] == 4
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["flywheel.rollout_id"] == r.id


def test_otel_mirroring_is_off_unless_asked_for(fw, otel_sdk):
    """An application's own OTel SDK (an APM, Langfuse) gets no flywheel spans by default."""
    with fw.rollout("qa"), fw.span("x"):
        pass
    fw.record_call(workflow="qa", name="chat", kind="llm", start_ns=1)
    assert otel_sdk.finished() == []


def test_low_ratings_fire_the_improvement_trigger_automatically(sqlite_url):
    import flywheel_middleware as fw

    fw.configure(
        config={"triggers": {"low_rating": {"window": 6, "threshold": 3}}}, store_url=sqlite_url
    )
    try:
        ids = []
        for i in range(6):
            with fw.rollout("qa", input=f"q{i}") as r:
                pass
            ids.append(r.id)
        for rid in ids[:2]:
            fw.feedback(rid, rating=1)
        fw.feedback(ids[2], rating=5)
        fw.flush()
        assert queries.stats(fw.get_store())[0].triggers == []  # two low ratings: not yet
        fw.feedback(ids[3], rating=2)
        fw.flush()
        triggers = queries.stats(fw.get_store())[0].triggers
        assert len(triggers) == 1
        assert triggers[0]["evidence"]["low"] == 3
        assert set(triggers[0]["evidence"]["rollout_ids"]) == {ids[0], ids[1], ids[3]}
    finally:
        fw.shutdown()


def test_ids_differ_between_a_process_and_its_forked_child():
    import os

    from flywheel_middleware.capture.ids import new_rollout_id, new_span_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports its next ids and leaves at once
        os.write(write, f"{new_rollout_id()[12:]} {new_span_id()}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_rollout, child_span = os.read(read, 200).decode().split()
    assert new_rollout_id()[12:] != child_rollout
    assert new_span_id() != int(child_span)


def test_record_call_writes_a_one_span_rollout_that_takes_feedback_at_once(fw, otel_sdk):
    """The adapters' fast path for a root call with no children: both records at the end."""
    import time

    from flywheel_middleware.capture import handles as tracing
    from flywheel_middleware.capture import otel_mirror as otel

    start = time.time_ns()
    rid = tracing.record_call(
        workflow="qa", name="chat", kind="llm", start_ns=start,
        input=[{"role": "user", "content": "hi"}],
        output={"content": "yo"}, model="m", input_tokens=3, output_tokens=4, user_id="u1",
    )  # fmt: skip
    fw.feedback(rid, rating=5)  # accepted before the rollout is written
    failed = tracing.record_call(
        workflow="qa", name="chat", kind="llm", start_ns=start, error=ValueError("bad")
    )
    fw.flush()
    spans = queries.spans_of(fw.get_store(), rid)
    [span] = spans
    assert (span.kind, span.model, span.input_tokens, span.output_tokens) == ("llm", "m", 3, 4)
    assert span.parent_id is None and span.duration_ms >= 0
    rollouts = {
        r[0]: r
        for r in fw.get_store().execute(
            "SELECT id, status, user_id, total_tokens, error FROM rollout"
        )
    }
    assert rollouts[rid][1:4] == ("succeeded", "u1", 7)
    assert rollouts[failed][1] == "failed" and rollouts[failed][4] == "ValueError: bad"
    [fb] = fw.get_store().execute("SELECT rollout_id, value FROM feedback")
    assert fb == (rid, 5.0)
    # With mirroring on, OTel sees the call as one span.
    otel.set_enabled(True)
    mirrored = tracing.record_call(
        workflow="qa", name="chat", kind="llm", start_ns=time.time_ns(), model="m"
    )
    names = {s.name: s for s in otel_sdk.finished()}
    assert set(names) == {"chat"}
    assert names["chat"].attributes["flywheel.rollout_id"] == mirrored


def test_otel_emit_in_flywheel_yaml_mirrors_the_first_rollout(tmp_path):
    """``otel: {emit: true}`` in ./flywheel.yaml, no configure() call: the very first rollout
    (and its span) already reach the application's OTel SDK."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "flywheel.yaml").write_text(
        f"store: {{url: 'sqlite:///{tmp_path / 'f.db'}'}}\notel: {{emit: true}}\n"
    )
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        import flywheel_middleware as fw

        with fw.span("first", kind="tool", workflow="wf"):
            pass
        print(sorted(s.name for s in exporter.get_finished_spans()))
        fw.shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['first']"
