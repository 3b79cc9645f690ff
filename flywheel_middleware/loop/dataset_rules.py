"""The rules each exported format's consumer enforces, as checks that name the line.

``flywheel export KIND --check FILE`` runs them on a file; they follow the consumers'
published formats, so a file that passes can be uploaded or loaded as it is:

- ``sft``: OpenAI's chat fine-tuning JSONL. The checks of its data-format guide (every row a
  ``messages`` list; only ``messages``/``tools``/``parallel_tool_calls`` at the top; only
  known message keys; roles system, user, assistant, tool; non-empty string contents, a
  user's may be text and image parts; at least one assistant message to learn from,
  ``weight`` 0 or 1 on assistant messages) and for tools: OpenAI's tool-call shape with a
  JSON object as the ``arguments`` string, each call answered by a ``tool`` message with its
  id before the conversation goes on, every tool declared as ``{"type": "function",
  "function": {"name": ...}}``;
- ``preference``: OpenAI's preference fine-tuning JSONL (``input.messages``,
  ``preferred_output``, ``non_preferred_output``), or with ``trl`` TRL's conversational
  ``prompt``/``chosen``/``rejected``;
- ``tasks``: AgentJet's ``tasks.jsonl`` (its ``Task``: ``main_query``, ``init_messages``,
  ``task_id``, ``env_type``, ``metadata``), a task id once per file;
- ``triplets``: Agent Lightning's ``Triplet`` (``prompt``, ``response``, ``reward``,
  ``metadata``) with the flywheel's provenance keys beside them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "weight"})
SFT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
TRL_KEYS = frozenset({"prompt", "chosen", "rejected"})
TASK_KEYS = frozenset({"main_query", "init_messages", "task_id", "env_type", "metadata"})
TRIPLET_KEYS = frozenset({"prompt", "response", "reward", "metadata"})
FORMATS = ("sft", "preference", "trl", "tasks", "triplets")

# OpenAI's pattern for a function's name.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# OpenAI's deprecated function-calling keys, named as such rather than as unknown keys.
_LEGACY = {
    "functions": "'functions' is OpenAI's deprecated function-calling format: use 'tools'",
    "function_call": "'function_call' is OpenAI's deprecated format: use 'tool_calls'",
}


@dataclass(frozen=True)
class Problem:
    """What is wrong with one line of a dataset file (line 1 is the first)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def check_file(path: str | Path, kind: str) -> list[Problem]:
    """Every problem of a JSONL file of ``kind`` (one of ``FORMATS``)."""
    with open(path, "rb") as fh:
        return list(check_lines(fh, kind))


def check_lines(lines: Iterable[str | bytes], kind: str) -> Iterator[Problem]:
    """Every problem of ``lines`` (text, or bytes read as UTF-8 as the consumers read them)."""
    if kind not in FORMATS:
        raise ValueError(f"no rules for {kind!r}: one of {', '.join(FORMATS)}")
    check = _rules(kind)
    seen = 0
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError as exc:
            seen += 1
            yield Problem(
                number,
                f"not UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the "
                "line): the file must be saved as UTF-8",
            )
            continue
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
        for message in check(row, number):
            yield Problem(number, message)
    if not seen:
        yield Problem(0, "the file holds no rows")


def _rules(kind: str) -> Callable[[dict[str, Any], int], Iterator[str]]:
    """The checker of one file's rows (``tasks`` remembers the task ids it has seen)."""
    if kind == "tasks":
        return _TaskRules()
    per_row = {"sft": _sft, "preference": _preference, "trl": _trl, "triplets": _triplet}[kind]
    return lambda row, _line: per_row(row)


# -- OpenAI chat fine-tuning (sft) -------------------------------------------------------------


def _sft(row: dict[str, Any]) -> Iterator[str]:
    yield from _only_keys(row, SFT_KEYS, _LEGACY)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        yield "'messages' must be a non-empty list"
        return
    yield from _conversation(messages, "messages")
    assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not assistant:
        yield "no assistant message: nothing to learn from"
    elif all(m.get("weight") == 0 for m in assistant):
        yield "every assistant message has weight 0: nothing to learn from"
    yield from _answered(messages)
    yield from _tools(row, messages)


def _conversation(messages: list[Any], where: str) -> Iterator[str]:
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            yield f"{at} is not an object"
            continue
        for key in sorted(set(message) - MESSAGE_KEYS):
            yield f"{at}: {_LEGACY.get(key) or f'key {key!r} is not one a message may have'}"
        role = message.get("role")
        if role not in ROLES:
            yield f"{at} has role {role!r}, not one of {', '.join(ROLES)}"
        yield from _content(message, role, at)
        if "name" in message and not (isinstance(message["name"], str) and message["name"]):
            yield f"{at}.name must be a non-empty string"
        if "weight" in message:
            if role != "assistant":
                yield f"{at}.weight is only for assistant messages"
            elif message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                yield f"{at}.weight must be 0 or 1, not {message['weight']!r}"
        if "tool_calls" in message and role != "assistant":
            yield f"{at}: only assistant messages call tools"
        if role == "tool":
            if not (isinstance(message.get("tool_call_id"), str) and message["tool_call_id"]):
                yield f"{at} is a tool message without a tool_call_id"
        elif "tool_call_id" in message:
            yield f"{at}.tool_call_id belongs on tool messages only"


def _content(message: dict[str, Any], role: Any, at: str) -> Iterator[str]:
    """String content; for an assistant calling tools it may be null, for a user it may be
    a list of text and image parts (OpenAI's vision fine-tuning)."""
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls"):
        if content is not None and not isinstance(content, str):
            yield f"{at}.content must be a string or null"
        yield from _tool_calls(message["tool_calls"], at)
    elif role == "user" and isinstance(content, list):
        yield from _parts(content, f"{at}.content")
    elif not isinstance(content, str) or not content.strip():
        yield f"{at}.content must be a non-empty string"


def _parts(parts: list[Any], at: str) -> Iterator[str]:
    if not parts:
        yield f"{at} is an empty list"
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str) or not part["text"].strip():
                yield f"{at}[{k}] is a text part without text"
        elif kind == "image_url":
            image = part.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                yield f"{at}[{k}] is an image part without image_url.url"
        else:
            yield f"{at}[{k}] must be a text or image_url part"


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
        if not _FUNCTION_NAME.match(function["name"]):
            yield f"{where}.function.name {function['name']!r} is not [A-Za-z0-9_-]{{1,64}}"
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments, parse_constant=_not_json)
        except _NotJson as exc:
            yield (
                f"{where}.function.arguments holds {exc}, which is not JSON (RFC 8259): "
                "strict parsers such as OpenAI's reject it"
            )
            continue
        except (TypeError, ValueError):
            yield f"{where}.function.arguments must be a JSON string, got {arguments!r:.60}"
            continue
        if not isinstance(parsed, dict):
            yield f"{where}.function.arguments must encode a JSON object, got {arguments!r:.60}"


class _NotJson(ValueError):
    """A constant Python's json reads but JSON (RFC 8259) and strict parsers do not."""


def _not_json(constant: str) -> Any:
    raise _NotJson(constant)


def _answered(messages: list[Any]) -> Iterator[str]:
    """Each tool call answered by a ``tool`` message with its id, right after the call
    (before the conversation goes on), and each tool message answering a call."""
    asked: set[str] = set()
    waiting: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in asked:
                yield f"messages[{i}] answers {call_id!r}, which no earlier call asked"
            elif call_id in waiting:
                waiting.remove(call_id)
            continue
        if waiting:
            for call_id in waiting:
                yield f"tool call {call_id!r} is never answered before messages[{i}]"
            waiting = []
        for call in message.get("tool_calls") or ():
            call_id = call.get("id") if isinstance(call, dict) else None
            if not call_id:
                continue
            if call_id in asked:
                yield f"tool call id {call_id!r} is used twice"
            asked.add(call_id)
            waiting.append(call_id)
    for call_id in waiting:
        yield f"tool call {call_id!r} is never answered by a tool message"


def _tools(row: dict[str, Any], messages: list[Any]) -> Iterator[str]:
    """``tools`` as OpenAI's function definitions, declaring every tool the row calls."""
    called = {
        call["function"]["name"]
        for m in messages
        if isinstance(m, dict)
        for call in m.get("tool_calls") or ()
        if isinstance(call, dict)
        and isinstance(call.get("function"), dict)
        and isinstance(call["function"].get("name"), str)
    }
    if "parallel_tool_calls" in row and not isinstance(row["parallel_tool_calls"], bool):
        yield "'parallel_tool_calls' must be true or false"
    tools = row.get("tools")
    if tools is None:
        if called:
            yield "the conversation calls tools but the row has no 'tools'"
        return
    if not isinstance(tools, list):
        yield "'tools' must be a list"
        return
    declared: set[str] = set()
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            yield f"tools[{k}] must have type 'function'"
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            yield f"tools[{k}].function.name must be a name of [A-Za-z0-9_-]{{1,64}}"
            continue
        declared.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            yield f"tools[{k}].function.parameters must be a JSON schema object"
    for name in sorted(called - declared):
        yield f"tool {name!r} is called but not declared in 'tools'"


# -- preference pairs (OpenAI, TRL) ------------------------------------------------------------


def _preference(row: dict[str, Any]) -> Iterator[str]:
    yield from _only_keys(row, PREFERENCE_KEYS, _LEGACY)
    given = row.get("input")
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
        yield "'input' must be an object with a 'messages' list"
    elif not given["messages"]:
        yield "'input.messages' is empty"
    else:
        yield from _conversation(given["messages"], "input.messages")
        last = given["messages"][-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
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


def _only_keys(
    row: dict[str, Any], allowed: frozenset[str], named: dict[str, str] | None = None
) -> Iterator[str]:
    """Keys outside ``allowed`` (those in ``named`` with their own explanation)."""
    named = named or {}
    for key in sorted(set(row) & set(named)):
        yield named[key]
    extra = sorted(set(row) - allowed - set(named))
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


# -- AgentJet tasks ----------------------------------------------------------------------------


class _TaskRules:
    """AgentJet's ``Task`` per row; a task id already used on an earlier line is named."""

    def __init__(self) -> None:
        self.first_line: dict[str, int] = {}

    def __call__(self, row: dict[str, Any], line: int) -> Iterator[str]:
        yield from _only_keys(row, TASK_KEYS)
        for key, what in (
            ("main_query", "the question the agent is given"),
            ("task_id", "the task's unique id"),
            ("env_type", "the environment the task runs in"),
        ):
            if not _text(row.get(key)):
                yield f"'{key}' must be a non-empty string ({what})"
        task_id = row.get("task_id")
        if _text(task_id):
            first = self.first_line.setdefault(task_id, line)
            if first != line:
                yield f"task_id {task_id!r} is already the id of line {first}"
        init = row.get("init_messages", [])
        if not isinstance(init, list):
            yield "'init_messages' must be a list of messages"
        else:
            yield from _conversation(init, "init_messages")
        metadata = row.get("metadata")
        if not isinstance(metadata, dict):
            yield "'metadata' must be an object (the reference answer and provenance)"
            return
        if "answer" in metadata and not _text(metadata["answer"]):
            yield "'metadata.answer' must be a non-empty string"
        if "reward" in metadata:
            yield from _reward(metadata["reward"], "metadata.reward")
        if metadata.get("split", "train") not in ("train", "validation"):
            yield f"'metadata.split' must be train or validation, not {metadata['split']!r}"


# -- Agent Lightning triplets ------------------------------------------------------------------


def _triplet(row: dict[str, Any]) -> Iterator[str]:
    extra = sorted(set(row) - TRIPLET_KEYS)
    if extra:
        yield (
            f"keys {extra} are not fields of Agent Lightning's Triplet "
            f"({', '.join(sorted(TRIPLET_KEYS))}), which drops them: put them in 'metadata'"
        )
    for key in ("prompt", "response"):
        value = row.get(key)
        if value is None:
            yield f"'{key}' is missing"
        elif isinstance(value, str | list | dict) and not (
            value.strip() if isinstance(value, str) else value
        ):
            yield f"'{key}' is empty"
    yield from _reward(row.get("reward"), "reward")
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        yield "'metadata' must be an object"
    elif "rollout_id" in metadata and not _text(metadata["rollout_id"]):
        yield "'metadata.rollout_id' must be a non-empty string"


def _reward(value: Any, where: str) -> Iterator[str]:
    """A reward is a finite number, or null for a rollout not rated yet."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        yield f"'{where}' must be a number or null, not {value!r}"


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
