"""The control loop: observe → curate → decide → generate, once per ``run_cycle``.

Modes follow seed 001's progressive rollout: ``suggest`` only writes the report (no versions,
no experiments, no promotions); ``experiment`` starts experiments and stops clear losers but
leaves every promotion to a person (``flywheel promote``); ``auto`` also promotes, and only
when every configured promoter says promote (their guardrails included). Every cycle writes
a Markdown report a person can read and approve, and a ``cycle`` ChangeEvent for the audit log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from sqlmodel import select

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.config import FlywheelConfig, PluginSpec
from flywheel_middleware.learn import routing
from flywheel_middleware.loop import (
    analysis,
    curation,
    regression_gate,
    rewards,
    versions,
)
from flywheel_middleware.loop import experiments as ex
from flywheel_middleware.loop.error_control import budget_text
from flywheel_middleware.loop.triggers import check_low_rating_triggers, low_rating_window
from flywheel_middleware.plugin_system.base import (
    Candidate,
    Decision,
    Mutator,
    PluginContext,
    Promoter,
    Sample,
)
from flywheel_middleware.plugin_system.manager import plugin_manager
from flywheel_middleware.store import queries
from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import ChangeEvent, Feedback

log = logging.getLogger("flywheel_middleware.loop.controller")

Mode = Literal["suggest", "experiment", "auto"]
MODES = ("suggest", "experiment", "auto")
CYCLE_KIND = "cycle"
_ABSENT = object()


@dataclass
class CycleReport:
    """What one cycle saw, decided and did (rendered as Markdown for a person to approve)."""

    mode: str
    started_at: datetime
    finished_at: datetime | None = None
    workflows: list[str] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    curation: dict[str, Any] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    proposals: list[dict[str, Any]] = field(default_factory=list)
    started: list[dict[str, Any]] = field(default_factory=list)
    gates: list[regression_gate.GateRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_path: str | None = None

    @property
    def promoted(self) -> list[dict[str, Any]]:
        return [d for d in self.decisions if d.get("applied") == "promoted"]

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "problems": len(self.problems),
            "decisions": [
                {k: d.get(k) for k in ("experiment_id", "workflow", "action", "variant", "applied")}
                for d in self.decisions
            ],
            "started": [
                {k: s.get(k) for k in ("experiment_id", "workflow", "candidates")}
                for s in self.started
            ],
            "datasets": self.curation.get("datasets"),
            "gates": [
                {
                    "workflow": g.workflow,
                    "error": g.error,
                    "verdicts": {v.label: v.reason for v in g.verdicts},
                }
                for g in self.gates
            ],
            "report": self.report_path,
        }

    def to_markdown(self) -> str:
        return render_markdown(self)


# -- plugins --------------------------------------------------------------------------------

DEFAULT_MUTATORS = ("param",)
"""The mutators the cycle uses when YAML ``mutators:`` lists none."""
DEFAULT_PROMOTERS = ("sequential",)
"""The promoters the cycle uses when YAML ``promoters:`` lists none."""


def _build(
    kind: str,
    specs: list[PluginSpec],
    default: tuple[str, ...],
    config: FlywheelConfig,
    store: Store,
) -> list[Any]:
    manager = plugin_manager(config)
    context = PluginContext(config=config, store=store)
    if not specs:
        return [
            manager.build(kind, PluginSpec(type=name), where=f"default {kind}", context=context)
            for name in default
        ]
    return manager.build_all(kind, config, context)


def build_mutators(config: FlywheelConfig, store: Store) -> list[Mutator]:
    """The enabled mutators of YAML ``mutators:`` (``DEFAULT_MUTATORS`` when it lists none)."""
    return _build("mutator", config.mutators, DEFAULT_MUTATORS, config, store)


def build_promoters(config: FlywheelConfig, store: Store) -> list[Promoter]:
    """The enabled promoters of YAML ``promoters:`` (``DEFAULT_PROMOTERS`` when it lists none).

    The promoters a cycle asks; ``flywheel experiment show`` and ``flywheel promote`` ask
    the same ones.
    """
    return _build("promoter", config.promoters, DEFAULT_PROMOTERS, config, store)


# -- the steps ------------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    """SQLite returns naive UTC datetimes; compare them as aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def last_cycle_at(store: Store) -> datetime | None:
    """When the previous cycle ended (its ChangeEvent), or None before the first."""
    with store.session() as session:
        last = session.exec(
            select(ChangeEvent.created_at)
            .where(ChangeEvent.kind == CYCLE_KIND)
            .order_by(ChangeEvent.created_at.desc())
            .limit(1)
        ).first()
    return _aware(last) if last is not None else None


def _since(config: FlywheelConfig, now: datetime) -> datetime:
    return now - timedelta(minutes=config.analysis.since_minutes)


def observe(
    store: Store, config: FlywheelConfig, workflows: list[str], now: datetime, report: CycleReport
) -> dict[str, list[dict[str, Any]]]:
    """Hot problems and low-rating triggers per workflow."""
    since = _since(config, now)
    found: dict[str, list[dict[str, Any]]] = {w: [] for w in workflows}
    for workflow in workflows:
        # judge the config being served now: nothing from before the last deployment change
        history = versions.deployment_history(store, workflow)
        wf_since = max(since, _aware(history[-1].created_at)) if history else since
        try:
            hot = analysis.hot_problems(store, config, workflow=workflow, since=wf_since)
        except Exception as exc:  # a failing analysis must not stop the cycle
            report.notes.append(f"analysis.hot_problems failed for {workflow}: {exc}")
            continue
        for p in hot:
            found[workflow].append(
                {**p.as_dict(), "reason": "; ".join(p.breaches), "source": "hot_problems"}
            )
    check_low_rating_triggers(store, config)
    rule = config.triggers.low_rating
    last_cycle = last_cycle_at(store)
    trigger_since = max(since, last_cycle) if last_cycle is not None else since
    with store.session() as session:
        events = session.exec(
            select(ChangeEvent)
            .where(
                ChangeEvent.kind == queries.TRIGGER_KIND, ChangeEvent.created_at >= trigger_since
            )
            .order_by(ChangeEvent.created_at)
        ).all()
    fired: dict[str, int] = {}
    for ev in events:
        fired[ev.workflow] = fired.get(ev.workflow, 0) + 1
    for workflow in workflows:
        # the trigger's condition as it stands now (seed 000), not only its past firings
        state = low_rating_window(store, workflow, rule.window, rule.max_rating)
        if state["low"] < rule.threshold:
            continue
        count = fired.get(workflow, 0)
        more = f"; fired {count}× since the last cycle" if count else ""
        found[workflow].append(
            {
                "workflow": workflow,
                "node": None,
                "reason": (
                    f"{state['low']} of the last {state['window']} rollouts rated "
                    f"≤ {rule.max_rating:g} (threshold {rule.threshold}){more}"
                ),
                "source": "low-rating trigger",
            }
        )
    for items in found.values():
        report.problems.extend(items)
    return found


def curate(
    store: Store, config: FlywheelConfig, workflows: list[str], now: datetime, report: CycleReport
) -> None:
    """Rewards for rollouts new since the last cycle, then the datasets (all kinds).

    Rewards are computed once per rollout, when a cycle first sees it (within the analysis
    window); curation scores older ones whose feedback came later (``refresh_rewards``). The
    datasets are brought up to date by reading only the days that changed
    (``loop.curation``). Rollouts whose messages cannot be read are named in the notes.
    """
    last = last_cycle_at(store)
    since = max(_since(config, now), last) if last is not None else _since(config, now)
    scored = 0
    for workflow in workflows:
        try:
            run = rewards.compute_rewards(store, config, workflow=workflow, since=since)
        except Exception as exc:
            report.notes.append(f"rewards.compute_rewards failed for {workflow}: {exc}")
            continue
        scored += sum(1 for r in run.values() if r.value is not None)
        for failure in run.failures[:5]:
            report.notes.append(f"reward source failed: {failure}")
    report.curation["rewards"] = f"{scored} rollouts scored"
    if config.routing.agents:  # adaptive routing learns from the same rewards
        try:
            report.curation["routing"] = routing.update_routing(store, config)
        except Exception as exc:
            report.notes.append(f"routing.update_routing failed: {exc}")
    out_dir = Path(config.controller.dataset_dir or Path(config.controller.report_dir) / "datasets")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    days = [0, 0]
    for workflow in workflows:
        try:
            done = curation.curate_datasets(store, config, workflow, out_dir)
        except Exception as exc:
            report.notes.append(f"curating the datasets of {workflow} failed: {exc}")
            continue
        written.update(done.files)
        report.notes.extend(done.notes)
        days[0] += done.days_read
        days[1] += done.days_total
    report.curation["days"] = f"{days[0]} of {days[1]} days read again"
    report.curation["datasets"] = written


def _combine(decisions: list[tuple[str, Decision]]) -> Decision:
    """Promote only if every promoter promotes the same variant; reject if any rejects."""
    rejects = [(n, d) for n, d in decisions if d.action == "reject"]
    if rejects:
        name, d = rejects[0]
        return Decision("reject", d.variant, f"{name}: {d.reason}", d.evidence)
    promotes = {d.variant for _, d in decisions if d.action == "promote"}
    if decisions and len(promotes) == 1 and all(d.action == "promote" for _, d in decisions):
        variant = promotes.pop()
        reason = "; ".join(f"{n}: {d.reason}" for n, d in decisions)
        return Decision("promote", variant, reason, {n: d.evidence for n, d in decisions})
    reason = "; ".join(f"{n}: {d.action} ({d.reason})" for n, d in decisions)
    return Decision("continue", None, reason, {n: d.evidence for n, d in decisions})


def decide(
    store: Store, config: FlywheelConfig, mode: str, workflows: list[str], report: CycleReport
) -> set[str]:
    """Judge each running experiment; returns workflows whose deployment changed."""
    changed: set[str] = set()
    promoters = build_promoters(config, store)
    for exp in ex.list_experiments(store, status="running"):
        if exp.workflow not in workflows:
            continue
        stats = ex.experiment_stats(store, exp, config)
        verdicts = []
        for promoter in promoters:
            try:
                verdicts.append((promoter.name, promoter.decide(stats)))
            except Exception as exc:
                report.notes.append(
                    f"promoter {promoter.name} failed on experiment {exp.id}: {exc}"
                )
        if not verdicts:
            continue
        final = _combine(verdicts)
        entry: dict[str, Any] = {
            "experiment_id": exp.id,
            "workflow": exp.workflow,
            "action": final.action,
            "variant": final.variant,
            "reason": final.reason,
            "by_promoter": {n: {"action": d.action, "variant": d.variant} for n, d in verdicts},
            "stats": stats.as_dict(),
            "applied": None,
        }
        evidence = {"stats": stats.as_dict(), "promoters": final.evidence}
        if final.action == "promote":
            if mode == "auto":
                ex.promote(
                    store,
                    exp.id,
                    final.variant,
                    actor="controller:auto",
                    reason=final.reason,
                    evidence=evidence,
                    tested=True,
                )
                entry["applied"] = "promoted"
                changed.add(exp.workflow)
            else:
                entry["applied"] = "awaiting approval"
                entry["approve"] = f"flywheel promote {exp.id} {final.variant}"
        elif final.action == "reject":
            if mode in ("auto", "experiment"):
                ex.stop_experiment(
                    store,
                    exp.id,
                    status="rejected",
                    actor=f"controller:{mode}",
                    reason=final.reason,
                    decision={"action": "reject", "reason": final.reason, **evidence},
                )
                entry["applied"] = "rejected"
                changed.add(exp.workflow)
            else:
                entry["applied"] = "suggested"
        else:
            losers = _losers(verdicts)
            if losers and mode in ("auto", "experiment"):
                ex.set_weights(
                    store, exp.id, dict.fromkeys(losers, 0.0), actor=f"controller:{mode}"
                )
                entry["applied"] = f"dropped {', '.join(sorted(losers))}"
        report.decisions.append(entry)
    return changed


def _losers(verdicts: list[tuple[str, Decision]]) -> set[str]:
    """Candidates some promoter rejected individually while the experiment goes on."""
    out: set[str] = set()
    for _, d in verdicts:
        for name, info in (d.evidence.get("candidates") or {}).items():
            if isinstance(info, dict) and info.get("action") == "reject":
                out.add(name)
    return out


def bad_case_samples(
    store: Store, config: FlywheelConfig, workflow: str, since: datetime, limit: int = 50
) -> list[Sample]:
    """Rated ≤ the trigger's max rating or failed, with their feedback, worst first."""
    max_rating = config.triggers.low_rating.max_rating
    cases = queries.bad_cases(
        store, workflow=workflow, max_rating=max_rating, limit=limit, since=since
    )
    ids = [c.rollout.id for c in cases]
    feedback: dict[str, list[Feedback]] = {}
    if ids:
        with store.session() as session:
            for fb in session.exec(select(Feedback).where(Feedback.rollout_id.in_(ids))):
                feedback.setdefault(fb.rollout_id, []).append(fb)
    return [Sample(rollout=c.rollout, feedback=feedback.get(c.rollout.id, [])) for c in cases]


def generate(
    store: Store,
    config: FlywheelConfig,
    mode: str,
    problems: dict[str, list[dict[str, Any]]],
    skip: set[str],
    now: datetime,
    report: CycleReport,
) -> None:
    """Where a hot problem has no running experiment, propose candidates and start one."""
    mutators = None
    for workflow, items in problems.items():
        if not items or workflow in skip:
            continue
        if ex.running_experiment(store, workflow) is not None:
            continue
        wf = config.workflows.get(workflow)
        if wf is None:
            continue
        if mutators is None:
            mutators = build_mutators(config, store)
        active = versions.active_version(store, workflow)
        if active is None:
            continue
        tried = versions.tried_hashes(store, workflow)
        missing = [p for p in wf.tunable if versions.get_path(active.config, p, _ABSENT) is _ABSENT]
        if missing:
            report.notes.append(
                f"{workflow}: tunable {', '.join(map(repr, missing))} "
                f"{'is' if len(missing) == 1 else 'are'} not in the active config "
                f"(v{active.version}); a candidate that sets {'it' if len(missing) == 1 else 'them'}"
                f" adds a new key — check the spelling under workflows.{workflow}.tunable"
            )
        samples = bad_case_samples(store, config, workflow, _since(config, now))
        wanted = wf.experiment.max_candidates
        candidates: list[tuple[str, Candidate]] = []
        share = max(1, wanted // max(1, len(mutators)))
        for round_size in (share, wanted):  # a fair share each first, then fill up
            for mutator in mutators:
                room = min(round_size, wanted - len(candidates))
                if room <= 0:
                    break
                try:
                    proposed = mutator.propose(
                        active.config,
                        workflow=workflow,
                        tunable=wf.tunable,
                        bad_cases=samples,
                        tried=tried,
                        n=room,
                    )
                except Exception as exc:
                    report.notes.append(f"mutator {mutator.name} failed for {workflow}: {exc}")
                    continue
                for cand in proposed[:room]:
                    hashes = versions.config_hashes(cand.config)
                    if hashes & tried:  # a third-party mutator may not check
                        continue
                    tried.update(hashes)
                    candidates.append((mutator.name, cand))
            if len(candidates) >= wanted:
                break
        proposal = {
            "workflow": workflow,
            "base_version": active.version,
            "bad_cases": len(samples),
            "candidates": [
                {
                    "mutator": name,
                    "note": c.note,
                    "diff": versions.diff_configs(active.config, c.config),
                }
                for name, c in candidates
            ],
        }
        report.proposals.append(proposal)
        if not candidates:
            report.notes.append(f"{workflow}: no untried candidate left in the tunable space")
            continue
        if mode == "suggest":
            continue
        traffic = wf.experiment.candidate_traffic
        fit = math.ceil(1 / traffic) - 1  # candidates whose traffic leaves some for the baseline
        if len(candidates) > fit:
            report.notes.append(
                f"{workflow}: {len(candidates)} candidates × {traffic:.0%} traffic leave nothing "
                f"for the baseline; the experiment runs the first {fit}"
            )
            del candidates[fit:]
        gate = None
        if config.evaluation_for(workflow) is not None:  # verify before any traffic
            gate = regression_gate.run_gate(
                store,
                config,
                workflow,
                active.config,
                [(f"candidate-{i + 1}", c.config) for i, (_, c) in enumerate(candidates)],
                now=now,
            )
            report.gates.append(gate)
            if gate.error:
                report.notes.append(f"{workflow}: {gate.error}; no candidate gets traffic")
                continue
        ids = []
        names = None  # the experiment's default variant names
        for name, cand in candidates:
            row = versions.create_version(
                store,
                workflow,
                cand.config,
                parent_id=active.id,
                created_by=f"mutator:{name}",
                note=cand.note,
            )
            ids.append(row.id)
        if gate is not None:
            regression_gate.record(store, gate, ids, active.id, f"controller:{mode}")
            names = [v.label for v in gate.verdicts if v.admitted]
            ids = [i for i, v in zip(ids, gate.verdicts, strict=True) if v.admitted]
            if not ids:
                report.notes.append(f"{workflow}: the regression gate dropped every candidate")
                continue
        reason = "hot problem: " + "; ".join(str(p["reason"]) for p in items[:3])
        try:
            exp = ex.start_experiment(
                store,
                workflow,
                ids,
                traffic=wf.experiment.candidate_traffic,
                unit=wf.experiment.unit,
                actor=f"controller:{mode}",
                reason=reason,
                names=names,
                error_budget=wf.experiment.error_budget,
            )
        except ex.ExperimentError as exc:  # e.g. traffic × candidates ≥ 1, or one started meanwhile
            report.notes.append(f"{workflow}: could not start an experiment: {exc}")
            continue
        report.started.append(
            {
                "experiment_id": exp.id,
                "workflow": workflow,
                "candidates": [v["name"] for v in exp.variants[1:]],
                "traffic": wf.experiment.candidate_traffic,
                "reason": reason,
            }
        )


# -- the cycle ------------------------------------------------------------------------------


def run_cycle(
    store: Store,
    config: FlywheelConfig,
    mode: str | None = None,
    *,
    workflows: list[str] | None = None,
    report_dir: str | Path | None = None,
    curate_data: bool = True,
    now: datetime | None = None,
) -> CycleReport:
    """One observe → curate → decide → generate pass; writes and returns the report."""
    mode = mode or config.controller.mode
    if mode not in MODES:
        raise ValueError(f"controller mode must be one of {', '.join(MODES)}, got {mode!r}")
    now = now or utcnow()
    report = CycleReport(mode=mode, started_at=now)
    names = workflows or sorted(set(config.workflows) | set(versions.workflows_in_store(store)))
    for name in names:
        if name in config.workflows:
            versions.ensure_workflow(store, config, name)
    report.workflows = names
    problems = observe(store, config, names, now, report)
    if curate_data:
        curate(store, config, names, now, report)
    changed = decide(store, config, mode, names, report)
    generate(store, config, mode, problems, changed, now, report)
    report.finished_at = utcnow()
    folder = Path(report_dir or config.controller.report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cycle-{now:%Y%m%d-%H%M%S-%f}.md"
    path.write_text(report.to_markdown(), encoding="utf-8")
    report.report_path = str(path)
    with store.session() as session:
        session.add(
            ChangeEvent(
                workflow="*",
                kind=CYCLE_KIND,
                actor=f"controller:{mode}",
                reason=f"cycle report {path.name}",
                evidence=report.summary(),
                created_at=utcnow(),
            )
        )
    return report


# -- the report -----------------------------------------------------------------------------


def _pct(e: dict[str, Any]) -> str:
    if e.get("value") is None:
        return "–"
    text = f"{e['value']:.1%}"
    if e.get("low") is not None and e.get("high") is not None:
        text += f" [{e['low']:.1%}, {e['high']:.1%}]"
    return text


def _num(e: dict[str, Any], spec: str = ".0f") -> str:
    if e.get("value") is None:
        return "–"
    text = format(e["value"], spec)
    if e.get("low") is not None and e.get("high") is not None:
        text += f" [{format(e['low'], spec)}, {format(e['high'], spec)}]"
    return text


def render_markdown(r: CycleReport) -> str:
    lines = [
        f"# Flywheel cycle — {r.started_at:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"- mode: **{r.mode}**"
        + {
            "suggest": " (report only: no config, experiment or deployment was changed)",
            "experiment": " (experiments run; promotions wait for your approval)",
            "auto": " (promotions applied within guardrails)",
        }[r.mode],
        f"- workflows: {', '.join(r.workflows) or '(none)'}",
        "",
        "## 1. Observe — hot problems",
        "",
    ]
    if r.problems:
        lines += ["| workflow | node | source | problem |", "|---|---|---|---|"]
        for p in r.problems:
            reason = (
                p.get("reason")
                or p.get("kind")
                or ", ".join(
                    f"{k}={v}" for k, v in p.items() if k not in ("workflow", "node", "source")
                )
            )
            lines.append(
                f"| {p.get('workflow')} | {p.get('node') or '–'} | {p.get('source')} | {reason} |"
            )
    else:
        lines.append("No hot problems.")
    lines += ["", "## 2. Curate — rewards and datasets", ""]
    if r.curation.get("rewards") is not None:
        lines.append(f"- rewards: {r.curation['rewards']}")
    routing_update = r.curation.get("routing")
    if routing_update is not None:
        lines += [
            f"- routing weights updated from {routing_update.get('routed_rollouts', 0)} routed "
            f"rollouts ({routing_update.get('rewarded', 0)} with a reward):",
            "",
            "| agent/skill | weight |",
            "|---|---|",
            *(f"| {k} | {v:.3f} |" for k, v in (routing_update.get("weights") or {}).items()),
            "",
        ]
    if r.curation.get("days") is not None:
        lines.append(f"- datasets: {r.curation['days']}")
    if r.curation.get("datasets"):
        lines += ["", "| dataset | rows | notes |", "|---|---|---|"]
        for path, info in r.curation["datasets"].items():
            info = info if isinstance(info, dict) else {"notes": info}
            notes = ", ".join(f"{k}: {v}" for k, v in info.items() if k != "rows")
            lines.append(f"| `{path}` | {info.get('rows', '–')} | {notes or '–'} |")
    if not r.curation:
        lines.append("Nothing curated.")
    lines += ["", "## 3. Decide — running experiments", ""]
    if not r.decisions:
        lines += ["No running experiments.", ""]
    for d in r.decisions:
        lines += [
            f"### Experiment {d['experiment_id']} ({d['workflow']}): **{d['action']}**"
            + (f" `{d['variant']}`" if d.get("variant") else "")
            + (f" — {d['applied']}" if d.get("applied") else ""),
            "",
            f"{d['reason']}",
            "",
        ]
        if d["stats"].get("error_budget"):
            lines += [budget_text(d["stats"]["error_budget"]), ""]
        lines += [
            "| variant | weight | rollouts | positive feedback | mean reward | error rate | latency ms (mean) | latency p95 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in d["stats"]["variants"].values():
            lines.append(
                f"| {v['name']} | {v['weight']:.2f} | {v['rollouts']} | "
                f"{_pct(v['positive_feedback_rate'])} | {_num(v['mean_reward'], '.3f')} | "
                f"{_pct(v['error_rate'])} | {_num(v['latency_mean_ms'])} | {_num(v['latency_p95_ms'])} |"
            )
        if d.get("approve"):
            lines += ["", f"To approve: `{d['approve']}`"]
        lines.append("")
    lines += ["## 4. Generate — candidates", ""]
    if not r.proposals:
        lines.append("No workflow needed new candidates.")
    for p in r.proposals:
        lines.append(f"### {p['workflow']} (from v{p['base_version']}, {p['bad_cases']} bad cases)")
        lines.append("")
        for c in p["candidates"]:
            changes = ", ".join(f"`{path}`: {old!r} → {new!r}" for path, old, new in c["diff"])
            if len(changes) > 400:
                changes = changes[:399] + "…"
            lines.append(f"- {c['mutator']}: {changes or c['note']}")
        lines.append("")
    for s in r.started:
        lines.append(
            f"Started experiment {s['experiment_id']} on {s['workflow']}: "
            f"{', '.join(s['candidates'])} at {s['traffic']:.0%} traffic each ({s['reason']})."
        )
    if r.gates:
        lines += ["", *regression_gate.render_markdown(r.gates)]
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    lines.append("")
    return "\n".join(lines)
