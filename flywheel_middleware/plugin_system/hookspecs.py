"""Hook specifications: how a plugin adds filters, reward sources, mutators, promoters and redactors.

A plugin is a module (or object) with functions marked ``@hookimpl``, registered through the
``flywheel_middleware`` entry-point group, or named by dotted path in YAML under ``plugins:``::

    # pyproject.toml of a third-party package
    [project.entry-points.flywheel_middleware]
    my_plugin = "my_package.flywheel_plugin"

    # my_package/flywheel_plugin.py
    from flywheel_middleware import hookimpl
    from flywheel_middleware.plugin_system.base import Filter

    class NoEmptyAnswers(Filter):
        type_name = "no_empty"
        def filter(self, samples): ...

    @hookimpl
    def register_filters():
        return [NoEmptyAnswers]

Each ``register_*`` hook returns a list of classes; YAML selects one by its ``type_name``.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "flywheel_middleware"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_filters() -> list[type]:
    """Return ``Filter`` subclasses: each keeps or drops a sample, with a reason, before it
    enters a dataset. Selected in YAML under ``filters:`` by ``type_name``."""


@hookspec
def register_reward_sources() -> list[type]:
    """Return ``RewardSource`` subclasses: each turns spans, feedback and telemetry into a
    reward in [0, 1] per rollout (or no opinion). Selected under ``rewards:``, combined by weight."""


@hookspec
def register_mutators() -> list[type]:
    """Return ``Mutator`` subclasses: each proposes candidate configs from a base config,
    the declared tunable space and the bad cases. Selected under ``mutators:``."""


@hookspec
def register_promoters() -> list[type]:
    """Return ``Promoter`` subclasses: each decides promote / reject / continue for a running
    experiment, with its evidence. Selected under ``promoters:``."""


@hookspec
def register_redactors() -> list[type]:
    """Return ``Redactor`` subclasses: each removes secrets or personal data from a row before
    it is stored. Selected under ``redactors:`` (the ``redact_span`` hook needs no YAML)."""


@hookspec
def redact_span(span: dict[str, Any]) -> dict[str, Any] | None:
    """Remove secrets or personal data from a span (or rollout) row before it is stored.

    Called on the recorder's writer thread, never on the agent's, with the record's fields as
    a dict (``table`` says which: ``span``, ``rollout``, ``feedback``). Edit it in place or
    return a new dict; every implementation runs, in registration order.
    """
