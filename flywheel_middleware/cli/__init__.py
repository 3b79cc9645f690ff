"""The ``flywheel`` command line.

Each module in this package defines ``register(main)`` and adds its commands; a new command
group is one new file and one name in ``COMMAND_MODULES``.

Startup stays fast because these modules import only click, rich and the standard library at
the top: ``flywheel --help`` loads them all to list the commands, and each command imports the
config, the store, the loop or the plugins inside its function (tests/core/test_cli_startup.py).
"""

from __future__ import annotations

import importlib

import click

from flywheel_middleware.cli.common import CONTEXT_SETTINGS, Cli, common_options


@click.group(context_settings=CONTEXT_SETTINGS)
@common_options
@click.version_option(package_name="flywheel-middleware")
@click.pass_context
def main(ctx: click.Context, **_: object) -> None:
    """flywheel: record what your agent does, learn from it, and ship better configs safely."""
    ctx.ensure_object(Cli)


# The modules that add commands, in the order they register them.
COMMAND_MODULES = (
    "analyze",
    "core",
    "demo",
    "evaluate",
    "export",
    "implicit",
    "importer",
    "loop",
    "plugins",
    "serve",
    "storage",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(main)


_register_all()
