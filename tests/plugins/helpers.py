"""Builders shared by the plugin tests."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flywheel_middleware.models import Rollout
from flywheel_middleware.plugin_api import Sample


def sample(rid: str, question: Any, answer: Any, **kw: Any) -> Sample:
    rollout = Rollout(
        id=rid,
        workflow="qa",
        input=question,
        output=answer,
        started_at=datetime.now(timezone.utc),
        **kw,
    )
    return Sample(rollout=rollout)
