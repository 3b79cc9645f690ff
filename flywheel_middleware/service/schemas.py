"""Request bodies of the ingestion API, validated strictly so bad input gets a 4xx that names the field.

Strict types on purpose: ``"12"`` is not a timestamp and ``1`` is not an event type; a silently
coerced value would be a wrong record, which is worse than a rejected one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from flywheel_middleware.tables import MAX_CLIENT_ID

ROLLOUT_ID = r"^[A-Za-z0-9_\-]{1,32}$"
EVENT_TYPE = r"^[A-Za-z0-9_.:\-]{1,50}$"
MAX_PAYLOAD_CHARS = 4_000
MAX_METADATA_CHARS = 8_000
MAX_COMMENT_CHARS = 10_000

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
RolloutId = Annotated[
    StrictStr, Field(pattern=ROLLOUT_ID, description="a rollout id (≤ 32 of [A-Za-z0-9_-])")
]
SessionId = Annotated[StrictStr, Field(min_length=1, max_length=200)]
ClientId = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=MAX_CLIENT_ID,
        description="your id for this record: sent again (a retry), it is stored once",
    ),
]


def _bounded_json(value: Any, limit: int, what: str) -> Any:
    if value is None:
        return value
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be plain JSON without NaN or Infinity ({exc})") from None
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters of JSON; the limit is {limit}")
    return value


class TelemetryEventIn(BaseModel):
    """One UI event. ``rollout_id`` ties it to the answer it is about; ``session_id`` to the visit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event_type: Annotated[
        StrictStr,
        Field(
            pattern=EVENT_TYPE,
            description="dwell, click, copy, scroll, mouse, regenerate, escalate, ...",
        ),
    ]
    rollout_id: RolloutId | None = None
    session_id: SessionId | None = None
    client_ts: Number | None = Field(None, description="client time, ms since the epoch")
    payload: dict[str, Any] | None = Field(None, description=f"≤ {MAX_PAYLOAD_CHARS} chars of JSON")
    id: ClientId | None = None

    @field_validator("payload")
    @classmethod
    def _payload_size(cls, value: Any) -> Any:
        return _bounded_json(value, MAX_PAYLOAD_CHARS, "payload")


class TelemetryBatchIn(BaseModel):
    """A batch: ``session_id`` / ``rollout_id`` here are defaults for events that omit them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[TelemetryEventIn]
    session_id: SessionId | None = None
    rollout_id: RolloutId | None = None
    sent_at: Number | None = None


class FeedbackIn(BaseModel):
    """Explicit feedback: exactly one of ``rating`` (1-5), ``thumbs``, ``key`` (+ ``value``), or a comment."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rollout_id: RolloutId
    rating: Number | None = Field(None, ge=1, le=5)
    thumbs: Literal["up", "down"] | StrictBool | None = None
    key: Annotated[StrictStr, Field(min_length=1, max_length=100)] | None = None
    value: Number | StrictBool | None = None
    comment: Annotated[StrictStr, Field(max_length=MAX_COMMENT_CHARS)] | None = None
    source: Literal["explicit", "implicit", "rule", "judge", "business"] = "explicit"
    span_id: Annotated[int, Field(strict=True, ge=0, lt=2**63)] | None = None
    user_id: Annotated[StrictStr, Field(max_length=200)] | None = None
    metadata: dict[str, Any] | None = None
    id: ClientId | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: Any) -> Any:
        return _bounded_json(value, MAX_METADATA_CHARS, "metadata")
