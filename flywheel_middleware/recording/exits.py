"""The ways a process ends, and what each does with the records it acknowledged.

- normal exit and ``sys.exit``: ``atexit`` closes every recorder (journal, then store);
- SIGTERM and SIGINT: a handler journals everything first, then chains to the handler that
  was there before: an application's own (uvicorn's graceful shutdown, say) runs as before,
  with each later record journaled as it comes; where the default would have killed the
  process, the recorders are closed and the signal is raised again, so the process still
  ends the way its sender expects;
- SIGKILL and ``os._exit``: nothing runs, and the journal holds what was queued up to one
  ``journal_interval`` before; the next recorder on the store replays it (a
  ``multiprocessing`` or billiard worker's exit runs their ``Finalize`` callbacks first:
  there the recorders are closed);
- ``fork``: the child forgets its parent's recorders (their files and writer are not its).

Handlers can be installed only from the main thread: ``fw.configure`` installs them (unless
``store.handle_signals`` is off), as does a recorder started on the main thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import weakref
from typing import Any

log = logging.getLogger("flywheel_middleware.recording.exits")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_recorders: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}  # the handler ours replaced, per signal
_handling = False


def watch(recorder: Any, *, signals: bool = True) -> None:
    """Close ``recorder`` at exit, and (``signals``) journal it on SIGTERM and SIGINT."""
    _recorders.add(recorder)
    _close_in_pool_workers()
    if signals:
        install_signal_handlers()


_finalizing: set[int] = set()  # the pids whose process pools' exit closes the recorders


def _close_in_pool_workers() -> None:
    """A ``multiprocessing`` (or Celery's billiard) worker ends with ``os._exit``, past
    atexit; both run their ``Finalize`` callbacks first, so the recorders close there."""
    if os.getpid() in _finalizing:
        return
    _finalizing.add(os.getpid())
    for name in ("multiprocessing.util", "billiard.util"):
        pool_util = sys.modules.get(name)
        if pool_util is not None:
            pool_util.Finalize(None, close_all, exitpriority=100)


def unwatch(recorder: Any) -> None:
    _recorders.discard(recorder)


def install_signal_handlers() -> bool:
    """Put our handler in front of SIGTERM's and SIGINT's (chaining to them); False off the
    main thread, where Python cannot set handlers: the next call from it does. Once ours
    was installed, a handler the application put in front of it later is left there (it
    chains to ours, or means to replace it)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in _SIGNALS:
        if signum in _previous:
            continue
        current = signal.getsignal(signum)
        if current is None:  # set from C, not Python: leave it alone
            continue
        _previous[signum] = current
        signal.signal(signum, _on_signal)
    return True


def _mine() -> list[Any]:
    pid = os.getpid()
    return [r for r in list(_recorders) if r.owner_pid == pid]


def close_all() -> None:
    for recorder in _mine():
        try:
            recorder.close()
        except Exception:
            log.exception("flywheel: closing a recorder at exit failed")


def _on_signal(signum: int, frame: Any) -> None:
    global _handling
    previous = _previous.get(signum, signal.SIG_DFL)
    if _handling:  # a second signal while the first is handled: just pass it on
        _chain(previous, signum, frame)
        return
    _handling = True
    try:
        # The recorders are closed (or journaled) on a thread of their own: the frame this
        # handler interrupted may hold one of their locks, which it could never take here.
        work = _close_all_in_time if not callable(previous) else _journal_all
        helper = threading.Thread(target=work, name="flywheel-exit", daemon=True)
        helper.start()
        helper.join(_deadline())
    finally:
        _handling = False
    _chain(previous, signum, frame)


def _chain(previous: Any, signum: int, frame: Any) -> None:
    """What would have happened without us: the previous handler, or the default action."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _journal_all() -> None:
    for recorder in _mine():
        recorder.journal_now()


def _close_all_in_time() -> None:
    _journal_all()
    close_all()


def _deadline() -> float:
    """How long the handler waits for the recorders: their exit timeout, and a little more."""
    return max((r.exit_timeout for r in _mine()), default=0.0) + 5.0


atexit.register(close_all)


def _forget_in_child() -> None:
    for recorder in list(_recorders):
        recorder.forget_after_fork()
        _recorders.discard(recorder)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
