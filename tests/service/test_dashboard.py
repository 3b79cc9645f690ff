"""The dashboard: its JSON per workflow, and the page rendered in headless Chromium (screenshot saved)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from flywheel_middleware.config import FlywheelConfig, RoutingConfig
from flywheel_middleware.learn.routing import Router, save_posteriors, simulate
from flywheel_middleware.store.models import ChangeEvent, Experiment, Feedback, Rollout, Span

from .conftest import API_KEY, ARTIFACTS

AUTH = {"X-API-Key": API_KEY}


def seed_store(store) -> None:
    """Six hours of a workflow that gets better, an experiment, routing weights and change events."""
    rng = random.Random(1)
    now = datetime.now(timezone.utc)
    start = now - timedelta(hours=6)
    with store.session() as s:
        exp = Experiment(
            workflow="support",
            status="running",
            baseline_version_id=1,
            variants=[
                {"name": "baseline", "version_id": 1, "weight": 0.8},
                {"name": "candidate-1", "version_id": 2, "weight": 0.2},
            ],
            unit="user_id",
            metrics={"seed": "x"},
            started_at=start + timedelta(hours=3),
        )
        s.add(exp)
        s.flush()
        for i in range(360):
            t = start + timedelta(seconds=60 * i)
            late = i >= 180
            variant = ("candidate-1" if rng.random() < 0.3 else "baseline") if late else None
            quality = 0.45 + 0.35 * (i / 360) + (0.1 if variant == "candidate-1" else 0)
            good = rng.random() < quality
            rid = f"{i:032x}"
            s.add(
                Rollout(
                    id=rid,
                    workflow="support",
                    user_id=f"u{i % 50}",
                    experiment_id=exp.id if variant else None,
                    variant=variant,
                    status="failed" if rng.random() < 0.03 else "succeeded",
                    started_at=t,
                    ended_at=t + timedelta(milliseconds=800),
                    latency_ms=rng.uniform(300, 1500),
                    reward=(0.8 if good else 0.2) + rng.uniform(-0.1, 0.1),
                )
            )
            s.add(
                Feedback(
                    rollout_id=rid,
                    key="rating",
                    value=float(rng.choice([4, 5]) if good else rng.choice([1, 2, 3])),
                    source="explicit",
                    created_at=t + timedelta(seconds=20),
                )
            )
            s.add(
                Span(
                    id=i + 1,
                    rollout_id=rid,
                    workflow="support",
                    kind="llm",
                    name="answer",
                    node="answer",
                    status="ok",
                    started_at=t,
                    ended_at=t + timedelta(milliseconds=500),
                    duration_ms=rng.uniform(200, 900),
                )
            )
            s.add(
                Feedback(
                    rollout_id=rid,
                    key="implicit",
                    value=min(1.0, max(0.0, quality + rng.uniform(-0.2, 0.2))),
                    source="implicit",
                    created_at=t + timedelta(seconds=30),
                )
            )
        for k, (kind, frm, to, reason) in enumerate(
            [
                ("activate", None, 1, "initial config from flywheel.yaml"),
                ("experiment_start", 1, 2, "hot problem: low ratings on node answer"),
                ("promote", 1, 2, "candidate-1 better by +9.8 points (sequential test)"),
            ]
        ):
            s.add(
                ChangeEvent(
                    workflow="support",
                    kind=kind,
                    from_version_id=frm,
                    to_version_id=to,
                    actor="controller",
                    reason=reason,
                    created_at=start + timedelta(hours=2 * k),
                )
            )
        for k in range(12):  # a low-rating trigger firing every 20 minutes
            s.add(
                ChangeEvent(
                    workflow="support",
                    kind="trigger",
                    actor="trigger:low_rating",
                    reason=f"{10 + k} of the last 50 rollouts rated ≤ 2 (threshold 10)",
                    created_at=start + timedelta(minutes=20 * k + 5),
                )
            )
    cfg = RoutingConfig(
        agents=[
            {"id": "alice", "skills": ["billing"]},
            {"id": "bob", "skills": ["billing"]},
            {"id": "carol", "skills": ["billing"]},
        ]
    )
    router = Router(cfg, seed=1)
    simulate(router, {"alice": 0.8, "bob": 0.5, "carol": 0.65}, 600, skills=["billing"])
    save_posteriors(store, router.posteriors, cfg)


def test_dashboard_json(fw, client):
    seed_store(fw.get_store())
    wfs = client.get("/v1/dashboard/workflows", headers=AUTH).json()
    assert wfs[0]["workflow"] == "support" and wfs[0]["rollouts"] == 360
    d = client.get("/v1/dashboard/workflows/support", params={"buckets": 12}, headers=AUTH).json()
    series = d["series"]
    # six hours in at most 12 buckets: round hours, aligned, covering exactly the data's range
    assert series["width"] == 3600 and series["start"] % 3600 == 0
    rating = [b["value"] for b in series["rating"]]
    assert 6 <= len(rating) <= 7 and all(v is not None for v in rating)
    first, last = min(r.started_at for r in rollouts(fw)), max(r.started_at for r in rollouts(fw))
    assert series["start"] <= first.timestamp() < series["start"] + 3600
    assert series["end"] - 3600 <= last.timestamp() < series["end"]

    def mean(buckets):  # weighted by the rated rollouts each bucket's mean is over
        return sum(b["value"] * b["n"] for b in buckets) / sum(b["n"] for b in buckets)

    assert mean(series["rating"][-3:]) > mean(series["rating"][:3]) + 0.3  # the improvement shows
    assert sum(b["n"] for b in series["volume"]) == 360
    assert series["counts"]["rating"] == "rated rollouts"
    # the promotion is a marker on the time axis, and the reward steps up at it
    assert [m["kind"] for m in d["markers"]] == ["promote"]
    before, after = series["levels"]["reward"]
    assert before["end"] == after["start"] == d["markers"][0]["at"]
    assert after["value"] > before["value"] and before["n"] + after["n"] == 360
    implicit = [b["value"] for b in d["series"]["implicit"]]
    assert implicit[-1] > implicit[0]
    assert d["experiments"]["available"] is True
    variants = d["experiments"]["experiments"][0]["variants"]
    for v in variants.values():
        pf = v["positive_feedback_rate"]
        assert pf["low"] < pf["value"] < pf["high"] and pf["n"] > 20
        assert v["rollouts"] == v["rated"] == pf["n"]  # served and rated: every one rated here
    routing = {(r["agent"], r["skill"]): r for r in d["routing"]}
    assert routing[("alice", "billing")]["mean"] > routing[("bob", "billing")]["mean"]
    assert [c["kind"] for c in d["changes"]] == [
        "promote",
        "trigger",
        "experiment_start",
        "activate",
    ]
    promote, trigger = d["changes"][:2]
    assert (promote["from_version"], promote["to_version"]) == (None, None)  # no such versions
    assert trigger["count"] == 12 and trigger["first_at"] < trigger["at"]
    assert trigger["reason"].startswith("21 of the last 50")  # the latest firing's
    nodes = {n["node"]: n for n in d["nodes"]["nodes"]}
    assert nodes["answer"]["calls"] == 360 and nodes["answer"]["p95_latency_ms"] > 200
    assert nodes[None]["calls"] == 360  # the whole workflow, hot or not
    assert isinstance(d["hot_problems"]["available"], bool)
    if not d["hot_problems"]["available"]:
        assert d["hot_problems"]["reason"]
    bad = client.get("/v1/dashboard/workflows/support", params={"buckets": 1}, headers=AUTH)
    assert bad.status_code == 422
    empty = client.get("/v1/dashboard/workflows/nothing", headers=AUTH).json()
    assert empty["series"]["rating"] == [] and empty["changes"] == []


def rollouts(fw) -> list[Rollout]:
    from sqlmodel import select

    with fw.get_store().session() as s:
        return list(s.exec(select(Rollout)))


def test_buckets_follow_the_data_range(fw, client):
    """A week falls into round buckets of hours, two minutes into seconds; never a fixed window."""
    now = datetime.now(timezone.utc)
    with fw.get_store().session() as s:
        for i in range(40):
            s.add(
                Rollout(id=f"a{i:031x}", workflow="week", started_at=now - timedelta(hours=4 * i))
            )
            s.add(
                Rollout(
                    id=f"b{i:031x}", workflow="burst", started_at=now - timedelta(seconds=3 * i)
                )
            )
    week = client.get("/v1/dashboard/workflows/week", headers=AUTH).json()["series"]
    burst = client.get("/v1/dashboard/workflows/burst", headers=AUTH).json()["series"]
    assert week["width"] == 6 * 3600 and 26 <= len(week["volume"]) <= 28
    assert burst["width"] == 5 and 24 <= len(burst["volume"]) <= 26
    for series in (week, burst):
        counts = [b["n"] for b in series["volume"]]
        assert sum(counts) == 40 and counts[0] > 0 and counts[-1] > 0


def test_bad_cases_read_questions_and_answers_through_the_normalizer(fw, client):
    now = datetime.now(timezone.utc)
    chat_in = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is my parcel?"},
        ]
    }
    chat_out = {"choices": [{"message": {"role": "assistant", "content": "It left the depot."}}]}
    with fw.get_store().session() as s:
        s.add(Rollout(id="c" * 32, workflow="chat", started_at=now, input=chat_in, output=chat_out))
        s.add(
            Feedback(
                rollout_id="c" * 32, key="rating", value=1.0, comment="wrong parcel", created_at=now
            )
        )
    case = client.get("/v1/dashboard/workflows/chat", headers=AUTH).json()["bad_cases"]["cases"][0]
    assert case["question"] == "Where is my parcel?" and case["answer"] == "It left the depot."
    assert case["rating"] == 1 and case["comment"] == "wrong parcel"


def test_a_failing_section_says_why_and_the_rest_renders(fw, monkeypatch):
    from flywheel_middleware.loop import analysis
    from flywheel_middleware.service import dashboard

    seed_store(fw.get_store())

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(analysis, "hot_problems", broken)
    view = dashboard.workflow_view(fw.get_store(), FlywheelConfig(), "support", buckets=6)
    assert view["hot_problems"] == {
        "available": False,
        "reason": "hot_problems failed: RuntimeError: the database went away",
    }
    assert view["experiments"]["available"] is True
    assert sum(b["n"] for b in view["series"]["volume"]) == 360


def test_hot_problems_section_lists_the_breaches(fw):
    from flywheel_middleware.config import parse_config
    from flywheel_middleware.service import dashboard

    seed_store(fw.get_store())
    config = parse_config("analysis: {since_minutes: 600, min_calls: 10, latency_ms_max: 100}\n")
    out = dashboard.hot_problems(fw.get_store(), config, "support")
    assert out["available"] is True
    row = next(p for p in out["problems"] if p["node"] is None)
    assert row["workflow"] == "support" and row["calls"] == 360
    assert "avg latency" in row["breaches"] and isinstance(row["breaches"], str)
    assert 0 < row["low_rating_rate"] < 1 and row["rated"] == 360


@pytest.mark.chromium
@pytest.mark.slow
def test_dashboard_renders_in_chromium_with_data(fw, live, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    seed_store(fw.get_store())
    chrome.set_window_size(1400, 1500)
    chrome.get(f"{live.url}/?workflow=support#key={API_KEY}")  # the key: fetched, not embedded
    WebDriverWait(chrome, 15).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready='support']"))
    )
    for chart in ("sec-rating", "sec-reward", "sec-volume"):
        assert chrome.find_elements(By.CSS_SELECTOR, f"#{chart} .uplot canvas")
        assert chrome.find_element(By.ID, chart).get_attribute("data-markers") == "1"
    legend = chrome.find_element(By.CSS_SELECTOR, "#sec-reward .u-legend").text
    assert "reward" in legend and "implicit satisfaction" in legend
    # before any hover the legend reads the latest bucket with data, not dashes
    reward_value = chrome.find_element(
        By.CSS_SELECTOR, "#sec-reward .u-legend .u-series:nth-child(2) .u-value"
    ).text
    assert 0 <= float(reward_value.split()[0]) <= 1, legend
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#sec-exp rect.bar")) == 2
    assert "served 1" in chrome.find_element(By.ID, "sec-exp").text
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#sec-routing rect.bar")) == 3
    changes = chrome.find_elements(By.CSS_SELECTOR, "#sec-changes tbody tr")
    assert len(changes) == 4 and "promote" in changes[0].text
    assert "fired 12× since" in changes[1].text and "–→–" not in changes[1].text
    nodes = chrome.find_element(By.CSS_SELECTOR, "#sec-nodes tbody").text
    assert "answer" in nodes and "360" in nodes
    hot = chrome.find_element(By.CSS_SELECTOR, "#sec-hot .body").text
    assert hot.strip()
    options = [o.text for o in chrome.find_elements(By.CSS_SELECTOR, "#workflow option")]
    assert options == ["support (360 rollouts)"]
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "dashboard.png"
    chrome.save_screenshot(str(path))
    assert path.stat().st_size > 20_000


def test_promotions_and_rollbacks_are_marked_with_their_versions(fw, client):
    from flywheel_middleware.loop import versions

    store = fw.get_store()
    v1 = versions.create_version(store, "qa", {"llm": {"temperature": 0.9}})
    v2 = versions.create_version(store, "qa", {"llm": {"temperature": 0.3}}, parent_id=v1.id)
    versions.activate(store, "qa", v1.id, reason="initial")
    with store.session() as s:
        s.add(Rollout(id="d" * 32, workflow="qa", started_at=datetime.now(timezone.utc)))
    versions.activate(store, "qa", v2.id, kind="promote", actor="controller:auto", reason="better")
    versions.rollback(store, "qa", reason="complaints")
    d = client.get("/v1/dashboard/workflows/qa", headers=AUTH).json()
    assert [(m["kind"], m["label"]) for m in d["markers"]] == [
        ("promote", f"promoted v{v2.version}"),
        ("rollback", f"rolled back to v{v1.version}"),
    ]
    assert d["markers"][0]["at"] <= d["markers"][1]["at"]
    rows = {c["kind"]: c for c in d["changes"]}
    assert (rows["rollback"]["from_version"], rows["rollback"]["to_version"]) == (2, 1)
    assert rows["promote"]["reason"] == "better"
