"""``flywheel implicit train|evaluate|features`` and ``flywheel routing show|update``."""

from __future__ import annotations

import click
from rich.table import Table

from flywheel_middleware.cli.common import (
    Cli,
    command,
    console,
    echo_json,
    find_rollout,
    json_option,
    rollout_ids,
    table,
)


def _metrics_table(title: str) -> Table:
    columns = ("scorer", "n", "AUC", "Brier", "log loss")
    return table(title, columns, numeric=columns[1:])


def _metrics_row(out: Table, name: str, m: dict) -> None:
    def f(key: str) -> str:
        v = m.get(key)
        return "–" if v is None else f"{v:.3f}"

    out.add_row(name, str(int(m.get("n", 0))), f("auc"), f("brier"), f("log_loss"))


def register(main: click.Group) -> None:
    @main.group()
    def implicit() -> None:
        """The implicit satisfaction model over UI telemetry."""

    @command(implicit, "train")
    @click.option("--workflow", "-w", default=None, help="Train this workflow's own model.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
    @click.option("--seed", default=0, show_default=True)
    def implicit_train(cli: Cli, workflow: str | None, as_json: bool, seed: int) -> None:
        """Fit the calibrated logistic regression on rollouts with telemetry and explicit feedback,
        report held-out AUC next to the fallback rule's, and store it as a new version."""
        from flywheel_middleware.learn import implicit as imp

        result = imp.train(cli.store, cli.config, workflow=workflow, seed=seed)
        if as_json:
            echo_json(
                {
                    "version": result.version,
                    "n_labels": result.n_labels,
                    "n_train": result.n_train,
                    "n_test": result.n_test,
                    "model": result.model_metrics,
                    "rule": result.rule_metrics,
                    "reason": result.reason or None,
                }
            )
            return
        if result.model is None:
            console.print(
                f"[yellow]not trained:[/] {result.reason}; the implicit reward uses the rule"
            )
            return
        out = _metrics_table(
            f"implicit model v{result.version}: held-out ({result.n_test} of "
            f"{result.n_labels} labelled rollouts)"
        )
        _metrics_row(out, f"model v{result.version}", result.model_metrics)
        _metrics_row(out, "fallback rule", result.rule_metrics)
        console.print(out)

    @command(implicit, "evaluate")
    @click.option(
        "--version", "version", type=int, default=None, help="Model version (default: latest)."
    )
    @click.option("--workflow", "-w", default=None, help="That workflow's own model and rollouts.")
    @click.option("--json", "as_json", is_flag=True)
    def implicit_evaluate(
        cli: Cli, version: int | None, workflow: str | None, as_json: bool
    ) -> None:
        """Score the stored model and the rule on the held-out labelled rollouts (AUC, Brier, log loss)."""
        from flywheel_middleware.learn import implicit as imp

        out = imp.evaluate(cli.store, cli.config, version, workflow=workflow)
        if as_json:
            echo_json(out)
            return
        scores = _metrics_table(
            f"held-out evaluation ({out['n_test']} of {out['n_labels']} labelled rollouts)"
        )
        if "model" in out:
            _metrics_row(scores, f"model v{out['model_version']}", out["model"])
        else:
            console.print("[yellow]no stored model yet: run flywheel implicit train[/]")
        _metrics_row(scores, "fallback rule", out["rule"])
        console.print(scores)

    @command(implicit, "features")
    @click.argument("refs", nargs=-1, required=True, metavar="ROLLOUT_IDS...")
    @json_option
    def implicit_features(cli: Cli, refs: tuple[str, ...], as_json: bool) -> None:
        """Show the telemetry features and the implicit score of rollouts (ids or prefixes)."""
        from flywheel_middleware.learn import implicit as imp

        ids = [find_rollout(cli.store, ref).id for ref in refs]
        feats = imp.rollout_features(cli.store, ids)
        scorer = imp.Scorer.from_store(cli.store, cli.config)
        if as_json:
            echo_json(
                {
                    "scored_by": scorer.method,
                    "rollouts": {
                        r: {**feats[r].as_dict(), "score": scorer.score(feats[r])}
                        if r in feats
                        else None
                        for r in ids
                    },
                }
            )
            return
        labels = rollout_ids(cli.store, ids, abbreviate=True)  # the part that tells them apart
        out = table(f"implicit features (scored by {scorer.method})", ("feature", *labels))
        for name in (*imp.FEATURES, "events"):
            out.add_row(
                name, *[f"{feats[r].as_dict()[name]:.3g}" if r in feats else "–" for r in ids]
            )
        out.add_row("score", *[f"{scorer.score(feats[r]):.3f}" if r in feats else "–" for r in ids])
        console.print(out)

    @main.group()
    def routing() -> None:
        """Adaptive routing weights (Thompson sampling over agent and skill)."""

    @command(routing, "update")
    @click.option("--half-life-days", type=float, default=None, help="Discount old rewards.")
    @click.option("--window-days", type=float, default=None, help="Ignore older rollouts.")
    def routing_update(cli: Cli, half_life_days: float | None, window_days: float | None) -> None:
        """Rebuild the routing posteriors from the rewards of routed rollouts."""
        from flywheel_middleware.learn.routing import update_routing

        out = update_routing(
            cli.store, cli.config, half_life_days=half_life_days, window_days=window_days
        )
        console.print(f"{out['rewarded']} of {out['routed_rollouts']} routed rollouts had a reward")
        _show_weights(cli)

    @command(routing, "show")
    @json_option
    def routing_show(cli: Cli, as_json: bool) -> None:
        """The stored routing weights and posteriors."""
        _show_weights(cli, as_json)


def _show_weights(cli: Cli, as_json: bool = False) -> None:
    from flywheel_middleware.service.dashboard import routing_weights

    rows = routing_weights(cli.store)
    if as_json:
        echo_json(rows)
        return
    out = table(
        "routing weights",
        ("agent", "skill", "weight", "mean", "90% interval", "n"),
        numeric=("weight", "mean", "90% interval", "n"),
    )
    for r in rows:
        out.add_row(
            r["agent"],
            r["skill"],
            f"{r['weight']:.3f}",
            f"{r['mean']:.3f}",
            f"[{r['low']:.3f}, {r['high']:.3f}]",
            str(r["n"]),
        )
    console.print(out if rows else "no routing weights yet")
