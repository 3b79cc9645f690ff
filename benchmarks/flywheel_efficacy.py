"""How often each promoter ships a config that is not better, and how fast it finds one that is.

Thousands of simulated experiments with known truth: each cycle adds ``--batch`` rated
answers per arm (baseline positive-feedback rate ``--p0``), and the promoter is checked after
every cycle, as the controller does, until it decides or ``--max-samples`` per arm is reached.

Side by side:
  sequential        the built-in anytime-valid mixture SPRT (plugins/promoters.py, exactly its
                    formula, vectorised; a sample of experiments is re-run through the real
                    ``SequentialPromoter.decide`` to check the two agree)
  threshold/cycle   seed 001's should_promote (+2 points), checked after every cycle
  threshold/once    the same rule looked at once, at the fixed horizon (what the seed intended)
  z-test/once       a fixed-horizon two-sided z-test at α=0.05 sized for 80% power (reference)

Scenarios: A/A (candidate = baseline), slightly worse (−2 points), better (+5 points).
The fixed horizon N is the per-arm sample a two-sided α=0.05, 80%-power z-test needs for +5.

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

from flywheel_middleware.plugins.promoters import (  # noqa: E402
    SequentialPromoter,
    binary_var,
    log_mixture_lr,
)

from flywheel_middleware.config import Objective  # noqa: E402
from flywheel_middleware.experiments import ExperimentStats, VariantStats  # noqa: E402

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


def sequential_decisions(n, kb, kc, *, alpha, tau, min_samples, max_samples):
    """(action per experiment: +1 promote, −1 reject, 0 none; samples per arm at the decision)."""
    var = binary_var(n, kb) / n + binary_var(n, kc) / n
    diff = kc / n - kb / n
    thr = math.log(1 / alpha)
    up = log_mixture_lr(diff, var, tau, xp=np, log_phi=log_ndtr) >= thr
    down = log_mixture_lr(-diff, var, tau, xp=np, log_phi=log_ndtr) >= thr
    ok = n >= min_samples
    futile = n >= max_samples
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


def check_against_plugin(n, kb, kc, params, count, p0):
    """Re-run ``count`` experiments through the real promoter; return mismatching decisions."""
    promoter = SequentialPromoter(SequentialPromoter.Params(**params))
    vec_action, _, _ = sequential_decisions(
        n,
        kb[:count],
        kc[:count],
        alpha=params["alpha"],
        tau=params["min_effect"],
        min_samples=params["min_samples"],
        max_samples=params["max_samples"],
    )
    mismatches = 0
    for e in range(count):
        action = 0
        for t, nt in enumerate(n):
            stats = ExperimentStats(
                e,
                "sim",
                "running",
                {
                    "baseline": VariantStats(
                        "baseline",
                        1,
                        0.5,
                        rollouts=int(nt),
                        succeeded=int(nt),
                        rated=int(nt),
                        positive=int(kb[e, t]),
                    ),
                    "candidate-1": VariantStats(
                        "candidate-1",
                        2,
                        0.5,
                        rollouts=int(nt),
                        succeeded=int(nt),
                        rated=int(nt),
                        positive=int(kc[e, t]),
                    ),
                },
                objective=Objective(),
                min_samples=params["min_samples"],
            )
            d = promoter.decide(stats)
            if d.action != "continue":
                action = 1 if d.action == "promote" else -1
                break
        mismatches += action != vec_action[e]
    return mismatches


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
    params = {
        "alpha": args.alpha,
        "min_effect": 0.05,
        "min_samples": args.min_samples,
        "max_samples": max_samples,
    }
    print(
        f"{args.experiments} experiments per scenario · p0 = {args.p0:.0%} · {args.batch} rated answers "
        f"per arm per cycle · checked every cycle up to {max_samples} per arm ({cycles} looks)\n"
        f"fixed-horizon N for +5 pts (two-sided α=0.05, power 80%): {N} per arm\n"
    )
    rows = []
    checked = {}
    for label, delta in SCENARIOS:
        n, kb, kc = simulate(rng, args.experiments, cycles, args.batch, args.p0, delta)
        seq_a, seq_n, seq_first = sequential_decisions(
            n,
            kb,
            kc,
            alpha=args.alpha,
            tau=0.05,
            min_samples=args.min_samples,
            max_samples=max_samples,
        )
        thr_a, thr_n, _ = threshold_every_cycle(
            n, kb, kc, min_samples=args.min_samples, max_samples=max_samples
        )
        thr_once, _ = once_at(n, kb, kc, N, "threshold")
        z_once, _ = once_at(n, kb, kc, N, "z")
        within_n = (seq_a == 1) & (seq_n <= N)
        by_factor = {k: float(np.mean((seq_a == 1) & (seq_n <= k * N))) for k in (1.25, 1.5, 2.0)}
        rows.append(
            {
                "scenario": label,
                "delta": delta,
                "seq_promote": float(np.mean(seq_a == 1)),
                "seq_promote_by_N": float(np.mean(within_n)),
                "seq_by_factor": by_factor,
                "seq_median_n": float(np.median(seq_n)),
                "seq_median_n_promoted": float(np.median(seq_n[seq_a == 1]))
                if (seq_a == 1).any()
                else float("nan"),
                "thr_promote": float(np.mean(thr_a == 1)),
                "thr_median_n": float(np.median(thr_n)),
                "thr_once": float(np.mean(thr_once)),
                "z_once": float(np.mean(z_once)),
            }
        )
        if args.check:
            checked[label] = check_against_plugin(n, kb, kc, params, args.check, args.p0)

    print(
        f"{'scenario':<26}{'':>3}{'sequential':>14}{'threshold/cycle':>18}{'threshold/once':>17}{'z-test/once':>14}"
    )
    for r in rows:
        print(
            f"{r['scenario']:<26}{'P(promote)':>3} {r['seq_promote']:>12.1%} {r['thr_promote']:>17.1%} "
            f"{r['thr_once']:>16.1%} {r['z_once']:>13.1%}"
        )
    print()
    better = rows[2]
    print("+5 pts improvement:")
    print(f"  sequential power within N={N}:            {better['seq_promote_by_N']:.1%}")
    for k, v in better["seq_by_factor"].items():
        print(
            f"  sequential power within {k:g} × N = {k * N:.0f}:{'':<{max(1, 12 - len(f'{k:g}{k * N:.0f}'))}}{v:.1%}"
        )
    print(f"  sequential power within {max_samples} (max):        {better['seq_promote']:.1%}")
    print(
        f"  sequential median samples to a decision:  {better['seq_median_n']:.0f} per arm "
        f"({better['seq_median_n'] / N:.2f} × N; among promotions {better['seq_median_n_promoted']:.0f})"
    )
    print(f"  threshold/cycle median samples to promote: {better['thr_median_n']:.0f} per arm")
    print(
        f"  fixed-horizon z-test power at N:          {better['z_once']:.1%} (the 80% it is sized for)"
    )
    print()
    aa, worse = rows[0], rows[1]
    print("False promotions (checked after every cycle):")
    print(
        f"  A/A:            sequential {aa['seq_promote']:.1%} vs threshold {aa['thr_promote']:.1%}   (target ≤ 5%)"
    )
    print(
        f"  −2 pts worse:   sequential {worse['seq_promote']:.1%} vs threshold {worse['thr_promote']:.1%}"
    )
    print(
        f"  median samples to a decision, A/A: sequential {aa['seq_median_n']:.0f}, threshold {aa['thr_median_n']:.0f}"
    )
    if checked:
        total = sum(checked.values())
        print(
            f"\nplugin cross-check: {args.check} experiments per scenario re-run through "
            f"SequentialPromoter.decide — {total} disagreement(s)"
        )
    print(f"\n{time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
