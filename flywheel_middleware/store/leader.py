"""One control-loop cycle at a time per store, whichever host runs ``flywheel run``.

On PostgreSQL the cycle holds a session-level advisory lock on a connection of its own: the
server releases it when that session ends, so a crashed or killed holder frees it at once. The
key is derived on the server from the database and schema, so every host computes the same one
whatever URL it uses (a pooler, another host name). Session locks need a session of their own:
behind PgBouncer use session pooling (or a direct URL) for the loop.

SQLite has no such lock, so the cycle holds a lease row (``cycle_lease``: holder and expiry),
renewed by a thread while the cycle runs; a holder that dies stops renewing and its lease
expires after ``FLYWHEEL_CYCLE_LEASE`` seconds (default 30).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import text

from flywheel_middleware.environment import env_number
from flywheel_middleware.store.database import Store

log = logging.getLogger("flywheel_middleware.store.leader")

LEASE_ENV = "FLYWHEEL_CYCLE_LEASE"
DEFAULT_LEASE = 30.0
LEASE_NAME = "cycle"
PG_CHECK = 5.0  # seconds between checks that the lock's session is alive
_APP_PREFIX = "flywheel cycle "

# The advisory lock's key: the same on every host that opens this database and schema.
_PG_KEY = "SELECT hashtextextended('flywheel_middleware.cycle:' || current_database() || ':' || current_schema(), 0)"
_PG_HOLDER = """
SELECT a.application_name, host(a.client_addr), a.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %s AND l.objid::bigint = %s
"""


def lease_seconds() -> float:
    """The SQLite lease's length: ``FLYWHEEL_CYCLE_LEASE`` seconds, else 30."""
    return env_number(LEASE_ENV, DEFAULT_LEASE)


def this_process() -> str:
    """How a holder is named to the others: host and process id."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class CycleLock:
    """The store's cycle lock: ``acquire`` / ``release``, or ``with lock.held_for(): ...``.

    ``holder()`` names who holds it now (None when free), for the ones that wait; ``lost``
    turns true when a held lock was lost before its release (its session cut, its lease
    taken over after a pause longer than the lease).
    """

    def __init__(self, store: Store, *, name: str | None = None) -> None:
        self.store = store
        self.name = name or this_process()
        self._token = os.urandom(4).hex()  # two locks of one process are two holders
        self._held = False
        self._conn: Any = None  # PostgreSQL: the session that holds the lock
        self._key: int | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self.lost = False
        self.lease = lease_seconds() if store.dialect == "sqlite" else None

    @property
    def held(self) -> bool:
        return self._held

    # -- the public steps -------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        if self._held:
            return True
        self.store.ensure_schema()
        got = self._pg_try() if self.store.dialect == "postgresql" else self._lease_try()
        if got:
            self._held = True
            self.lost = False
            log.info("cycle lock taken by %s", self.name)
            self._stop.clear()
            self._keeper = threading.Thread(
                target=self._keep, name="flywheel-cycle-lock", daemon=True
            )
            self._keeper.start()
        return got

    def acquire(
        self,
        *,
        timeout: float | None = None,
        poll: float = 0.5,
        on_wait: Callable[[str | None], None] | None = None,
    ) -> bool:
        """Wait for the lock (``timeout`` seconds at most; None: as long as it takes).

        ``on_wait(holder)`` is called when the wait begins and whenever the holder changes,
        so the caller can say who it is waiting for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        told: object = object()
        unnamed = 0
        while not self.try_acquire():
            who = self.holder()
            if who is None and unnamed < 3:  # released in between: most likely ours next
                unnamed += 1
                time.sleep(0.05)
                continue
            unnamed = 0
            if who != told:
                told = who
                log.info("waiting for the cycle lock held by %s", who or "another process")
                if on_wait is not None:
                    on_wait(who)
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(
                poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            )
        return True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        if self.store.dialect == "postgresql":
            self._pg_release()
        else:
            self._lease_release()
        log.info("cycle lock released by %s", self.name)

    def holder(self) -> str | None:
        """Who holds the lock now, as its holder named itself; None when it is free."""
        if self.store.dialect == "postgresql":
            return self._pg_holder()
        return self._lease_holder()

    @contextmanager
    def held_for(
        self, *, on_wait: Callable[[str | None], None] | None = None, poll: float = 0.5
    ) -> Iterator[CycleLock]:
        """Hold the lock for the ``with`` block, waiting for it first."""
        self.acquire(on_wait=on_wait, poll=poll)
        try:
            yield self
        finally:
            self.release()

    def _keep(self) -> None:
        """While held: renew the SQLite lease, or check that the PostgreSQL session holding
        the lock is alive. A lock found lost is said loudly: another process may now start
        a cycle while this one's runs."""
        postgres = self.store.dialect == "postgresql"
        period = PG_CHECK if postgres else self.lease / 3  # type: ignore[operator]
        while not self._stop.wait(period):
            try:
                kept = self._pg_alive() if postgres else self._lease_renew()
            except Exception as exc:  # a busy SQLite file: the next renewal tries again
                log.warning("renewing the cycle lease: %s", exc)
                continue
            if not kept:
                self.lost = True
                log.error(
                    "%s lost the cycle lock during its cycle: another process may run one now",
                    self.name,
                )
                return

    # -- PostgreSQL: a session-level advisory lock -------------------------------------------

    def _pg_alive(self) -> bool:
        try:
            self._conn.dbapi_connection.execute("SELECT 1")
        except Exception:  # the session is gone, and the server has released its lock
            return False
        return True

    def _pg_key(self, conn: Any) -> int:
        if self._key is None:
            self._key = int(conn.execute(_PG_KEY).fetchone()[0])
        return self._key

    def _pg_try(self) -> bool:
        pooled = self.store.engine.raw_connection()
        pooled.detach()  # its own session: closing it must close it, not pool it
        conn = pooled.dbapi_connection
        try:
            conn.autocommit = True
            label = f"{_APP_PREFIX}{self.name}"[:63]
            conn.execute("SELECT set_config('application_name', %s, false)", (label,))
            key = self._pg_key(conn)
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
        except BaseException:
            pooled.close()
            raise
        if not got:
            pooled.close()
            return False
        self._conn = pooled
        return True

    def _pg_release(self) -> None:
        pooled, self._conn = self._conn, None
        if pooled is None:
            return
        try:
            if not self.lost:
                pooled.dbapi_connection.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        except Exception as exc:  # the session is gone: the server released the lock
            log.warning("releasing the cycle lock: %s", exc)
        finally:
            pooled.close()

    def _pg_holder(self) -> str | None:
        pooled = self.store.engine.raw_connection()
        try:
            cur = pooled.dbapi_connection.cursor()
            key = self._pg_key(cur)
            cur.execute(_PG_HOLDER, ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF))
            row = cur.fetchone()
            pooled.dbapi_connection.rollback()
        finally:
            pooled.close()
        if row is None:
            return None
        app, addr, pid = row
        if app and app.startswith(_APP_PREFIX):
            return app[len(_APP_PREFIX) :]
        return f"server process {pid}" + (f" from {addr}" if addr else "")

    # -- SQLite: a lease row ----------------------------------------------------------------

    def _lease_try(self) -> bool:
        now = time.time()
        with self.store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO cycle_lease (name, holder, acquired_at, expires_at) "
                    "VALUES (:name, :me, :at, :expires) ON CONFLICT (name) DO UPDATE SET "
                    "holder = excluded.holder, acquired_at = excluded.acquired_at, "
                    "expires_at = excluded.expires_at "
                    "WHERE cycle_lease.expires_at < :now OR cycle_lease.holder = :me"
                ),
                {
                    "name": LEASE_NAME,
                    "me": self._lease_holder_id(),
                    "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"),
                    "expires": now + self.lease,
                    "now": now,
                },
            )
            holder = conn.execute(
                text("SELECT holder FROM cycle_lease WHERE name = :name"), {"name": LEASE_NAME}
            ).scalar()
        return holder == self._lease_holder_id()

    def _lease_holder_id(self) -> str:
        return f"{self.name} #{self._token}"

    def _lease_renew(self) -> bool:
        """Push the expiry forward; False when the lease was taken over meanwhile."""
        with self.store.engine.begin() as conn:
            return bool(
                conn.execute(
                    text(
                        "UPDATE cycle_lease SET expires_at = :expires "
                        "WHERE name = :name AND holder = :me"
                    ),
                    {
                        "expires": time.time() + self.lease,
                        "name": LEASE_NAME,
                        "me": self._lease_holder_id(),
                    },
                ).rowcount
            )

    def _lease_release(self) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(
                text("DELETE FROM cycle_lease WHERE name = :name AND holder = :me"),
                {"name": LEASE_NAME, "me": self._lease_holder_id()},
            )

    def _lease_holder(self) -> str | None:
        with self.store.engine.connect() as conn:
            holder = conn.execute(
                text("SELECT holder FROM cycle_lease WHERE name = :name AND expires_at >= :now"),
                {"name": LEASE_NAME, "now": time.time()},
            ).scalar()
        return holder.rsplit(" #", 1)[0] if holder else None
