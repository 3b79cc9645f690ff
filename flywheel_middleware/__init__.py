"""flywheel-middleware: a data flywheel for LLM agents, as middleware.

The cheap API the agent calls lives here; the work behind it (the store, the recorder's
writer thread, the control loop) starts lazily and never runs on the agent's thread.

    import flywheel_middleware as fw
    fw.configure("flywheel.yaml")
    with fw.rollout("qa", user_id="u1") as r:
        answer = run_agent(question, **r.config["llm"])
    fw.feedback(r.id, rating=5)
"""

from __future__ import annotations

from flywheel_middleware.capture.handles import (
    RolloutHandle,
    SpanHandle,
    current_rollout,
    current_span,
    open_rollout,
    rollout,
    span,
    start_span,
    traced,
)
from flywheel_middleware.config import FlywheelConfig, load_config, parse_config
from flywheel_middleware.errors import (
    ConfigError,
    FlywheelError,
    InvalidFeedbackError,
    PluginError,
    StoreError,
    UnknownRolloutError,
)
from flywheel_middleware.learn.routing import route
from flywheel_middleware.plugin_system.hookspecs import hookimpl
from flywheel_middleware.runtime import (
    configure,
    feedback,
    flush,
    get_config,
    recorder,
    resolve,
    set_resolver,
    shutdown,
    store,
)

__version__ = "0.1.0"

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
    "hookimpl",
    "get_config",
    "load_config",
    "open_rollout",
    "parse_config",
    "recorder",
    "resolve",
    "rollout",
    "route",
    "set_resolver",
    "shutdown",
    "span",
    "start_span",
    "store",
    "traced",
]
