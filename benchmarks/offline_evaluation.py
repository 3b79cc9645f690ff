"""How often the off-policy intervals of ``flywheel evaluate`` cover the truth, by sample size.

A simulated log: two contexts (skill sets), three actions, a logging policy that mostly picks
the weaker actions, and users who differ (each has a fixed ±0.15 on every success rate), so a
user's decisions are correlated. The target policy's true value is known from the rates. For
each size, many logs are drawn; the share of 95% intervals that hold the truth is printed for
IPS, self-normalized IPS and doubly robust, with the intervals' mean width and the mean
effective sample size — once with the cluster-robust variance over users that
``loop/offline_evaluation.py`` uses, and once treating every decision as independent.

    .venv/bin/python benchmarks/offline_evaluation.py [--runs 500] [--per-user 8]
"""

from __future__ import annotations

import argparse
import random
import time

from flywheel_middleware.loop.offline_evaluation import LoggedDecision, TargetPolicy, evaluate

RATES = {"billing": {"a": 0.7, "b": 0.4, "c": 0.55}, "shipping": {"a": 0.3, "b": 0.65, "c": 0.5}}
LOGGING = {"billing": {"a": 0.1, "b": 0.6, "c": 0.3}, "shipping": {"a": 0.6, "b": 0.2, "c": 0.2}}
POLICY = ["billing:c", "shipping:b=3,a=1"]
TRUTH = 0.5 * 0.55 + 0.5 * (0.75 * 0.65 + 0.25 * 0.3)


def simulate(seed: int, users: int, per_user: int, clustered: bool) -> list[LoggedDecision]:
    rng = random.Random(seed)
    out = []
    for u in range(users):
        lift = rng.choice([-0.15, 0.15])
        for k in range(per_user):
            ctx = rng.choice(["billing", "shipping"])
            probs = LOGGING[ctx]
            action = rng.choices(list(probs), weights=list(probs.values()))[0]
            reward = float(rng.random() < RATES[ctx][action] + lift)
            unit = f"u{u}" if clustered else f"u{u}-{k}"
            out.append(LoggedDecision(unit, (ctx,), action, probs[action], probs, reward))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--per-user", type=int, default=8)
    args = parser.parse_args()
    policy = TargetPolicy.parse(POLICY)
    print(f"target policy {policy.describe()}; true value {TRUTH:.4f}; {args.runs} logs a row")
    print(
        f"{'users':>6} {'decisions':>9} {'variance':>11} {'ESS':>7}  "
        + "  ".join(f"{n + ' cover':>12} {'width':>6}" for n in ("IPS", "SNIPS", "DR"))
    )
    for users in (25, 100, 400):
        for clustered in (True, False):
            started = time.perf_counter()
            cover = {"ips": 0, "snips": 0, "dr": 0}
            width = {"ips": 0.0, "snips": 0.0, "dr": 0.0}
            ess = 0.0
            for seed in range(args.runs):
                result = evaluate(simulate(seed, users, args.per_user, clustered), policy)
                ess += result.ess
                for name in cover:
                    est = getattr(result, name)
                    cover[name] += est.low <= TRUTH <= est.high
                    width[name] += est.high - est.low
            cells = "  ".join(
                f"{cover[n] / args.runs:>12.3f} {width[n] / args.runs:>6.3f}" for n in cover
            )
            print(
                f"{users:>6} {users * args.per_user:>9} "
                f"{'by user' if clustered else 'per request':>11} {ess / args.runs:>7.1f}  {cells}"
                f"   ({time.perf_counter() - started:.1f}s)"
            )


if __name__ == "__main__":
    main()
