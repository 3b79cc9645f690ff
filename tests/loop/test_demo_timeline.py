"""The demo's timeline: each cycle moved onto a simulated day of its own, every order kept."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlmodel import select

from flywheel_middleware.demo.timeline import DAY, Timeline, spread_over_days
from flywheel_middleware.store.models import ChangeEvent, Feedback, Rollout, TelemetryEvent


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def test_each_cycle_lands_on_its_own_day_in_order(store):
    t0 = datetime.now(timezone.utc).timestamp() - 60
    # three cycles of 10 s traffic and 2 s controller, back to back
    timeline = Timeline([(t0 + 12 * k, t0 + 12 * k + 10, t0 + 12 * k + 12) for k in range(3)])
    with store.session() as s:
        for k in range(3):
            for i in range(5):
                t = t0 + 12 * k + 2 * i
                rid = f"{k}{i:031x}"
                s.add(Rollout(id=rid, workflow="w", started_at=at(t), ended_at=at(t + 0.5)))
                s.add(Feedback(rollout_id=rid, value=4.0, created_at=at(t + 1)))
                s.add(
                    TelemetryEvent(
                        rollout_id=rid, event_type="dwell", client_ts=t + 1, received_at=at(t + 1)
                    )
                )
            s.add(ChangeEvent(workflow="w", kind="promote", created_at=at(t0 + 12 * k + 11)))
    assert spread_over_days(store, timeline) == 15 * 3 + 3  # every row with a time
    with store.session() as s:
        rollouts = s.exec(select(Rollout).order_by(Rollout.id)).all()
        promotions = s.exec(select(ChangeEvent).order_by(ChangeEvent.id)).all()
        events = s.exec(select(TelemetryEvent).order_by(TelemetryEvent.id)).all()
    end = t0 + 36
    for k in range(3):
        day = end - (3 - k) * DAY
        cycle = [r for r in rollouts if r.id.startswith(str(k))]
        starts = [r.started_at.timestamp() for r in cycle]
        assert all(day <= t < day + 0.8 * DAY for t in starts)  # the customers' part of the day
        assert starts == sorted(starts) and starts[-1] - starts[0] > 0.5 * DAY  # spread over it
        done = promotions[k].created_at.timestamp()
        assert day + 0.8 * DAY < done < day + DAY  # the controller closes the day
    assert abs(promotions[-1].created_at.timestamp() - (end - DAY / 10)) < 60
    # telemetry's epoch-second client times move with the rest
    for e in events:
        assert abs(e.client_ts - e.received_at.timestamp()) < 1e-3
    assert rollouts[0].ended_at > rollouts[0].started_at


def test_times_outside_the_marks_shift_with_their_neighbours():
    timeline = Timeline([(100.0, 110.0, 120.0), (120.0, 130.0, 140.0)])
    assert timeline.map(140.0) == 140.0 and timeline.map(150.0) == 150.0  # after the demo: as is
    assert timeline.map(90.0) == timeline.map(100.0) - 10  # before it: shifted with day one
    assert timeline.map(110.0) - timeline.map(100.0) == 0.8 * DAY
    assert [d.timestamp() for d in timeline.days()] == [140 - 2 * DAY, 140 - DAY]
    assert Timeline().map(5.0) == 5.0
    assert timedelta(seconds=timeline.map(120.0) - timeline.map(100.0)) == timedelta(days=1)
