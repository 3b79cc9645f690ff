"""What every command shares: --config/--store, the lazily opened store, errors, and the
output helpers (tables, ids, cut text, JSON) so every command prints alike."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel_middleware.errors import FlywheelError, safe_url

if TYPE_CHECKING:
    from flywheel_middleware.config import FlywheelConfig

# The modules of this package stay cheap to import (click, rich, the standard library, errors):
# `flywheel --help` imports all of them. A command imports what it needs (the config, the
# store, the loop, plugins) inside its function; tests/core/test_cli_startup.py checks this.

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# Piped output (CI logs, files) gets a wide page instead of rich's 80-column default.
_piped = int(os.environ.get("COLUMNS", "160"))
console = Console(highlight=False, width=None if os.isatty(1) else _piped)
err_console = Console(stderr=True, highlight=False, width=None if os.isatty(2) else _piped)


class Cli:
    """The options shared by every command, and what they open (on first use)."""

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.store_url: str | None = None
        self._config: FlywheelConfig | None = None
        self._store: Any = None

    @property
    def config(self) -> FlywheelConfig:
        """The configuration, its plugin references checked (types, params, ``plugins:``
        paths): a mistake is an error naming the file, line, key path and valid choices."""
        if self._config is None:
            from flywheel_middleware.plugin_system.manager import require_valid_plugins

            config = self.config_as_written
            require_valid_plugins(config, create=False)
            self._config = config
        return self._config

    def require_buildable_plugins(self) -> None:
        """Create every configured plugin once (dotted-path params imported, the plugins'
        own checks run): what the loop does before a cycle, so a mistake fails the command."""
        from flywheel_middleware.plugin_system.manager import require_valid_plugins

        require_valid_plugins(self.config)

    @property
    def config_as_written(self) -> FlywheelConfig:
        """The configuration with its keys validated but its plugins not built (for
        ``flywheel plugins``, which reports their problems itself)."""
        from flywheel_middleware.config import load_config

        return self._config or load_config(self.config_path)

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


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` (as ``as_json``): what a listing prints instead of its table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        fn
    )


def table(title: str | None, columns: Sequence[str], *, numeric: Iterable[str] = ()) -> Table:
    """A table with these columns; ``numeric`` ones are right-aligned. A column named ``id``
    is never cut or wrapped: ids are what a user copies into the next command."""
    numbers = set(numeric)
    out = Table(title=title)
    for name in columns:
        if name == "id":
            out.add_column(name, no_wrap=True, min_width=8, overflow="fold")
        else:
            out.add_column(name, justify="right" if name in numbers else "left")
    return out


def rollout_ids(store: Any, ids: Sequence[str], *, abbreviate: bool | None = None) -> list[str]:
    """The ids to print: whole (by default on a console 120 columns wide or more, and in
    pipes), or abbreviated to the shortest leading part (8 characters or more) no other
    rollout in the store shares, which ``flywheel show`` takes. Time-ordered ids share their
    first dozen characters, so a fixed cut would print the same text on every row."""
    if not (console.width < 120 if abbreviate is None else abbreviate):
        return list(ids)
    from sqlalchemy import func
    from sqlmodel import select

    from flywheel_middleware.store.models import Rollout

    labels = []
    with store.session() as session:
        for rid in ids:
            before = session.exec(select(func.max(Rollout.id)).where(Rollout.id < rid)).one()
            after = session.exec(select(func.min(Rollout.id)).where(Rollout.id > rid)).one()
            shared = max(len(os.path.commonprefix([rid, n])) for n in (before or "", after or ""))
            labels.append(rid[: max(8, shared + 1)])
    return labels


def said(value: Any, width: int, *, answer: bool = False, markup: bool = True) -> str:
    """A rollout's question (or final answer) text for a cell; its JSON if no message reads."""
    from flywheel_middleware.messages import answer_text, question_text

    text = (answer_text if answer else question_text)(value)
    return (short if markup else cut)(text or value, width)


def short(value: Any, width: int = 80) -> str:
    """``cut`` for rich output: recorded text like ``[email]`` is shown, not read as markup."""
    return escape(cut(value, width))


def cut(value: Any, width: int = 80) -> str:
    """One line of at most ``width`` characters: cut at a word boundary (mid-word only when
    one word is most of the width), with an ellipsis where text was cut."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = text[: width - 1]
    space = head.rfind(" ")
    if space >= width * 0.6:
        head = head[:space]
    return head.rstrip(" ,.;:-") + "…"


MAX_MATCHES = 10
"""How many rollouts an ambiguous-prefix error lists."""


def find_rollout(store: Any, ref: str) -> Any:
    """The rollout ``ref`` names: its full id, or a prefix no other rollout's id has.

    An unknown id and an ambiguous prefix are different errors; the second lists the
    matching rollouts (id, workflow, start, question) so the user can pick one.
    """
    from sqlalchemy import func
    from sqlmodel import select

    from flywheel_middleware.store.models import Rollout

    ref = ref.strip()
    matches: Sequence[Any] = []
    if ref:
        with store.session() as session:
            row = session.get(Rollout, ref)
            if row is not None:
                return row
            prefix = Rollout.id.startswith(ref, autoescape=True)
            count = session.exec(select(func.count()).select_from(Rollout).where(prefix)).one()
            matches = session.exec(
                select(Rollout).where(prefix).order_by(Rollout.id.desc()).limit(MAX_MATCHES)
            ).all()
    if not matches:
        raise click.ClickException(f"no rollout with id {ref!r} (nor one whose id starts with it)")
    if count == 1:
        return matches[0]
    listed = "\n".join(
        f"  {r.id}  {r.workflow}  {r.started_at:%Y-%m-%d %H:%M:%S}  "
        f"{said(r.input, 50, markup=False)}"
        for r in matches
    )
    more = f"\n  … and {count - len(matches):,} more" if count > len(matches) else ""
    raise click.ClickException(
        f"ambiguous prefix {ref!r}: {count:,} rollouts have ids starting with it; give more "
        f"of the id:\n{listed}{more}"
    )


def command_name() -> str:
    """How to run flywheel as this process was run (``.venv/bin/flywheel`` after make demo),
    so the suggested commands work without an activated virtualenv."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "flywheel" and os.sep in argv0:
        return os.path.relpath(argv0)
    return "flywheel"
