"""Offline (off-policy) evaluation: what another assignment or routing policy would have earned.

Every logged decision carries the probability the logging policy gave its action — the
resolver's variant weight on a rollout (``Rollout.propensity``), the router's choice
probability and the whole distribution over eligible agents (``metadata["route"]``). With
them the value of a target policy π on past traffic is estimated without running it:

- **IPS** (inverse propensity scoring, Horvitz & Thompson 1952): the mean of ``w·r`` where
  ``w = π(a|x) / μ(a|x)``; unbiased, high variance when ``w`` is large;
- **SNIPS** (self-normalized IPS, Swaminathan & Joachims 2015): ``Σ w·r / Σ w``; slightly
  biased, much steadier;
- **DR** (doubly robust, Dudík, Langford & Li 2011): a reward model ``q(x, a)`` (a ridge
  regression on one-hot action × skill features, cross-fitted over two folds of units)
  plus the IPS-weighted residual ``Σ_a π(a|x) q(x, a) + w·(r − q(x, a))``; unbiased when
  the propensities are right, low variance when the model is good.

Confidence intervals are normal intervals with a cluster-robust (delta-method) variance over
randomization units — users for assignments (the same user keeps a variant), users (else
sessions) for routing — so a user with many rollouts does not make the interval too narrow.
The effective sample size is Kish's ``(Σw)² / Σw²``. The estimates need overlap: where π
takes an action the logging policy gave probability 0 in that context, nothing in the log
says what it earns, and ``evaluate`` refuses with the reason (OverlapError). The router keeps
an exploration floor (``routing.floor``) so that every eligible agent has a positive
probability. Decisions without a reward are left out and counted, which assumes a missing
reward does not depend on the action.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import Any

from flywheel_middleware.errors import FlywheelError

ANY_CONTEXT = "*"


class EvaluationError(FlywheelError, ValueError):
    """The evaluation cannot be set up: a bad policy, no logged decisions, an unknown experiment."""


class OverlapError(EvaluationError):
    """The target policy takes an action the logging policy never tried in that context."""


@dataclass(frozen=True)
class LoggedDecision:
    """One logged choice: who it was for, in what context, what was chosen with which
    probability, every action's logging probability, and the reward that followed."""

    unit: str
    context: tuple[str, ...]
    action: str
    propensity: float
    support: Mapping[str, float]
    reward: float


def _context_label(context: tuple[str, ...]) -> str:
    return "+".join(context) if context else ANY_CONTEXT


@dataclass
class TargetPolicy:
    """π(a | context): an action distribution per context, ``*`` for every other context."""

    rules: dict[str, dict[str, float]]

    @classmethod
    def parse(cls, specs: Sequence[str]) -> TargetPolicy:
        """``[CONTEXT:]ACTION[=WEIGHT][,ACTION[=WEIGHT]...]`` per spec; a context is a skill
        set joined by ``+`` (routing), ``*`` or nothing for any context; weights default to 1
        and are normalized (``a,b`` is half each)."""
        rules: dict[str, dict[str, float]] = {}
        if not specs:
            raise EvaluationError("give the target policy: --policy ACTION or CONTEXT:ACTION=W,…")
        for spec in specs:
            context, sep, actions = spec.rpartition(":")
            key = "+".join(sorted(filter(None, context.split("+")))) if sep else ANY_CONTEXT
            key = key or ANY_CONTEXT
            if key in rules:
                raise EvaluationError(f"policy {spec!r}: context {key!r} is given twice")
            weights: dict[str, float] = {}
            for part in filter(None, (p.strip() for p in actions.split(","))):
                name, eq, value = part.partition("=")
                try:
                    weight = float(value) if eq else 1.0
                except ValueError:
                    raise EvaluationError(
                        f"policy {spec!r}: weight {value!r} of {name!r} is not a number"
                    ) from None
                if not name.strip() or weight < 0 or math.isnan(weight):
                    raise EvaluationError(
                        f"policy {spec!r}: give ACTION or ACTION=WEIGHT (a weight ≥ 0)"
                    )
                weights[name.strip()] = weights.get(name.strip(), 0.0) + weight
            total = sum(weights.values())
            if total <= 0:
                raise EvaluationError(f"policy {spec!r}: no action with a positive weight")
            rules[key] = {a: w / total for a, w in weights.items() if w > 0}
        return cls(rules)

    def probabilities(self, context: tuple[str, ...]) -> dict[str, float]:
        key = "+".join(sorted(context)) or ANY_CONTEXT
        found = self.rules.get(key, self.rules.get(ANY_CONTEXT))
        if found is None:
            raise EvaluationError(
                f"the policy says nothing for context {key!r}; add '{key}:ACTION' or '*:ACTION'"
            )
        return found

    def describe(self) -> str:
        return "; ".join(
            f"{ctx}: " + ", ".join(f"{a} {p:.0%}" for a, p in acts.items())
            for ctx, acts in self.rules.items()
        )


@dataclass
class Estimate:
    """A point estimate with its standard error and confidence interval."""

    value: float
    se: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "se": self.se, "low": self.low, "high": self.high}


@dataclass
class OffPolicyResult:
    """The estimates of one target policy on one log of decisions."""

    policy: str
    level: float
    decisions: int
    units: int
    ess: float
    logged: Estimate
    ips: Estimate
    snips: Estimate
    dr: Estimate | None
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    max_weight: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "level": self.level,
            "decisions": self.decisions,
            "units": self.units,
            "effective_sample_size": self.ess,
            "max_weight": self.max_weight,
            "estimates": {
                "logged": self.logged.as_dict(),
                "ips": self.ips.as_dict(),
                "snips": self.snips.as_dict(),
                "dr": self.dr.as_dict() if self.dr is not None else None,
            },
            "left_out": self.left_out,
            "notes": self.notes,
        }


# -- the estimators ----------------------------------------------------------------------------


def check_overlap(decisions: Sequence[LoggedDecision], policy: TargetPolicy) -> None:
    """Raise OverlapError naming each action π takes that the log gives probability 0 there."""
    missing: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    seen_actions: set[str] = set()
    for d in decisions:
        seen_actions.update(a for a, p in d.support.items() if p > 0)
        for action, p in policy.probabilities(d.context).items():
            if p <= 0:
                continue
            key = (_context_label(d.context), action)
            missing[key][1] += 1
            if d.support.get(action, 0.0) <= 0:
                missing[key][0] += 1
    problems = []
    for (context, action), (never, total) in sorted(missing.items()):
        if not never:
            continue
        if action not in seen_actions:
            problems.append(
                f"{action!r} was never an option in the log (logged actions: "
                f"{', '.join(sorted(seen_actions)) or 'none'})"
            )
        else:
            where = "" if context == ANY_CONTEXT else f" for context {context!r}"
            problems.append(
                f"the logging policy never tried {action!r}{where} in {never} of {total} "
                "decisions (probability 0 there)"
            )
    if problems:
        raise OverlapError(
            "no overlap, so past traffic cannot say what this policy earns: "
            + "; ".join(dict.fromkeys(problems))
        )


def _ratio(
    pairs: Mapping[str, tuple[float, float]], z: float, bounded: tuple[float, float] | None = None
) -> Estimate:
    """θ = ΣA / ΣB over units, with the delta-method (cluster-robust) standard error."""
    total_a = sum(a for a, _ in pairs.values())
    total_b = sum(b for _, b in pairs.values())
    theta = total_a / total_b if total_b else float("nan")
    g = len(pairs)
    if g < 2 or not total_b:
        return Estimate(theta, None, None, None)
    ss = sum((a - theta * b) ** 2 for a, b in pairs.values())
    se = math.sqrt(g / (g - 1) * ss) / abs(total_b)
    return Estimate(theta, se, theta - z * se, theta + z * se)


def _features(context: tuple[str, ...], action: str) -> dict[str, float]:
    out = {f"a={action}": 1.0}
    for skill in context:
        out[f"s={skill}"] = 1.0
        out[f"a={action}|s={skill}"] = 1.0
    return out


def _fold(unit: str) -> int:
    return hashlib.sha256(unit.encode()).digest()[0] % 2


def reward_model_predictions(
    decisions: Sequence[LoggedDecision], actions: Sequence[str], alpha: float = 1.0
) -> list[dict[str, float]]:
    """q(x_i, a) for every decision and action: ridge regressions (closed form, numpy) on
    one-hot action, skill and action × skill features, cross-fitted over two folds of units,
    so each decision's prediction comes from the model that did not see its unit."""
    import numpy as np

    keys = sorted({(d.context, a) for d in decisions for a in actions})
    index: dict[str, int] = {}
    for context, action in keys:
        for name in _features(context, action):
            index.setdefault(name, len(index) + 1)  # column 0 is the intercept

    def row(context: tuple[str, ...], action: str) -> Any:
        x = np.zeros(len(index) + 1)
        x[0] = 1.0
        for name in _features(context, action):
            x[index[name]] = 1.0
        return x

    table = {key: row(*key) for key in keys}
    folds = [_fold(d.unit) for d in decisions]
    penalty = alpha * np.eye(len(index) + 1)
    penalty[0, 0] = 0.0
    out: list[dict[str, float]] = [{} for _ in decisions]
    for fold in (0, 1):
        train = [d for d, f in zip(decisions, folds, strict=True) if f != fold] or list(decisions)
        x = np.array([table[(d.context, d.action)] for d in train])
        y = np.array([d.reward for d in train])
        beta = np.linalg.solve(x.T @ x + penalty, x.T @ y)
        predicted = {key: min(1.0, max(0.0, float(v @ beta))) for key, v in table.items()}
        for i, f in enumerate(folds):
            if f == fold:
                out[i] = {a: predicted[(decisions[i].context, a)] for a in actions}
    return out


def evaluate(
    decisions: Sequence[LoggedDecision],
    policy: TargetPolicy,
    *,
    level: float = 0.95,
    reward_model: bool = True,
    left_out: Mapping[str, int] | None = None,
) -> OffPolicyResult:
    """IPS, SNIPS and DR estimates of ``policy`` on ``decisions``, with ``level`` intervals.

    Raises OverlapError (with the reason) where π takes an action the log never tried there,
    and EvaluationError when there is nothing to evaluate.
    """
    if not 0 < level < 1:
        raise EvaluationError(f"the confidence level must be between 0 and 1, got {level}")
    if not decisions:
        raise EvaluationError("no logged decisions with a propensity and a reward to evaluate on")
    check_overlap(decisions, policy)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    target = [policy.probabilities(d.context) for d in decisions]
    weights = [t.get(d.action, 0.0) / d.propensity for d, t in zip(decisions, target, strict=True)]
    logged: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    ips: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    snips: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for d, w in zip(decisions, weights, strict=True):
        a, b = logged[d.unit]
        logged[d.unit] = (a + d.reward, b + 1)
        a, b = ips[d.unit]
        ips[d.unit] = (a + w * d.reward, b + 1)
        a, b = snips[d.unit]
        snips[d.unit] = (a + w * d.reward, b + w)
    notes: list[str] = []
    dr_estimate = None
    if reward_model:
        actions = sorted({a for t in target for a in t} | {d.action for d in decisions})
        try:
            q = reward_model_predictions(decisions, actions)
        except ImportError:
            notes.append(
                "DR needs numpy for its reward model: pip install 'flywheel-middleware[ml]'"
            )
        else:
            dr: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
            for d, w, t, qi in zip(decisions, weights, target, q, strict=True):
                term = sum(p * qi[a] for a, p in t.items()) + w * (d.reward - qi[d.action])
                a, b = dr[d.unit]
                dr[d.unit] = (a + term, b + 1)
            dr_estimate = _ratio(dr, z)
    total_w = sum(weights)
    ess = total_w**2 / sum(w * w for w in weights) if total_w > 0 else 0.0
    if ess < 30:
        notes.append(
            f"the effective sample size is {ess:.1f}: few logged decisions match the policy, "
            "so the intervals are rough"
        )
    return OffPolicyResult(
        policy=policy.describe(),
        level=level,
        decisions=len(decisions),
        units=len(logged),
        ess=ess,
        logged=_ratio(logged, z),
        ips=_ratio(ips, z),
        snips=_ratio(snips, z) if total_w > 0 else Estimate(float("nan"), None, None, None),
        dr=dr_estimate,
        notes=notes,
        left_out=dict(left_out or {}),
        max_weight=max(weights),
    )


# -- the logged decisions in the store ---------------------------------------------------------


def _unit(user_id: str | None, session_id: str | None, rollout_id: str) -> str:
    return user_id or session_id or rollout_id


def _clean_reward(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _left_out(propensity: Any, reward: Any) -> str | None:
    """Why a logged decision cannot be used (None: it can)."""
    if isinstance(propensity, bool) or not isinstance(propensity, int | float):
        return "no logged propensity"
    if propensity <= 0:
        return "logged propensity 0"
    return "no reward" if _clean_reward(reward) is None else None


def routing_decisions(
    store: Any, *, workflow: str | None = None, since: datetime | None = None
) -> tuple[list[LoggedDecision], dict[str, int]]:
    """The routing choices ``fw.route`` recorded (``metadata["route"]``), each with its
    distribution over the eligible agents, and the counts of those left out (and why)."""
    from sqlmodel import select

    from flywheel_middleware.store.models import Rollout

    q = select(
        Rollout.id, Rollout.user_id, Rollout.session_id, Rollout.reward, Rollout.metadata_
    ).where(Rollout.metadata_["route"].as_string().is_not(None))
    if workflow:
        q = q.where(Rollout.workflow == workflow)
    if since is not None:
        q = q.where(Rollout.started_at >= since)
    out: list[LoggedDecision] = []
    left: dict[str, int] = defaultdict(int)
    with store.session() as session:
        rows = list(session.exec(q))
    for rid, user, sess, reward, meta in rows:
        route = (meta or {}).get("route") if isinstance(meta, dict) else None
        if not isinstance(route, dict) or not isinstance(route.get("agent"), str):
            continue
        probabilities = route.get("probabilities")
        propensity = route.get("probability")
        why = _left_out(propensity if isinstance(probabilities, dict) else None, reward)
        if why is not None:
            left[why] += 1
            continue
        out.append(
            LoggedDecision(
                unit=_unit(user, sess, rid),
                context=tuple(sorted(s for s in route.get("skills") or [] if isinstance(s, str))),
                action=route["agent"],
                propensity=float(propensity),
                support={str(k): float(v) for k, v in probabilities.items()},
                reward=float(reward),
            )
        )
    return out, dict(left)


def _weight_phases(store: Any, experiment: Any) -> list[tuple[datetime, dict[str, float]]]:
    """The experiment's variant weights over time: at its start, then each weight change."""
    from sqlmodel import select

    from flywheel_middleware.store.models import ChangeEvent

    start = {str(v["name"]): float(v.get("weight", 0)) for v in experiment.variants or []}
    with store.session() as session:
        q = (
            select(ChangeEvent)
            .where(
                ChangeEvent.workflow == experiment.workflow,
                ChangeEvent.kind.in_(("experiment_start", "experiment_weights")),
                ChangeEvent.created_at >= experiment.started_at,
            )
            .order_by(ChangeEvent.created_at, ChangeEvent.id)
        )
        if experiment.ended_at is not None:
            q = q.where(ChangeEvent.created_at <= experiment.ended_at)
        events = list(session.exec(q))
    phases: list[tuple[datetime, dict[str, float]]] = []
    current: dict[str, float] | None = None
    for ev in events:
        evidence = ev.evidence or {}
        if ev.kind == "experiment_start":
            if evidence.get("experiment_id") != experiment.id:
                continue
            current = {str(v["name"]): float(v.get("weight", 0)) for v in evidence["variants"]}
        elif current is not None:
            current = {**current, **{str(k): float(v) for k, v in evidence["weights"].items()}}
        else:
            continue
        phases.append((_aware(ev.created_at), current))
    return phases or [(_aware(experiment.started_at), start)]


def _aware(value: datetime) -> datetime:
    from datetime import timezone

    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def assignment_decisions(
    store: Any, experiment_id: int
) -> tuple[list[LoggedDecision], dict[str, int], Any]:
    """The variant assignments of one experiment's rollouts (variant, propensity), each with
    the experiment's weights at the time, the counts left out, and the experiment."""
    import bisect

    from sqlmodel import select

    from flywheel_middleware.store.models import Experiment, Rollout

    with store.session() as session:
        experiment = session.get(Experiment, int(experiment_id))
        if experiment is None:
            raise EvaluationError(f"no experiment with id {experiment_id}")
        rows = list(
            session.exec(
                select(
                    Rollout.id,
                    Rollout.user_id,
                    Rollout.session_id,
                    Rollout.variant,
                    Rollout.propensity,
                    Rollout.reward,
                    Rollout.started_at,
                ).where(Rollout.experiment_id == experiment.id)
            )
        )
    phases = _weight_phases(store, experiment)
    starts = [t for t, _ in phases]
    unit_kind = experiment.unit or "user_id"
    out: list[LoggedDecision] = []
    left: dict[str, int] = defaultdict(int)
    for rid, user, sess, variant, propensity, reward, started in rows:
        why = _left_out(propensity if variant is not None else None, reward)
        if why is not None:
            left[why] += 1
            continue
        at = max(0, bisect.bisect_right(starts, _aware(started)) - 1)
        weights = phases[at][1]
        total = sum(max(0.0, w) for w in weights.values()) or 1.0
        support = {name: max(0.0, w) / total for name, w in weights.items()}
        support[variant] = float(propensity)  # what the resolver really gave it
        if unit_kind == "session_id":
            unit = sess or rid
        elif unit_kind == "request":
            unit = rid
        else:
            unit = _unit(user, sess, rid)
        out.append(
            LoggedDecision(
                unit=unit,
                context=(),
                action=variant,
                propensity=float(propensity),
                support=support,
                reward=float(reward),
            )
        )
    return out, dict(left), experiment
