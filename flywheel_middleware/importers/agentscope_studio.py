"""Import AgentScope Studio's ``database.sqlite`` into the flywheel store.

Reads both ``span_table`` shapes — the OTLP-like one Studio uses since its Dec 2025 migration
(``traceId, spanId, parentSpanId, startTimeUnixNano, attributes`` as nested JSON, ``model``,
``inputTokens`` ...) and the earlier one (``id, traceId, parentSpanId, run_id, spanKind,
startTime, latencyMs, status, statusMessage`` ...) — plus ``run_table``, ``reply_table`` and
``message_table``:

- each trace becomes a rollout (id: the 32-hex trace id) with its spans, mapped with the same
  attribute rules as the OTel bridge (``gen_ai.*``, OpenInference, AgentScope 1.x);
- each agent reply that no trace covers becomes a rollout of its own (input: the user message
  before it in the run, output: the reply's messages) with one ``agent`` span;
- the run gives every rollout its ``session_id`` (the run id) and project/run names.

Ids are derived from Studio's ids, so importing the same file twice adds nothing (the store
ignores rows whose primary key exists). Rows go through ``Store.write_rows`` in one
transaction per batch.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flywheel_middleware.capture.genai_attributes import (
    first_value,
    genai_fields,
    span_kind,
)
from flywheel_middleware.capture.records import (
    RolloutRecord,
    SpanRecord,
    ns_to_datetime,
    ns_to_sqlite_text,
)
from flywheel_middleware.errors import FlywheelError
from flywheel_middleware.messages import to_messages
from flywheel_middleware.recording.rows import record_row

__all__ = ["ImportResult", "StudioImportError", "import_studio", "read_studio"]

_MASK63 = (1 << 63) - 1
_REPLY_ID_KEYS = ("agentscope.reply_id", "agentscope.function.reply_id", "reply_id")


class StudioImportError(FlywheelError):
    """The file is not a Studio database this importer understands."""


@dataclass
class ImportResult:
    """What one import read and how much of it was new to the store."""

    traces: int = 0
    replies: int = 0
    spans_read: int = 0
    rollouts_added: int = 0
    spans_added: int = 0
    schema: str = ""
    warnings: list[str] = field(default_factory=list)


# -- id and value conversion ------------------------------------------------------------------


def _hash_hex(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def rollout_id_for_trace(trace_id: str) -> str:
    """Studio's trace id when it is 32 hex digits, else a stable hash of it."""
    tid = str(trace_id).strip().lower()
    if len(tid) == 32 and all(c in "0123456789abcdef" for c in tid):
        return tid
    return _hash_hex(f"studio-trace:{trace_id}")


def span_id_for(span_id: Any) -> int:
    """A positive 63-bit id: the OTel span id when it is hex, else a stable hash."""
    text = str(span_id).strip().lower()
    try:
        value = int(text, 16) if len(text) <= 16 else int(_hash_hex(text)[:16], 16)
    except ValueError:
        value = int(_hash_hex(text)[:16], 16)
    return (value & _MASK63) or 1


def _to_ns(value: Any) -> int | None:
    """Studio times come as ns/ms/s numbers, digit strings or ISO-8601 text."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        number = float(value)
        if number > 1e17:
            return int(number)
        if number > 1e14:
            return int(number * 1_000)
        if number > 1e11:
            return int(number * 1_000_000)
        return int(number * 1_000_000_000)
    text = str(value).strip().replace("Z", "+00:00")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1_000_000_000)


def _json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value[:1] in ("{", "[", '"'):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def flatten(value: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"gen_ai": {"usage": {"input_tokens": 3}}}`` -> ``{"gen_ai.usage.input_tokens": 3}``."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(item, dict) and item:
                flatten(item, name, out)
            else:
                out[name] = item
    elif prefix:
        out[prefix] = value
    return out


def _attr_json(value: Any) -> Any:
    """Attribute values that are JSON text become JSON (what the OTel bridge stores too)."""
    return _json(value) if isinstance(value, str) else value


# -- reading ------------------------------------------------------------------------------------


def _tables(conn: sqlite3.Connection) -> dict[str, set[str]]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return {n: {c[1] for c in conn.execute(f'PRAGMA table_info("{n}")')} for n in names}


def _rows(conn: sqlite3.Connection, table: str) -> Iterator[dict[str, Any]]:
    cur = conn.execute(f'SELECT * FROM "{table}"')
    cols = [d[0] for d in cur.description]
    for row in cur:
        yield dict(zip(cols, row, strict=True))


@dataclass
class _Span:
    record: SpanRecord
    trace: str
    reply_id: str | None
    run_id: str | None
    session: str | None
    user: str | None


def _span_from_new(row: dict[str, Any], rollout_id: str) -> _Span:
    attrs = flatten(_json(row.get("attributes")) or {})
    start = _to_ns(row.get("startTimeUnixNano"))
    end = _to_ns(row.get("endTimeUnixNano"))
    latency = row.get("latencyNs")
    status = _json(row.get("status")) or {}
    code = row.get("statusCode")
    if code is None and isinstance(status, dict):
        code = status.get("code")
    error = None
    if str(code).upper() in ("2", "ERROR", "STATUS_CODE_ERROR"):
        message = status.get("message") if isinstance(status, dict) else None
        error = message or "error"
    name = row.get("name") or "span"
    kind = span_kind(name, attrs)
    fields = genai_fields(attrs, kind)
    parent = row.get("parentSpanId")
    record = SpanRecord(
        id=span_id_for(row.get("spanId") or row.get("id")),
        rollout_id=rollout_id,
        trace_id=rollout_id,
        parent_id=span_id_for(parent) if parent else None,
        kind=kind,
        name=name,
        status="error" if error else "ok",
        error=error,
        started_at=start,
        ended_at=end,
        duration_ms=(
            latency / 1e6 if latency else ((end - start) / 1e6 if start and end else None)
        ),
        model=row.get("model") or fields.model,
        input=_attr_json(fields.input),
        output=_attr_json(fields.output),
        input_tokens=row.get("inputTokens") or fields.input_tokens,
        output_tokens=row.get("outputTokens") or fields.output_tokens,
        attributes=fields.extra or None,
    )
    return _Span(
        record,
        str(row.get("traceId")),
        first_value(attrs, _REPLY_ID_KEYS),
        attrs.get("project.run_id"),
        row.get("conversationId") or fields.session_id,
        fields.user_id,
    )


def _span_from_old(row: dict[str, Any], rollout_id: str) -> _Span:
    attrs = flatten(_json(row.get("attributes")) or {})
    start = _to_ns(row.get("startTime"))
    end = _to_ns(row.get("endTime"))
    latency_ms = row.get("latencyMs")
    status = str(row.get("status") or "").upper()
    error = None
    if status in ("ERROR", "2", "STATUS_CODE_ERROR"):
        error = row.get("statusMessage") or "error"
    name = row.get("name") or "span"
    if "span.kind" not in attrs and row.get("spanKind"):
        kind_col = str(row["spanKind"]).upper()
        if kind_col not in ("INTERNAL", "CLIENT", "SERVER", "PRODUCER", "CONSUMER", "0", "1"):
            attrs["span.kind"] = kind_col
    kind = span_kind(name, attrs)
    fields = genai_fields(attrs, kind)
    parent = row.get("parentSpanId")
    record = SpanRecord(
        id=span_id_for(row.get("id")),
        rollout_id=rollout_id,
        trace_id=rollout_id,
        parent_id=span_id_for(parent) if parent else None,
        kind=kind,
        name=name,
        status="error" if error else "ok",
        error=error,
        started_at=start,
        ended_at=end,
        duration_ms=float(latency_ms)
        if latency_ms is not None
        else ((end - start) / 1e6 if start and end else None),
        model=fields.model,
        input=_attr_json(fields.input),
        output=_attr_json(fields.output),
        input_tokens=fields.input_tokens,
        output_tokens=fields.output_tokens,
        attributes=fields.extra or None,
    )
    run_id = row.get("run_id") or attrs.get("project.run_id")
    return _Span(
        record,
        str(row.get("traceId")),
        first_value(attrs, _REPLY_ID_KEYS),
        run_id,
        run_id or fields.session_id,
        fields.user_id,
    )


def _message_text(msg: Any) -> Any:
    """The text of a Studio message (any shape the normalizer reads), else the message itself."""
    texts = [m["content"] for m in to_messages(msg, "assistant") if m["content"]]
    return "\n".join(texts) if texts else msg


def read_studio(
    path: str | Path, workflow: str
) -> tuple[list[RolloutRecord], list[SpanRecord], ImportResult]:
    """Read a Studio database into flywheel records (nothing is written)."""
    path = Path(path)
    if not path.is_file():
        raise StudioImportError(f"no such file: {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = _tables(conn)
    except sqlite3.DatabaseError as exc:
        raise StudioImportError(f"{path} is not a SQLite database: {exc}") from exc
    result = ImportResult()
    try:
        known = {"span_table", "run_table", "reply_table", "message_table"}
        if not known & set(tables):
            raise StudioImportError(
                f"{path} has none of AgentScope Studio's tables ({', '.join(sorted(known))}); "
                f"found: {', '.join(sorted(tables)) or 'no tables'}"
            )
        runs = {str(r["id"]): r for r in _rows(conn, "run_table")} if "run_table" in tables else {}

        # -- spans, grouped into traces
        spans: list[_Span] = []
        if "span_table" in tables:
            cols = tables["span_table"]
            if "spanId" in cols and "startTimeUnixNano" in cols:
                result.schema, reader = "otlp (Dec 2025+)", _span_from_new
            elif "startTime" in cols and "id" in cols:
                result.schema, reader = "legacy (before Dec 2025)", _span_from_old
            else:
                raise StudioImportError(
                    f"span_table in {path} has an unknown shape: columns {sorted(cols)}"
                )
            for row in _rows(conn, "span_table"):
                trace = row.get("traceId")
                if not trace:
                    result.warnings.append(f"span {row.get('id')} has no traceId; skipped")
                    continue
                spans.append(reader(row, rollout_id_for_trace(str(trace))))
        result.spans_read = len(spans)
        by_trace: dict[str, list[_Span]] = defaultdict(list)
        for s in spans:
            by_trace[s.record.rollout_id].append(s)

        rollouts: list[RolloutRecord] = []
        covered_replies: set[str] = set()
        for rid, members in by_trace.items():
            rollouts.append(_trace_rollout(rid, members, runs, workflow, covered_replies))
        result.traces = len(by_trace)

        # -- replies without a trace
        span_records = [s.record for s in spans]
        if "reply_table" in tables and "message_table" in tables:
            extra_r, extra_s = _reply_rollouts(conn, runs, workflow, covered_replies)
            rollouts.extend(extra_r)
            span_records.extend(extra_s)
            result.replies = len(extra_r)
        return rollouts, span_records, result
    finally:
        conn.close()


def _run_meta(run: dict[str, Any] | None) -> dict[str, Any]:
    if not run:
        return {}
    return {
        "studio_run_id": run.get("id"),
        "studio_project": run.get("project"),
        "studio_run": run.get("name"),
    }


def _trace_rollout(
    rid: str,
    members: list[_Span],
    runs: dict[str, Any],
    workflow: str,
    covered: set[str],
) -> RolloutRecord:
    ids = {m.record.id for m in members}
    roots = [m for m in members if m.record.parent_id is None or m.record.parent_id not in ids]
    roots.sort(key=lambda m: m.record.started_at or 0)
    members.sort(key=lambda m: m.record.started_at or 0)
    for seq, m in enumerate(members):
        m.record.sequence = seq
    root = roots[0] if roots else members[0]
    for m in members:
        if m.reply_id:
            covered.add(str(m.reply_id))
    run_id = next((m.run_id for m in members if m.run_id), None)
    session = next((m.session for m in members if m.session), None) or run_id
    user = next((m.user for m in members if m.user), None)
    starts = [m.record.started_at for m in members if m.record.started_at]
    ends = [m.record.ended_at for m in members if m.record.ended_at]
    started = min(starts) if starts else None
    ended = max(ends) if ends else None
    llm = [m.record for m in members if m.record.kind == "llm"]
    tin = sum(r.input_tokens or 0 for r in llm) if any(r.input_tokens for r in llm) else None
    tout = sum(r.output_tokens or 0 for r in llm) if any(r.output_tokens for r in llm) else None
    error = root.record.error
    meta = {"source": "agentscope-studio", "root_span": root.record.name}
    run_key = run_id or session
    meta.update(_run_meta(runs.get(str(run_key)) if run_key else None))
    return RolloutRecord(
        id=rid,
        workflow=workflow,
        user_id=user,
        session_id=str(session) if session else None,
        input=root.record.input,
        output=root.record.output,
        status="failed" if error else "succeeded",
        error=error,
        started_at=started or _now_ns(),
        ended_at=ended,
        latency_ms=(ended - started) / 1e6 if started and ended else None,
        input_tokens=tin,
        output_tokens=tout,
        total_tokens=(tin or 0) + (tout or 0) if tin is not None or tout is not None else None,
        metadata={k: v for k, v in meta.items() if v is not None},
    )


def _now_ns() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1e9)


def _reply_rollouts(
    conn: sqlite3.Connection, runs: dict[str, Any], workflow: str, covered: set[str]
) -> tuple[list[RolloutRecord], list[SpanRecord]]:
    replies = list(_rows(conn, "reply_table"))
    messages: dict[str, list[Any]] = defaultdict(list)
    for m in _rows(conn, "message_table"):
        messages[str(m.get("replyId"))].append(_json(m.get("msg")))
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in replies:
        by_run[str(r.get("run_id"))].append(r)
    rollouts: list[RolloutRecord] = []
    spans: list[SpanRecord] = []
    for run_id, run_replies in by_run.items():
        run_replies.sort(key=lambda r: _to_ns(r.get("createdAt")) or 0)
        last_user: Any = None
        for reply in run_replies:
            reply_id = str(reply.get("replyId"))
            msgs = messages.get(reply_id, [])
            role = str(reply.get("replyRole") or "").lower()
            if role == "user":
                last_user = _message_text(msgs[-1]) if msgs else None
                continue
            if reply_id in covered or not msgs:
                continue
            rid = _hash_hex(f"studio-reply:{reply_id}")
            start = _to_ns(reply.get("createdAt")) or _now_ns()
            end = _to_ns(reply.get("finishedAt"))
            output = _message_text(msgs[-1]) if len(msgs) == 1 else [_message_text(m) for m in msgs]
            meta = {"source": "agentscope-studio", "studio_reply_id": reply_id}
            meta.update(_run_meta(runs.get(run_id)))
            latency = (end - start) / 1e6 if end else None
            rollouts.append(
                RolloutRecord(
                    id=rid,
                    workflow=workflow,
                    session_id=run_id,
                    input=last_user,
                    output=output,
                    status="succeeded",
                    started_at=start,
                    ended_at=end,
                    latency_ms=latency,
                    metadata={k: v for k, v in meta.items() if v is not None},
                )
            )
            spans.append(
                SpanRecord(
                    id=span_id_for(f"reply:{reply_id}"),
                    rollout_id=rid,
                    kind="agent",
                    name=str(reply.get("replyName") or "agent"),
                    started_at=start,
                    ended_at=end,
                    duration_ms=latency,
                    input=last_user,
                    output=msgs,
                )
            )
    return rollouts, spans


# -- writing ------------------------------------------------------------------------------------


def _count(store: Any, table: str) -> int:
    return int(store.execute(f"SELECT COUNT(*) FROM {table}")[0][0])


def import_studio(
    store: Any,
    path: str | Path,
    workflow: str,
    *,
    batch_size: int = 2000,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Import a Studio database into ``store``; ``progress(done, total)`` after each batch."""
    if not workflow or not str(workflow).strip():
        raise StudioImportError("a workflow name is required (--workflow W)")
    rollouts, spans, result = read_studio(path, workflow)
    for span in spans:  # spans carry their workflow (the hot-problem index reads it)
        span.workflow = workflow
    conv = ns_to_sqlite_text if store.dialect == "sqlite" else ns_to_datetime
    before = (_count(store, "rollout"), _count(store, "span"))
    records: list[Any] = [*rollouts, *spans]
    total = len(records)
    raw = store.raw_connection()
    try:
        for i in range(0, total, batch_size):
            chunk = records[i : i + batch_size]
            by_table: dict[str, list[tuple]] = defaultdict(list)
            for rec in chunk:
                by_table[rec.TABLE].append(record_row(rec, conv))
            try:
                for table, rows in by_table.items():
                    cols = RolloutRecord.COLUMNS if table == "rollout" else SpanRecord.COLUMNS
                    store.write_rows(raw, table, cols, rows)
                raw.commit()
            except Exception:
                raw.rollback()
                raise
            if progress is not None:
                progress(min(i + batch_size, total), total)
    finally:
        raw.close()
    after = (_count(store, "rollout"), _count(store, "span"))
    result.rollouts_added = after[0] - before[0]
    result.spans_added = after[1] - before[1]
    if result.rollouts_added:  # history older than curation's look-back: read it all next cycle
        from flywheel_middleware.loop.curation import forget

        forget(store, workflow)
    return result
