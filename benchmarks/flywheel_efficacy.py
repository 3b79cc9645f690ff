"""How often each promoter ships a config that is not better, and how fast it finds one that is.

Thousands of simulated experiments with known truth: each cycle adds ``--batch`` rated
answers per arm (baseline positive-feedback rate ``--p0``), and the promoter is checked after
every cycle, as the controller does, until it decides or ``--max-samples`` per arm is reached.

Side by side:
  seq/horizon       the built-in ``sequential`` promoter with its default boundary: time-uniform
                    up to the planned horizon, then stop (plugins/promoters.py)
  seq/mixture       the same promoter with ``boundary: mixture``, the open-ended mixture SPRT
                    (both are exactly the plugin's formulas, vectorised; a sample of experiments
                    is re-run through the real ``SequentialPromoter.decide`` to check they agree)
  threshold/cycle   seed 001's should_promote (+2 points), checked after every cycle
  threshold/once    the same rule looked at once, at the fixed horizon (what the seed intended)
  z-test/once       a fixed-horizon two-sided z-test at α=0.05 sized for 80% power (reference)

Scenarios: A/A (candidate = baseline), slightly worse (−2 points), better (+5 points).
The fixed horizon N is the per-arm sample a two-sided α=0.05, 80%-power z-test needs for +5;
looks come every ``--batch`` answers, so "within N" means by the first look at or past N —
the look at which the fixed-horizon z-test in the last column is evaluated too.

Then whole workflow lives (``--part lives``): ``--lives`` lives of ``--cycles`` cycles each, run
as the controller runs them in ``auto`` mode and checked every cycle. A population of users with
different baseline rates (logit-normal around ``--p0``, spread ``--user-spread``) and different
activity (a few heavy users send most requests) rates answers; the experiment randomises by user.
The mutator's space holds ``--space`` configs proposed ``max_candidates`` = 2 at a time, each at
25% of the users; a dropped loser's users go back to the baseline, as with the resolver; after an
experiment ends the next starts a cycle later (the controller's generate step skips a workflow
whose deployment changed). A/A: every config rates as the first; +5 pts: one config, at a random
place in the proposal order, is 5 points better on average over users, the rest as the first.
A false promotion is promoting a config that is not better than the one it replaces. Each life
is run by the loop as built (the ``sequential`` promoter with the workflow's error budget and
variances clustered by user), by the same promoter without the budget, by it without the budget
and with per-request variances and α recounted over the candidates still running (the loop before
loop-level control), and by seed 001's threshold rule checked every cycle.

    python benchmarks/flywheel_efficacy.py [--part experiments|lives|all] [--experiments 10000]
        [--batch 100] [--lives 200] [--cycles 60]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit, log_ndtr
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel_middleware.plugins.promoters import (
    SequentialPromoter,
    ThresholdPromoter,
    horizon_radius,
    log_mixture_lr,
    planned_information,
)

from flywheel_middleware.config import ErrorBudget, Objective  # noqa: E402
from flywheel_middleware.loop import error_control  # noqa: E402
from flywheel_middleware.loop.experiments import (  # noqa: E402
    ExperimentStats,
    UnitSums,
    VariantStats,
    binary_var,
)

SCENARIOS = [
    ("A/A (no difference)", 0.0),
    ("slightly worse (−2 pts)", -0.02),
    ("better (+5 pts)", 0.05),
]


def fixed_horizon_n(p0: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
    p1 = p0 + delta
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return math.ceil(z * z * (p0 * (1 - p0) + p1 * (1 - p1)) / delta**2)


def simulate(rng, experiments: int, cycles: int, batch: int, p0: float, delta: float):
    """Cumulative positives per arm after each cycle: arrays (experiments, cycles)."""
    kb = rng.binomial(batch, p0, size=(experiments, cycles)).cumsum(axis=1)
    kc = rng.binomial(batch, p0 + delta, size=(experiments, cycles)).cumsum(axis=1)
    n = batch * np.arange(1, cycles + 1)
    return n, kb, kc


def first_true(mask: np.ndarray) -> np.ndarray:
    """Index of the first True per row, or -1."""
    any_ = mask.any(axis=1)
    return np.where(any_, mask.argmax(axis=1), -1)


def sequential_decisions(n, kb, kc, *, boundary, alpha, tau, min_samples, max_samples, power=0.8):
    """(action per experiment: +1 promote, −1 reject, 0 none; samples per arm at the decision)."""
    var = binary_var(n, kb) / n + binary_var(n, kc) / n
    diff = kc / n - kb / n
    futile = n >= max_samples
    if boundary == "horizon":
        info_max = planned_information(alpha, power, tau)
        radius = horizon_radius(var, alpha, info_max, xp=np)
        up, down = diff > radius, diff < -radius
        futile = futile | (var * info_max <= 1.0)
    else:
        thr = math.log(1 / alpha)
        up = log_mixture_lr(diff, var, tau, xp=np, log_phi=log_ndtr) >= thr
        down = log_mixture_lr(-diff, var, tau, xp=np, log_phi=log_ndtr) >= thr
    ok = n >= min_samples
    promote, reject = up & ok, (down & ok) | (futile & ~up)
    return _resolve(promote, reject, n)


def threshold_every_cycle(n, kb, kc, *, min_samples, max_samples, improve=0.02):
    promote = (kc / n >= kb / n + improve) & (n >= min_samples)
    reject = (n >= max_samples) & ~promote
    return _resolve(promote, reject, n)


def _resolve(promote, reject, n):
    fp, fr = first_true(promote), first_true(reject)
    big = promote.shape[1] + 1
    fp_ = np.where(fp < 0, big, fp)
    fr_ = np.where(fr < 0, big, fr)
    action = np.where((fp_ < big) & (fp_ <= fr_), 1, np.where(fr_ < big, -1, 0))
    at = np.minimum(fp_, fr_)
    samples = np.where(at < big, n[np.minimum(at, len(n) - 1)], n[-1])
    return action, samples, fp_


def once_at(n, kb, kc, horizon, rule):
    idx = int(np.searchsorted(n, horizon))
    idx = min(idx, len(n) - 1)
    nb = n[idx]
    pb, pc = kb[:, idx] / nb, kc[:, idx] / nb
    if rule == "threshold":
        return pc >= pb + 0.02, nb
    pooled = (kb[:, idx] + kc[:, idx]) / (2 * nb)
    se = np.sqrt(2 * pooled * (1 - pooled) / nb)
    return (pc - pb) / np.maximum(se, 1e-12) > norm.ppf(0.975), nb


def check_against_plugin(n, kb, kc, params, count):
    """Re-run ``count`` experiments through the real promoter; return mismatching decisions."""
    promoter = SequentialPromoter(SequentialPromoter.Params(**params))
    vec_action, _, _ = sequential_decisions(
        n,
        kb[:count],
        kc[:count],
        boundary=params["boundary"],
        alpha=params["alpha"],
        tau=params["min_effect"],
        min_samples=params["min_samples"],
        max_samples=params["max_samples"],
    )
    mismatches = 0
    for e in range(count):
        action = 0
        for t, nt in enumerate(n):
            arms = {
                name: VariantStats(
                    name,
                    i + 1,
                    0.5,
                    rollouts=int(nt),
                    succeeded=int(nt),
                    rated=int(nt),
                    positive=int(k[e, t]),
                )
                for i, (name, k) in enumerate((("baseline", kb), ("candidate-1", kc)))
            }
            stats = ExperimentStats(
                e, "sim", "running", arms, objective=Objective(), min_samples=params["min_samples"]
            )
            d = promoter.decide(stats)
            if d.action != "continue":
                action = 1 if d.action == "promote" else -1
                break
        mismatches += action != vec_action[e]
    return mismatches


BOUNDARY_NAMES = {"horizon": "seq/horizon", "mixture": "seq/mixture"}


# -- whole workflow lives -------------------------------------------------------------------

LIFE_METHODS = {
    "loop (budget, by user)": {"budget": True, "clustered": True, "started_split": True},
    "per-experiment α, by user": {"budget": False, "clustered": True, "started_split": True},
    "before (per request)": {"budget": False, "clustered": False, "started_split": False},
    "seed threshold rule": {"threshold": True},
}
ARMS = ("baseline", "candidate-1", "candidate-2")
WEIGHTS = (0.5, 0.25, 0.25)


@dataclass
class Population:
    """Users with their own baseline logit and their own activity (rated answers per cycle)."""

    logit: np.ndarray
    activity: np.ndarray

    @classmethod
    def draw(cls, rng, users: int, p0: float, spread: float, per_cycle: float) -> Population:
        logit = math.log(p0 / (1 - p0)) + spread * rng.standard_normal(users)
        activity = rng.gamma(0.5, 2.0 * per_cycle / users, size=users)  # mean per_cycle/users
        return cls(logit, activity)

    def shift_for(self, effect: float) -> float:
        """The logit shift that raises the population's mean rate by ``effect``."""
        base = float(np.mean(expit(self.logit)))
        lo, hi = -5.0, 5.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if float(np.mean(expit(self.logit + mid))) - base < effect:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2


def _arm_stats(name: str, counts: np.ndarray, positives: np.ndarray, clustered: bool):
    n, k = int(counts.sum()), int(positives.sum())
    v = VariantStats(name, None, 0.0, rollouts=n, succeeded=n, rated=n, positive=k)
    if clustered:
        v.clusters["positive_feedback_rate"] = UnitSums(
            int((counts > 0).sum()),
            float(n),
            float(k),
            float((counts * counts).sum()),
            float((positives * positives).sum()),
            float((counts * positives).sum()),
        )
    return v


def simulate_life(rng, method: dict, promoter, pop: Population, effects: list[float], cycles):
    """One life in ``auto`` mode: (false promotions, cycle the best config was promoted or None,
    experiments started)."""
    shifts = {e: pop.shift_for(e) for e in set(effects)}
    best = max(effects)
    queue = list(rng.permutation(len(effects)))
    active = queue.pop(0)  # the config serving at the start
    previous: error_control.Allocation | None = None
    previous_status: str | None = None
    running: dict | None = None
    false_promotions, found, started = 0, None, 0
    users = len(pop.logit)
    for cycle in range(1, cycles + 1):
        if running is not None and running["since"] < cycle:  # traffic since the last cycle
            sent = rng.poisson(pop.activity)
            for i, config in enumerate(running["configs"]):
                members = running["arm"] == i
                n = sent * members
                p = expit(pop.logit + shifts[effects[config]])
                running["counts"][i] += n
                running["positives"][i] += rng.binomial(n, p)
        changed = False
        if running is not None and running["since"] < cycle:
            decision = _judge(method, promoter, running)
            if decision.action == "promote":
                config = running["configs"][ARMS.index(decision.variant)]
                false_promotions += effects[config] <= effects[active]
                if found is None and effects[config] == best > effects[active]:
                    found = cycle
                active, changed = config, True
            elif decision.action == "reject":
                changed = True
            else:
                for name, info in (decision.evidence.get("candidates") or {}).items():
                    if info.get("action") == "reject" and running["weights"][name] > 0:
                        i = ARMS.index(name)
                        running["weights"][name] = 0.0
                        running["arm"][running["arm"] == i] = 0  # back to the baseline
            if changed:
                previous = running["allocation"]
                previous_status = "promoted" if decision.action == "promote" else "rejected"
                running = None
        if running is None and not changed and queue:
            configs = [active] + [queue.pop(0) for _ in range(min(2, len(queue)))]
            names = list(ARMS[1 : len(configs)])
            bucket = rng.random(users)
            arm = np.zeros(users, dtype=int)
            edge = WEIGHTS[0]
            for i in range(1, len(configs)):
                arm[(bucket >= edge) & (bucket < edge + WEIGHTS[i])] = i
                edge += WEIGHTS[i]
            running = {
                "configs": configs,
                "arm": arm,
                "since": cycle,
                "counts": np.zeros((len(configs), users)),
                "positives": np.zeros((len(configs), users)),
                "weights": dict(zip(names, WEIGHTS[1:], strict=False)),
                "allocation": error_control.allocate(previous, previous_status, names),
            }
            started += 1
    return false_promotions, found, started


def _judge(method: dict, promoter, running: dict):
    names = ARMS[: len(running["configs"])]
    variants = {}
    for i, name in enumerate(names):
        weight = WEIGHTS[0] if i == 0 else running["weights"][name]
        if method.get("started_split") is False and weight == 0:
            continue  # before: a dropped loser no longer counted in the split
        v = _arm_stats(
            name,
            running["counts"][i],
            running["positives"][i],
            bool(method.get("clustered", False)),
        )
        v.weight = weight
        variants[name] = v
    stats = ExperimentStats(None, "sim", "running", variants, objective=Objective())
    if method.get("budget"):
        stats.error_budget = ErrorBudget()
        stats.allocation = running["allocation"]
    return promoter.decide(stats)


def run_lives(args) -> None:
    sequential = SequentialPromoter(SequentialPromoter.Params())
    threshold = ThresholdPromoter(ThresholdPromoter.Params())
    per_cycle = args.users_per_cycle
    print(
        f"\n{args.lives} workflow lives × {args.cycles} cycles, auto mode, checked every cycle · "
        f"{args.users} users (logit spread {args.user_spread:g} around p0 = {args.p0:.0%}; "
        f"about {per_cycle} rated answers per cycle, a few heavy users send most) · "
        f"{args.space} configs in the space, 2 candidates per experiment at 25% of users each"
    )
    print(
        "seed 001's threshold rule (should_promote): promote when positive feedback ≥ baseline "
        "+ 2 points and latency ≤ 1.2 × baseline, no error control\n"
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, better in (("A/A", 0.0), ("+5 pts", 0.05)):
        for label, method in LIFE_METHODS.items():
            promoter = threshold if method.get("threshold") else sequential
            rng = np.random.default_rng([args.seed, int(better * 100)])
            any_false, found_at, experiments = 0, [], []
            for _ in range(args.lives):
                pop = Population.draw(rng, args.users, args.p0, args.user_spread, per_cycle)
                effects = [0.0] * args.space
                effects[int(rng.integers(1, args.space))] = better  # never the starting config
                false, found, started = simulate_life(
                    rng, method, promoter, pop, effects, args.cycles
                )
                any_false += false > 0
                experiments.append(started)
                if found is not None and better > 0:
                    found_at.append(found)
            results.setdefault(scenario, {})[label] = {
                "any_false": any_false / args.lives,
                "found": len(found_at) / args.lives,
                "median_cycles": float(np.median(found_at)) if found_at else float("nan"),
                "experiments": float(np.mean(experiments)),
            }
    print(
        f"{'':<28}{'A/A: lives with a':>18}{'experiments':>13}{'+5: lives that':>16}"
        f"{'median':>8}{'lives with a':>14}"
    )
    print(
        f"{'':<28}{'false promotion':>18}{'per life':>13}{'promote it':>16}{'cycles':>8}"
        f"{'false promotion':>16}"
    )
    for label in LIFE_METHODS:
        aa, up = results["A/A"][label], results["+5 pts"][label]
        print(
            f"{label:<28}{aa['any_false']:>18.1%}{aa['experiments']:>13.1f}{up['found']:>16.1%}"
            f"{up['median_cycles']:>8.0f}{up['any_false']:>16.1%}"
        )
    loop = results["A/A"]["loop (budget, by user)"]
    verdict = "met" if loop["any_false"] <= 0.05 else "NOT met"
    print(
        f"\nloop as built: lives with any false promotion (A/A) {loop['any_false']:.1%} "
        f"(target ≤ 5%) → {verdict}"
    )


def controller_life(rng, pop: Population, effects: list[float], cycles: int, folder: Path):
    """One life through the real controller: ``run_cycle`` in ``auto`` mode on a SQLite store,
    each request assigned by the real resolver, its rollout and rating inserted in bulk.
    Returns (false promotions, cycle the best config was promoted or None, experiments)."""
    from sqlalchemy import insert

    from flywheel_middleware.capture.records import utcnow
    from flywheel_middleware.config import config_from_dict
    from flywheel_middleware.loop import versions
    from flywheel_middleware.loop.controller import run_cycle
    from flywheel_middleware.store.database import Store
    from flywheel_middleware.store.models import Feedback, Rollout

    config = config_from_dict(
        {
            "workflows": {
                "sim": {
                    "config": {"knob": 0},
                    "tunable": {"knob": {"choices": list(range(len(effects)))}},
                    "experiment": {
                        "unit": "user_id",
                        "candidate_traffic": WEIGHTS[1],
                        "max_candidates": 2,
                        "min_samples": 100,
                    },
                }
            },
            "mutators": [{"type": "param", "params": {"seed": int(rng.integers(1 << 30))}}],
            "analysis": {"since_minutes": 1440},
            "controller": {"mode": "auto", "report_dir": str(folder / "reports")},
        }
    )
    store = Store(f"sqlite:///{folder / 'flywheel.db'}")
    resolver = versions.StoreResolver(store, config, ttl=3600, background=False)
    versions.ensure_workflow(store, config, "sim")
    shifts = {e: pop.shift_for(e) for e in set(effects)}
    best = max(effects)
    false_promotions, found, started, serial = 0, None, 0, 0
    try:
        for cycle in range(1, cycles + 1):
            sent = rng.poisson(pop.activity)
            rollouts, feedback = [], []
            now = utcnow()
            for user in np.flatnonzero(sent):
                chosen = resolver.resolve("sim", f"user{user}")
                p = float(expit(pop.logit[user] + shifts[effects[chosen.config["knob"]]]))
                for good in rng.random(int(sent[user])) < p:
                    serial += 1
                    rid = f"r{serial}"
                    rollouts.append(
                        {
                            "id": rid,
                            "workflow": "sim",
                            "user_id": f"user{user}",
                            "config_version_id": chosen.version_id,
                            "experiment_id": chosen.experiment_id,
                            "variant": chosen.variant,
                            "propensity": chosen.propensity,
                            "status": "succeeded",
                            "started_at": now,
                            "ended_at": now,
                            "latency_ms": 100.0,
                        }
                    )
                    feedback.append(
                        {
                            "rollout_id": rid,
                            "source": "explicit",
                            "key": "rating",
                            "value": 5.0 if good else 1.0,
                            "created_at": now,
                        }
                    )
            with store.session() as session:  # in bulk: the agent's side is not measured here
                session.execute(insert(Rollout.__table__), rollouts)
                session.execute(insert(Feedback.__table__), feedback)
            before = versions.active_version(store, "sim").config["knob"]
            report = run_cycle(store, config, "auto", workflows=["sim"], curate_data=False)
            resolver.invalidate()
            started += len(report.started)
            if report.promoted:
                after = versions.active_version(store, "sim").config["knob"]
                false_promotions += effects[after] <= effects[before]
                if found is None and effects[after] == best > effects[before]:
                    found = cycle
    finally:
        store.dispose()
    return false_promotions, found, started


def run_controller_lives(args) -> None:
    import tempfile

    print(
        f"\nthe same lives through the real controller (run_cycle, auto mode, SQLite, the "
        f"resolver's assignment, the param mutator's order): {args.controller_lives} per scenario"
    )
    for scenario, better in (("A/A", 0.0), ("+5 pts", 0.05)):
        rng = np.random.default_rng([args.seed, 7, int(better * 100)])
        any_false, found_at, experiments = 0, [], []
        began = time.perf_counter()
        for _ in range(args.controller_lives):
            pop = Population.draw(rng, args.users, args.p0, args.user_spread, args.users_per_cycle)
            effects = [0.0] * args.space
            effects[int(rng.integers(1, args.space))] = better
            with tempfile.TemporaryDirectory() as tmp:
                false, found, started = controller_life(rng, pop, effects, args.cycles, Path(tmp))
            any_false += false > 0
            experiments.append(started)
            if found is not None and better > 0:
                found_at.append(found)
        median = f"{np.median(found_at):.0f}" if found_at else "–"
        print(
            f"  {scenario:<7} lives with a false promotion {any_false}/{args.controller_lives}, "
            f"experiments per life {np.mean(experiments):.1f}"
            + (
                f", lives promoting the +5 config {len(found_at)}/{args.controller_lives} "
                f"(median cycles {median})"
                if better
                else ""
            )
            + f"  [{time.perf_counter() - began:.0f}s]"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--controller-lives",
        type=int,
        default=0,
        help="also run this many lives per scenario through the real controller (slow)",
    )
    ap.add_argument("--part", choices=["experiments", "lives", "all"], default="all")
    ap.add_argument("--lives", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--users-per-cycle", type=int, default=3000, help="rated answers per cycle")
    ap.add_argument("--user-spread", type=float, default=1.0, help="sd of users' baseline logit")
    ap.add_argument("--space", type=int, default=12, help="configs in the mutator's space")
    ap.add_argument("--experiments", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=100, help="rated answers per arm per cycle")
    ap.add_argument("--p0", type=float, default=0.6, help="baseline positive-feedback rate")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-samples", type=int, default=100)
    ap.add_argument("--horizon-factor", type=float, default=3.0, help="max samples = factor × N")
    ap.add_argument("--check", type=int, default=100, help="experiments re-run through the plugin")
    ap.add_argument("--seed", type=int, default=20261122)
    args = ap.parse_args()
    started = time.perf_counter()
    if args.part in ("experiments", "all"):
        run_experiments(args)
    if args.part in ("lives", "all"):
        run_lives(args)
        if args.controller_lives:
            run_controller_lives(args)
    print(f"\n{time.perf_counter() - started:.1f}s")


def run_experiments(args) -> None:
    rng = np.random.default_rng(args.seed)
    N = fixed_horizon_n(args.p0, 0.05)
    max_samples = int(math.ceil(args.horizon_factor * N / args.batch) * args.batch)
    cycles = max_samples // args.batch
    look_n = int(math.ceil(N / args.batch) * args.batch)  # the first look at or past N
    print(
        f"{args.experiments} experiments per scenario · p0 = {args.p0:.0%} · {args.batch} rated answers "
        f"per arm per cycle · checked every cycle up to {max_samples} per arm ({cycles} looks)\n"
        f"fixed-horizon N for +5 pts (two-sided α=0.05, power 80%): {N} per arm "
        f"(first look at or past it: {look_n})\n"
    )
    rows = []
    checked: dict[str, int] = {}
    for label, delta in SCENARIOS:
        n, kb, kc = simulate(rng, args.experiments, cycles, args.batch, args.p0, delta)
        row = {"scenario": label}
        for boundary, name in BOUNDARY_NAMES.items():
            params = {
                "boundary": boundary,
                "alpha": args.alpha,
                "min_effect": 0.05,
                "min_samples": args.min_samples,
                "max_samples": max_samples,
            }
            action, at, _ = sequential_decisions(
                n,
                kb,
                kc,
                boundary=boundary,
                alpha=args.alpha,
                tau=0.05,
                min_samples=args.min_samples,
                max_samples=max_samples,
            )
            promoted = action == 1
            row[name] = {
                "promote": float(np.mean(promoted)),
                "by_look": float(np.mean(promoted & (at <= look_n))),
                "before_n": float(np.mean(promoted & (at < N))),
                "by_factor": {k: float(np.mean(promoted & (at <= k * N))) for k in (1.5, 2.0)},
                "median_n": float(np.median(at)),
            }
            if args.check:
                checked[f"{label}, {name}"] = check_against_plugin(n, kb, kc, params, args.check)
        thr_a, thr_n, _ = threshold_every_cycle(
            n, kb, kc, min_samples=args.min_samples, max_samples=max_samples
        )
        row["threshold/cycle"] = {
            "promote": float(np.mean(thr_a == 1)),
            "median_n": float(np.median(thr_n)),
        }
        row["threshold/once"] = {"promote": float(np.mean(once_at(n, kb, kc, N, "threshold")[0]))}
        row["z-test/once"] = {"promote": float(np.mean(once_at(n, kb, kc, N, "z")[0]))}
        rows.append(row)

    columns = [*BOUNDARY_NAMES.values(), "threshold/cycle", "threshold/once", "z-test/once"]
    print(f"{'P(promote)':<26}" + "".join(f"{c:>17}" for c in columns))
    for r in rows:
        print(f"{r['scenario']:<26}" + "".join(f"{r[c]['promote']:>17.1%}" for c in columns))
    aa, worse, better = rows
    print("\n+5 pts improvement: power and samples per arm to a decision")
    for name in BOUNDARY_NAMES.values():
        b = better[name]
        factors = ", ".join(f"{k:g}×N {v:.1%}" for k, v in b["by_factor"].items())
        print(
            f"  {name:<12} within N ({look_n}): {b['by_look']:6.1%}   ({factors}, "
            f"by {max_samples}: {b['promote']:.1%}; before N: {b['before_n']:.1%})   median samples {b['median_n']:.0f} "
            f"({b['median_n'] / N:.2f}×N)"
        )
    print(
        f"  {'z-test/once':<12} at N ({look_n}):     {better['z-test/once']['promote']:6.1%}   (the 80% it is sized for)"
    )
    print(
        f"  threshold/cycle median samples to a decision: {better['threshold/cycle']['median_n']:.0f}"
    )
    print("\nFalse promotions, checked after every cycle (target ≤ 5%):")
    for name in [*BOUNDARY_NAMES.values(), "threshold/cycle"]:
        print(
            f"  {name:<16} A/A {aa[name]['promote']:6.1%}   −2 pts {worse[name]['promote']:6.1%}   "
            f"median samples to a decision, A/A: {aa[name]['median_n']:.0f}"
        )
    target_met = better["seq/horizon"]["by_look"] >= 0.8 and aa["seq/horizon"]["promote"] <= 0.05
    print(
        f"\nseq/horizon (the default): power within N {better['seq/horizon']['by_look']:.1%} "
        f"(target ≥ 80%), A/A false promotions {aa['seq/horizon']['promote']:.1%} (target ≤ 5%) "
        f"→ {'met' if target_met else 'NOT met'}"
    )
    if checked:
        total = sum(checked.values())
        print(
            f"plugin cross-check: {args.check} experiments per scenario and boundary re-run "
            f"through SequentialPromoter.decide — {total} disagreement(s)"
        )


if __name__ == "__main__":
    main()
