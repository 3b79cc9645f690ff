"""Built-in filters (llm_rubric, json_schema, dedupe) and the ``regex`` redactor.

Filters keep or drop samples before they enter a dataset, each verdict with a reason. The
rubric judge is the seeds' ``llm_evaluate``: an LLM reviewer answering GOOD or BAD, with the
team's own rubrics added, run concurrently under a hard limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from flywheel_middleware.errors import ConfigError
from flywheel_middleware.plugin_system.base import Filter, Redactor, Sample, Verdict
from flywheel_middleware.plugin_system.hookspecs import hookimpl
from flywheel_middleware.plugin_system.llm import ChatClient, LLMParams, run_sync

log = logging.getLogger("flywheel_middleware.plugins.filters")

DEFAULT_REVIEWER_PROMPT = """\
You are a strict reviewer of an AI assistant's answers. Decide whether the exchange below is a
GOOD example to learn from or a BAD one.

Judge it BAD if any of these holds:
1. The answer does not answer the question (refuses without reason, changes the subject, is empty
   or only says it cannot help).
2. The answer is wrong, or irrelevant to the question.
3. The answer contradicts itself.
4. The answer contains unsafe content (harmful instructions, hate, personal data, secrets).
5. The answer is in a different language from the question (unless the user asked for that).
{custom}
Otherwise judge it GOOD.

Reply with exactly one JSON object and nothing else:
{{"verdict": "GOOD" or "BAD", "reason": "one short sentence"}}"""

_CUSTOM_HEADER = "\nThe team's own rubrics (a violation makes the answer BAD):\n"


class RubricParams(LLMParams):
    """The judge's endpoint (from LLMParams) plus the seeds' llm_evaluate settings."""

    custom_rubrics: str = Field(
        "", description="extra rules, appended to the default reviewer prompt"
    )
    reviewer_prompt: str | None = Field(
        None, description="replace the default reviewer prompt ({custom} marks where rubrics go)"
    )
    temperature: float = Field(0.0, ge=0, le=2)
    max_concurrency: int = Field(
        8, ge=1, le=256, validation_alias=AliasChoices("max_concurrency", "max_thread")
    )
    print_reason: bool = False
    on_error: Literal["keep", "drop"] = Field(
        "drop", description="what to do with a sample the judge could not judge"
    )
    max_chars: int = Field(6000, ge=100, description="truncate query and answer to this length")
    remember: bool = Field(
        True,
        description="store GOOD/BAD verdicts as feedback (source judge) and reuse them while "
        "the prompt, rubrics and model stay the same, so a rollout is judged once",
    )


class LlmRubric(Filter):
    """An LLM judge: GOOD keeps, BAD drops, a malformed or failed judgement is an error verdict."""

    type_name = "llm_rubric"
    description = "LLM reviewer (GOOD/BAD with a reason) with custom rubrics"
    Params = RubricParams

    def __init__(self, params: Any = None, context: Any = None, *, chat_model: Any = None) -> None:
        super().__init__(params, context)
        self.client = ChatClient.from_params(self.params, chat_model=chat_model)
        custom = self.params.custom_rubrics.strip()
        template = self.params.reviewer_prompt or DEFAULT_REVIEWER_PROMPT
        try:
            self.system_prompt = template.format(custom=(_CUSTOM_HEADER + custom) if custom else "")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"reviewer_prompt: bad placeholder {exc} (only {{custom}} is allowed; "
                "write literal braces as {{ and }})"
            ) from None
        self.in_flight = 0
        self.max_in_flight = 0

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        limit = self.params.max_chars
        query = sample.prompt_text[:limit]
        answer = sample.response_text[:limit]
        user = f"[QUESTION]\n{query}\n\n[ANSWER]\n{answer}"
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": user},
        ]

    def filter(self, samples: list[Sample]) -> list[Verdict]:
        return run_sync(self.afilter(samples))

    async def afilter(self, samples: list[Sample]) -> list[Verdict]:
        """Judge every sample, at most ``max_concurrency`` requests at a time."""
        semaphore = asyncio.Semaphore(self.params.max_concurrency)

        async def one(sample: Sample) -> Verdict:
            async with semaphore:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    return await self.judge(sample)
                finally:
                    self.in_flight -= 1

        remembered = [self._remembered(s) for s in samples]
        todo = [s for s, v in zip(samples, remembered, strict=True) if v is None]
        fresh = iter(await asyncio.gather(*(one(s) for s in todo)))
        verdicts = [v if v is not None else next(fresh) for v in remembered]
        if self.params.remember:
            self._remember(
                [
                    (s, v)
                    for s, v, old in zip(samples, verdicts, remembered, strict=True)
                    if old is None
                ]
            )
        if self.params.print_reason:
            for sample, verdict in zip(samples, verdicts, strict=True):
                print(
                    f"[llm_rubric] {sample.rollout.id} {verdict.label.upper()}: {verdict.reason}",
                    file=sys.stderr,
                )
        return list(verdicts)

    @property
    def fingerprint(self) -> str:
        """What a stored verdict must match to be reused: the prompt and the model."""
        text = f"{self.system_prompt}\x1f{self.params.model}\x1f{self.params.max_chars}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _remembered(self, sample: Sample) -> Verdict | None:
        if not self.params.remember:
            return None
        for fb in reversed(sample.feedback):
            meta = fb.metadata_ or {}
            if (
                fb.source == "judge"
                and fb.key == self.name
                and fb.value is not None
                and meta.get("fingerprint") == self.fingerprint
            ):
                label = "good" if fb.value >= 0.5 else "bad"
                return Verdict(label == "good", label, fb.comment or "")  # type: ignore[arg-type]
        return None

    def _remember(self, judged: list[tuple[Sample, Verdict]]) -> None:
        """Write GOOD/BAD verdicts (never errors) as feedback rows, if a store is at hand."""
        store = self.context.store if self.context is not None else None
        rows = [
            {
                "rollout_id": s.rollout.id,
                "source": "judge",
                "key": self.name,
                "value": 1.0 if v.label == "good" else 0.0,
                "comment": v.reason[:2000],
                "created_at": datetime.now(timezone.utc),
                "metadata": {"fingerprint": self.fingerprint, "model": self.params.model},
            }
            for s, v in judged
            if v.label in ("good", "bad")
        ]
        if store is None or not rows:
            return
        from sqlalchemy import insert

        from flywheel_middleware.store.models import Feedback

        try:
            with store.engine.begin() as conn:
                conn.execute(insert(Feedback.__table__), rows)  # type: ignore[attr-defined]
        except Exception as exc:  # remembering is an optimization; never fail the filter
            log.warning("llm_rubric could not store its verdicts: %s", exc)

    async def judge(self, sample: Sample) -> Verdict:
        try:
            text = await self.client.acomplete(
                self.messages(sample), temperature=self.params.temperature
            )
        except Exception as exc:  # the endpoint failed after retries: an error verdict
            return self._error(f"judge request failed: {exc}")
        parsed = parse_judgement(text)
        if parsed is None:
            return self._error(f"malformed judge answer: {text[:200]!r}")
        label, reason = parsed
        return Verdict(keep=label == "good", label=label, reason=reason)

    def _error(self, reason: str) -> Verdict:
        return Verdict(keep=self.params.on_error == "keep", label="error", reason=reason)

    def close(self) -> None:
        self.client.close()


class LlmEvaluate(LlmRubric):
    """The seeds' name for the rubric judge (ASTune's ``llm_evaluate``)."""

    type_name = "llm_evaluate"
    description = "alias of llm_rubric (the name ASTune configs use)"


_VERDICT_WORD = re.compile(r"\b(GOOD|BAD)\b")


def parse_judgement(text: str) -> tuple[Literal["good", "bad"], str] | None:
    """('good'|'bad', reason) from a JSON object or a leading GOOD/BAD word; None if unclear."""
    if not isinstance(text, str):
        return None
    stripped = text.strip()
    match = re.search(r"\{.*\}", stripped, re.S)
    if match:
        try:
            data = json.loads(match.group(0))
        except ValueError:
            data = None
        if isinstance(data, dict):
            verdict = str(data.get("verdict", data.get("label", ""))).strip().upper()
            if verdict in ("GOOD", "BAD"):
                return verdict.lower(), str(data.get("reason", "")).strip()  # type: ignore[return-value]
            return None
    words = _VERDICT_WORD.findall(stripped.upper())
    if len(set(words)) != 1:
        return None  # no verdict, or both words: ambiguous
    head = re.match(r"^\W*(?:verdict\W*)?(GOOD|BAD)\b\W*(.*)$", stripped, re.S | re.I)
    if head is None:
        return None  # the word appears somewhere in prose; not a verdict we can trust
    return head.group(1).lower(), head.group(2).strip()  # type: ignore[return-value]


# -- json_schema -------------------------------------------------------------------------------


class JsonSchemaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="an inline JSON Schema"
    )
    schema_file: str | None = Field(None, description="or a path to a JSON Schema file")
    span: str | None = Field(
        None, description="validate this span's output instead of the rollout's"
    )
    parse_strings: bool = Field(True, description="a string output is parsed as JSON first")

    @field_validator("schema_file")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"schema file {value!r} does not exist")
        return value


class JsonSchema(Filter):
    """Keeps samples whose output (or a named span's output) validates against a JSON Schema."""

    type_name = "json_schema"
    description = "validate the output (or a span's) against a JSON Schema"
    Params = JsonSchemaParams

    def __init__(self, params: Any = None, context: Any = None) -> None:
        super().__init__(params, context)
        import jsonschema

        schema = self.params.schema_
        if self.params.schema_file:
            schema = json.loads(Path(self.params.schema_file).read_text(encoding="utf-8"))
        if schema is None:
            raise ConfigError("json_schema needs schema or schema_file")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"schema is not a valid JSON Schema: {exc.message}") from None
        self.validator = cls(schema)

    def _value(self, value: Any) -> tuple[Any, str | None]:
        if self.params.parse_strings and isinstance(value, str):
            try:
                return json.loads(value), None
            except ValueError:
                return None, "output is not valid JSON"
        return value, None

    def filter(self, samples: list[Sample]) -> list[Verdict]:
        out = []
        for sample in samples:
            if self.params.span:
                targets = [s.output for s in sample.spans if s.name == self.params.span]
                if not targets:
                    out.append(Verdict(False, "bad", f"no span named {self.params.span!r}"))
                    continue
            else:
                targets = [sample.rollout.output]
            problem = None
            for target in targets:
                value, problem = self._value(target)
                if problem is None:
                    error = next(iter(self.validator.iter_errors(value)), None)
                    if error is not None:
                        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                        problem = f"schema violation at {where}: {error.message}"
                if problem:
                    break
            out.append(
                Verdict(False, "bad", problem) if problem else Verdict(True, "good", "valid")
            )
        return out


# -- dedupe ------------------------------------------------------------------------------------


class DedupeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fields: list[Literal["input", "output"]] = Field(
        default_factory=lambda: ["input", "output"], min_length=1
    )
    normalize: bool = Field(False, description="ignore case and runs of whitespace")


class Dedupe(Filter):
    """Drops exact repeats (a SHA-256 of the chosen fields); the first occurrence is kept."""

    type_name = "dedupe"
    description = "drop exact duplicates by a content hash"
    Params = DedupeParams

    def __init__(self, params: Any = None, context: Any = None) -> None:
        super().__init__(params, context)
        self.seen: dict[str, str] = {}  # hash -> first rollout id (kept across batches of a run)

    def key(self, sample: Sample) -> str:
        parts = []
        for name in self.params.fields:
            value = sample.rollout.input if name == "input" else sample.rollout.output
            text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
            if self.params.normalize:
                text = " ".join(text.lower().split())
            parts.append(text)
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def filter(self, samples: list[Sample]) -> list[Verdict]:
        out = []
        for sample in samples:
            digest = self.key(sample)
            first = self.seen.setdefault(digest, sample.rollout.id)
            if first == sample.rollout.id:
                out.append(Verdict(True, "good", "first occurrence"))
            else:
                out.append(Verdict(False, "bad", f"duplicate of rollout {first}"))
        return out


# -- regex redactor ----------------------------------------------------------------------------

DEFAULT_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "api_key": r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}\b",
    "bearer": r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*",
    "card": r"\b(?:\d[ -]?){13,16}\b",
}


class RegexRedactorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patterns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    replacement: str = "[REDACTED:{name}]"
    fields: list[str] = Field(
        default_factory=lambda: ["input", "output", "attributes", "error", "comment"]
    )

    @field_validator("patterns")
    @classmethod
    def _compile(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {name!r} is not a valid regular expression: {exc}"
                ) from None
        return value


class RegexRedactor(Redactor):
    """Replaces e-mail addresses, API keys, bearer tokens and card numbers (or your patterns)."""

    type_name = "regex"
    description = "replace matches of regular expressions (PII, secrets) before storing"
    Params = RegexRedactorParams

    def __init__(self, params: Any = None, context: Any = None) -> None:
        super().__init__(params, context)
        self.compiled = [(n, re.compile(p)) for n, p in self.params.patterns.items()]

    def _text(self, text: str) -> str:
        for name, pattern in self.compiled:
            text = pattern.sub(self.params.replacement.format(name=name), text)
        return text

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, dict):
            return {k: self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v) for v in value]
        return value

    def redact(self, row: dict[str, Any]) -> dict[str, Any]:
        for name in self.params.fields:
            if row.get(name) is not None:
                row[name] = self._walk(row[name])
        return row


@hookimpl
def register_filters() -> list[type]:
    return [LlmRubric, LlmEvaluate, JsonSchema, Dedupe]


@hookimpl
def register_redactors() -> list[type]:
    return [RegexRedactor]
