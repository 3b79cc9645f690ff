"""Dataset exports: triplets, SFT chat JSONL, preference pairs and AgentJet ``tasks.jsonl``.

Rows are streamed from the store with Core selects (never 100k ORM objects with their spans at
once) and written as JSON Lines. Every row carries its provenance: ``rollout_id`` and
``config_version_id`` (for ``tasks`` inside ``metadata``, where AgentJet keeps extra fields).
Questions and answers are read by the one message normalizer (``flywheel_middleware.messages``);
a row whose question or answer cannot be read is skipped and counted in ``ExportResult.unknown``.

The default curation policy (each part switchable, so a dataset is fit to train on as it comes):

- rewards are brought up to date first: a rollout with feedback newer than its reward (or with
  feedback and no reward yet) is scored by the configured reward sources (``refresh_rewards``);
- rollouts rated bad (reward below ``bad_below``, default 0.5) never enter ``sft``, ``triplets``
  or ``tasks``; unrated ones do unless ``rated_only``;
- ``tasks`` holds one task per question (its normalized text, :func:`question_key`) whose
  ``answer`` is the best-rewarded answer (``per_question``; else one per question-answer pair);
- the train/validation split of ``tasks`` is a seeded hash of the normalized question
  (``split_by="question"``), so no question sits on both sides, and a task keeps its side
  whatever else is exported (``split_by="pair"`` hashes the ``qa_hash`` instead);
- ``preference`` pairs a question's best answer against its worst, when their rewards differ by at
  least ``min_margin`` (default 0.2) and the best is not rated bad.

The configured filters (YAML ``filters:``) run per batch when ``filters=True``; a filter that
raises is reported in ``ExportResult.failures`` and keeps every sample of that batch.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import func, select

from flywheel_middleware.config import FlywheelConfig, parse_config
from flywheel_middleware.errors import FlywheelError
from flywheel_middleware.messages import (
    Unknown,
    answer_text,
    chat_tool,
    content_text,
    mark_empty_tool_results,
    question_text,
    to_messages,
)
from flywheel_middleware.plugin_system.base import Filter, PluginContext, Sample
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import Feedback, Rollout, Span, TelemetryEvent

ExportKind = Literal["triplets", "sft", "preference", "tasks"]
KINDS: tuple[str, ...] = ("triplets", "sft", "preference", "tasks")

R = Rollout.__table__.c  # type: ignore[attr-defined]
S = Span.__table__.c  # type: ignore[attr-defined]

_ROW_COLUMNS = (
    R.id,
    R.workflow,
    R.config_version_id,
    R.variant,
    R.input,
    R.output,
    R.reward,
    R.status,
    R.started_at,
)


class ExportError(FlywheelError, ValueError):
    """An export could not be made (bad kind, bad --since, nothing to write to)."""


@dataclass
class ExportResult:
    """What an export wrote: ``count`` rows to ``path`` (and ``paths`` for split exports)."""

    kind: str
    path: Path
    count: int = 0
    scanned: int = 0
    paths: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    unknown: Unknown = field(default_factory=Unknown)
    bad: int = 0
    unrated: int = 0
    refreshed: int = 0
    warnings: list[str] = field(default_factory=list)


# -- time windows ------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str | datetime | None, now: datetime | None = None) -> datetime | None:
    """'24h', '7d', '30m' (ago) or an ISO date/time; a clear error for anything else."""
    if value is None:
        return None
    if isinstance(value, datetime):  # naive: UTC, as a naive string is read
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    match = _DURATION.match(value)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[unit]: amount})
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ExportError(
            f"--since {value!r}: give a duration like 30m, 24h, 7d or a date like 2026-01-31"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _where(q: Any, workflow: str | None, since: datetime | None, until: datetime | None) -> Any:
    if workflow:
        q = q.where(R.workflow == workflow)
    if since is not None:
        q = q.where(R.started_at >= since)
    if until is not None:
        q = q.where(R.started_at < until)
    return q


# -- streaming rows and samples ----------------------------------------------------------------


def iter_rollout_rows(
    store: Store,
    *,
    workflow: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    rollout_ids: Sequence[str] | None = None,
    batch_size: int = 2000,
    succeeded_only: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Batches of rollout rows (plain dicts), oldest first, streamed with a server-side cursor."""
    if rollout_ids is not None:
        ids = list(rollout_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            q = select(*_ROW_COLUMNS).where(R.id.in_(chunk)).order_by(R.started_at, R.id)
            if succeeded_only:
                q = q.where(R.status == "succeeded")
            with store.engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(q)]
            if rows:
                yield rows
        return
    q = _where(select(*_ROW_COLUMNS), workflow, since, until).order_by(R.started_at, R.id)
    if succeeded_only:
        q = q.where(R.status == "succeeded")
    with store.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(q)
        for partition in result.partitions(batch_size):
            yield [dict(r._mapping) for r in partition]


def count_rollouts(
    store: Store,
    *,
    workflow: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    succeeded_only: bool = False,
) -> int:
    q = _where(select(func.count()).select_from(Rollout.__table__), workflow, since, until)
    if succeeded_only:
        q = q.where(R.status == "succeeded")
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def load_samples(
    store: Store,
    rollout_ids: Sequence[str],
    *,
    spans: bool = True,
    feedback: bool = True,
    telemetry: bool = False,
) -> list[Sample]:
    """ORM samples for one batch of rollouts (spans, feedback and telemetry attached), in order."""
    if not rollout_ids:
        return []
    from sqlmodel import select as sm_select

    with store.session() as session:
        rollouts = {
            r.id: r for r in session.exec(sm_select(Rollout).where(Rollout.id.in_(rollout_ids)))
        }
        by_id = {rid: Sample(rollout=rollouts[rid]) for rid in rollout_ids if rid in rollouts}
        if spans:
            for s in session.exec(
                sm_select(Span)
                .where(Span.rollout_id.in_(rollout_ids))
                .order_by(Span.rollout_id, Span.sequence, Span.started_at)
            ):
                by_id[s.rollout_id].spans.append(s)
        if feedback:
            for f in session.exec(
                sm_select(Feedback)
                .where(Feedback.rollout_id.in_(rollout_ids))
                .order_by(Feedback.created_at)
            ):
                if f.rollout_id in by_id:
                    by_id[f.rollout_id].feedback.append(f)
        if telemetry:
            for t in session.exec(
                sm_select(TelemetryEvent).where(TelemetryEvent.rollout_id.in_(rollout_ids))
            ):
                if t.rollout_id in by_id:
                    by_id[t.rollout_id].telemetry.append(t)
    for sample in by_id.values():
        sample.reward = sample.rollout.reward
    return list(by_id.values())


def iter_samples(
    store: Store,
    *,
    workflow: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    rollout_ids: Sequence[str] | None = None,
    batch_size: int = 500,
    spans: bool = True,
    telemetry: bool = False,
) -> Iterator[list[Sample]]:
    """Batches of full samples (what filters and reward sources look at)."""
    for rows in iter_rollout_rows(
        store,
        workflow=workflow,
        since=since,
        until=until,
        rollout_ids=rollout_ids,
        batch_size=batch_size,
    ):
        yield load_samples(store, [r["id"] for r in rows], spans=spans, telemetry=telemetry)


# -- filtering ---------------------------------------------------------------------------------


def build_filters(config: FlywheelConfig, store: Store | None = None) -> list[Filter]:
    from flywheel_middleware.plugin_system.manager import build_plugins

    return build_plugins("filter", config, PluginContext(config=config, store=store))  # type: ignore[return-value]


def apply_filters(
    filters: Sequence[Filter],
    samples: list[Sample],
    result: ExportResult | None = None,
) -> list[Sample]:
    """The samples every filter keeps; a filter that raises keeps all (and is reported), one
    whose verdicts say it could not judge some samples is reported too."""
    from flywheel_middleware.plugin_system.manager import PluginFailure, run_contained

    kept = samples
    failures: list[PluginFailure] = []
    for flt in filters:
        if not kept:
            break
        ok, verdicts = run_contained(flt, lambda f=flt, k=kept: f.filter(k), failures, "filter")
        if ok and (not isinstance(verdicts, list) or len(verdicts) != len(kept)):
            failures.append(
                PluginFailure(
                    f"filter {flt.name!r}",
                    f"returned {len(verdicts) if isinstance(verdicts, list) else type(verdicts).__name__}"
                    f" verdicts for {len(kept)} samples",
                )
            )
            ok = False
        if not ok:
            continue
        unjudged = [v for v in verdicts if v.label == "error"]
        if unjudged:  # a judge that could not judge failed too: curation reads the day again
            failures.append(
                PluginFailure(
                    f"filter {flt.name!r}",
                    f"could not judge {len(unjudged)} of {len(kept)} samples "
                    f"({sum(v.keep for v in unjudged)} kept as its on_error says, the rest "
                    f"dropped); first: {unjudged[0].reason[:200]}",
                )
            )
        next_kept = [s for s, v in zip(kept, verdicts, strict=True) if v.keep]
        if result is not None:
            result.dropped[flt.name] = result.dropped.get(flt.name, 0) + len(kept) - len(next_kept)
        kept = next_kept
    if result is not None:
        result.failures.extend(str(f) for f in failures)
    return kept


# -- row builders ------------------------------------------------------------------------------


def triplet_row(row: dict[str, Any], unknown: Unknown | None = None) -> dict[str, Any] | None:
    """Agent Lightning's ``Triplet`` (prompt, response, reward), provenance in its ``metadata``
    (a ``Triplet`` drops other keys); None without both texts."""
    prompt = question_text(row["input"], unknown)
    response = answer_text(row["output"], unknown)
    if not prompt.strip() or not response.strip():
        return None
    return {
        "prompt": prompt,
        "response": response,
        "reward": row["reward"],
        "metadata": {
            "rollout_id": row["id"],
            "config_version_id": row["config_version_id"],
            "workflow": row["workflow"],
        },
    }


def _final_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns after the last user turn (the agent's answer, with its tool calls)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [m for m in messages[last_user + 1 :] if m["role"] != "user"]


def sft_messages(
    row: dict[str, Any], llm_span: dict[str, Any] | None, unknown: Unknown | None = None
) -> list[dict[str, Any]]:
    """The answering LLM call's messages plus its answer; else the rollout's input and output.

    ``[]`` when no user question or no final assistant text can be read (counted in
    ``unknown``), so a row of empty or repr text is never written.
    """
    if llm_span is not None:
        messages = to_messages(llm_span.get("input"))
        answer = _final_turns(to_messages(llm_span.get("output"), "assistant"))
        if answer and messages[-len(answer) :] == answer:
            answer = []  # the input already holds the answer (a message object serialized late)
        if _trainable(messages + answer):
            return mark_empty_tool_results(messages + answer)
    prompt = to_messages(row["input"], "user", unknown)
    output = to_messages(row["output"], "assistant", unknown)
    if prompt and output[: len(prompt)] == prompt:  # graph state: the output repeats the input
        messages = output
    else:
        messages = prompt + _final_turns(output)
    if _trainable(messages):
        return mark_empty_tool_results(messages)
    if unknown is not None and prompt and output:
        unknown.add({"input": row["input"], "output": row["output"]})
    return []


def _trainable(messages: list[dict[str, Any]]) -> bool:
    """A user question with text and a final assistant turn with text."""
    return (
        any(m["role"] == "user" and content_text(m["content"]).strip() for m in messages)
        and bool(messages)
        and messages[-1]["role"] == "assistant"
        and bool(content_text(messages[-1]["content"]).strip())
    )


def question_key(question: str) -> str:
    """A question's normalized text (Unicode NFKC, case and spacing folded): what groups and
    splits tasks, so one question typed two ways is one task on one side."""
    return " ".join(unicodedata.normalize("NFKC", question).casefold().split())


def qa_hash(query: str, answer: str) -> str:
    """AgentJet's de-duplication key: sha256(query + "\\n" + answer)."""
    return hashlib.sha256(f"{query}\n{answer}".encode()).hexdigest()


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """'train' or 'validation', from a seeded hash of ``key`` (stable whatever else is exported)."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def task_row(
    row: dict[str, Any],
    *,
    env_type: str | None,
    seed: int,
    val_fraction: float,
    unknown: Unknown | None = None,
    split_by: str = "question",
) -> dict[str, Any] | None:
    query = question_text(row["input"], unknown).strip()
    answer = answer_text(row["output"], unknown).strip()
    if not query or not answer:
        return None
    qa = qa_hash(query, answer)
    split_key = question_key(query) if split_by == "question" else qa
    return {
        "main_query": query,
        "init_messages": [],
        "task_id": row["id"],
        "env_type": env_type or row["workflow"],
        "metadata": {
            "answer": answer,
            "qa_hash": qa,
            "rollout_id": row["id"],
            "config_version_id": row["config_version_id"],
            "workflow": row["workflow"],
            "reward": row["reward"],
            "split": split_of(split_key, seed, val_fraction),
        },
    }


# -- the exporter ------------------------------------------------------------------------------


def _last_llm_spans(store: Store, rollout_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each rollout's LLM span whose output is the rollout's answer (the last such), else its
    last LLM span, as a dict; two queries per batch. A call made after the answer (a title,
    a summary) is not the conversation that answered. Spans in order of sequence, then start
    time (spans mirrored from OpenTelemetry all have sequence 0)."""
    q = (
        select(S.rollout_id, S.sequence, S.input, S.output, S.attributes)
        .where(S.rollout_id.in_(rollout_ids), S.kind == "llm")
        .order_by(S.rollout_id, S.sequence, S.started_at, S.id)
    )
    answers_q = select(R.id, R.output).where(R.id.in_(rollout_ids))
    out: dict[str, dict[str, Any]] = {}
    answered: set[str] = set()
    with store.engine.connect() as conn:
        answers = {r.id: " ".join(answer_text(r.output).split()) for r in conn.execute(answers_q)}
        for r in conn.execute(q):
            said = " ".join(answer_text(r.output).split())
            if said and said == answers.get(r.rollout_id):
                answered.add(r.rollout_id)
            elif r.rollout_id in answered:
                continue  # a call made after the answer
            params = (r.attributes or {}).get("invocation_params") or {}
            out[r.rollout_id] = {"input": r.input, "output": r.output, "tools": params.get("tools")}
    return out


def sft_tools(messages: list[dict[str, Any]], captured: Any) -> list[dict[str, Any]] | None:
    """The ``tools`` of an sft row whose messages call tools: the function schemas the agent
    passed to the model (captured from its call), and for a called tool none was captured
    for, its name with an open parameter schema. None when nothing is called."""
    called = {
        call["function"]["name"]
        for m in messages
        for call in m.get("tool_calls") or ()
        if isinstance(call, dict) and isinstance(call.get("function"), dict)
    }
    if not called:
        return None
    chat = [chat_tool(t) for t in captured or () if isinstance(t, dict)]
    tools = [
        t
        for t in chat
        if t.get("type") == "function" and isinstance((t.get("function") or {}).get("name"), str)
    ]
    declared = {t["function"]["name"] for t in tools}
    for name in sorted(called - declared):
        tools.append(
            {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        )
    return tools


def _dump(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def refresh_rewards(
    store: Store,
    config: FlywheelConfig | None,
    *,
    workflow: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Score the rollouts whose feedback is newer than their reward; how many were scored.

    So an export right after ``fw.feedback`` sees the ratings without ``flywheel rewards``.
    A rollout with feedback and no computed reward counts as stale; a reward set by the agent
    itself (no ``metadata.reward``) is left alone unless it is missing.
    """
    from flywheel_middleware.loop.rewards import compute_rewards

    F = Feedback.__table__.c  # type: ignore[attr-defined]
    latest = _where(  # the window's feedback only: the cost follows the window, not history
        select(F.rollout_id, func.max(F.created_at).label("latest"))
        .join(Rollout.__table__, R.id == F.rollout_id)
        .group_by(F.rollout_id),
        workflow,
        since,
        until,
    ).subquery()
    q = _where(
        select(R.id, R.reward, R.metadata, latest.c.latest).join(
            latest, latest.c.rollout_id == R.id
        ),
        workflow,
        since,
        until,
    )
    stale: list[str] = []
    with store.engine.connect() as conn:
        for r in conn.execute(q):
            computed = ((r.metadata or {}).get("reward") or {}).get("computed_at")
            if computed is None:
                if r.reward is None:
                    stale.append(r.id)
            elif _aware(r.latest) > _aware(datetime.fromisoformat(computed)):
                stale.append(r.id)
    if stale:
        compute_rewards(store, config or parse_config(""), rollout_ids=stale)
    return len(stale)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def export(
    store: Store,
    kind: str,
    workflow: str | None,
    out: str | Path,
    *,
    config: FlywheelConfig | None = None,
    since: str | datetime | None = None,
    until: datetime | None = None,
    filters: bool = False,
    min_reward: float | None = None,
    bad_below: float | None = 0.5,
    rated_only: bool = False,
    min_margin: float = 0.2,
    per_question: bool = True,
    split_by: Literal["question", "pair"] = "question",
    refresh: bool = True,
    env_type: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    succeeded_only: bool = True,
    batch_size: int = 2000,
    progress: bool = False,
    inline_provenance: bool = False,
    preference_format: Literal["openai", "trl"] = "openai",
) -> ExportResult:
    """Write one dataset as JSON Lines and say what was written (the controller calls this).

    The curation policy of the module docstring applies; ``bad_below=None`` keeps bad-rated
    rows, ``per_question=False`` keeps every answer in ``tasks``, ``refresh=False`` exports
    rewards as stored. ``min_reward`` keeps only rows whose reward is at least this (rows
    without a reward are then skipped); ``min_margin`` is the smallest reward gap of a
    preference pair. ``sft`` and ``preference`` rows hold only what their consumer reads
    (OpenAI's fine-tuning formats; ``preference_format="trl"`` for TRL's); their provenance
    (rollout ids, config versions, rewards) goes to ``meta_path(out)``, line for line,
    unless ``inline_provenance``.
    """
    if kind not in KINDS:
        raise ExportError(f"unknown export kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 <= val_fraction < 1:
        raise ExportError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, value in (
        ("min_reward", min_reward),
        ("bad_below", bad_below),
        ("min_margin", min_margin),
    ):
        # NaN compares false with every reward, so as a threshold it would keep every row.
        if value is not None and not abs(value) < float("inf"):
            raise ExportError(f"{name} must be a finite number, got {value}")
    if split_by not in ("question", "pair"):
        raise ExportError(f"split_by must be 'question' or 'pair', got {split_by!r}")
    if preference_format not in ("openai", "trl"):
        raise ExportError(f"preference_format must be 'openai' or 'trl', not {preference_format!r}")
    since_dt = parse_since(since)
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    result = ExportResult(kind=kind, path=out)
    if refresh:
        result.refreshed = refresh_rewards(
            store, config, workflow=workflow, since=since_dt, until=until
        )
    flts: list[Filter] = []
    if filters:
        if config is None:
            raise ExportError("filters=True needs the configuration (its filters: list)")
        flts = build_filters(config, store)

    total = (
        count_rollouts(
            store, workflow=workflow, since=since_dt, until=until, succeeded_only=succeeded_only
        )
        if progress
        else 0
    )
    bar_ctx: Any = nullcontext(None)
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar_ctx = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
    try:
        with bar_ctx as bar:
            task = bar.add_task(f"export {kind}", total=total) if bar is not None else None
            batches = iter_rollout_rows(
                store,
                workflow=workflow,
                since=since_dt,
                until=until,
                batch_size=batch_size,
                succeeded_only=succeeded_only,
            )
            writer = _WRITERS[kind]
            writer(
                store,
                batches,
                out,
                result,
                flts=flts,
                policy=_Policy(min_reward, bad_below, rated_only),
                min_margin=min_margin,
                per_question=per_question,
                split_by=split_by,
                env_type=env_type,
                seed=seed,
                val_fraction=val_fraction,
                inline=inline_provenance,
                preference_format=preference_format,
                advance=(lambda n: bar.advance(task, n)) if bar is not None else (lambda n: None),
            )
    finally:
        _close(flts)
    return result


def _close(flts: list[Filter]) -> None:
    for flt in flts:
        try:
            flt.close()
        except Exception:
            pass


@dataclass
class _Policy:
    """Which rows may enter a dataset by their reward."""

    min_reward: float | None = None
    bad_below: float | None = 0.5
    rated_only: bool = False

    def drop(self, reward: float | None, result: ExportResult) -> bool:
        if reward is None:
            if self.rated_only or self.min_reward is not None:
                result.unrated += 1
                return True
            return False
        if self.bad_below is not None and reward < self.bad_below:
            result.bad += 1
            return True
        if self.min_reward is not None and reward < self.min_reward:
            result.skipped += 1
            return True
        return False


def _batches(
    store: Store,
    batches: Iterator[list[dict[str, Any]]],
    result: ExportResult,
    flts: list[Filter],
    policy: _Policy | None,
    advance: Any,
) -> Iterator[list[dict[str, Any]]]:
    """Rows after the reward policy and the filters (filters see full samples of the batch)."""
    for rows in batches:
        result.scanned += len(rows)
        advance(len(rows))
        if policy is not None:
            rows = [r for r in rows if not policy.drop(r["reward"], result)]
        if flts and rows:
            samples = load_samples(store, [r["id"] for r in rows])
            kept = {s.rollout.id for s in apply_filters(flts, samples, result)}
            rows = [r for r in rows if r["id"] in kept]
        if rows:
            yield rows


def _write_triplets(store, batches, out, result, *, flts, policy, advance, **_):
    with out.open("w", encoding="utf-8") as fh:
        for rows in _batches(store, batches, result, flts, policy, advance):
            for r in rows:
                triplet = triplet_row(r, result.unknown)
                if triplet is None:
                    result.skipped += 1
                    continue
                fh.write(_dump(triplet))
                result.count += 1
    result.paths["all"] = out
    result.counts["all"] = result.count


def meta_path(out: Path) -> Path:
    """A dataset file's provenance sidecar: ``x.sft.jsonl`` → ``x.sft.meta.jsonl``."""
    return out.with_name(f"{out.stem}.meta{out.suffix}")


class _RowsWithProvenance:
    """Writes a dataset's rows, and each row's provenance to the sidecar on the same line
    number (or into the row itself, ``inline``), so the rows are what a consumer accepts."""

    def __init__(self, out: Path, inline: bool) -> None:
        self.inline = inline
        self.rows = out.open("w", encoding="utf-8")
        self.meta = None if inline else meta_path(out).open("w", encoding="utf-8")

    def write(self, row: dict[str, Any], provenance: dict[str, Any]) -> None:
        if self.meta is None:
            row = {**row, **provenance}
        else:
            self.meta.write(_dump(provenance))
        self.rows.write(_dump(row))

    def __enter__(self) -> _RowsWithProvenance:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rows.close()
        if self.meta is not None:
            self.meta.close()


def _write_sft(store, batches, out, result, *, flts, policy, advance, inline, **_):
    with _RowsWithProvenance(out, inline) as sink:
        for rows in _batches(store, batches, result, flts, policy, advance):
            spans = _last_llm_spans(store, [r["id"] for r in rows])
            for r in rows:
                messages = sft_messages(r, spans.get(r["id"]), result.unknown)
                if not messages:
                    result.skipped += 1
                    continue
                provenance = {
                    "rollout_id": r["id"],
                    "config_version_id": r["config_version_id"],
                    "reward": r["reward"],
                }
                row: dict[str, Any] = {"messages": messages}
                tools = sft_tools(messages, (spans.get(r["id"]) or {}).get("tools"))
                if tools is not None:
                    row["tools"] = tools
                sink.write(row, provenance)
                result.count += 1
    result.paths["all"] = out
    result.counts["all"] = result.count


def preference_row(question: str, chosen: str, rejected: str, fmt: str) -> dict[str, Any]:
    """A preference pair in OpenAI's preference fine-tuning shape, or TRL's conversational."""
    prompt = [{"role": "user", "content": question}]
    good = [{"role": "assistant", "content": chosen}]
    bad = [{"role": "assistant", "content": rejected}]
    if fmt == "trl":
        return {"prompt": prompt, "chosen": good, "rejected": bad}
    return {"input": {"messages": prompt}, "preferred_output": good, "non_preferred_output": bad}


@dataclass
class QuestionBoard:
    """Per question, what ``tasks`` and ``preference`` keep: the best task (after the reward
    policy), and the two best and two worst rated answers of distinct text (so a pair never
    sets an answer against itself). Memory grows with the number of distinct questions, not
    rollouts; boards of disjoint time ranges merge into the board of their union (so the
    controller re-reads only the days that changed)."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    best: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    worst: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def offer_task(self, key: str, task: dict[str, Any]) -> bool:
        """Keep ``task`` if it beats the question's current one; False if it was a duplicate."""
        current = self.tasks.get(key)
        if current is None or _rank(task) > _rank(current):
            self.tasks[key] = task
        return current is None

    def offer_rated(self, key: str, answer: dict[str, Any]) -> None:
        self.best[key] = _two_distinct(self.best.get(key, []), answer, sign=1)
        self.worst[key] = _two_distinct(self.worst.get(key, []), answer, sign=-1)

    def pair(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The widest-margin (chosen, rejected) of different answers; None if there is none.
        It is among the two best and two worst distinct answers kept."""
        pairs = [
            (b, w) for b in self.best[key] for w in self.worst[key] if b["answer"] != w["answer"]
        ]
        return max(pairs, key=lambda p: p[0]["reward"] - p[1]["reward"], default=None)

    def merge(self, later: QuestionBoard) -> None:
        """Take in the board of a later time range (a tie keeps the earlier answer)."""
        for key, task in later.tasks.items():
            self.offer_task(key, task)
        for side in (later.best, later.worst):
            for key, answers in side.items():
                for answer in answers:
                    self.offer_rated(key, answer)

    def dump(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as fh:
            for part in ("tasks", "best", "worst"):
                for key, value in getattr(self, part).items():
                    fh.write(_dump({"part": part, "key": key, "value": value}))

    @classmethod
    def load(cls, path: Path) -> QuestionBoard:
        board = cls()
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                entry = orjson.loads(line)
                getattr(board, entry["part"])[entry["key"]] = entry["value"]
        return board


def _two_distinct(
    kept: list[dict[str, Any]], answer: dict[str, Any], *, sign: int
) -> list[dict[str, Any]]:
    """The two answers of distinct text with the highest ``sign * reward`` (earlier on ties)."""
    for i, other in enumerate(kept):
        if other["answer"] == answer["answer"]:
            if sign * answer["reward"] <= sign * other["reward"]:
                return kept
            kept = kept[:i] + kept[i + 1 :]
            break
    ranked = sorted([*kept, answer], key=lambda a: -sign * a["reward"])  # stable: earlier first
    return ranked[:2]


def _fill_board(
    store,
    batches,
    result,
    *,
    flts,
    policy,
    env_type=None,
    seed=0,
    val_fraction=0.1,
    per_question=True,
    split_by="question",
    advance=lambda n: None,
    **_,
) -> QuestionBoard:
    """Read rows into a board: every rated answer for ``preference``; with a ``policy``, also
    the tasks that pass it (``policy=None`` builds the preference side only)."""
    board = QuestionBoard()
    seen: set[str] = set()
    for rows in _batches(store, batches, result, flts, None, advance):
        for r in rows:
            task = task_row(
                r,
                env_type=env_type,
                seed=seed,
                val_fraction=val_fraction,
                unknown=result.unknown,
                split_by=split_by,
            )
            if task is None:
                result.skipped += 1
                continue
            question = f"{r['workflow']}\n{question_key(task['main_query'])}"
            if r["reward"] is not None:
                board.offer_rated(
                    question,
                    {
                        "id": r["id"],
                        "workflow": r["workflow"],
                        "config_version_id": r["config_version_id"],
                        "question": task["main_query"],
                        "answer": task["metadata"]["answer"],
                        "reward": r["reward"],
                    },
                )
            elif policy is None:
                result.unrated += 1
            if policy is None or policy.drop(r["reward"], result):
                continue
            qa = task["metadata"]["qa_hash"]
            # a repeated answer still competes: rated higher the second time, it is the best
            offered = board.offer_task(question if per_question else qa, task)
            if qa in seen or not offered:
                result.duplicates += 1
            seen.add(qa)
    return board


def question_board(
    store: Store,
    *,
    workflow: str | None,
    since: datetime | None = None,
    until: datetime | None = None,
    config: FlywheelConfig | None = None,
    filters: bool = False,
) -> tuple[QuestionBoard, ExportResult]:
    """The default policy's board of one time range (what the controller keeps per day)."""
    result = ExportResult(kind="tasks", path=Path())
    flts = build_filters(config, store) if filters and config is not None else []
    try:
        batches = iter_rollout_rows(
            store, workflow=workflow, since=since, until=until, succeeded_only=True
        )
        board = _fill_board(store, batches, result, flts=flts, policy=_Policy())
    finally:
        _close(flts)
    return board, result


def write_preference(
    board: QuestionBoard,
    out: Path,
    result: ExportResult,
    *,
    policy: _Policy | None = None,
    min_margin: float = 0.2,
    inline: bool = False,
    preference_format: str = "openai",
) -> None:
    """A question's best answer against its worst, when the margin holds and the best is good."""
    policy = policy or _Policy()
    with _RowsWithProvenance(out, inline) as sink:
        for key in board.best:
            pair = board.pair(key)
            if pair is None:
                continue
            chosen, rejected = pair
            gap = chosen["reward"] - rejected["reward"]
            if gap <= 0 or gap < min_margin:
                continue
            if policy.bad_below is not None and chosen["reward"] < policy.bad_below:
                result.bad += 1
                continue
            if policy.min_reward is not None and chosen["reward"] < policy.min_reward:
                continue
            sink.write(
                preference_row(
                    chosen["question"], chosen["answer"], rejected["answer"], preference_format
                ),
                {
                    "chosen_reward": chosen["reward"],
                    "rejected_reward": rejected["reward"],
                    "workflow": chosen["workflow"],
                    "prompt_hash": hashlib.sha256(
                        question_key(chosen["question"]).encode()
                    ).hexdigest(),
                    "chosen_rollout_id": chosen["id"],
                    "rejected_rollout_id": rejected["id"],
                    "chosen_config_version_id": chosen["config_version_id"],
                    "rejected_config_version_id": rejected["config_version_id"],
                },
            )
            result.count += 1
    result.paths["all"] = out
    result.counts["all"] = result.count


def _write_preference(store, batches, out, result, *, policy, inline, preference_format, **kw):
    board = _fill_board(store, batches, result, policy=None, **kw)
    write_preference(
        board,
        out,
        result,
        policy=policy,
        min_margin=kw["min_margin"],
        inline=inline,
        preference_format=preference_format,
    )


def val_path(out: Path) -> Path:
    """Where the validation split of ``tasks`` goes: ``tasks.jsonl`` -> ``tasks.val.jsonl``."""
    return out.with_name(f"{out.stem}.val{out.suffix or '.jsonl'}")


def _rank(task: dict[str, Any]) -> tuple[bool, float]:
    """Rated above unrated, then by reward (a tie keeps the earlier answer)."""
    reward = task["metadata"]["reward"]
    return (reward is not None, reward if reward is not None else 0.0)


def write_tasks(
    board: QuestionBoard, out: Path, result: ExportResult, *, val_fraction: float = 0.1
) -> None:
    """The board's tasks, train to ``out`` and validation to ``val_path(out)``."""
    val = val_path(out)
    counts = {"train": 0, "validation": 0}
    with (
        out.open("w", encoding="utf-8") as train_fh,
        val.open("w", encoding="utf-8") if val_fraction > 0 else nullcontext(None) as val_fh,
    ):
        for task in board.tasks.values():
            split = task["metadata"]["split"]
            (val_fh if split == "validation" else train_fh).write(_dump(task))
            counts[split] += 1
    result.count = counts["train"] + counts["validation"]
    if val_fraction > 0 and counts["train"] and not counts["validation"]:
        result.warnings.append(  # AgentJet refuses an empty file
            f"no question fell in the validation split ({counts['train']} questions, "
            f"val_fraction {val_fraction}): {val.name} is empty"
        )
    result.paths = {"train": out, **({"validation": val} if val_fraction > 0 else {})}
    result.counts = counts


def _write_tasks(store, batches, out, result, *, val_fraction, **kw):
    board = _fill_board(store, batches, result, val_fraction=val_fraction, **kw)
    write_tasks(board, out, result, val_fraction=val_fraction)


_WRITERS = {
    "triplets": _write_triplets,
    "sft": _write_sft,
    "preference": _write_preference,
    "tasks": _write_tasks,
}
