"""AgentScope 2.x capture and per-request config: ``Agent(..., middlewares=[FlywheelMiddleware()])``.

Hooks (signatures from ``agentscope.middleware.MiddlewareBase``, agentscope 2.0.x):

- ``on_reply`` -> an ``agent`` span named after the agent, and a rollout when none is active
  (the agent's ``state.session_id`` becomes the rollout's session).
- ``on_model_call`` -> an ``llm`` span: model, parameters, messages, tools, output and usage,
  for streaming models (the span ends with the stream) and plain ones.
- ``on_acting`` -> a ``tool`` span per tool call.
- ``on_system_prompt`` and ``on_model_call`` also APPLY the rollout's resolved workflow config
  (``rollout.config``), so AgentScope agents take part in experiments:

  ``llm``: ``{model, temperature, max_tokens, top_p, reasoning_effort, ...}`` — ``model``
  renames the model; every other key that is a field of the model's ``Parameters`` class
  overrides it, on a copy of the model used for this call only (the agent's model is never
  changed). ``prompt``: ``{system: "..."}`` replaces the agent's own system prompt (skill and
  workspace instructions AgentScope appends are kept); ``{system_suffix: "..."}`` appends.
  Per agent: ``agents: {<agent name>: {llm: {...}, prompt: {...}}}`` overrides the above.

Like AgentScope's own TracingMiddleware, the reply/tool span is made current only while the
wrapped generator is advanced, never across a ``yield``, so closing the generator from another
task cannot corrupt the context. Nothing here raises into the agent.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from agentscope.middleware import MiddlewareBase

from flywheel_middleware.capture.handles import (
    RolloutHandle,
    SpanHandle,
    current_rollout,
    start_span,
)
from flywheel_middleware.capture.serialize import snapshot

log = logging.getLogger("flywheel_middleware.adapters.agentscope")

__all__ = ["FlywheelMiddleware", "config_for_agent"]

_NOT_ERRORS = (GeneratorExit,)


def config_for_agent(config: dict[str, Any], agent_name: str) -> tuple[dict, dict]:
    """The ``(llm, prompt)`` sections of a workflow config that apply to one agent."""
    llm = dict(config.get("llm") or {})
    prompt = dict(config.get("prompt") or {})
    per_agent = (config.get("agents") or {}).get(agent_name) or {}
    llm.update(per_agent.get("llm") or {})
    prompt.update(per_agent.get("prompt") or {})
    return llm, prompt


class FlywheelMiddleware(MiddlewareBase):
    """Record an AgentScope agent's replies, model calls and tool calls; apply the config.

    ``workflow`` names rollouts the middleware opens itself; ``apply_config=False`` records
    without changing prompts or parameters.
    """

    def __init__(
        self,
        workflow: str = "agentscope",
        *,
        user_id: str | None = None,
        apply_config: bool = True,
        capture_content: bool = True,
    ) -> None:
        self.workflow = workflow
        self.user_id = user_id
        self.apply_config = apply_config
        self.capture = capture_content

    # -- helpers -----------------------------------------------------------------------------

    def _open(
        self, name: str, kind: str, agent: Any, input: Any, model: str | None = None
    ) -> SpanHandle:
        """A span under the current flywheel span, or the root of a new rollout."""
        session = getattr(getattr(agent, "state", None), "session_id", None)
        return start_span(
            name,
            kind,
            workflow=self.workflow,
            input=input if self.capture else None,
            model=model,
            user_id=self.user_id,
            session_id=session,
            metadata={"agent": getattr(agent, "name", None)},
        )

    async def _drive(
        self,
        span: SpanHandle,
        gen: AsyncGenerator,
        on_item: Callable[[Any], None],
        finish: Callable[[SpanHandle, BaseException | None], None],
    ) -> AsyncGenerator:
        """Re-yield ``gen``'s items with ``span`` current only while advancing it."""
        error: BaseException | None = None
        try:
            while True:
                token = span.activate()
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    SpanHandle.deactivate(token)
                try:
                    on_item(item)
                except Exception:
                    log.exception("flywheel: could not record an AgentScope event")
                yield item
        except _NOT_ERRORS:  # the consumer stopped early: close what we drive, not an error
            try:
                await gen.aclose()
            except Exception:
                log.debug("flywheel: closing the wrapped AgentScope generator failed")
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                finish(span, error)
            except Exception:
                log.exception("flywheel: could not end an AgentScope span")

    # -- on_reply ----------------------------------------------------------------------------

    def on_reply(  # type: ignore[override]
        self, agent: Any, input_kwargs: dict, next_handler: Callable[..., AsyncGenerator]
    ) -> AsyncGenerator:
        """Returns the wrapped generator directly (AgentScope only iterates it): one layer less."""
        try:
            span = self._open(
                getattr(agent, "name", "agent"), "agent", agent, input_kwargs.get("inputs")
            )
        except Exception:
            log.exception("flywheel: on_reply could not start a span")
            return next_handler(**input_kwargs)
        from agentscope.message import Msg

        last: list[Any] = [None]

        def on_item(item: Any) -> None:
            if isinstance(item, Msg):
                last[0] = item

        def finish(s: SpanHandle, error: BaseException | None) -> None:
            msg = last[0]
            if msg is not None:
                usage = getattr(msg, "usage", None)
                if usage is not None:
                    s.set_attribute(
                        "reply_usage",
                        {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens},
                    )
            s.end(output=msg if self.capture else None, error=error)

        return self._drive(span, next_handler(**input_kwargs), on_item, finish)

    # -- on_system_prompt --------------------------------------------------------------------

    async def on_system_prompt(self, agent: Any, current_prompt: str) -> str:
        if not self.apply_config:
            return current_prompt
        try:
            rollout = current_rollout()
            if rollout is None:
                return current_prompt
            _, prompt = config_for_agent(rollout.config, getattr(agent, "name", ""))
            result = current_prompt
            system = prompt.get("system")
            if isinstance(system, str):
                own = getattr(agent, "_system_prompt", None)
                keep_tail = own and result.startswith(own)
                result = system + result[len(own) :] if keep_tail else system
            suffix = prompt.get("system_suffix")
            if isinstance(suffix, str) and suffix:
                result = f"{result}\n{suffix}"
            return result
        except Exception:
            log.exception("flywheel: could not apply the system prompt config")
            return current_prompt

    # -- on_model_call -----------------------------------------------------------------------

    def _configured_model(self, agent: Any, model: Any, rollout: RolloutHandle) -> Any:
        """A copy of ``model`` with the rollout's ``llm`` config applied, or ``model`` itself."""
        llm, _ = config_for_agent(rollout.config, getattr(agent, "name", ""))
        if not llm:
            return model
        params = getattr(model, "parameters", None)
        fields = getattr(type(params), "model_fields", {}) if params is not None else {}
        updates = {k: v for k, v in llm.items() if k in fields}
        name = llm.get("model")
        if not updates and (not name or name == model.model):
            return model
        new = copy.copy(model)
        if updates:
            current = params.model_dump()
            if all(current.get(k) == v for k, v in updates.items()):
                new.parameters = params
            else:
                new.parameters = type(params).model_validate({**current, **updates})
        if name:
            new.model = name
        return new

    async def on_model_call(
        self, agent: Any, input_kwargs: dict, next_handler: Callable[..., Any]
    ) -> Any:
        model = input_kwargs.get("current_model")
        overrides: dict[str, Any] = {}
        try:
            if self.apply_config:
                rollout = current_rollout()
                if rollout is not None and model is not None:
                    try:
                        configured = self._configured_model(agent, model, rollout)
                    except Exception as exc:  # a bad config must not break the agent
                        log.warning("flywheel: llm config not applied to %s: %s", agent, exc)
                        configured = model
                    if configured is not model:
                        overrides["current_model"] = configured
                        model = configured
            messages = input_kwargs.get("messages")
            span = self._open(
                f"chat {getattr(model, 'model', 'model')}",
                "llm",
                agent,
                _as_sent(messages) if self.capture else None,
                model=getattr(model, "model", None),
            )
            params = getattr(model, "parameters", None)
            if params is not None:
                span.set_attribute(
                    "invocation_params",
                    {k: v for k, v in params.model_dump().items() if v is not None},
                )
            tools = input_kwargs.get("tools")
            if tools and self.capture:
                span.set_attribute("tools", [_tool_name(t) for t in tools])
            if getattr(model, "stream", False):
                span.set_attribute("stream", True)
        except Exception:
            log.exception("flywheel: on_model_call could not start a span")
            return await next_handler(**overrides)
        try:
            result = await next_handler(**overrides)
        except BaseException as exc:
            _end_quietly(span, exc)
            raise
        try:
            if inspect.isasyncgen(result):
                return self._trace_stream(result, span)
            _record_response(span, result, self.capture)
            span.end()
        except Exception:
            log.exception("flywheel: could not record a model response")
        return result

    def _trace_stream(self, stream: AsyncGenerator, span: SpanHandle) -> AsyncGenerator:
        last: list[Any] = [None]
        first = [0]

        def on_item(chunk: Any) -> None:
            if not first[0] and getattr(chunk, "content", None):
                first[0] = time.time_ns()
            last[0] = chunk

        def finish(s: SpanHandle, error: BaseException | None) -> None:
            if first[0]:
                s.set_attribute("time_to_first_token_ms", (first[0] - s.started_ns) / 1e6)
            if last[0] is not None:
                _record_response(s, last[0], self.capture)
            s.end(error=error)

        return self._drive(span, stream, on_item, finish)

    # -- on_acting ---------------------------------------------------------------------------

    def on_acting(  # type: ignore[override]
        self, agent: Any, input_kwargs: dict, next_handler: Callable[..., AsyncGenerator]
    ) -> AsyncGenerator:
        """Like ``on_reply``, returns the wrapped generator directly."""
        try:
            call = input_kwargs.get("tool_call")
            name = getattr(call, "name", None) or "tool"
            raw = getattr(call, "input", None)
            try:
                args = json.loads(raw) if isinstance(raw, str) and raw else raw
            except ValueError:
                args = raw
            span = self._open(name, "tool", agent, args)
            call_id = getattr(call, "id", None)
            if call_id:
                span.set_attribute("tool_call_id", call_id)
        except Exception:
            log.exception("flywheel: on_acting could not start a span")
            return next_handler(**input_kwargs)
        last: list[Any] = [None]

        def on_item(item: Any) -> None:
            last[0] = item

        def finish(s: SpanHandle, error: BaseException | None) -> None:
            result = last[0]
            state = str(getattr(result, "state", "") or "")
            if error is None and state and state.lower().endswith(("error", "denied")):
                s.set_error(f"ToolError: {_text_of_blocks(getattr(result, 'content', None))}")
            s.end(output=getattr(result, "content", result) if self.capture else None, error=error)

        return self._drive(span, next_handler(**input_kwargs), on_item, finish)


def _as_sent(messages: Any) -> Any:
    """The messages as they are at the call: AgentScope goes on filling the reply ``Msg``
    of a turn (its blocks and their states) in place, so a reference recorded now would
    later read as a prompt that already holds the model's answer."""
    if not isinstance(messages, list | tuple):
        return messages
    copied = []
    for message in messages:
        dump = getattr(message, "model_dump", None)
        try:
            copied.append(dump() if callable(dump) else copy.deepcopy(message))
        except Exception:  # an odd message is recorded as it is, never breaks the call
            copied.append(message)
    return copied


def _tool_name(schema: Any) -> Any:
    if isinstance(schema, dict):
        fn = schema.get("function") or {}
        return fn.get("name") or schema.get("name") or schema
    return str(schema)


def _text_of_blocks(blocks: Any) -> str:
    if not blocks:
        return ""
    parts = []
    for block in blocks:
        text = getattr(block, "text", None)
        if text is None and isinstance(block, dict):
            text = block.get("text")
        if text:
            parts.append(text)
    return " ".join(parts)[:500]


def _record_response(span: SpanHandle, response: Any, capture: bool) -> None:
    usage = getattr(response, "usage", None)
    if usage is not None:
        span.set_usage(usage.input_tokens, usage.output_tokens)
    if capture:
        span.output = snapshot(getattr(response, "content", None))


def _end_quietly(span: SpanHandle, error: BaseException | None) -> None:
    try:
        span.end(error=error)
    except Exception:
        log.exception("flywheel: could not end span")
