"""Adaptive routing: pick an agent by skills, load and what its past rewards say (Thompson sampling).

Seed 003 nudges one weight per agent by a fixed step and always routes to the top score, so a
lucky start locks traffic in and an agent that improves is never tried again. Here:

- every (agent, skill) has a Beta posterior over its success rate (rewards in [0, 1] add
  ``r`` to alpha and ``1 - r`` to beta); a request's score for an agent is the mean of one draw
  per requested skill, divided by ``1 + load_penalty * load / capacity``;
- the probability that each agent wins that draw is estimated by Monte Carlo, mixed with a
  floor (``routing.floor`` per agent, default 0.05, at most 1/n) so no eligible agent ever
  starves — an agent at capacity keeps the floor and loses only its Thompson share — and the
  agent is drawn from that distribution, so the recorded probability is the true propensity
  of the choice and every eligible agent has one above 0: ``flywheel evaluate routing`` can
  estimate another policy on past traffic (``routing.floor: 0`` turns exploration off, and
  the evaluation then refuses policies that choose agents the router never tried);
- ``update_routing`` recomputes the posteriors from every routed rollout's reward (its stored
  reward, else its outcome by ``store.outcomes``, else its implicit satisfaction; optionally
  discounting old evidence by a half-life), so running it twice never counts a reward twice;
- ``weight`` (shown on the dashboard) is ``2 x`` the posterior mean clamped to
  ``[weight_min, weight_max]`` — 1.0 for an agent with no evidence, as in the seed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from flywheel_middleware.errors import FlywheelError

if TYPE_CHECKING:  # the store and SQLAlchemy load on first use, not on import
    from flywheel_middleware.config import FlywheelConfig, RoutingConfig
    from flywheel_middleware.store.database import Store

ANY_SKILL = "*"
Posteriors = dict[tuple[str, str], list[float]]  # (agent, skill) -> [alpha, beta, n]


class NoEligibleAgentError(FlywheelError, LookupError):
    """No configured agent has every requested skill."""


@dataclass
class RouteDecision:
    """The chosen agent, the probability it had, and the alternatives (for offline evaluation)."""

    agent_id: str
    skills: tuple[str, ...]
    probability: float
    probabilities: dict[str, float]
    load: dict[str, float] = field(default_factory=dict)
    policy: str = "thompson"
    _router: Any = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def agent(self) -> str:
        return self.agent_id

    def as_metadata(self) -> dict[str, Any]:
        return {
            "agent": self.agent_id,
            "skills": list(self.skills),
            "probability": round(self.probability, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "load": self.load,
            "policy": self.policy,
        }

    def release(self) -> None:
        """The request is done: the agent's in-flight load goes down again."""
        if not self._released and self._router is not None:
            self._released = True
            self._router.release(self.agent_id)

    def __enter__(self) -> RouteDecision:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Router:
    """Thompson-sampling router over ``config.routing`` agents; thread-safe."""

    def __init__(
        self,
        config: RoutingConfig,
        posteriors: Posteriors | None = None,
        *,
        seed: int | None = None,
        samples: int = 512,
    ) -> None:
        self.config = config
        self.agents = {a.id: a for a in config.agents}
        self.posteriors: Posteriors = {k: list(v) for k, v in (posteriors or {}).items()}
        self.samples = samples
        self._rng = random.Random(seed)
        self._np_rng: Any = None
        try:
            import numpy as np

            self._np_rng = np.random.default_rng(seed)
        except ImportError:  # pragma: no cover - numpy is optional for the core
            self.samples = min(samples, 128)
        self._inflight: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests each agent has been given and not yet released, in this process."""
        with self._lock:
            return dict(self._inflight)

    # -- choosing ------------------------------------------------------------------------

    def eligible(self, skills: Iterable[str]) -> list[str]:
        """Agents that have every requested skill (an agent with skill ``*`` has them all)."""
        wanted = set(skills)
        return [
            a.id for a in self.agents.values() if ANY_SKILL in a.skills or wanted.issubset(a.skills)
        ]

    def _posterior(self, agent: str, skill: str) -> tuple[float, float]:
        p = self.posteriors.get((agent, skill))
        return (p[0], p[1]) if p else (1.0, 1.0)

    def probabilities(
        self, skills: Sequence[str], load: dict[str, float] | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """(probability of each eligible agent, the load used), floor included."""
        skills = tuple(dict.fromkeys(skills)) or (ANY_SKILL,)
        candidates = self.eligible(s for s in skills if s != ANY_SKILL)
        if not candidates:
            known = ", ".join(f"{a.id} {sorted(a.skills)}" for a in self.agents.values()) or "none"
            raise NoEligibleAgentError(
                f"no agent has all of the skills {list(skills)}; configured agents: {known}"
            )
        with self._lock:
            used = {
                a: float(load[a]) if load and a in load else float(self._inflight[a])
                for a in candidates
            }
        free = [a for a in candidates if used[a] < self.agents[a].capacity]
        pool = free or candidates  # everyone full: still answer, the penalty spreads the load
        penalty = {
            a: 1.0 + self.config.load_penalty * used[a] / self.agents[a].capacity for a in pool
        }
        params = [[self._posterior(a, s) for s in skills] for a in pool]
        with self._lock:  # numpy generators are not thread-safe
            wins = self._win_rates(params, [penalty[a] for a in pool])
        # every eligible agent keeps the floor, one at capacity too (it loses only its
        # Thompson share): the overlap offline evaluation needs
        n = len(candidates)
        floor = min(self.config.floor, 1.0 / n)
        probs = dict.fromkeys(candidates, floor)
        for a, w in zip(pool, wins, strict=True):
            probs[a] += (1.0 - n * floor) * w
        return probs, used

    def _win_rates(
        self, params: list[list[tuple[float, float]]], penalty: list[float]
    ) -> list[float]:
        """P(each agent's penalised Thompson draw is the highest), by Monte Carlo."""
        n, k = len(params), self.samples
        if n == 1:
            return [1.0]
        if self._np_rng is not None:
            import numpy as np

            a = np.array([[p[0] for p in row] for row in params])
            b = np.array([[p[1] for p in row] for row in params])
            draws = self._np_rng.beta(a[:, :, None], b[:, :, None], size=(*a.shape, k))
            score = draws.mean(axis=1) / np.array(penalty)[:, None]
            counts = np.bincount(score.argmax(axis=0), minlength=n)
            return (counts / k).tolist()
        counts = [0] * n
        beta = self._rng.betavariate
        for _ in range(k):
            scores = [
                sum(beta(al, be) for al, be in row) / len(row) / penalty[i]
                for i, row in enumerate(params)
            ]
            counts[max(range(n), key=scores.__getitem__)] += 1
        return [c / k for c in counts]

    def choose(
        self, skills: Sequence[str] = (), load: dict[str, float] | None = None
    ) -> RouteDecision:
        """Route one request; the agent's in-flight load rises until ``decision.release()``."""
        skills = tuple(dict.fromkeys(skills))
        probs, used = self.probabilities(skills, load)
        agents = [a for a, p in probs.items() if p > 0]
        weights = [probs[a] for a in agents]
        with self._lock:
            agent = self._rng.choices(agents, weights=weights)[0]
            self._inflight[agent] += 1
        return RouteDecision(agent, skills, probs[agent], probs, load=used, _router=self)

    def release(self, agent_id: str) -> None:
        with self._lock:
            if self._inflight[agent_id] > 0:
                self._inflight[agent_id] -= 1

    # -- learning ------------------------------------------------------------------------

    def observe(
        self, agent_id: str, skills: Sequence[str], reward: float, weight: float = 1.0
    ) -> None:
        """Fold one reward in [0, 1] into the agent's posteriors (each skill and ``*``)."""
        r = min(1.0, max(0.0, float(reward)))
        with self._lock:
            for skill in {*skills, ANY_SKILL}:
                p = self.posteriors.setdefault((agent_id, skill), [1.0, 1.0, 0.0])
                p[0] += weight * r
                p[1] += weight * (1.0 - r)
                p[2] += 1

    def set_posteriors(self, posteriors: Posteriors) -> None:
        """Replace the posteriors (e.g. freshly loaded from the store); in-flight loads stay."""
        fresh = {k: list(v) for k, v in posteriors.items()}
        with self._lock:
            self.posteriors = fresh

    def weight(self, agent_id: str, skill: str = ANY_SKILL) -> float:
        a, b = self._posterior(agent_id, skill)
        return clamp_weight(2.0 * a / (a + b), self.config)


def clamp_weight(value: float, config: RoutingConfig) -> float:
    return max(config.weight_min, min(config.weight_max, value))


# -- the store side ----------------------------------------------------------------------


def load_posteriors(store: Store) -> Posteriors:
    from sqlmodel import select

    from flywheel_middleware.store.models import RoutingWeight

    with store.session() as session:
        rows = session.exec(select(RoutingWeight))
        return {(r.agent_id, r.skill): [r.alpha, r.beta, float(r.n)] for r in rows}


def save_posteriors(store: Store, posteriors: Posteriors, config: RoutingConfig) -> None:
    """Replace the stored posteriors (and their display weights) in one transaction."""
    from sqlmodel import delete

    from flywheel_middleware.store.models import RoutingWeight

    now = datetime.now(timezone.utc)
    with store.session() as session:
        session.exec(delete(RoutingWeight))
        for (agent, skill), (a, b, n) in sorted(posteriors.items()):
            session.add(
                RoutingWeight(
                    agent_id=agent,
                    skill=skill,
                    weight=clamp_weight(2.0 * a / (a + b), config),
                    alpha=a,
                    beta=b,
                    n=int(n),
                    updated_at=now,
                )
            )


def _outcome_rewards(store: Store, ids: list[str]) -> dict[str, float]:
    """1.0 for a positive outcome, 0.0 for another verdict (``store.outcomes``), per rollout.

    The posterior is over an agent's success rate, and a user's verdict says success or not.
    """
    from flywheel_middleware.store import outcomes
    from flywheel_middleware.store.models import Feedback

    out: dict[str, float] = {}
    with store.session() as session:
        for i in range(0, len(ids), 500):
            q = outcomes.rollout_outcomes().where(Feedback.rollout_id.in_(ids[i : i + 500]))
            for rid, positive in session.exec(q):
                out[rid] = float(positive)
    return out


def update_routing(
    store: Store,
    config: FlywheelConfig,
    *,
    half_life_days: float | None = None,
    window_days: float | None = None,
    use_implicit: bool = True,
) -> dict[str, Any]:
    """Recompute every (agent, skill) posterior from the rewards of routed rollouts and store them.

    A rollout's reward is its stored ``reward`` if set, else its outcome by the users' explicit
    feedback (1 positive, 0 not; ``store.outcomes``), else (``use_implicit``) the implicit
    satisfaction of its UI telemetry. ``half_life_days`` discounts old evidence (so an agent
    that changes is re-learned); ``window_days`` ignores older rollouts. Idempotent: it rebuilds
    from scratch, so the controller may call it every cycle.
    """
    from sqlmodel import select

    from flywheel_middleware.store.models import Rollout

    routing = config.routing
    with store.session() as session:
        q = select(
            Rollout.id, Rollout.started_at, Rollout.reward, Rollout.metadata_, Rollout.workflow
        ).where(Rollout.metadata_["route"].as_string().is_not(None))
        if window_days:
            since = datetime.now(timezone.utc) - timedelta(days=window_days)
            q = q.where(Rollout.started_at >= since)
        rows = list(session.exec(q))
    routed = []
    workflow_of: dict[str, str] = {}
    for rid, started, reward, meta, workflow in rows:
        route = (meta or {}).get("route") if isinstance(meta, dict) else None
        if isinstance(route, dict) and isinstance(route.get("agent"), str):
            routed.append((rid, started, reward, route))
            workflow_of[rid] = workflow
    missing = [rid for rid, _, reward, _ in routed if reward is None]
    explicit = _outcome_rewards(store, missing) if missing else {}
    implicit: dict[str, float] = {}
    still = [rid for rid in missing if rid not in explicit]
    if use_implicit and still:
        from flywheel_middleware.learn.implicit import Scorer, rollout_features

        # each workflow's own model, else the shared one, else the rule
        scorers: dict[str, Scorer] = {}
        for rid, f in rollout_features(store, still).items():
            wf = workflow_of[rid]
            if wf not in scorers:
                scorers[wf] = Scorer.from_store(store, config, wf)
            implicit[rid] = scorers[wf].score(f)
    now = time.time()
    posteriors: Posteriors = {}
    used = 0
    for rid, started, reward, route in routed:
        r = reward if reward is not None else explicit.get(rid, implicit.get(rid))
        if r is None:
            continue
        w = 1.0
        if half_life_days and started is not None:
            ts = started.replace(tzinfo=timezone.utc) if started.tzinfo is None else started
            age_days = max(0.0, (now - ts.timestamp()) / 86400.0)
            w = 0.5 ** (age_days / half_life_days)
        r = min(1.0, max(0.0, float(r)))
        skills = [s for s in route.get("skills") or [] if isinstance(s, str)]
        for skill in {*skills, ANY_SKILL}:
            p = posteriors.setdefault((route["agent"], skill), [1.0, 1.0, 0.0])
            p[0] += w * r
            p[1] += w * (1.0 - r)
            p[2] += 1
        used += 1
    save_posteriors(store, posteriors, routing)
    invalidate_routers()
    return {
        "routed_rollouts": len(routed),
        "rewarded": used,
        "weights": {
            f"{a}/{s}": round(clamp_weight(2 * p[0] / (p[0] + p[1]), routing), 4)
            for (a, s), p in sorted(posteriors.items())
        },
    }


# -- one router per (config, store), behind fw.route -------------------------------------

_cache_lock = threading.Lock()
_cache: dict[str, Any] = {"router": None, "key": None, "loaded": 0.0}
REFRESH_SECONDS = 5.0
"""How often a cached router re-reads the stored posteriors (``update_routing`` may run elsewhere)."""


def invalidate_routers() -> None:
    """Make the cached router re-read the stored posteriors on its next use.

    ``update_routing`` calls it; a process that learns of new posteriors otherwise may too.
    """
    with _cache_lock:
        _cache["loaded"] = 0.0


def router_for(store: Store, config: FlywheelConfig) -> Router:
    """The router of ``config.routing`` over ``store``'s posteriors, kept between requests.

    One router is cached (its in-flight loads live in it); it is rebuilt when the config or
    the store changes and re-reads the posteriors every ``REFRESH_SECONDS``.
    """
    key = (id(config), store.url)
    now = time.monotonic()
    with _cache_lock:
        router = _cache["router"]
        if router is None or _cache["key"] != key:
            if not config.routing.agents:
                raise NoEligibleAgentError(
                    "no agents configured: add routing.agents [{id, skills, capacity}] to flywheel.yaml"
                )
            router = Router(config.routing, load_posteriors(store))
            _cache.update(router=router, key=key, loaded=now)
        elif now - _cache["loaded"] > REFRESH_SECONDS:
            try:
                router.set_posteriors(load_posteriors(store))
            except Exception:  # keep routing on the last posteriors if the store hiccups
                pass
            _cache["loaded"] = now
        return router


def route(
    store: Store,
    config: FlywheelConfig,
    skills: Sequence[str] | str = (),
    *,
    load: dict[str, float] | None = None,
    rollout: Any = None,
) -> RouteDecision:
    """Choose an agent for a request needing ``skills``; record the choice on the rollout.

    The router is ``router_for(store, config)``. The decision is recorded as the rollout's
    ``route`` metadata (``rollout``, or the current one when None). ``load`` overrides the
    in-flight counts this process keeps (release them with ``decision.release()`` or
    ``with ... as d:``). ``fw.route(skills)`` is this with the process's store and config.
    """
    if isinstance(skills, str):
        skills = [skills]
    decision = router_for(store, config).choose(list(skills), load)
    if rollout is None:
        from flywheel_middleware.capture.handles import current_rollout

        rollout = current_rollout()
    if rollout is not None:
        try:
            rollout.set_metadata("route", decision.as_metadata())
        except Exception:
            pass
    return decision


def simulate(
    router: Router,
    true_rates: dict[str, float],
    n: int,
    *,
    skills: Sequence[str] = (),
    seed: int = 0,
) -> list[RouteDecision]:
    """Route ``n`` requests whose success is Bernoulli(true rate of the chosen agent); for tests and demos."""
    rng = random.Random(seed)
    decisions = []
    for _ in range(n):
        d = router.choose(skills)
        router.observe(d.agent_id, d.skills, float(rng.random() < true_rates[d.agent_id]))
        d.release()
        decisions.append(d)
    return decisions
