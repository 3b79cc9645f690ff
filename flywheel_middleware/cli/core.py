"""Core commands: init, stats, bad-cases, rollouts, show, feedback, db upgrade."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.tree import Tree

from flywheel_middleware.cli.common import (
    Cli,
    command,
    command_name,
    console,
    echo_json,
    find_rollout,
    json_option,
    rollout_ids,
    said,
    short,
    table,
)

if TYPE_CHECKING:
    from flywheel_middleware.store.queries import SpanNode

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "flywheel.yaml"


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def register(main: click.Group) -> None:
    @command(main)
    @click.option("--force", is_flag=True, help="Overwrite an existing file.")
    @click.argument("path", default="flywheel.yaml", required=False)
    def init(cli: Cli, path: str, force: bool) -> None:
        """Write a commented flywheel.yaml to start from."""
        target = Path(path)
        if target.exists() and not force:
            raise click.ClickException(f"{path} exists; use --force to overwrite it")
        shutil.copyfile(TEMPLATE, target)
        console.print(
            f"wrote [bold]{path}[/] — edit the workflows, then run [bold]{command_name()} stats[/]"
        )

    @command(main)
    @click.option("--workflow", "-w", default=None, help="Only this workflow.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def stats(cli: Cli, workflow: str | None, as_json: bool) -> None:
        """Totals per workflow: rollouts, errors, latency, ratings, low ratings, triggers."""
        from flywheel_middleware.store import queries

        rule = cli.config.triggers.low_rating
        rows = queries.stats(cli.store, low_rating_max=rule.max_rating, workflow=workflow)
        if as_json:
            echo_json([{**r.__dict__, "error_rate": r.error_rate} for r in rows])
            return
        columns = (
            "workflow",
            "rollouts",
            "error rate",
            "avg latency ms",
            "rated",
            "avg rating",
            f"low (≤{rule.max_rating:g})",
            "thumbs up",
            "triggers",
        )
        out = table(f"flywheel stats — {cli.shown_url}", columns, numeric=columns[1:])
        for r in rows:
            out.add_row(
                r.workflow,
                str(r.rollouts),
                f"{r.error_rate:.1%}",
                _fmt(r.avg_latency_ms),
                str(r.rated),
                _fmt(r.avg_rating, ".2f"),
                str(r.low_rated),
                f"{r.thumbs_up}/{r.thumbs_total}" if r.thumbs_total else "–",
                str(len(r.triggers)),
            )
        console.print(out)
        for r in rows:
            for t in r.triggers[-3:]:
                console.print(
                    f"[yellow]⚠ improvement trigger[/] {r.workflow} at {t['at']:%Y-%m-%d %H:%M}: {t['reason']}"
                )
        if not rows:
            console.print("no rollouts recorded yet")

    @command(main, "bad-cases")
    @click.option("--workflow", "-w", default=None)
    @click.option("--limit", "-n", default=20, show_default=True)
    @click.option(
        "--max-rating",
        default=None,
        type=float,
        help="Rated at most this (default: the trigger's).",
    )
    @click.option("--json", "as_json", is_flag=True)
    def bad_cases(
        cli: Cli, workflow: str | None, limit: int, max_rating: float | None, as_json: bool
    ) -> None:
        """Rollouts rated low or failed, worst first, with the conversation."""
        from flywheel_middleware.store import queries

        max_rating = cli.config.triggers.low_rating.max_rating if max_rating is None else max_rating
        cases = queries.bad_cases(cli.store, workflow=workflow, max_rating=max_rating, limit=limit)
        if as_json:
            echo_json(
                [
                    {
                        "rollout_id": c.rollout.id,
                        "workflow": c.rollout.workflow,
                        "rating": c.rating,
                        "status": c.rollout.status,
                        "error": c.rollout.error,
                        "input": c.rollout.input,
                        "output": c.rollout.output,
                        "comments": c.comments,
                    }
                    for c in cases
                ]
            )
            return
        if not cases:
            console.print("no bad cases 🎉")
            return
        for c in cases:
            r = c.rollout
            verdict = f"rating {c.rating:g}" if c.rating is not None else ""
            if r.status == "failed":
                verdict = f"{verdict} failed".strip()
            console.rule(f"[bold]{r.id}[/] {r.workflow} — [red]{verdict}[/]")
            console.print(f"[cyan]user:[/] {said(r.input, 400)}")
            console.print(f"[magenta]agent:[/] {said(r.output, 400, answer=True)}")
            if r.error:
                console.print(f"[red]error:[/] {short(r.error, 300)}")
            for comment in c.comments:
                console.print(f"[yellow]comment:[/] {short(comment, 300)}")

    @command(main)
    @click.option("--workflow", "-w", default=None)
    @click.option("--status", type=click.Choice(["running", "succeeded", "failed"]), default=None)
    @click.option("--limit", "-n", default=20, show_default=True)
    @json_option
    def rollouts(
        cli: Cli, workflow: str | None, status: str | None, limit: int, as_json: bool
    ) -> None:
        """The most recent rollouts, newest first, with their full ids (for `flywheel show`)."""
        from flywheel_middleware.messages import answer_text, question_text
        from flywheel_middleware.store import queries

        rows = queries.list_rollouts(cli.store, workflow=workflow, limit=limit, status=status)
        if as_json:
            echo_json(
                [
                    {
                        "id": r.id,
                        "workflow": r.workflow,
                        "started_at": r.started_at,
                        "status": r.status,
                        "latency_ms": r.latency_ms,
                        "variant": r.variant,
                        "question": question_text(r.input),
                        "answer": answer_text(r.output),
                    }
                    for r in rows
                ]
            )
            return
        columns = (
            "id",
            "workflow",
            "started (UTC)",
            "status",
            "ms",
            "variant",
            "question",
            "answer",
        )
        out = table(None, columns, numeric=("ms",))
        for r, rid in zip(rows, rollout_ids(cli.store, [r.id for r in rows]), strict=True):
            out.add_row(
                rid,
                r.workflow,
                f"{r.started_at:%Y-%m-%d %H:%M:%S}",
                r.status,
                _fmt(r.latency_ms, ".0f"),
                r.variant or "",
                said(r.input, 40),
                said(r.output, 40, answer=True),
            )
        console.print(out if rows else "no rollouts recorded yet")

    @command(main)
    @click.argument("rollout_id")
    @click.option("--json", "as_json", is_flag=True)
    def show(cli: Cli, rollout_id: str, as_json: bool) -> None:
        """One rollout and its span tree (its id, or a prefix only that id has)."""
        from flywheel_middleware.store import queries

        r = find_rollout(cli.store, rollout_id)
        spans = queries.spans_of(cli.store, r.id)
        fb = queries.feedback_of(cli.store, r.id)
        if as_json:
            echo_json(
                {
                    "rollout": r.model_dump(),
                    "spans": [s.model_dump() for s in spans],
                    "feedback": [f.model_dump() for f in fb],
                }
            )
            return
        console.print(render_tree(r, spans))
        for f in fb:
            console.print(
                f"  feedback \\[{f.source}] {f.key}={_fmt(f.value, 'g')} {short(f.comment, 100)}"
            )

    @main.group()
    def db() -> None:
        """Schema management."""

    @command(db, "upgrade")
    @click.argument("revision", default="head")
    def db_upgrade(cli: Cli, revision: str) -> None:
        """Apply Alembic migrations to the store (the schema is also created on first use)."""
        from flywheel_middleware.store.database import Store

        store = Store(cli.url, migrate=False)
        before = store.current_revision()
        store.upgrade(revision)
        console.print(f"{cli.shown_url}: schema {before or 'empty'} → {store.current_revision()}")

    @command(db, "replay")
    @click.option(
        "--timeout", default=120.0, show_default=True, help="Seconds to wait for the store."
    )
    def db_replay(cli: Cli, timeout: float) -> None:
        """Write to the store what processes that ended before their records reached it
        left in its journal (any recorder on the store also does this when it starts)."""
        from flywheel_middleware import runtime

        cli.activate_runtime()
        recorder = runtime.get_recorder()
        done = recorder.flush(timeout)
        counters = recorder.counters
        console.print(
            f"{cli.shown_url}: {counters.replayed} rows replayed from {recorder.journal_dir}"
            + (
                f", {counters.dead_lettered} set aside (dead-*.jsonl there)"
                if counters.dead_lettered
                else ""
            )
        )
        if not done:
            raise click.ClickException(
                f"the store did not take everything within {timeout:g} s; the rest stays "
                "in the journal (run this again)"
            )


def render_tree(rollout: Any, spans: list[Any]) -> Tree:
    """The span tree as a rich Tree: kind, name, duration, model, tokens, status."""
    from flywheel_middleware.store import queries

    status = "[green]✓[/]" if rollout.status == "succeeded" else f"[red]✗ {rollout.status}[/]"
    label = (
        f"[bold]{rollout.workflow}[/] rollout {rollout.id} {status} {_fmt(rollout.latency_ms)} ms"
    )
    if rollout.variant:
        label += f" variant={rollout.variant}"
    tree = Tree(label)
    tree.add(f"[cyan]input[/] {said(rollout.input, 100)}")

    def add(parent: Tree, node: SpanNode) -> None:
        s = node.span
        parts = [f"[blue]{s.kind}[/]", f"[bold]{s.name}[/]", f"{_fmt(s.duration_ms)} ms"]
        if s.node:
            parts.append(f"node={s.node}")
        if s.model:
            parts.append(f"model={s.model}")
        if s.input_tokens or s.output_tokens:
            parts.append(f"tokens={s.input_tokens or 0}→{s.output_tokens or 0}")
        if s.status != "ok":
            parts.append(f"[red]{s.status}: {short(s.error, 80)}[/]")
        elif s.output is not None:
            parts.append(f"→ {said(s.output, 60, answer=True)}")
        branch = parent.add(" ".join(parts))
        for child in node.children:
            add(branch, child)

    for root in queries.span_tree(spans):
        add(tree, root)
    tree.add(f"[magenta]output[/] {said(rollout.output, 100, answer=True)}")
    return tree
