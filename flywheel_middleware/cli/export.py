"""``flywheel export`` (datasets) and ``flywheel rewards`` (compute and store rewards)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from flywheel_middleware.cli.common import Cli, command, console, echo_json, err_console


def _check(kind: str, path: str, trl: bool) -> None:
    """Print what is wrong with a dataset file, by line; exit 1 when anything is."""
    from flywheel_middleware.loop.dataset_rules import FORMATS, check_file

    rules = "trl" if trl and kind == "preference" else kind
    if rules not in FORMATS:
        raise click.UsageError(f"--check has no rules for {kind}")
    problems = check_file(path, rules)
    for problem in problems[:200]:
        console.print(f"{path}: {problem}", markup=False)
    if len(problems) > 200:
        console.print(f"... and {len(problems) - 200} more")
    if problems:
        raise click.ClickException(f"{len(problems)} problems in {path} ({rules} rules)")
    console.print(f"{path}: every row follows the {rules} rules", markup=False)


class FiniteFloat(click.types.FloatParamType):
    """A number option that refuses NaN and infinities: NaN compares false with every
    reward, so as a threshold it would let every row through."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()


def _require_folder_for(out: str) -> None:
    """Name the file standing where ``out``'s folder should be (export makes missing ones)."""
    for parent in Path(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise click.ClickException(f"cannot write {out}: {parent} is a file, not a folder")
            return


def register(main: click.Group) -> None:
    @command(main)
    @click.argument("kind", type=click.Choice(["triplets", "sft", "preference", "tasks"]))
    @click.option("--workflow", "-w", default=None, help="Workflow to export.")
    @click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="JSONL file.")
    @click.option(
        "--check",
        "check_path",
        default=None,
        type=click.Path(exists=True, dir_okay=False),
        help="Check FILE against the rules of KIND's consumer and exit.",
    )
    @click.option(
        "--trl",
        is_flag=True,
        help="preference: TRL's prompt/chosen/rejected rather than OpenAI's shape (also --check).",
    )
    @click.option(
        "--inline-provenance",
        is_flag=True,
        help="sft, preference: rollout ids and rewards in each row, not in OUT.meta.jsonl.",
    )
    @click.option("--since", default=None, help="Only rollouts since: 30m, 24h, 7d or a date.")
    @click.option(
        "--filters/--no-filters",
        default=False,
        help="Run the configured filters (YAML filters:) before writing.",
    )
    @click.option(
        "--min-reward", type=FINITE, default=None, help="Keep only rows with reward >= this."
    )
    @click.option(
        "--bad-below",
        type=FINITE,
        default=0.5,
        show_default=True,
        help="Leave out rollouts rated below this (sft, triplets, tasks; preference's chosen).",
    )
    @click.option("--keep-bad", is_flag=True, help="Keep bad-rated rollouts (no --bad-below).")
    @click.option("--rated-only", is_flag=True, help="Leave out rollouts without a reward.")
    @click.option(
        "--min-margin",
        type=FINITE,
        default=0.2,
        show_default=True,
        help="preference: smallest reward gap between the best and the worst answer.",
    )
    @click.option(
        "--all-answers",
        is_flag=True,
        help="tasks: one task per distinct question-answer pair, not one per question.",
    )
    @click.option(
        "--split-by",
        type=click.Choice(["question", "pair"]),
        default="question",
        show_default=True,
        help="tasks: hash the normalized question (no question on both sides) or the qa_hash.",
    )
    @click.option(
        "--refresh-rewards/--no-refresh-rewards",
        default=True,
        show_default=True,
        help="Score rollouts whose feedback is newer than their reward before exporting.",
    )
    @click.option("--env-type", default=None, help="tasks: env_type (default: the workflow).")
    @click.option("--seed", type=int, default=0, show_default=True, help="tasks: split seed.")
    @click.option(
        "--val-fraction",
        type=FINITE,
        default=0.1,
        show_default=True,
        help="tasks: validation share.",
    )
    @click.option("--include-failed", is_flag=True, help="Also export failed rollouts.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    def export(
        cli: Cli,
        kind: str,
        workflow: str | None,
        out: str | None,
        check_path: str | None,
        trl: bool,
        inline_provenance: bool,
        since: str | None,
        filters: bool,
        min_reward: float | None,
        bad_below: float,
        keep_bad: bool,
        rated_only: bool,
        min_margin: float,
        all_answers: bool,
        split_by: str,
        refresh_rewards: bool,
        env_type: str | None,
        seed: int,
        val_fraction: float,
        include_failed: bool,
        as_json: bool,
    ) -> None:
        """Write a dataset as JSON Lines: triplets, sft, preference or tasks (AgentJet).

        sft rows are OpenAI chat fine-tuning JSONL and preference rows OpenAI preference
        fine-tuning JSONL (--trl: TRL's prompt/chosen/rejected); their rollout ids, config
        versions and rewards go to OUT with `.meta` before the suffix, line for line
        (--inline-provenance keeps them in the rows). `tasks` writes OUT (train) and OUT with
        `.val` before the suffix (validation). `--check FILE` checks a file against the rules.

        \b
        The default curation policy (each part has a switch):
        - rewards follow feedback: rollouts whose feedback is newer than their reward are
          scored first (--no-refresh-rewards to export rewards as stored);
        - rollouts rated below 0.5 never enter sft, triplets or tasks (--bad-below, --keep-bad);
          unrated ones do (--rated-only to leave them out);
        - tasks: one task per question (its normalized text) whose answer is the best-rewarded
          one (--all-answers); split by a seeded hash of the normalized question, so no
          question is in both files (--split-by pair);
        - preference: a question's best answer against its worst, rewards at least
          --min-margin apart, the best not rated bad.
        """
        if check_path is not None:
            _check(kind, check_path, trl)
            return
        if workflow is None or out is None:
            raise click.UsageError("give --workflow and --out (or --check FILE)")
        from flywheel_middleware.loop.datasets import export as run_export

        _require_folder_for(out)
        store, config = cli.store, cli.config
        try:
            result = run_export(
                store,
                kind,
                workflow,
                out,
                config=config,
                since=since,
                filters=filters,
                min_reward=min_reward,
                bad_below=None if keep_bad else bad_below,
                rated_only=rated_only,
                min_margin=min_margin,
                per_question=not all_answers,
                split_by=split_by,
                refresh=refresh_rewards,
                env_type=env_type,
                seed=seed,
                val_fraction=val_fraction,
                succeeded_only=not include_failed,
                progress=not as_json,
                inline_provenance=inline_provenance,
                preference_format="trl" if trl else "openai",
            )
        except OSError as exc:
            if exc.filename is None:
                raise
            raise click.ClickException(f"cannot write {exc.filename}: {exc.strerror}") from exc
        if as_json:
            echo_json(
                {
                    "kind": result.kind,
                    "count": result.count,
                    "scanned": result.scanned,
                    "paths": {k: str(v) for k, v in result.paths.items()},
                    "counts": result.counts,
                    "dropped": result.dropped,
                    "duplicates": result.duplicates,
                    "skipped": result.skipped,
                    "bad": result.bad,
                    "unrated": result.unrated,
                    "rewards_refreshed": result.refreshed,
                    "failures": result.failures,
                    "warnings": result.warnings,
                    "unknown_shapes": {
                        "count": result.unknown.count,
                        "example": result.unknown.example,
                    },
                }
            )
        else:
            for name, path in result.paths.items():
                console.print(f"wrote {result.counts.get(name, 0):,} rows to [bold]{path}[/]")
            console.print(
                f"scanned {result.scanned:,} rollouts; rated bad {result.bad:,}, unrated left "
                f"out {result.unrated:,}, skipped {result.skipped:,}, duplicates "
                f"{result.duplicates:,}, dropped by filters {result.dropped or 0}; rewards "
                f"refreshed {result.refreshed:,}"
            )
            for failure in result.failures:
                err_console.print(f"[red]✗[/] {failure}")
            for warning in result.warnings:
                err_console.print(f"warning: {warning}", markup=False)
            if result.unknown.count:
                err_console.print(f"skipped {result.unknown}", markup=False)

    @command(main)
    @click.option("--workflow", "-w", default=None, help="Only this workflow.")
    @click.option("--since", default=None, help="Only rollouts since: 30m, 24h, 7d or a date.")
    @click.option("--dry-run", is_flag=True, help="Compute and show, but do not store.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
    def rewards(
        cli: Cli, workflow: str | None, since: str | None, dry_run: bool, as_json: bool
    ) -> None:
        """Compute rewards from the configured sources (YAML rewards:) and store them."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress

        from flywheel_middleware.loop.datasets import count_rollouts, parse_since
        from flywheel_middleware.loop.rewards import compute_rewards

        start = parse_since(since)
        total = count_rollouts(cli.store, workflow=workflow, since=start)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            disable=as_json,
            console=err_console,
        ) as bar:
            task = bar.add_task("rewards", total=total)
            run = compute_rewards(
                cli.store,
                cli.config,
                workflow=workflow,
                since=start,
                write=not dry_run,
                progress=lambda n: bar.advance(task, n),
            )
        if not dry_run:  # rewards recomputed with new sources: the next cycle reads every day
            from flywheel_middleware.loop.curation import forget

            forget(cli.store, workflow)
        rewarded = [r for r in run.values() if r.value is not None]
        per_source: dict[str, list[float]] = {}
        for r in run.values():
            for name, value in r.sources.items():
                if value is not None:
                    per_source.setdefault(name, []).append(value)
        if as_json:
            echo_json(
                {
                    "rollouts": len(run),
                    "rewarded": len(rewarded),
                    "sources": {
                        k: {"n": len(v), "mean": sum(v) / len(v)} for k, v in per_source.items()
                    },
                    "failures": run.failures,
                }
            )
            return
        table = Table(title=f"rewards over {len(run):,} rollouts ({len(rewarded):,} with a reward)")
        table.add_column("source")
        table.add_column("opinions", justify="right")
        table.add_column("mean", justify="right")
        for name, values in per_source.items():
            table.add_row(name, f"{len(values):,}", f"{sum(values) / len(values):.3f}")
        if rewarded:
            mean = sum(r.value for r in rewarded) / len(rewarded)  # type: ignore[misc]
            table.add_row("[bold]combined[/]", f"{len(rewarded):,}", f"{mean:.3f}")
        console.print(table)
        for failure in run.failures:
            err_console.print(f"[red]✗[/] {failure}")
        if dry_run:
            console.print("dry run: nothing stored")
