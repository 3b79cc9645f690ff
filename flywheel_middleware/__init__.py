"""flywheel-middleware: a data flywheel for LLM agents, as middleware.

The cheap API the agent calls lives here; the work behind it (the store, the recorder's
writer, the control loop, the plugin system) loads on first use and never runs on the
agent's thread.

    import flywheel_middleware as fw
    fw.configure("flywheel.yaml")
    with fw.rollout("qa", user_id="u1") as r:
        answer = run_agent(question, **r.config["llm"])
    fw.feedback(r.id, rating=5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flywheel_middleware.capture.handles import (
    RolloutHandle,
    SpanHandle,
    current_rollout,
    current_span,
    record_call,
    rollout,
    span,
    start_span,
    traced,
)
from flywheel_middleware.errors import (
    ConfigError,
    FlywheelError,
    InvalidFeedbackError,
    PluginError,
    StoreError,
    UnknownRolloutError,
)
from flywheel_middleware.runtime import (
    configure,
    feedback,
    flush,
    get_config,
    get_recorder,
    get_store,
    resolve,
    route,
    set_resolver,
    shutdown,
)

if TYPE_CHECKING:
    from flywheel_middleware.config import FlywheelConfig, load_config, parse_config
    from flywheel_middleware.plugin_system.hookspecs import hookimpl

__version__ = "0.1.0"

# Names whose modules are heavier (pydantic, pluggy): imported when first asked for.
_LAZY = {
    "FlywheelConfig": "flywheel_middleware.config",
    "load_config": "flywheel_middleware.config",
    "parse_config": "flywheel_middleware.config",
    "hookimpl": "flywheel_middleware.plugin_system.hookspecs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flywheel_middleware' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ConfigError",
    "FlywheelConfig",
    "FlywheelError",
    "InvalidFeedbackError",
    "PluginError",
    "RolloutHandle",
    "SpanHandle",
    "StoreError",
    "UnknownRolloutError",
    "configure",
    "current_rollout",
    "current_span",
    "feedback",
    "flush",
    "get_config",
    "get_recorder",
    "get_store",
    "hookimpl",
    "load_config",
    "parse_config",
    "record_call",
    "resolve",
    "rollout",
    "route",
    "set_resolver",
    "shutdown",
    "span",
    "start_span",
    "traced",
]
