"""Time partitions of the tables that grow (rollout, span, feedback, telemetry_event) on
PostgreSQL, so old data leaves by dropping whole partitions instead of deleting rows.

A store created on PostgreSQL is partitioned from the start (migration 0006 converts the four
tables while they are empty, which is instant). An older store whose tables hold rows stays as
it is until a person runs ``flywheel db maintain --partition``: it converts each table in one
transaction (a partitioned copy is created, filled, and swapped in under an exclusive lock),
which takes as long as copying the table. Each table is partitioned by RANGE on its time column
(``TIME_COLUMN``) in day, week or month partitions, plus a DEFAULT partition that takes any row
no partition covers yet, so a write never fails for want of a partition.

PostgreSQL wants the partition key in every unique index of a partitioned table, so the primary
keys become ``(id, <time>)`` and the ``uid`` unique indexes ``(uid, <time>)``. The recorder's
idempotent writes (``ON CONFLICT DO NOTHING``) still hold because a record's time is set once,
when it is made, and a retried or replayed batch carries the same time: the same row lands in
the same partition and meets its first copy there. What the keys no longer enforce is
uniqueness across times. Span times never change; a rollout's start may (a trace whose spans
reached two ``flywheel serve`` replicas is closed by each, from its earliest span there), and
feedback or telemetry a caller sends again under its own id (a retry) is timed on arrival each
time, so a trigger on those partitioned tables skips a row whose key is already stored with a
time within ``ONCE_WINDOW`` (``ensure_once``).

``maintain`` creates the partitions ahead of time (idempotent; the ``flywheel run`` leader
runs it daily); rows that reached the DEFAULT partition in the meantime, or that no partition
covers (a backfill of old rows, a clock far ahead), are moved into partitions created for their
periods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import text

from flywheel_middleware.errors import StoreError
from flywheel_middleware.store.database import Store
from flywheel_middleware.tables import CLIENT_UID_MARK

TIME_COLUMN = {
    "rollout": "started_at",
    "span": "started_at",
    "feedback": "created_at",
    "telemetry_event": "received_at",
}
"""The time each row of a growing table belongs to: its partition key and its age."""

INTERVALS = ("day", "week", "month")
DEFAULT_INTERVAL = "week"
DEFAULT_AHEAD = 4  # partitions created past the current one
ONCE_WINDOW = "7 days"  # how far apart two times of one key may be recognised as one row
ONCE_KEY = {"rollout": "id", "feedback": "uid", "telemetry_event": "uid"}
"""The key each partitioned table keeps once across partitions (see ``ensure_once``): a
rollout's id, and the uid of feedback and telemetry a caller named (``tables.client_uid``)."""

_BOUNDS = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")
_UNIQUE_INDEX = re.compile(r"^(CREATE UNIQUE INDEX .+ USING \w+ \()(.*)\)$")


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime | None  # None for the DEFAULT partition
    end: datetime | None


@dataclass
class MaintainReport:
    converted: dict[str, int] = field(default_factory=dict)  # table -> rows copied
    created: list[str] = field(default_factory=list)  # partitions created
    moved: dict[str, int] = field(default_factory=dict)  # partition -> rows out of DEFAULT
    not_partitioned: list[str] = field(default_factory=list)


def period_start(moment: datetime, interval: str) -> datetime:
    """The start of the ``interval`` holding ``moment`` (UTC; weeks start on Monday)."""
    day = moment.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return day
    if interval == "week":
        return day - timedelta(days=day.weekday())
    if interval == "month":
        return day.replace(day=1)
    raise StoreError(f"unknown partition interval {interval!r}: use one of {', '.join(INTERVALS)}")


def next_start(start: datetime, interval: str) -> datetime:
    if interval == "day":
        return start + timedelta(days=1)
    if interval == "week":
        return start + timedelta(days=7)
    if interval == "month":
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    raise StoreError(f"unknown partition interval {interval!r}: use one of {', '.join(INTERVALS)}")


def _interval_of(parts: list[Partition]) -> str:
    """The interval the table was partitioned with, read from its newest bounded partition."""
    bounded = [p for p in parts if p.start is not None and p.end is not None]
    if not bounded:
        return DEFAULT_INTERVAL
    newest = max(bounded, key=lambda p: p.start)  # type: ignore[arg-type, return-value]
    days = (newest.end - newest.start).days  # type: ignore[operator]
    return "day" if days <= 1 else "week" if days == 7 else "month"


def _partition_name(table: str, start: datetime) -> str:
    return f"{table}_p{start:%Y%m%d}"


def _literal(moment: datetime) -> str:
    return f"'{moment.astimezone(timezone.utc).isoformat(sep=' ')}'"


def _require_postgres(store: Store) -> None:
    if store.dialect != "postgresql":
        raise StoreError(
            "time partitions are a PostgreSQL feature; on SQLite `flywheel db prune` deletes "
            "old rows in batches instead"
        )


def is_partitioned(conn: Any, table: str) -> bool:
    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
    ).scalar()
    return kind == "p"


def partitions(conn: Any, table: str) -> list[Partition]:
    """The partitions of ``table``, oldest first, the DEFAULT one last (the session must be
    in UTC, as ``_utc`` sets it, for the bounds to read back as written)."""
    rows = conn.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).all()
    out = []
    for name, bound in rows:
        found = _BOUNDS.search(bound or "")
        if found is None:
            out.append(Partition(name, None, None))
        else:
            start, end = (datetime.fromisoformat(b) for b in found.groups())
            out.append(Partition(name, start, end))
    far = datetime.max.replace(tzinfo=timezone.utc)
    return sorted(out, key=lambda p: p.start or far)


def _utc(conn: Any) -> None:
    conn.execute(text("SET LOCAL TimeZone = 'UTC'"))


UPKEEP_LOCK_TIMEOUT = "5s"


def bound_lock_waits(conn: Any) -> None:
    """Give up on a table lock after ``UPKEEP_LOCK_TIMEOUT`` in this transaction: creating or
    dropping a partition needs an exclusive lock on its table, and a request queued behind a
    long reader would hold up every writer queued behind it. Upkeep fails and is tried again
    at the next cycle instead."""
    conn.execute(text(f"SET LOCAL lock_timeout = '{UPKEEP_LOCK_TIMEOUT}'"))


def lock_partitions(conn: Any) -> None:
    """Hold, until ``conn``'s transaction ends, the lock that lets one process at a time
    change this schema's partitions (``maintain`` and ``prune`` may run on several hosts)."""
    conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(hashtextextended("
            "'flywheel_middleware.partitions:' || current_schema(), 0))"
        )
    )


def _columns(conn: Any, table: str) -> list[str]:
    return list(
        conn.execute(
            text(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(:t) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ),
            {"t": table},
        ).scalars()
    )


def _create_partition(
    conn: Any, table: str, start: datetime, end: datetime, default: str | None
) -> int:
    """Create ``table``'s partition for [start, end); returns the rows moved into it from
    the DEFAULT partition (which would otherwise refuse the new bounds)."""
    column = TIME_COLUMN[table]
    name = _partition_name(table, start)
    bounds = f"FROM ({_literal(start)}) TO ({_literal(end)})"
    stranded = (
        default is not None
        and conn.execute(
            text(
                f'SELECT EXISTS (SELECT 1 FROM "{default}" WHERE "{column}" >= :a AND "{column}" < :b)'
            ),
            {"a": start, "b": end},
        ).scalar()
    )
    if not stranded:
        conn.execute(text(f'CREATE TABLE "{name}" PARTITION OF "{table}" FOR VALUES {bounds}'))
        return 0
    cols = ", ".join(f'"{c}"' for c in _columns(conn, table))
    conn.execute(text(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS)'))
    moved = conn.execute(
        text(
            f'WITH moved AS (DELETE FROM "{default}" WHERE "{column}" >= :a AND "{column}" < :b '
            f'RETURNING {cols}) INSERT INTO "{name}" ({cols}) SELECT {cols} FROM moved'
        ),
        {"a": start, "b": end},
    ).rowcount
    conn.execute(text(f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" FOR VALUES {bounds}'))
    return moved


def _ensure_ahead(conn: Any, table: str, now: datetime, ahead: int, report: MaintainReport) -> None:
    """Create ``table``'s partitions from the current period to ``ahead`` past it, and one for
    each other period whose rows sit in the DEFAULT partition (a backfill, an import, a clock
    far off), moving those rows in: left there, old rows could only be pruned row by row, and
    every new partition would make PostgreSQL scan them all under a lock."""
    parts = partitions(conn, table)
    interval = _interval_of(parts)
    default = next((p.name for p in parts if p.start is None), None)
    bounded = [(p.start, p.end) for p in parts if p.start is not None and p.end is not None]
    wanted = set()
    start = period_start(now, interval)
    for _ in range(ahead + 1):
        wanted.add(start)
        start = next_start(start, interval)
    if default is not None:
        wanted |= _periods_held(conn, default, TIME_COLUMN[table], interval)
    for start in sorted(wanted):
        end = next_start(start, interval)
        if any(low < end and start < high for low, high in bounded):
            continue
        moved = _create_partition(conn, table, start, end, default)
        report.created.append(_partition_name(table, start))
        if moved:
            report.moved[_partition_name(table, start)] = moved


def _periods_held(conn: Any, default: str, column: str, interval: str) -> set[datetime]:
    """The starts of the periods the rows of partition ``default`` fall in (in a UTC session,
    so PostgreSQL's week starts on Monday as ``period_start``'s does)."""
    found = conn.execute(
        text(f'SELECT DISTINCT date_trunc(:unit, "{column}") FROM "{default}"'), {"unit": interval}
    ).scalars()
    return {period_start(moment, interval) for moment in found}


def _convert(conn: Any, table: str, interval: str, now: datetime) -> int:
    """Swap ``table`` for a partitioned copy of it; returns the rows copied."""
    column = TIME_COLUMN[table]
    new = f"{table}__partitioned"
    conn.execute(text(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE'))
    oldest = conn.execute(text(f'SELECT min("{column}") FROM "{table}"')).scalar()
    indexes = conn.execute(
        text(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), i.indisprimary "
            "FROM pg_index i WHERE i.indrelid = to_regclass(:t)"
        ),
        {"t": table},
    ).all()
    primary = conn.execute(
        text(
            "SELECT conname, array_to_string(array_agg(quote_ident(a.attname) ORDER BY k.n), ', ') "
            "FROM pg_constraint c CROSS JOIN unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
            "WHERE c.conrelid = to_regclass(:t) AND c.contype = 'p' GROUP BY conname"
        ),
        {"t": table},
    ).first()
    sequence = conn.execute(
        text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": f'"{table}"'}
    ).scalar()
    access = _access_statements(conn, table)
    conn.execute(
        text(
            f'CREATE TABLE "{new}" (LIKE "{table}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
            f'INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE ("{column}")'
        )
    )
    conn.execute(text(f'CREATE TABLE "{table}_default" PARTITION OF "{new}" DEFAULT'))
    start = period_start(oldest or now, interval)
    last = period_start(now, interval)
    while start <= last:
        end = next_start(start, interval)
        bounds = f"FROM ({_literal(start)}) TO ({_literal(end)})"
        conn.execute(
            text(
                f'CREATE TABLE "{_partition_name(table, start)}" PARTITION OF "{new}" '
                f"FOR VALUES {bounds}"
            )
        )
        start = end
    copied = conn.execute(text(f'INSERT INTO "{new}" SELECT * FROM "{table}"')).rowcount
    if sequence:
        conn.execute(text(f'ALTER SEQUENCE {sequence} OWNED BY "{new}".id'))
    conn.execute(text(f'DROP TABLE "{table}"'))
    conn.execute(text(f'ALTER TABLE "{new}" RENAME TO "{table}"'))
    for statement in access:
        conn.execute(text(statement))
    if primary is not None:
        name, cols = primary
        conn.execute(
            text(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" PRIMARY KEY ({cols}, "{column}")')
        )
    for _name, definition, is_primary in indexes:
        if is_primary:
            continue
        if definition.startswith("CREATE UNIQUE INDEX"):
            found = _UNIQUE_INDEX.match(definition)
            if found is None or " WHERE " in definition:
                raise StoreError(f"cannot partition {table}: unique index {definition!r}")
            definition = f'{found.group(1)}{found.group(2)}, "{column}")'
        conn.execute(text(definition))
    if table in ONCE_KEY:
        ensure_once(conn, table)
    conn.execute(text(f'ANALYZE "{table}"'))  # autovacuum never analyzes a partitioned parent
    return int(copied)


def _access_statements(conn: Any, table: str) -> list[str]:
    """What gives the partitioned table the old one's owner and grants (the roles of the
    agents and replicas that write to it)."""
    owner, current = conn.execute(
        text(
            "SELECT quote_ident(pg_get_userbyid(relowner)), quote_ident(current_user) "
            "FROM pg_class WHERE oid = to_regclass(:t)"
        ),
        {"t": table},
    ).one()
    grants = conn.execute(
        text(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' "
            "ELSE quote_ident(pg_get_userbyid(a.grantee)) END, a.privilege_type "
            "FROM pg_class c CROSS JOIN aclexplode(c.relacl) a WHERE c.oid = to_regclass(:t)"
        ),
        {"t": table},
    ).all()
    out = [f'ALTER TABLE "{table}" OWNER TO {owner}'] if owner != current else []
    return out + [f'GRANT {privilege} ON "{table}" TO {grantee}' for grantee, privilege in grants]


def _once_function(conn: Any, table: str) -> str:
    """(Re)define the check behind ``table``'s once-per-key trigger; returns its
    schema-qualified name.

    The lookup runs with ``enable_seqscan`` off: PL/pgSQL caches its plan for the session, and
    a plan made while the partitions were empty (a new store) scans them whole, so a writer's
    every insert would read the week's rows. The (key, time) unique index finds the row at any
    size. Two transactions inserting one key take turns on a lock of that key, so the later
    one sees the first's row once it commits (else neither sees the other's and both rows
    stay)."""
    schema = conn.execute(text("SELECT quote_ident(current_schema())")).scalar()
    key, column = ONCE_KEY[table], TIME_COLUMN[table]
    conn.execute(
        text(
            f"CREATE OR REPLACE FUNCTION {schema}.flywheel_{table}_once() RETURNS trigger "
            "LANGUAGE plpgsql SET enable_seqscan = off AS $$ BEGIN "
            "PERFORM pg_advisory_xact_lock(hashtextextended("
            f"'flywheel_middleware.{table}:' || NEW.{key}, 0)); "
            f"IF EXISTS (SELECT 1 FROM {schema}.{table} r WHERE r.{key} = NEW.{key} "
            f"AND r.{column} > NEW.{column} - interval '{ONCE_WINDOW}' "
            f"AND r.{column} < NEW.{column} + interval '{ONCE_WINDOW}') "
            "THEN RETURN NULL; END IF; RETURN NEW; END $$"
        )
    )
    return f"{schema}.flywheel_{table}_once"


def ensure_once(conn: Any, table: str) -> None:
    """Give partitioned ``table`` its once-per-key trigger (``ONCE_KEY``), or its newest check
    if it has one: a row is skipped when its key is already stored with a time within
    ``ONCE_WINDOW``, which the (key, time) unique index alone cannot see."""
    function = _once_function(conn, table)
    exists = conn.execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :n)"
        ),
        {"t": table, "n": f"{table}_once"},
    ).scalar()
    if exists:
        return
    when = f"WHEN (left(NEW.uid, 1) = '{CLIENT_UID_MARK}') " if ONCE_KEY[table] == "uid" else ""
    conn.execute(
        text(
            f'CREATE TRIGGER {table}_once BEFORE INSERT ON "{table}" FOR EACH ROW {when}'
            f"EXECUTE FUNCTION {function}()"
        )
    )


def maintain(
    store: Store,
    *,
    partition: bool = False,
    interval: str = DEFAULT_INTERVAL,
    ahead: int = DEFAULT_AHEAD,
    now: datetime | None = None,
    analyze: bool = True,
) -> MaintainReport:
    """Create each partitioned table's partitions from the current one to ``ahead`` past it.

    With ``partition``, a table that is not partitioned yet is converted first (one
    transaction per table; writers wait for it). Running it again changes nothing but the
    statistics: with ``analyze`` each partitioned table is analyzed as a whole, which
    autovacuum never does (it analyzes each partition); without those statistics the
    planner misjudges joins through the parent, and the loop's analysis runs many times
    slower."""
    _require_postgres(store)
    if interval not in INTERVALS:
        raise StoreError(
            f"unknown partition interval {interval!r}: use one of {', '.join(INTERVALS)}"
        )
    if ahead < 0:
        raise StoreError(f"--ahead must be 0 or more, got {ahead}")
    store.ensure_schema()
    now = now or datetime.now(timezone.utc)
    report = MaintainReport()
    for table in TIME_COLUMN:
        with store.engine.begin() as conn, store.unbounded(conn):
            _utc(conn)
            lock_partitions(conn)
            if not partition:  # a conversion is a person's choice: it may wait
                bound_lock_waits(conn)
            if not partition and not is_partitioned(conn, table):
                report.not_partitioned.append(table)
                continue
            _partition(conn, table, interval, ahead, now, report)
        if analyze and table not in report.not_partitioned:
            _analyze(store, table)
    return report


def _analyze(store: Store, table: str) -> None:
    """Statistics for a partitioned table as a whole, which autovacuum never gathers (it
    analyzes each partition), in a transaction of its own with no statement timeout."""
    with store.engine.connect() as conn, store.unbounded(conn):
        conn.execute(text(f'ANALYZE "{table}"'))
        conn.commit()


def _partition(
    conn: Any, table: str, interval: str, ahead: int, now: datetime, report: MaintainReport
) -> None:
    """Convert ``table`` unless it is partitioned already, then create its partitions ahead
    (the caller holds ``lock_partitions`` in a UTC session)."""
    if not is_partitioned(conn, table):
        report.converted[table] = _convert(conn, table, interval, now)
    elif table in ONCE_KEY:
        ensure_once(conn, table)  # a store converted by an earlier version gets the newest
    _ensure_ahead(conn, table, now, ahead, report)


def partition_new_store(conn: Any, now: datetime | None = None) -> list[str]:
    """Migration 0006's step: partition the growing tables (weekly, ``DEFAULT_AHEAD`` ahead)
    inside ``conn``'s transaction if none holds a row, when converting costs nothing.

    Returns the tables that hold rows, in which case nothing changes: converting them copies
    each one while writers wait, so a person chooses when (``flywheel db maintain
    --partition``)."""
    _utc(conn)
    lock_partitions(conn)
    plain = [table for table in TIME_COLUMN if not is_partitioned(conn, table)]
    holding = [
        table
        for table in plain
        if conn.execute(text(f'SELECT EXISTS (SELECT 1 FROM "{table}")')).scalar()
    ]
    if holding:
        return holding
    now = now or datetime.now(timezone.utc)
    report = MaintainReport()
    for table in TIME_COLUMN:
        _partition(conn, table, DEFAULT_INTERVAL, DEFAULT_AHEAD, now, report)
    return []


STALE_GROWTH = 2.0  # the partitions' rows, over the rows the parent was analyzed with
STALE_MIN_ROWS = 1_000


def analyze_stale(store: Store) -> list[str]:
    """Analyze each partitioned table whose partitions now hold more than ``STALE_GROWTH``
    times the rows it was last analyzed with (at least ``STALE_MIN_ROWS``): the cheap check
    the loop makes every cycle, so a new store's statistics follow its growth between the
    daily ``maintain`` runs. Returns the tables analyzed."""
    if store.dialect != "postgresql":
        return []
    with store.engine.connect() as conn:
        stale = list(
            conn.execute(
                text(
                    "SELECT p.relname FROM pg_class p JOIN pg_inherits i ON i.inhparent = p.oid "
                    "JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE p.relkind = 'p' AND p.relname = ANY(:tables) "
                    "AND p.relnamespace = to_regnamespace(quote_ident(current_schema())) "
                    "GROUP BY p.relname, p.reltuples "
                    "HAVING sum(greatest(c.reltuples, 0)) >= :least "
                    "AND sum(greatest(c.reltuples, 0)) > :growth * greatest(p.reltuples, 0)"
                ),
                {"tables": list(TIME_COLUMN), "least": STALE_MIN_ROWS, "growth": STALE_GROWTH},
            ).scalars()
        )
    for table in stale:
        _analyze(store, table)
    return stale


def partition_list(store: Store, table: str) -> list[Partition]:
    """``table``'s partitions (empty when it is not partitioned, or not on PostgreSQL)."""
    if store.dialect != "postgresql":
        return []
    with store.engine.begin() as conn:
        _utc(conn)
        return partitions(conn, table) if is_partitioned(conn, table) else []
