"""The ``flywheel`` command line.

Each module in this package defines ``register(main)`` and adds its commands; they are found
by listing the package, so a new command group is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

from flywheel_middleware.cli.common import CONTEXT_SETTINGS, Cli, common_options


@click.group(context_settings=CONTEXT_SETTINGS)
@common_options
@click.version_option(package_name="flywheel-middleware")
@click.pass_context
def main(ctx: click.Context, **_: object) -> None:
    """flywheel: record what your agent does, learn from it, and ship better configs safely."""
    ctx.ensure_object(Cli)


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in ("common",) or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(main)


_register_all()
