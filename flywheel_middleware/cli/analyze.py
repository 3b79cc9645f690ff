"""``flywheel analyze``: hot problems per workflow and node, as a table."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import click
from rich.table import Table

from flywheel_middleware.cli.common import Cli, command, console, echo_json


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def register(main: click.Group) -> None:
    @command(main)
    @click.option("--workflow", "-w", default=None, help="Only this workflow.")
    @click.option(
        "--since",
        default=None,
        help="Window start: 30m, 24h, 7d or a date (default: analysis.since_minutes).",
    )
    @click.option("--all", "show_all", is_flag=True, help="Show every group, not only hot ones.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def analyze(
        cli: Cli, workflow: str | None, since: str | None, show_all: bool, as_json: bool
    ) -> None:
        """Hot problems: calls, latency (avg, p95), error and low-rating rates per node.

        Thresholds and min_calls come from the `analysis:` section of flywheel.yaml.
        """
        from flywheel_middleware.loop.analysis import hot_problems
        from flywheel_middleware.loop.datasets import parse_since

        a = cli.config.analysis
        start = parse_since(since) or datetime.now(timezone.utc) - timedelta(
            minutes=a.since_minutes
        )
        rows = hot_problems(cli.store, cli.config, workflow, start, include_all=show_all)
        if as_json:
            echo_json([p.as_dict() for p in rows])
            return
        table = Table(
            title=f"{'groups' if show_all else 'hot problems'} since {start:%Y-%m-%d %H:%M} UTC "
            f"(min {a.min_calls} calls; latency > {a.latency_ms_max:g} ms, errors > "
            f"{a.error_rate_max:.0%}, low ratings > {a.low_rating_rate_max:.0%}, "
            f"implicit < {a.implicit_satisfaction_min:g})"
        )
        for col in (
            "workflow",
            "node",
            "calls",
            "avg ms",
            "p95 ms",
            "errors",
            "low-rated",
            "implicit",
            "breached",
        ):
            table.add_column(
                col, justify="left" if col in ("workflow", "node", "breached") else "right"
            )
        for p in rows:
            style = "red" if p.breaches else None
            table.add_row(
                p.workflow,
                p.label,
                f"{p.calls:,}",
                _fmt(p.avg_latency_ms, ".0f"),
                _fmt(p.p95_latency_ms, ".0f"),
                f"{p.error_rate:.1%}",
                "–" if p.low_rating_rate is None else f"{p.low_rating_rate:.0%} of {p.rated}",
                _fmt(p.implicit_satisfaction, ".2f"),
                "; ".join(p.breaches) or "–",
                style=style,
            )
        console.print(table)
        if not rows:
            console.print(
                "no hot problems in this window" if not show_all else "no data in this window"
            )
