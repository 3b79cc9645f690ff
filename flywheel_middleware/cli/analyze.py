"""``flywheel analyze``: every node's latency, errors and ratings; the hot ones first."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import click

from flywheel_middleware.cli.common import Cli, command, console, echo_json, json_option, table


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


COLUMNS = ("workflow", "node", "calls", "avg ms", "p95 ms", "errors", "rated", "low-rated")


def register(main: click.Group) -> None:
    @command(main)
    @click.option("--workflow", "-w", default=None, help="Only this workflow.")
    @click.option(
        "--since",
        default=None,
        help="Window start: 30m, 24h, 7d or a date (default: analysis.since_minutes).",
    )
    @click.option(
        "--all",
        "show_all",
        is_flag=True,
        help="Every node with its latency, error and rating figures, not only the hot ones.",
    )
    @json_option
    def analyze(
        cli: Cli, workflow: str | None, since: str | None, show_all: bool, as_json: bool
    ) -> None:
        """Hot problems: calls, latency (avg, p95), error and low-rating rates per node.

        Thresholds and min_calls come from the `analysis:` section of flywheel.yaml. When
        nothing breaches them, every node is listed, so a healthy workflow's latency is
        still visible.
        """
        from flywheel_middleware.loop.analysis import hot_problems
        from flywheel_middleware.loop.datasets import parse_since

        a = cli.config.analysis
        start = parse_since(since) or datetime.now(timezone.utc) - timedelta(
            minutes=a.since_minutes
        )
        groups = hot_problems(cli.store, cli.config, workflow, start, include_all=True)
        hot = [p for p in groups if p.breaches]
        if as_json:
            echo_json([p.as_dict() for p in (groups if show_all else hot)])
            return
        window = f"since {start:%Y-%m-%d %H:%M} UTC"
        console.print(
            f"thresholds: at least {a.min_calls} calls; latency > {a.latency_ms_max:g} ms, "
            f"errors > {a.error_rate_max:.0%}, low ratings > {a.low_rating_rate_max:.0%}, "
            f"implicit satisfaction < {a.implicit_satisfaction_min:g} (analysis: in the config)"
        )
        if not groups:
            console.print(f"no rollouts or spans {window}")
            return
        if show_all or not hot:
            if not show_all:
                console.print(f"[green]no hot problems {window}[/]: every node is within them")
            console.print(_table(f"every node {window}", groups))
        else:
            console.print(_table(f"hot problems {window}", hot))


def _table(title: str, rows: list[Any]) -> Any:
    out = table(
        title,
        (*COLUMNS, "implicit", "breached"),
        numeric=("calls", "avg ms", "p95 ms", "errors", "rated", "low-rated", "implicit"),
    )
    for p in rows:
        out.add_row(
            p.workflow,
            p.label,
            f"{p.calls:,}",
            _fmt(p.avg_latency_ms, ".0f"),
            _fmt(p.p95_latency_ms, ".0f"),
            f"{p.error_rate:.1%}",
            f"{p.rated:,}",
            _fmt(p.low_rating_rate, ".0%"),
            _fmt(p.implicit_satisfaction, ".2f"),
            "; ".join(p.breaches) or "–",
            style="red" if p.breaches else None,
        )
    return out
