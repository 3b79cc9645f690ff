"""What every command shares: --config/--store, the lazily opened store, errors, output."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from flywheel_middleware.errors import FlywheelError, safe_url

if TYPE_CHECKING:
    from flywheel_middleware.config import FlywheelConfig

# The modules of this package stay cheap to import (click, rich, the standard library, errors):
# `flywheel --help` imports all of them. A command imports what it needs (the config, the
# store, the loop, plugins) inside its function; tests/core/test_cli_startup.py checks this.

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# Piped output (CI logs, files) gets a wide page instead of rich's 80-column default.
_width = None if os.isatty(1) else int(os.environ.get("COLUMNS", "160"))
console = Console(highlight=False, width=_width)
err_console = Console(stderr=True, highlight=False)


class Cli:
    """The options shared by every command, and what they open (on first use)."""

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.store_url: str | None = None
        self._config: FlywheelConfig | None = None
        self._store: Any = None

    @property
    def config(self) -> FlywheelConfig:
        if self._config is None:
            from flywheel_middleware.config import load_config

            self._config = load_config(self.config_path)
        return self._config

    @property
    def url(self) -> str:
        return self.store_url or os.environ.get("FLYWHEEL_STORE_URL") or self.config.store.url

    @property
    def shown_url(self) -> str:
        """The store URL as output may show it: its password as ``***``."""
        return safe_url(self.url)

    @property
    def store(self) -> Any:
        if self._store is None:
            from flywheel_middleware.store.database import Store

            self._store = Store(self.url)
        return self._store

    def activate_runtime(self) -> None:
        """Point the library's runtime (fw.*) at this command's config and store."""
        from flywheel_middleware import runtime

        runtime.configure(config=self.config, store_url=self.url)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    cli = ctx.ensure_object(Cli)
    if value is not None:
        if param.name == "config_path":
            cli.config_path = value
            cli._config = None
        else:
            cli.store_url = value
            cli._store = None
    return value


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --config and --store (accepted before or after the command name)."""
    fn = click.option(
        "--store",
        "store_url",
        metavar="URL",
        default=None,
        expose_value=False,
        callback=_remember,
        help="Store URL (overrides the config; FLYWHEEL_STORE_URL also works).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        metavar="PATH",
        default=None,
        expose_value=False,
        callback=_remember,
        help="Configuration file (default ./flywheel.yaml).",
    )(fn)
    return fn


def command(group: click.Group, name: str | None = None, **kwargs: Any) -> Callable[..., Any]:
    """A subcommand with --config/--store, the Cli object as first argument, clear errors."""

    def decorate(fn: Callable[..., Any]) -> click.Command:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            cli = click.get_current_context().ensure_object(Cli)
            try:
                return fn(cli, *args, **kw)
            except FlywheelError as exc:
                raise click.ClickException(str(exc)) from exc

        wrapper = common_options(wrapper)
        return group.command(name, **kwargs)(wrapper)

    return decorate


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def said(value: Any, width: int, *, answer: bool = False) -> str:
    """A rollout's question (or final answer) text for a cell; its JSON if no message reads."""
    from flywheel_middleware.messages import answer_text, question_text

    text = (answer_text if answer else question_text)(value)
    return short(text or value, width)


def short(value: Any, width: int = 80) -> str:
    """One line of at most ``width`` characters for a table cell."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
