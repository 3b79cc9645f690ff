"""Built-in reward sources: explicit_rating, rule, business_event, llm_judge.

Each turns what is known about a rollout into a reward in [0, 1], or ``None`` for "no opinion";
``flywheel_middleware.loop.rewards.compute_rewards`` combines them by weight.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import math
import operator
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from flywheel_middleware.errors import ConfigError
from flywheel_middleware.plugin_system.base import RewardSource, Sample, as_text
from flywheel_middleware.plugin_system.hookspecs import hookimpl
from flywheel_middleware.plugin_system.llm import ChatClient, LLMParams, import_object, run_sync

log = logging.getLogger("flywheel_middleware.plugins.rewards")


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


class ExpressionLimit(UnsafeExpression):
    """One evaluation went past a limit (time, size, repetition, format width, regex time)."""


MAX_EXPRESSION = 2000  # characters of source
MAX_NESTING = 50  # depth of the expression's syntax tree
MAX_LOOPS = 3  # 'for' clauses nested in one another (each multiplies the work)
MAX_SIZE = 1_000_000  # items or characters of a string, bytes or list an expression builds
MAX_INT_BITS = 10_000  # of an integer product
MAX_FORMAT_WIDTH = 100  # width and precision of a %-format
MAX_PATTERN = 1_000  # characters of a regex pattern
TIME_LIMIT = 0.25  # default seconds one sample's evaluation may take

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
_SEQUENCE = (str, bytes, list)
# a %-format directive: its width and precision, either of which may be '*'
_FORMAT = re.compile(rb"%%|%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _regex_engine() -> Any:
    """The ``regex`` package: unlike ``re`` its searches take a timeout."""
    try:
        import regex
    except ImportError:
        raise UnsafeExpression(
            "regex() in an expression needs the 'regex' package: pip install regex"
        ) from None
    return regex


def _regex(pattern: str, text: Any, timeout: float = TIME_LIMIT) -> bool:
    pattern = str(pattern)
    if len(pattern) > MAX_PATTERN:
        raise ExpressionLimit(f"a regex pattern is longer than {MAX_PATTERN} characters")
    try:
        found = _regex_engine().search(pattern, "" if text is None else str(text), timeout=timeout)
    except TimeoutError:
        raise ExpressionLimit(f"regex {pattern[:60]!r} took longer than {timeout:.3g}s") from None
    return found is not None


def _sum(items: Any, start: Any = 0) -> Any:
    if isinstance(start, bool) or not isinstance(start, int | float):
        raise UnsafeExpression("sum() adds numbers: its start must be a number")
    return sum(items, start)


SAFE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len,
    "any": any,
    "all": all,
    "min": min,
    "max": max,
    "sum": _sum,
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


def _size(value: Any) -> int:
    return len(value) if isinstance(value, _SEQUENCE) else 0


def _check_format(fmt: str | bytes, args: Any) -> None:
    """A %-format may neither pad beyond MAX_FORMAT_WIDTH nor repeat a mapping's values."""
    if isinstance(args, dict):
        raise ExpressionLimit("%-formatting with a mapping is not allowed")
    raw = fmt.encode("utf-8", "surrogatepass") if isinstance(fmt, str) else fmt
    for m in _FORMAT.finditer(raw):
        for part in m.groups():
            if part == b"*" or (part is not None and int(part) > MAX_FORMAT_WIDTH):
                raise ExpressionLimit(
                    f"a %-format width or precision is '*' or above {MAX_FORMAT_WIDTH}"
                )


def _check_binop(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse, before computing it, an operation whose result would be out of bounds."""
    if isinstance(op, ast.Mult):
        seq, times = (left, right) if isinstance(left, _SEQUENCE) else (right, left)
        if isinstance(times, int) and _size(seq) * times > MAX_SIZE:
            raise ExpressionLimit(
                f"no repetition of strings, bytes or lists beyond {MAX_SIZE} items"
            )
        bits = sum(x.bit_length() for x in (left, right) if isinstance(x, int))
        if bits > MAX_INT_BITS:
            raise ExpressionLimit(f"an integer product beyond {MAX_INT_BITS} bits")
    elif isinstance(op, ast.Add) and _size(left) + _size(right) > MAX_SIZE:
        raise ExpressionLimit(f"a concatenation beyond {MAX_SIZE} items")
    elif isinstance(op, ast.Mod) and isinstance(left, str | bytes):
        _check_format(left, right)


class SafeExpression:
    """A tiny expression language over a sample, checked once by walking its AST.

    Allowed: literals, names of the sample's fields, ``and/or/not``, comparisons (incl. ``in``),
    arithmetic, ``x if c else y``, subscripts (``output["answer"]``), calls of SAFE_FUNCTIONS and
    generator expressions (``any(s["kind"] == "tool" for s in spans)``). No attributes, no
    lambdas, no imports: it cannot reach anything it was not given. Each evaluation is bounded
    in time (``time_limit``), in the size of what it builds and in regex time, and raises
    ExpressionLimit past a bound.
    """

    def __init__(self, source: str, names: set[str], time_limit: float = TIME_LIMIT) -> None:
        self.source = source
        self.time_limit = time_limit
        if len(source) > MAX_EXPRESSION:
            raise UnsafeExpression(f"expression is longer than {MAX_EXPRESSION} characters")
        try:
            self.tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise UnsafeExpression(f"expression {source!r} is not valid: {exc.msg}") from None
        except (RecursionError, MemoryError):
            raise UnsafeExpression(f"expression {source[:60]!r}… is nested too deeply") from None
        self._check(self.tree.body, set(names), 0, 0)

    def _check(self, node: ast.AST, names: set[str], depth: int, loops: int) -> None:
        if depth > MAX_NESTING:
            raise UnsafeExpression(
                f"expression {self.source[:60]!r}… nests deeper than {MAX_NESTING} levels"
            )
        depth += 1
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
            if node.func.id == "regex":
                _regex_engine()  # missing: say so now, not on every sample
            for arg in node.args:
                self._check(arg, names, depth, loops)
            return
        if isinstance(node, ast.GeneratorExp | ast.ListComp):
            loops += len(node.generators)
            if loops > MAX_LOOPS:
                raise UnsafeExpression(
                    f"expression {self.source!r}: more than {MAX_LOOPS} nested 'for' clauses"
                )
            inner = set(names)
            for comp in node.generators:
                self._check(comp.iter, inner, depth, loops)
                if not isinstance(comp.target, ast.Name) or comp.is_async:
                    raise UnsafeExpression(f"expression {self.source!r}: use 'for name in ...'")
                inner.add(comp.target.id)
                for cond in comp.ifs:
                    self._check(cond, inner, depth, loops)
            self._check(node.elt, inner, depth, loops)
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
            self._check(child, names, depth, loops)

    def __call__(self, env: dict[str, Any]) -> Any:
        return _Evaluation(self.source, time.monotonic() + self.time_limit).eval(
            self.tree.body, env
        )


class _Evaluation:
    """One evaluation of an expression, against its deadline."""

    def __init__(self, source: str, deadline: float) -> None:
        self.source = source
        self.deadline = deadline

    def _tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ExpressionLimit(f"expression {self.source[:60]!r} ran out of time")

    def eval(self, node: ast.AST, env: dict[str, Any]) -> Any:  # noqa: C901 (one case per node)
        self._tick()
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
                    result = self.eval(value, env)
                    if not result:
                        return result
                return result
            result = False
            for value in node.values:
                result = self.eval(value, env)
                if result:
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            operand = self.eval(node.operand, env)
            if isinstance(node.op, ast.Not):
                return not operand
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp):
            left, right = self.eval(node.left, env), self.eval(node.right, env)
            _check_binop(node.op, left, right)
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            left = self.eval(node.left, env)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.eval(comparator, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return (
                self.eval(node.body, env)
                if self.eval(node.test, env)
                else self.eval(node.orelse, env)
            )
        if isinstance(node, ast.Subscript):
            container = self.eval(node.value, env)
            if isinstance(node.slice, ast.Slice):
                s = node.slice
                return container[
                    slice(
                        self.eval(s.lower, env) if s.lower else None,
                        self.eval(s.upper, env) if s.upper else None,
                        self.eval(s.step, env) if s.step else None,
                    )
                ]
            key = self.eval(node.slice, env)
            if container is None:
                return None
            try:
                return container[key]
            except (KeyError, IndexError, TypeError):
                return None  # a missing field is "no value", not a crash
        if isinstance(node, ast.List | ast.Tuple):
            return [self.eval(e, env) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {
                self.eval(k, env): self.eval(v, env)
                for k, v in zip(node.keys, node.values, strict=True)
                if k is not None
            }
        if isinstance(node, ast.Call):
            name = node.func.id  # type: ignore[union-attr]
            args = [self.eval(a, env) for a in node.args]
            if name == "regex":  # the sample's remaining time bounds the search
                return _regex(*args, timeout=max(0.001, self.deadline - time.monotonic()))
            return SAFE_FUNCTIONS[name](*args)
        if isinstance(node, ast.GeneratorExp | ast.ListComp):
            out = []
            for item in self._comprehend(node, node.generators, env):
                out.append(item)
                if len(out) > MAX_SIZE:
                    raise ExpressionLimit(f"a comprehension of more than {MAX_SIZE} items")
            return out
        raise UnsafeExpression(f"{type(node).__name__} is not allowed")  # pragma: no cover

    def _comprehend(self, node: Any, generators: list[ast.comprehension], env: dict) -> Any:
        if not generators:
            yield self.eval(node.elt, env)
            return
        first, rest = generators[0], generators[1:]
        for item in self.eval(first.iter, env) or ():
            self._tick()
            inner = {**env, first.target.id: item}  # type: ignore[attr-defined]
            if all(self.eval(cond, inner) for cond in first.ifs):
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
        "output_text": as_text(r.output, answer=True),
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
    time_limit: float = Field(
        TIME_LIMIT, gt=0, le=10, description="seconds an expression may take on one sample"
    )

    @model_validator(mode="after")
    def _one(self) -> RuleParams:
        if (self.expression is None) == (self.callable is None):
            raise ValueError("give exactly one of expression or callable")
        return self


class Rule(RewardSource):
    """A predicate over output and spans: True -> when_true, False -> when_false, a number as is.

    An expression that fails or goes past a limit on one sample gives that sample no score
    (logged); the other samples keep theirs. A callable's exception fails the whole source.
    """

    type_name = "rule"
    description = "a predicate over the output and spans (safe expression or a Python callable)"
    Params = RuleParams
    feedback_source = "rule"

    def __init__(self, params: Any = None, context: Any = None) -> None:
        super().__init__(params, context)
        self.expression: SafeExpression | None = None
        if self.params.expression is not None:
            self.expression = SafeExpression(
                self.params.expression, EXPRESSION_NAMES, self.params.time_limit
            )
        else:
            fn = import_object(self.params.callable)
            if not callable(fn):
                raise ConfigError(f"callable {self.params.callable!r} is not callable")
            self.fn: Callable[[Sample], Any] = fn

    def _result(self, sample: Sample) -> Any:
        if self.expression is None:
            return self.fn(sample)
        return self.expression(expression_env(sample))

    def score(self, samples: list[Sample]) -> list[float | None]:
        out: list[float | None] = []
        notes: list[str] = []
        for sample in samples:
            try:
                result = self._result(sample)
            except Exception as exc:
                if self.expression is None:
                    raise
                notes.append(f"{sample.rollout.id}: {type(exc).__name__}: {exc}")
                out.append(None)
                continue
            if isinstance(result, bool):
                out.append(self.params.when_true if result else self.params.when_false)
            else:
                out.append(clamp01(result))
        if notes:
            log.warning(
                "reward %r: no score for %d of %d samples: %s",
                self.name,
                len(notes),
                len(samples),
                "; ".join(notes[:5]) + ("; …" if len(notes) > 5 else ""),
            )
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
