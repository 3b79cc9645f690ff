"""The base classes plugins subclass, and the values they exchange with the core.

A plugin class declares ``type_name`` (its YAML ``type``), a pydantic ``Params`` model (its
``params``, validated with clear errors) and implements one method of its kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from flywheel_middleware.messages import answer_text, question_text

if TYPE_CHECKING:
    from flywheel_middleware.config import FlywheelConfig, TunableRange
    from flywheel_middleware.store.database import Store
    from flywheel_middleware.store.models import Feedback, Rollout, Span, TelemetryEvent


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PluginContext:
    """What a plugin may use: the whole configuration and the store."""

    config: FlywheelConfig
    store: Store | None = None


class Plugin:
    """Common shape: ``type_name``, ``Params``, constructed with validated params and a context."""

    kind: ClassVar[str] = "plugin"
    type_name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(
        self, params: BaseModel | None = None, context: PluginContext | None = None
    ) -> None:
        self.params = params if params is not None else self.Params()
        self.context = context
        self.name = self.type_name
        self.weight = 1.0  # the spec's ``weight`` (used when combining reward sources)

    def close(self) -> None:
        """Release clients or pools (called when a run ends)."""


@dataclass
class Sample:
    """A rollout with everything curation may look at."""

    rollout: Rollout
    spans: list[Span] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    telemetry: list[TelemetryEvent] = field(default_factory=list)
    reward: float | None = None

    @property
    def prompt(self) -> Any:
        return self.rollout.input

    @property
    def response(self) -> Any:
        return self.rollout.output

    @property
    def prompt_text(self) -> str:
        return as_text(self.rollout.input)

    @property
    def response_text(self) -> str:
        return as_text(self.rollout.output, answer=True)


def as_text(value: Any, *, answer: bool = False) -> str:
    """The readable text of a rollout input (its last user turn) or, with ``answer``, of an
    output (its final assistant text), read by the one message normalizer; a value it cannot
    read stays as it is (a string) or becomes compact JSON, so a judge never sees empty text.
    """
    if value is None:
        return ""
    text = answer_text(value) if answer else question_text(value)
    if text:
        return text
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


@dataclass
class Verdict:
    """A filter's judgement of one sample. ``label`` is good, bad or error."""

    keep: bool
    label: Literal["good", "bad", "error"] = "good"
    reason: str = ""


class Filter(Plugin):
    kind: ClassVar[str] = "filter"

    def filter(self, samples: list[Sample]) -> list[Verdict]:
        """One verdict per sample, in order (batched so a judge can run concurrently)."""
        raise NotImplementedError


class RewardSource(Plugin):
    kind: ClassVar[str] = "reward"
    # A source whose scores are also signals of their own (a judge, a rule, the implicit
    # model) names the Feedback source they are kept under; None keeps them in rewards only.
    feedback_source: ClassVar[str | None] = None

    def score(self, samples: list[Sample]) -> list[float | None]:
        """One reward in [0, 1] per sample, or None where this source has no opinion."""
        raise NotImplementedError


@dataclass
class Candidate:
    """A proposed config and why it was proposed."""

    config: dict[str, Any]
    note: str = ""


class Mutator(Plugin):
    kind: ClassVar[str] = "mutator"

    def propose(
        self,
        base: dict[str, Any],
        *,
        workflow: str,
        tunable: dict[str, TunableRange],
        bad_cases: list[Sample],
        tried: set[str],
        n: int,
    ) -> list[Candidate]:
        """Up to ``n`` new configs; ``tried`` holds hashes of configs already tried (skip them)."""
        raise NotImplementedError


@dataclass
class Decision:
    """A promoter's decision on a running experiment."""

    action: Literal["promote", "reject", "continue"]
    variant: str | None = None
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)


class Promoter(Plugin):
    kind: ClassVar[str] = "promoter"

    def decide(self, stats: Any) -> Decision:
        """Judge an experiment from its per-variant statistics (``experiments.ExperimentStats``)."""
        raise NotImplementedError


class Redactor(Plugin):
    """Selected under ``redactors:``; runs on the recorder's writer thread before a row is stored."""

    kind: ClassVar[str] = "redactor"

    def redact(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Edit ``row`` (its fields, plus ``table``) in place or return a new dict."""
        raise NotImplementedError


PLUGIN_KINDS: dict[str, type[Plugin]] = {
    "filter": Filter,
    "reward": RewardSource,
    "mutator": Mutator,
    "promoter": Promoter,
    "redactor": Redactor,
}
