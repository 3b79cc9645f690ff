"""LangChain / LangGraph capture: one callback handler turns every run into a flywheel span.

    chain.invoke(x, config={"callbacks": [FlywheelCallbackHandler(workflow="qa")]})

Parents come from LangChain's ``parent_run_id`` (not from contextvars, which LangChain does
not propagate into callbacks reliably), through a ``run_id -> SpanHandle`` dict, so one
handler instance is safe across ``batch``/``abatch``/``astream`` and parallel branches. A root
run attaches to the active ``fw.rollout`` if there is one, else opens its own rollout that
ends with it. The handler is synchronous and ``run_inline``: its work is a few dict operations
and a queue put, far cheaper than the thread-pool hop LangChain makes for non-inline handlers.
Every callback body is wrapped: a failure is logged, never raised into LangChain.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from flywheel_middleware.capture.handles import SpanHandle, current, start_span

from ._common import compact, message_dict, messages_list

log = logging.getLogger("flywheel_middleware.adapters.langchain")

__all__ = ["FlywheelCallbackHandler"]

_NODE_KEY = "langgraph_node"
# LangGraph's bookkeeping metadata: repeated on every run, useless in a span row.
_NOISE_METADATA = frozenset(
    {
        "langgraph_step",
        "langgraph_triggers",
        "langgraph_path",
        "langgraph_checkpoint_ns",
        "checkpoint_ns",
        "langgraph_node",
        "ls_provider",
        "ls_model_name",
        "ls_model_type",
        "ls_temperature",
        "ls_max_tokens",
        "ls_stop",
        "ls_integration",
        "lc_versions",
    }
)


def _run_name(serialized: dict[str, Any] | None, kwargs: dict[str, Any], default: str) -> str:
    name = kwargs.get("name")
    if name:
        return name
    if serialized:
        name = serialized.get("name")
        if name:
            return name
        ident = serialized.get("id")
        if ident:
            return str(ident[-1])
    return default


def _clean_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metadata or metadata.keys() <= _NOISE_METADATA:  # the common case: nothing to keep
        return None
    return {k: v for k, v in metadata.items() if k not in _NOISE_METADATA}


def _usage_from_llm_output(llm_output: dict[str, Any] | None) -> tuple[Any, Any]:
    if not llm_output:
        return None, None
    usage = llm_output.get("token_usage") or llm_output.get("usage")
    if not usage:
        return None, None
    return (
        usage.get("prompt_tokens", usage.get("input_tokens")),
        usage.get("completion_tokens", usage.get("output_tokens")),
    )


def _digest_result(response: Any) -> tuple[Any, Any, Any, str | None]:
    """(output, input tokens, output tokens, model) of an ``LLMResult`` in one pass.

    Usage comes from ``usage_metadata`` on the generated messages, else ``llm_output``; the
    model from ``llm_output``, else the messages' ``response_metadata``. Fields are read from
    the pydantic objects' ``__dict__`` (a missing attribute through pydantic costs µs).
    """
    llm_output = response.llm_output
    model = (llm_output.get("model_name") or llm_output.get("model")) if llm_output else None
    input_tokens = output_tokens = None
    outs = []
    for generations in response.generations or ():
        for gen in generations:
            message = gen.__dict__.get("message")
            if message is None:
                outs.append(gen.text)
                continue
            outs.append(message_dict(message))
            fields = message.__dict__
            usage = fields.get("usage_metadata")
            if usage:
                input_tokens = (input_tokens or 0) + (usage.get("input_tokens") or 0)
                output_tokens = (output_tokens or 0) + (usage.get("output_tokens") or 0)
            if model is None:
                meta = fields.get("response_metadata")
                if meta:
                    model = meta.get("model_name") or meta.get("model")
    if input_tokens is None and output_tokens is None:
        input_tokens, output_tokens = _usage_from_llm_output(llm_output)
    return (outs[0] if len(outs) == 1 else outs), input_tokens, output_tokens, model


def _never_raises(method: Callable[..., Any]) -> Callable[..., Any]:
    """A callback that fails logs it and returns: LangChain (the host agent) never sees it."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:
            log.exception("flywheel: %s failed", method.__name__)
            return None

    return wrapper


class FlywheelCallbackHandler(BaseCallbackHandler):
    """Record LangChain runs (chains, chat models, LLMs, tools, retrievers) as flywheel spans.

    ``workflow`` names the rollouts opened at root runs. ``user_id``/``session_id`` may also
    come per call from the run's metadata (``user_id``, ``session_id`` or LangGraph's
    ``thread_id``).
    """

    run_inline = True
    raise_error = False

    def __init__(
        self,
        workflow: str = "langchain",
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.workflow = workflow
        self.user_id = user_id
        self.session_id = session_id
        self.tags = tags
        self.metadata = metadata
        self._spans: dict[UUID, SpanHandle] = {}

    # -- the one place spans are opened and closed -----------------------------------------

    def _start(
        self,
        kind: str,
        name: str,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        input: Any,
        model: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Open the span of a run under its parent run, the current ``fw`` span, or as the
        root of a rollout of its own (see ``capture.handles``)."""
        node = None
        meta = None
        if metadata:
            node = metadata.get(_NODE_KEY)
            if node is not None and kind == "chain" and node == name:
                kind = "node"
            meta = _clean_metadata(metadata)
        if tags or meta:
            if attributes is None:
                attributes = {}
            if tags:
                attributes["tags"] = tags
            if meta:
                attributes["metadata"] = meta
        parent = self._spans.get(parent_run_id) if parent_run_id is not None else None
        if parent is None:
            parent = current()  # inside fw.rollout / fw.span: attach there
        # only a root run's span owns a rollout, and so takes the rollout's fields
        owned = self._rollout_fields(tags, metadata, meta) if parent is None else {}
        self._spans[run_id] = start_span(
            name,
            kind,
            parent=parent,
            workflow=self.workflow,
            node=node,
            input=input,
            model=model,
            attributes=attributes,
            **owned,
        )

    def _rollout_fields(
        self,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        meta: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """user_id, session_id, tags and metadata of the rollout a root run opens."""
        user_id = self.user_id
        session_id = self.session_id
        if metadata:
            user_id = metadata.get("user_id") or user_id
            session_id = metadata.get("session_id") or metadata.get("thread_id") or session_id
        return {
            "user_id": user_id,
            "session_id": session_id,
            "tags": (self.tags or []) + (tags or []) if (self.tags or tags) else None,
            "metadata": {**self.metadata, **(meta or {})} if self.metadata else meta,
        }

    def _end(self, run_id: UUID, output: Any = None, error: BaseException | None = None) -> None:
        span = self._spans.pop(run_id, None)
        if span is not None:
            span.end(output=output, error=error)

    # -- chains ------------------------------------------------------------------------------

    @_never_raises
    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = _run_name(serialized, kwargs, "chain")
        self._start("chain", name, run_id, parent_run_id, tags, metadata, compact(inputs))

    @_never_raises
    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, compact(outputs))

    @_never_raises
    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, error=error)

    # -- models ------------------------------------------------------------------------------

    def _model_start(
        self,
        serialized: dict[str, Any] | None,
        input: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        params = kwargs.get("invocation_params")
        model = metadata.get("ls_model_name") if metadata else None
        attributes = None
        if params:
            model = model or params.get("model") or params.get("model_name")
            attributes = {"invocation_params": params}
        name = _run_name(serialized, kwargs, "llm")
        self._start("llm", name, run_id, parent_run_id, tags, metadata, input, model, attributes)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:  # a hot path: no decorator level (see _never_raises)
            value = (
                messages_list(messages[0])
                if len(messages) == 1
                else [messages_list(m) for m in messages]
            )
            self._model_start(serialized, value, run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            log.exception("flywheel: on_chat_model_start failed")

    @_never_raises
    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        value = prompts[0] if len(prompts) == 1 else list(prompts)
        self._model_start(serialized, value, run_id, parent_run_id, tags, metadata, kwargs)

    @_never_raises
    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        span = self._spans.get(run_id)
        if span is not None and (
            span.attributes is None or "time_to_first_token_ms" not in span.attributes
        ):
            ttft = (time.time_ns() - span.started_ns) / 1e6
            span.set_attribute("time_to_first_token_ms", ttft)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:  # the hot path of a model called directly: no decorator level (see _never_raises)
            span = self._spans.pop(run_id, None)
            if span is None:
                return
            output, input_tokens, output_tokens, model = _digest_result(response)
            self._llm_end(span, output, input_tokens, output_tokens, model)
        except Exception:
            log.exception("flywheel: on_llm_end failed")

    def _llm_end(
        self, span: SpanHandle, output: Any, input_tokens: Any, output_tokens: Any, model: Any
    ) -> None:
        if input_tokens is not None or output_tokens is not None:
            span.set_usage(input_tokens, output_tokens)
        if model and not span.model:
            span.model = model
        elif model and model != span.model:
            span.set_attribute("response_model", model)
        span.output = output  # built here: no snapshot copy needed
        span.end()

    @_never_raises
    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, error=error)

    # -- tools and retrievers ----------------------------------------------------------------

    @_never_raises
    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = _run_name(serialized, kwargs, "tool")
        value = inputs if inputs is not None else input_str
        self._start("tool", name, run_id, parent_run_id, tags, metadata, value)

    @_never_raises
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, output)

    @_never_raises
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, error=error)

    @_never_raises
    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = _run_name(serialized, kwargs, "retriever")
        self._start("retriever", name, run_id, parent_run_id, tags, metadata, query)

    @_never_raises
    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, documents)

    @_never_raises
    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, error=error)

    # -- legacy agents -----------------------------------------------------------------------

    def _agent_event(self, run_id: UUID, key: str, value: Any) -> None:
        span = self._spans.get(run_id)
        if span is None:
            return
        if span.kind == "chain":
            span.kind = "agent"
        attrs = span.attributes if span.attributes is not None else {}
        attrs.setdefault(key, []).append(value)
        span.attributes = attrs

    @_never_raises
    def on_agent_action(self, action: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._agent_event(
            run_id,
            "agent_actions",
            {"tool": getattr(action, "tool", None), "tool_input": action.tool_input},
        )

    @_never_raises
    def on_agent_finish(self, finish: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._agent_event(run_id, "agent_finish", getattr(finish, "return_values", None))
