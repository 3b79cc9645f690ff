"""Small helpers the capture adapters share (cheap on the agent's thread by design)."""

from __future__ import annotations

from typing import Any

_ROLES = {"human": "user", "ai": "assistant", "AIMessageChunk": "assistant"}


def message_dict(message: Any) -> Any:
    """A LangChain message as a compact chat dict (role, content, tool calls, name).

    Reads the pydantic model's ``__dict__``: a missing attribute through pydantic's
    ``__getattr__`` costs microseconds.
    """
    fields = getattr(message, "__dict__", None)
    if not fields or "content" not in fields or "type" not in fields:
        return message
    kind = fields["type"]
    out: dict[str, Any] = {"role": _ROLES.get(kind, kind), "content": fields["content"]}
    name = fields.get("name")
    if name:
        out["name"] = name
    tool_calls = fields.get("tool_calls")
    if tool_calls:
        out["tool_calls"] = tool_calls
    tool_call_id = fields.get("tool_call_id")
    if tool_call_id:
        out["tool_call_id"] = tool_call_id
    return out


def messages_list(messages: Any) -> list[Any]:
    """Chat dicts for a list of LangChain messages: plain JSON the writer's C encoder takes
    as is (a pydantic object would send it down the slow per-field path)."""
    return [message_dict(m) for m in messages]


def compact(value: Any) -> Any:
    """A message, prompt value or list of messages as chat dicts; anything else unchanged."""
    if isinstance(value, (str, int, float, bool, dict)) or value is None:
        return value
    if isinstance(value, list):
        if value and hasattr(value[0], "content") and hasattr(value[0], "type"):
            return messages_list(value)
        return value
    if hasattr(value, "content") and hasattr(value, "type"):
        return message_dict(value)
    to_messages = getattr(value, "to_messages", None)  # ChatPromptValue / StringPromptValue
    if to_messages is not None and hasattr(value, "messages"):
        return {"messages": messages_list(value.messages)}
    return value
