"""Built-in reward sources: explicit_rating, rule, business_event, llm_judge.

Each turns what is known about a rollout into a reward in [0, 1], or ``None`` for "no opinion";
``flywheel_middleware.loop.rewards.compute_rewards`` combines them by weight.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from flywheel_middleware.errors import ConfigError
from flywheel_middleware.plugin_system.base import RewardSource, Sample, as_text
from flywheel_middleware.plugin_system.hookspecs import hookimpl
from flywheel_middleware.plugin_system.llm import ChatClient, LLMParams, import_object, run_sync


def clamp01(value: Any) -> float | None:
    """A number in [0, 1], or None for no opinion (None, NaN, non-numbers)."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number):
        return None
    return min(1.0, max(0.0, number))


# -- explicit_rating ---------------------------------------------------------------------------


class ExplicitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the feedback vocabulary of flywheel_middleware.store.outcomes (written out so that listing
    # plugins does not load the store; tests/loop/test_outcomes.py checks they agree)
    rating_key: str = "rating"
    thumbs_key: str = "thumbs"
    scale_min: float = 1
    scale_max: float = 5

    @model_validator(mode="after")
    def _scale(self) -> ExplicitParams:
        if self.scale_max <= self.scale_min:
            raise ValueError("scale_max must be greater than scale_min")
        return self


class ExplicitRating(RewardSource):
    """The users' explicit feedback as a graded reward; several signals on one rollout are averaged.

    Ratings 1–5 map to (r-1)/4 and thumbs to 1 (up) or 0 (down). Which feedback counts (source
    ``explicit``) and when a thumb is up are the rules of ``store.outcomes``; a reward of 0.75
    or more from ratings alone is a rating of 4 or more, a positive outcome.
    """

    type_name = "explicit_rating"
    description = "user ratings (1-5 -> 0..1) and thumbs (1/0)"
    Params = ExplicitParams

    def score(self, samples: list[Sample]) -> list[float | None]:
        from flywheel_middleware.store import outcomes

        p = self.params
        out: list[float | None] = []
        for sample in samples:
            values = []
            for fb in sample.feedback:
                if fb.source != outcomes.EXPLICIT_SOURCE or fb.value is None:
                    continue
                if fb.key == p.rating_key:
                    values.append((fb.value - p.scale_min) / (p.scale_max - p.scale_min))
                elif fb.key == p.thumbs_key:
                    values.append(1.0 if outcomes.thumbs_up(fb.value) else 0.0)
            out.append(clamp01(sum(values) / len(values)) if values else None)
        return out


# -- rule: a callable or a small safe expression ----------------------------------------------


class UnsafeExpression(ConfigError):
    """The expression uses something outside the small allowed language."""


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


def _regex(pattern: str, text: Any) -> bool:
    return re.search(pattern, "" if text is None else str(text)) is not None


SAFE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len,
    "any": any,
    "all": all,
    "min": min,
    "max": max,
    "sum": sum,
    "abs": abs,
    "round": round,
    "float": float,
    "int": int,
    "str": str,
    "bool": bool,
    "lower": lambda s: str(s).lower(),
    "contains": lambda a, b: b in a if a is not None else False,
    "regex": _regex,
    "json_valid": lambda s: _json_valid(s),
}
"""Functions an expression may call; nothing else is callable (no methods, no attributes)."""


def _json_valid(text: Any) -> bool:
    if not isinstance(text, str):
        return text is not None
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


MAX_EXPRESSION = 2000


class SafeExpression:
    """A tiny expression language over a sample, checked once by walking its AST.

    Allowed: literals, names of the sample's fields, ``and/or/not``, comparisons (incl. ``in``),
    arithmetic, ``x if c else y``, subscripts (``output["answer"]``), calls of SAFE_FUNCTIONS and
    generator expressions (``any(s["kind"] == "tool" for s in spans)``). No attributes, no
    lambdas, no imports: it cannot reach anything it was not given.
    """

    def __init__(self, source: str, names: set[str]) -> None:
        self.source = source
        if len(source) > MAX_EXPRESSION:
            raise UnsafeExpression(f"expression is longer than {MAX_EXPRESSION} characters")
        try:
            self.tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise UnsafeExpression(f"expression {source!r} is not valid: {exc.msg}") from None
        self._check(self.tree.body, set(names))

    def _check(self, node: ast.AST, names: set[str]) -> None:
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, ast.Name):
            if (
                node.id not in names
                and node.id not in SAFE_FUNCTIONS
                and node.id
                not in (
                    "None",
                    "True",
                    "False",
                )
            ):
                raise UnsafeExpression(
                    f"expression {self.source!r}: unknown name {node.id!r} "
                    f"(known: {', '.join(sorted(names))})"
                )
            return
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in SAFE_FUNCTIONS):
                raise UnsafeExpression(
                    f"expression {self.source!r}: only these functions may be called: "
                    f"{', '.join(sorted(SAFE_FUNCTIONS))}"
                )
            if node.keywords:
                raise UnsafeExpression(
                    f"expression {self.source!r}: keyword arguments are not allowed"
                )
            for arg in node.args:
                self._check(arg, names)
            return
        if isinstance(node, ast.GeneratorExp | ast.ListComp):
            inner = set(names)
            for comp in node.generators:
                self._check(comp.iter, inner)
                if not isinstance(comp.target, ast.Name) or comp.is_async:
                    raise UnsafeExpression(f"expression {self.source!r}: use 'for name in ...'")
                inner.add(comp.target.id)
                for cond in comp.ifs:
                    self._check(cond, inner)
            self._check(node.elt, inner)
            return
        allowed = (
            ast.BoolOp,
            ast.And,
            ast.Or,
            ast.UnaryOp,
            ast.Not,
            ast.USub,
            ast.UAdd,
            ast.BinOp,
            ast.Compare,
            ast.IfExp,
            ast.Subscript,
            ast.Slice,
            ast.List,
            ast.Tuple,
            ast.Dict,
            ast.Load,
            *_BINOPS,
            *_CMPOPS,
        )
        if not isinstance(node, allowed):
            raise UnsafeExpression(
                f"expression {self.source!r}: {type(node).__name__} is not allowed here"
            )
        for child in ast.iter_child_nodes(node):
            self._check(child, names)

    def __call__(self, env: dict[str, Any]) -> Any:
        return self._eval(self.tree.body, env)

    def _eval(self, node: ast.AST, env: dict[str, Any]) -> Any:  # noqa: C901 (one case per node)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in SAFE_FUNCTIONS:
                return SAFE_FUNCTIONS[node.id]
            return {"None": None, "True": True, "False": False}[node.id]
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for value in node.values:
                    result = self._eval(value, env)
                    if not result:
                        return result
                return result
            result = False
            for value in node.values:
                result = self._eval(value, env)
                if result:
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, env)
            if isinstance(node.op, ast.Not):
                return not operand
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, env), self._eval(node.right, env)
            if isinstance(node.op, ast.Mult) and (
                isinstance(left, str | list) or isinstance(right, str | list)
            ):
                raise UnsafeExpression(
                    f"expression {self.source!r}: no repetition of strings/lists"
                )
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._eval(comparator, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return (
                self._eval(node.body, env)
                if self._eval(node.test, env)
                else self._eval(node.orelse, env)
            )
        if isinstance(node, ast.Subscript):
            container = self._eval(node.value, env)
            if isinstance(node.slice, ast.Slice):
                s = node.slice
                return container[
                    slice(
                        self._eval(s.lower, env) if s.lower else None,
                        self._eval(s.upper, env) if s.upper else None,
                        self._eval(s.step, env) if s.step else None,
                    )
                ]
            key = self._eval(node.slice, env)
            if container is None:
                return None
            try:
                return container[key]
            except (KeyError, IndexError, TypeError):
                return None  # a missing field is "no value", not a crash
        if isinstance(node, ast.List | ast.Tuple):
            return [self._eval(e, env) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {
                self._eval(k, env): self._eval(v, env)
                for k, v in zip(node.keys, node.values, strict=True)
                if k is not None
            }
        if isinstance(node, ast.Call):
            fn = SAFE_FUNCTIONS[node.func.id]  # type: ignore[union-attr]
            return fn(*(self._eval(a, env) for a in node.args))
        if isinstance(node, ast.GeneratorExp | ast.ListComp):
            return list(self._comprehend(node, node.generators, env))
        raise UnsafeExpression(f"{type(node).__name__} is not allowed")  # pragma: no cover

    def _comprehend(self, node: Any, generators: list[ast.comprehension], env: dict) -> Any:
        if not generators:
            yield self._eval(node.elt, env)
            return
        first, rest = generators[0], generators[1:]
        for item in self._eval(first.iter, env) or ():
            inner = {**env, first.target.id: item}  # type: ignore[attr-defined]
            if all(self._eval(cond, inner) for cond in first.ifs):
                yield from self._comprehend(node, rest, inner)


EXPRESSION_NAMES = {
    "input",
    "output",
    "input_text",
    "output_text",
    "status",
    "error",
    "latency_ms",
    "total_tokens",
    "cost",
    "spans",
    "feedback",
    "workflow",
    "metadata",
}


def expression_env(sample: Sample) -> dict[str, Any]:
    """What an expression sees: the rollout's fields, its spans and feedback as plain dicts."""
    r = sample.rollout
    return {
        "input": r.input,
        "output": r.output,
        "input_text": as_text(r.input),
        "output_text": as_text(r.output),
        "status": r.status,
        "error": r.error,
        "latency_ms": r.latency_ms,
        "total_tokens": r.total_tokens,
        "cost": r.cost,
        "workflow": r.workflow,
        "metadata": r.metadata_ or {},
        "spans": [
            {
                "name": s.name,
                "kind": s.kind,
                "node": s.node,
                "status": s.status,
                "error": s.error,
                "duration_ms": s.duration_ms,
                "model": s.model,
                "input": s.input,
                "output": s.output,
                "attributes": s.attributes or {},
            }
            for s in sample.spans
        ],
        "feedback": [
            {"source": f.source, "key": f.key, "value": f.value, "comment": f.comment}
            for f in sample.feedback
        ],
    }


class RuleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str | None = Field(
        None, description="e.g. 'status == \"succeeded\" and len(output_text) > 20'"
    )
    callable: str | None = Field(
        None,
        validation_alias=AliasChoices("callable", "function"),
        description="dotted path 'pkg.mod:fn'; fn(sample) returns bool, a number or None",
    )
    when_true: float = Field(1.0, ge=0, le=1)
    when_false: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one(self) -> RuleParams:
        if (self.expression is None) == (self.callable is None):
            raise ValueError("give exactly one of expression or callable")
        return self


class Rule(RewardSource):
    """A predicate over output and spans: True -> when_true, False -> when_false, a number as is."""

    type_name = "rule"
    description = "a predicate over the output and spans (safe expression or a Python callable)"
    Params = RuleParams
    feedback_source = "rule"

    def __init__(self, params: Any = None, context: Any = None) -> None:
        super().__init__(params, context)
        if self.params.expression is not None:
            expr = SafeExpression(self.params.expression, EXPRESSION_NAMES)
            self.fn: Callable[[Sample], Any] = lambda s: expr(expression_env(s))
        else:
            fn = import_object(self.params.callable)
            if not callable(fn):
                raise ConfigError(f"callable {self.params.callable!r} is not callable")
            self.fn = fn

    def score(self, samples: list[Sample]) -> list[float | None]:
        out: list[float | None] = []
        for sample in samples:
            result = self.fn(sample)
            if isinstance(result, bool):
                out.append(self.params.when_true if result else self.params.when_false)
            else:
                out.append(clamp01(result))
        return out


# -- business_event ---------------------------------------------------------------------------


class BusinessParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[str, Literal["positive", "negative"]] = Field(
        default_factory=dict,
        description="business keys to use and their direction (empty: every key, as positive)",
    )


class BusinessEvent(RewardSource):
    """Feedback with source ``business`` (resolved, purchased, refunded...): mean of its values.

    A ``negative`` key counts as 1 - value (a refund of 1.0 is a reward of 0.0).
    """

    type_name = "business_event"
    description = "business outcomes recorded as feedback with source 'business'"
    Params = BusinessParams

    def score(self, samples: list[Sample]) -> list[float | None]:
        keys = self.params.keys
        out: list[float | None] = []
        for sample in samples:
            values = []
            for fb in sample.feedback:
                if fb.source != "business" or fb.value is None:
                    continue
                if keys and fb.key not in keys:
                    continue
                value = clamp01(fb.value)
                if value is None:
                    continue
                values.append(1.0 - value if keys.get(fb.key) == "negative" else value)
            out.append(sum(values) / len(values) if values else None)
        return out


# -- llm_judge ---------------------------------------------------------------------------------

JUDGE_PROMPT = """\
You grade an AI assistant's answer. {criteria}
Give a score from {low} (useless or wrong) to {high} (perfect).
Reply with exactly one JSON object: {{"score": <number>, "reason": "one short sentence"}}"""


class JudgeParams(LLMParams):
    criteria: str = "Is the answer correct, relevant, complete and safe, in the user's language?"
    scale: Literal["0-1", "1-10"] = "1-10"
    temperature: float = Field(0.0, ge=0, le=2)
    max_concurrency: int = Field(
        8, ge=1, le=256, validation_alias=AliasChoices("max_concurrency", "max_thread")
    )
    use_stored: bool = Field(
        True,
        description="reuse a judge score already stored for the rollout instead of asking again",
    )
    max_chars: int = Field(6000, ge=100)


_SCORE = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, scale: str) -> float | None:
    """The judge's score normalized to [0, 1]; None if there is none or it is out of range."""
    raw: Any = None
    match = re.search(r"\{.*\}", text or "", re.S)
    if match:
        try:
            data = json.loads(match.group(0))
            raw = data.get("score") if isinstance(data, dict) else None
        except ValueError:
            raw = None
    if raw is None:
        found = _SCORE.search(text or "")
        raw = found.group(0) if found else None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    low, high = (0.0, 1.0) if scale == "0-1" else (1.0, 10.0)
    if not low <= value <= high or math.isnan(value):
        return None
    return (value - low) / (high - low)


class LlmJudge(RewardSource):
    """An LLM scores each answer (0..1 or 1..10, normalized); a malformed answer is no opinion."""

    type_name = "llm_judge"
    description = "an LLM's score of the answer, normalized to 0..1"
    Params = JudgeParams
    feedback_source = "judge"

    def __init__(self, params: Any = None, context: Any = None, *, chat_model: Any = None) -> None:
        super().__init__(params, context)
        self.client = ChatClient.from_params(self.params, chat_model=chat_model)
        low, high = ("0", "1") if self.params.scale == "0-1" else ("1", "10")
        self.system_prompt = JUDGE_PROMPT.format(criteria=self.params.criteria, low=low, high=high)
        self.failures: list[str] = []

    def score(self, samples: list[Sample]) -> list[float | None]:
        return run_sync(self.ascore(samples))

    def _stored(self, sample: Sample) -> float | None:
        for fb in sample.feedback:
            if fb.source == "judge" and fb.key == self.name and fb.value is not None:
                return fb.value
        return None

    async def ascore(self, samples: list[Sample]) -> list[float | None]:
        semaphore = asyncio.Semaphore(self.params.max_concurrency)
        limit = self.params.max_chars

        async def one(sample: Sample) -> float | None:
            if self.params.use_stored:
                stored = self._stored(sample)
                if stored is not None:
                    return stored
            messages = [
                {"role": "system", "content": self.system_prompt},
                {
                    "role": "user",
                    "content": f"[QUESTION]\n{sample.prompt_text[:limit]}\n\n"
                    f"[ANSWER]\n{sample.response_text[:limit]}",
                },
            ]
            async with semaphore:
                try:
                    text = await self.client.acomplete(
                        messages, temperature=self.params.temperature
                    )
                except Exception as exc:
                    self.failures.append(f"{sample.rollout.id}: {exc}")
                    return None
            value = parse_score(text, self.params.scale)
            if value is None:
                self.failures.append(f"{sample.rollout.id}: malformed score {text[:100]!r}")
            return value

        return list(await asyncio.gather(*(one(s) for s in samples)))

    def close(self) -> None:
        self.client.close()


@hookimpl
def register_reward_sources() -> list[type]:
    return [ExplicitRating, Rule, BusinessEvent, LlmJudge]
