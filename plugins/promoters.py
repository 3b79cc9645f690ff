"""Built-in promoters: ``sequential`` (anytime-valid) and ``threshold`` (the seeds' rule).

``sequential`` has two boundaries, both valid however often the promoter is checked.

``boundary: horizon`` (the default) — a time-uniform test over a planned information horizon.
With Δ̂ and V as below and information I = 1/V, the score S = Δ̂·I behaves as a Brownian motion
θ·I + W(I) (the usual normal approximation of group-sequential designs; Lan & DeMets,
Biometrika 1983; Jennison & Turnbull, "Group Sequential Methods", 2000, ch. 7). By the
reflection principle, P(max_{I ≤ I_max} W(I) ≥ c·√I_max) = 2(1 − Φ(c)), so with
c = Φ⁻¹(1 − α/2), promoting at the first look where S ≥ c·√I_max keeps false promotions ≤ α
for any number and timing of looks up to I_max — continuous monitoring included (the limit of
O'Brien–Fleming spending). The horizon is planned from the effect worth finding:
I_max = ((c + z_power) / min_effect)², which is the information a fixed-horizon two-sided
level-α test needs for that power, so at the horizon the test is that fixed test (promote iff
z ≥ c) and early crossings only add power. A look at or past the horizon is the last: a
candidate not promoted there is rejected as futile (the boundary there is z ≥ c, so a late
look is judged as the fixed test at its own information). Strictly, the ≤ α bound covers the
looks up to I_max; that one late look can add the chance of a path that stayed below c·√I_max
and ends above c·√I at the later I. Under continuous monitoring up to I_max this excess is
+0.2 points for a last look 5% past the horizon and +0.7 points at 20% past it; with looks a
cycle apart the gaps between looks more than absorb it (the benchmark measures 3.1–4.2%
A/A false promotions for 10 to 1,000 samples per arm per cycle). The matching anytime bounds
are Δ̂ ± c·√max(I, I_max) / I. This spends the whole α on the promotion side and stops at a known
sample, which is why it reaches the power of a fixed-horizon test within its N where the
open-ended mixture below cannot (benchmarks/flywheel_efficacy.py prints both).

``boundary: mixture`` — open-ended: a one-sided mixture sequential probability ratio test (mSPRT; Johari,
Koomen, Pekelis & Walsh, "Always Valid Inference", Operations Research 2022 / arXiv 2015;
the normal-mixture boundary of Robbins 1970 and Howard, Ramdas, McAuliffe & Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021).

For the objective metric, let Δ̂ = mean_candidate − mean_baseline with variance
V = V_c + V_b, so Δ̂ ≈ N(θ, V). Each V is the variance of a variant's mean clustered by the
experiment's randomization unit (``VariantStats.mean_variance``: the delta-method variance of a
ratio of per-unit sums), so a user who sends many requests counts as one correlated cluster,
not as many independent observations; with one request per unit it is s²/n. With a
half-normal mixing prior of scale τ on θ > 0, the likelihood ratio against H0: θ ≤ 0
integrates in closed form to

    Λ⁺ = 2 · sqrt(V / (V + τ²)) · exp(Δ̂² τ² / (2 V (V + τ²))) · Φ(Δ̂ τ / sqrt(V (V + τ²))).

Under H0, Λ⁺ is a non-negative (super)martingale with mean ≤ 1, so by Ville's inequality
P(∃ n: Λ⁺_n ≥ 1/α) ≤ α: checking after every cycle, forever, keeps false promotions ≤ α
(Bonferroni-split over candidates). The same statistic with Δ̂ → −Δ̂ rejects a candidate that
is significantly worse; guardrails (latency ratio, error-rate increase, cost ratio) must hold
at the point estimate to promote, and a guardrail breached beyond doubt (the same test on
cand − ratio·base) rejects. Evidence carries the anytime-valid bounds that invert the two
one-sided tests (each at level α, so promote ⇔ lower bound > 0, reject ⇔ upper bound < 0);
``cs_radius`` gives the symmetric normal-mixture confidence sequence
Δ̂ ± sqrt(2V(V+τ²)/τ² · (ln(1/α) + ½ ln((V+τ²)/V))) for reference. Nothing is decided
before ``min_samples`` per arm; at ``max_samples`` an undecided candidate is rejected (futility),
and so is one that is better but still breaks a guardrail at its point estimate (also at the
horizon), so every experiment ends.
Both boundaries share the guardrails above (their hard breaches use the mixture test, which
holds without a horizon) and the Bonferroni split of α over candidates.

α is fixed when the experiment starts. It is split over the candidates the experiment
*started* with (kept with the experiment), so dropping a rejected loser never raises the
survivor's level, lowers its boundary or moves its horizon. And it is the experiment's share of
its workflow's false-promotion budget (``experiment.error_budget`` in YAML), spent over
successive experiments by the online fallback procedure (Tian & Ramdas, "Online control of the
familywise error rate", Statistical Methods in Medical Research 2021): experiment j gets
level · (1/(j(j+1)) + c_j), c_j the share of the candidate the previous experiment promoted,
so that P(any false promotion over the workflow's whole life) ≤ level under any dependence
between experiments (``flywheel_middleware.loop.error_control`` gives the argument). The
``alpha`` parameter caps what one experiment may use; with ``error_budget: null`` each
experiment gets ``alpha`` afresh (per-experiment control only). A candidate whose level falls
below ``error_budget.min_alpha`` is not promoted: the budget is spent.

``threshold`` — seed 001's ``should_promote`` as written: promote when the candidate's
positive-feedback rate ≥ baseline + 2 points and its mean latency ≤ 1.2 × baseline. It is a
point-estimate rule with no error control, kept so teams can compare (see
benchmarks/flywheel_efficacy.py for what repeated checking does to it).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel_middleware.plugin_system.base import Decision, Promoter
from flywheel_middleware.plugin_system.hookspecs import hookimpl

_LOG2 = math.log(2.0)
_TINY = 1e-300


def _log_phi(z: float) -> float:
    return math.log(max(0.5 * math.erfc(-z / math.sqrt(2.0)), _TINY))


def log_mixture_lr(diff: Any, var: Any, tau: float, xp: Any = math, log_phi: Any = None) -> Any:
    """ln Λ⁺ of the one-sided normal-mixture SPRT (see the module docstring).

    Works on floats (``xp=math``) or numpy arrays (``xp=numpy``, ``log_phi=scipy.special.log_ndtr``),
    so the benchmark runs exactly this formula vectorised.
    """
    log_phi = log_phi or _log_phi
    tau2 = tau * tau
    total = var + tau2
    return (
        _LOG2
        + 0.5 * xp.log(var / total)
        + diff * diff * tau2 / (2.0 * var * total)
        + log_phi(diff * tau / xp.sqrt(var * total))
    )


def cs_radius(var: Any, tau: float, alpha: float, xp: Any = math) -> Any:
    """Half-width of the two-sided (1−α) normal-mixture confidence sequence for θ."""
    tau2 = tau * tau
    total = var + tau2
    return xp.sqrt(2.0 * var * total / tau2 * (math.log(1.0 / alpha) + 0.5 * xp.log(total / var)))


def lower_bound(diff: float, var: float, tau: float, alpha: float) -> float:
    """The anytime-valid (1−α) lower confidence bound for θ that matches the test exactly.

    The smallest θ0 not rejected by the one-sided mixture SPRT of H0: θ ≤ θ0, so the
    candidate is promoted exactly when this bound is above 0. Found by bisection (ln Λ⁺ of
    Δ̂ − θ0 decreases in θ0).
    """
    threshold = math.log(1.0 / alpha)
    sd = math.sqrt(var)
    lo, hi = diff - 50.0 * sd - 10.0 * tau, diff
    if log_mixture_lr(diff - lo, var, tau) < threshold:
        return lo
    for _ in range(50):  # the bracket shrinks 2^50-fold: far below any reported digit
        mid = (lo + hi) / 2
        if log_mixture_lr(diff - mid, var, tau) >= threshold:
            lo = mid
        else:
            hi = mid
    return lo


def horizon_critical_value(alpha: float) -> float:
    """c with P(max of a standard Brownian motion on [0, 1] ≥ c) = 2(1 − Φ(c)) = α."""
    return _normal_quantile(1.0 - alpha / 2.0)


def planned_information(alpha: float, power: float, min_effect: float) -> float:
    """I_max: the information at which the horizon test has ``power`` against ``min_effect``."""
    z = horizon_critical_value(alpha) + _normal_quantile(power)
    return (z / min_effect) ** 2


def horizon_radius(var: Any, alpha: float, info_max: float, xp: Any = math) -> Any:
    """Half-width c·√max(I, I_max)/I of the horizon test's bounds at information I = 1/var.

    Promote ⇔ Δ̂ > radius; reject as worse ⇔ Δ̂ < −radius. ``xp=numpy`` vectorises it.
    """
    info = 1.0 / var
    ceiling = max(info, info_max) if xp is math else xp.maximum(info, info_max)
    return horizon_critical_value(alpha) * xp.sqrt(ceiling) / info


def _normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


class SequentialParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    boundary: Literal["horizon", "mixture"] = Field(
        "horizon",
        description="horizon: time-uniform up to a planned horizon, then stop (power of a "
        "fixed-horizon test); mixture: open-ended mSPRT, valid forever",
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="false-promotion bound of one experiment (all looks); the workflow's "
        "error_budget may give it less",
    )
    power: float = Field(
        0.8, gt=0.5, lt=1, description="horizon: the power planned against min_effect"
    )
    tau: float | None = Field(
        None, gt=0, description="mixture scale; default: min_effect (the effect worth finding)"
    )
    min_effect: float = Field(
        0.05,
        gt=0,
        description="the improvement the test is planned (horizon) or tuned (mixture) for",
    )
    metric: Literal["positive_feedback_rate", "mean_reward", "success_rate"] | None = Field(
        None, description="default: the workflow's objective.metric"
    )
    min_samples: int | None = Field(None, ge=1, description="default: experiment.min_samples")
    max_samples: int = Field(20_000, ge=1, description="reject as futile when reached per arm")


class SequentialPromoter(Promoter):
    """Sequential test valid under repeated looks, with guardrails: promote / reject / continue."""

    type_name = "sequential"
    description = (
        "Sequential test valid however often it is checked: a time-uniform boundary up to a "
        "planned horizon (default) or an open-ended mixture SPRT; with guardrails"
    )
    Params = SequentialParams

    def decide(self, stats: Any) -> Decision:
        p: SequentialParams = self.params
        metric = p.metric or stats.objective.metric
        guard = stats.objective.guardrails
        min_n = p.min_samples or stats.min_samples
        tau = p.tau or p.min_effect
        base = stats.baseline_stats
        candidates = stats.candidates
        if not candidates:
            return Decision("continue", reason="no candidate with traffic")
        # Bonferroni over the candidates it started with, within its share of the budget
        alpha = p.alpha / max(1, len(stats.started_candidates))
        budget = stats.budget()
        if budget is not None:
            alpha = min(alpha, budget["alpha_per_candidate"])
            if budget["spent"]:
                reason = (
                    f"the workflow's false-promotion budget is spent: α = {alpha:.2g} per "
                    f"candidate is below min_alpha {budget['min_alpha']:g}"
                )
                verdicts = {c.name: {"action": "reject", "reason": reason} for c in candidates}
                evidence = {"promoter": self.type_name, "alpha": alpha, "budget": budget}
                return Decision("reject", None, reason, {**evidence, "candidates": verdicts})
        n_b, m_b, v_b = base.mean_variance(metric)
        verdicts: dict[str, dict[str, Any]] = {}
        winners: list[tuple[float, str]] = []
        for cand in candidates:
            n_c, m_c, v_c = cand.mean_variance(metric)
            info: dict[str, Any] = {"metric": metric, "n": [n_b, n_c], "means": [m_b, m_c]}
            info["units"] = [base.units(metric), cand.units(metric)]
            verdicts[cand.name] = info
            if min(n_b, n_c) < min_n:
                info.update(action="continue", reason=f"{min(n_b, n_c)} of {min_n} samples")
                continue
            var = max(v_b + v_c, 1e-12)
            diff = m_c - m_b
            if p.boundary == "horizon":
                better, worse, low, high, shown, at_horizon = _horizon_test(
                    diff, var, alpha, planned_information(alpha, p.power, p.min_effect), info
                )
            else:
                better, worse, low, high, shown = _mixture_test(diff, var, tau, alpha, info)
                at_horizon = False
            info.update(diff=diff, confidence_sequence=[low, high], alpha=alpha)
            breaches, hard = _guardrails(base, cand, guard, alpha, tau)
            info["guardrails"] = breaches
            if hard:
                info.update(action="reject", reason=f"guardrail breached: {'; '.join(hard)}")
            elif worse:
                info.update(action="reject", reason=f"{metric} is worse by {-diff:.3f} ({shown})")
            elif better:
                soft = [b["reason"] for b in breaches]
                if soft and (at_horizon or min(n_b, n_c) >= p.max_samples):
                    # the last look: a gain that still breaks a guardrail is not shipped
                    where = "the planned horizon" if at_horizon else f"{p.max_samples} samples"
                    info.update(
                        action="reject",
                        reason=f"better, but at {where}: " + "; ".join(soft),
                    )
                elif soft:
                    info.update(action="continue", reason="better, but " + "; ".join(soft))
                else:
                    info.update(
                        action="promote",
                        reason=(
                            f"{metric} +{diff:.3f} (anytime-valid bounds [{low:.3f}, {high:.3f}], "
                            f"{shown})"
                        ),
                    )
                    winners.append((low, cand.name))
            elif at_horizon:
                info.update(
                    action="reject",
                    reason=f"no significant gain at the planned horizon ({shown})",
                )
            elif min(n_b, n_c) >= p.max_samples:
                info.update(
                    action="reject", reason=f"no significant gain after {p.max_samples} samples"
                )
            else:
                info.update(action="continue", reason="not yet conclusive")
        evidence = {
            "promoter": self.type_name,
            "alpha": alpha,
            "budget": budget,
            "candidates": verdicts,
        }
        if winners:
            _, best = max(winners)
            return Decision("promote", best, verdicts[best]["reason"], evidence)
        if all(v.get("action") == "reject" for v in verdicts.values()):
            reasons = "; ".join(f"{k}: {v['reason']}" for k, v in verdicts.items())
            return Decision("reject", None, reasons, evidence)
        pending = [
            f"{k} ({v['reason']})" for k, v in verdicts.items() if v.get("action") == "continue"
        ]
        return Decision("continue", None, f"waiting on {'; '.join(pending)}", evidence)


def _horizon_test(
    diff: float, var: float, alpha: float, info_max: float, evidence: dict[str, Any]
) -> tuple[bool, bool, float, float, str, bool]:
    """(better, worse, low, high, shown, at or past the horizon) of the horizon boundary."""
    radius = horizon_radius(var, alpha, info_max)
    fraction = 1.0 / (var * info_max)
    z = diff / math.sqrt(var)
    z_boundary = radius / math.sqrt(var)
    evidence.update(boundary="horizon", z=z, z_boundary=z_boundary, information_fraction=fraction)
    shown = f"z = {z:.2f} vs ±{z_boundary:.2f} at {min(fraction, 9.99):.0%} of the horizon"
    return diff > radius, diff < -radius, diff - radius, diff + radius, shown, fraction >= 1.0


def _mixture_test(
    diff: float, var: float, tau: float, alpha: float, evidence: dict[str, Any]
) -> tuple[bool, bool, float, float, str]:
    """(better, worse, low, high, shown) of the open-ended mixture SPRT."""
    threshold = math.log(1.0 / alpha)
    llr_up = log_mixture_lr(diff, var, tau)
    llr_down = log_mixture_lr(-diff, var, tau)
    low, high = lower_bound(diff, var, tau, alpha), -lower_bound(-diff, var, tau, alpha)
    evidence.update(
        boundary="mixture",
        log_lr_better=llr_up,
        log_lr_worse=llr_down,
        log_threshold=threshold,
        tau=tau,
    )
    llr = max(llr_up, llr_down)
    shown = f"ln Λ = {llr:.2f} {'≥' if llr >= threshold else '<'} {threshold:.2f}"
    return llr_up >= threshold, llr_down >= threshold, low, high, shown


def _guardrails(
    base: Any, cand: Any, guard: Any, alpha: float, tau_rel: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """(soft breaches at the point estimate, hard breaches beyond doubt)."""
    soft: list[dict[str, Any]] = []
    hard: list[str] = []
    threshold = math.log(1.0 / alpha)
    checks: list[tuple[str, str, float, bool]] = [
        ("latency", "latency_ms", guard.latency_ratio_max, True)
    ]
    if guard.cost_ratio_max is not None:
        checks.append(("cost", "cost", guard.cost_ratio_max, True))
    checks.append(("error rate", "error_rate", guard.error_rate_max_increase, False))
    for label, metric, limit, ratio in checks:
        n_b, m_b, v_b = base.mean_variance(metric)
        n_c, m_c, v_c = cand.mean_variance(metric)
        if n_b < 2 or n_c < 2:
            continue
        if ratio:
            if m_b <= 0:
                continue
            excess = m_c - limit * m_b  # > 0 means breached
            var = v_c + limit * limit * v_b
            scale = max(m_b, 1e-9) * tau_rel
            shown = f"{label} {m_c / m_b:.2f}× baseline (max {limit:g}×)"
        else:
            excess = m_c - m_b - limit
            var = v_c + v_b
            scale = max(limit, 0.01)
            shown = f"{label} {m_c - m_b:+.3f} vs baseline (max +{limit:g})"
        if excess <= 0:
            continue
        soft.append({"guardrail": label, "reason": shown})
        if var > 0 and log_mixture_lr(excess, var, scale) >= threshold:
            hard.append(shown)
    return soft, hard


class ThresholdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_quality_improve: float = Field(0.02, description="at least +2 points of the metric")
    max_latency_increase_ratio: float = Field(1.2, gt=0, description="at most 1.2× the latency")
    min_samples: int | None = Field(None, ge=1, description="default: experiment.min_samples")
    max_samples: int = Field(20_000, ge=1, description="reject when reached without a promotion")


def should_promote(
    candidate_metrics: dict[str, float],
    baseline_metrics: dict[str, float],
    max_latency_increase_ratio: float = 1.2,
    min_quality_improve: float = 0.02,
) -> bool:
    """Seed 001's rule, as written."""
    if (
        candidate_metrics["positive_feedback_rate"]
        < baseline_metrics["positive_feedback_rate"] + min_quality_improve
    ):
        return False
    return not (
        candidate_metrics["avg_latency_ms"]
        > baseline_metrics["avg_latency_ms"] * max_latency_increase_ratio
    )


class ThresholdPromoter(Promoter):
    """Seed 001's should_promote: +2 points of positive feedback, latency ≤ 1.2×."""

    type_name = "threshold"
    description = "fixed rule: +2 points of quality, latency ≤ 1.2×; no error control"
    Params = ThresholdParams

    def decide(self, stats: Any) -> Decision:
        p: ThresholdParams = self.params
        min_n = p.min_samples or stats.min_samples
        base = stats.baseline_stats
        verdicts: dict[str, dict[str, Any]] = {}
        winners: list[tuple[float, str]] = []
        base_m = _seed_metrics(base)
        for cand in stats.candidates:
            cand_m = _seed_metrics(cand)
            info: dict[str, Any] = {"baseline": base_m, "candidate": cand_m}
            verdicts[cand.name] = info
            n = min(base.rated, cand.rated)
            if n < min_n:
                info.update(action="continue", reason=f"{n} of {min_n} rated samples")
            elif should_promote(
                cand_m, base_m, p.max_latency_increase_ratio, p.min_quality_improve
            ):
                gain = cand_m["positive_feedback_rate"] - base_m["positive_feedback_rate"]
                info.update(
                    action="promote",
                    reason=f"positive feedback {gain:+.3f}, latency within {p.max_latency_increase_ratio:g}×",
                )
                winners.append((gain, cand.name))
            elif n >= p.max_samples:
                info.update(action="reject", reason=f"no promotion after {p.max_samples} samples")
            else:
                info.update(action="continue", reason="rule not met yet")
        evidence = {"promoter": self.type_name, "candidates": verdicts}
        if winners:
            _, best = max(winners)
            return Decision("promote", best, verdicts[best]["reason"], evidence)
        if verdicts and all(v["action"] == "reject" for v in verdicts.values()):
            return Decision("reject", None, "no candidate met the rule", evidence)
        return Decision("continue", None, "rule not met yet", evidence)


def _seed_metrics(v: Any) -> dict[str, float]:
    rate = v.positive / v.rated if v.rated else 0.0
    latency = v.latency_sum / v.latency_n if v.latency_n else 0.0
    success = v.succeeded / v.rollouts if v.rollouts else 0.0
    return {"positive_feedback_rate": rate, "avg_latency_ms": latency, "success_rate": success}


@hookimpl
def register_promoters() -> list[type]:
    return [SequentialPromoter, ThresholdPromoter]
