"""Implicit feedback: session features from UI telemetry, a rule, and a calibrated satisfaction model.

Seed 003 sums raw milliseconds into an unscaled logistic regression, labels it with a rule and
reports accuracy. Here the features are log-scaled and standardised, the labels are the
rollouts' positive outcomes by real explicit feedback (``store.outcomes``: every rating >=
``implicit.positive_rating`` and every thumb up), the probabilities are
Platt-calibrated on out-of-fold scores, the model is judged by AUC and Brier score on a
deterministic held-out split (a hash of the rollout id), and it is stored as plain JSON in
``ModelArtifact`` so scoring needs neither pickle nor scikit-learn.

Event vocabulary (what ``flywheel.js`` sends; other producers may send the same):

=============  ========================================================================
event_type     payload
=============  ========================================================================
``dwell``      ``{"ms": visible milliseconds of the answer in one stretch}``
``click``      ``{"kind": "copy|regenerate|escalate|more-info|thumbs-up|...", ...}``
``copy``       ``{"chars": characters copied from the answer}``
``scroll``     ``{"depth": deepest fraction of the page seen, 0..1}``
``mouse``      ``{"moves": counted movements, "ms": over how long}``
``regenerate`` / ``escalate``  server-side producers may send these directly
=============  ========================================================================
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.store import outcomes
from flywheel_middleware.store.models import ModelArtifact, TelemetryEvent
from flywheel_middleware.store.outcomes import POSITIVE_RATING

if TYPE_CHECKING:
    from flywheel_middleware.config import FlywheelConfig
    from flywheel_middleware.recording.recorder import Recorder
    from flywheel_middleware.store.database import Store

MODEL_NAME = "implicit_satisfaction"

# Fixed order: the model's coefficients are stored against these names.
FEATURES: tuple[str, ...] = (
    "dwell_total_s",
    "dwell_max_s",
    "dwell_count",
    "clicks_total",
    "clicks_more_info",
    "clicks_other",
    "copies",
    "regenerates",
    "escalations",
    "scroll_depth",
    "mouse_per_s",
)
# Heavy-tailed features are modelled as log1p(x); the rest as they are.
LOG_FEATURES = frozenset(
    {
        "dwell_total_s",
        "dwell_max_s",
        "dwell_count",
        "clicks_total",
        "clicks_more_info",
        "clicks_other",
        "copies",
        "regenerates",
        "escalations",
        "mouse_per_s",
    }
)

_CLICK_KINDS = {
    "copy": "copies",
    "regenerate": "regenerates",
    "retry": "regenerates",
    "escalate": "escalations",
    "human": "escalations",
    "more-info": "clicks_more_info",
    "more_info": "clicks_more_info",
}


# -- features ------------------------------------------------------------------------------


@dataclass
class Features:
    """Implicit-signal features of one rollout (or one session)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FEATURES, 0.0))
    events: int = 0
    copy_events: int = 0
    copy_clicks: int = 0
    mouse_moves: float = 0.0
    mouse_ms: float = 0.0

    def vector(self) -> list[float]:
        return [self.values[name] for name in FEATURES]

    def as_dict(self) -> dict[str, float]:
        return {**self.values, "events": float(self.events)}


def _num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    if math.isnan(value) or math.isinf(value):
        return default
    return float(value)


def _event_parts(event: Any) -> tuple[str | None, str | None, str, dict[str, Any]]:
    """(rollout_id, session_id, event_type, payload) of a TelemetryEvent row or a dict."""
    if isinstance(event, dict):
        return (
            event.get("rollout_id"),
            event.get("session_id"),
            str(event.get("event_type", "")),
            event.get("payload") or {},
        )
    payload = event.payload if isinstance(event.payload, dict) else {}
    return event.rollout_id, event.session_id, event.event_type, payload


def add_event(features: Features, event_type: str, payload: dict[str, Any]) -> None:
    """Fold one event into ``features`` (unknown event types count as events and nothing else)."""
    v = features.values
    features.events += 1
    if event_type == "dwell":
        seconds = max(0.0, _num(payload.get("ms"))) / 1000.0
        v["dwell_total_s"] += seconds
        v["dwell_max_s"] = max(v["dwell_max_s"], seconds)
        v["dwell_count"] += 1
    elif event_type == "click":
        v["clicks_total"] += 1
        kind = str(payload.get("kind") or "").lower()
        target = _CLICK_KINDS.get(kind, "clicks_other")
        if target == "copies":  # a copy button usually also fires a copy event: count once
            features.copy_clicks += 1
            v["copies"] = max(features.copy_events, features.copy_clicks)
        else:
            v[target] += 1
    elif event_type == "copy":
        features.copy_events += 1
        v["copies"] = max(features.copy_events, features.copy_clicks)
    elif event_type == "regenerate":
        v["regenerates"] += 1
    elif event_type == "escalate":
        v["escalations"] += 1
    elif event_type == "scroll":
        depth = _num(payload.get("depth"))
        if depth > 1.0:  # a percentage
            depth /= 100.0
        v["scroll_depth"] = max(v["scroll_depth"], min(1.0, max(0.0, depth)))
    elif event_type == "mouse":
        features.mouse_moves += max(0.0, _num(payload.get("moves")))
        features.mouse_ms += max(0.0, _num(payload.get("ms")))
        if features.mouse_ms > 0:
            v["mouse_per_s"] = features.mouse_moves / (features.mouse_ms / 1000.0)


def features_by(events: Iterable[Any], key: str = "rollout_id") -> dict[str, Features]:
    """Features per rollout (``key="rollout_id"``) or per session (``key="session_id"``).

    ``events`` are TelemetryEvent rows or dicts with the same fields; events without the
    key are skipped.
    """
    out: dict[str, Features] = defaultdict(Features)
    for event in events:
        rollout_id, session_id, event_type, payload = _event_parts(event)
        k = rollout_id if key == "rollout_id" else session_id
        if k:
            add_event(out[k], event_type, payload)
    return dict(out)


def load_events(store: Store, rollout_ids: Sequence[str] | None = None) -> list[TelemetryEvent]:
    """Telemetry rows of the given rollouts (all rows with a rollout when ``None``)."""
    from sqlmodel import select

    rows: list[TelemetryEvent] = []
    with store.session() as session:
        if rollout_ids is None:
            q = select(TelemetryEvent).where(TelemetryEvent.rollout_id.is_not(None))
            return list(session.exec(q))
        ids = list(dict.fromkeys(rollout_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows.extend(
                session.exec(select(TelemetryEvent).where(TelemetryEvent.rollout_id.in_(chunk)))
            )
    return rows


def rollout_features(store: Store, rollout_ids: Sequence[str] | None = None) -> dict[str, Features]:
    return features_by(load_events(store, rollout_ids), "rollout_id")


def session_features(store: Store, session_ids: Sequence[str]) -> dict[str, Features]:
    from sqlmodel import select

    with store.session() as session:
        rows = list(
            session.exec(
                select(TelemetryEvent).where(TelemetryEvent.session_id.in_(list(session_ids)))
            )
        )
    return features_by(rows, "session_id")


# -- the documented fallback rule ---------------------------------------------------------


def rule_score(features: Features) -> float:
    """The fallback used until enough labels exist (``implicit.min_labels``).

    Start at 0.5; copying the answer +0.25; each regenerate -0.2 and each escalation to a
    human -0.3 (together at most -0.5); reading it for 5 s or more +0.1, leaving within 1 s
    -0.1; scrolling past 80% of the page +0.05; clamped to [0, 1].
    """
    v = features.values
    score = 0.5
    if v["copies"] > 0:
        score += 0.25
    score -= min(0.5, 0.2 * v["regenerates"] + 0.3 * v["escalations"])
    if v["dwell_total_s"] >= 5:
        score += 0.1
    elif v["dwell_count"] > 0 and v["dwell_total_s"] < 1:
        score -= 0.1
    if v["scroll_depth"] >= 0.8:
        score += 0.05
    return min(1.0, max(0.0, score))


# -- the model ----------------------------------------------------------------------------


def _transform(vector: Sequence[float]) -> list[float]:
    return [
        math.log1p(max(0.0, x)) if name in LOG_FEATURES else x
        for name, x in zip(FEATURES, vector, strict=True)
    ]


def held_out(rollout_id: str, fraction: float = 0.25) -> bool:
    """Deterministic split by a hash of the rollout id, so ``evaluate`` finds the same held-out set."""
    h = int.from_bytes(hashlib.blake2b(rollout_id.encode(), digest_size=8).digest(), "big")
    return (h % 10_000) < fraction * 10_000


@dataclass
class SatisfactionModel:
    """A logistic regression over standardised features with Platt calibration, as plain numbers."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    platt_a: float
    platt_b: float
    features: tuple[str, ...] = FEATURES
    version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def raw(self, features: Features) -> float:
        x = _transform(features.vector())
        z = self.intercept
        for xi, m, s, c in zip(x, self.mean, self.scale, self.coef, strict=True):
            z += c * (xi - m) / (s or 1.0)
        return z

    def score(self, features: Features) -> float:
        """Calibrated probability that the user was satisfied."""
        t = self.platt_a * self.raw(features) + self.platt_b
        # sklearn's sigmoid calibration: p = 1 / (1 + exp(a*f + b))
        if t >= 0:
            e = math.exp(-t)
            return e / (1.0 + e)
        return 1.0 / (1.0 + math.exp(t))

    def payload(self) -> dict[str, Any]:
        return {
            "kind": "logistic_regression+platt",
            "features": list(self.features),
            "log_features": sorted(LOG_FEATURES & set(self.features)),
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": self.intercept,
            "platt_a": self.platt_a,
            "platt_b": self.platt_b,
        }

    @classmethod
    def from_payload(
        cls, payload: dict[str, Any], version: int | None = None, metrics: Any = None
    ) -> SatisfactionModel:
        if tuple(payload.get("features", ())) != FEATURES:
            raise ValueError(
                f"stored model has features {payload.get('features')}, this code expects {list(FEATURES)}"
            )
        return cls(
            mean=[float(x) for x in payload["mean"]],
            scale=[float(x) for x in payload["scale"]],
            coef=[float(x) for x in payload["coef"]],
            intercept=float(payload["intercept"]),
            platt_a=float(payload["platt_a"]),
            platt_b=float(payload["platt_b"]),
            version=version,
            metrics=dict(metrics or {}),
        )


@dataclass
class LabelledSet:
    rollout_ids: list[str]
    features: list[Features]
    labels: list[int]


def model_name(workflow: str | None = None) -> str:
    """The artifact name: one model for every workflow, or one per workflow."""
    return MODEL_NAME if not workflow else f"{MODEL_NAME}:{workflow}"


def labels_for(
    store: Store, positive_rating: float = POSITIVE_RATING, workflow: str | None = None
) -> dict[str, int]:
    """Satisfied (1) or not (0) per rollout with an explicit verdict, by ``store.outcomes``.

    A label is the rollout's positive outcome (every explicit rating >= ``positive_rating``
    and every thumb up); ``positive_rating`` is YAML ``implicit.positive_rating``.
    """
    from flywheel_middleware.store.models import Feedback, Rollout

    q = outcomes.rollout_outcomes(positive_rating)
    if workflow:
        q = q.join(Rollout, Rollout.id == Feedback.rollout_id).where(Rollout.workflow == workflow)
    with store.session() as session:
        return {rid: int(positive) for rid, positive in session.exec(q)}


def labelled_set(
    store: Store, positive_rating: float = POSITIVE_RATING, workflow: str | None = None
) -> LabelledSet:
    """Rollouts (of one workflow, or all) that have both telemetry and explicit feedback."""
    labels = labels_for(store, positive_rating, workflow)
    feats = rollout_features(store, list(labels)) if labels else {}
    ids = sorted(set(labels) & set(feats))
    return LabelledSet(ids, [feats[i] for i in ids], [labels[i] for i in ids])


def fit(features: Sequence[Features], labels: Sequence[int], *, seed: int = 0) -> SatisfactionModel:
    """Fit the calibrated logistic regression (scikit-learn) and return it as plain numbers."""
    try:
        import numpy as np
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "training needs scikit-learn: pip install 'flywheel-middleware[ml]'"
        ) from exc
    y = np.asarray(labels, dtype=int)
    if len(set(y.tolist())) < 2:
        raise ValueError("training needs both satisfied and unsatisfied examples")
    X = np.asarray([_transform(f.vector()) for f in features], dtype=float)
    minority = int(min(y.sum(), len(y) - y.sum()))
    folds = max(2, min(5, minority))
    base = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    )
    calibrated = CalibratedClassifierCV(base, method="sigmoid", cv=folds, ensemble=False)
    calibrated.fit(X, y)
    inner = calibrated.calibrated_classifiers_[0]
    pipe = inner.estimator
    scaler, lr = pipe.steps[0][1], pipe.steps[1][1]
    sig = inner.calibrators[0]
    return SatisfactionModel(
        mean=scaler.mean_.tolist(),
        scale=scaler.scale_.tolist(),
        coef=lr.coef_[0].tolist(),
        intercept=float(lr.intercept_[0]),
        platt_a=float(sig.a_),
        platt_b=float(sig.b_),
    )


def evaluate_scores(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """AUC, Brier score and log loss (AUC by the rank statistic, no dependencies)."""
    n = len(labels)
    pos = sum(labels)
    neg = n - pos
    out: dict[str, float] = {"n": float(n), "positives": float(pos)}
    if n == 0:
        return out
    out["brier"] = sum((s - y) ** 2 for s, y in zip(scores, labels, strict=True)) / n
    eps = 1e-6
    out["log_loss"] = (
        -sum(
            y * math.log(min(1 - eps, max(eps, s)))
            + (1 - y) * math.log(min(1 - eps, max(eps, 1 - s)))
            for s, y in zip(scores, labels, strict=True)
        )
        / n
    )
    if pos and neg:
        order = sorted(range(n), key=lambda i: scores[i])
        ranks = [0.0] * n
        i = 0
        while i < n:  # average ranks over ties
            j = i
            while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
                j += 1
            for k in range(i, j + 1):
                ranks[order[k]] = (i + j) / 2 + 1
            i = j + 1
        rank_pos = sum(r for r, y in zip(ranks, labels, strict=True) if y)
        out["auc"] = (rank_pos - pos * (pos + 1) / 2) / (pos * neg)
    return out


@dataclass
class TrainResult:
    model: SatisfactionModel | None
    n_labels: int
    n_train: int
    n_test: int
    model_metrics: dict[str, float]
    rule_metrics: dict[str, float]
    version: int | None = None
    reason: str = ""


def train(
    store: Store,
    config: FlywheelConfig,
    *,
    workflow: str | None = None,
    save: bool = True,
    seed: int = 0,
) -> TrainResult:
    """Train on the labelled rollouts outside the held-out split; evaluate on the held-out ones.

    Saves a new ``ModelArtifact`` version when ``save`` (named per ``workflow`` when given: UIs
    differ, and a workflow's own model wins over the shared one). With fewer than
    ``config.implicit.min_labels`` labels nothing is trained and the rule stays in force.
    """
    data = labelled_set(store, config.implicit.positive_rating, workflow)
    n = len(data.labels)
    test_idx = [i for i, rid in enumerate(data.rollout_ids) if held_out(rid)]
    train_idx = [i for i, rid in enumerate(data.rollout_ids) if not held_out(rid)]
    test_y = [data.labels[i] for i in test_idx]
    rule_metrics = evaluate_scores(test_y, [rule_score(data.features[i]) for i in test_idx])
    if n < config.implicit.min_labels:
        return TrainResult(
            None,
            n,
            len(train_idx),
            len(test_idx),
            {},
            rule_metrics,
            reason=f"only {n} labelled rollouts with telemetry; need {config.implicit.min_labels}",
        )
    train_y = [data.labels[i] for i in train_idx]
    if len(set(train_y)) < 2:
        return TrainResult(
            None,
            n,
            len(train_idx),
            len(test_idx),
            {},
            rule_metrics,
            reason="the training labels are all one class",
        )
    model = fit([data.features[i] for i in train_idx], train_y, seed=seed)
    model_metrics = evaluate_scores(test_y, [model.score(data.features[i]) for i in test_idx])
    model.metrics = {
        "held_out": model_metrics,
        "rule_held_out": rule_metrics,
        "n_labels": n,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "positive_rate": sum(data.labels) / n,
        "workflow": workflow,
    }
    result = TrainResult(model, n, len(train_idx), len(test_idx), model_metrics, rule_metrics)
    if save:
        result.version = save_model(store, model, model_name(workflow))
    return result


def save_model(store: Store, model: SatisfactionModel, name: str = MODEL_NAME) -> int:
    """Store the model as a new version; returns the version number."""
    from sqlalchemy import func
    from sqlmodel import select

    with store.session() as session:
        latest = session.exec(
            select(func.max(ModelArtifact.version)).where(ModelArtifact.name == name)
        ).one()
        version = int(latest or 0) + 1
        session.add(
            ModelArtifact(
                name=name,
                version=version,
                payload=model.payload(),
                metrics=model.metrics,
                created_at=utcnow(),
            )
        )
    model.version = version
    return version


def load_model(
    store: Store, version: int | None = None, name: str = MODEL_NAME
) -> SatisfactionModel | None:
    """The latest (or the given) stored model, or None."""
    from sqlmodel import select

    with store.session() as session:
        q = select(ModelArtifact).where(ModelArtifact.name == name)
        q = (
            q.where(ModelArtifact.version == version)
            if version
            else q.order_by(ModelArtifact.version.desc())
        )
        row = session.exec(q.limit(1)).first()
    if row is None:
        return None
    return SatisfactionModel.from_payload(row.payload, version=row.version, metrics=row.metrics)


def evaluate(
    store: Store,
    config: FlywheelConfig,
    version: int | None = None,
    *,
    workflow: str | None = None,
) -> dict[str, Any]:
    """Score the stored model and the rule on today's held-out labelled rollouts."""
    model = load_model(store, version, model_name(workflow))
    data = labelled_set(store, config.implicit.positive_rating, workflow)
    idx = [i for i, rid in enumerate(data.rollout_ids) if held_out(rid)]
    y = [data.labels[i] for i in idx]
    out: dict[str, Any] = {
        "n_labels": len(data.labels),
        "n_test": len(idx),
        "rule": evaluate_scores(y, [rule_score(data.features[i]) for i in idx]),
        "model_version": model.version if model else None,
    }
    if model is not None:
        out["model"] = evaluate_scores(y, [model.score(data.features[i]) for i in idx])
    return out


class Scorer:
    """Implicit satisfaction per rollout: the stored model when trained on enough labels, else the rule."""

    def __init__(self, model: SatisfactionModel | None, min_labels: int = 50) -> None:
        usable = model is not None and model.metrics.get("n_labels", 0) >= min_labels
        self.model = model if usable else None
        self.method = "rule"
        if self.model is not None and model is not None:
            wf = model.metrics.get("workflow")
            self.method = f"model v{model.version}" + (f" ({wf})" if wf else "")

    @classmethod
    def from_store(
        cls, store: Store, config: FlywheelConfig, workflow: str | None = None
    ) -> Scorer:
        """The workflow's own model if it has a usable one, else the shared model, else the rule."""
        min_labels = config.implicit.min_labels
        names = [model_name(workflow), MODEL_NAME] if workflow else [MODEL_NAME]
        for name in names:
            try:
                model = load_model(store, name=name)
            except Exception:  # an old or foreign artifact: try the next, then the rule
                model = None
            scorer = cls(model, min_labels)
            if scorer.model is not None:
                return scorer
        return cls(None, min_labels)

    def score(self, features: Features) -> float:
        return self.model.score(features) if self.model is not None else rule_score(features)


# -- simulation ---------------------------------------------------------------------------


def simulate_events(
    satisfied: bool,
    rng: random.Random,
    *,
    rollout_id: str,
    session_id: str | None = None,
) -> list[dict[str, Any]]:
    """UI events of one answer whose reader was (or was not) satisfied — for demos and tests.

    Satisfaction shifts every signal a little and none decisively: satisfied readers read
    longer in fewer stretches, scroll further, copy more often and rarely regenerate or
    escalate; unhappy ones either bounce quickly or re-read in many short stretches with
    restless mouse movement. Explicit actions are sparse, as they are in real traffic.
    """
    events: list[dict[str, Any]] = []

    def add(event_type: str, **payload: Any) -> None:
        events.append(
            {
                "event_type": event_type,
                "rollout_id": rollout_id,
                "session_id": session_id,
                "payload": payload,
            }
        )

    if satisfied:
        skim = rng.random() < 0.25  # found the answer at a glance
        stretches = 1 + (rng.random() < 0.3)
        for _ in range(stretches):
            add("dwell", ms=rng.lognormvariate(math.log(2500 if skim else 7000), 0.8))
        depth = min(1.0, rng.betavariate(4, 2.5))
        copy_p, regen_p, esc_p, more_p = 0.3, 0.06, 0.03, 0.2
        moves_per_s = rng.lognormvariate(math.log(1.3), 0.7)
    else:
        if rng.random() < 0.5:  # bounced
            stretches = 1 + (rng.random() < 0.2)
            dwell_med = 2500
        else:  # confused: re-reads in short stretches
            stretches = 1 + int(rng.random() * 4)
            dwell_med = 4000
        for _ in range(stretches):
            add("dwell", ms=rng.lognormvariate(math.log(dwell_med), 0.8))
        depth = min(1.0, rng.betavariate(2.5, 3))
        copy_p, regen_p, esc_p, more_p = 0.12, 0.18, 0.1, 0.25
        moves_per_s = rng.lognormvariate(math.log(2.0), 0.7)
    add("scroll", depth=round(depth, 3))
    duration_ms = max(500.0, sum(e["payload"].get("ms", 0) for e in events) * 1.3)
    add("mouse", moves=round(moves_per_s * duration_ms / 1000), ms=round(duration_ms))
    if rng.random() < more_p:
        add("click", kind="more-info")
    if rng.random() < copy_p:
        add("click", kind="copy")
        add("copy", chars=int(rng.uniform(20, 400)))
    if rng.random() < regen_p:
        add("click", kind="regenerate")
    if rng.random() < esc_p:
        add("click", kind="escalate")
    return events


def record_events(events: Iterable[dict[str, Any]], recorder: Recorder) -> int:
    """Queue telemetry event dicts (``simulate_events`` output, or a UI's) on ``recorder``.

    For demos and server-side producers that do not go through the HTTP service; in a process
    set up with ``fw.configure``, pass ``fw.get_recorder()``. Returns the number queued.
    """
    from flywheel_middleware.capture.records import TelemetryRecord

    n = 0
    for e in events:
        recorder.enqueue(
            TelemetryRecord(
                session_id=e.get("session_id"),
                rollout_id=e.get("rollout_id"),
                event_type=str(e["event_type"]),
                payload=e.get("payload"),
                client_ts=e.get("client_ts"),
            )
        )
        n += 1
    return n
