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
