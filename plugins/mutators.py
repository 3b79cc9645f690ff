"""Built-in mutators: ``param`` (search the declared tunable space) and ``prompt_rewrite`` (APO).

``param`` proposes configs that differ from the base in one tunable (then two, then random
points of the space): numeric values on the declared grid (min + k·step, within [min, max]),
choices from the declared list. A config whose hash the workflow already had is never proposed
again, and the order is seeded, so a run is reproducible.

``prompt_rewrite`` asks an LLM (any OpenAI-compatible endpoint, or a LangChain chat model) to
rewrite a prompt template at a config path from the bad cases and the judges' reasons, the
first step the seeds recommend (APO before SFT before RL). A rewrite must keep exactly the
template's ``{placeholders}``; one that loses or adds any is discarded.

The loop's and the store's modules are imported when a mutator first proposes, so listing
plugins (``flywheel plugins``) loads neither.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
import string
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel_middleware.config import TunableRange
from flywheel_middleware.plugin_system.base import Candidate, Mutator, Sample
from flywheel_middleware.plugin_system.hookspecs import hookimpl
from flywheel_middleware.plugin_system.llm import ChatClient, LLMParams

log = logging.getLogger("flywheel_middleware.plugins.mutators")


# -- the tunable space --------------------------------------------------------------------


def space_values(spec: Any) -> list[Any]:
    """Every value a tunable may take: its choices, or its grid min, min+step, …, max."""
    if spec.choices is not None:
        return list(spec.choices)
    lo, hi = Decimal(str(spec.min)), Decimal(str(spec.max))
    if spec.step is None:
        # No step: ten equal steps, integers stay integers.
        step = (hi - lo) / 10 if hi > lo else Decimal(1)
        if float(spec.min).is_integer() and float(spec.max).is_integer():
            step = max(Decimal(1), step.to_integral_value())
    else:
        step = Decimal(str(spec.step))
    values = []
    k = 0
    while True:
        value = lo + step * k
        if value > hi:
            break
        values.append(value)
        k += 1
        if k > 10_000:
            break
    integral = all(v == v.to_integral_value() for v in values) and float(spec.min).is_integer()
    return [int(v) if integral else float(v) for v in values]


def in_space(value: Any, spec: Any) -> bool:
    """Whether ``value`` is one the tunable allows (a choice, or a grid point within bounds)."""
    if spec.choices is not None:
        return value in spec.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return any(abs(value - v) < 1e-9 for v in space_values(spec))


def _neighbours(current: Any, values: list[Any], spec: Any) -> list[Any]:
    """Adjacent grid points for a numeric tunable; every other choice for a choice list."""
    if spec.choices is not None:
        return [v for v in values if v != current]
    if isinstance(current, int | float) and not isinstance(current, bool):
        nearest = min(range(len(values)), key=lambda i: abs(values[i] - current))
        if abs(values[nearest] - current) > 1e-9:
            return [values[nearest]]  # off-grid base: snap onto the grid first
        return [values[i] for i in (nearest - 1, nearest + 1) if 0 <= i < len(values)]
    return list(values)


_MAX_COMBOS = 5000


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (True is not 1; 1 is 1.0)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _fmt(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class ParamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seeds the proposal order (runs are reproducible)")
    paths: list[str] | None = Field(None, description="only these tunables (default: all)")
    max_changes: int = Field(2, ge=1, le=5, description="most tunables changed in one candidate")


class ParamMutator(Mutator):
    """Neighbouring points of the declared tunable space, untried ones first."""

    type_name = "param"
    description = (
        "Explores the declared tunable space (bounds, steps, choices); never repeats a config"
    )
    Params = ParamParams

    def propose(
        self,
        base: dict[str, Any],
        *,
        workflow: str,
        tunable: dict[str, Any],
        bad_cases: list[Sample],
        tried: set[str],
        n: int,
    ) -> list[Candidate]:
        from flywheel_middleware.loop.versions import config_hash, config_hashes, get_path, set_path

        p: ParamParams = self.params
        tunable = {
            k: v if isinstance(v, TunableRange) else TunableRange.model_validate(v)
            for k, v in tunable.items()
        }
        paths = [k for k in tunable if p.paths is None or k in p.paths]
        if not paths or n <= 0:
            return []
        digest = hashlib.sha256(f"{p.seed}:{workflow}:{config_hash(base)}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        values = {k: space_values(tunable[k]) for k in paths}
        seen = set(tried) | config_hashes(base)
        out: list[Candidate] = []

        def offer(changes: list[tuple[str, Any]]) -> bool:
            config = base
            notes = []
            for path, value in changes:
                old = get_path(base, path, None)
                if _same(old, value):  # 1 and 1.0 are one value: keep the base's
                    continue
                config = set_path(config, path, value)
                notes.append(f"{path} {_fmt(old)} → {_fmt(value)}")
            hashes = config_hashes(config)
            if hashes & seen:
                return False
            seen.update(hashes)
            out.append(Candidate(config=config, note="param: " + ", ".join(notes)))
            return len(out) >= n

        # 1. one tunable moved to a neighbouring value
        singles = [
            (path, value)
            for path in paths
            for value in _neighbours(get_path(base, path, None), values[path], tunable[path])
        ]
        rng.shuffle(singles)
        for change in singles:
            if offer([change]):
                return out
        # 2. two (or more) tunables moved together
        for size in range(2, min(p.max_changes, len(paths)) + 1):
            if math.comb(len(singles), size) <= _MAX_COMBOS:
                combos = [
                    combo
                    for combo in itertools.combinations(singles, size)
                    if len({path for path, _ in combo}) == size
                ]
                rng.shuffle(combos)
            else:  # too many to list: a random sample of them
                combos = []
                for _ in range(_MAX_COMBOS):
                    combo = tuple(rng.sample(singles, size))
                    if len({path for path, _ in combo}) == size:
                        combos.append(combo)
            for combo in combos[:_MAX_COMBOS]:
                if offer(list(combo)):
                    return out
        # 3. random points anywhere in the space
        for _ in range(200 * n):
            point = [(path, rng.choice(values[path])) for path in paths]
            if offer(point):
                return out
        return out


# -- prompt rewriting ---------------------------------------------------------------------


def placeholders(template: str) -> set[str]:
    """The ``{field}`` names of a str.format template (``{{`` and ``}}`` are literals)."""
    names = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            names.add(re.split(r"[.\[!:]", field, maxsplit=1)[0])
    return names


class RewriteParams(LLMParams):
    path: str = Field(..., description="dotted config path of the prompt template to rewrite")
    temperature: float = Field(0.7, ge=0, le=2)
    max_bad_cases: int = Field(8, ge=1, le=100)
    attempts: int = Field(3, ge=1, le=10, description="tries per candidate before giving up")
    instructions: str = Field(
        "", description="extra guidance for the rewriter (tone, policies that must stay)"
    )


REWRITE_SYSTEM = (
    "You improve prompt templates for an AI assistant. You receive the current template and "
    "conversations where users were unhappy, with their ratings, comments and reviewers' "
    "reasons. Write an improved template that fixes the causes of these failures without "
    "breaking what works. Keep every {placeholder} exactly as written and add no new ones. "
    "Reply with the new template only, no explanation."
)


def _case_text(sample: Sample, index: int) -> str:
    from flywheel_middleware.store.outcomes import rollout_rating

    reasons = []
    rating = rollout_rating(sample.feedback or [])
    for fb in sample.feedback or []:
        if fb.comment:
            reasons.append(f"[{fb.source}] {fb.comment}")
    meta = (sample.rollout.metadata_ or {}) if sample.rollout is not None else {}
    for key in ("judge_reason", "filter_reason", "reason"):
        if isinstance(meta, dict) and meta.get(key):
            reasons.append(f"[judge] {meta[key]}")
    text = f"### Case {index}\nuser input: {_short(sample.prompt)}\nassistant output: {_short(sample.response)}"
    if rating is not None:
        text += f"\nrating: {rating:g}/5"
    if sample.rollout is not None and sample.rollout.error:
        text += f"\nerror: {_short(sample.rollout.error)}"
    if reasons:
        text += "\nwhy it was bad: " + " | ".join(reasons)
    return text


def _short(value: Any, width: int = 600) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _clean(reply: str) -> str:
    text = reply.strip()
    fence = re.match(r"^```[\w-]*\n(.*?)\n?```$", text, re.S)
    return (fence.group(1) if fence else text).strip()


class PromptRewriteMutator(Mutator):
    """An LLM rewrites a prompt template from the bad cases (APO-style), keeping placeholders."""

    type_name = "prompt_rewrite"
    description = "An LLM rewrites a prompt template from bad cases and judges' reasons"
    Params = RewriteParams

    def __init__(self, params: Any = None, context: Any = None, *, chat_model: Any = None) -> None:
        super().__init__(params, context)
        self._client: ChatClient | None = None
        self._chat_model = chat_model
        self.rejected: list[dict[str, Any]] = []

    @property
    def client(self) -> ChatClient:
        if self._client is None:
            self._client = ChatClient.from_params(self.params, chat_model=self._chat_model)
        return self._client

    def propose(
        self,
        base: dict[str, Any],
        *,
        workflow: str,
        tunable: dict[str, Any],
        bad_cases: list[Sample],
        tried: set[str],
        n: int,
    ) -> list[Candidate]:
        from flywheel_middleware.loop.versions import config_hashes, get_path, set_path

        p: RewriteParams = self.params
        template = get_path(base, p.path, None)
        if not isinstance(template, str):
            raise ValueError(
                f"prompt_rewrite: config path {p.path!r} of workflow {workflow!r} is not a string "
                f"prompt template (got {type(template).__name__})"
            )
        if not bad_cases:
            return []
        wanted = placeholders(template)
        cases = "\n\n".join(
            _case_text(s, i + 1) for i, s in enumerate(bad_cases[: p.max_bad_cases])
        )
        seen = set(tried) | config_hashes(base)
        out: list[Candidate] = []
        for attempt in range(n * p.attempts):
            if len(out) >= n:
                break
            user = (
                f"Current template (placeholders: {', '.join(sorted(wanted)) or 'none'}):\n"
                f"<<<\n{template}\n>>>\n\nBad cases:\n{cases}\n"
                + (f"\nGuidance: {p.instructions}\n" if p.instructions else "")
                + (
                    f"\nThis is attempt {attempt + 1}; propose a different rewrite."
                    if attempt
                    else ""
                )
            )
            reply = self.client.complete(
                [{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": user}],
                temperature=p.temperature,
            )
            rewritten = _clean(reply)
            try:
                got = placeholders(rewritten)
            except ValueError as exc:  # unbalanced braces
                self.rejected.append(
                    {"template": rewritten, "reason": f"not a valid template: {exc}"}
                )
                continue
            if got != wanted:
                lost, added = sorted(wanted - got), sorted(got - wanted)
                self.rejected.append(
                    {"template": rewritten, "reason": f"placeholders lost {lost} added {added}"}
                )
                log.info("prompt_rewrite: discarded a rewrite (lost %s, added %s)", lost, added)
                continue
            if not rewritten or rewritten == template:
                continue
            config = set_path(base, p.path, rewritten)
            hashes = config_hashes(config)
            if hashes & seen:
                continue
            seen.update(hashes)
            out.append(
                Candidate(
                    config=config,
                    note=f"prompt_rewrite: {p.path} rewritten from {min(len(bad_cases), p.max_bad_cases)} bad case(s)",
                )
            )
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@hookimpl
def register_mutators() -> list[type]:
    return [ParamMutator, PromptRewriteMutator]
