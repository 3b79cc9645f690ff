"""Builders shared by the plugin tests."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flywheel_middleware.plugin_system.base import Sample
from flywheel_middleware.store.models import Rollout


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


def record(
    fw: Any,
    question: Any,
    answer: Any,
    *,
    workflow: str = "qa",
    version: int | None = None,
    rating: float | None = None,
    thumbs: str | None = None,
    business: dict[str, float] | None = None,
    llm_messages: list[dict[str, Any]] | None = None,
    fail: bool = False,
    tool: bool = False,
) -> str:
    """One rollout through the public API (recorder and all); returns its id."""
    with fw.rollout(workflow, user_id="u1", input=question) as r:
        if version is not None:
            r.set_config({}, config_version_id=version)
        if tool:
            with fw.span("lookup", kind="tool") as s:
                s.set_output({"hits": 3})
        if llm_messages is not None:
            with fw.span("chat m", kind="llm") as s:
                s.set_input({"messages": llm_messages})
                s.set_output(answer)
        if fail:
            r.finish(error="boom")
        else:
            r.set_output(answer)
    if rating is not None:
        fw.feedback(r.id, rating=rating)
    if thumbs is not None:
        fw.feedback(r.id, thumbs=thumbs)
    for key, value in (business or {}).items():
        fw.feedback(r.id, key=key, value=value, source="business")
    return r.id
