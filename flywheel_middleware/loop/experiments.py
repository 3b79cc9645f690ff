"""Experiments: start, stop, list, show, and per-variant statistics with confidence intervals.

An experiment serves config versions side by side on live traffic (the resolver assigns each
unit a variant). Statistics come from the rollouts the resolver tagged with the experiment and
variant, aggregated in SQL: rates get Wilson intervals, means get t intervals, p95 gets a
distribution-free order-statistic interval. ``ExperimentStats`` is what promoters judge.

Sequential tests use ``VariantStats.mean_variance``: the variance of a variant's mean with the
randomization unit (user, session or request) as the cluster. A user who sends many requests
contributes correlated outcomes (some users rate everything low), so treating requests as
independent understates the variance and makes a test too confident. The mean is a ratio of
sums over units, Σyᵤ / Σnᵤ, and its delta-method (cluster-robust, CR1) variance is

    V = U / (U − 1) · Σᵤ (yᵤ − m·nᵤ)² / (Σᵤ nᵤ)²

over the U units (Cameron & Miller, "A Practitioner's Guide to Cluster-Robust Inference",
J. Human Resources 2015; Deng, Lu & Litz, "Trustworthy analysis of online A/B tests", WSDM
2017). With one request per unit it is the usual s²/n; it is never taken below that.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from sqlalchemy import case, func
from sqlmodel import select

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.config import ErrorBudget, ExperimentSettings, FlywheelConfig, Objective
from flywheel_middleware.errors import FlywheelError
from flywheel_middleware.loop import error_control
from flywheel_middleware.loop.versions import get_version, lock_workflow, set_active
from flywheel_middleware.store import outcomes
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, Deployment, Experiment, Feedback, Rollout

STATUSES = ("running", "stopped", "promoted", "rejected")
UNITS = ("user_id", "session_id", "request")
BASELINE = "baseline"


class ExperimentError(FlywheelError, ValueError):
    """An experiment that does not exist, or an action its state does not allow."""


# -- intervals ------------------------------------------------------------------------------


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _t_two_sided(t: float, dof: int) -> float:
    """P(|T| < t) for integer dof, by the finite series (Abramowitz & Stegun 26.7.3/4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if dof % 2:  # odd
        term, total = 1.0, 1.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inner = 0.0 if dof == 1 else s * math.cos(theta) * total
        return 2 / math.pi * (theta + inner)
    term, total = 1.0, 1.0
    for k in range(1, dof // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


@functools.lru_cache(maxsize=4096)
def t_value(confidence: float, dof: int) -> float:
    """Student-t quantile for a two-sided interval: exact series + bisection up to 200 dof."""
    if dof <= 0:
        return math.inf
    z = z_value(confidence)
    if dof > 200:
        v = float(dof)
        return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
    lo, hi = z, z * 2 + 10.0
    while _t_two_sided(hi, dof) < confidence:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if _t_two_sided(mid, dof) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class Estimate:
    """A point estimate with a two-sided confidence interval (None when there is no data)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0

    def fmt(self, spec: str = ".3f", scale: float = 1.0) -> str:
        if self.value is None:
            return "–"
        text = format(self.value * scale, spec)
        if self.low is not None and self.high is not None:
            text += f" [{format(self.low * scale, spec)}, {format(self.high * scale, spec)}]"
        return text


def wilson(successes: float, n: int, confidence: float = 0.95) -> Estimate:
    """Wilson score interval: well behaved near 0 and 1 and for small n (unlike Wald)."""
    if n <= 0:
        return Estimate(None, n=0)
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(total: float, total_sq: float, n: int, confidence: float = 0.95) -> Estimate:
    """t interval for a mean from its sum and sum of squares."""
    if n <= 0:
        return Estimate(None, n=0)
    mean = total / n
    if n == 1:
        return Estimate(mean, None, None, 1)
    var = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = t_value(confidence, n - 1) * math.sqrt(var / n)
    return Estimate(mean, mean - half, mean + half, n)


# -- statistics -----------------------------------------------------------------------------

BINARY_METRICS = ("positive_feedback_rate", "success_rate", "error_rate")


def binary_var(n: Any, k: Any) -> Any:
    """Variance of one Bernoulli outcome, smoothed so 0/n or n/n do not give zero variance."""
    p = (k + 0.5) / (n + 1.0)
    return p * (1.0 - p)


@dataclass
class UnitSums:
    """One metric summed per randomization unit: for each unit u, nᵤ observations totalling yᵤ;
    kept as the sums Σnᵤ, Σyᵤ, Σnᵤ², Σyᵤ², Σnᵤyᵤ over the ``units`` with nᵤ > 0."""

    units: int = 0
    n: float = 0.0
    total: float = 0.0
    n_sq: float = 0.0
    total_sq: float = 0.0
    cross: float = 0.0

    @classmethod
    def from_units(cls, counts: Any, totals: Any) -> UnitSums:
        """From each unit's count and total (units with no observation are left out)."""
        pairs = [(float(n), float(y)) for n, y in zip(counts, totals, strict=True) if n > 0]
        return cls(
            units=len(pairs),
            n=sum(n for n, _ in pairs),
            total=sum(y for _, y in pairs),
            n_sq=sum(n * n for n, _ in pairs),
            total_sq=sum(y * y for _, y in pairs),
            cross=sum(n * y for n, y in pairs),
        )

    def variance_of_mean(self) -> float | None:
        """The delta-method (CR1) variance of Σyᵤ / Σnᵤ; None below two units."""
        if self.units < 2 or self.n <= 0:
            return None
        m = self.total / self.n
        spread = self.total_sq - 2.0 * m * self.cross + m * m * self.n_sq
        return max(0.0, spread) * self.units / (self.units - 1) / (self.n * self.n)


@dataclass
class VariantStats:
    """Everything measured for one variant. Sums are kept so tests can be built on them."""

    name: str
    version_id: int | None
    weight: float
    rollouts: int = 0
    succeeded: int = 0
    failed: int = 0
    rated: int = 0
    positive: int = 0
    reward_n: int = 0
    reward_sum: float = 0.0
    reward_sumsq: float = 0.0
    latency_n: int = 0
    latency_sum: float = 0.0
    latency_sumsq: float = 0.0
    tokens_n: int = 0
    tokens_sum: float = 0.0
    tokens_sumsq: float = 0.0
    cost_n: int = 0
    cost_sum: float = 0.0
    cost_sumsq: float = 0.0
    latency_p95: Estimate = field(default_factory=lambda: Estimate(None))
    confidence: float = 0.95
    clusters: dict[str, UnitSums] = field(default_factory=dict)
    """Per-unit sums by metric name (empty: each observation counts as its own unit)."""

    @property
    def positive_feedback_rate(self) -> Estimate:
        """Positive outcomes among rated rollouts (``store.outcomes``), with a Wilson interval."""
        return wilson(self.positive, self.rated, self.confidence)

    @property
    def success_rate(self) -> Estimate:
        return wilson(self.succeeded, self.rollouts, self.confidence)

    @property
    def error_rate(self) -> Estimate:
        return wilson(self.failed, self.rollouts, self.confidence)

    @property
    def mean_reward(self) -> Estimate:
        return mean_interval(self.reward_sum, self.reward_sumsq, self.reward_n, self.confidence)

    @property
    def latency_mean(self) -> Estimate:
        return mean_interval(self.latency_sum, self.latency_sumsq, self.latency_n, self.confidence)

    @property
    def tokens_mean(self) -> Estimate:
        return mean_interval(self.tokens_sum, self.tokens_sumsq, self.tokens_n, self.confidence)

    @property
    def cost_mean(self) -> Estimate:
        return mean_interval(self.cost_sum, self.cost_sumsq, self.cost_n, self.confidence)

    def metric(self, name: str) -> tuple[int, float, float]:
        """(n, mean, variance) of a metric per unit of observation, for sequential tests."""
        if name == "positive_feedback_rate":
            return _binary(self.rated, self.positive)
        if name == "success_rate":
            return _binary(self.rollouts, self.succeeded)
        if name == "error_rate":
            return _binary(self.rollouts, self.failed)
        if name == "mean_reward":
            return _moments(self.reward_n, self.reward_sum, self.reward_sumsq)
        if name == "latency_ms":
            return _moments(self.latency_n, self.latency_sum, self.latency_sumsq)
        if name == "cost":
            return _moments(self.cost_n, self.cost_sum, self.cost_sumsq)
        if name == "tokens":
            return _moments(self.tokens_n, self.tokens_sum, self.tokens_sumsq)
        raise KeyError(f"unknown metric {name!r}")

    def mean_variance(self, name: str) -> tuple[int, float, float]:
        """(n, mean, variance of the mean) of a metric, clustered by randomization unit.

        The variance is the larger of the cluster-robust one (``UnitSums``) and the one that
        treats observations as independent (a rate's smoothed so it is never 0), so a few units
        cannot make the test more confident than independent requests would.
        """
        n, mean, var = self.metric(name)
        if n <= 0:
            return 0, 0.0, 0.0
        independent = binary_var(n, round(mean * n)) / n if name in BINARY_METRICS else var / n
        sums = self.clusters.get(name)
        clustered = sums.variance_of_mean() if sums is not None else None
        return n, mean, max(independent, clustered or 0.0)

    def units(self, name: str = "success_rate") -> int:
        """How many randomization units contributed to a metric (observations if unknown)."""
        sums = self.clusters.get(name)
        return sums.units if sums is not None else self.metric(name)[0]

    def as_dict(self) -> dict[str, Any]:
        def est(e: Estimate) -> dict[str, Any]:
            return {"value": e.value, "low": e.low, "high": e.high, "n": e.n}

        return {
            "name": self.name,
            "version_id": self.version_id,
            "weight": self.weight,
            "rollouts": self.rollouts,
            "rated": self.rated,
            "units": self.units(),
            "rated_units": self.units("positive_feedback_rate"),
            "positive_feedback_rate": est(self.positive_feedback_rate),
            "mean_reward": est(self.mean_reward),
            "success_rate": est(self.success_rate),
            "error_rate": est(self.error_rate),
            "latency_mean_ms": est(self.latency_mean),
            "latency_p95_ms": est(self.latency_p95),
            "tokens_mean": est(self.tokens_mean),
            "cost_mean": est(self.cost_mean),
        }


def _binary(n: int, k: int) -> tuple[int, float, float]:
    if n <= 0:
        return 0, 0.0, 0.0
    p = k / n
    return n, p, p * (1 - p)


def _moments(n: int, total: float, total_sq: float) -> tuple[int, float, float]:
    if n <= 0:
        return 0, 0.0, 0.0
    mean = total / n
    var = max(0.0, (total_sq - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    return n, mean, var


@dataclass
class ExperimentStats:
    """An experiment's per-variant statistics, its objective and minimum sample."""

    experiment_id: int | None
    workflow: str
    status: str
    variants: dict[str, VariantStats]
    baseline: str = BASELINE
    objective: Objective = field(default_factory=Objective)
    min_samples: int = 100
    confidence: float = 0.95
    unit: str = "request"
    error_budget: ErrorBudget | None = None
    """The workflow's false-promotion budget (None: no loop-level control)."""
    allocation: error_control.Allocation | None = None
    """This experiment's share of that budget, fixed when it started."""

    @property
    def baseline_stats(self) -> VariantStats:
        return self.variants[self.baseline]

    @property
    def candidates(self) -> list[VariantStats]:
        return [v for name, v in self.variants.items() if name != self.baseline and v.weight > 0]

    @property
    def started_candidates(self) -> list[str]:
        """The candidates the experiment started with, dropped ones included."""
        if self.allocation is not None:
            return list(self.allocation.candidates)
        return [name for name in self.variants if name != self.baseline]

    def budget(self) -> dict[str, Any] | None:
        """This experiment's part of the workflow's budget (``error_control.describe``)."""
        if self.error_budget is None or self.allocation is None:
            return None
        return error_control.describe(
            self.allocation, self.error_budget.level, self.error_budget.min_alpha
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "workflow": self.workflow,
            "status": self.status,
            "baseline": self.baseline,
            "metric": self.objective.metric,
            "unit": self.unit,
            "error_budget": self.budget(),
            "variants": {k: v.as_dict() for k, v in self.variants.items()},
        }


def _p95_interval(
    store: Store, experiment_id: int, variant: str, n: int, confidence: float
) -> Estimate:
    """p95 and a distribution-free interval from order statistics (binomial ranks), in SQL."""
    if n <= 0:
        return Estimate(None)
    z = z_value(confidence)
    q = 0.95
    rank = min(n - 1, max(0, math.ceil(q * n) - 1))
    spread = z * math.sqrt(n * q * (1 - q))
    low_rank = max(0, math.floor(q * n - spread) - 1)
    high_rank = min(n - 1, math.ceil(q * n + spread))

    def at(offset: int) -> float | None:
        with store.session() as session:
            return session.exec(
                select(Rollout.latency_ms)
                .where(
                    Rollout.experiment_id == experiment_id,
                    Rollout.variant == variant,
                    Rollout.latency_ms.is_not(None),
                )
                .order_by(Rollout.latency_ms)
                .offset(offset)
                .limit(1)
            ).first()

    value = at(rank)
    exact = high_rank < n - 1 or n >= 20
    return Estimate(value, at(low_rank), at(high_rank) if exact else None, n)


def experiment_stats(
    store: Store,
    experiment: Experiment | int,
    config: FlywheelConfig | None = None,
    *,
    confidence: float = 0.95,
) -> ExperimentStats:
    """Per-variant statistics for ``experiment``, aggregated in SQL from tagged rollouts."""
    exp = get_experiment(store, experiment) if isinstance(experiment, int) else experiment
    wf = config.workflows.get(exp.workflow) if config is not None else None
    objective = wf.objective if wf is not None else Objective()
    settings = wf.experiment if wf is not None else ExperimentSettings()
    min_samples = settings.min_samples
    spec = exp.metrics or {}
    if "metric" in spec:
        objective = objective.model_copy(update={"metric": spec["metric"]})
    min_samples = int(spec.get("min_samples", min_samples))
    variants = {
        str(v["name"]): VariantStats(
            name=str(v["name"]),
            version_id=v.get("version_id"),
            weight=float(v.get("weight", 0)),
            confidence=confidence,
        )
        for v in exp.variants or []
    }
    lat = Rollout.latency_ms
    tokens = func.coalesce(
        Rollout.total_tokens,
        func.coalesce(Rollout.input_tokens, 0) + func.coalesce(Rollout.output_tokens, 0),
    )
    has_tokens = (Rollout.total_tokens.is_not(None)) | (Rollout.input_tokens.is_not(None))
    with store.session() as session:
        rows = session.exec(
            select(
                Rollout.variant,
                func.count(),
                func.sum(case((Rollout.status == "succeeded", 1), else_=0)),
                func.sum(case((Rollout.status == "failed", 1), else_=0)),
                func.count(Rollout.reward),
                func.sum(Rollout.reward),
                func.sum(Rollout.reward * Rollout.reward),
                func.count(lat),
                func.sum(lat),
                func.sum(lat * lat),
                func.sum(case((has_tokens, 1), else_=0)),
                func.sum(case((has_tokens, tokens), else_=None)),
                func.sum(case((has_tokens, tokens * tokens), else_=None)),
                func.count(Rollout.cost),
                func.sum(Rollout.cost),
                func.sum(Rollout.cost * Rollout.cost),
            )
            .where(Rollout.experiment_id == exp.id)
            .group_by(Rollout.variant)
        ).all()
        # rated and positive rollouts by the one definition of a positive outcome
        per_rollout = (
            outcomes.rollout_outcomes()
            .join(Rollout, Rollout.id == Feedback.rollout_id)
            .where(Rollout.experiment_id == exp.id)
            .subquery()
        )
        rated = session.exec(
            select(Rollout.variant, func.count(), func.sum(per_rollout.c.positive))
            .join(per_rollout, per_rollout.c.rollout_id == Rollout.id)
            .group_by(Rollout.variant)
        ).all()
        clusters = _unit_sums(session, exp, per_rollout)
        stored = spec.get(error_control.METRICS_KEY) or {}
        allocation = error_control.Allocation.from_json(stored)
        error_budget = settings.error_budget
        if stored.get("budget"):  # the level it started under, whatever the YAML says now
            error_budget = ErrorBudget(**stored["budget"])
        if allocation is None:  # an experiment from before the budget existed
            history = error_control.replay(
                error_control.workflow_experiments(session, exp.workflow)
            )
            allocation = history.get(int(exp.id))
    for row in rows:
        name = row[0]
        v = variants.get(name)
        if v is None:
            continue
        (
            v.rollouts,
            v.succeeded,
            v.failed,
            v.reward_n,
            v.reward_sum,
            v.reward_sumsq,
            v.latency_n,
            v.latency_sum,
            v.latency_sumsq,
            v.tokens_n,
            v.tokens_sum,
            v.tokens_sumsq,
            v.cost_n,
            v.cost_sum,
            v.cost_sumsq,
        ) = (
            int(x or 0) if i in (0, 1, 2, 3, 6, 9, 12) else float(x or 0)
            for i, x in enumerate(row[1:])
        )
    for name, n, positive in rated:
        v = variants.get(name)
        if v is not None:
            v.rated, v.positive = int(n), int(positive or 0)
    for v in variants.values():
        v.latency_p95 = _p95_interval(store, exp.id, v.name, v.latency_n, confidence)
        v.clusters = clusters.get(v.name, {})
    baseline = BASELINE if BASELINE in variants else next(iter(variants), BASELINE)
    return ExperimentStats(
        experiment_id=exp.id,
        workflow=exp.workflow,
        status=exp.status,
        variants=variants,
        baseline=baseline,
        objective=objective,
        min_samples=min_samples,
        confidence=confidence,
        unit=exp.unit or "user_id",
        error_budget=error_budget,
        allocation=allocation,
    )


def _unit_key(unit: str) -> Any:
    """The id a rollout was randomised by, as the runtime picks it (``runtime._unit_of``)."""
    if unit == "request":
        return Rollout.id
    if unit == "session_id":
        return func.coalesce(Rollout.session_id, Rollout.user_id, Rollout.id)
    return func.coalesce(Rollout.user_id, Rollout.session_id, Rollout.id)


def _unit_sums(session: Any, exp: Experiment, rated: Any) -> dict[str, dict[str, UnitSums]]:
    """Per variant and metric, the per-unit sums of ``UnitSums``, in SQL (two group-bys)."""
    key = _unit_key(exp.unit or "user_id").label("unit")
    lat, cost = Rollout.latency_ms, Rollout.cost
    has_tokens = (Rollout.total_tokens.is_not(None)) | (Rollout.input_tokens.is_not(None))
    tokens = func.coalesce(
        Rollout.total_tokens,
        func.coalesce(Rollout.input_tokens, 0) + func.coalesce(Rollout.output_tokens, 0),
    )
    per_rollout = {
        "success_rate": (func.count(), func.sum(case((Rollout.status == "succeeded", 1), else_=0))),
        "error_rate": (func.count(), func.sum(case((Rollout.status == "failed", 1), else_=0))),
        "mean_reward": (func.count(Rollout.reward), func.sum(Rollout.reward)),
        "latency_ms": (func.count(lat), func.sum(lat)),
        "cost": (func.count(cost), func.sum(cost)),
        "tokens": (
            func.sum(case((has_tokens, 1), else_=0)),
            func.sum(case((has_tokens, tokens), else_=None)),
        ),
    }
    queries = [
        (
            per_rollout,
            select(Rollout.variant.label("variant"), key).where(Rollout.experiment_id == exp.id),
        ),
        (
            {"positive_feedback_rate": (func.count(), func.sum(rated.c.positive))},
            select(Rollout.variant.label("variant"), key).join(
                rated, rated.c.rollout_id == Rollout.id
            ),
        ),
    ]
    out: dict[str, dict[str, UnitSums]] = {}
    for metrics, base in queries:
        columns = []
        for name, (n, y) in metrics.items():
            columns += [n.label(f"{name}__n"), func.coalesce(y, 0).label(f"{name}__y")]
        inner = base.add_columns(*columns).group_by(Rollout.variant, key).subquery()
        sums = []
        for name in metrics:
            n, y = inner.c[f"{name}__n"], inner.c[f"{name}__y"]
            sums += [
                func.sum(case((n > 0, 1), else_=0)),
                func.sum(n),
                func.sum(y),
                func.sum(n * n),
                func.sum(y * y),
                func.sum(n * y),
            ]
        for row in session.exec(select(inner.c.variant, *sums).group_by(inner.c.variant)):
            values = [float(x or 0) for x in row[1:]]
            for i, name in enumerate(metrics):
                units, n, y, nn, yy, ny = values[6 * i : 6 * i + 6]
                out.setdefault(row[0], {})[name] = UnitSums(int(units), n, y, nn, yy, ny)
    return out


# -- lifecycle ------------------------------------------------------------------------------


def get_experiment(store: Store, experiment_id: int) -> Experiment:
    with store.session() as session:
        row = session.get(Experiment, int(experiment_id))
    if row is None:
        raise ExperimentError(f"no experiment with id {experiment_id}")
    return row


def list_experiments(
    store: Store, *, workflow: str | None = None, status: str | None = None
) -> list[Experiment]:
    with store.session() as session:
        q = select(Experiment)
        if workflow:
            q = q.where(Experiment.workflow == workflow)
        if status:
            q = q.where(Experiment.status == status)
        return list(session.exec(q.order_by(Experiment.id.desc())).all())


def running_experiment(store: Store, workflow: str) -> Experiment | None:
    found = list_experiments(store, workflow=workflow, status="running")
    return found[0] if found else None


def _event(
    session: Any,
    workflow: str,
    kind: str,
    actor: str,
    reason: str | None,
    evidence: Any = None,
    *,
    from_version: int | None = None,
    to_version: int | None = None,
) -> None:
    session.add(
        ChangeEvent(
            workflow=workflow,
            kind=kind,
            from_version_id=from_version,
            to_version_id=to_version,
            actor=actor,
            reason=reason,
            evidence=evidence,
            created_at=utcnow(),
        )
    )


def start_experiment(
    store: Store,
    workflow: str,
    candidates: list[int],
    *,
    traffic: float = 0.05,
    unit: str = "user_id",
    actor: str = "user",
    reason: str | None = None,
    seed: str | None = None,
    coverage: float = 1.0,
    metric: str | None = None,
    min_samples: int | None = None,
    names: list[str] | None = None,
    error_budget: ErrorBudget | None = None,
) -> Experiment:
    """Serve each candidate version to ``traffic`` of units, the active version to the rest.

    With the workflow's ``error_budget``, an experiment none of whose candidates could be
    promoted (the budget is spent) is refused rather than shown to users.
    """
    if not candidates:
        raise ExperimentError("an experiment needs at least one candidate version")
    if len(set(candidates)) != len(candidates):
        raise ExperimentError(f"candidate version ids repeat: {candidates}")
    if not 0 < traffic * len(candidates) < 1:
        raise ExperimentError(
            f"candidate traffic {traffic} × {len(candidates)} candidates must be between 0 and 1"
        )
    if not 0 < coverage <= 1:
        raise ExperimentError(f"coverage must be in (0, 1], got {coverage}")
    if unit not in UNITS:
        raise ExperimentError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if names is not None and (
        len(names) != len(candidates) or len(set(names)) != len(names) or BASELINE in names
    ):
        raise ExperimentError(
            f"names must be {len(candidates)} distinct names other than {BASELINE!r}, got {names}"
        )
    rows = [get_version(store, version_id) for version_id in candidates]
    for version in rows:
        if version.workflow != workflow:
            raise ExperimentError(
                f"version id {version.id} belongs to workflow {version.workflow!r}, "
                f"not {workflow!r}"
            )
    # The seed makes each experiment's buckets independent of the last one's (the same units
    # are not always the ones in a candidate); from the id it is reproducible.
    spec: dict[str, Any] = {"seed": seed, "coverage": coverage}
    if metric:
        spec["metric"] = metric
    if min_samples:
        spec["min_samples"] = min_samples
    with store.session() as session:
        # under the workflow's lock: two processes cannot both start one
        lock_workflow(session, store, workflow)
        running = session.exec(
            select(Experiment.id).where(
                Experiment.workflow == workflow, Experiment.status == "running"
            )
        ).first()
        if running is not None:
            raise ExperimentError(
                f"workflow {workflow!r} already has a running experiment ({running}); stop it first"
            )
        dep = session.get(Deployment, workflow)
        if dep is None:
            raise ExperimentError(f"workflow {workflow!r} has no active config version")
        base_id = dep.active_version_id
        variants = [{"name": BASELINE, "version_id": base_id, "weight": 1 - traffic * len(rows)}]
        for i, version in enumerate(rows):
            if version.id == base_id:
                raise ExperimentError(f"version id {version.id} is already the active version")
            name = names[i] if names else f"candidate-{i + 1}"
            variants.append({"name": name, "version_id": version.id, "weight": traffic})
        # its share of the workflow's false-promotion budget, fixed now for its whole life
        allocation = error_control.next_allocation(
            session, workflow, [v["name"] for v in variants[1:]]
        )
        if error_budget is not None:
            alpha = error_control.candidate_alpha(allocation, error_budget.level)
            if alpha < error_budget.min_alpha:
                raise ExperimentError(
                    f"workflow {workflow!r} has spent its false-promotion budget: experiment "
                    f"{allocation.index} would test each candidate at α = {alpha:.2g}, below "
                    f"error_budget.min_alpha {error_budget.min_alpha:g}, so none could be promoted"
                )
        spec[error_control.METRICS_KEY] = allocation.to_json()
        if error_budget is not None:  # its level is fixed too; without one, the YAML's applies
            spec[error_control.METRICS_KEY]["budget"] = error_budget.model_dump()
        exp = Experiment(
            workflow=workflow,
            status="running",
            baseline_version_id=base_id,
            variants=variants,
            unit=unit,
            metrics=spec,
            started_at=utcnow(),
        )
        session.add(exp)
        session.flush()
        if not seed:
            exp.metrics = {**spec, "seed": f"{workflow}:{exp.id}"}
            session.add(exp)
        _event(
            session,
            workflow,
            "experiment_start",
            actor,
            reason or f"experiment {exp.id}: {len(candidates)} candidate(s) at {traffic:.0%} each",
            {"experiment_id": exp.id, "variants": variants},
            from_version=base_id,
        )
    return exp


def set_weights(
    store: Store, experiment_id: int, weights: dict[str, float], *, actor: str = "user"
) -> Experiment:
    """Change variant weights (a ramp-up, or 0 to drop a losing candidate)."""
    with store.session() as session:
        exp = session.get(Experiment, int(experiment_id))
        if exp is None:
            raise ExperimentError(f"no experiment with id {experiment_id}")
        names = {v["name"] for v in exp.variants}
        unknown = set(weights) - names
        if unknown:
            raise ExperimentError(
                f"experiment {experiment_id} has no variant(s) {sorted(unknown)}; it has {sorted(names)}"
            )
        variants = [
            {**v, "weight": float(weights.get(v["name"], v["weight"]))} for v in exp.variants
        ]
        if any(v["weight"] < 0 for v in variants) or sum(v["weight"] for v in variants) <= 0:
            raise ExperimentError("weights must be ≥ 0 and not all 0")
        exp.variants = variants
        session.add(exp)
        _event(session, exp.workflow, "experiment_weights", actor, None, {"weights": weights})
    return exp


def stop_experiment(
    store: Store,
    experiment_id: int,
    *,
    status: str = "stopped",
    actor: str = "user",
    reason: str | None = None,
    decision: dict[str, Any] | None = None,
) -> Experiment:
    """End a running experiment (status stopped or rejected); traffic returns to the active version."""
    if status not in ("stopped", "rejected", "promoted"):
        raise ExperimentError(
            f"an experiment ends as stopped, rejected or promoted, not {status!r}"
        )
    with store.session() as session:
        exp = session.get(Experiment, int(experiment_id))
        if exp is None:
            raise ExperimentError(f"no experiment with id {experiment_id}")
        if exp.status != "running":
            raise ExperimentError(f"experiment {experiment_id} is already {exp.status}")
        exp.status = status
        exp.ended_at = utcnow()
        exp.decision = decision or {"action": status, "reason": reason, "actor": actor}
        session.add(exp)
        kind = "reject" if status == "rejected" else "experiment_stop"
        _event(
            session,
            exp.workflow,
            kind,
            actor,
            reason or f"experiment {exp.id} {status}",
            {"experiment_id": exp.id, "decision": exp.decision},
        )
    return exp


def promote(
    store: Store,
    experiment_id: int,
    variant: str,
    *,
    actor: str = "user",
    reason: str | None = None,
    evidence: dict[str, Any] | None = None,
    tested: bool = False,
) -> ChangeEvent:
    """Make ``variant``'s version the active one, end the experiment as promoted, log why.

    ``tested``: the promoters decided it (their test rejected "no better"); only then does
    the experiment pass its error-budget share on to the next one.

    One transaction under the workflow's lock: a person's ``flywheel promote`` and the
    controller cannot both promote, and no process sees the new version active while the
    experiment still runs.
    """
    exp = get_experiment(store, experiment_id)
    chosen = next((v for v in exp.variants if v["name"] == variant), None)
    if chosen is None:
        raise ExperimentError(
            f"experiment {experiment_id} has no variant {variant!r}; "
            f"it has {[v['name'] for v in exp.variants]}"
        )
    if variant == BASELINE:
        raise ExperimentError("the baseline is already active; stop the experiment instead")
    evidence = {"experiment_id": exp.id, "variant": variant, **(evidence or {})}
    reason = reason or f"promoted {variant} of experiment {exp.id}"
    with store.session() as session:
        lock_workflow(session, store, exp.workflow)
        row = session.get(Experiment, exp.id)
        if row.status != "running":
            raise ExperimentError(f"experiment {experiment_id} is already {row.status}")
        row.status = "promoted"
        row.ended_at = utcnow()
        row.decision = {
            "action": "promote",
            "variant": variant,
            "reason": reason,
            "tested": tested,
            **evidence,
        }
        session.add(row)
        session.flush()  # no longer running: the deployment change below does not stop it
        event = set_active(
            session,
            row.workflow,
            int(chosen["version_id"]),
            kind="promote",
            actor=actor,
            reason=reason,
            evidence=evidence,
        )
        _event(
            session,
            row.workflow,
            "experiment_stop",
            actor,
            reason,
            {"experiment_id": row.id, "decision": row.decision},
        )
    return event


def force_units(
    store: Store, experiment_id: int, variant: str, units: list[str], *, actor: str = "user"
) -> Experiment:
    """Serve ``variant`` to these unit ids in every process, for QA (empty list clears).

    Forced requests are not counted in the experiment's statistics; a unit is forced to one
    variant at most (forcing it again moves it).
    """
    with store.session() as session:
        exp = session.get(Experiment, int(experiment_id))
        if exp is None:
            raise ExperimentError(f"no experiment with id {experiment_id}")
        names = [v["name"] for v in exp.variants]
        if variant not in names:
            raise ExperimentError(
                f"experiment {experiment_id} has no variant {variant!r}; it has {names}"
            )
        if exp.status != "running":
            raise ExperimentError(f"experiment {experiment_id} is {exp.status}, not running")
        wanted = [str(u) for u in dict.fromkeys(units)]
        variants = []
        for v in exp.variants:
            others = [u for u in (v.get("force") or []) if u not in wanted]
            force = wanted if v["name"] == variant else others
            variants.append({**{k: x for k, x in v.items() if k != "force"}, "force": force})
        exp.variants = variants
        session.add(exp)
        _event(
            session,
            exp.workflow,
            "experiment_force",
            actor,
            f"{len(wanted)} unit(s) forced to {variant}",
            {"experiment_id": exp.id, "variant": variant, "units": wanted},
        )
    return exp
