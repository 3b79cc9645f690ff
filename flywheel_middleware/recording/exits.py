"""The ways a process ends, and what each does with the records it acknowledged.

- normal exit and ``sys.exit``: ``atexit`` closes every recorder (journal, then store);
- SIGTERM and SIGINT: a handler journals everything first, then chains to the handler that
  was there before: an application's own (uvicorn's graceful shutdown, say) runs as before,
  with each later record journaled as it comes; where the default would have killed the
  process, the recorders are closed and the signal is raised again, so the process still
  ends the way its sender expects;
- SIGKILL and ``os._exit``: nothing runs, and the journal holds what was queued up to one
  ``journal_interval`` before; the next recorder on the store replays it;
- ``fork``: the child forgets its parent's recorders (their files and writer are not its).

Handlers can be installed only from the main thread: ``fw.configure`` installs them (unless
``store.handle_signals`` is off), as does a recorder started on the main thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from typing import Any

log = logging.getLogger("flywheel_middleware.recording.exits")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_recorders: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}


def watch(recorder: Any, *, signals: bool = True) -> None:
    """Close ``recorder`` at exit, and (``signals``) journal it on SIGTERM and SIGINT."""
    _recorders.add(recorder)
    if signals:
        install_signal_handlers()


def unwatch(recorder: Any) -> None:
    _recorders.discard(recorder)


def install_signal_handlers() -> bool:
    """Put our handler in front of SIGTERM's and SIGINT's (chaining to them); False off the
    main thread, where Python cannot set handlers: the next call from it does."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in _SIGNALS:
        current = signal.getsignal(signum)
        if current is _on_signal:
            continue
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
    previous = _previous.get(signum, signal.SIG_DFL)
    for recorder in _mine():
        recorder.journal_now()
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    close_all()  # the default action ends the process without atexit: close first
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


atexit.register(close_all)


def _forget_in_child() -> None:
    for recorder in list(_recorders):
        recorder.forget_after_fork()
        _recorders.discard(recorder)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
