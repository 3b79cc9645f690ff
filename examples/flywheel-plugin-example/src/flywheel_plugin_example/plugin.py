"""Hook implementations found through the ``flywheel_middleware`` entry point."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel_middleware import hookimpl
from flywheel_middleware.plugin_system.base import Filter, RewardSource, Sample, Verdict


class MinLength(Filter):
    """Drops samples whose answer is shorter than ``min_chars`` characters."""

    type_name = "min_length"
    description = "drop answers shorter than min_chars"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_chars: int = Field(10, ge=0)

    def filter(self, samples: list[Sample]) -> list[Verdict]:
        out = []
        for sample in samples:
            n = len(sample.response_text)
            if n >= self.params.min_chars:
                out.append(Verdict(True, "good", f"{n} characters"))
            else:
                out.append(
                    Verdict(False, "bad", f"only {n} characters (< {self.params.min_chars})")
                )
        return out


class Keyword(RewardSource):
    """1.0 when the answer mentions one of the keywords, else 0.0."""

    type_name = "keyword"
    description = "reward answers that mention a keyword"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        keywords: list[str] = Field(min_length=1)

    def score(self, samples: list[Sample]) -> list[float | None]:
        words = [k.lower() for k in self.params.keywords]
        return [1.0 if any(w in s.response_text.lower() for w in words) else 0.0 for s in samples]


_PHONE = re.compile(r"\+?\d[\d -]{7,}\d")


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return _PHONE.sub("[phone]", value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


@hookimpl
def register_filters() -> list[type]:
    return [MinLength]


@hookimpl
def register_reward_sources() -> list[type]:
    return [Keyword]


@hookimpl
def redact_span(span: dict[str, Any]) -> dict[str, Any]:
    for key in ("input", "output"):
        if span.get(key) is not None:
            span[key] = _mask(span[key])
    return span
