"""The controller's datasets, kept up to date by reading only what changed.

A workflow's datasets are built from parts, one per UTC day of the rollouts' start, kept under
``<dataset_dir>/.parts/<workflow>/``. A cycle reads a day again only when its fingerprint (its
rollouts, their feedback and the sum of their rewards) differs from the one stored in the
watermark (``curation_watermark``), so a cycle costs what the new data costs, not what the
history costs. ``sft`` and ``triplets`` are the days' parts joined in day order; ``tasks`` and
``preference`` come from the days' question boards merged, so one task per question and the best
against the worst answer hold across days exactly as in a full export.

Days looked at: those within ``LOOKBACK`` of the newest rollout seen, and those holding rollouts
whose feedback was recorded within ``LOOKBACK`` of the newest feedback seen. A rollout that
reaches the store later than that (a journal replayed after a long outage) is picked up by
``full=True``, by deleting the parts folder, or by an explicit ``flywheel export``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import select

from flywheel_middleware.config import FlywheelConfig
from flywheel_middleware.loop import datasets
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import CurationWatermark, Feedback, Rollout

LOOKBACK = timedelta(days=2)
"""How late a rollout or its feedback may reach the store and still be curated incrementally."""

ROW_KINDS = ("sft", "triplets")
"""Kinds whose rows belong to one rollout each: a day's part is final once written."""

EMPTY_DAY = [0, 0, 0.0]

R = Rollout.__table__.c  # type: ignore[attr-defined]
F = Feedback.__table__.c  # type: ignore[attr-defined]


@dataclass
class Curated:
    """What one workflow's curation did: the files written and the days read again."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    days_read: int = 0
    days_total: int = 0
    notes: list[str] = field(default_factory=list)


def curate_datasets(
    store: Store,
    config: FlywheelConfig,
    workflow: str,
    out_dir: Path,
    *,
    full: bool = False,
) -> Curated:
    """Bring ``out_dir/<workflow>.<kind>.jsonl`` up to date for every kind.

    The watermark is kept per dataset folder (host and path): two hosts taking turns at the
    cycle, each with a folder of its own, each keep their own files whole."""
    name = file_name(workflow)
    parts = out_dir / ".parts" / name
    location = f"{socket.gethostname()}:{out_dir.resolve()}"
    stored = _load_state(store, workflow)
    state = stored.get(location) or {"days": {}}
    if full or not parts.is_dir():
        state = {"days": {}}
    parts.mkdir(parents=True, exist_ok=True)
    days: dict[str, list[Any]] = state["days"]
    result = Curated()
    read: list[str] = []
    feedback_since = _parse(state.get("feedback_until"))
    with store.engine.connect() as conn:  # read once: the days to check and the new watermark
        since = None if feedback_since is None else feedback_since - LOOKBACK
        rated = _rated_since(conn, workflow, since)
    check = _days_to_check(store, workflow, state, rated)
    check.update(day for day in days if not _parts_exist(parts, day))
    for day in sorted(check):
        start = datetime.combine(date.fromisoformat(day), datetime.min.time(), timezone.utc)
        until = start + timedelta(days=1)
        datasets.refresh_rewards(store, config, workflow=workflow, since=start, until=until)
        fingerprint = _fingerprint(store, workflow, start, until)
        if day not in days and fingerprint == EMPTY_DAY:
            continue
        if days.get(day) == fingerprint and _parts_exist(parts, day):
            continue
        if _read_day(store, config, workflow, parts, day, start, until, result):
            days[day] = fingerprint
        else:  # a filter failed: the day is read again next cycle
            days[day] = None
        read.append(day)
        result.days_read += 1
    result.days_total = len(days)
    outputs_missing = not all(
        (out_dir / f"{name}.{kind}.jsonl").exists() for kind in datasets.KINDS
    )
    newest_feedback = max((created_at for _, created_at in rated), default=None)
    if newest_feedback is not None:
        state["feedback_until"] = _aware(newest_feedback).isoformat()
    state["rollouts_until"] = _newest_rollout(store, workflow) or state.get("rollouts_until")
    if result.days_read or outputs_missing:
        board = _settle(parts, state, read)
        for day in sorted(d for d in days if d >= state["settled_until"]):
            board.merge(datasets.QuestionBoard.load(parts / f"{day}.board.jsonl"))
        _assemble(parts, sorted(days), board, out_dir / name, result)
    _save_state(store, workflow, {**stored, location: state})
    return result


def forget(store: Store, workflow: str | None = None) -> None:
    """Make the next cycle read every day again: after ``flywheel rewards`` recomputed rewards
    or an import added history older than the look-back."""
    with store.session() as session:
        q = select(CurationWatermark)
        if workflow is not None:
            q = q.where(CurationWatermark.workflow == workflow)
        for row in session.exec(q):
            session.delete(row)
        session.commit()


# -- which days changed ------------------------------------------------------------------------


def _days_to_check(
    store: Store, workflow: str, state: dict[str, Any], rated: list[tuple[datetime, datetime]]
) -> set[str]:
    """Every day with rollouts on a first run; afterwards the recent days and the days of
    the rollouts in ``rated`` (those with recent feedback)."""
    if not state["days"]:
        with store.engine.connect() as conn:
            first, last = conn.execute(
                select(func.min(R.started_at), func.max(R.started_at)).where(R.workflow == workflow)
            ).one()
        return set(_calendar(first, last))
    newest = _parse(state.get("rollouts_until")) or datetime.now(timezone.utc)
    check = set(_calendar(newest - LOOKBACK, max(newest, datetime.now(timezone.utc))))
    check.update(_day(started_at) for started_at, _ in rated)
    return check


def _fingerprint(store: Store, workflow: str, start: datetime, until: datetime) -> list[Any]:
    """A day's rollouts, their feedback and the sum of their rewards: any change re-reads it."""
    in_day = (R.workflow == workflow, R.started_at >= start, R.started_at < until)
    with store.engine.connect() as conn:
        rollouts, reward_sum = conn.execute(
            select(func.count(), func.sum(R.reward)).where(*in_day)
        ).one()
        feedback = conn.execute(
            select(func.count())
            .select_from(Feedback.__table__)
            .join(Rollout.__table__, F.rollout_id == R.id)
            .where(*in_day)
        ).scalar()
    return [int(rollouts), int(feedback or 0), round(float(reward_sum or 0.0), 9)]


def _rated_since(
    conn: Any, workflow: str, since: datetime | None
) -> list[tuple[datetime, datetime]]:
    """(rollout start, feedback time) of the workflow's feedback recorded since ``since``: the
    feedback's time index first, then the rollouts by id, so the cost follows the recent
    feedback, not the history (a join lets a planner scan the workflow's rollouts)."""
    recent = select(F.rollout_id, F.created_at)
    if since is not None:
        recent = recent.where(F.created_at >= since)
    given: dict[str, list[datetime]] = {}
    for rollout_id, created_at in conn.execute(recent):
        given.setdefault(rollout_id, []).append(created_at)
    out: list[tuple[datetime, datetime]] = []
    ids = list(given)
    for start in range(0, len(ids), 500):
        # by primary key only: with the workflow in the WHERE clause SQLite prefers the
        # workflow's index and scans every rollout of it
        q = select(R.id, R.started_at, R.workflow).where(R.id.in_(ids[start : start + 500]))
        for rollout_id, started_at, of in conn.execute(q):
            if of == workflow:
                out.extend((started_at, created_at) for created_at in given[rollout_id])
    return out


def _newest_rollout(store: Store, workflow: str) -> str | None:
    with store.engine.connect() as conn:
        newest = conn.execute(select(func.max(R.started_at)).where(R.workflow == workflow)).scalar()
    if newest is None:
        return None
    # a client clock ahead of ours must not move the window past today's rollouts
    return min(_aware(newest), datetime.now(timezone.utc)).isoformat()


# -- one day's parts and the files made of them ----------------------------------------------------


def _read_day(
    store: Store,
    config: FlywheelConfig,
    workflow: str,
    parts: Path,
    day: str,
    start: datetime,
    until: datetime,
    result: Curated,
) -> bool:
    """Write one day's parts; False if a filter failed on it (its rows may be missing)."""
    filters = bool(config.filters)
    failed = False
    for kind in ROW_KINDS:
        exported = datasets.export(
            store,
            kind,
            workflow,
            parts / f"{day}.{kind}.jsonl",
            config=config,
            since=start,
            until=until,
            filters=filters,
            refresh=False,
        )
        failed = failed or bool(exported.failures)
        result.notes.extend(f"{kind} export: {failure}" for failure in exported.failures[:3])
        if exported.unknown.count:
            result.notes.append(f"{kind} export of {day}: skipped {exported.unknown}")
    board, read = datasets.question_board(
        store, workflow=workflow, since=start, until=until, config=config, filters=filters
    )
    board.dump(parts / f"{day}.board.jsonl")
    result.notes.extend(f"tasks export: {failure}" for failure in read.failures[:3])
    return not (failed or read.failures)


def _part_files(parts: Path, day: str) -> list[Path]:
    files = [parts / f"{day}.{kind}.jsonl" for kind in ROW_KINDS]
    return [*files, datasets.meta_path(parts / f"{day}.sft.jsonl"), parts / f"{day}.board.jsonl"]


def _parts_exist(parts: Path, day: str) -> bool:
    return all(path.exists() for path in _part_files(parts, day))


def _settle(parts: Path, state: dict[str, Any], read: list[str]) -> datasets.QuestionBoard:
    """The merged board of the settled days (those before the look-back window), kept in
    ``settled.board.jsonl``: days that settle are merged into it; it is rebuilt from every
    settled day only when one of them was read again (late feedback) or the file is missing."""
    path = parts / "settled.board.jsonl"
    newest = _parse(state.get("rollouts_until"))
    window = _day(newest - LOOKBACK) if newest is not None else "0000-00-00"
    settled_until = state.get("settled_until") or "0000-00-00"
    days = sorted(state["days"])
    fresh = "settled_until" not in state  # a first or forgotten watermark: the file is stale
    if fresh or not path.exists() or any(day < settled_until for day in read):
        board, settled_until = datasets.QuestionBoard(), "0000-00-00"
    else:
        board = datasets.QuestionBoard.load(path)
    settling = [day for day in days if settled_until <= day < window]
    for day in settling:
        board.merge(datasets.QuestionBoard.load(parts / f"{day}.board.jsonl"))
    if settling or not path.exists():
        board.dump(path)
    state["settled_until"] = max(settled_until, window)
    return board


def _assemble(
    parts: Path, days: list[str], board: datasets.QuestionBoard, base: Path, result: Curated
) -> None:
    """Join the days' parts into the workflow's files; each file is replaced whole."""
    for kind in ROW_KINDS:
        out = Path(f"{base}.{kind}.jsonl")
        sources = [parts / f"{day}.{kind}.jsonl" for day in days]
        rows = _join(sources, out)
        if kind == "sft":
            _join([datasets.meta_path(s) for s in sources], datasets.meta_path(out))
        result.files[str(out)] = {"rows": rows}
    tasks_out = Path(f"{base}.tasks.jsonl")
    tasks = datasets.ExportResult(kind="tasks", path=tasks_out)
    _replace(
        [tasks_out, datasets.val_path(tasks_out)],
        lambda tmp: datasets.write_tasks(board, tmp[0], tasks),
    )
    result.files[str(tasks_out)] = {"rows": tasks.count, **tasks.counts}
    result.notes.extend(tasks.warnings)
    pref_out = Path(f"{base}.preference.jsonl")
    pref = datasets.ExportResult(kind="preference", path=pref_out)
    _replace(
        [pref_out, datasets.meta_path(pref_out)],
        lambda tmp: datasets.write_preference(board, tmp[0], pref),
    )
    result.files[str(pref_out)] = {"rows": pref.count}


def _join(sources: list[Path], out: Path) -> int:
    """Concatenate ``sources`` into ``out`` (replaced whole); how many lines it holds."""
    tmp = out.with_name(f".{out.name}.tmp")
    lines = 0
    with tmp.open("wb") as fh:
        for source in sources:
            with source.open("rb") as part:
                for chunk in iter(lambda: part.read(1 << 20), b""):  # noqa: B023
                    fh.write(chunk)
                    lines += chunk.count(b"\n")
    os.replace(tmp, out)
    return lines


def _replace(outs: list[Path], write: Any) -> None:
    """Write files through temporary names next to them, then move them in place, so a trainer
    reading the folder never sees half a file. ``write`` gets the temporary paths, in order, and
    must derive the later ones from the first as the final names are derived."""
    tmp_dir = outs[0].parent / ".writing"
    tmp_dir.mkdir(exist_ok=True)
    tmps = [tmp_dir / out.name for out in outs]
    write(tmps)
    for tmp, out in zip(tmps, outs, strict=True):
        if tmp.exists():
            os.replace(tmp, out)


# -- the watermark -------------------------------------------------------------------------------


def _load_state(store: Store, workflow: str) -> dict[str, Any]:
    with store.session() as session:
        row = session.get(CurationWatermark, workflow)
        return dict(row.state) if row is not None else {}


def _save_state(store: Store, workflow: str, state: dict[str, Any]) -> None:
    with store.session() as session:
        row = session.get(CurationWatermark, workflow)
        now = datetime.now(timezone.utc)
        if row is None:
            session.add(CurationWatermark(workflow=workflow, state=state, updated_at=now))
        else:
            row.state = state
            row.updated_at = now
            session.add(row)
        session.commit()


# -- days --------------------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _day(value: datetime) -> str:
    return _aware(value).date().isoformat()


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _calendar(first: datetime | None, last: datetime | None) -> list[str]:
    if first is None or last is None:
        return []
    day, end = _aware(first).date(), _aware(last).date()
    days = []
    while day <= end:
        days.append(day.isoformat())
        day += timedelta(days=1)
    return days


def file_name(workflow: str) -> str:
    """A workflow's name as a file name: itself when it is plain; path separators, ``%`` and
    control characters escaped as ``%XX`` (so two names never share files); shortened with a
    hash when too long for a file system."""
    name = "".join(f"%{ord(c):02X}" if c in "/\\%\0" or ord(c) < 32 else c for c in workflow)
    if name in (".", "..") or name.startswith("."):
        name = "%2E" + name[1:]
    if len(name.encode()) > 120:
        digest = hashlib.sha256(workflow.encode()).hexdigest()[:16]
        name = f"{name.encode()[:100].decode(errors='ignore')}~{digest}"
    return name
