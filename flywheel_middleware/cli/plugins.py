"""``flywheel plugins``: every plugin found, its kind, YAML type and where it came from."""

from __future__ import annotations

import click
from rich.table import Table

from flywheel_middleware.cli.common import Cli, command, console, echo_json, err_console


def register(main: click.Group) -> None:
    @command(main)
    @click.option(
        "--kind", type=click.Choice(["filter", "reward", "mutator", "promoter", "redactor"])
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def plugins(cli: Cli, kind: str | None, as_json: bool) -> None:
        """List plugins: built-ins, installed packages (entry points) and YAML `plugins:` paths.

        Also checks the configuration's filters/rewards/... specs and reports those that
        would not build (unknown type, bad params).
        """
        from flywheel_middleware.plugin_system.manager import check_config, plugin_manager

        manager = plugin_manager(cli.config)
        infos = [i for i in manager.all_plugins() if kind is None or i.kind == kind]
        problems = check_config(cli.config)
        if as_json:
            echo_json(
                {
                    "plugins": [
                        {
                            "kind": i.kind,
                            "type": i.type_name,
                            "origin": i.origin,
                            "class": i.module,
                            "description": i.description,
                        }
                        for i in infos
                    ],
                    "problems": problems,
                }
            )
        else:
            table = Table(title="flywheel plugins")
            for col in ("kind", "type", "from", "class", "description"):
                table.add_column(col)
            for i in infos:
                table.add_row(i.kind, i.type_name, i.origin, i.module, i.description)
            console.print(table)
            for problem in problems:
                err_console.print(f"[red]✗[/] {problem}")
        if problems:
            raise SystemExit(1)
