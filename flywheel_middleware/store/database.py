"""The store: one SQLAlchemy engine over SQLite (embedded default) or PostgreSQL.

Hot-path rows arrive in batches from the recorder and are written through the raw DB-API
(``executemany`` on SQLite, ``COPY`` on PostgreSQL), one transaction per batch. Everything
else uses ordinary SQLModel sessions.

A silent PostgreSQL outage (a crashed host, a failover, a firewall dropping packets) must end
in an error, never a hang: every connection gets a connect timeout, TCP keepalives,
``tcp_user_timeout`` and a ``statement_timeout`` (``POSTGRES_DEFAULTS``; a value the URL's
query sets wins), and the client stops waiting for an answer ``WAIT_GRACE`` seconds after the
statement timeout (``Store.wait_limit``), which also ends a wait on a live proxy or sidecar
whose server went silent, where TCP sees nothing wrong.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlmodel import Session

from flywheel_middleware.errors import StoreError, safe_url
from flywheel_middleware.store import (
    models,  # noqa: F401  (registers the tables on SQLModel.metadata)
    sqlite_rows,
)

log = logging.getLogger("flywheel_middleware.store.database")

DEFAULT_URL = "sqlite:///flywheel.db"
# Held by the transaction that migrates, so several processes starting on a new PostgreSQL
# schema at once migrate one after the other (the later ones find it done) instead of racing.
_PG_MIGRATION_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtextextended("
    "'flywheel_middleware.migrate:' || current_database() || ':' || current_schema(), 0))"
)
_MIGRATIONS = Path(__file__).parent / "migrations"


# libpq parameters every PostgreSQL connection gets unless its URL says otherwise: connect
# and startup bounded; a dead peer found by keepalives (idle 5 s, then 3 probes 2 s apart);
# data unacknowledged for 10 s (a write into a black hole) fails the connection.
POSTGRES_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
STATEMENT_TIMEOUT_MS = 30_000  # the server cancels a statement running longer
WAIT_GRACE = 5.0  # seconds past the statement timeout before the client gives up on an answer

_PG_UNITS_MS = {"": 1.0, "us": 0.001, "ms": 1.0, "s": 1e3, "min": 6e4, "h": 3.6e6, "d": 8.64e7}
_STATEMENT_TIMEOUT = re.compile(r"statement[_-]timeout\s*=\s*(\S+)", re.IGNORECASE)


def _duration_ms(value: str) -> float | None:
    """A PostgreSQL duration setting ("30000", "30s", "1min") in ms; None if unreadable."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip("'\"").strip(), re.IGNORECASE)
    if m is None or m.group(2).lower() not in _PG_UNITS_MS:
        return None
    return float(m.group(1)) * _PG_UNITS_MS[m.group(2).lower()]


def postgres_connect_args(query: Mapping[str, Any]) -> tuple[dict[str, str], float | None]:
    """The connect arguments for what the URL's ``query`` leaves unset, and the client's wait
    limit in seconds (None when the statement timeout is off or unreadable)."""
    args = {k: v for k, v in POSTGRES_DEFAULTS.items() if k not in query}
    if "tcp_user_timeout" in args and _libpq_version() < 120000:
        del args["tcp_user_timeout"]  # an older libpq rejects the connection over it
    if "connect_timeout" in args and os.environ.get("PGCONNECT_TIMEOUT"):
        del args["connect_timeout"]  # libpq's own variable, set on purpose
    options = query.get("options")
    if isinstance(options, tuple):
        options = " ".join(options)
    if options is None:
        options = os.environ.get("PGOPTIONS", "")  # passing options would replace it
    found = _STATEMENT_TIMEOUT.search(options)
    if found is None:
        args["options"] = f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
        statement_ms: float | None = STATEMENT_TIMEOUT_MS
    else:
        statement_ms = _duration_ms(found.group(1))
    limit = statement_ms / 1000 + WAIT_GRACE if statement_ms else None
    return args, limit


def _libpq_version() -> int:
    try:
        import psycopg
    except ImportError:
        return 0
    return psycopg.pq.version()


class _Watchdog:
    """One thread that shuts down the socket of a connection whose server has not answered
    by its deadline, so the waiting thread gets an error as from a dead TCP connection."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, socket fd)
        self._tokens = itertools.count()
        self._due = float("inf")  # the deadline the thread sleeps towards
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (deadline, fd)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="flywheel-store-watchdog", daemon=True
                )
                self._thread.start()
            if deadline < self._due:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """False when the deadline passed and the socket was shut down."""
        with self._cond:
            return self._armed.pop(token, None) is not None

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token in [t for t, (d, _) in self._armed.items() if d <= now]:
                    _, fd = self._armed.pop(token)
                    _shutdown_fd(fd)  # under the lock: the fd is still the armed connection's
                self._due = min((d for d, _ in self._armed.values()), default=float("inf"))
                self._cond.wait(None if self._due == float("inf") else self._due - now)


def _shutdown_fd(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()  # closes the duplicate only


_WATCHDOG = _Watchdog()


@functools.cache
def _bounded_connection_class() -> Any:
    """A psycopg connection whose every wait for the server ends by its ``wait_limit``."""
    import psycopg

    class BoundedConnection(psycopg.Connection):
        wait_limit: float | None = None

        def wait(self, *args: Any, **kwargs: Any) -> Any:
            limit = self.wait_limit
            if limit is None or self.closed:
                return super().wait(*args, **kwargs)
            token = _WATCHDOG.arm(self.pgconn.socket, limit)
            try:
                result = super().wait(*args, **kwargs)
            except BaseException as exc:
                if _WATCHDOG.disarm(token):
                    raise
                self.close()
                raise psycopg.OperationalError(
                    f"no answer from the server within {limit:g} s "
                    "(statement_timeout plus grace): connection closed"
                ) from exc
            _WATCHDOG.disarm(token)
            return result

    return BoundedConnection


def _connect_bounded(limit: float | None) -> Any:
    """The engine's ``do_connect`` hook; it holds no reference to the Store, so a Store
    dropped without ``dispose`` closes its connections as soon as it is collected."""

    def connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        conn = _bounded_connection_class().connect(*cargs, **cparams)
        conn.wait_limit = limit
        return conn

    return connect


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    sqlite_rows.apply_pragmas(dbapi_conn)


class Store:
    """A flywheel store at a SQLAlchemy URL; creates or upgrades its schema on first use."""

    def __init__(self, url: str = DEFAULT_URL, *, migrate: bool = True) -> None:
        self.url = url  # with its password: messages and reprs show safe_url(url)
        shown = safe_url(url)
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise StoreError(f"cannot parse store URL {shown!r}: {exc}") from exc
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise StoreError(
                f"unsupported store URL {shown!r}: use sqlite:///PATH or postgresql+psycopg://..."
            )
        kwargs: dict[str, Any] = {}
        self.wait_limit: float | None = None  # seconds the client waits for an answer
        self.sqlite_path: Path | None = None  # the database file (None: in memory, or not SQLite)
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                path = Path(database).expanduser().resolve()
                if not database.startswith("file:"):  # a URI filename is not a plain path
                    self.sqlite_path = path
                folder = path.parent
                if not folder.is_dir():
                    raise StoreError(
                        f"cannot open store {shown!r}: folder {str(folder)!r} does not exist"
                    )
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 5}  # busy wait
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"], self.wait_limit = postgres_connect_args(parsed.query)
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (NoSuchModuleError, ModuleNotFoundError) as exc:
            hint = (
                " (pip install 'flywheel-middleware[postgres]')"
                if self.dialect == "postgresql"
                else ""
            )
            raise StoreError(f"cannot open store {shown!r}: {exc}{hint}") from exc
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        elif self.engine.dialect.driver == "psycopg":
            event.listen(self.engine, "do_connect", _connect_bounded(self.wait_limit))
        self._insert_sql: dict[str, str] = {}
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        if migrate:
            self.ensure_schema()

    def ensure_schema(self) -> None:
        """Bring the schema to head once for this Store; later calls cost nothing. The
        recorder, the resolver and the loop each call it on their own thread, so a store
        opened on the capture path (``migrate=False``) never touches the database there."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                self.upgrade()
                self._schema_ready = True

    @contextmanager
    def unbounded(self, conn: Any) -> Iterator[None]:
        """No statement timeout nor wait limit inside ``conn``'s transaction: a migration of a
        large table may rightly take longer than any request."""
        if self.dialect != "postgresql":
            yield
            return
        conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
        dbapi = conn.connection.dbapi_connection
        saved = getattr(dbapi, "wait_limit", None)
        if saved is not None:
            dbapi.wait_limit = None
        try:
            yield
        finally:
            if saved is not None:
                dbapi.wait_limit = saved

    # -- schema -------------------------------------------------------------------------

    def _alembic_config(self, connection: Any) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory(str(_MIGRATIONS)).get_current_head()

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` with Alembic (creating it on an empty database)."""
        from alembic import command

        try:
            if revision == "head" and self.current_revision() == self.head_revision():
                return
            with self.engine.begin() as conn, self.unbounded(conn):
                if self.dialect == "postgresql":  # replicas starting together migrate in turn
                    conn.execute(text(_PG_MIGRATION_LOCK))
                command.upgrade(self._alembic_config(conn), revision)
        except OperationalError as exc:
            # Another process may have created the schema at the same moment.
            try:
                if self.current_revision() == self.head_revision():
                    return
            except OperationalError:
                pass
            raise StoreError(f"cannot open store {safe_url(self.url)!r}: {exc.orig}") from exc

    # -- sessions -----------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterable[Session]:
        """A SQLModel session that commits on success and rolls back on error."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run a read query in text SQL and return all rows."""
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params or {}))

    # -- the recorder's fast path -------------------------------------------------------

    def raw_connection(self) -> Any:
        return self.engine.raw_connection()

    def _sql_for(self, table: str, columns: Sequence[str]) -> str:
        key = f"{table}:{','.join(columns)}"
        sql = self._insert_sql.get(key)
        if sql is None:
            if self.dialect == "sqlite":
                sql = sqlite_rows.insert_sql(table, columns)
            else:
                cols = ", ".join(f'"{c}"' for c in columns)
                marks = ", ".join("%s" for _ in columns)
                sql = f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING"
            self._insert_sql[key] = sql
        return sql

    def write_rows(
        self, raw_conn: Any, table: str, columns: Sequence[str], rows: list[tuple]
    ) -> None:
        """Insert rows inside the caller's transaction; duplicates of a primary key are ignored."""
        if not rows:
            return
        cur = raw_conn.cursor()
        try:
            if self.dialect == "postgresql" and table in ("span", "rollout"):
                self._copy_rows(raw_conn, cur, table, columns, rows)
            elif self.dialect == "sqlite":
                sqlite_rows.insert_rows(cur, table, columns, rows, self._insert_sql)
            else:
                cur.executemany(self._sql_for(table, columns), rows)
        finally:
            cur.close()

    def _copy_rows(
        self, raw_conn: Any, cur: Any, table: str, columns: Sequence[str], rows: list[tuple]
    ) -> None:
        """COPY is the fastest path; a replayed duplicate falls back to INSERT .. ON CONFLICT."""
        import psycopg

        cols = ", ".join(f'"{c}"' for c in columns)
        cur.execute("SAVEPOINT flywheel_copy")
        try:
            with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute("RELEASE SAVEPOINT flywheel_copy")
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT flywheel_copy")
            cur.executemany(self._sql_for(table, columns), rows)

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Store({safe_url(self.url)!r})"
