"""The ``implicit`` reward source: how satisfied the user looked, from UI telemetry.

It scores each rollout's telemetry features (``flywheel_middleware.learn.implicit``) with the latest
stored satisfaction model (``flywheel implicit train``; the rollout's workflow's own model first,
then the shared one) when that model was trained on at least ``implicit.min_labels`` labels, and
with the documented fallback rule otherwise (copy is
positive; regenerate and escalate are negative; a real read is mildly positive, a bounce mildly
negative). A rollout without telemetry gets no opinion (None).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from flywheel_middleware.plugin_system.base import RewardSource, Sample
from flywheel_middleware.plugin_system.hookspecs import hookimpl

if TYPE_CHECKING:
    from flywheel_middleware.learn.implicit import Scorer

# ``flywheel_middleware.learn.implicit`` (and through it the store) is imported when a source
# first scores, so listing plugins (``flywheel plugins``) loads neither.


class ImplicitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_model: bool = Field(
        True, description="use the stored model when it is trained; False: always the rule"
    )
    model_version: int | None = Field(
        None, ge=1, description="pin a model version (default: the latest)"
    )
    min_labels: int | None = Field(None, ge=2, description="override implicit.min_labels")


class ImplicitReward(RewardSource):
    """Calibrated satisfaction probability from dwell, clicks, copies, scroll and mouse signals."""

    type_name = "implicit"
    feedback_source = "implicit"  # scores are also kept as Feedback(source="implicit")
    description = "satisfaction model over UI telemetry (rule fallback with too few labels)"
    Params = ImplicitParams

    def __init__(self, params: BaseModel | None = None, context: object | None = None) -> None:
        super().__init__(params, context)  # type: ignore[arg-type]
        self._scorers: dict[str | None, Scorer] = {}

    def scorer(self, workflow: str | None = None) -> Scorer:
        """The workflow's own model, else the shared one, else the rule (cached per workflow)."""
        if workflow not in self._scorers:
            from flywheel_middleware.learn.implicit import (
                MODEL_NAME,
                Scorer,
                load_model,
                model_name,
            )

            p = self.params
            ctx = self.context
            min_labels = p.min_labels or (ctx.config.implicit.min_labels if ctx is not None else 50)
            scorer = Scorer(None, min_labels)
            if p.use_model and ctx is not None and ctx.store is not None:
                names = [model_name(workflow), MODEL_NAME] if workflow else [MODEL_NAME]
                for name in names:
                    try:
                        candidate = Scorer(load_model(ctx.store, p.model_version, name), min_labels)
                    except Exception:  # a foreign or broken artifact: the rule still works
                        continue
                    if candidate.model is not None:
                        scorer = candidate
                        break
            self._scorers[workflow] = scorer
        return self._scorers[workflow]

    def score(self, samples: list[Sample]) -> list[float | None]:
        from flywheel_middleware.learn.implicit import Features, add_event

        out: list[float | None] = []
        for sample in samples:
            if not sample.telemetry:
                out.append(None)
                continue
            feats = Features()
            for event in sample.telemetry:
                payload = event.payload if isinstance(event.payload, dict) else {}
                add_event(feats, event.event_type, payload)
            out.append(self.scorer(sample.rollout.workflow).score(feats))
        return out


@hookimpl
def register_reward_sources() -> list[type]:
    return [ImplicitReward]
