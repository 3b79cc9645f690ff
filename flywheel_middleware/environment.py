"""Tuning numbers read from environment variables (``FLYWHEEL_RESOLVER_TTL``,
``FLYWHEEL_CYCLE_LEASE``, ``FLYWHEEL_OTLP_*``): one reader, so each refuses a bad value the
same way, naming the variable and what it holds."""

from __future__ import annotations

import os

from flywheel_middleware.errors import ConfigError


def env_number(name: str, default: float, *, allow_zero: bool = False) -> float:
    """``$name`` as a number, ``default`` when unset or blank; a ``ConfigError`` when it is not
    a number, negative, or zero where ``allow_zero`` is false."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0 or value != value or (value == 0 and not allow_zero):
        limit = "must not be negative" if allow_zero else "must be above 0"
        raise ConfigError(f"{name}={raw!r} {limit}")
    return value
