"""The improvement loop's commands: config, experiment, promote, rollback, cycle, run."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.table import Table

from flywheel_middleware.cli.common import (
    Cli,
    command,
    console,
    echo_json,
    err_console,
    json_option,
    short,
    table,
)
from flywheel_middleware.errors import ConfigError

# The loop's modules (the store, SQLAlchemy) are imported inside each command, so that
# `flywheel --help` stays fast; these two mirror flywheel_middleware.loop.experiments
# (tests/loop/test_cli.py checks they agree) because click needs them to build the options.
EXPERIMENT_STATUSES = ("running", "stopped", "promoted", "rejected")
EXPERIMENT_UNITS = ("user_id", "session_id", "request")


def parse_every(text: str, where: str = "'--every'") -> float:
    """'10m', '30s', '2h', '1d' or plain seconds → seconds."""
    from flywheel_middleware.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=where) from None


def _workflow(cli: Cli, workflow: str | None) -> str:
    from flywheel_middleware.loop import versions

    known = sorted(set(cli.config.workflows) | set(versions.workflows_in_store(cli.store)))
    if workflow is None:
        if len(known) == 1:
            return known[0]
        if not known:
            raise click.UsageError(
                "no workflows yet: declare one under workflows: in the config file "
                f"({cli.config.source or 'none loaded'}) or record rollouts first"
            )
        raise click.UsageError(f"name the workflow: one of {', '.join(known)}")
    if workflow not in known:
        raise click.ClickException(
            f"unknown workflow {workflow!r}; known: {', '.join(known) or '(none)'}"
        )
    return workflow


def _sync(cli: Cli, workflow: str) -> None:
    from flywheel_middleware.loop import versions

    if workflow in cli.config.workflows:
        versions.ensure_workflow(cli.store, cli.config, workflow)


def _flat(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def register(main: click.Group) -> None:
    # -- config ----------------------------------------------------------------------------

    @main.group("config")
    def config_group() -> None:
        """Versioned workflow configs: show, activate, diff."""

    @command(config_group, "show")
    @click.argument("workflow", required=False)
    @click.option("--version", "-v", "ref", default=None, help="A version (3, v3 or #id).")
    @click.option("--json", "as_json", is_flag=True)
    def config_show(cli: Cli, workflow: str | None, ref: str | None, as_json: bool) -> None:
        """The active config (or one version) and the version history."""
        from flywheel_middleware.loop import versions

        workflow = _workflow(cli, workflow)
        _sync(cli, workflow)
        active = versions.active_version(cli.store, workflow)
        shown = versions.find_version(cli.store, workflow, ref) if ref else active
        rows = versions.list_versions(cli.store, workflow)
        if as_json:
            echo_json(
                {
                    "workflow": workflow,
                    "active_version": active.version if active else None,
                    "shown": shown.model_dump() if shown else None,
                    "versions": [r.model_dump(exclude={"config"}) for r in rows],
                }
            )
            return
        table = Table(title=f"{workflow}: config versions")
        for col in ("version", "id", "created", "by", "parent", "hash", "note"):
            table.add_column(col)
        parents = {r.id: r.version for r in rows}
        for r in rows:
            mark = " ★" if active is not None and r.id == active.id else ""
            table.add_row(
                f"v{r.version}{mark}",
                str(r.id),
                f"{r.created_at:%Y-%m-%d %H:%M}",
                r.created_by,
                f"v{parents[r.parent_id]}" if r.parent_id in parents else "–",
                r.config_hash[:10],
                short(r.note, 80),
            )
        console.print(table)
        history = versions.deployment_history(cli.store, workflow)[-10:]
        if history:
            numbers = {r.id: r.version for r in rows}
            hist = Table(title="deployment history (latest 10)")
            for col in ("when (UTC)", "change", "from", "to", "by", "reason"):
                hist.add_column(col)
            for ev in history:
                hist.add_row(
                    f"{ev.created_at:%Y-%m-%d %H:%M:%S}",
                    ev.kind,
                    f"v{numbers[ev.from_version_id]}" if ev.from_version_id in numbers else "–",
                    f"v{numbers[ev.to_version_id]}" if ev.to_version_id in numbers else "–",
                    ev.actor,
                    short(ev.reason, 90),
                )
            console.print(hist)
        if shown is not None:
            label = "active" if active is not None and shown.id == active.id else "shown"
            console.rule(f"v{shown.version} ({label})")
            console.print_json(json.dumps(shown.config, ensure_ascii=False))

    @command(config_group, "activate")
    @click.argument("workflow")
    @click.argument("version")
    @click.option("--reason", "-m", default=None, help="Why (kept in the audit log).")
    def config_activate(cli: Cli, workflow: str, version: str, reason: str | None) -> None:
        """Make a version (3, v3 or #id) the active config of WORKFLOW."""
        from flywheel_middleware.loop import experiments as ex
        from flywheel_middleware.loop import versions

        workflow = _workflow(cli, workflow)
        _sync(cli, workflow)
        row = versions.find_version(cli.store, workflow, version)
        running = ex.running_experiment(cli.store, workflow)
        event = versions.activate(cli.store, workflow, row.id, actor="cli", reason=reason)
        console.print(
            f"{workflow}: v{row.version} is active (change {event.id}; "
            f"previous version id {event.from_version_id})"
        )
        _report_stopped(cli, running)

    @command(config_group, "diff")
    @click.argument("workflow")
    @click.argument("old")
    @click.argument("new", required=False)
    def config_diff(cli: Cli, workflow: str, old: str, new: str | None) -> None:
        """What changed between two versions (NEW defaults to the active one)."""
        from flywheel_middleware.loop import versions

        workflow = _workflow(cli, workflow)
        _sync(cli, workflow)
        a = versions.find_version(cli.store, workflow, old)
        b = (
            versions.find_version(cli.store, workflow, new)
            if new
            else versions.active_version(cli.store, workflow)
        )
        changes = versions.diff_configs(a.config, b.config)
        if not changes:
            console.print(f"v{a.version} and v{b.version} are identical")
            return
        table = Table(title=f"{workflow}: v{a.version} → v{b.version}")
        for col in ("path", f"v{a.version}", f"v{b.version}"):
            table.add_column(col, overflow="fold")
        for path, x, y in changes:
            table.add_row(path, "[red]" + _flat(x) + "[/]", "[green]" + _flat(y) + "[/]")
        console.print(table)

    # -- experiments -----------------------------------------------------------------------

    @main.group("experiment")
    def experiment_group() -> None:
        """Experiments on live traffic: list, show, stop."""

    @command(experiment_group, "list")
    @click.option("--workflow", "-w", default=None)
    @click.option("--status", type=click.Choice(EXPERIMENT_STATUSES), default=None)
    @json_option
    def experiment_list(cli: Cli, workflow: str | None, status: str | None, as_json: bool) -> None:
        """Experiments, newest first, with their variants' traffic and served rollouts."""
        from flywheel_middleware.loop import experiments as ex

        rows = [
            (exp, ex.experiment_stats(cli.store, exp, cli.config))
            for exp in ex.list_experiments(cli.store, workflow=workflow, status=status)
        ]
        if as_json:
            echo_json(
                [
                    {
                        "id": exp.id,
                        "workflow": exp.workflow,
                        "status": exp.status,
                        "started_at": exp.started_at,
                        "variants": [
                            {"name": v["name"], "weight": float(v["weight"])} for v in exp.variants
                        ],
                        "rollouts_served": {n: v.rollouts for n, v in stats.variants.items()},
                        "decision": (exp.decision or {}).get("action"),
                    }
                    for exp, stats in rows
                ]
            )
            return
        out = table(
            "experiments",
            ("id", "workflow", "status", "started", "variants", "rollouts served", "decision"),
        )
        for exp, stats in rows:
            out.add_row(
                str(exp.id),
                exp.workflow,
                exp.status,
                f"{exp.started_at:%Y-%m-%d %H:%M}",
                ", ".join(f"{v['name']} {float(v['weight']):.0%}" for v in exp.variants),
                ", ".join(str(v.rollouts) for v in stats.variants.values()),
                ((exp.decision or {}).get("action") or "") if exp.status != "running" else "",
            )
        console.print(out)

    @command(experiment_group, "show")
    @click.argument("experiment_id", type=int)
    @click.option("--json", "as_json", is_flag=True)
    def experiment_show(cli: Cli, experiment_id: int, as_json: bool) -> None:
        """Per-variant statistics with 95% intervals, and what each promoter decides now."""
        from flywheel_middleware.loop import experiments as ex

        exp = ex.get_experiment(cli.store, experiment_id)
        stats = ex.experiment_stats(cli.store, exp, cli.config)
        decisions = _promoter_decisions(cli, stats) if exp.status == "running" else []
        if as_json:
            echo_json(
                {
                    "experiment": exp.model_dump(),
                    "stats": stats.as_dict(),
                    "decisions": [
                        {
                            "promoter": n,
                            "action": d.action,
                            "variant": d.variant,
                            "reason": d.reason,
                        }
                        for n, d in decisions
                    ],
                }
            )
            return
        console.print(render_stats(exp, stats))
        budget = stats.budget()
        if budget is not None:
            from flywheel_middleware.loop.error_control import budget_text

            console.print(budget_text(budget))
        for name, d in decisions:
            colour = {"promote": "green", "reject": "red"}.get(d.action, "yellow")
            console.print(
                f"[bold]{name}[/]: [{colour}]{d.action}[/]"
                + (f" {d.variant}" if d.variant else "")
                + f" — {d.reason}"
            )
        if exp.decision:
            d = exp.decision
            console.print(
                f"decision: [bold]{d.get('action')}[/]"
                + (f" {d['variant']}" if d.get("variant") else "")
                + (f" by {d['actor']}" if d.get("actor") else "")
                + (f" — {short(d.get('reason'), 300)}" if d.get("reason") else "")
            )

    @command(experiment_group, "start")
    @click.argument("workflow")
    @click.argument("candidates", nargs=-1, required=True)
    @click.option(
        "--traffic",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=None,
        help="Share of units per candidate (default experiment.candidate_traffic).",
    )
    @click.option(
        "--unit",
        type=click.Choice(EXPERIMENT_UNITS),
        default=None,
        help="What is randomised (default experiment.unit).",
    )
    @click.option("--reason", "-m", default=None)
    def experiment_start(
        cli: Cli,
        workflow: str,
        candidates: tuple[str, ...],
        traffic: float | None,
        unit: str | None,
        reason: str | None,
    ) -> None:
        """Serve config versions CANDIDATES (3, v3 or #id) of WORKFLOW to a slice of traffic."""
        from flywheel_middleware.config import ExperimentSettings
        from flywheel_middleware.loop import experiments as ex
        from flywheel_middleware.loop import versions

        workflow = _workflow(cli, workflow)
        _sync(cli, workflow)
        wf = cli.config.workflows.get(workflow)
        settings = wf.experiment if wf is not None else None
        rows = [versions.find_version(cli.store, workflow, ref) for ref in candidates]
        exp = ex.start_experiment(
            cli.store,
            workflow,
            [r.id for r in rows],
            traffic=traffic
            if traffic is not None
            else (settings.candidate_traffic if settings else 0.05),
            unit=unit or (settings.unit if settings else "user_id"),
            actor="cli",
            reason=reason,
            error_budget=(settings or ExperimentSettings()).error_budget,
        )
        base = versions.get_version(cli.store, exp.baseline_version_id)
        arms = ", ".join(
            f"{v['name']} (v{versions.get_version(cli.store, v['version_id']).version}) "
            f"{float(v['weight']):.0%}"
            for v in exp.variants[1:]
        )
        console.print(
            f"started experiment {exp.id} on {workflow}: baseline v{base.version} "
            f"{float(exp.variants[0]['weight']):.0%}, {arms}; unit {exp.unit}"
        )

    @command(experiment_group, "force")
    @click.argument("experiment_id", type=int)
    @click.argument("variant")
    @click.argument("units", nargs=-1)
    def experiment_force(
        cli: Cli, experiment_id: int, variant: str, units: tuple[str, ...]
    ) -> None:
        """Serve VARIANT to these unit ids in every process, for QA (none: clear VARIANT's list)."""
        from flywheel_middleware.loop import experiments as ex

        exp = ex.force_units(cli.store, experiment_id, variant, list(units), actor="cli")
        forced = {v["name"]: v.get("force") or [] for v in exp.variants}
        console.print(
            f"experiment {exp.id}: {variant} is forced for "
            + (", ".join(forced[variant]) or "no unit")
            + " (not counted in the statistics; reaches other processes within resolver.ttl)"
        )

    @command(experiment_group, "stop")
    @click.argument("experiment_id", type=int)
    @click.option("--reject", is_flag=True, help="Mark the candidates rejected.")
    @click.option("--reason", "-m", default=None)
    def experiment_stop(cli: Cli, experiment_id: int, reject: bool, reason: str | None) -> None:
        """Stop an experiment; all traffic returns to the active version."""
        from flywheel_middleware.loop import experiments as ex

        exp = ex.stop_experiment(
            cli.store,
            experiment_id,
            status="rejected" if reject else "stopped",
            actor="cli",
            reason=reason,
        )
        console.print(f"experiment {exp.id} ({exp.workflow}) is {exp.status}")

    # -- promote / rollback ----------------------------------------------------------------

    @command(main, "promote")
    @click.argument("experiment_id", type=int)
    @click.argument("variant", required=False)
    @click.option("--reason", "-m", default=None)
    def promote(cli: Cli, experiment_id: int, variant: str | None, reason: str | None) -> None:
        """Promote a variant of a running experiment (default: the one the promoters favour)."""
        from flywheel_middleware.loop import experiments as ex
        from flywheel_middleware.loop import versions

        exp = ex.get_experiment(cli.store, experiment_id)
        stats = ex.experiment_stats(cli.store, exp, cli.config)
        decisions = _promoter_decisions(cli, stats)
        if variant is None:
            favoured = {d.variant for _, d in decisions if d.action == "promote" and d.variant}
            candidates = [v["name"] for v in exp.variants if v["name"] != ex.BASELINE]
            if len(favoured) == 1:
                variant = favoured.pop()
            elif len(candidates) == 1:
                variant = candidates[0]
            else:
                raise click.UsageError(
                    f"name the variant to promote: one of {', '.join(candidates)}"
                )
        evidence = {
            "stats": stats.as_dict(),
            "promoters": {
                n: {"action": d.action, "variant": d.variant, "reason": d.reason}
                for n, d in decisions
            },
        }
        event = ex.promote(
            cli.store,
            experiment_id,
            variant,
            actor="cli",
            reason=reason or f"approved by a person: {variant} of experiment {experiment_id}",
            evidence=evidence,
            # approving what every promoter decides passes the error budget on; overruling does not
            tested=bool(decisions)
            and all(d.action == "promote" and d.variant == variant for _, d in decisions),
        )
        row = versions.get_version(cli.store, event.to_version_id)
        console.print(
            f"[green]promoted[/] {variant} of experiment {experiment_id}: "
            f"{exp.workflow} now serves v{row.version}"
        )

    @command(main, "rollback")
    @click.argument("workflow")
    @click.option("--reason", "-m", default=None)
    def rollback(cli: Cli, workflow: str, reason: str | None) -> None:
        """Restore the version that was active before the current one."""
        from flywheel_middleware.loop import experiments as ex
        from flywheel_middleware.loop import versions

        workflow = _workflow(cli, workflow)
        _sync(cli, workflow)
        running = ex.running_experiment(cli.store, workflow)
        event = versions.rollback(cli.store, workflow, actor="cli", reason=reason)
        old = versions.get_version(cli.store, event.from_version_id)
        new = versions.get_version(cli.store, event.to_version_id)
        console.print(f"{workflow}: rolled back v{old.version} → v{new.version}")
        _report_stopped(cli, running)

    # -- the loop --------------------------------------------------------------------------

    @command(main, "cycle")
    @click.option(
        "--mode",
        type=click.Choice(["suggest", "experiment", "auto"]),
        default=None,
        help="Override controller.mode.",
    )
    @click.option("--workflow", "-w", "workflows", multiple=True, help="Only these workflows.")
    @click.option("--json", "as_json", is_flag=True)
    def cycle(cli: Cli, mode: str | None, workflows: tuple[str, ...], as_json: bool) -> None:
        """Run observe → curate → decide → generate once and write the Markdown report.

        One cycle runs at a time per store: while another process's cycle runs, this one
        waits for it and says whose it is."""
        cli.require_buildable_plugins()  # a configuration mistake: exit 1 before any work
        with _cycle_lock(cli).held_for(on_wait=_say_waiting):
            report = _run_cycle(cli, mode, list(workflows) or None)
        if as_json:
            echo_json(report.summary())
        else:
            print_cycle(report)

    @command(main, "run")
    @click.option("--every", default=None, help="Interval, e.g. 10m (default controller.every).")
    @click.option("--mode", type=click.Choice(["suggest", "experiment", "auto"]), default=None)
    @click.option("--cycles", type=int, default=None, help="Stop after this many cycles.")
    def run(cli: Cli, every: str | None, mode: str | None, cycles: int | None) -> None:
        """Run the cycle on a schedule until Ctrl-C (or --cycles).

        Several hosts may run this on one store: their cycles take turns, one at a time (a
        process whose turn comes while another's cycle runs waits and says whose it is).

        Before its first cycle, and then once a day (FLYWHEEL_HOUSEKEEPING_EVERY, e.g. 12h),
        the process holding the lock also keeps the store: PostgreSQL time partitions
        created ahead (flywheel db maintain), and rows older than retention.keep pruned
        when that is set (flywheel db prune)."""
        if every is not None:
            interval = parse_every(every)
        else:
            interval = parse_every(cli.config.controller.every, "controller.every in the config")
        done = 0
        cli.require_buildable_plugins()  # a configuration mistake: exit 1 before any work
        housekeeper = _housekeeper(cli)
        console.print(f"running the flywheel every {interval:g}s — Ctrl-C stops")
        lock = _cycle_lock(cli)
        try:
            while cycles is None or done < cycles:
                started = time.monotonic()
                try:
                    with lock.held_for(on_wait=_say_waiting):
                        began = _utc_now()
                        try:
                            _say_chores(housekeeper.run_if_due())
                            print_cycle(_run_cycle(cli, mode, None))
                        finally:
                            console.print(
                                f"cycle {done + 1} on {lock.name}: {began} → {_utc_now()}"
                            )
                except ConfigError:  # a mistake in the file fails every cycle: stop, exit 1
                    raise
                except Exception as exc:  # one failed cycle must not end the schedule
                    console.print(f"[red]cycle failed:[/] {type(exc).__name__}: {exc}")
                done += 1
                if cycles is not None and done >= cycles:
                    break
                _wait(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            console.print(f"stopped after {done} cycle(s)")


def _cycle_lock(cli: Cli) -> Any:
    from flywheel_middleware.store.leader import CycleLock

    return CycleLock(cli.store)


HOUSEKEEPING_ENV = "FLYWHEEL_HOUSEKEEPING_EVERY"


def _housekeeper(cli: Cli) -> Any:
    """The store's upkeep for ``flywheel run``: daily (or every FLYWHEEL_HOUSEKEEPING_EVERY),
    pruning per retention.keep only when that is set."""
    import os
    from datetime import timedelta

    from flywheel_middleware.store.housekeeping import DAY, Housekeeper

    raw = os.environ.get(HOUSEKEEPING_ENV)
    keep = cli.config.retention.keep
    return Housekeeper(
        cli.store,
        keep=timedelta(seconds=parse_every(keep, "retention.keep in the config")) if keep else None,
        every=parse_every(raw, HOUSEKEEPING_ENV) if raw else DAY,
    )


def _say_chores(chores: Any) -> None:
    if chores is None:
        return
    for line in chores.done:
        console.print(f"housekeeping: {line}")
    for line in chores.failed:
        console.print(f"[red]housekeeping failed:[/] {line} (the cycle runs anyway)")


def _say_waiting(holder: str | None) -> None:
    err_console.print(
        f"waiting: a cycle is running on {holder or 'another process'} (one at a time per store)"
    )


def _utc_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _wait(seconds: float) -> None:
    """Sleep until the next cycle (Ctrl-C interrupts it)."""
    time.sleep(seconds)


def _report_stopped(cli: Cli, running: Any) -> None:
    """Say so when a deployment change stopped the experiment that was running."""
    from flywheel_middleware.loop import experiments as ex

    if running is None:
        return
    now = ex.get_experiment(cli.store, running.id)
    if now.status != "running":
        console.print(
            f"[yellow]note:[/] experiment {now.id} was stopped: its baseline is no longer the "
            "active version"
        )


def _run_cycle(cli: Cli, mode: str | None, workflows: list[str] | None) -> Any:
    from flywheel_middleware.loop.controller import run_cycle

    return run_cycle(cli.store, cli.config, mode, workflows=workflows)


def _promoter_decisions(cli: Cli, stats: Any) -> list[tuple[str, Any]]:
    from flywheel_middleware.loop.controller import build_promoters

    out = []
    for promoter in build_promoters(cli.config, cli.store):
        try:
            out.append((promoter.name, promoter.decide(stats)))
        except Exception as exc:
            console.print(f"[red]promoter {promoter.name} failed:[/] {exc}")
    return out


def render_stats(exp: Any, stats: Any) -> Table:
    """The experiment's variants with 95% intervals."""
    table = Table(
        title=f"experiment {exp.id} · {exp.workflow} · {exp.status} · metric {stats.objective.metric}"
    )
    for col in (
        "variant",
        "version",
        "weight",
        "rollouts",
        "positive feedback",
        "mean reward",
        "success",
        "errors",
        "latency ms",
        "p95 ms",
        "tokens",
        "cost",
    ):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in stats.variants.values():
        table.add_row(
            v.name,
            str(v.version_id),
            f"{v.weight:.0%}",
            str(v.rollouts),
            v.positive_feedback_rate.fmt(".1f", 100) + (f" n={v.rated}" if v.rated else ""),
            v.mean_reward.fmt(".3f"),
            v.success_rate.fmt(".1f", 100),
            v.error_rate.fmt(".1f", 100),
            v.latency_mean.fmt(".0f"),
            v.latency_p95.fmt(".0f"),
            v.tokens_mean.fmt(".0f"),
            v.cost_mean.fmt(".4f"),
        )
    return table


def print_cycle(report: Any) -> None:
    """The cycle's report as tables (the Markdown file has the same tables and the details)."""
    console.rule(f"flywheel cycle ({report.mode})")
    if report.problems:
        out = table("problems found", ("workflow", "node", "problem", "source"))
        for p in report.problems:
            out.add_row(
                p.get("workflow"),
                p.get("node") or "–",
                short(p.get("reason") or p, 120),
                p.get("source") or "",
            )
        console.print(out)
    if report.decisions:
        out = table(
            "running experiments", ("experiment", "workflow", "decision", "variant", "done")
        )
        for d in report.decisions:
            out.add_row(
                str(d["experiment_id"]),
                d["workflow"],
                f"[bold]{d['action']}[/]",
                d.get("variant") or "–",
                short(d.get("applied"), 80) or "–",
            )
        console.print(out)
        for d in report.decisions:
            if d.get("approve"):
                console.print(
                    f"approve experiment {d['experiment_id']} with: [bold]{d['approve']}[/]"
                )
    if report.started:
        out = table("started experiments", ("experiment", "workflow", "candidates", "traffic each"))
        for s in report.started:
            out.add_row(
                str(s["experiment_id"]),
                s["workflow"],
                ", ".join(s["candidates"]),
                f"{s['traffic']:.0%}",
            )
        console.print(out)
    if report.mode == "suggest":
        for p in report.proposals:
            out = table(f"suggested for {p['workflow']}", ("mutator", "change"))
            for c in p["candidates"]:
                out.add_row(c.get("mutator") or "", short(c["note"], 160))
            console.print(out)
    if not (report.problems or report.decisions or report.started):
        console.print("no hot problems and no running experiments: nothing to do")
    for note in report.notes:
        console.print(f"[dim]note: {short(note, 300)}[/]")
    console.print(f"report: {report.report_path}")
