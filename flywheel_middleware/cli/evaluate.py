"""``flywheel evaluate``: what another assignment or routing policy would have earned on past
traffic, from the logged propensities (IPS, self-normalized IPS, doubly robust)."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from flywheel_middleware.cli.common import Cli, command, console, echo_json, err_console

POLICY_HELP = (
    "The target policy: [CONTEXT:]ACTION[=WEIGHT][,ACTION[=WEIGHT]…], repeatable. "
    "ACTION is an agent (routing) or a variant (assignment); CONTEXT a skill set joined by + "
    "(routing), * or nothing for every context; weights default to 1 and are normalized."
)


def _options(fn: Any) -> Any:
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
    fn = click.option(
        "--no-model", is_flag=True, help="Skip the doubly robust estimate (no reward model)."
    )(fn)
    fn = click.option(
        "--level", type=float, default=0.95, show_default=True, help="Confidence level."
    )(fn)
    fn = click.option("--policy", "policies", multiple=True, required=True, help=POLICY_HELP)(fn)
    return fn


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _show(result: Any, what: str, as_json: bool) -> None:
    if as_json:
        echo_json({"evaluated": what, **result.as_dict()})
        return
    console.print(f"[bold]Off-policy estimate[/] of {result.policy} on {what}")
    table = Table()
    for col in ("estimator", "value", f"{result.level:.0%} interval", "std. error"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    rows = [
        ("logged policy (as served)", result.logged),
        ("IPS", result.ips),
        ("self-normalized IPS", result.snips),
        ("doubly robust", result.dr),
    ]
    for name, est in rows:
        if est is None:
            table.add_row(name, "–", "–", "–")
            continue
        interval = "–" if est.low is None else f"[{est.low:.4f}, {est.high:.4f}]"
        table.add_row(name, _fmt(est.value), interval, _fmt(est.se))
    console.print(table)
    share = result.ess / result.decisions if result.decisions else 0.0
    console.print(
        f"effective sample size {result.ess:.1f} of {result.decisions} decisions ({share:.0%}),"
        f" {result.units} units; largest weight {result.max_weight:.2f}"
    )
    for reason, count in sorted(result.left_out.items()):
        console.print(f"left out: {count} decision(s) with {reason}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


def _run(load: Any, policies: tuple[str, ...], level: float, no_model: bool, as_json: bool) -> None:
    """Parse the policy, load the decisions, estimate; a refusal prints its reason, exit 1."""
    from flywheel_middleware.loop import offline_evaluation as ope

    policy = ope.TargetPolicy.parse(list(policies))
    decisions, left_out, label = load()
    try:
        result = ope.evaluate(
            decisions, policy, level=level, reward_model=not no_model, left_out=left_out
        )
    except ope.OverlapError as exc:
        if as_json:
            echo_json({"evaluated": label, "policy": policy.describe(), "refused": str(exc)})
        else:
            err_console.print(f"[red]refused:[/] {exc}")
        raise SystemExit(1) from None
    _show(result, label, as_json)


def register(main: click.Group) -> None:
    @main.group("evaluate")
    def evaluate_group() -> None:
        """Estimate offline what another policy would have earned on past traffic."""

    @command(evaluate_group, "routing")
    @click.option("--workflow", "-w", default=None, help="Only rollouts of this workflow.")
    @click.option("--since", default=None, help="Only decisions since: 30m, 24h, 7d or a date.")
    @_options
    def evaluate_routing(
        cli: Cli,
        workflow: str | None,
        since: str | None,
        policies: tuple[str, ...],
        level: float,
        no_model: bool,
        as_json: bool,
    ) -> None:
        """Routing: what a policy choosing agents per skill set would have earned (e.g.
        --policy billing:billing_desk --policy '*:generalist')."""
        from flywheel_middleware.loop.datasets import parse_since
        from flywheel_middleware.loop.offline_evaluation import routing_decisions

        def load() -> tuple[Any, Any, str]:
            decisions, left = routing_decisions(
                cli.store, workflow=workflow, since=parse_since(since)
            )
            return decisions, left, "routing decisions" + (f" of {workflow}" if workflow else "")

        _run(load, policies, level, no_model, as_json)

    @command(evaluate_group, "assignment")
    @click.option(
        "--experiment",
        "-e",
        "experiment_id",
        type=int,
        default=None,
        help="The experiment whose traffic to use (default: the workflow's latest).",
    )
    @click.option(
        "--workflow", "-w", default=None, help="The workflow (for its latest experiment)."
    )
    @_options
    def evaluate_assignment(
        cli: Cli,
        experiment_id: int | None,
        workflow: str | None,
        policies: tuple[str, ...],
        level: float,
        no_model: bool,
        as_json: bool,
    ) -> None:
        """Assignment: what other variant weights would have earned in an experiment (e.g.
        --policy candidate-1 for all traffic to it, or baseline=0.5,candidate-1=0.5)."""
        from flywheel_middleware.loop import experiments as ex
        from flywheel_middleware.loop.offline_evaluation import assignment_decisions

        chosen = experiment_id
        if chosen is None:
            found = ex.list_experiments(cli.store, workflow=workflow)
            if not found:
                raise click.ClickException(
                    "no experiment to evaluate on" + (f" for {workflow}" if workflow else "")
                )
            chosen = max(found, key=lambda e: e.started_at).id

        def load() -> tuple[Any, Any, str]:
            decisions, left, exp = assignment_decisions(cli.store, chosen)
            names = ", ".join(str(v["name"]) for v in exp.variants or [])
            return decisions, left, f"experiment {exp.id} of {exp.workflow} (variants {names})"

        _run(load, policies, level, no_model, as_json)
