"""Combine reward sources into one reward per rollout, and write it back.

``compute_rewards`` runs every enabled source of YAML ``rewards:`` (default: ``explicit_rating``)
over the rollouts, takes the weighted mean of the sources that have an opinion, and writes:

- ``Rollout.reward`` — the combined value (NULL when no source had an opinion);
- ``Rollout.metadata["reward"]`` — ``{"value", "sources": {name: value}, "weights": {...},
  "computed_at"}``: which sources contributed, for audit and for the experiments;
- one Feedback row per rollout for sources that *create* information (``rule`` -> source
  ``rule``, ``llm_judge`` -> source ``judge``; key = the source's name), replaced on recompute,
  so experiments reading feedback see them and a judge is not asked twice.

A source that raises is reported in ``RewardRun.failures`` by name and the others still count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, update

from flywheel_middleware.config import FlywheelConfig, PluginSpec
from flywheel_middleware.loop.datasets import iter_samples, parse_since
from flywheel_middleware.plugin_system.base import PluginContext, RewardSource, Sample
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import Feedback, Rollout

DEFAULT_SOURCES = [PluginSpec(type="explicit_rating")]


@dataclass
class RewardResult:
    """A rollout's combined reward and what each source said (None = no opinion)."""

    value: float | None
    sources: dict[str, float | None] = field(default_factory=dict)

    @property
    def contributors(self) -> list[str]:
        return [name for name, v in self.sources.items() if v is not None]


class RewardRun(dict[str, RewardResult]):
    """``{rollout_id: RewardResult}`` plus the failures of sources that raised."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []


def combine(values: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Weighted mean over the sources that have an opinion (a zero total weight is no opinion)."""
    num = den = 0.0
    for name, value in values.items():
        if value is None:
            continue
        w = weights.get(name, 1.0)
        num += w * value
        den += w
    return num / den if den > 0 else None


def build_sources(config: FlywheelConfig, store: Store | None = None) -> list[RewardSource]:
    from flywheel_middleware.plugin_system.manager import plugin_manager

    manager = plugin_manager(config)
    context = PluginContext(config=config, store=store)
    if not config.rewards:
        return [
            manager.build("reward", s, where="rewards (default)", context=context)
            for s in DEFAULT_SOURCES
        ]  # type: ignore[misc]
    return manager.build_all("reward", config, context)  # type: ignore[return-value]


def _clean(value: Any) -> float | None:
    if value is None or isinstance(value, bool | str):
        return None if not isinstance(value, bool) else float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number) or math.isinf(number):
        return None
    return min(1.0, max(0.0, number))


def score_samples(
    sources: Sequence[RewardSource], samples: list[Sample], failures: list[str]
) -> dict[str, RewardResult]:
    """Run every source over one batch (contained) and combine per sample."""
    from flywheel_middleware.plugin_system.manager import PluginFailure, run_contained

    per_source: dict[str, list[float | None]] = {}
    errors: list[PluginFailure] = []
    for src in sources:
        ok, scores = run_contained(src, lambda s=src: s.score(samples), errors, "reward")
        if ok and (not isinstance(scores, list) or len(scores) != len(samples)):
            errors.append(
                PluginFailure(
                    f"reward {src.name!r}",
                    f"returned {len(scores) if isinstance(scores, list) else type(scores).__name__}"
                    f" scores for {len(samples)} samples",
                )
            )
            ok = False
        if ok:
            per_source[src.name] = [_clean(v) for v in scores]
    failures.extend(str(e) for e in errors)
    weights = {src.name: src.weight for src in sources}
    out: dict[str, RewardResult] = {}
    for i, sample in enumerate(samples):
        values = {name: scores[i] for name, scores in per_source.items()}
        result = RewardResult(combine(values, weights), values)
        sample.reward = result.value
        out[sample.rollout.id] = result
    return out


def compute_rewards(
    store: Store,
    config: FlywheelConfig,
    rollout_ids: Sequence[str] | None = None,
    workflow: str | None = None,
    *,
    since: str | datetime | None = None,
    write: bool = True,
    batch_size: int = 500,
    sources: Sequence[RewardSource] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RewardRun:
    """Rewards for the chosen rollouts (by ids, or a workflow and time window; else all).

    ``progress(n)`` is called after each batch of ``n`` rollouts (for a progress bar).
    """
    own_sources = sources is None
    srcs = list(sources) if sources is not None else build_sources(config, store)
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        from flywheel_middleware.errors import ConfigError

        raise ConfigError(
            f"reward sources need distinct names (set name: on repeated types): {names}"
        )
    run = RewardRun()
    needs_telemetry = any(s.type_name == "implicit" for s in srcs)
    try:
        for samples in iter_samples(
            store,
            workflow=workflow,
            since=parse_since(since),
            rollout_ids=rollout_ids,
            batch_size=batch_size,
            telemetry=needs_telemetry,
        ):
            results = score_samples(srcs, samples, run.failures)
            run.update(results)
            if write:
                _write(store, srcs, samples, results)
            if progress is not None:
                progress(len(samples))
    finally:
        if own_sources:
            for src in srcs:
                try:
                    src.close()
                except Exception:
                    pass
    return run


def _write(
    store: Store,
    sources: Sequence[RewardSource],
    samples: list[Sample],
    results: dict[str, RewardResult],
) -> None:
    now = datetime.now(timezone.utc)
    weights = {s.name: s.weight for s in sources}
    table = Rollout.__table__  # type: ignore[attr-defined]
    updates = []
    for sample in samples:
        res = results[sample.rollout.id]
        meta = dict(sample.rollout.metadata_ or {})
        meta["reward"] = {
            "value": res.value,
            "sources": res.sources,
            "weights": {k: weights[k] for k in res.sources},
            "computed_at": now.isoformat(),
        }
        updates.append({"rid": sample.rollout.id, "reward": res.value, "meta": meta})
    fb_table = Feedback.__table__  # type: ignore[attr-defined]
    generated = [s for s in sources if s.feedback_source]
    with store.engine.begin() as conn:
        if updates:
            conn.execute(
                update(table)
                .where(table.c.id == bindparam("rid"))
                .values(reward=bindparam("reward"), metadata=bindparam("meta")),
                updates,
            )
        for src in generated:
            ids = [s.rollout.id for s in samples]
            conn.execute(
                delete(fb_table).where(
                    and_(
                        fb_table.c.rollout_id.in_(ids),
                        fb_table.c.source == src.feedback_source,
                        fb_table.c.key == src.name,
                    )
                )
            )
            rows = [
                {
                    "rollout_id": s.rollout.id,
                    "source": src.feedback_source,
                    "key": src.name,
                    "value": results[s.rollout.id].sources.get(src.name),
                    "created_at": now,
                    "metadata": {"computed_by": "flywheel rewards"},
                }
                for s in samples
                if results[s.rollout.id].sources.get(src.name) is not None
            ]
            if rows:
                conn.execute(insert(fb_table), rows)
