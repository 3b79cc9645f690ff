"""Hot problems computed in SQL, checked against the same statistics computed in Python."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import insert, text

from flywheel_middleware.config import parse_config
from flywheel_middleware.loop.analysis import hot_problems
from flywheel_middleware.store.models import Feedback, Rollout, Span

NOW = datetime.now(timezone.utc)


def populate(store, n: int = 120, seed: int = 3) -> dict:
    """Rollouts of two workflows; 'search' has a slow rerank node and many low ratings."""
    rng = random.Random(seed)
    rollouts, spans, feedback = [], [], []
    truth: dict = {}
    sid = 1
    for i in range(n):
        wf = "search" if i % 2 else "qa"
        rid = f"{i:032x}"
        t0 = NOW - timedelta(minutes=30) + timedelta(seconds=i)
        failed = wf == "qa" and i % 10 == 0
        latency = rng.uniform(100, 900) + (2500 if wf == "search" else 0)
        rollouts.append(
            dict(
                id=rid,
                workflow=wf,
                status="failed" if failed else "succeeded",
                started_at=t0,
                latency_ms=latency,
                input={"q": i},
                output={"a": i},
            )
        )
        truth.setdefault((wf, None), []).append((latency, failed))
        spans.append(
            dict(
                id=sid,
                rollout_id=rid,
                name=f"{wf}_agent",
                kind="agent",
                status="error" if failed else "ok",
                started_at=t0,
                duration_ms=latency,
            )
        )
        truth.setdefault((wf, f"{wf}_agent"), []).append((latency, failed))
        parent, sid = sid, sid + 1
        for node in ("retrieve", "rerank"):
            d = rng.uniform(10, 200) * (30 if node == "rerank" and wf == "search" else 1)
            err = node == "retrieve" and rng.random() < 0.2
            spans.append(
                dict(
                    id=sid,
                    rollout_id=rid,
                    parent_id=parent,
                    name=f"call {node}",
                    node=node,
                    kind="tool",
                    status="error" if err else "ok",
                    started_at=t0,
                    duration_ms=d,
                )
            )
            truth.setdefault((wf, node), []).append((d, err))
            sid += 1
        # a nested span without a node is not a group of its own
        spans.append(
            dict(
                id=sid,
                rollout_id=rid,
                parent_id=parent,
                name="inner",
                kind="llm",
                status="ok",
                started_at=t0,
                duration_ms=1.0,
            )
        )
        sid += 1
        if i % 3 == 0:
            rating = 1 if wf == "search" and i % 2 else 5
            feedback.append(
                dict(rollout_id=rid, source="explicit", key="rating", value=rating, created_at=t0)
            )
            feedback.append(
                dict(
                    rollout_id=rid,
                    source="implicit",
                    key="satisfaction",
                    value=0.3 if wf == "search" else 0.9,
                    created_at=t0,
                )
            )
    # an old rollout outside the window
    rollouts.append(
        dict(
            id="f" * 32,
            workflow="qa",
            status="failed",
            latency_ms=1e6,
            started_at=NOW - timedelta(days=3),
        )
    )
    with store.engine.begin() as conn:
        for table, rows in ((Rollout, rollouts), (Span, spans), (Feedback, feedback)):
            keys = {k for r in rows for k in r}
            conn.execute(insert(table.__table__), [{k: r.get(k) for k in keys} for r in rows])
    return truth


CONFIG = parse_config(
    "analysis: {since_minutes: 60, min_calls: 20, latency_ms_max: 2000, error_rate_max: 0.05,"
    " low_rating_rate_max: 0.3, implicit_satisfaction_min: 0.5}\n"
)


@pytest.mark.parametrize("span_workflow", ["recorded", "missing"])
def test_hot_problems_match_python(store, span_workflow) -> None:
    """Spans that carry their workflow are read from ix_span_hot alone; spans written
    without it are attributed through their rollout. Both give the exact figures."""
    truth = populate(store)
    if span_workflow == "recorded":  # what the recorder writes
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE span SET workflow = "
                    "(SELECT r.workflow FROM rollout r WHERE r.id = span.rollout_id)"
                )
            )
    problems = hot_problems(store, CONFIG, include_all=True)
    got = {(p.workflow, p.node): p for p in problems}
    assert set(got) == set(truth)  # 'inner' has no node: no group; the old rollout is out
    for key, rows in truth.items():
        p = got[key]
        lat = np.array([r[0] for r in rows])
        assert p.calls == len(rows), key
        assert p.avg_latency_ms == pytest.approx(lat.mean()), key
        assert p.p95_latency_ms == pytest.approx(np.percentile(lat, 95)), key  # percentile_cont
        assert p.error_rate == pytest.approx(sum(r[1] for r in rows) / len(rows)), key
    search = got[("search", None)]
    assert search.rated == 20 and search.low_rated == 20 and search.low_rating_rate == 1.0
    assert search.implicit_satisfaction == pytest.approx(0.3)
    assert got[("qa", None)].low_rating_rate == 0.0
    assert got[("search", "rerank")].rated == 20  # ratings reach nodes through their rollout
    assert any("avg latency" in b for b in search.breaches)
    assert any(b == "low-rating rate 100.0% > 30.0%" for b in search.breaches)
    assert any(b == "implicit satisfaction 0.30 < 0.5" for b in search.breaches)
    assert got[("qa", None)].breaches == ["error rate 20.0% > 5.0%"]  # every 5th qa rollout
    assert any(b.startswith("p95 latency") for b in got[("search", "rerank")].breaches)
    # only hot groups by default, worst first
    hot = hot_problems(store, CONFIG)
    assert all(p.breaches for p in hot) and hot[0].workflow == "search"
    assert ("qa", "rerank") not in {(p.workflow, p.node) for p in hot}
    only_qa = hot_problems(store, CONFIG, workflow="qa", include_all=True)
    assert {p.workflow for p in only_qa} == {"qa"}


def test_min_calls_and_window(store) -> None:
    populate(store, n=20)
    assert hot_problems(store, CONFIG) == []  # 10 calls per group < min_calls 20
    listed = hot_problems(store, CONFIG, include_all=True)
    assert listed and all(p.breaches == [] for p in listed)
    later = hot_problems(store, CONFIG, since=NOW + timedelta(minutes=1), include_all=True)
    assert later == []


def test_large_window_histogram_path_sqlite(sqlite_url) -> None:
    from flywheel_middleware.store.database import Store

    store = Store(sqlite_url)
    truth = populate(store, n=400)
    exact = {(p.workflow, p.node): p for p in hot_problems(store, CONFIG, include_all=True)}
    approx = {
        (p.workflow, p.node): p
        for p in hot_problems(store, CONFIG, include_all=True, exact_limit=10)
    }
    assert set(approx) == set(exact) == set(truth)
    for key, p in approx.items():
        e = exact[key]
        assert (p.calls, p.errors, p.rated, p.low_rated) == (
            e.calls,
            e.errors,
            e.rated,
            e.low_rated,
        )
        assert p.avg_latency_ms == pytest.approx(e.avg_latency_ms)
        # a 1%-wide histogram bucket: within 1% (+ interpolation between neighbours)
        assert p.p95_latency_ms == pytest.approx(e.p95_latency_ms, rel=0.02)
    store.dispose()
