"""``flywheel plugins``: every plugin found, its kind, YAML type and where it came from."""

from __future__ import annotations

import click
from rich.markup import escape

from flywheel_middleware.cli.common import (
    Cli,
    command,
    console,
    echo_json,
    err_console,
    json_option,
    table,
)


def register(main: click.Group) -> None:
    @command(main)
    @click.option(
        "--kind", type=click.Choice(["filter", "reward", "mutator", "promoter", "redactor"])
    )
    @json_option
    def plugins(cli: Cli, kind: str | None, as_json: bool) -> None:
        """List plugins: built-ins, installed packages (entry points) and YAML `plugins:` paths.

        Also checks the configuration's plugin references (types, params, dotted paths) and
        exits 1 when one would not build. An installed package that fails to load is
        reported once, as a warning, unless the configuration uses it.
        """
        from flywheel_middleware.plugin_system.manager import check_config, plugin_manager

        config = cli.config_as_written
        manager = plugin_manager(config, strict=False, log_failures=False)
        infos = [i for i in manager.all_plugins() if kind is None or i.kind == kind]
        problems = check_config(config)
        warnings = [str(f) for f in manager.package_failures()]
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
                    "warnings": warnings,
                }
            )
        else:
            out = table("flywheel plugins", ("kind", "type", "from", "class", "description"))
            for i in infos:
                out.add_row(i.kind, i.type_name, i.origin, i.module, i.description)
            console.print(out)
            for warning in warnings:
                err_console.print(f"[yellow]⚠ not loaded:[/] {escape(warning)}")
            for problem in problems:
                err_console.print(f"[red]✗[/] {escape(problem)}")
        if problems:
            raise SystemExit(1)
