"""The rules each exported format's consumer enforces, as checks that name the line.

``flywheel export KIND --check FILE`` runs them on a file; they follow the consumers'
published formats, so a file that passes can be uploaded or loaded as it is:

- ``sft``: OpenAI's chat fine-tuning JSONL (the checks of its data-format guide: only
  ``messages``/``tools``/``parallel_tool_calls`` at the top, known roles and keys, string
  contents, at least one assistant turn; and for tools, OpenAI's tool-call shape with JSON
  arguments, each call answered by a ``tool`` message with its id);
- ``preference``: OpenAI's preference fine-tuning JSONL (``input.messages``,
  ``preferred_output``, ``non_preferred_output``), or with ``trl`` TRL's conversational
  ``prompt``/``chosen``/``rejected``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "weight"})
SFT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
TRL_KEYS = frozenset({"prompt", "chosen", "rejected"})
FORMATS = ("sft", "preference", "trl")


@dataclass(frozen=True)
class Problem:
    """What is wrong with one line of a dataset file (line 1 is the first)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def check_file(path: str | Path, kind: str) -> list[Problem]:
    """Every problem of a JSONL file of ``kind`` (one of ``FORMATS``)."""
    with open(path, encoding="utf-8") as fh:
        return list(check_lines(fh, kind))


def check_lines(lines: Iterable[str], kind: str) -> Iterator[Problem]:
    if kind not in FORMATS:
        raise ValueError(f"no rules for {kind!r}: one of {', '.join(FORMATS)}")
    check = {"sft": _sft, "preference": _preference, "trl": _trl}[kind]
    seen = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            yield Problem(number, "empty line")
            continue
        seen += 1
        try:
            row = json.loads(text)
        except ValueError as exc:
            yield Problem(number, f"not JSON: {exc}")
            continue
        if not isinstance(row, dict):
            yield Problem(number, f"a row must be a JSON object, not {type(row).__name__}")
            continue
        for message in check(row):
            yield Problem(number, message)
    if not seen:
        yield Problem(0, "the file holds no rows")


def _sft(row: dict[str, Any]) -> Iterator[str]:
    yield from _only_keys(row, SFT_KEYS)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        yield "'messages' must be a non-empty list"
        return
    yield from _conversation(messages, "messages")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        yield "no assistant message: nothing to learn from"
    yield from _tools(row, messages)


def _preference(row: dict[str, Any]) -> Iterator[str]:
    yield from _only_keys(row, PREFERENCE_KEYS)
    given = row.get("input")
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
        yield "'input' must be an object with a 'messages' list"
    elif not given["messages"]:
        yield "'input.messages' is empty"
    else:
        yield from _conversation(given["messages"], "input.messages")
        if given["messages"][-1].get("role") == "assistant":
            yield "'input.messages' ends with an assistant turn: the outputs answer it"
    yield from _outputs(row, ("preferred_output", "non_preferred_output"))


def _trl(row: dict[str, Any]) -> Iterator[str]:
    yield from _only_keys(row, TRL_KEYS)
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        yield "'prompt' must be a non-empty list of messages"
    else:
        yield from _conversation(prompt, "prompt")
    yield from _outputs(row, ("chosen", "rejected"))


def _only_keys(row: dict[str, Any], allowed: frozenset[str]) -> Iterator[str]:
    extra = sorted(set(row) - allowed)
    if extra:
        yield f"top-level keys {extra} are not allowed (only {sorted(allowed)})"


def _outputs(row: dict[str, Any], keys: tuple[str, str]) -> Iterator[str]:
    texts = []
    for key in keys:
        output = row.get(key)
        if not isinstance(output, list) or not output:
            yield f"'{key}' must be a non-empty list of messages"
            continue
        yield from _conversation(output, key)
        if any(isinstance(m, dict) and m.get("role") != "assistant" for m in output):
            yield f"'{key}' must hold assistant messages only"
        texts.append(json.dumps(output, sort_keys=True))
    if len(texts) == 2 and texts[0] == texts[1]:
        yield f"'{keys[0]}' and '{keys[1]}' are the same answer"


def _conversation(messages: list[Any], where: str) -> Iterator[str]:
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            yield f"{at} is not an object"
            continue
        extra = sorted(set(message) - MESSAGE_KEYS)
        if extra:
            yield f"{at} has keys {extra} a fine-tuning message may not have"
        role = message.get("role")
        if role not in ROLES:
            yield f"{at} has role {role!r}, not one of {', '.join(ROLES)}"
        content = message.get("content")
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            if content is not None and not isinstance(content, str):
                yield f"{at}.content must be a string or null"
            yield from _tool_calls(calls, at)
        elif not isinstance(content, str) or not content.strip():
            yield f"{at}.content must be a non-empty string"
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            yield f"{at} is a tool message without a tool_call_id"


def _tool_calls(calls: Any, at: str) -> Iterator[str]:
    if not isinstance(calls, list):
        yield f"{at}.tool_calls must be a list"
        return
    for j, call in enumerate(calls):
        where = f"{at}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type") != "function" or not call.get("id"):
            yield f"{where} must be {{'id', 'type': 'function', 'function'}} (OpenAI's shape)"
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            yield f"{where}.function must name the function"
            continue
        arguments = function.get("arguments")
        try:
            json.loads(arguments)
        except (TypeError, ValueError):
            yield f"{where}.function.arguments must be a JSON string, got {arguments!r:.60}"


def _tools(row: dict[str, Any], messages: list[Any]) -> Iterator[str]:
    """Each tool call answered by a later tool message with its id, and declared in
    ``tools`` when the row has them."""
    asked: dict[str, str] = {}
    answered: set[str] = set()
    for message in messages:
        if not isinstance(message, dict):
            continue
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id"):
                asked[call["id"]] = ((call.get("function") or {}).get("name")) or ""
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in asked:
                yield f"a tool message answers {call_id!r}, which no earlier call asked"
            answered.add(call_id)
    for call_id in sorted(set(asked) - answered):
        yield f"tool call {call_id!r} is never answered by a tool message"
    tools = row.get("tools")
    if asked and tools is None:
        yield "the conversation calls tools but the row has no 'tools'"
    if tools is not None:
        if not isinstance(tools, list):
            yield "'tools' must be a list"
            return
        declared = {
            (t.get("function") or {}).get("name")
            for t in tools
            if isinstance(t, dict) and t.get("type") == "function"
        }
        for name in sorted(set(asked.values()) - declared):
            yield f"tool {name!r} is called but not declared in 'tools'"
