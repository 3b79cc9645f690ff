"""What capture hands its work to: the split between the cheap API and the SDK behind it.

Handles only build records; where those go, which config a request gets and what feedback
does is the backend's business. ``flywheel_middleware.runtime`` installs the process's
backend when the package is imported (as OpenTelemetry's SDK installs a tracer provider),
so this layer never imports the store, the recorder or the loop.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("flywheel_middleware")


class Backend(Protocol):
    """The calls capture makes; ``flywheel_middleware.runtime.ProcessBackend`` answers them."""

    def enqueue(self, record: Any) -> None:
        """Take a finished record (or a packed call record) for the store; never raises."""

    def rollout_opened(self, rollout_id: str, workflow: str) -> None:
        """A rollout opened in this process (feedback for it is accepted from now on)."""

    def rollout_finished(self, rollout_id: str, workflow: str) -> None:
        """A rollout finished here and may not be written yet."""

    def resolve(self, handle: Any) -> Any:
        """The ``Resolution`` (config and how it was chosen) for an open rollout, or None."""

    def feedback(self, rollout_id: str, rating: Any = None, **kwargs: Any) -> None:
        """Record feedback about a rollout (``fw.feedback``)."""

    def otel_emit(self) -> bool:
        """Whether rollouts and spans are mirrored into OpenTelemetry (asked once)."""


class _Guarded:
    """The installed backend, with the calls a handle makes while the host runs made safe:
    a failing store is logged, never raised into the host agent. ``resolve`` and ``feedback``
    answer the caller, so their errors are the caller's."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def enqueue(self, record: Any) -> None:
        try:
            self.inner.enqueue(record)
        except Exception:
            log.exception("flywheel: a record could not be queued")

    def rollout_opened(self, rollout_id: str, workflow: str) -> None:
        try:
            self.inner.rollout_opened(rollout_id, workflow)
        except Exception:
            log.exception("flywheel: backend failed on an opened rollout")

    def rollout_finished(self, rollout_id: str, workflow: str) -> None:
        try:
            self.inner.rollout_finished(rollout_id, workflow)
        except Exception:
            log.exception("flywheel: backend failed on a finished rollout")

    def otel_emit(self) -> bool:
        try:
            return self.inner.otel_emit()
        except Exception:  # an unreadable configuration: no mirroring
            log.exception("flywheel: could not read whether to mirror into OpenTelemetry")
            return False

    def resolve(self, handle: Any) -> Any:
        return self.inner.resolve(handle)

    def feedback(self, rollout_id: str, rating: Any = None, **kwargs: Any) -> None:
        self.inner.feedback(rollout_id, rating, **kwargs)


_backend: _Guarded | None = None


def install(backend: Backend) -> None:
    """Make ``backend`` the one capture talks to (the runtime does this at import)."""
    global _backend
    _backend = backend if isinstance(backend, _Guarded) else _Guarded(backend)


def current() -> Backend:
    """The installed backend."""
    if _backend is None:
        raise RuntimeError("no flywheel backend installed: import flywheel_middleware first")
    return _backend
