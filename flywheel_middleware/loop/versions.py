"""Versioned workflow configs, the active deployment, and the per-request resolver.

A workflow's config is a chain of immutable ``ConfigVersion`` rows (version 1 is the YAML
config); a ``Deployment`` row names the active one and every change of it — activate,
promote, rollback — writes a ``ChangeEvent``, so ``rollback`` can walk the history back.

``StoreResolver.resolve(workflow, unit_id)`` serves the active version, or an experiment
variant. Assignment uses GrowthBook-style buckets: a hash of (experiment seed, unit id) gives
each unit a coverage draw and a bucket in [0, 1). Each candidate owns a fixed slot of the
bucket line (slot k = [k/K, (k+1)/K) for K candidates) and covers the top ``share`` of its
slot; the baseline takes every other bucket. So assignment is deterministic and sticky, exactly
proportional, and ramping one candidate (or dropping it) moves only units between that
candidate and the baseline — no more than the change in its share, the least possible.
(GrowthBook's cumulative ranges would shift every later variant when one weight changes; a
candidate whose share exceeds its slot falls back to those cumulative ranges.) ``coverage``
keeps a fraction of units out of the experiment entirely; raising it only adds units. The
deployment and running experiments are cached for ``ttl`` seconds, so a promotion reaches
every process without a restart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlmodel import select

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.config import FlywheelConfig, MissingEnvError, expand_env
from flywheel_middleware.environment import env_number
from flywheel_middleware.errors import FlywheelError, safe_url
from flywheel_middleware.loop.resolver import Resolution
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, ConfigVersion, Deployment, Experiment

log = logging.getLogger("flywheel_middleware.loop.versions")

YAML_AUTHOR = "yaml"
DEPLOY_KINDS = ("activate", "promote", "rollback")


class VersionError(FlywheelError, LookupError):
    """A version, workflow or rollback target that does not exist."""


# -- config values ------------------------------------------------------------------------


def canonical_json(config: Any) -> str:
    """One text per config value (sorted keys, no spaces), so equal configs hash equally."""
    return json.dumps(
        config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON: how 'already tried' and 'unchanged' are recognised."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def _plain_numbers(value: Any) -> Any:
    """Integral floats as ints (1.0 → 1), recursively: YAML's ``1`` and a grid's ``1.0``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_numbers(v) for v in value]
    return value


def semantic_hash(config: Any) -> str:
    """Like ``config_hash``, but configs that differ only as 1 vs 1.0 hash equally."""
    return config_hash(_plain_numbers(config))


def config_hashes(config: Any) -> set[str]:
    """Both identities of a config: how mutators check 'already tried'."""
    return {config_hash(config), semantic_hash(config)}


_MISSING = object()


def get_path(config: dict[str, Any], path: str, default: Any = _MISSING) -> Any:
    """The value at a dotted path ("llm.temperature"); KeyError names the missing part."""
    node: Any = config
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            if default is not _MISSING:
                return default
            raise KeyError(f"config has no key {path!r} (missing {part!r})")
    return node


def set_path(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``config`` with ``path`` set (intermediate mappings are created)."""
    out = copy.deepcopy(config)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def diff_configs(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) for every leaf that differs; missing is None."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append((path, None, new[key]))
            elif key not in new:
                out.append((path, old[key], None))
            else:
                out.extend(diff_configs(old[key], new[key], path))
        return out
    return [] if old == new else [(prefix or "(config)", old, new)]


# -- versions -----------------------------------------------------------------------------


def get_version(store: Store, version_id: int) -> ConfigVersion:
    with store.session() as session:
        row = session.get(ConfigVersion, version_id)
    if row is None:
        raise VersionError(f"no config version with id {version_id}")
    return row


def config_in_use(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The config as the agent's process runs it: ``${VAR}`` references (what versions store
    and the service serves) filled in from this process's environment.

    An unset variable is logged once per ``where`` and variable, naming both, and its
    reference is left as written: a resolver never raises into the agent.
    """

    def missing(error: MissingEnvError) -> None:
        key = (where, error.name)
        if key not in _missing_reported:
            _missing_reported.add(key)
            log.warning("%s (the reference is served as written)", error)

    return expand_env(config, where, missing)


_missing_reported: set[tuple[str, str]] = set()
_stored_configs: weakref.WeakKeyDictionary[Store, dict[int, str]] = weakref.WeakKeyDictionary()
_stored_lock = threading.Lock()


def stored_config(
    store: Store, config: FlywheelConfig, workflow: str, resolution: Resolution
) -> dict[str, Any]:
    """The config of ``resolution`` as stored, with its ``${VAR}`` references and never the
    values the resolver filled in: what may leave the process (``GET /v1/config``).

    Versions are immutable, so each one is read once per store.
    """
    if resolution.version_id is None:  # served from the YAML (the store was unreachable)
        wf = config.workflows.get(workflow)
        return copy.deepcopy(wf.config) if wf is not None else resolution.config
    with _stored_lock:
        known = _stored_configs.setdefault(store, {})
        text = known.get(resolution.version_id)
    if text is None:
        text = canonical_json(get_version(store, resolution.version_id).config)
        with _stored_lock:
            known[resolution.version_id] = text
    return json.loads(text)


def find_version(store: Store, workflow: str, ref: int | str) -> ConfigVersion:
    """A version by number within the workflow ("3", "v3") or by id ("#17")."""
    text = str(ref).strip()
    digits = text[1:] if text[:1] in ("#", "v", "V") else text
    if not digits.isdigit():
        raise VersionError(
            f"{text!r} is not a config version: give a version number (3 or v3) or an id (#17)"
        )
    with store.session() as session:
        if text.startswith("#"):
            row = session.get(ConfigVersion, int(digits))
            if row is not None and row.workflow != workflow:
                row = None
        else:
            number = int(digits)
            row = session.exec(
                select(ConfigVersion).where(
                    ConfigVersion.workflow == workflow, ConfigVersion.version == number
                )
            ).first()
    if row is None:
        raise VersionError(f"workflow {workflow!r} has no config version {text!r}")
    return row


def list_versions(store: Store, workflow: str) -> list[ConfigVersion]:
    with store.session() as session:
        return list(
            session.exec(
                select(ConfigVersion)
                .where(ConfigVersion.workflow == workflow)
                .order_by(ConfigVersion.version)
            ).all()
        )


def workflows_in_store(store: Store) -> list[str]:
    with store.session() as session:
        return sorted(session.exec(select(ConfigVersion.workflow).distinct()).all())


def tried_hashes(store: Store, workflow: str) -> set[str]:
    """Hashes of every config this workflow has had: mutators skip them.

    Each version contributes its ``config_hash`` and its ``semantic_hash``, so a candidate
    equal to a tried config up to 1 vs 1.0 counts as tried too.
    """
    with store.session() as session:
        rows = session.exec(
            select(ConfigVersion.config_hash, ConfigVersion.config).where(
                ConfigVersion.workflow == workflow
            )
        ).all()
    out: set[str] = set()
    for digest, config in rows:
        out.add(digest)
        out.add(semantic_hash(config))
    return out


def lock_workflow(session: Any, store: Store, workflow: str) -> None:
    """Serialise writers of one workflow's versions/deployment across processes.

    PostgreSQL: a transaction-scoped advisory lock on the workflow name. SQLite: BEGIN
    IMMEDIATE takes the database's write lock before anything is read (it must be the
    session's first statement), so check-then-insert cannot race.
    """
    if store.dialect == "postgresql":
        key = int.from_bytes(hashlib.sha256(workflow.encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    else:
        session.execute(text("BEGIN IMMEDIATE"))


def _insert_version(
    session: Any,
    workflow: str,
    config: dict[str, Any],
    digest: str,
    *,
    parent_id: int | None,
    created_by: str,
    note: str | None,
) -> ConfigVersion:
    last = session.exec(
        select(ConfigVersion.version)
        .where(ConfigVersion.workflow == workflow)
        .order_by(ConfigVersion.version.desc())
        .limit(1)
    ).first()
    row = ConfigVersion(
        workflow=workflow,
        version=(last or 0) + 1,
        config=json.loads(canonical_json(config)),
        config_hash=digest,
        parent_id=parent_id,
        created_by=created_by,
        note=note,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def create_version(
    store: Store,
    workflow: str,
    config: dict[str, Any],
    *,
    parent_id: int | None = None,
    created_by: str = "user",
    note: str | None = None,
    reuse: bool = True,
) -> ConfigVersion:
    """Store ``config`` as the workflow's next version.

    With ``reuse`` an identical config (same canonical JSON) returns the existing row;
    without it only an identical config by the same author does.
    """
    if not isinstance(config, dict):
        raise TypeError(f"a workflow config must be a mapping, got {type(config).__name__}")
    digest = config_hash(config)
    with store.session() as session:
        lock_workflow(session, store, workflow)
        q = select(ConfigVersion).where(
            ConfigVersion.workflow == workflow, ConfigVersion.config_hash == digest
        )
        if not reuse:
            q = q.where(ConfigVersion.created_by == created_by)
        same = session.exec(q.order_by(ConfigVersion.version)).first()
        if same is not None:
            return same
        return _insert_version(
            session, workflow, config, digest, parent_id=parent_id, created_by=created_by, note=note
        )


# -- deployment and its history -----------------------------------------------------------


def active_version(store: Store, workflow: str) -> ConfigVersion | None:
    with store.session() as session:
        dep = session.get(Deployment, workflow)
        return None if dep is None else session.get(ConfigVersion, dep.active_version_id)


def set_active(
    session: Any,
    workflow: str,
    version_id: int,
    *,
    kind: str,
    actor: str,
    reason: str | None,
    evidence: dict[str, Any] | None,
) -> ChangeEvent:
    """Make ``version_id`` the active version of ``workflow`` inside the caller's transaction.

    Writes the Deployment row, a ChangeEvent of ``kind`` (activate, promote, rollback, ...)
    from the previous version, and stops experiments whose baseline is no longer active. The
    caller holds the workflow's lock (``lock_workflow``) and commits; returns the event.
    """
    dep = session.get(Deployment, workflow, with_for_update=True)
    previous = None if dep is None else dep.active_version_id
    now = utcnow()
    if dep is None:
        session.add(Deployment(workflow=workflow, active_version_id=version_id, updated_at=now))
    else:
        dep.active_version_id = version_id
        dep.updated_at = now
        session.add(dep)
    event = ChangeEvent(
        workflow=workflow,
        kind=kind,
        from_version_id=previous,
        to_version_id=version_id,
        actor=actor,
        reason=reason,
        evidence=evidence,
        created_at=now,
    )
    session.add(event)
    _stop_stale_experiments(session, workflow, version_id, kind=kind, actor=actor, now=now)
    session.flush()
    return event


def _stop_stale_experiments(
    session: Any, workflow: str, version_id: int, *, kind: str, actor: str, now: Any
) -> list[int]:
    """Stop running experiments whose baseline is no longer the active version.

    An experiment serves its own baseline version to the baseline arm, so without this a
    rollback (or a manual activation) would not reach the traffic in a running experiment,
    and a later promotion would overwrite the person's choice.
    """
    stale = session.exec(
        select(Experiment).where(
            Experiment.workflow == workflow,
            Experiment.status == "running",
            Experiment.baseline_version_id != version_id,
        )
    ).all()
    for exp in stale:
        reason = (
            f"experiment {exp.id} stopped: its baseline (version id {exp.baseline_version_id}) "
            f"is no longer active after a {kind} to version id {version_id}"
        )
        exp.status = "stopped"
        exp.ended_at = now
        exp.decision = {"action": "stopped", "reason": reason, "actor": actor}
        session.add(exp)
        session.add(
            ChangeEvent(
                workflow=workflow,
                kind="experiment_stop",
                actor=actor,
                reason=reason,
                evidence={"experiment_id": exp.id, "decision": exp.decision},
                created_at=now,
            )
        )
    return [exp.id for exp in stale]


def activate(
    store: Store,
    workflow: str,
    version_id: int,
    *,
    actor: str = "user",
    reason: str | None = None,
    kind: str = "activate",
    evidence: dict[str, Any] | None = None,
) -> ChangeEvent:
    """Make ``version_id`` the active version and record why (kind activate or promote)."""
    if kind not in DEPLOY_KINDS:
        raise ValueError(f"deployment change kind must be one of {DEPLOY_KINDS}, got {kind!r}")
    version = get_version(store, version_id)
    if version.workflow != workflow:
        raise VersionError(
            f"config version {version_id} belongs to workflow {version.workflow!r}, not {workflow!r}"
        )
    with store.session() as session:
        lock_workflow(session, store, workflow)
        return set_active(
            session,
            workflow,
            version_id,
            kind=kind,
            actor=actor,
            reason=reason,
            evidence=evidence,
        )


def deployment_history(store: Store, workflow: str) -> list[ChangeEvent]:
    """Every activate/promote/rollback of the workflow, oldest first."""
    with store.session() as session:
        return list(
            session.exec(
                select(ChangeEvent)
                .where(ChangeEvent.workflow == workflow, ChangeEvent.kind.in_(DEPLOY_KINDS))
                .order_by(ChangeEvent.created_at, ChangeEvent.id)
            ).all()
        )


def _active_stack(events: list[ChangeEvent]) -> list[int]:
    """Replay the history: activations push a version, rollbacks pop one."""
    stack: list[int] = []
    for ev in events:
        if ev.kind == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != ev.to_version_id:
                stack.append(ev.to_version_id)
        elif not stack or stack[-1] != ev.to_version_id:
            stack.append(ev.to_version_id)
    return stack


def rollback(
    store: Store, workflow: str, *, actor: str = "user", reason: str | None = None
) -> ChangeEvent:
    """Restore the version that was active before the current one (repeatable, like undo)."""
    with store.session() as session:
        lock_workflow(session, store, workflow)  # two rollbacks at once must not both pop
        events = list(
            session.exec(
                select(ChangeEvent)
                .where(ChangeEvent.workflow == workflow, ChangeEvent.kind.in_(DEPLOY_KINDS))
                .order_by(ChangeEvent.created_at, ChangeEvent.id)
            ).all()
        )
        dep = session.get(Deployment, workflow)
        current = None if dep is None else session.get(ConfigVersion, dep.active_version_id)
        if current is None:
            raise VersionError(f"workflow {workflow!r} has no active config version")
        stack = _active_stack(events)
        if stack and stack[-1] == current.id:
            stack.pop()
        if not stack:
            raise VersionError(
                f"workflow {workflow!r} has no earlier version to roll back to "
                f"(active: v{current.version})"
            )
        return set_active(
            session,
            workflow,
            stack[-1],
            kind="rollback",
            actor=actor,
            reason=reason or f"rollback from version id {current.id}",
            evidence={"from_version": current.version},
        )


def ensure_workflow(store: Store, config: FlywheelConfig, workflow: str) -> ConfigVersion | None:
    """Make the YAML config of ``workflow`` a version, deploying it if nothing is deployed.

    Version 1 is the YAML config. When the YAML config changes to something no earlier
    YAML revision held, it becomes a new version by ``yaml`` and is activated (a person
    edited the file). An old process still holding an older file never flips it back.
    Returns the active version (None for a workflow unknown to both YAML and the store).
    """
    wf = config.workflows.get(workflow)
    if wf is None:
        return active_version(store, workflow)
    digest = config_hash(wf.config)

    def yaml_state(session: Any) -> tuple[set[str], Deployment | None]:
        hashes = set(
            session.exec(
                select(ConfigVersion.config_hash).where(
                    ConfigVersion.workflow == workflow, ConfigVersion.created_by == YAML_AUTHOR
                )
            ).all()
        )
        return hashes, session.get(Deployment, workflow)

    with store.session() as session:  # the usual case: nothing to do, no write lock
        hashes, dep = yaml_state(session)
    if digest in hashes and dep is not None:
        return active_version(store, workflow)
    with store.session() as session:
        lock_workflow(session, store, workflow)
        hashes, dep = yaml_state(session)  # again, under the lock
        if digest in hashes:
            version = session.exec(
                select(ConfigVersion)
                .where(
                    ConfigVersion.workflow == workflow,
                    ConfigVersion.config_hash == digest,
                    ConfigVersion.created_by == YAML_AUTHOR,
                )
                .order_by(ConfigVersion.version.desc())
            ).first()
        else:
            version = _insert_version(
                session,
                workflow,
                wf.config,
                digest,
                parent_id=dep.active_version_id if dep is not None else None,
                created_by=YAML_AUTHOR,
                note="from the YAML configuration"
                + (f" ({config.source})" if config.source else ""),
            )
        if dep is None or (digest not in hashes and dep.active_version_id != version.id):
            set_active(
                session,
                workflow,
                version.id,
                kind="activate",
                actor=YAML_AUTHOR,
                reason="the YAML config of the workflow" + (" changed" if dep is not None else ""),
                evidence=None,
            )
    return active_version(store, workflow)


def find_by_hash(
    store: Store, workflow: str, digest: str, *, created_by: str | None = None
) -> ConfigVersion | None:
    with store.session() as session:
        q = select(ConfigVersion).where(
            ConfigVersion.workflow == workflow, ConfigVersion.config_hash == digest
        )
        if created_by is not None:
            q = q.where(ConfigVersion.created_by == created_by)
        return session.exec(q.order_by(ConfigVersion.version.desc())).first()


# -- assignment ---------------------------------------------------------------------------

_SCALE = float(1 << 64)
_STRUCTS = [struct.Struct(f">{k}Q") for k in range(9)]
_PAIR = _STRUCTS[2]


def _digest(seed: str, unit_id: str, k: int) -> tuple[int, ...]:
    data = hashlib.blake2b(f"{seed}\x1f{unit_id}".encode(), digest_size=8 * k).digest()
    return _STRUCTS[k].unpack(data)


def unit_uniforms(seed: str, unit_id: str, k: int) -> list[float]:
    """``k`` (≤ 8) independent uniforms in [0, 1) from one blake2b of (seed, unit)."""
    return [x / _SCALE for x in _digest(seed, unit_id, max(1, k))]


def bucket_ranges(weights: list[float], remainder: int = 0) -> list[tuple[float, float, int]]:
    """(low, high, variant index) ranges of the bucket line; uncovered buckets → ``remainder``.

    Candidates (every variant but ``remainder``) own equal fixed slots and fill the top of
    their slot with their share; if a share exceeds its slot, cumulative ranges are used.
    """
    total = sum(max(0.0, w) for w in weights)
    if total <= 0:
        return []
    shares = [max(0.0, w) / total for w in weights]
    others = [i for i in range(len(weights)) if i != remainder]
    if not others:
        return []
    slot = 1.0 / len(others)
    if all(shares[i] <= slot + 1e-12 for i in others):
        return [
            ((k + 1) * slot - shares[i], (k + 1) * slot, i)
            for k, i in enumerate(others)
            if shares[i] > 0
        ]
    out, low = [], 0.0
    for i, share in enumerate(shares):  # GrowthBook's cumulative ranges
        if share > 0 and i != remainder:
            out.append((low, low + share, i))
        low += share
    return out


def assign(
    seed: str, unit_id: str, weights: list[float], coverage: float = 1.0, remainder: int = 0
) -> int | None:
    """The variant index for a unit (None when outside ``coverage``)."""
    cover, bucket = unit_uniforms(seed, unit_id, 2)
    if cover >= coverage:
        return None
    for low, high, index in bucket_ranges(weights, remainder):
        if low <= bucket < high:
            return index
    return remainder


BASELINE = "baseline"


@dataclass
class _Plan:
    """A workflow's cached serving plan."""

    expires: float
    active: Resolution | None
    experiment_id: int | None = None
    seed: str = ""
    coverage: float = 1.0
    cutoff: int = 1 << 64
    ranges: list[tuple[int, int, Resolution]] = field(default_factory=list)
    remainder: Resolution | None = None
    forced_units: dict[str, Resolution] = field(default_factory=dict)
    by_name: dict[str, Resolution] = field(default_factory=dict)
    unit: str = "user_id"


def experiment_seed(experiment: Experiment) -> str:
    spec = experiment.metrics or {}
    return str(spec.get("seed") or f"exp-{experiment.id}")


def _resolver_ttl(given: float | None, configured: float) -> float:
    if given is not None:
        return float(given)
    return env_number("FLYWHEEL_RESOLVER_TTL", configured)


FIRST_LOAD_WAIT = 1.0
"""Seconds a workflow's first resolve waits for the store before serving the YAML config: a
healthy store answers well within it (so first requests join experiments), a dead one costs
each workflow this once."""


class StoreResolver:
    """Serves each request the active version or its experiment variant, from a short cache.

    ``ttl`` (seconds; else ``FLYWHEEL_RESOLVER_TTL``, else the YAML's ``resolver.ttl``, 2 by
    default) bounds how long a process keeps serving a deployment after another process
    changed it. ``forced`` (else ``resolver.forced``) maps a workflow to a variant name served
    to every request of this process (QA); units listed under a variant's
    ``force`` key in the experiment are served that variant in every process. Forced requests
    are not counted in the experiment (``experiment_id`` is None), as in GrowthBook.

    The store is read by background threads: a workflow's first resolve waits for its load at
    most ``FIRST_LOAD_WAIT`` (serving the YAML config if it takes longer), and an expired plan
    keeps serving while one thread refreshes it (``background=False`` reads inline instead),
    so a slow or unreachable store never stalls requests.
    While refreshes fail (the store is unreachable) every workflow keeps its last plan, retried
    each ``ttl``: ``stale_since`` and ``last_refresh_error`` say so to a health check, and one
    warning is logged per outage.
    """

    def __init__(
        self,
        store: Store,
        config: FlywheelConfig | None = None,
        *,
        ttl: float | None = None,
        forced: dict[str, str] | None = None,
        background: bool = True,
    ) -> None:
        self.store = store
        self.background = background
        self._pending: set[str] = set()
        self.config = config or FlywheelConfig()
        self.ttl = _resolver_ttl(ttl, self.config.resolver.ttl)
        self.forced: dict[str, str] = dict(
            forced if forced is not None else self.config.resolver.forced
        )
        self._plans: dict[str, _Plan] = {}
        self._versions: dict[int, Resolution] = {}  # immutable rows: cached for good
        self._synced: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}  # one refresh of a workflow at a time
        self._lock_pending = threading.Lock()  # guards _pending, _locks and _failing
        self._failing: dict[str, float] = {}  # workflow -> time.time() its refreshes began failing
        self._first_loads: dict[str, threading.Event] = {}  # first loads under way
        self.last_refresh_error: str | None = None  # the latest failure, while any lasts

    # -- the hot path ----------------------------------------------------------------------

    def resolve(self, workflow: str, unit_id: str | None = None) -> Resolution | None:
        plan = self._plans.get(workflow)
        if plan is None:
            plan = self._first_plan(workflow) if self.background else self._refresh(workflow, None)
        elif plan.expires <= time.monotonic():
            if self.background:
                self._refresh_later(workflow, plan)
            else:
                plan = self._refresh(workflow, plan)
        if plan.active is None:  # a workflow neither the YAML nor the store knows
            return None
        if self.forced and workflow in self.forced:
            forced = plan.by_name.get(self.forced[workflow])
            if forced is not None:
                return forced
        if plan.experiment_id is None or unit_id is None:
            return plan.active
        if plan.forced_units:
            forced = plan.forced_units.get(unit_id)
            if forced is not None:
                return forced
        cover, bucket = _PAIR.unpack(
            hashlib.blake2b(f"{plan.seed}\x1f{unit_id}".encode(), digest_size=16).digest()
        )
        if cover >= plan.cutoff:
            return plan.active
        for low, high, resolution in plan.ranges:
            if low <= bucket < high:
                return resolution
        return plan.remainder

    def unit_kind(self, workflow: str) -> str | None:
        """What the running experiment randomises over (user_id, session_id or request)."""
        plan = self._plans.get(workflow)
        if plan is None:
            self.resolve(workflow)
            plan = self._plans.get(workflow)
        return plan.unit if plan is not None and plan.experiment_id is not None else None

    def force(self, workflow: str, variant: str | None) -> None:
        """Serve ``variant`` to every request of ``workflow`` in this process (None clears)."""
        if variant is None:
            self.forced.pop(workflow, None)
        else:
            self.forced[workflow] = variant

    def invalidate(self, workflow: str | None = None) -> None:
        """Forget cached plans now (the next resolve reads the store)."""
        if workflow is None:
            self._plans.clear()
        else:
            self._plans.pop(workflow, None)

    @property
    def stale_since(self) -> float | None:
        """Since when (``time.time()``) refreshes have failed and the last plans are served;
        None while the store answers."""
        with self._lock_pending:
            return min(self._failing.values(), default=None)

    # -- loading ---------------------------------------------------------------------------

    def _first_plan(self, workflow: str) -> _Plan:
        """A workflow's first plan: loaded by a background thread, waited for at most
        ``FIRST_LOAD_WAIT`` (not at all while the store is known to be down); meanwhile the
        YAML config is served, out of any experiment, and the next resolve looks again."""
        placeholder = self._yaml_plan(workflow, expires=0.0)
        with self._lock_pending:
            loading = self._first_loads.get(workflow)
            if loading is None:
                loading = self._first_loads[workflow] = threading.Event()

                def run() -> None:
                    try:
                        self._refresh(workflow, None)
                    finally:
                        with self._lock_pending:
                            del self._first_loads[workflow]
                        loading.set()

                threading.Thread(
                    target=run, name=f"flywheel-resolver-{workflow}", daemon=True
                ).start()
        if not self._failing:
            loading.wait(FIRST_LOAD_WAIT)
        return self._plans.get(workflow) or placeholder

    def _refresh_later(self, workflow: str, stale: _Plan) -> None:
        """Start one background refresh of ``workflow`` (none if one is under way)."""
        with self._lock_pending:
            if workflow in self._pending:
                return
            self._pending.add(workflow)

        def run() -> None:
            try:
                self._refresh(workflow, stale, wait=True)
            finally:
                with self._lock_pending:
                    self._pending.discard(workflow)

        threading.Thread(target=run, name=f"flywheel-resolver-{workflow}", daemon=True).start()

    def _refresh(self, workflow: str, stale: _Plan | None, wait: bool = False) -> _Plan:
        with self._lock_pending:
            lock = self._locks.setdefault(workflow, threading.Lock())
        if stale is not None and not wait and not lock.acquire(blocking=False):
            return stale  # another thread is refreshing: serve what we have meanwhile
        if stale is None or wait:
            lock.acquire()
        try:
            current = self._plans.get(workflow)
            if current is not None and current is not stale and current.expires > time.monotonic():
                return current
            try:
                plan = self._load(workflow)
            except Exception as exc:  # the store is down: keep serving, retry after ttl
                self._refresh_failed(workflow, exc)
                if stale is not None:
                    stale.expires = time.monotonic() + self.ttl
                    return stale
                plan = self._yaml_plan(workflow, expires=time.monotonic() + self.ttl)
            else:
                self._refresh_succeeded(workflow)
            if plan is None:  # unknown workflow: remember that too, briefly
                plan = _Plan(expires=time.monotonic() + self.ttl, active=None)
            self._plans[workflow] = plan
            return plan
        finally:
            lock.release()

    def _yaml_plan(self, workflow: str, expires: float) -> _Plan:
        """What to serve of a workflow the store could not be asked about: its YAML config."""
        wf = self.config.workflows.get(workflow)
        if wf is None:
            return _Plan(expires=expires, active=None)
        config = config_in_use(wf.config, f"workflow {workflow!r} YAML config")
        return _Plan(expires=expires, active=Resolution(config=config, propensity=1.0))

    def _refresh_failed(self, workflow: str, exc: Exception) -> None:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        with self._lock_pending:
            first = not self._failing
            self._failing.setdefault(workflow, time.time())
            self.last_refresh_error = f"{workflow!r}: {type(exc).__name__}: {reason}"
        if first:  # once per outage; the retries each ttl stay quiet
            log.warning(
                "resolver cannot read the store %s (%s); serving the last known configs "
                "and retrying every %g s",
                safe_url(self.store.url),
                self.last_refresh_error,
                self.ttl,
            )
        else:
            log.debug("resolver refresh of %r failed again: %s", workflow, reason)

    def _refresh_succeeded(self, workflow: str) -> None:
        if not self._failing:
            return
        with self._lock_pending:
            since = self._failing.pop(workflow, None)
            others = list(self._failing)
            if not others:
                self.last_refresh_error = None
        if since is not None and not others:
            log.info("resolver reads the store again after %.1f s", time.time() - since)
        for other in others:  # the store answers again: retry them now, not at their next resolve
            plan = self._plans.get(other)
            if plan is not None:
                self._refresh_later(other, plan)

    def _resolution(self, session: Any, version_id: int, **extra: Any) -> Resolution:
        base = self._versions.get(version_id)
        if base is None:
            row = session.get(ConfigVersion, version_id)
            if row is None:
                raise VersionError(f"config version {version_id} is missing")
            where = f"workflow {row.workflow!r} config version {row.version}"
            config = config_in_use(row.config, where)
            base = Resolution(config=config, version_id=row.id, propensity=1.0)
            self._versions[version_id] = base
        if not extra:
            return base
        return base.replace(**extra)

    def _load(self, workflow: str) -> _Plan | None:
        self.store.ensure_schema()
        if workflow not in self._synced:
            ensure_workflow(self.store, self.config, workflow)
            self._synced.add(workflow)
        with self.store.session() as session:
            dep = session.get(Deployment, workflow)
            if dep is None:
                return None
            active = self._resolution(session, dep.active_version_id)
            plan = _Plan(expires=time.monotonic() + self.ttl, active=active)
            plan.by_name["baseline"] = active
            exp = session.exec(
                select(Experiment)
                .where(Experiment.workflow == workflow, Experiment.status == "running")
                .order_by(Experiment.started_at.desc(), Experiment.id.desc())
                .limit(1)
            ).first()
            if exp is None:
                return plan
            variants = list(exp.variants or [])
            weights = [max(0.0, float(v.get("weight", 0))) for v in variants]
            total = sum(weights)
            if total <= 0:
                return plan
            names = [str(v["name"]) for v in variants]
            remainder = names.index(BASELINE) if BASELINE in names else 0
            coverage = float((exp.metrics or {}).get("coverage", 1.0))
            plan.experiment_id = exp.id
            plan.unit = exp.unit or "user_id"
            plan.seed = experiment_seed(exp)
            plan.coverage = coverage
            plan.cutoff = int(min(1.0, max(0.0, coverage)) * _SCALE)
            served = []
            for v, w, name in zip(variants, weights, names, strict=True):
                served.append(
                    self._resolution(
                        session,
                        int(v["version_id"]),
                        experiment_id=exp.id,
                        variant=name,
                        propensity=w / total,
                    )
                )
                forced = self._resolution(session, int(v["version_id"]), variant=name)
                plan.by_name[name] = forced
                for unit in v.get("force") or ():
                    plan.forced_units[str(unit)] = forced
            plan.remainder = served[remainder]
            plan.ranges = [
                (int(low * _SCALE), int(high * _SCALE), served[i])
                for low, high, i in bucket_ranges(weights, remainder)
            ]
            return plan
