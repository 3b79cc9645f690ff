"""One store suite, run on SQLite and on PostgreSQL: every table and the CLI's queries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlmodel import select

from flywheel_middleware.capture.records import (
    FeedbackRecord,
    RolloutRecord,
    SpanRecord,
    TelemetryRecord,
)
from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.loop.triggers import check_low_rating_triggers
from flywheel_middleware.recording.recorder import Recorder
from flywheel_middleware.recording.rows import record_row
from flywheel_middleware.store import queries
from flywheel_middleware.store.models import (
    ChangeEvent,
    ConfigVersion,
    Deployment,
    Experiment,
    Feedback,
    ModelArtifact,
    Rollout,
    RoutingWeight,
    Span,
    TelemetryEvent,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_schema_is_at_the_alembic_head(store):
    assert store.current_revision() == store.head_revision() is not None


def test_every_table_round_trips_through_sessions(store):
    with store.session() as s:
        s.add(
            Rollout(
                id="a" * 32, workflow="qa", started_at=T0, input={"q": "hi"}, metadata_={"k": 1}
            )
        )
        s.add(
            Span(
                id=2**62 + 5,
                rollout_id="a" * 32,
                name="llm",
                kind="llm",
                started_at=T0,
                attributes={"gen_ai.request.model": "m"},
            )
        )
        s.add(Feedback(rollout_id="a" * 32, key="rating", value=4, created_at=T0))
        s.add(
            TelemetryEvent(
                session_id="s",
                rollout_id="a" * 32,
                event_type="dwell",
                payload={"ms": 1200},
                client_ts=1.5,
                received_at=T0,
            )
        )
        s.add(
            ConfigVersion(
                workflow="qa",
                version=1,
                config={"llm": {"temperature": 0.2}},
                config_hash="h",
                created_at=T0,
            )
        )
        s.add(Deployment(workflow="qa", active_version_id=1, updated_at=T0))
        s.add(
            Experiment(
                workflow="qa",
                baseline_version_id=1,
                variants=[{"name": "control", "version_id": 1, "weight": 1}],
                started_at=T0,
            )
        )
        s.add(
            ChangeEvent(
                workflow="qa",
                kind="activate",
                to_version_id=1,
                created_at=T0,
                evidence={"why": "test"},
            )
        )
        s.add(
            RoutingWeight(
                agent_id="a1", skill="billing", weight=1.2, alpha=3, beta=2, updated_at=T0
            )
        )
        s.add(ModelArtifact(name="implicit", version=1, payload={"coef": [0.1]}, created_at=T0))
    with store.session() as s:
        assert s.get(Rollout, "a" * 32).input == {"q": "hi"}
        assert s.get(Rollout, "a" * 32).metadata_ == {"k": 1}
        assert s.get(Span, 2**62 + 5).attributes == {"gen_ai.request.model": "m"}
        assert s.get(Span, 2**62 + 5).started_at == T0
        assert s.exec(select(Feedback)).one().value == 4
        assert s.exec(select(TelemetryEvent)).one().payload == {"ms": 1200}
        assert s.exec(select(ConfigVersion)).one().config["llm"]["temperature"] == 0.2
        assert s.get(Deployment, "qa").active_version_id == 1
        assert s.exec(select(Experiment)).one().variants[0]["name"] == "control"
        assert s.exec(select(ChangeEvent)).one().evidence == {"why": "test"}
        assert s.get(RoutingWeight, ("a1", "billing")).alpha == 3
        assert s.exec(select(ModelArtifact)).one().payload == {"coef": [0.1]}


def _write(store, records):
    rec = Recorder(store, flush_interval=0.01)
    for r in records:
        rec.enqueue(r)
    assert rec.close(timeout=30)
    return rec


def _ns(dt):
    return int(dt.timestamp() * 1e9)


def _seed(store):
    """Three workflows' worth of rollouts with spans, ratings, thumbs and comments."""
    records = []
    for i in range(10):
        rid = f"{i:032x}"
        start = T0 + timedelta(minutes=i)
        failed = i == 9
        records.append(
            RolloutRecord(
                id=rid,
                workflow="qa" if i < 8 else "billing",
                input=f"question {i}",
                output=f"answer {i}",
                status="failed" if failed else "succeeded",
                error="Boom" if failed else None,
                started_at=_ns(start),
                ended_at=_ns(start + timedelta(milliseconds=100 + i)),
                latency_ms=100.0 + i,
            )
        )
        records.append(
            SpanRecord(
                id=1000 + i * 2,
                rollout_id=rid,
                sequence=0,
                kind="agent",
                name="agent",
                started_at=_ns(start),
                ended_at=_ns(start),
            )
        )
        records.append(
            SpanRecord(
                id=1001 + i * 2,
                rollout_id=rid,
                parent_id=1000 + i * 2,
                sequence=1,
                kind="llm",
                name="chat",
                model="m",
                input_tokens=5,
                output_tokens=7,
                started_at=_ns(start),
                ended_at=_ns(start),
            )
        )
        if i < 8:
            records.append(
                FeedbackRecord(
                    rollout_id=rid,
                    source="explicit",
                    key="rating",
                    value=float(1 + i % 5),
                    created_at=_ns(start),
                )
            )
    records.append(
        FeedbackRecord(
            rollout_id=f"{0:032x}",
            source="explicit",
            key="comment",
            comment="useless answer",
            created_at=_ns(T0),
        )
    )
    records.append(
        FeedbackRecord(
            rollout_id=f"{1:032x}", source="explicit", key="thumbs", value=1.0, created_at=_ns(T0)
        )
    )
    records.append(
        FeedbackRecord(
            rollout_id=f"{2:032x}", source="explicit", key="thumbs", value=0.0, created_at=_ns(T0)
        )
    )
    records.append(
        TelemetryRecord(
            session_id="s1",
            rollout_id=f"{0:032x}",
            event_type="copy",
            payload={"chars": 10},
            client_ts=1.0,
            received_at=_ns(T0),
        )
    )
    return records


def test_recorder_writes_every_record_kind(store):
    rec = _write(store, _seed(store))
    assert rec.counters.written == 10 + 20 + 8 + 3 + 1
    assert rec.counters.by_table == {
        "rollout": 10,
        "span": 20,
        "feedback": 11,
        "telemetry_event": 1,
    }
    spans = queries.spans_of(store, f"{3:032x}")
    assert [(s.name, s.parent_id) for s in spans] == [("agent", None), ("chat", 1006)]
    assert spans[0].started_at == T0 + timedelta(minutes=3)


def test_writing_the_same_records_twice_adds_nothing(store):
    records = _seed(store)
    _write(store, [r for r in records if isinstance(r, (RolloutRecord, SpanRecord))])
    _write(store, [r for r in records if isinstance(r, (RolloutRecord, SpanRecord))])
    with store.session() as s:
        assert len(s.exec(select(Rollout)).all()) == 10
        assert len(s.exec(select(Span)).all()) == 20


def test_stats_query(store):
    _write(store, _seed(store))
    by_wf = {s.workflow: s for s in queries.stats(store, low_rating_max=2)}
    qa, billing = by_wf["qa"], by_wf["billing"]
    assert (qa.rollouts, qa.failed, qa.rated) == (8, 0, 8)
    # ratings 1,2,3,4,5,1,2,3 -> mean 2.625, low (<=2): 4
    assert abs(qa.avg_rating - 2.625) < 1e-9 and qa.low_rated == 4
    assert (qa.thumbs_up, qa.thumbs_total) == (1, 2)
    assert abs(qa.avg_latency_ms - 103.5) < 1e-6
    assert (billing.rollouts, billing.failed, billing.error_rate) == (2, 1, 0.5)
    assert [s.workflow for s in queries.stats(store, workflow="billing")] == ["billing"]


def test_bad_cases_query_worst_first_with_comments(store):
    _write(store, _seed(store))
    cases = queries.bad_cases(store, max_rating=2)
    ratings = [c.rating for c in cases]
    assert ratings[:4] == [1.0, 1.0, 2.0, 2.0]  # lowest first
    assert ratings[4:] == [None]  # then the failure, which has no rating
    assert cases[-1].rollout.status == "failed"
    first = next(c for c in cases if c.rollout.id == f"{0:032x}")
    assert first.comments == ["useless answer"] and first.rollout.input == "question 0"
    assert {c.rollout.workflow for c in queries.bad_cases(store, workflow="billing")} == {"billing"}


def test_rollout_listing_lookup_and_span_tree(store):
    _write(store, _seed(store))
    latest = queries.list_rollouts(store, limit=3)
    assert [r.id for r in latest] == [f"{i:032x}" for i in (9, 8, 7)]
    assert [r.id for r in queries.list_rollouts(store, status="failed")] == [f"{9:032x}"]
    assert queries.find_rollout(store, f"{5:032x}").input == "question 5"
    assert queries.find_rollout(store, "0" * 31 + "5").id == f"{5:032x}"
    assert queries.find_rollout(store, "0000000") is None  # ambiguous prefix
    tree = queries.span_tree(queries.spans_of(store, f"{4:032x}"))
    assert [n.span.name for n in tree] == ["agent"]
    assert [c.span.name for c in tree[0].children] == ["chat"]
    fb = queries.feedback_of(store, f"{0:032x}")
    assert {f.key for f in fb} == {"rating", "comment"}


def test_low_rating_trigger_fires_once_per_window(store):
    config = FlywheelConfig.model_validate(
        {"triggers": {"low_rating": {"window": 5, "threshold": 3}}}
    )
    records = []
    for i in range(5):
        rid = f"{i + 100:032x}"
        records.append(
            RolloutRecord(id=rid, workflow="qa", started_at=_ns(T0 + timedelta(seconds=i)))
        )
        records.append(
            FeedbackRecord(
                rollout_id=rid, key="rating", value=1.0 if i < 3 else 5.0, created_at=_ns(T0)
            )
        )
    _write(store, records)
    fired = check_low_rating_triggers(store, config)
    assert len(fired) == 1 and fired[0].evidence["low"] == 3
    assert check_low_rating_triggers(store, config) == []  # same window: not again
    stats = queries.stats(store)
    assert len(stats[0].triggers) == 1 and "3 of the last 5" in stats[0].triggers[0]["reason"]


def test_batches_of_every_size_are_written_whole(store):
    """Rows go out in a few fixed statement sizes (256, 128, ... 1): every count lands once."""
    raw = store.raw_connection()
    try:
        written = 0
        for n in (1, 2, 3, 255, 256, 257, 700):
            rows = [
                record_row(
                    SpanRecord(
                        id=10_000 * n + i,
                        rollout_id=f"{n:032x}",
                        name="s",
                        started_at=_ns(T0),
                        input={"i": i},
                    ),
                    store_time_conv(store),
                )
                for i in range(n)
            ]
            store.write_rows(raw, "span", SpanRecord.COLUMNS, rows)
            raw.commit()
            written += n
            got = store.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM span")[0]
            assert tuple(got) == (written, written)
    finally:
        raw.close()
    rows = store.execute("SELECT input FROM span WHERE id = :id", {"id": 10_000 * 700 + 699})
    assert rows[0][0] in ('{"i":699}', {"i": 699})


def store_time_conv(store):
    from flywheel_middleware.capture.records import ns_to_datetime, ns_to_sqlite_text

    return ns_to_sqlite_text if store.dialect == "sqlite" else ns_to_datetime
