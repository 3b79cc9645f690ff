"""Dashboard responses computed on one thread of their own and kept for a few seconds.

The dashboard's queries are heavy; run on the request thread pool, a handful of them hold every
database connection and the resolver's requests wait. Here at most one computes at a time,
requests for the same view share that computation, a view younger than ``ttl`` seconds is
served as it is, and an older one is served while its refresh runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any

log = logging.getLogger("flywheel_middleware.service")
IDLE_SECONDS = 30.0  # the worker thread ends after this long without work


class ViewsBusy(Exception):
    """More computations are waiting than ``max_pending``."""


class _Entry:
    __slots__ = ("value", "expires", "pending")

    def __init__(self) -> None:
        self.value: Any = None
        self.expires = 0.0  # 0: no value yet
        self.pending: Future[Any] | None = None


class ViewCache:
    """``await get(key, compute)``: ``compute()``'s value for ``key``, computed on the worker."""

    def __init__(self, ttl: float = 5.0, *, max_pending: int = 64, max_entries: int = 256) -> None:
        self.ttl = ttl
        self.max_pending = max_pending
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[tuple[Hashable, Callable[[], Any], _Entry]] = SimpleQueue()
        self._pending = 0
        self._worker: threading.Thread | None = None

    async def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._evict()
                entry = self._entries[key] = _Entry()
            self._entries.move_to_end(key)
            now = time.monotonic()
            if entry.expires and now < entry.expires:
                return entry.value
            if entry.pending is None:
                if self._pending >= self.max_pending:
                    raise ViewsBusy(f"{self._pending} dashboard views are already waiting")
                entry.pending = Future()
                entry.pending.set_running_or_notify_cancel()  # a leaving client cancels nobody's
                self._pending += 1
                self._jobs.put((key, compute, entry))
                if self._worker is None or not self._worker.is_alive():  # none, or forked
                    self._worker = threading.Thread(
                        target=self._run, name="flywheel-dashboard", daemon=True
                    )
                    self._worker.start()
            if entry.expires:  # stale: serve it while the refresh runs
                return entry.value
            pending = entry.pending
        return await asyncio.wrap_future(pending)

    def _evict(self) -> None:
        for key in list(self._entries):
            if len(self._entries) < self.max_entries:
                return
            if self._entries[key].pending is None:
                del self._entries[key]

    def _run(self) -> None:
        while True:
            try:
                key, compute, entry = self._jobs.get(timeout=IDLE_SECONDS)
            except Empty:
                with self._lock:  # jobs are queued under the lock: none can be missed
                    if not self._pending:
                        self._worker = None
                        return
                continue
            try:
                value = compute()
            except Exception as exc:  # the requests waiting for it get the error
                log.warning("dashboard view %r failed: %s", key, exc)
                error: BaseException | None = exc
            else:
                error = None
            with self._lock:
                future, entry.pending = entry.pending, None
                self._pending -= 1
                if error is None:
                    entry.value, entry.expires = value, time.monotonic() + self.ttl
            if future is not None:
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
