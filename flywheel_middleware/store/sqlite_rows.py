"""Recorder rows into SQLite through the ``sqlite3`` module alone.

The store and the writer process share it; it imports no SQLAlchemy, so the writer process
starts in a few tens of milliseconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

# Bound parameters per statement: 32766 since SQLite 3.32, 999 before.
MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
# Rows per multi-row INSERT (a power of two): a batch is written as chunks of this size, then
# halving sizes for the rest, so at most log2 of it + 1 distinct statements exist per table.
CHUNK = 256

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",  # longer locks: the recorder retries
    "PRAGMA foreign_keys=OFF",
)

# The writer process's connection only: it inserts into five B-trees of random keys per span,
# which fall out of SQLite's default 2 MB page cache; and a checkpoint (the only fsync in WAL
# mode at synchronous=NORMAL) every 16 MB of WAL instead of every 4 MB.
WRITER_PRAGMAS = (
    "PRAGMA cache_size=-65536",
    "PRAGMA wal_autocheckpoint=4000",
)


def apply_pragmas(dbapi_conn: Any, pragmas: Sequence[str] = PRAGMAS) -> None:
    cur = dbapi_conn.cursor()
    for pragma in pragmas:
        cur.execute(pragma)
    cur.close()


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """One row's INSERT; a repeated key is ignored (a replayed batch adds nothing).

    ``ON CONFLICT DO NOTHING`` rather than ``INSERT OR IGNORE``: the latter also skips, in
    silence, a row that breaks a NOT NULL constraint, which must be refused and set aside."""
    cols = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING"


def insert_rows(
    cur: Any, table: str, columns: Sequence[str], rows: list[tuple], cache: dict[str, str]
) -> None:
    """Many rows per INSERT statement, in a few fixed sizes (``cache`` keeps the statements).

    ``sqlite3.executemany`` releases and retakes the GIL for every row; while the agent's
    thread is busy that convoy cuts the writer to a few hundred rows a second. One statement
    per chunk of rows steps (and switches) once each. The chunks come in powers of two up to
    ``CHUNK`` rows, so the same few statements are prepared once and then reused from the
    connection's statement cache: a statement sized to each batch is compiled anew every
    time, which costs more than inserting the rows.
    """
    size = CHUNK
    while size * len(columns) > MAX_VARIABLES:
        size //= 2
    start, n = 0, len(rows)
    while start < n:
        while size > n - start:
            size //= 2
        key = f"{table}:{len(columns)}:{size}"
        sql = cache.get(key)
        if sql is None:
            head, rest = insert_sql(table, columns).split(" VALUES ")
            marks, tail = rest.split(" ON CONFLICT ")
            sql = cache[key] = f"{head} VALUES {','.join([marks] * size)} ON CONFLICT {tail}"
        end = start + size
        cur.execute(sql, [value for row in rows[start:end] for value in row])
        start = end
