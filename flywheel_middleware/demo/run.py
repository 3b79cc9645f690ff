"""``flywheel demo``: a support agent, simulated customers and the flywheel turning, offline.

Each cycle sends a batch of customer requests through the LangChain agent (every request gets
its config from the resolver, so experiments split traffic live), the customers rate some
answers and leave UI signals, then the controller runs in ``auto`` mode: it finds the hot
problem, proposes candidates (parameter changes and an APO-style prompt rewrite), runs the
experiment, promotes a winner that the sequential test says is really better, and exports
datasets. Everything lives in one folder, on the embedded SQLite store.

The cycles run back to back in real time; afterwards each is placed on a simulated day of its
own (``demo.timeline``), so the dashboard shows the week the loop lived through: ratings,
rewards and volume by the hour, with each promotion a step on the day it happened.

The traffic (customers, questions, answers) repeats from ``--seed``; escalations go to a desk
chosen by ``fw.route``'s Thompson sampling, which is not seeded, so the ratings of escalated
answers — and the figures derived from them — vary a little between runs.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel_middleware import runtime
from flywheel_middleware.cli.common import command_name
from flywheel_middleware.demo.agent import KNOWLEDGE_BASE, build_chain, question_for
from flywheel_middleware.demo.timeline import Timeline, spread_over_days
from flywheel_middleware.demo.users import ESCALATION, react, send_telemetry
from flywheel_middleware.loop import versions
from flywheel_middleware.loop.controller import run_cycle
from flywheel_middleware.store.outcomes import is_positive

WORKFLOW = "support_qa"
# how often each human desk resolves an escalated question, by topic (the routing learns it)
DESK_SKILL = {
    "billing_desk": {"billing": 0.9, "returns": 0.55, "account": 0.8},
    "logistics_desk": {"shipping": 0.9, "returns": 0.85},
    "generalist": {"billing": 0.5, "shipping": 0.5, "account": 0.5, "returns": 0.5},
}

CONFIG_TEMPLATE = """\
# flywheel demo: a support agent whose first config is not very good.
store: {{url: "{store_url}"}}
workflows:
  support_qa:
    config:                        # version 1
      llm: {{model: scripted-support-1, temperature: 0.9, max_tokens: 256}}
      rag: {{top_k: 1}}
      prompts:
        system: "You are the support assistant of {{company}}. Be friendly and concise."
    tunable:                       # what the param mutator may change
      llm.temperature: {{min: 0.0, max: 0.9, step: 0.3}}
      rag.top_k: {{choices: [1, 2, 3, 4, 5]}}
    experiment: {{unit: user_id, candidate_traffic: {traffic}, max_candidates: 2, min_samples: {min_samples}}}
    objective: {{metric: positive_feedback_rate, guardrails: {{latency_ratio_max: 1.5, error_rate_max_increase: 0.02}}}}
rewards:
  - {{type: explicit_rating}}
mutators:
  - {{type: param, params: {{seed: {seed}}}}}
  - type: prompt_rewrite
    params: {{path: prompts.system, chat_model: "flywheel_middleware.demo.agent:ScriptedRewriter", temperature: 0.7}}
promoters:
  - {{type: sequential, params: {{alpha: 0.05, min_effect: 0.1}}}}
evaluation:                        # the regression gate: candidates answer past questions first
  runner: "flywheel_middleware.demo.agent:run"
  judges: [{{type: rule, params: {{callable: "flywheel_middleware.demo.agent:grade"}}}}]
  margin: 0.05
  max_cases: 40
analysis: {{since_minutes: 1440, min_calls: 50, low_rating_rate_max: 0.1}}
triggers: {{low_rating: {{window: 50, threshold: 10}}}}
controller: {{mode: auto, report_dir: "{report_dir}", dataset_dir: "{dataset_dir}"}}
routing:                           # escalations go to a human desk, chosen by fw.route
  agents:
    - {{id: billing_desk, skills: [billing, returns, account]}}
    - {{id: logistics_desk, skills: [shipping, returns]}}
    - {{id: generalist, skills: [billing, shipping, account, returns]}}
"""


@dataclass
class DemoSettings:
    folder: str = "flywheel-demo"
    cycles: int = 8
    requests_per_cycle: int = 400
    users: int = 400
    seed: int = 7
    rate_probability: float = 0.7
    candidate_traffic: float = 0.3
    min_samples: int = 60
    fresh: bool = True


@dataclass
class DemoResult:
    folder: Path
    store_url: str
    cycles: list[dict[str, Any]] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    experiments_started: int = 0
    datasets: dict[str, int] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    first_version: int | None = None
    final_version: int | None = None
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)
    elapsed: float = 0.0


def _prepare(folder: Path, settings: DemoSettings) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    if settings.fresh:  # only what a previous demo run created
        for name in ("flywheel.db", "flywheel.db-wal", "flywheel.db-shm"):
            (folder / name).unlink(missing_ok=True)
        for name in ("reports", "datasets"):
            shutil.rmtree(folder / name, ignore_errors=True)
    store_url = f"sqlite:///{(folder / 'flywheel.db').resolve()}"
    path = folder / "flywheel.yaml"
    path.write_text(
        CONFIG_TEMPLATE.format(
            store_url=store_url,
            report_dir=(folder / "reports").resolve(),
            dataset_dir=(folder / "datasets").resolve(),
            traffic=settings.candidate_traffic,
            min_samples=settings.min_samples,
            seed=settings.seed,
        ),
        encoding="utf-8",
    )
    return path, store_url


def _handler() -> Any:
    try:
        from flywheel_middleware.adapters.langchain import FlywheelCallbackHandler
    except ImportError:
        return None
    return FlywheelCallbackHandler(workflow=WORKFLOW)


def _serve(
    cycle: int, settings: DemoSettings, handler: Any, rng: random.Random, tally: dict
) -> None:
    """One request end to end: resolve, run the chain, the customer reacts."""
    import flywheel_middleware as fw

    user = f"user-{rng.randrange(settings.users)}"
    article = rng.choice(KNOWLEDGE_BASE)
    question = question_for(article, rng.randrange(5))
    session = f"{user}-s{cycle}"
    seed = f"{settings.seed}-{cycle}-{rng.random()}"
    # The customer's reaction draws from its own stream: the desk that fw.route picks is not
    # seeded, and it must not shift which customers and questions come next.
    local = random.Random(seed)
    with fw.rollout(WORKFLOW, user_id=user, session_id=session, input=question) as r:
        cfg = r.config
        chain = build_chain(cfg, seed=seed)
        callbacks = {"callbacks": [handler]} if handler is not None else {}
        answer = chain.invoke({"question": question, "company": "Acme Shop"}, config=callbacks)
        r.set_output(answer)
        resolved = None
        if ESCALATION in answer:  # the agent hands over: adaptive routing picks a desk
            with fw.route([article.topic]) as desk:
                resolved = local.random() < DESK_SKILL[desk.agent_id].get(article.topic, 0.3)
                tally["_desks"][desk.agent_id] += 1
    reaction = react(local, article, answer, settings.rate_probability, resolved)
    if resolved is not None:
        fw.feedback(r.id, key="resolved", value=float(resolved), source="business")
    if reaction.rating is not None:
        fw.feedback(r.id, rating=reaction.rating, comment=reaction.comment, user_id=user)
    send_telemetry(fw.get_recorder(), r.id, session, reaction.events)
    stats = tally[r.config_version_id]
    stats["requests"] += 1
    stats["correct"] += reaction.correct
    if reaction.rating is not None:
        stats["rated"] += 1
        stats["positive"] += is_positive("rating", reaction.rating)


def run_demo(settings: DemoSettings | None = None, console: Console | None = None) -> DemoResult:
    """Run the whole demo; returns what happened (the CLI prints it, the test checks it)."""
    import flywheel_middleware as fw

    settings = settings or DemoSettings()
    console = console or Console(quiet=True)
    started = time.monotonic()
    folder = Path(settings.folder)
    config_path, store_url = _prepare(folder, settings)
    config = fw.configure(config_path, store_url=store_url)
    store = fw.get_store()
    resolver = versions.StoreResolver(store, config, ttl=3600)  # invalidated after each cycle
    runtime.set_resolver(resolver)
    result = DemoResult(folder=folder, store_url=store_url)
    result.first_version = versions.ensure_workflow(store, config, WORKFLOW).version
    handler = _handler()
    rng = random.Random(settings.seed)
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            for cycle in range(1, settings.cycles + 1):
                task = progress.add_task(
                    f"cycle {cycle}: customers", total=settings.requests_per_cycle
                )
                tally: dict[Any, dict[str, int]] = defaultdict(lambda: defaultdict(int))
                began = time.time()
                for _ in range(settings.requests_per_cycle):
                    _serve(cycle, settings, handler, rng, tally)
                    progress.advance(task)
                fw.flush()
                served = time.time()
                progress.update(task, description=f"cycle {cycle}: controller")
                report = run_cycle(store, config, "auto", workflows=[WORKFLOW])
                resolver.invalidate()
                result.timeline.marks.append((began, served, time.time()))
                progress.update(task, description=f"cycle {cycle}: done")
                result.reports.append(report.report_path or "")
                result.experiments_started += len(report.started)
                row = _cycle_row(store, cycle, tally, report)
                result.cycles.append(row)
                progress.console.print(_cycle_line(row))
                for d in report.promoted:
                    result.promotions.append({"cycle": cycle, **d})
                for path, info in (report.curation.get("datasets") or {}).items():
                    result.datasets[path] = int((info or {}).get("rows") or 0)
    finally:
        fw.flush()
    spread_over_days(store, result.timeline)
    first = versions.find_version(store, WORKFLOW, result.first_version)
    final = versions.active_version(store, WORKFLOW)
    result.final_version = final.version
    result.changes = versions.diff_configs(first.config, final.config)
    result.elapsed = time.monotonic() - started
    return result


def _cycle_row(store: Any, cycle: int, tally: dict, report: Any) -> dict[str, Any]:
    served = {}
    desks = dict(tally.pop("_desks", {}))
    for version_id, s in tally.items():
        number = versions.get_version(store, version_id).version if version_id else None
        served[number] = dict(s)
    requests = sum(s["requests"] for s in served.values())
    correct = sum(s["correct"] for s in served.values())
    rated = sum(s["rated"] for s in served.values())
    positive = sum(s["positive"] for s in served.values())
    actions = []
    for d in report.decisions:
        actions.append(
            f"exp {d['experiment_id']}: {d['action']}"
            + (f" {d['variant']}" if d.get("variant") else "")
            + (f" ({d['applied']})" if d.get("applied") else "")
        )
    for g in report.gates:  # the regression gate ran before the experiment
        admitted = sum(v.admitted for v in g.verdicts)
        actions.append(
            f"gate: {g.error}"
            if g.error
            else f"gate admitted {admitted} of {len(g.verdicts)} on {len(g.cases)} cases"
        )
    for s in report.started:
        actions.append(f"started exp {s['experiment_id']} ({', '.join(s['candidates'])})")
    active = versions.active_version(store, WORKFLOW)
    return {
        "cycle": cycle,
        "requests": requests,
        "served": {
            f"v{k}": v["requests"] for k, v in sorted(served.items(), key=lambda kv: kv[0] or 0)
        },
        "correct_rate": correct / requests if requests else 0.0,
        "positive_rate": positive / rated if rated else 0.0,
        "problems": len(report.problems),
        "actions": actions,
        "active_after": active.version if active else None,
        "report": report.report_path,
        "desks": desks,
        "routing": (report.curation.get("routing") or {}).get("weights"),
    }


def _cycle_line(row: dict[str, Any]) -> str:
    served = ", ".join(f"{k}×{v}" for k, v in row["served"].items())
    actions = "; ".join(row["actions"]) or "no change"
    return (
        f"  served {served} · correct {row['correct_rate']:.0%} · positive {row['positive_rate']:.0%}"
        f" · {row['problems']} problem(s) → {actions} · active v{row['active_after']}"
    )


def render_summary(result: DemoResult, console: Console) -> None:
    """The short final report."""
    table = Table(title="flywheel demo — what happened")
    columns = (
        "cycle",
        "day",
        "served",
        "correct",
        "positive feedback",
        "controller",
        "active after",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("served", "controller") else "right")
    days = result.timeline.days()
    for row in result.cycles:
        day = days[row["cycle"] - 1] if row["cycle"] <= len(days) else None
        table.add_row(
            str(row["cycle"]),
            f"{day:%a %d %b}" if day else "–",
            ", ".join(f"{k}×{v}" for k, v in row["served"].items()),
            f"{row['correct_rate']:.0%}",
            f"{row['positive_rate']:.0%}",
            "; ".join(row["actions"]) or "–",
            f"v{row['active_after']}",
        )
    console.print(table)
    if result.promotions:
        for p in result.promotions:
            console.print(
                f"[green]promoted[/] {p['variant']} of experiment {p['experiment_id']} in cycle "
                f"{p['cycle']}: {p['reason']}"
            )
    else:
        console.print("[yellow]no promotion this run[/] (try more --cycles)")
    weights = next((row["routing"] for row in reversed(result.cycles) if row.get("routing")), None)
    if weights:
        learned = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(weights.items()) if not k.endswith("/*")
        )
        console.print(f"routing weights learned for escalations (fw.route): {learned}")
    console.print(f"config v{result.first_version} → v{result.final_version}:")
    for path, old, new in result.changes:
        console.print(f"  {path}: {old!r} → {new!r}")
    if result.datasets:
        console.print("datasets:")
        for path, rows in result.datasets.items():
            console.print(f"  {os.path.relpath(path)}: {rows} rows")
    console.print(
        f"cycle reports in {os.path.relpath(result.folder / 'reports')}/ · store {result.store_url}"
        f" · {result.elapsed:.1f}s"
    )
    cfg = os.path.relpath(result.folder / "flywheel.yaml")
    flywheel = command_name()
    console.print("explore:")
    for what in ("experiment list", "config show support_qa", "stats"):
        console.print(f"  {flywheel} --config {cfg} {what}", markup=False)
    console.print(
        f"the week on the dashboard (each cycle one simulated day): {flywheel} --config {cfg} serve,"
        " then open http://127.0.0.1:8700/"
    )
