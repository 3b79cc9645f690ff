"""Growth of the store: ``flywheel db maintain`` (time partitions on PostgreSQL) and
``flywheel db prune`` (retention). They join the ``db`` group the core commands define."""

from __future__ import annotations

import click

from flywheel_middleware.cli.common import Cli, command, console, echo_json, json_option, table


def register(main: click.Group) -> None:
    db = main.commands["db"]
    assert isinstance(db, click.Group), "the core commands define the db group first"

    @command(db, "maintain")
    @click.option(
        "--partition",
        is_flag=True,
        help="Convert rollout, span, feedback and telemetry_event to time-partitioned tables "
        "first: for a store made before partitioning was the default (a new PostgreSQL "
        "store is partitioned already); each table is copied in one transaction while "
        "writers wait.",
    )
    @click.option(
        "--interval",
        type=click.Choice(["day", "week", "month"]),
        default="week",
        show_default=True,
        help="The span of one partition, when converting.",
    )
    @click.option(
        "--ahead",
        type=click.IntRange(min=0),
        default=4,
        show_default=True,
        help="Partitions created past the current one.",
    )
    @json_option
    def db_maintain(cli: Cli, partition: bool, interval: str, ahead: int, as_json: bool) -> None:
        """PostgreSQL: create the time partitions of the growing tables ahead of time
        (`flywheel run` does it daily; running it again changes nothing). Rows that reached a
        table's DEFAULT partition meanwhile move into the partition made for them."""
        from flywheel_middleware.store import partitions

        report = partitions.maintain(cli.store, partition=partition, interval=interval, ahead=ahead)
        if as_json:
            echo_json(
                {
                    "converted": report.converted,
                    "created": report.created,
                    "moved": report.moved,
                    "not_partitioned": report.not_partitioned,
                }
            )
            return
        for name, rows in report.converted.items():
            console.print(f"{name}: partitioned by time ({rows} rows copied)")
        if len(report.not_partitioned) < len(partitions.TIME_COLUMN):
            console.print(
                f"{cli.shown_url}: {len(report.created)} partition(s) created"
                + (f": {', '.join(report.created)}" if report.created else " (all there already)")
            )
        for name, rows in report.moved.items():
            console.print(f"{name}: {rows} row(s) moved in from the DEFAULT partition")
        if report.not_partitioned:
            console.print(
                f"[yellow]not partitioned:[/] {', '.join(report.not_partitioned)} "
                "(flywheel db maintain --partition converts them)"
            )

    @command(db, "prune")
    @click.option(
        "--older-than",
        "older_than",
        default=None,
        metavar="AGE",
        help="Remove rows older than this (90d, 12w, 36h); default retention.keep.",
    )
    @click.option(
        "--batch",
        type=click.IntRange(min=1),
        default=5000,
        show_default=True,
        help="Rows deleted per transaction.",
    )
    @json_option
    def db_prune(cli: Cli, older_than: str | None, batch: int, as_json: bool) -> None:
        """Remove rollouts, spans, feedback and telemetry events older than AGE, except what a
        running experiment needs (its rollouts and theirs); a removed rollout's later spans,
        feedback and events go with it. Config versions, experiments and the audit log are
        kept. PostgreSQL drops whole time partitions where it can.
        `flywheel run` prunes daily when retention.keep is set."""
        from datetime import timedelta

        from flywheel_middleware.config import parse_duration
        from flywheel_middleware.store import retention

        age = older_than or cli.config.retention.keep
        if age is None:
            raise click.UsageError(
                "say how old is too old: --older-than 90d, or retention: {keep: 90d} in "
                f"the config ({cli.config.source or 'none loaded'})"
            )
        try:
            seconds = parse_duration(age)
        except ValueError as exc:
            where = "'--older-than'" if older_than else "retention.keep"
            raise click.BadParameter(str(exc), param_hint=where) from None
        report = retention.prune(cli.store, timedelta(seconds=seconds), batch=batch)
        if as_json:
            echo_json(
                {
                    "cutoff": report.cutoff.isoformat(),
                    "deleted": report.deleted,
                    "kept_for_experiments": report.kept,
                    "dropped_partitions": report.dropped,
                }
            )
            return
        out = table(
            f"pruned rows older than {report.cutoff:%Y-%m-%d %H:%M} UTC",
            ("table", "removed", "kept for running experiments"),
            numeric=("removed", "kept for running experiments"),
        )
        for name, removed in report.deleted.items():
            out.add_row(name, str(removed), str(report.kept.get(name, 0)))
        console.print(out)
        if report.dropped:
            console.print(f"partitions dropped: {', '.join(report.dropped)}")
