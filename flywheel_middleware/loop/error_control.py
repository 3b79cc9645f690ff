"""Loop-level error control: a workflow's false-promotion budget, spent over its experiments.

Each experiment's candidates are tested one-sidedly ("better than the baseline?"), so a
workflow that runs experiments for months makes many tests. The budget keeps
P(any false promotion over the workflow's whole life) ≤ ``level`` (``experiment.error_budget``
in YAML) with the online fallback procedure (Tian & Ramdas, "Online control of the familywise
error rate", Statistical Methods in Medical Research 30(4), 2021, arXiv:1910.04900), the online
form of the fallback test of Wiens & Dmitrienko (2005), drawn as a graph of weighted Bonferroni
tests (Bretz, Maurer, Brannath & Posch, Statistics in Medicine 2009):

* experiment j (the j-th of its workflow, in start order) receives the share
  sⱼ = γⱼ + cⱼ of the level, where γⱼ = 1 / (j (j + 1)) (Σ γⱼ = 1, so after j experiments
  1 / (j + 1) of the budget is still uncommitted) and cⱼ is the share of the candidate the
  previous experiment promoted (0 if it promoted none); a boundary grows only like √(ln 1/α),
  so the tenth experiment's horizon is about twice the first's rather than fifty times;
* sⱼ is split equally over the candidates experiment j *started* with, so each candidate is
  tested at αᵢ = level · sⱼ / kⱼ whatever later happens to the others (dropping a loser does
  not raise the survivor's level);
* a promoted candidate passes its share on to the next experiment; a candidate that is not
  promoted keeps its share forever (it is spent).

Why this bounds the probability of any false promotion: think of the budget as mass. The
experiments inject level · γⱼ, at most ``level`` in all. A candidate that is not better than
its baseline and not promoted absorbs its mass; one that is promoted while not better is the
first false promotion (the event being bounded), so on the event "no false promotion so far"
mass only ever flows onward through truly better candidates. Each not-better candidate's level
αᵢ is therefore a disjoint piece of the injected mass, and since the sequential test promotes
a not-better candidate with probability ≤ αᵢ given the past, P(any false promotion) ≤
Σ E[αᵢ] ≤ level — under any dependence between experiments (users who return, baselines that
change after a promotion), as for Bonferroni.

The shares are fixed when an experiment starts and kept in its ``metrics`` (JSON), computed
from the stored shares and statuses of the workflow's earlier experiments (only one runs at a
time), so every process derives the same budget from the store. An experiment stopped by a
person, or by a rollback, keeps its share spent. A person's manual promotion passes the share
on like the controller's (it is a promotion), but the guarantee covers the test's decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import select

from flywheel_middleware.store.database import Store
from flywheel_middleware.store.models import Experiment

METRICS_KEY = "error_control"
"""Where an experiment's allocation lives in its ``metrics`` JSON."""


def spending(index: int) -> float:
    """γⱼ = 1 / (j (j + 1)): the share of the level the j-th experiment receives on its own."""
    return 1.0 / (index * (index + 1))


def uncommitted(index: int) -> float:
    """1 − Σ_{i ≤ j} γᵢ = 1 / (j + 1): the share no experiment up to the j-th has received."""
    return 1.0 / (index + 1)


@dataclass(frozen=True)
class Allocation:
    """An experiment's share of its workflow's budget, fixed when it started."""

    index: int
    """Its place among its workflow's experiments (1 = the first)."""
    share: float
    """Of the workflow's level: γ(index) + carried."""
    carried: float
    """Passed on by the candidate the previous experiment promoted."""
    candidates: tuple[str, ...]
    """The candidates it started with; the share is split over these."""

    @property
    def candidate_share(self) -> float:
        return self.share / max(1, len(self.candidates))

    @property
    def left(self) -> float:
        """The share of the budget still uncommitted once this experiment started."""
        return uncommitted(self.index)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "share": self.share,
            "carried": self.carried,
            "candidates": list(self.candidates),
        }

    @classmethod
    def from_json(cls, data: Any) -> Allocation | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                index=int(data["index"]),
                share=float(data["share"]),
                carried=float(data.get("carried", 0.0)),
                candidates=tuple(str(c) for c in data["candidates"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def allocate(
    previous: Allocation | None, previous_status: str | None, candidates: list[str]
) -> Allocation:
    """The allocation of the experiment that follows ``previous`` (None: the first).

    ``previous_status`` is "promoted" only for a promotion the test decided (see
    :func:`outcome`): only a rejected null hypothesis passes its share on."""
    index = previous.index + 1 if previous is not None else 1
    carried = (
        previous.candidate_share if previous is not None and previous_status == "promoted" else 0.0
    )
    return Allocation(index, spending(index) + carried, carried, tuple(candidates))


def outcome(exp: Experiment | None) -> str | None:
    """An experiment's status for the budget: a promotion no test decided (a person's
    ``flywheel promote`` while the promoter said "continue") spends its share like a stop."""
    if exp is None:
        return None
    if exp.status == "promoted" and not (exp.decision or {}).get("tested"):
        return "promoted by hand"
    return exp.status


def _candidates(exp: Experiment) -> list[str]:
    return [str(v["name"]) for v in exp.variants or [] if v.get("name") != "baseline"]


def replay(experiments: list[Experiment]) -> dict[int, Allocation]:
    """Each experiment's allocation, in start order: the stored one, else the one it would
    have received (experiments from before the budget existed spent their share too)."""
    out: dict[int, Allocation] = {}
    previous: Allocation | None = None
    status: str | None = None
    for exp in sorted(experiments, key=lambda e: e.id or 0):
        stored = Allocation.from_json((exp.metrics or {}).get(METRICS_KEY))
        current = stored or allocate(previous, status, _candidates(exp))
        out[int(exp.id)] = current
        previous, status = current, outcome(exp)
    return out


def workflow_experiments(session: Any, workflow: str) -> list[Experiment]:
    return list(session.exec(select(Experiment).where(Experiment.workflow == workflow)).all())


def next_allocation(session: Any, workflow: str, candidates: list[str]) -> Allocation:
    """The allocation a new experiment of ``workflow`` receives (call under its lock)."""
    history = replay(workflow_experiments(session, workflow))
    if not history:
        return allocate(None, None, candidates)
    last_id = max(history)
    last = session.get(Experiment, last_id)
    return allocate(history[last_id], outcome(last), candidates)


@dataclass(frozen=True)
class BudgetState:
    """A workflow's budget as the store has it now, in shares of the level."""

    experiments: int
    """How many experiments the workflow has had (running included)."""
    left: float
    """Uncommitted: what later experiments can still receive (a promotion adds its share)."""
    next_share: float
    """What the next experiment would receive if it started now."""


def workflow_budget(store: Store, workflow: str) -> BudgetState:
    """The workflow's budget, derived from its experiments' stored shares and outcomes."""
    with store.session() as session:
        experiments = workflow_experiments(session, workflow)
    history = replay(experiments)
    if not history:
        return BudgetState(0, 1.0, spending(1))
    last = max(experiments, key=lambda e: e.id or 0)
    allocation = history[int(last.id)]
    carry = allocation.candidate_share if outcome(last) == "promoted" else 0.0
    nxt = allocate(allocation, outcome(last), ["next"])
    return BudgetState(len(history), allocation.left + carry, nxt.share)


def candidate_alpha(allocation: Allocation, level: float) -> float:
    """The level each of the experiment's candidates is tested at."""
    return level * allocation.candidate_share


def describe(allocation: Allocation, level: float, min_alpha: float) -> dict[str, Any]:
    """What the report and ``flywheel experiment show`` print about an experiment's budget."""
    alpha = candidate_alpha(allocation, level)
    return {
        "level": level,
        "experiment": allocation.index,
        "share": allocation.share,
        "carried": allocation.carried,
        "alpha": level * allocation.share,
        "alpha_per_candidate": alpha,
        "candidates": list(allocation.candidates),
        "left": level * allocation.left,
        "spent": alpha < min_alpha,
        "min_alpha": min_alpha,
    }


def budget_text(info: dict[str, Any]) -> str:
    """One line for a person, from ``describe``."""
    carried = (
        f", {info['level'] * info['carried']:.4g} of it passed on by the last promotion"
        if info.get("carried")
        else ""
    )
    k = len(info["candidates"])
    text = (
        f"false-promotion budget {info['level']:g} over the workflow's life: experiment "
        f"{info['experiment']} holds α = {info['alpha']:.4g}{carried} "
        f"({info['alpha_per_candidate']:.4g} for each of its {k} starting candidate"
        f"{'s' if k != 1 else ''}); {info['left']:.4g} left for later experiments"
    )
    if info.get("spent"):
        text += f" — spent: below min_alpha {info['min_alpha']:g}, no candidate can be promoted"
    return text
