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

    python benchmarks/flywheel_efficacy.py [--experiments 10000] [--batch 100]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import log_ndtr
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel_middleware.plugins.promoters import (
    SequentialPromoter,
    binary_var,
    horizon_radius,
    log_mixture_lr,
    planned_information,
)

from flywheel_middleware.config import Objective  # noqa: E402
from flywheel_middleware.loop.experiments import ExperimentStats, VariantStats  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    print(f"\n{time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
