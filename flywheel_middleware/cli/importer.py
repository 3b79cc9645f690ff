"""``flywheel import ...``: bring traces recorded elsewhere into the store."""

from __future__ import annotations

from pathlib import Path

import click

from flywheel_middleware.cli.common import Cli, command, console, short


def register(main: click.Group) -> None:
    group = main.commands.get("import")
    if not isinstance(group, click.Group):

        @main.group("import")
        def group() -> None:
            """Import traces from other tools (AgentScope Studio)."""

    @command(group, "agentscope-studio")
    @click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--workflow", "-w", required=True, help="Workflow name for the rollouts.")
    @click.option("--batch-size", default=2000, show_default=True, help="Rows per transaction.")
    def agentscope_studio(cli: Cli, path: Path, workflow: str, batch_size: int) -> None:
        """Import AgentScope Studio's database.sqlite (both span_table shapes, runs, replies,
        messages). Importing the same file again adds nothing."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from flywheel_middleware.importers.agentscope_studio import import_studio

        store = cli.store
        with Progress(
            TextColumn("[bold]importing[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(path.name, total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = import_studio(store, path, workflow, batch_size=batch_size, progress=progress)
        for warning in result.warnings[:20]:
            console.print(f"[yellow]warning:[/] {short(warning, 300)}")
        if len(result.warnings) > 20:
            console.print(f"[yellow]… and {len(result.warnings) - 20} more warnings[/]")
        console.print(
            f"{path}: span_table {result.schema or 'absent'}; read {result.traces} traces, "
            f"{result.spans_read} spans, {result.replies} untraced replies → "
            f"[bold]{result.rollouts_added}[/] new rollouts, [bold]{result.spans_added}[/] new "
            f"spans in {cli.shown_url}"
        )
