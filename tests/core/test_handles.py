"""The handle family (``capture/handles.py``) tested adversarially, through the public API.

A root span (no parent, no current handle) owns a rollout opened only on demand; ended
without it, it is one call record (the ``fw.record_call`` path). Everything is read back from
the real store.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import sys
import threading
import time

import pytest

from flywheel_middleware.store import queries

# -- helpers ----------------------------------------------------------------------------------

_ID_AND_TIME = {"id", "rollout_id", "parent_id", "started_at", "ended_at"}


def _read(fw, rollout_id):
    """(rollout row, its spans by sequence) after a flush."""
    assert fw.flush(10), "recorder did not flush"
    store = fw.get_store()
    return queries.find_rollout(store, rollout_id), queries.spans_of(store, rollout_id)


def _count(fw, table, where="1=1", **params):
    assert fw.flush(10), "recorder did not flush"
    [(n,)] = fw.get_store().execute(f"SELECT count(*) FROM {table} WHERE {where}", params)
    return n


def _fields(row, drop=_ID_AND_TIME):
    return {k: v for k, v in row.model_dump().items() if k not in drop}


def _assert_tokens_consistent(row):
    if row.input_tokens is None and row.output_tokens is None:
        assert row.total_tokens is None, row
    else:
        assert row.total_tokens == (row.input_tokens or 0) + (row.output_tokens or 0), (
            row.input_tokens,
            row.output_tokens,
            row.total_tokens,
        )


class _BrokenBackend:
    """A capture backend that fails at every call."""

    def __init__(self):
        self.calls = []

    def _fail(self, name):
        self.calls.append(name)
        raise RuntimeError(f"broken backend: {name}")

    def enqueue(self, record):
        self._fail("enqueue")

    def rollout_opened(self, rollout_id, workflow):
        self._fail("rollout_opened")

    def rollout_finished(self, rollout_id, workflow):
        self._fail("rollout_finished")

    def resolve(self, handle):
        self._fail("resolve")

    def feedback(self, rollout_id, rating=None, **kwargs):
        self._fail("feedback")


class _CountingBackend:
    """Delegates to the real backend and notes each call (name, first argument)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def names(self, name):
        return [arg for n, arg in self.calls if n == name]

    def still_open(self):
        """Rollout ids opened and not finished since, in call order."""
        open_ids = set()
        for name, arg in self.calls:
            if name == "rollout_opened":
                open_ids.add(arg)
            elif name == "rollout_finished":
                open_ids.discard(arg)
        return open_ids

    def enqueue(self, record):
        self.calls.append(("enqueue", record))
        self.inner.enqueue(record)

    def rollout_opened(self, rollout_id, workflow):
        self.calls.append(("rollout_opened", rollout_id))
        self.inner.rollout_opened(rollout_id, workflow)

    def rollout_finished(self, rollout_id, workflow):
        self.calls.append(("rollout_finished", rollout_id))
        self.inner.rollout_finished(rollout_id, workflow)

    def resolve(self, handle):
        self.calls.append(("resolve", handle))
        return self.inner.resolve(handle)

    def feedback(self, rollout_id, rating=None, **kwargs):
        self.calls.append(("feedback", rollout_id))
        self.inner.feedback(rollout_id, rating, **kwargs)


def _is_call_record(record):
    return record.__class__ is bytes or getattr(record, "TABLE", None) == "call"


@pytest.fixture
def counting_backend(fw):
    from flywheel_middleware.capture import backend

    previous = backend.current()
    counting = _CountingBackend(previous)
    backend.install(counting)
    try:
        yield counting
    finally:
        backend.install(previous)


@pytest.fixture
def broken_backend(fw):
    from flywheel_middleware.capture import backend

    previous = backend.current()
    broken = _BrokenBackend()
    backend.install(broken)
    try:
        yield broken
    finally:
        backend.install(previous)


# -- a root span with no children: one call record --------------------------------------------


def test_root_span_without_children_is_one_rollout_and_one_span(fw):
    s = fw.start_span(
        "answer",
        "llm",
        workflow="qa",
        input={"q": "where"},
        model="m-1",
        attributes={"a": 1},
        node="n1",
        user_id="u1",
        session_id="s1",
        tags=["t1", "t2"],
        metadata={"k": "v"},
    )
    assert fw.current_span() is None, "start_span must not make the span current"
    s.set_usage(7, 3)
    s.end(output="there")
    assert _count(fw, "rollout") == 1 and _count(fw, "span") == 1
    row, [span] = _read(fw, s.rollout_id)
    assert span.id == s.id and span.rollout_id == row.id == s.rollout_id
    assert (span.sequence, span.parent_id, span.kind, span.name, span.node) == (
        0,
        None,
        "llm",
        "answer",
        "n1",
    )
    assert (span.status, span.error, span.model, span.workflow) == ("ok", None, "m-1", "qa")
    assert span.input == {"q": "where"} and span.output == "there"
    assert span.attributes == {"a": 1}
    assert (span.input_tokens, span.output_tokens) == (7, 3)
    assert (row.workflow, row.user_id, row.session_id) == ("qa", "u1", "s1")
    assert row.tags == ["t1", "t2"] and row.metadata_ == {"k": "v"}
    assert row.input == {"q": "where"} and row.output == "there"
    assert (row.status, row.error) == ("succeeded", None)
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (7, 3, 10)
    assert row.started_at == span.started_at and row.ended_at == span.ended_at
    assert row.latency_ms == pytest.approx(span.duration_ms) and row.latency_ms >= 0


def test_root_call_opens_no_rollout_and_queues_one_call_record(fw, counting_backend):
    s = fw.start_span("answer", "llm", workflow="lazy", input="q")
    s.set_usage(1, 2)
    s.end(output="a")
    # announced (feedback for it is accepted), never opened as a rollout handle
    assert counting_backend.names("rollout_opened") == [s.rollout_id]
    [record] = counting_backend.names("enqueue")
    assert _is_call_record(record)
    assert counting_backend.names("rollout_finished") == [s.rollout_id]
    rid = fw.record_call(workflow="lazy", name="rc", kind="llm", start_ns=time.time_ns())
    assert counting_backend.names("rollout_opened") == [s.rollout_id, rid]
    assert [_is_call_record(r) for r in counting_backend.names("enqueue")] == [True, True]
    assert counting_backend.names("rollout_finished") == [s.rollout_id, rid]


@pytest.mark.parametrize("how", ["child", "rollout-property", "current_rollout"])
def test_root_span_opens_its_rollout_once_when_needed(fw, counting_backend, how):
    with fw.span("root", workflow="lazy2") as root:
        assert counting_backend.names("rollout_opened") == [root.rollout_id]  # announced only
        if how == "child":
            for _ in range(3):
                with fw.span("child"):
                    pass
        elif how == "rollout-property":
            assert root.rollout is root.rollout
        else:
            assert fw.current_rollout() is fw.current_rollout() is root.rollout
    # announced by the root span, then opened once as its rollout
    assert counting_backend.names("rollout_opened") == [root.rollout_id] * 2
    assert counting_backend.names("rollout_finished") == [root.rollout_id]
    assert counting_backend.still_open() == set()
    assert not any(_is_call_record(r) for r in counting_backend.names("enqueue"))
    row, spans = _read(fw, root.rollout_id)
    assert row.status == "succeeded" and spans[0].id == root.id
    assert len(spans) == (4 if how == "child" else 1)


def test_root_call_that_fails_is_failed_on_span_and_rollout(fw):
    s = fw.start_span("answer", "llm", workflow="qa")
    s.end(error=ValueError("bad input"))
    row, [span] = _read(fw, s.rollout_id)
    assert (span.status, span.error) == ("error", "ValueError: bad input")
    assert (row.status, row.error) == ("failed", "ValueError: bad input")
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (None, None, None)


def test_root_span_workflow_defaults_to_its_name(fw):
    with fw.span("lonely", "tool") as s:
        pass
    row, [span] = _read(fw, s.rollout_id)
    assert row.workflow == span.workflow == "lonely"


def test_root_call_equals_record_call(fw):
    """The span path and ``fw.record_call`` are one path: same rows for the same call."""
    t0 = time.time_ns() - 5_000_000
    t1 = t0 + 3_000_000
    common = dict(
        workflow="qa",
        node="n",
        input={"q": [1, 2]},
        model="m",
        attributes={"x": "y"},
        user_id="u",
        session_id="s",
        tags=["a"],
        metadata={"m": 1},
    )
    s = fw.start_span("call", "llm", start_ns=t0, **common)
    s.set_usage(4, 0)
    s.end(output={"a": 1}, error="RuntimeError: nope", end_ns=t1)
    rid = fw.record_call(
        name="call",
        kind="llm",
        start_ns=t0,
        end_ns=t1,
        output={"a": 1},
        error="RuntimeError: nope",
        input_tokens=4,
        output_tokens=0,
        **common,
    )
    a_row, [a_span] = _read(fw, s.rollout_id)
    b_row, [b_span] = _read(fw, rid)
    assert _fields(a_row) == _fields(b_row)
    assert _fields(a_span) == _fields(b_span)
    assert a_row.started_at == b_row.started_at and a_row.ended_at == b_row.ended_at
    _assert_tokens_consistent(a_row)


def test_record_call_is_keyword_only(fw):
    with pytest.raises(TypeError):
        fw.record_call("qa", "call", "llm", time.time_ns())  # type: ignore[misc]


@dataclasses.dataclass
class _Doc:
    title: str
    pages: int


@pytest.mark.parametrize("opened", [False, True], ids=["call-record", "rollout-opened"])
def test_opening_the_rollout_does_not_change_what_is_recorded(fw, opened):
    """A root span recorded as a call and the same span whose rollout was opened (``span.rollout``
    read) give the same rows, for exotic values too (objects, bytes, sets, tuples)."""
    t0 = time.time_ns() - 10_000_000
    t1 = t0 + 2_500_000
    exotic = {"doc": _Doc("x", 3), "raw": b"\x00\x01", "ids": {3}, "pair": (1, "b")}

    def record():
        s = fw.start_span(
            "call",
            "llm",
            workflow="same",
            input=exotic,
            start_ns=t0,
            user_id="u",
            tags=["t"],
            metadata={"k": "v"},
        )
        if opened:
            assert s.rollout.id == s.rollout_id
        s.set_usage(5, 2)
        s.end(output=["done", _Doc("y", 1)], error=KeyError("k"), end_ns=t1)
        return s.rollout_id

    reference = fw.record_call(
        workflow="same",
        name="call",
        kind="llm",
        start_ns=t0,
        end_ns=t1,
        input=exotic,
        output=["done", _Doc("y", 1)],
        error=KeyError("k"),
        input_tokens=5,
        output_tokens=2,
        user_id="u",
        tags=["t"],
        metadata={"k": "v"},
    )
    rid = record()
    a_row, [a_span] = _read(fw, rid)
    b_row, [b_span] = _read(fw, reference)
    assert _fields(a_row) == _fields(b_row)
    assert _fields(a_span) == _fields(b_span)
    assert a_row.input["doc"] == {"title": "x", "pages": 3} and a_row.status == "failed"
    assert a_span.sequence == 0 and a_span.parent_id is None
    assert _count(fw, "rollout") == 2 and _count(fw, "span") == 2


# -- a root span with children: its rollout ---------------------------------------------------


def test_root_span_with_children_opens_one_rollout_it_ends(fw):
    root = fw.start_span(
        "agent", "agent", workflow="wf", input={"q": "x"}, user_id="u9", tags=["t"]
    )
    with root:
        with fw.span("llm-1", "llm") as a:
            a.set_usage(10, 2)
        with fw.span("tool", "tool") as tool:
            with fw.span("llm-2", "llm") as b:
                b.set_usage(5, 1)
            assert fw.current_rollout().id == root.rollout_id
        root.set_output("done")
    assert fw.current_span() is None and fw.current_rollout() is None
    assert _count(fw, "rollout") == 1
    row, spans = _read(fw, root.rollout_id)
    assert [s.name for s in spans] == ["agent", "llm-1", "tool", "llm-2"]
    assert [s.sequence for s in spans] == [0, 1, 2, 3]
    by = {s.name: s for s in spans}
    assert by["agent"].id == root.id and by["agent"].parent_id is None
    assert by["llm-1"].parent_id == root.id and by["tool"].parent_id == root.id
    assert by["llm-2"].parent_id == tool.id
    assert {s.rollout_id for s in spans} == {row.id} and {s.workflow for s in spans} == {"wf"}
    assert (row.workflow, row.user_id, row.tags) == ("wf", "u9", ["t"])
    assert row.input == {"q": "x"} and row.output == "done"
    assert (row.status, row.error) == ("succeeded", None)
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (15, 3, 18)
    assert row.started_at == by["agent"].started_at and row.ended_at == by["agent"].ended_at
    assert row.latency_ms == pytest.approx(by["agent"].duration_ms)


def test_root_llm_span_with_children_counts_its_own_tokens_too(fw):
    with fw.span("root", "llm", workflow="tok") as root:
        root.set_usage(100, 50)
        with fw.span("child", "llm") as c:
            c.set_usage(1, 1)
    row, _ = _read(fw, root.rollout_id)
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (101, 51, 152)


@pytest.mark.parametrize("initial", [None, "first"], ids=["no-initial-input", "initial-input"])
def test_rollout_input_is_the_root_span_input_set_after_the_rollout_opened(fw, initial):
    """``set_input`` on the root span after a child opened its rollout still defines the
    rollout's input (the OpenAI wrapper reads ``span.rollout.config`` before ``set_input``)."""
    root = fw.start_span("root", workflow="inp", input=initial)
    with root:
        with fw.span("child"):
            pass
        root.set_input({"final": True})
    row, spans = _read(fw, root.rollout_id)
    assert spans[0].input == {"final": True}
    assert row.input == spans[0].input


def test_rollout_input_after_reading_config_then_set_input(fw):
    """The OpenAI adapter's order: start_span, span.rollout.config, span.set_input."""
    s = fw.start_span("chat.completions", "llm", workflow="oa")
    assert s.rollout.config == {}
    s.set_input([{"role": "user", "content": "hi"}])
    s.end(output={"role": "assistant", "content": "yo"})
    row, [span] = _read(fw, s.rollout_id)
    assert row.input == span.input == [{"role": "user", "content": "hi"}]
    assert row.output == span.output == {"role": "assistant", "content": "yo"}


def test_exception_in_root_with_children_fails_rollout_and_reraises_unchanged(fw):
    boom = ValueError("boom")
    with pytest.raises(ValueError) as info:
        with fw.span("root", "agent", workflow="err") as root:
            with fw.span("child", "tool"):
                pass
            raise boom
    assert info.value is boom
    assert fw.current_span() is None
    row, spans = _read(fw, root.rollout_id)
    by = {s.name: s for s in spans}
    assert (by["root"].status, by["root"].error) == ("error", "ValueError: boom")
    assert (by["child"].status, by["child"].error) == ("ok", None)
    assert (row.status, row.error) == ("failed", "ValueError: boom")


def test_error_in_child_only_does_not_fail_the_rollout(fw):
    with fw.span("root", workflow="child-err") as root:
        with pytest.raises(KeyError), fw.span("child"):
            raise KeyError("x")
    row, spans = _read(fw, root.rollout_id)
    assert row.status == "succeeded" and spans[1].status == "error"


def test_explicit_parent_wins_over_the_current_span(fw):
    other = fw.start_span("other-root", workflow="w-other")
    with fw.span("current-root", workflow="w-cur") as cur:
        child = fw.start_span("child", parent=other)
        child.end()
    other.end()
    _, other_spans = _read(fw, other.rollout_id)
    _, cur_spans = _read(fw, cur.rollout_id)
    assert [s.name for s in other_spans] == ["other-root", "child"]
    assert other_spans[1].parent_id == other.id
    assert [s.name for s in cur_spans] == ["current-root"]


# -- concurrency ------------------------------------------------------------------------------


def test_two_threads_starting_children_at_once_open_exactly_one_rollout(fw, counting_backend):
    iterations, workers = 300, 2
    roots = [fw.start_span("root", workflow="race") for _ in range(iterations)]
    barrier = threading.Barrier(workers)
    children: dict[int, list] = {i: [] for i in range(iterations)}
    errors = []

    def work():
        try:
            for i, root in enumerate(roots):
                barrier.wait()
                child = fw.start_span("child", "tool", parent=root)
                children[i].append(child)
                child.end()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(old)
    assert not errors
    opened = collections.Counter(counting_backend.names("rollout_opened"))
    # each root announced its rollout once and opened it once: a race opens it again
    assert opened == {r.rollout_id: 2 for r in roots}, "extra rollouts opened"
    for root in roots:
        root.end()
    assert counting_backend.still_open() == set()
    assert _count(fw, "rollout", "workflow = :w", w="race") == iterations
    assert _count(fw, "span", "workflow = :w", w="race") == iterations * (workers + 1)
    rows = fw.get_store().execute(
        "SELECT rollout_id, count(*), min(sequence), max(sequence), count(DISTINCT sequence)"
        " FROM span GROUP BY rollout_id"
    )
    assert len(rows) == iterations
    assert {tuple(r[1:]) for r in rows} == {(workers + 1, 0, workers, workers + 1)}
    for i, root in enumerate(roots):
        assert {c.rollout_id for c in children[i]} == {root.rollout_id}
        assert {c.parent_id for c in children[i]} == {root.id}
    orphans = fw.get_store().execute(
        "SELECT count(*) FROM span s LEFT JOIN rollout r ON r.id = s.rollout_id WHERE r.id IS NULL"
    )
    assert orphans[0][0] == 0


async def test_async_with_nesting_across_gathered_tasks(fw):
    async def leaf(i):
        async with fw.span(f"leaf{i}", "tool") as s:
            await asyncio.sleep(0.001 * (i % 3))
            async with fw.span(f"inner{i}") as inner:
                await asyncio.sleep(0)
        return s, inner

    async def root_task(name):
        async with fw.span(name, "agent", workflow="async-wf") as root:
            pairs = await asyncio.gather(*(leaf(i) for i in range(5)))
        return root, pairs

    (r1, pairs1), (r2, pairs2) = await asyncio.gather(root_task("A"), root_task("B"))
    assert fw.current_span() is None
    assert r1.rollout_id != r2.rollout_id
    assert _count(fw, "rollout", "workflow = 'async-wf'") == 2
    for root, pairs in ((r1, pairs1), (r2, pairs2)):
        row, spans = _read(fw, root.rollout_id)
        assert len(spans) == 11
        assert sorted(s.sequence for s in spans) == list(range(11))
        by_id = {s.id: s for s in spans}
        assert by_id[root.id].parent_id is None and by_id[root.id].sequence == 0
        for leaf_span, inner in pairs:
            assert by_id[leaf_span.id].parent_id == root.id
            assert by_id[inner.id].parent_id == leaf_span.id
        assert row.ended_at >= max(s.ended_at for s in spans if s.id != root.id)


# -- fw.traced ------------------------------------------------------------------------------


def test_traced_sync_root_call_and_nested(fw):
    @fw.traced(kind="tool")
    def add(a, b=1):
        return a + b

    @fw.traced(name="outer")
    def outer(x):
        return add(x, b=2) * 10

    assert add.__name__ == "add"
    assert add(3) == 4
    assert outer(1) == 30
    assert _count(fw, "rollout") == 2 and _count(fw, "span") == 3
    rows = {r.workflow: r for r in queries.list_rollouts(fw.get_store(), limit=10)}
    add_name = add.__qualname__
    lone = rows[add_name]
    _, [lone_span] = _read(fw, lone.id)
    assert lone.input == lone_span.input == {"a": 3}
    assert lone.output == lone_span.output == 4 and lone_span.kind == "tool"
    nested_row, nested = _read(fw, rows["outer"].id)
    assert [s.name for s in nested] == ["outer", add_name]
    assert nested[1].parent_id == nested[0].id and nested[1].input == {"a": 1, "b": 2}
    assert nested_row.input == {"x": 1} and nested_row.output == 30


def test_traced_sync_exception_recorded_and_reraised_unchanged(fw):
    err = ZeroDivisionError("nope")

    @fw.traced
    def bad():
        raise err

    with pytest.raises(ZeroDivisionError) as info:
        bad()
    assert info.value is err and info.value.__context__ is None
    assert fw.flush(10)
    [row] = queries.list_rollouts(fw.get_store())
    assert (row.status, row.error) == ("failed", "ZeroDivisionError: nope")
    _, [span] = _read(fw, row.id)
    assert span.status == "error" and span.output is None


async def test_traced_async_root_call_nested_and_exception(fw):
    import inspect

    @fw.traced(name="leaf", kind="retriever")
    async def leaf(q):
        await asyncio.sleep(0)
        return [q.upper()]

    @fw.traced(name="top")
    async def top(q):
        results = await asyncio.gather(leaf(q), leaf(q + q))
        return results

    err = OSError("down")

    @fw.traced(name="failing")
    async def failing():
        await asyncio.sleep(0)
        raise err

    assert inspect.iscoroutinefunction(leaf)
    assert await leaf("a") == ["A"]
    assert await top("b") == [["B"], ["BB"]]
    with pytest.raises(OSError) as info:
        await failing()
    assert info.value is err
    assert fw.flush(10)
    rows = {r.workflow: r for r in queries.list_rollouts(fw.get_store(), limit=10)}
    assert set(rows) == {"leaf", "top", "failing"}
    assert rows["leaf"].output == ["A"] and rows["leaf"].input == {"q": "a"}
    _, top_spans = _read(fw, rows["top"].id)
    assert [s.name for s in top_spans] == ["top", "leaf", "leaf"]
    assert {s.parent_id for s in top_spans[1:]} == {top_spans[0].id}
    assert (rows["failing"].status, rows["failing"].error) == ("failed", "OSError: down")


# -- ending twice, late, with exceptions ------------------------------------------------------


def test_end_twice_root_call_keeps_the_first(fw):
    s = fw.start_span("call", "llm", workflow="twice")
    s.end(output="first")
    s.end(output="second", error="late error")
    with s:  # entering and leaving an ended span changes nothing either
        pass
    assert _count(fw, "rollout") == 1 and _count(fw, "span") == 1
    row, [span] = _read(fw, s.rollout_id)
    assert row.output == span.output == "first"
    assert (row.status, span.status) == ("succeeded", "ok")


def test_end_twice_root_with_children_keeps_the_first(fw):
    root = fw.start_span("root", workflow="twice2")
    child = fw.start_span("child", parent=root)
    child.end(output="c1")
    child.end(output="c2", error="x")
    root.end(output="r1")
    root.end(output="r2", error="y")
    assert _count(fw, "rollout") == 1 and _count(fw, "span") == 2
    row, spans = _read(fw, root.rollout_id)
    assert (row.output, row.status) == ("r1", "succeeded")
    assert [(s.output, s.status) for s in spans] == [("r1", "ok"), ("c1", "ok")]


def test_exit_with_exception_after_explicit_end_keeps_the_explicit_end(fw):
    """Documented behaviour: the first end wins; the exception still propagates."""
    with pytest.raises(RuntimeError, match="after"):
        with fw.span("r", workflow="exit-after-end") as s:
            s.end(output="ok")
            raise RuntimeError("after")
    row, [span] = _read(fw, s.rollout_id)
    assert (row.status, span.status, row.output) == ("succeeded", "ok", "ok")
    assert fw.current_span() is None


def test_entering_a_handle_twice_does_not_leak_it_as_current(fw):
    def body():
        s = fw.start_span("r", workflow="reenter")
        with s:
            with s:
                pass
        leaked = fw.current_span()
        with fw.span("next", workflow="reenter-next") as nxt:
            pass
        return s, leaked, nxt

    # in a copy of the context: a leak here must not reach the tests that follow
    s, leaked, nxt = contextvars.copy_context().run(body)
    assert leaked is None, f"{leaked} stays current after both exits"
    assert nxt.parent_id is None and nxt.rollout_id != s.rollout_id


def test_dunder_exit_with_exception_on_a_root_call(fw):
    s = fw.start_span("call", "tool", workflow="exit-exc")
    s.__enter__()
    assert fw.current_span() is s
    s.__exit__(TypeError, TypeError("wrong"), None)
    assert fw.current_span() is None
    row, [span] = _read(fw, s.rollout_id)
    assert (row.status, row.error, span.status) == ("failed", "TypeError: wrong", "error")


def test_child_ending_after_its_root_ended_keeps_the_rollout_consistent(fw):
    """Documented behaviour: the rollout ends with its root (end time, status, output); a child
    that ends later is still recorded under it. Whether the late child's tokens count or not,
    the rollout's token columns must agree with each other."""
    root = fw.start_span("root", "agent", workflow="late")
    early = fw.start_span("early", "llm", parent=root)
    early.set_usage(3, 1)
    early.end()
    late = fw.start_span("late", "llm", parent=root)
    root.end(output="root done")
    late.set_usage(10, 5)
    late.end(output="late done")
    assert _count(fw, "rollout") == 1
    row, spans = _read(fw, root.rollout_id)
    by = {s.name: s for s in spans}
    assert set(by) == {"root", "early", "late"}
    assert by["late"].parent_id == root.id and by["late"].sequence == 2
    assert by["late"].output == "late done" and by["late"].ended_at >= row.ended_at
    assert row.ended_at == by["root"].ended_at and row.output == "root done"
    assert row.status == "succeeded"
    _assert_tokens_consistent(row)
    assert (row.input_tokens, row.output_tokens) in ((3, 1), (13, 6))


def test_child_started_after_its_root_call_ended_lands_under_the_same_rollout(fw, counting_backend):
    """Documented behaviour: a root recorded as a call, then used as a parent, puts the late
    child under the call's rollout id (sequence 1); no second rollout row appears, and no
    rollout is left open in the process (every rollout opened is also finished)."""
    root = fw.start_span("root", workflow="after")
    root.end(output="r")
    child = fw.start_span("child", parent=root)
    child.end(output="c")
    assert counting_backend.still_open() == set(), "a rollout opened here is never finished"
    assert _count(fw, "rollout") == 1 and _count(fw, "span") == 2
    row, spans = _read(fw, root.rollout_id)
    assert [(s.name, s.sequence) for s in spans] == [("root", 0), ("child", 1)]
    assert spans[1].parent_id == root.id
    assert (row.output, row.status) == ("r", "succeeded")


# -- feedback -------------------------------------------------------------------------------


@pytest.fixture
def store_forbidden(fw, monkeypatch):
    """Asking the store from the test's thread fails (the writer thread may still use it)."""
    from flywheel_middleware import runtime

    fw.get_recorder()  # started now, so feedback's enqueue needs no store lookup
    real = runtime.get_store
    me = threading.get_ident()

    def guarded():
        if threading.get_ident() == me:
            raise AssertionError("feedback asked the store")
        return real()

    monkeypatch.setattr(runtime, "get_store", guarded)
    return lambda: monkeypatch.setattr(runtime, "get_store", real)


def test_feedback_right_after_a_root_call_without_asking_the_store(fw, store_forbidden):
    s = fw.start_span("call", "llm", workflow="fb")
    s.end(output="x")
    rid = fw.record_call(workflow="fb", name="direct", kind="llm", start_ns=time.time_ns())
    with fw.span("root", workflow="fb") as root:
        with fw.span("child"):
            pass
    fw.feedback(s.rollout_id, rating=5)
    fw.feedback(rid, rating=4)
    fw.feedback(root.rollout_id, thumbs="up")
    store_forbidden()
    assert [f.value for f in queries.feedback_of(fw.get_store(), s.rollout_id)] == []  # not flushed
    _read(fw, s.rollout_id)
    assert [(f.key, f.value) for f in queries.feedback_of(fw.get_store(), s.rollout_id)] == [
        ("rating", 5.0)
    ]
    assert [f.value for f in queries.feedback_of(fw.get_store(), rid)] == [4.0]
    assert [f.key for f in queries.feedback_of(fw.get_store(), root.rollout_id)] == ["thumbs"]


def test_feedback_for_an_open_rollout_without_asking_the_store(fw, store_forbidden):
    with fw.rollout("fb-open") as r:
        fw.feedback(r.id, rating=2)
        with fw.span("root-child"):
            pass
    root = fw.start_span("root", workflow="fb-open2")
    opened = root.rollout
    fw.feedback(opened.id, rating=3)
    root.end()
    store_forbidden()
    assert fw.flush(10)
    assert [f.value for f in queries.feedback_of(fw.get_store(), r.id)] == [2.0]
    assert [f.value for f in queries.feedback_of(fw.get_store(), root.rollout_id)] == [3.0]


def test_feedback_inside_an_open_root_span_is_accepted(fw):
    """The rollout id of a root span is public from its start (``span.rollout_id``); its
    rollout is open while the span is, even if not materialised yet."""
    with fw.span("call", "llm", workflow="fb-inside") as s:
        fw.feedback(s.rollout_id, rating=5)
    assert fw.flush(10)
    assert [f.value for f in queries.feedback_of(fw.get_store(), s.rollout_id)] == [5.0]


def test_feedback_for_an_unknown_rollout_raises(fw):
    with fw.span("call", workflow="fb-unknown"):
        pass
    with pytest.raises(fw.UnknownRolloutError):
        fw.feedback("0" * 32, rating=5)
    assert _count(fw, "feedback") == 0


# -- the OpenTelemetry mirror -----------------------------------------------------------------


def _otel_by_name(sdk):
    spans = sdk.finished()
    out = {}
    for s in spans:
        assert s.name not in out, f"two OTel spans named {s.name}"
        out[s.name] = s
    return out


def test_otel_mirror_on_root_call_is_one_otel_span(fw, sqlite_url, otel_sdk):
    """A root span is its mirrored trace's root: one OTel span, naming the rollout."""
    t0 = time.time_ns() - 1_000_000
    off_id = fw.record_call(
        workflow="mirror-rc", name="rc", kind="llm", start_ns=t0, end_ns=t0 + 500, input="i"
    )
    assert otel_sdk.finished() == []
    fw.configure(store_url=sqlite_url, otel=True)
    s = fw.start_span("answer", "llm", workflow="mirror", model="m", input={"q": 1})
    s.set_usage(2, 3)
    s.end(output="o")
    spans = _otel_by_name(otel_sdk)
    assert set(spans) == {"answer"}
    call = spans["answer"]
    assert call.parent is None
    assert call.attributes["flywheel.rollout_id"] == s.rollout_id
    assert call.attributes["flywheel.workflow"] == "mirror"
    assert call.attributes["gen_ai.usage.input_tokens"] == 2
    assert _count(fw, "rollout") == 2 and _count(fw, "span") == 2  # off_id's and this one
    row, [span] = _read(fw, s.rollout_id)
    assert span.id == s.id and (row.input, row.output, row.total_tokens) == ({"q": 1}, "o", 5)

    # record_call goes through a span with the mirror on: OTel sees it, the rows are the same
    otel_sdk.exporter.clear()
    on_id = fw.record_call(
        workflow="mirror-rc", name="rc", kind="llm", start_ns=t0, end_ns=t0 + 500, input="i"
    )
    assert set(_otel_by_name(otel_sdk)) == {"rc"}
    on_row, [on_span] = _read(fw, on_id)
    off_row, [off_span] = _read(fw, off_id)
    assert _fields(on_row) == _fields(off_row) and _fields(on_span) == _fields(off_span)


def test_otel_mirror_on_nests_children(fw, sqlite_url, otel_sdk):
    fw.configure(store_url=sqlite_url, otel=True)
    with fw.span("root", "agent", workflow="mirror2") as root:
        with fw.span("child", "tool"):
            pass
    spans = _otel_by_name(otel_sdk)
    assert set(spans) == {"root", "child"}
    assert spans["root"].parent is None
    assert spans["child"].parent.span_id == spans["root"].context.span_id
    with fw.rollout("mirror3"), fw.span("inner"):  # an explicit rollout has its own span
        pass
    spans = _otel_by_name(otel_sdk)
    assert spans["inner"].parent.span_id == spans["workflow mirror3"].context.span_id
    row, rows = _read(fw, root.rollout_id)
    assert [s.name for s in rows] == ["root", "child"]


def test_otel_mirror_off_by_default_sends_nothing(fw, otel_sdk):
    s = fw.start_span("answer", "llm", workflow="quiet")
    s.end(output="o")
    with fw.span("root", workflow="quiet") as root:
        with fw.span("child"):
            pass
    with fw.rollout("quiet-r"):
        with fw.span("x"):
            pass
    fw.record_call(workflow="quiet", name="rc", kind="llm", start_ns=time.time_ns())
    assert otel_sdk.finished() == []
    assert _count(fw, "rollout") == 4
    _, spans = _read(fw, root.rollout_id)
    assert len(spans) == 2


# -- a backend that fails everywhere ----------------------------------------------------------


def _lc_chain():
    from langchain_core.language_models import FakeListChatModel
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableLambda

    model = FakeListChatModel(responses=["the answer"])
    return RunnableLambda(lambda x: f"q: {x}") | model | StrOutputParser(), model


def _lc_failing_chain():
    from langchain_core.runnables import RunnableLambda

    def explode(x):
        raise LookupError(f"no {x}")

    return RunnableLambda(lambda x: x) | RunnableLambda(explode)


def test_langchain_handler_with_a_broken_backend_changes_nothing(fw, broken_backend):
    pytest.importorskip("langchain_core")
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler

    chain, model = _lc_chain()
    expected = chain.invoke("hi")
    expected_model = model.invoke("direct")
    handler = FlywheelCallbackHandler(workflow="broken", user_id="u")
    calls_before = len(broken_backend.calls)
    got = chain.invoke("hi", config={"callbacks": [handler]})
    got_model = model.invoke("direct", config={"callbacks": [handler]})
    got_batch = chain.batch(["a", "b"], config={"callbacks": [handler]})
    assert got == expected
    assert (got_model.content, type(got_model)) == (expected_model.content, type(expected_model))
    assert got_batch == [chain.invoke("a"), chain.invoke("b")]
    assert len(broken_backend.calls) > calls_before, "the handler never reached the backend"
    assert "rollout_opened" in broken_backend.calls and "enqueue" in broken_backend.calls

    failing = _lc_failing_chain()
    with pytest.raises(LookupError, match="no x") as info:
        failing.invoke("x", config={"callbacks": [handler]})
    assert type(info.value) is LookupError


async def test_langchain_handler_async_with_a_broken_backend_changes_nothing(fw, broken_backend):
    pytest.importorskip("langchain_core")
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler

    chain, _ = _lc_chain()
    expected = await chain.ainvoke("hi")
    handler = FlywheelCallbackHandler(workflow="broken-async")
    assert await chain.ainvoke("hi", config={"callbacks": [handler]}) == expected
    chunks = [c async for c in chain.astream("hi", config={"callbacks": [handler]})]
    assert "".join(chunks) == expected
    with pytest.raises(LookupError):
        await _lc_failing_chain().ainvoke("x", config={"callbacks": [handler]})


def test_langchain_handler_inside_fw_span_with_a_broken_backend(fw, broken_backend):
    """The handler's root run attaches to the current fw span: the rollout must be opened
    through the broken backend, and the chain still returns its result."""
    from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler

    chain, _ = _lc_chain()
    expected = chain.invoke("hi")
    outer = fw.start_span("outer", workflow="broken-outer")  # not entered: never ended by us
    token = outer.activate()
    try:
        got = chain.invoke("hi", config={"callbacks": [FlywheelCallbackHandler()]})
    finally:
        outer.deactivate(token)
    assert got == expected


def test_direct_span_api_with_a_broken_backend_does_not_raise(fw, broken_backend):
    """``Handles must never raise into the host``: a root call and a root with children."""
    with fw.span("call", "llm", workflow="broken-direct") as s:
        s.set_output("x")
    with fw.span("root", workflow="broken-direct"):
        with fw.span("child"):
            pass
    fw.record_call(workflow="broken-direct", name="rc", kind="llm", start_ns=time.time_ns())
    assert fw.current_span() is None


def test_direct_rollout_api_with_a_broken_backend_does_not_raise(fw, broken_backend):
    with fw.rollout("broken-rollout") as r:
        with fw.span("child"):
            pass
    assert r.config == {}
    assert fw.current_rollout() is None


def test_host_exception_is_not_replaced_by_a_broken_backend(fw, broken_backend):
    """Whatever the backend does, the host's own exception leaves the ``with`` unchanged."""
    err = ValueError("host's own")
    with pytest.raises(ValueError) as info:
        with fw.span("call", "llm", workflow="broken-exc"):
            raise err
    assert info.value is err
    with pytest.raises(ValueError) as info:
        with fw.span("root", workflow="broken-exc"):
            with fw.span("child"):
                raise err
    assert info.value is err
