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

from .config import FlywheelConfig, load_config, parse_config
from .errors import (
    ConfigError,
    FlywheelError,
    InvalidFeedbackError,
    PluginError,
    StoreError,
    UnknownRolloutError,
)
from .hookspecs import hookimpl
from .routing import route
from .runtime import (
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
from .tracing import (
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
