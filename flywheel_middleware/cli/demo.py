"""``flywheel demo``: the README's main command."""

from __future__ import annotations

import click

from flywheel_middleware.cli.common import console


def register(main: click.Group) -> None:
    @main.command("demo")
    @click.option(
        "--dir",
        "folder",
        default="flywheel-demo",
        show_default=True,
        help="Folder for the demo's config, SQLite store, reports and datasets.",
    )
    @click.option("--cycles", default=8, show_default=True, type=click.IntRange(1, 100))
    @click.option(
        "--requests",
        "requests_per_cycle",
        default=400,
        show_default=True,
        type=click.IntRange(10, 100_000),
        help="Customer requests per cycle.",
    )
    @click.option("--seed", default=7, show_default=True)
    @click.option(
        "--keep", is_flag=True, help="Keep the previous run's store instead of starting fresh."
    )
    def demo(folder: str, cycles: int, requests_per_cycle: int, seed: int, keep: bool) -> None:
        """Run the flywheel offline on a LangChain support agent with simulated customers."""
        from flywheel_middleware.demo import DemoSettings, render_summary, run_demo

        console.rule("[bold]flywheel demo[/] — a support agent learns from its customers")
        console.print(
            "Version 1 of the agent's config retrieves 1 article at temperature 0.9; customers "
            "are not happy.\nEach cycle: customers ask, rate and click; then the controller "
            "observes → curates → decides → generates (mode: auto).\n"
        )
        settings = DemoSettings(
            folder=folder,
            cycles=cycles,
            requests_per_cycle=requests_per_cycle,
            seed=seed,
            fresh=not keep,
        )
        result = run_demo(settings, console=console)
        console.print()
        render_summary(result, console)
