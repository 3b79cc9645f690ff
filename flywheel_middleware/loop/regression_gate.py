"""The pre-live regression gate (seed 000's verify stage): candidates are checked offline first.

Before a candidate config gets any live traffic, the controller runs it and the active
(baseline) config on a regression set — the validation split of the workflow's ``tasks``
export plus recent bad cases (rated ≤ the low-rating trigger's ``max_rating``, or failed) —
through the team's runner (YAML ``evaluation.runner``: ``runner(config, input) -> answer``),
and scores every answer with the judges (``evaluation.judges``, reward sources such as
``rule`` or ``llm_judge``; default the ``rewards:`` list). Both configs see the same inputs,
so the comparison is paired. A candidate whose mean score is below the baseline's by more
than ``evaluation.margin`` is dropped; the per-case scores, both means and the margin are the
evidence, in the cycle report and in a ``regression_gate`` ChangeEvent per candidate.

A runner that raises on one input scores 0 there (an answer that crashes is a bad answer) and
the error is kept with the runner's name; a runner that cannot be loaded, or fails on every
baseline input, or judges that score nothing make a gate error: the cycle goes on and no
candidate of that workflow gets traffic until it is fixed. Fewer than ``min_cases`` judged
cases give no verdict and the candidate goes on to its experiment, noted as unverified.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.config import EvaluationConfig, FlywheelConfig
from flywheel_middleware.errors import ConfigError
from flywheel_middleware.loop import datasets, rewards, versions
from flywheel_middleware.messages import question_text
from flywheel_middleware.plugin_system.base import PluginContext, RewardSource, Sample
from flywheel_middleware.plugin_system.llm import import_object
from flywheel_middleware.plugin_system.manager import plugin_manager
from flywheel_middleware.store import queries
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, Rollout

RUNNER_GROUP = "flywheel_middleware.runners"
"""The entry-point group a package may publish runners in (``evaluation.runner: NAME``)."""
GATE_KIND = "regression_gate"
"""The ChangeEvent kind of a gate verdict."""
Runner = Callable[[dict[str, Any], Any], Any]


def load_runner(spec: str) -> Runner:
    """``pkg.module:function`` (or ``pkg.module.function``), else an entry point of
    ``RUNNER_GROUP`` by that name; ConfigError naming the runner when neither loads."""
    if ":" in spec or "." in spec:
        runner = import_object(spec)
    else:
        found = [
            ep for ep in importlib.metadata.entry_points(group=RUNNER_GROUP) if ep.name == spec
        ]
        if not found:
            raise ConfigError(
                f"runner {spec!r}: no entry point of that name in group {RUNNER_GROUP!r}; "
                "give a dotted path like 'mypkg.agent:run'"
            )
        try:
            runner = found[0].load()
        except Exception as exc:
            raise ConfigError(
                f"runner {spec!r}: loading its entry point failed: {type(exc).__name__}: {exc}"
            ) from None
    if not callable(runner):
        raise ConfigError(f"runner {spec!r} is not callable")
    return runner


def build_judges(
    config: FlywheelConfig, settings: EvaluationConfig, workflow: str, store: Store | None = None
) -> list[RewardSource]:
    """The reward sources that score the gate's answers: ``evaluation.judges``, else the
    ``rewards:`` list; errors name the key path of the bad spec."""
    if not settings.judges:
        return rewards.build_sources(config, store)
    manager = plugin_manager(config)
    context = PluginContext(config=config, store=store)
    own = config.workflows.get(workflow)
    key = (
        f"workflows.{workflow}.evaluation"
        if own is not None and own.evaluation is not None
        else "evaluation"
    )
    source = config.source or "configuration"
    return [
        manager.build("reward", spec, where=f"{source}: {key}.judges[{i}]", context=context)  # type: ignore[misc]
        for i, spec in enumerate(settings.judges)
        if spec.enabled
    ]


# -- the regression set --------------------------------------------------------------------


@dataclass
class RegressionCase:
    """One input of the regression set: a validation task or a recent bad case."""

    id: str
    source: str  # "validation" or "bad case"
    input: Any
    question: str
    reference: str | None = None
    rollout_id: str | None = None


def validation_cases(store: Store, config: FlywheelConfig, workflow: str) -> list[RegressionCase]:
    """The validation split of the workflow's ``tasks`` (the default curation policy: one task
    per question with its best answer, bad-rated answers left out), with each task's recorded
    input."""
    board, _ = datasets.question_board(store, workflow=workflow, config=config)
    tasks = [t for t in board.tasks.values() if t["metadata"]["split"] == "validation"]
    ids = [t["metadata"]["rollout_id"] for t in tasks]
    inputs = {
        s.rollout.id: s.rollout.input
        for s in datasets.load_samples(store, ids, spans=False, feedback=False)
    }
    return [
        RegressionCase(
            id=f"val:{t['metadata']['rollout_id']}",
            source="validation",
            input=inputs.get(t["metadata"]["rollout_id"], t["main_query"]),
            question=t["main_query"],
            reference=t["metadata"].get("answer"),
            rollout_id=t["metadata"]["rollout_id"],
        )
        for t in tasks
    ]


def bad_cases(
    store: Store, config: FlywheelConfig, workflow: str, since: datetime, limit: int
) -> list[RegressionCase]:
    """Recent rollouts rated ≤ the low-rating trigger's ``max_rating`` or failed, worst first."""
    found = queries.bad_cases(
        store,
        workflow=workflow,
        max_rating=config.triggers.low_rating.max_rating,
        limit=limit,
        since=since,
    )
    return [
        RegressionCase(
            id=f"bad:{c.rollout.id}",
            source="bad case",
            input=c.rollout.input,
            question=question_text(c.rollout.input),
            rollout_id=c.rollout.id,
        )
        for c in found
    ]


def regression_set(
    store: Store,
    config: FlywheelConfig,
    workflow: str,
    settings: EvaluationConfig,
    now: datetime,
) -> list[RegressionCase]:
    """Up to ``max_cases`` distinct questions: bad cases take at most half when there are
    validation tasks enough for the rest, and either fills what the other leaves."""
    limit = settings.max_cases
    validation = validation_cases(store, config, workflow)
    bad = bad_cases(store, config, workflow, now - timedelta(days=settings.bad_case_days), limit)
    bad_share = max(limit // 2, limit - len(validation))
    chosen: list[RegressionCase] = []
    seen: set[str] = set()
    for pool, room in ((bad, bad_share), (validation, limit), (bad, limit)):
        taken = 0
        for case in pool:
            key = datasets.question_key(case.question) or case.id
            if len(chosen) >= limit or taken >= room:
                break
            if key in seen:
                continue
            seen.add(key)
            chosen.append(case)
            taken += 1
    return chosen


# -- running and judging -------------------------------------------------------------------


@dataclass
class CaseScore:
    """One config's answer to one case: its judged score (None: no judge had an opinion)."""

    score: float | None
    answer: str = ""
    error: str | None = None


@dataclass
class GateVerdict:
    """The gate's verdict on one candidate (``admitted`` False: dropped before any traffic)."""

    label: str
    admitted: bool
    verified: bool
    reason: str
    mean: float | None = None
    baseline_mean: float | None = None
    judged: int = 0
    difference: dict[str, float] | None = None
    scores: list[CaseScore] = field(default_factory=list)
    errors: int = 0

    def evidence(self, cases: Sequence[RegressionCase], baseline: Sequence[CaseScore]) -> dict:
        return {
            "candidate": self.label,
            "admitted": self.admitted,
            "verified": self.verified,
            "reason": self.reason,
            "mean": self.mean,
            "baseline_mean": self.baseline_mean,
            "judged_cases": self.judged,
            "difference": self.difference,
            "runner_errors": self.errors,
            "cases": [
                {
                    "case": case.id,
                    "source": case.source,
                    "question": case.question[:200],
                    "baseline": base.score,
                    "candidate": own.score,
                    **({"error": own.error} if own.error else {}),
                }
                for case, base, own in zip(cases, baseline, self.scores, strict=True)
            ],
        }


@dataclass
class GateRun:
    """What the gate did for one workflow in one cycle."""

    workflow: str
    runner: str
    margin: float
    cases: list[RegressionCase] = field(default_factory=list)
    baseline: list[CaseScore] = field(default_factory=list)
    verdicts: list[GateVerdict] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def baseline_mean(self) -> float | None:
        return _mean([s.score for s in self.baseline])

    def as_dict(self) -> dict[str, Any]:
        """The report's view: the verdicts with their per-case evidence."""
        return {
            "workflow": self.workflow,
            "runner": self.runner,
            "margin": self.margin,
            "cases": len(self.cases),
            "sources": {
                s: sum(1 for c in self.cases if c.source == s) for s in ("validation", "bad case")
            },
            "baseline_mean": self.baseline_mean,
            "error": self.error,
            "notes": self.notes,
            "verdicts": [v.evidence(self.cases, self.baseline) for v in self.verdicts],
        }


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _short(value: Any, width: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def answer_cases(
    runner: Runner, runner_name: str, config: dict[str, Any], cases: Sequence[RegressionCase]
) -> tuple[list[Any], list[str | None]]:
    """The runner's answer to every case (None and the error where it raised)."""
    answers: list[Any] = []
    errors: list[str | None] = []
    for case in cases:
        try:
            answers.append(runner(config, case.input))
            errors.append(None)
        except Exception as exc:
            answers.append(None)
            errors.append(f"runner {runner_name!r} raised {type(exc).__name__}: {exc}")
    return answers, errors


def judge(
    judges: Sequence[RewardSource],
    workflow: str,
    cases: Sequence[RegressionCase],
    answers: Sequence[Any],
    errors: Sequence[str | None],
    failures: list[str],
) -> list[CaseScore]:
    """Score the answers with the judges (combined as rewards are); a raised runner scores 0."""
    samples = []
    for case, answer, error in zip(cases, answers, errors, strict=True):
        rollout = Rollout(
            id=case.id,
            workflow=workflow,
            input=case.input,
            output=answer,
            status="failed" if error else "succeeded",
            error=error,
            metadata_={
                "regression": {
                    "source": case.source,
                    "reference": case.reference,
                    "rollout_id": case.rollout_id,
                }
            },
        )
        samples.append(Sample(rollout=rollout))
    judged = [s for s, e in zip(samples, errors, strict=True) if e is None]
    results = rewards.score_samples(judges, judged, failures) if judged else {}
    out = []
    for sample, answer, error in zip(samples, answers, errors, strict=True):
        if error is not None:
            out.append(CaseScore(0.0, "", error))
            continue
        out.append(CaseScore(results[sample.rollout.id].value, _short(answer)))
    return out


def paired_difference(
    candidate: Sequence[float | None], baseline: Sequence[float | None]
) -> dict[str, float] | None:
    """Mean of candidate − baseline over the cases both have a score for, with its 95%
    normal interval (for the report; the verdict is the means against the margin)."""
    diffs = [
        c - b for c, b in zip(candidate, baseline, strict=True) if c is not None and b is not None
    ]
    if not diffs:
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": float(n)}


def _verdict(
    label: str, scores: list[CaseScore], baseline: list[CaseScore], settings: EvaluationConfig
) -> GateVerdict:
    pairs = [
        (c.score, b.score)
        for c, b in zip(scores, baseline, strict=True)
        if c.score is not None and b.score is not None
    ]
    errors = sum(1 for s in scores if s.error)
    if len(pairs) < settings.min_cases:
        return GateVerdict(
            label,
            admitted=True,
            verified=False,
            reason=f"unverified: {len(pairs)} judged case(s), fewer than min_cases "
            f"{settings.min_cases}",
            judged=len(pairs),
            scores=scores,
            errors=errors,
        )
    mean = sum(c for c, _ in pairs) / len(pairs)
    base = sum(b for _, b in pairs) / len(pairs)
    worse = mean < base - settings.margin
    relation = "<" if worse else "≥"
    reason = (
        f"{'dropped' if worse else 'passed'}: mean score {mean:.3f} {relation} baseline "
        f"{base:.3f} − margin {settings.margin:g} on {len(pairs)} cases"
    )
    if errors:
        reason += f"; the runner raised on {errors}"
    return GateVerdict(
        label,
        admitted=not worse,
        verified=True,
        reason=reason,
        mean=mean,
        baseline_mean=base,
        judged=len(pairs),
        difference=paired_difference([c.score for c in scores], [b.score for b in baseline]),
        scores=scores,
        errors=errors,
    )


def run_gate(
    store: Store,
    config: FlywheelConfig,
    workflow: str,
    baseline: dict[str, Any],
    candidates: Sequence[tuple[str, dict[str, Any]]],
    *,
    now: datetime,
    settings: EvaluationConfig | None = None,
) -> GateRun:
    """Run ``baseline`` and each ``(label, config)`` candidate on the regression set and judge
    them. Never raises for a runner's or a judge's failure: ``GateRun.error`` says why no
    verdict could be given, ``notes`` what went wrong on the way."""
    settings = settings or config.evaluation_for(workflow)
    if settings is None:
        raise ConfigError(f"workflow {workflow!r} has no evaluation: settings")
    run = GateRun(workflow=workflow, runner=settings.runner, margin=settings.margin)
    try:
        runner = load_runner(settings.runner)
        judges = build_judges(config, settings, workflow, store)
    except Exception as exc:
        run.error = f"regression gate for {workflow}: {exc}"
        return run
    try:
        run.cases = regression_set(store, config, workflow, settings, now)
        if not run.cases:
            run.notes.append(
                f"{workflow}: the regression set is empty (no validation tasks or bad cases)"
            )
        where = f"workflow {workflow!r} regression gate"
        failures: list[str] = []
        answers, errors = answer_cases(
            runner, settings.runner, versions.config_in_use(baseline, where), run.cases
        )
        run.baseline = judge(judges, workflow, run.cases, answers, errors, failures)
        failed = [e for e in errors if e]
        if run.cases and len(failed) == len(run.cases):
            run.error = (
                f"{failed[0]} on every case of the baseline config (and {len(failed) - 1} more)"
            )
            return run
        if failed:
            run.notes.append(f"baseline: {failed[0]} ({len(failed)} of {len(run.cases)} cases)")
        if any(e is None for e in errors) and all(s.score is None for s in run.baseline):
            names = ", ".join(j.name for j in judges) or "(none)"
            run.error = (
                f"no judge scored any answer of the baseline (judges: {names}); set "
                "evaluation.judges to sources that read the answer, such as rule or llm_judge"
            )
            return run
        for label, candidate in candidates:
            answers, errors = answer_cases(
                runner, settings.runner, versions.config_in_use(candidate, where), run.cases
            )
            scores = judge(judges, workflow, run.cases, answers, errors, failures)
            run.verdicts.append(_verdict(label, scores, run.baseline, settings))
            first = next((e for e in errors if e), None)
            if first:
                run.notes.append(
                    f"{label}: {first} ({sum(1 for e in errors if e)} of {len(run.cases)} cases)"
                )
        run.notes.extend(f"judge: {f}" for f in dict.fromkeys(failures))
    finally:
        for j in judges:
            try:
                j.close()
            except Exception:
                pass
    return run


def record(
    store: Store, run: GateRun, version_ids: Sequence[int], base_version_id: int, actor: str
) -> None:
    """One ``regression_gate`` ChangeEvent per verdict, with its per-case evidence."""
    with store.session() as session:
        for verdict, version_id in zip(run.verdicts, version_ids, strict=True):
            session.add(
                ChangeEvent(
                    workflow=run.workflow,
                    kind=GATE_KIND,
                    from_version_id=base_version_id,
                    to_version_id=version_id,
                    actor=actor,
                    reason=verdict.reason,
                    evidence={
                        "runner": run.runner,
                        "margin": run.margin,
                        **verdict.evidence(run.cases, run.baseline),
                    },
                    created_at=utcnow(),
                )
            )


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_markdown(runs: Sequence[GateRun]) -> list[str]:
    """The cycle report's verify section."""
    if not runs:
        return []
    lines = ["## 5. Verify — regression gate", ""]
    for run in runs:
        info = run.as_dict()
        lines.append(
            f"### {run.workflow}: runner `{run.runner}`, {len(run.cases)} cases "
            f"({info['sources']['validation']} validation, {info['sources']['bad case']} bad), "
            f"baseline mean {_fmt(run.baseline_mean)}, margin {run.margin:g}"
        )
        lines.append("")
        if run.error:
            lines += [f"**No verdict**: {run.error}. No candidate got traffic.", ""]
        for v in run.verdicts:
            lines.append(f"- {v.label}: **{'admitted' if v.admitted else 'dropped'}** — {v.reason}")
        if run.verdicts and run.cases:
            lines += [
                "",
                "| case | source | baseline | " + " | ".join(v.label for v in run.verdicts) + " |",
            ]
            lines.append("|---|---|---|" + "---|" * len(run.verdicts))
            for i, case in enumerate(run.cases[:50]):
                cells = " | ".join(_fmt(v.scores[i].score) for v in run.verdicts)
                question = " ".join(case.question.split())[:60].replace("|", "/")
                lines.append(
                    f"| {question} | {case.source} | {_fmt(run.baseline[i].score)} | {cells} |"
                )
        for note in run.notes:
            lines.append(f"- note: {note}")
        lines.append("")
    return lines
