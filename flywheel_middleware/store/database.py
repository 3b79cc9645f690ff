"""The store: one SQLAlchemy engine over SQLite (embedded default) or PostgreSQL.

Hot-path rows arrive in batches from the recorder and are written through the raw DB-API
(``executemany`` on SQLite, ``COPY`` on PostgreSQL), one transaction per batch. Everything
else uses ordinary SQLModel sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlmodel import Session

from flywheel_middleware.errors import StoreError
from flywheel_middleware.store import (
    models,  # noqa: F401  (registers the tables on SQLModel.metadata)
    sqlite_rows,
)

log = logging.getLogger("flywheel_middleware.store.database")

DEFAULT_URL = "sqlite:///flywheel.db"
_MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    sqlite_rows.apply_pragmas(dbapi_conn)


class Store:
    """A flywheel store at a SQLAlchemy URL; creates or upgrades its schema on first use."""

    def __init__(self, url: str = DEFAULT_URL, *, migrate: bool = True) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise StoreError(f"cannot parse store URL {url!r}: {exc}") from exc
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise StoreError(
                f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql+psycopg://..."
            )
        kwargs: dict[str, Any] = {}
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
                        f"cannot open store {url!r}: folder {str(folder)!r} does not exist"
                    )
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 5}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": 5}
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (NoSuchModuleError, ModuleNotFoundError) as exc:
            hint = (
                " (pip install 'flywheel-middleware[postgres]')"
                if self.dialect == "postgresql"
                else ""
            )
            raise StoreError(f"cannot open store {url!r}: {exc}{hint}") from exc
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._insert_sql: dict[str, str] = {}
        if migrate:
            self.upgrade()

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
            with self.engine.begin() as conn:
                command.upgrade(self._alembic_config(conn), revision)
        except OperationalError as exc:
            # Another process may have created the schema at the same moment.
            try:
                if self.current_revision() == self.head_revision():
                    return
            except OperationalError:
                pass
            raise StoreError(f"cannot open store {self.url!r}: {exc.orig}") from exc

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
        return f"Store({self.url!r})"
