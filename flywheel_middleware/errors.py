"""Errors the library raises to its users (never into a host agent from an adapter)."""

from __future__ import annotations


class FlywheelError(Exception):
    """Base class for every error flywheel-middleware raises on purpose."""


class ConfigError(FlywheelError, ValueError):
    """A configuration file or value is invalid; the message names the file, key and line."""


class StoreError(FlywheelError):
    """The store cannot be opened or used."""


class UnknownRolloutError(FlywheelError, LookupError):
    """Feedback or a lookup named a rollout that does not exist."""


class InvalidFeedbackError(FlywheelError, ValueError):
    """Feedback whose value, key or source is not acceptable."""


class PluginError(FlywheelError):
    """A plugin could not be found, loaded or run."""


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: the only form of a store URL that may
    appear in a message, a ``repr`` or a log line."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if not password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
