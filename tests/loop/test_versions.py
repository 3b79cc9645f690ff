"""Config versions, deployments, promotion across processes, rollback (both backends)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.versions import StoreResolver, VersionError
from flywheel_middleware.store.models import ChangeEvent

from .helpers import BASE, make_config


def _events(store, workflow="qa"):
    return [
        (e.kind, e.from_version_id, e.to_version_id)
        for e in versions.deployment_history(store, workflow)
    ]


def test_yaml_config_is_version_one_and_changes_become_versions(store):
    config = make_config()
    v1 = versions.ensure_workflow(store, config, "qa")
    assert (v1.version, v1.created_by, v1.config) == (1, "yaml", BASE)
    assert v1.config_hash == versions.config_hash(BASE)
    assert versions.ensure_workflow(store, config, "qa").id == v1.id  # idempotent
    assert len(versions.list_versions(store, "qa")) == 1
    # the file changes: a new version by "yaml", activated
    edited = make_config()
    edited.workflows["qa"].config = {**BASE, "rag": {"top_k": 6}}
    v2 = versions.ensure_workflow(store, edited, "qa")
    assert (v2.version, v2.created_by, v2.parent_id) == (2, "yaml", v1.id)
    # a process still holding the old file does not flip the deployment back
    assert versions.ensure_workflow(store, config, "qa").id == v2.id
    assert _events(store) == [("activate", None, v1.id), ("activate", v1.id, v2.id)]


def test_versions_are_immutable_and_deduplicated(store):
    config = make_config()
    v1 = versions.ensure_workflow(store, config, "qa")
    cfg = {**BASE, "llm": {"model": "m", "temperature": 0.5}}
    a = versions.create_version(store, "qa", cfg, parent_id=v1.id, created_by="mutator:param")
    cfg["llm"]["temperature"] = 0.1  # mutating the caller's dict does not touch the row
    assert versions.get_version(store, a.id).config["llm"]["temperature"] == 0.5
    again = versions.create_version(
        store, "qa", {**BASE, "llm": {"temperature": 0.5, "model": "m"}}
    )
    assert again.id == a.id  # same canonical JSON → same version
    assert versions.tried_hashes(store, "qa") == {v1.config_hash, a.config_hash}
    with pytest.raises(VersionError, match="no config version"):
        versions.find_version(store, "qa", "v9")


def test_promote_then_rollback_restores_previous_versions(store):
    config = make_config()
    v1 = versions.ensure_workflow(store, config, "qa")
    v2 = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 3}})
    v3 = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}})
    exp = ex.start_experiment(store, "qa", [v2.id], traffic=0.1)
    ex.promote(store, exp.id, "candidate-1", actor="tester", evidence={"why": "better"})
    assert versions.active_version(store, "qa").id == v2.id
    assert ex.get_experiment(store, exp.id).status == "promoted"
    versions.activate(store, "qa", v3.id, kind="promote", actor="tester")
    promote_event = versions.deployment_history(store, "qa")[1]
    assert promote_event.evidence["why"] == "better" and promote_event.actor == "tester"
    back = versions.rollback(store, "qa", reason="v3 broke things")
    assert (back.kind, back.from_version_id, back.to_version_id) == ("rollback", v3.id, v2.id)
    assert versions.active_version(store, "qa").id == v2.id
    versions.rollback(store, "qa")
    assert versions.active_version(store, "qa").id == v1.id
    with pytest.raises(VersionError, match="no earlier version"):
        versions.rollback(store, "qa")
    with store.session() as session:
        kinds = [e.kind for e in session.exec(__import__("sqlmodel").select(ChangeEvent)).all()]
    assert kinds.count("rollback") == 2 and "experiment_start" in kinds and "promote" in kinds


def _cli(config_path, url, *args):
    code = "from flywheel_middleware.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", str(config_path), "--store", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _eventually(read, want, timeout: float = 10.0):
    """Poll ``read`` until it returns ``want`` (the refresh runs in a thread)."""
    deadline = time.time() + timeout
    value = read()
    while value != want and time.time() < deadline:
        time.sleep(0.01)
        value = read()
    return value


class FakeClock:
    """versions.time with a monotonic clock the test advances (the TTL without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.slow
def test_promotion_in_another_process_reaches_this_one_after_the_ttl(
    store_url, tmp_path, monkeypatch
):
    from flywheel_middleware.store.database import Store

    clock = FakeClock()
    monkeypatch.setattr(versions, "time", clock)

    config = make_config()
    config_path = tmp_path / "flywheel.yaml"
    config_path.write_text(
        yaml.safe_dump({"workflows": {"qa": {"config": BASE}}}), encoding="utf-8"
    )
    store = Store(store_url)
    try:
        v1 = versions.ensure_workflow(store, config, "qa")
        cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 5}})
        exp = ex.start_experiment(store, "qa", [cand.id], traffic=0.1, seed="x")
        resolver = StoreResolver(store, config, ttl=0.5)
        units = [f"user-{i}" for i in range(200)]
        assert {resolver.resolve("qa", u).version_id for u in units} == {v1.id, cand.id}
        # another process (the real CLI) promotes the candidate
        _cli(config_path, store_url, "promote", str(exp.id), "candidate-1")
        cached = {resolver.resolve("qa", u).version_id for u in units}
        assert v1.id in cached  # still the cached experiment: the TTL has not passed
        clock.now += 0.4
        assert v1.id in {resolver.resolve("qa", u).version_id for u in units}
        clock.now += 0.2  # the cache has expired: a background refresh picks the change up
        assert _eventually(
            lambda: {resolver.resolve("qa", u).version_id for u in units}, {cand.id}
        ) == {cand.id}
        assert resolver.resolve("qa", "user-1").experiment_id is None
        # and another process's rollback brings version 1 back
        out = _cli(config_path, store_url, "rollback", "qa")
        assert "v2 → v1" in out
        clock.now += 0.6
        assert _eventually(
            lambda: {resolver.resolve("qa", u).version_id for u in units}, {v1.id}
        ) == {v1.id}
    finally:
        store.dispose()


def test_store_outage_keeps_serving_the_cached_plan(sqlite_url):
    from flywheel_middleware.store.database import Store

    store = Store(sqlite_url)
    config = make_config()
    resolver = StoreResolver(store, config, ttl=0.01)
    first = resolver.resolve("qa", "u1")
    store.engine.dispose()
    store.engine = __import__("sqlalchemy").create_engine("sqlite:////nonexistent/dir/x.db")
    time.sleep(0.02)
    assert resolver.resolve("qa", "u1").version_id == first.version_id


def test_an_expired_plan_is_served_while_a_thread_refreshes_it(sqlite_url):
    import threading

    from flywheel_middleware.store.database import Store

    store = Store(sqlite_url)
    resolver = StoreResolver(store, make_config(), ttl=0.01)
    first = resolver.resolve("qa", "u1")
    release = threading.Event()
    original = resolver._load

    def slow_load(workflow):  # a store that takes seconds to answer
        release.wait(10)
        return original(workflow)

    resolver._load = slow_load
    time.sleep(0.02)
    started = time.perf_counter()
    for _ in range(100):
        assert resolver.resolve("qa", "u1").version_id == first.version_id
    assert time.perf_counter() - started < 0.5  # never waited for the store
    assert resolver._pending == {"qa"}  # one refresh under way, not a hundred
    release.set()
    store.dispose()


def test_processes_starting_together_create_version_one_once(store_url):
    """Several processes (separate engines) resolving a workflow for the first time at once."""
    from concurrent.futures import ThreadPoolExecutor

    from flywheel_middleware.store.database import Store

    stores = [Store(store_url) for _ in range(6)]
    try:
        config = make_config()
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda s: versions.ensure_workflow(s, config, "qa"), stores))
        assert {r.id for r in results} == {results[0].id}
        assert len(versions.list_versions(stores[0], "qa")) == 1
        assert versions.active_version(stores[0], "qa").id == results[0].id
    finally:
        for s in stores:
            s.dispose()


@pytest.mark.parametrize("unit", ["user_id", "session_id", "request"])
def test_rollouts_are_assigned_by_the_experiments_unit(sqlite_url, unit):
    import flywheel_middleware as fw

    fw.configure(config=make_config().model_dump(), store_url=sqlite_url)
    try:
        store = fw.get_store()
        versions.ensure_workflow(store, fw.get_config(), "qa")
        cand = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 3}}, created_by="t")
        ex.start_experiment(store, "qa", [cand.id], traffic=0.5, unit=unit, seed="unit-test")
        fw.set_resolver(StoreResolver(store, fw.get_config(), ttl=60))
        seen: dict[tuple[str, str], set[str]] = {}
        for user in range(40):
            for session in range(3):
                for _ in range(2):
                    with fw.rollout(
                        "qa", user_id=f"u{user}", session_id=f"u{user}-s{session}"
                    ) as r:
                        variant = r.config and r.variant
                    seen.setdefault((f"u{user}", f"u{user}-s{session}"), set()).add(variant)
        per_user: dict[str, set[str]] = {}
        for (user, _), variants in seen.items():
            per_user.setdefault(user, set()).update(variants)
        sticky_sessions = all(len(v) == 1 for v in seen.values())
        sticky_users = all(len(v) == 1 for v in per_user.values())
        if unit == "user_id":
            assert sticky_users
        elif unit == "session_id":
            assert sticky_sessions and not sticky_users  # a user's sessions differ
        else:
            assert not sticky_sessions  # each request draws its own variant
    finally:
        fw.shutdown()


@pytest.mark.parametrize("ref", ["abc", "v", "#x", "3.5", ""])
def test_a_malformed_version_reference_is_named(store, ref):
    versions.ensure_workflow(store, make_config(), "qa")
    with pytest.raises(VersionError, match="is not a config version: give a version number"):
        versions.find_version(store, "qa", ref)


def test_a_deployment_change_stops_the_experiment_it_invalidates(store):
    """Rollback is the emergency stop: it must reach the traffic inside a running experiment."""
    config = make_config()
    v1 = versions.ensure_workflow(store, config, "qa")
    v2 = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 3}})
    c = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}})
    versions.activate(store, "qa", v2.id)
    exp = ex.start_experiment(store, "qa", [c.id], traffic=0.3, seed="stale")
    resolver = StoreResolver(store, config, ttl=60)
    units = [f"u{i}" for i in range(300)]
    assert {resolver.resolve("qa", u).version_id for u in units} == {v2.id, c.id}
    versions.rollback(store, "qa", reason="v2 is broken")
    assert ex.get_experiment(store, exp.id).status == "stopped"
    assert "no longer active" in ex.get_experiment(store, exp.id).decision["reason"]
    resolver.invalidate()
    assert {resolver.resolve("qa", u).version_id for u in units} == {v1.id}
    with store.session() as session:
        kinds = [e.kind for e in session.exec(__import__("sqlmodel").select(ChangeEvent)).all()]
    assert kinds[-2:] == ["rollback", "experiment_stop"]
    # an experiment whose baseline is the version activated again is left running
    exp2 = ex.start_experiment(store, "qa", [c.id], traffic=0.3)
    versions.activate(store, "qa", v1.id, reason="again")
    assert ex.get_experiment(store, exp2.id).status == "running"


def test_promotion_is_one_transaction_and_happens_once(store_url):
    """A person and the controller promoting at once: one promotion, the other is refused."""
    from concurrent.futures import ThreadPoolExecutor

    from flywheel_middleware.store.database import Store

    stores = [Store(store_url) for _ in range(4)]
    try:
        store = stores[0]
        versions.ensure_workflow(store, make_config(), "qa")
        c = versions.create_version(store, "qa", {**BASE, "rag": {"top_k": 4}})
        exp = ex.start_experiment(store, "qa", [c.id], traffic=0.3)

        def attempt(s):
            try:
                return ex.promote(s, exp.id, "candidate-1", actor="race").kind
            except ex.ExperimentError as err:
                return str(err)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attempt, stores))
        assert results.count("promote") == 1, results
        assert all("already promoted" in r for r in results if r != "promote")
        assert [e.kind for e in versions.deployment_history(store, "qa")] == [
            "activate",
            "promote",
        ]
        done = ex.get_experiment(store, exp.id)
        assert done.status == "promoted" and done.decision["variant"] == "candidate-1"
        assert versions.active_version(store, "qa").id == c.id
    finally:
        for s in stores:
            s.dispose()


def test_processes_starting_experiments_together_start_one(store_url):
    from concurrent.futures import ThreadPoolExecutor

    from flywheel_middleware.store.database import Store

    stores = [Store(store_url) for _ in range(4)]
    try:
        versions.ensure_workflow(stores[0], make_config(), "qa")
        c = versions.create_version(stores[0], "qa", {**BASE, "rag": {"top_k": 4}})

        def attempt(s):
            try:
                return ex.start_experiment(s, "qa", [c.id], traffic=0.1).id
            except ex.ExperimentError as err:
                return str(err)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attempt, stores))
        started = [r for r in results if isinstance(r, int)]
        assert len(started) == 1, results
        assert all("already has a running experiment" in r for r in results if r not in started)
    finally:
        for s in stores:
            s.dispose()
