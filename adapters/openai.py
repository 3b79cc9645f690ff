"""OpenAI SDK capture: ``wrap_openai(client)`` records every model call as an ``llm`` span.

    client = wrap_openai(OpenAI(), workflow="qa")
    client.chat.completions.create(model=..., messages=..., flywheel={"user_id": "u1"})

Covers, on ``OpenAI`` and ``AsyncOpenAI``: ``chat.completions.create`` (plain and
``stream=True``), ``chat.completions.parse`` and ``.stream`` (also under ``beta.chat``),
``responses.create`` (plain and streaming), ``responses.parse`` and ``.stream``, and
``embeddings.create``. The client is instrumented in place (its resource objects get wrapping
methods) and returned; clients derived from it with ``with_options(...)`` / ``copy(...)`` are
instrumented the same way.

Flywheel's own keyword arguments are removed before the call: ``flywheel={...}`` (keys
``workflow``, ``user_id``, ``session_id``, ``tags``, ``metadata``, ``name``) or the
shorthands ``user_id=`` / ``session_id=``. Errors are recorded and re-raised unchanged;
``with_raw_response`` and ``with_streaming_response`` calls pass through untraced.

Only the SDK's public surface is used: its resource methods, ``openai.Stream`` /
``AsyncStream`` iteration, ``with`` and ``close()``, the ``.stream()`` managers' ``with``, and
the chunk models' fields. Chat streams get ``stream_options.include_usage`` when the caller
did not ask for it (``stream_usage=False`` turns that off); what the caller then sees:

* The same chunks, in the same number, as from an unwrapped client: the usage-only chunk this
  adds (no choices) is recorded and not passed on. Every other chunk the SDK builds from the
  server's ``"usage": null``; the wrapper takes ``usage`` off its ``model_fields_set``, so
  ``chunk.usage`` (None), ``model_fields_set``, ``model_dump()``, ``to_dict()``,
  ``to_json()`` and ``==`` are the unwrapped client's. The chunk objects are the SDK's own.
* What does differ, and is the request's own doing: ``stream.response.request`` shows the
  ``stream_options`` sent, and the SDK parses the one extra (usage-only) event.
* The stream is an instance of a subclass of the SDK's stream class holding the SDK's stream:
  iteration, ``with``, ``close()`` / ``aclose()`` and public attributes (``response``) behave
  as the SDK's; its private state (``_iterator``, ``_client``, ...) is reached through it
  rather than held by it, so ``vars(stream)`` differs.

One request is one span. The SDK's ``.stream()`` helpers make their request through the
resource's ``create`` (the wrapped one), so that call records the span; the helper's context
manager only hands it flywheel's arguments and ends it when the ``with`` block is left.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from flywheel_middleware.capture.handles import SpanHandle, start_span

log = logging.getLogger("flywheel_middleware.adapters.openai")
_time_ns = time.time_ns

__all__ = ["wrap_openai"]

_RAW_HEADER = "X-Stainless-Raw-Response"
_HELPER_HEADER = "X-Stainless-Helper-Method"
_PARAMS = frozenset(
    (
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "stop",
        "n",
        "reasoning_effort",
        "reasoning",
        "tool_choice",
        "tools",  # the schemas a fine-tuning export declares beside the calls
        "parallel_tool_calls",
        "response_format",
        "text",
        "text_format",
        "dimensions",
    )
)
# (attribute path from the client, endpoint, methods to wrap)
_RESOURCES = (
    (("chat", "completions"), "chat", ("create", "parse", "stream")),
    (("beta", "chat", "completions"), "chat", ("create", "parse", "stream")),
    (("responses",), "responses", ("create", "parse", "stream")),
    (("embeddings",), "embeddings", ("create",)),
)


def _absent_types() -> frozenset[type]:
    """The SDK's "argument not given" sentinels (helpers pass every parameter, most unset)."""
    try:
        import openai

        return frozenset(
            t for t in (getattr(openai, "Omit", None), getattr(openai, "NotGiven", None)) if t
        )
    except ImportError:  # pragma: no cover - openai is what is being wrapped
        return frozenset()


_ABSENT = _absent_types()


def wrap_openai(
    client: Any,
    workflow: str = "openai",
    *,
    capture_content: bool = True,
    apply_config: bool = False,
    stream_usage: bool = True,
) -> Any:
    """Instrument an ``OpenAI``/``AsyncOpenAI`` client in place and return it.

    ``workflow`` names the rollout opened for a call made outside any ``fw.rollout``.
    ``capture_content=False`` keeps prompts and answers out of the store (usage still kept).
    ``stream_usage=False`` sends a chat stream's request exactly as the caller wrote it: no
    ``stream_options.include_usage`` is added, which saves the server's extra usage event
    (on a fast loopback server about as much as the rest of the wrapper costs), and a stream
    then records token counts only where the caller asked for them.
    ``apply_config=True`` makes each chat/responses call use the rollout's resolved workflow
    config, overriding the caller's values (so the call takes part in experiments):
    ``llm.{model, temperature, top_p, max_tokens, seed, ...}`` and ``prompt.system`` (replaces
    the first system message / ``instructions``) or ``prompt.system_suffix`` (appended).
    """
    if getattr(client, "_flywheel_wrapped", False):
        return client
    _instrument(client, _Options(workflow, capture_content, apply_config, stream_usage))
    return client


class _Options:
    __slots__ = ("workflow", "capture", "apply_config", "stream_usage")

    def __init__(
        self, workflow: str, capture: bool, apply_config: bool = False, stream_usage: bool = True
    ) -> None:
        self.workflow = workflow
        self.capture = capture
        self.apply_config = apply_config
        self.stream_usage = stream_usage


def _instrument(client: Any, opts: _Options) -> None:
    is_async = _is_async_client(client)
    wrapper = _async_wrapper if is_async else _sync_wrapper
    for path, endpoint, methods in _RESOURCES:
        resource: Any = client
        try:
            for attr in path:
                resource = getattr(resource, attr)
        except AttributeError:  # an SDK without this resource
            continue
        for method in methods:
            original = getattr(resource, method, None)
            if original is None or hasattr(original, "_flywheel_original"):
                continue
            if method == "stream":
                traced = _stream_helper(original)
            else:
                traced = wrapper(original, endpoint, opts, "parse" if method == "parse" else None)
            setattr(resource, method, traced)
    for method in ("copy", "with_options"):
        original = getattr(client, method, None)
        if original is not None and not hasattr(original, "_flywheel_original"):
            setattr(client, method, _copy_wrapper(original, opts))
    client._flywheel_wrapped = True


def _copy_wrapper(original: Any, opts: _Options) -> Any:
    """``with_options()`` / ``copy()`` build a new client: instrument it with the same options."""

    @functools.wraps(original)
    def copy(*args: Any, **kwargs: Any) -> Any:
        new = original(*args, **kwargs)
        try:
            if not getattr(new, "_flywheel_wrapped", False):
                _instrument(new, opts)
        except Exception:
            log.exception("flywheel: could not instrument a derived OpenAI client")
        return new

    copy._flywheel_original = original  # type: ignore[attr-defined]
    return copy


_CONFIG_PARAMS = (
    "model",
    "temperature",
    "top_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "reasoning_effort",
)


def _given(kwargs: dict[str, Any], key: str) -> Any:
    """``kwargs[key]``, or None when missing or the SDK's not-given sentinel."""
    value = kwargs.get(key)
    return None if value.__class__ in _ABSENT else value


def _apply_config(endpoint: str, kwargs: dict[str, Any], config: dict[str, Any]) -> None:
    """Override request parameters and the system prompt from a workflow config, in place on
    the wrapper's own kwargs (the caller's message list and dicts are copied, never changed)."""
    llm = config.get("llm") or {}
    for key in _CONFIG_PARAMS:
        if key in llm:
            kwargs[key] = llm[key]
    if "max_tokens" in llm:
        if endpoint == "responses":
            kwargs["max_output_tokens"] = llm["max_tokens"]
        elif _given(kwargs, "max_completion_tokens") is not None:
            kwargs["max_completion_tokens"] = llm["max_tokens"]
        else:
            kwargs["max_tokens"] = llm["max_tokens"]
    prompt = config.get("prompt") or {}
    system, suffix = prompt.get("system"), prompt.get("system_suffix")
    if not isinstance(system, str) and not isinstance(suffix, str):
        return
    if endpoint == "responses":
        text = system if isinstance(system, str) else (_given(kwargs, "instructions") or "")
        if isinstance(suffix, str) and suffix:
            text = f"{text}\n{suffix}" if text else suffix
        kwargs["instructions"] = text
        return
    messages = list(kwargs.get("messages") or [])
    index = next(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "system"),
        None,
    )
    current = messages[index].get("content") if index is not None else None
    text = system if isinstance(system, str) else (current if isinstance(current, str) else "")
    if isinstance(suffix, str) and suffix:
        text = f"{text}\n{suffix}" if text else suffix
    if index is None:
        messages.insert(0, {"role": "system", "content": text})
    else:
        messages[index] = {**messages[index], "content": text}
    kwargs["messages"] = messages


def _is_async_client(client: Any) -> bool:
    try:
        import openai

        return isinstance(client, openai.AsyncOpenAI)
    except ImportError:  # pragma: no cover - openai is what is being wrapped
        return False


# -- request side -----------------------------------------------------------------------------


class _Helper:
    """One ``.stream()`` helper call: flywheel's arguments for the request it makes, and the
    stream that request returned (so leaving the helper's ``with`` ends the span)."""

    __slots__ = ("own", "stream")

    def __init__(self, own: dict[str, Any] | None) -> None:
        self.own = own
        self.stream: _TracedBase | None = None


def _mark_class() -> Any:
    """A header value that carries a ``_Helper`` from ``.stream()`` to the ``create`` the SDK
    calls with the same ``extra_headers``. It is an ``openai.Omit``, so the SDK never sends
    it (the wrapped ``create`` removes it anyway)."""
    try:
        import openai

        class _Mark(openai.Omit):  # type: ignore[misc, name-defined]
            __slots__ = ("helper",)

            def __init__(self, helper: _Helper) -> None:
                self.helper = helper

        return _Mark
    except Exception:  # pragma: no cover - an SDK without Omit: helpers still traced by create
        return None


_Mark = _mark_class()
_MARK_HEADER = "X-Flywheel-Helper"


class _Call:
    """What the wrapper learned from the request, and whether it changed stream_options."""

    __slots__ = ("span", "added_usage", "endpoint", "stream", "helper")

    def __init__(
        self,
        span: SpanHandle,
        added_usage: bool,
        endpoint: str,
        stream: bool,
        helper: _Helper | None,
    ) -> None:
        self.span = span
        self.added_usage = added_usage
        self.endpoint = endpoint
        self.stream = stream
        self.helper = helper


def _own_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove flywheel's keyword arguments from the call (``kwargs`` is the wrapper's own dict)."""
    own: dict[str, Any] = {}
    fly = kwargs.pop("flywheel", None)
    if fly:
        own.update(fly)
    for key in ("user_id", "session_id"):
        if key in kwargs:
            own[key] = kwargs.pop(key)
    return own


def _prepare(
    endpoint: str, kwargs: dict[str, Any], opts: _Options, helper: str | None
) -> _Call | None:
    """Everything before the request; None means: make it untraced (``kwargs`` is cleaned)."""
    headers = kwargs.get("extra_headers")
    pending = None
    if headers:  # only SDK helpers and callers that set headers pay for these checks
        if _RAW_HEADER in headers:
            _own_kwargs(kwargs)
            return None
        if helper is None:
            mark = headers.get(_MARK_HEADER)
            if mark is not None:  # the request of a wrapped .stream() helper
                pending, helper = getattr(mark, "helper", None), "stream"
                kwargs["extra_headers"] = {k: v for k, v in headers.items() if v is not mark}
            else:
                method = headers.get(_HELPER_HEADER)
                helper = method.rsplit(".", 1)[-1] if isinstance(method, str) else None
    try:
        return _begin(endpoint, kwargs, opts, helper, pending)
    except Exception:
        log.exception("flywheel: could not start the span for %s", endpoint)
        _own_kwargs(kwargs)
        return None


def _begin(
    endpoint: str,
    kwargs: dict[str, Any],
    opts: _Options,
    helper: str | None = None,
    pending: _Helper | None = None,
) -> _Call:
    """Open the call's span (the root of a rollout of its own if none is active), apply the
    workflow config if asked; may add stream_options to kwargs."""
    own = (
        _own_kwargs(kwargs)
        if "flywheel" in kwargs or "user_id" in kwargs or "session_id" in kwargs
        else {}
    )
    if pending is not None and pending.own:
        own = {**pending.own, **own}
    name = own.get("name") or _SPAN_NAMES[endpoint]
    span = start_span(
        name,
        "embedding" if endpoint == "embeddings" else "llm",
        workflow=own.get("workflow") or opts.workflow,
        user_id=own.get("user_id"),
        session_id=own.get("session_id"),
        tags=own.get("tags"),
        metadata=own.get("metadata"),
    )
    if opts.apply_config and endpoint != "embeddings":
        try:
            config = span.rollout.config
            if config:
                _apply_config(endpoint, kwargs, config)
        except Exception:
            log.exception("flywheel: could not apply the workflow config to %s", endpoint)
    if opts.capture:
        if endpoint == "responses":
            value = _given(kwargs, "input")
            instructions = _given(kwargs, "instructions")
            if instructions is not None:
                value = {"instructions": instructions, "input": value}
        else:
            value = kwargs.get("messages" if endpoint == "chat" else "input")
        span.set_input(value)
    params = None
    for key in kwargs:  # the caller's few arguments, not every known parameter
        if key in _PARAMS:
            param = kwargs[key]
            if param.__class__ in _ABSENT:
                continue
            if params is None:
                params = {}
            params[key] = param.__name__ if isinstance(param, type) else param
    if params:
        span.set_attribute("invocation_params", params)
    stream = helper != "parse" and bool(kwargs.get("stream"))
    if stream:
        span.set_attribute("stream", True)
    if helper:
        span.set_attribute("helper", helper)
    model = kwargs.get("model")
    if model.__class__ not in _ABSENT:
        span.set_model(model)
    added = stream and endpoint == "chat" and opts.stream_usage and _ask_usage(kwargs)
    return _Call(span, added, endpoint, stream, pending)


_SPAN_NAMES = {"chat": "chat.completions", "responses": "responses", "embeddings": "embeddings"}


def _ask_usage(kwargs: dict[str, Any]) -> bool:
    """Make a chat stream report its usage unless the caller asked already; True if added.

    Without the caller's ``stream_options`` the request gets it through ``extra_body``, which
    the SDK merges into the JSON as it is, where a ``stream_options`` argument goes through its
    type-driven transform (tens of microseconds). The body sent is the same. The caller's own
    ``extra_body`` wins over the arguments in that merge, so its ``stream_options`` is looked
    at first; the caller's dicts are copied, never changed.
    """
    body = kwargs.get("extra_body")
    if body.__class__ in _ABSENT:
        body = None
    if body:
        extra = body.get("stream_options")
        if extra is not None:
            if extra.get("include_usage"):
                return False
            kwargs["extra_body"] = {**body, "stream_options": {**extra, "include_usage": True}}
            return True
    options = _given(kwargs, "stream_options")
    if options is not None:
        if options.get("include_usage"):
            return False
        kwargs["stream_options"] = {**options, "include_usage": True}
        return True
    usage = {"include_usage": True}
    kwargs["extra_body"] = {**body, "stream_options": usage} if body else {"stream_options": usage}
    return True


# -- response side ----------------------------------------------------------------------------


def _usage_pair(endpoint: str, usage: Any) -> tuple[int | None, int | None]:
    if endpoint == "responses":
        return usage.input_tokens, usage.output_tokens
    if endpoint == "embeddings":
        return usage.prompt_tokens, None
    return usage.prompt_tokens, usage.completion_tokens


def _finish(call: _Call, result: Any, capture: bool) -> None:
    span = call.span
    model = getattr(result, "model", None)
    if model:
        span.model = model
    usage = getattr(result, "usage", None)
    if usage is not None:
        span.input_tokens, span.output_tokens = _usage_pair(call.endpoint, usage)
    if capture:  # chat and embedding outputs are built here: no one else holds them, no copy
        if call.endpoint == "chat":
            choices = getattr(result, "choices", None) or []
            if len(choices) == 1:
                span.output = _message_dict(choices[0].message)
            else:
                span.output = [_message_dict(c.message) for c in choices]
        elif call.endpoint == "responses":
            span.set_output(getattr(result, "output", None))
        else:
            data = getattr(result, "data", None) or []
            dims = len(data[0].embedding) if data else 0
            span.output = {"count": len(data), "dimensions": dims}
    span.end()


def _message_dict(message: Any) -> Any:
    """The answer as a plain chat dict: the writer's C JSON encoder takes it as is."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
            for t in message.tool_calls
            if getattr(t, "function", None) is not None
        ]
    if getattr(message, "refusal", None):
        out["refusal"] = message.refusal
    return out


def _settle(call: _Call, result: Any, capture: bool, is_async: bool) -> Any:
    """Everything after a successful request: record it, return what the caller gets."""
    try:
        if call.stream:
            traced = _traced_stream(result, call, capture, is_async=is_async)
            if call.helper is not None:
                call.helper.stream = traced
            return traced
        _finish(call, result, capture)
    except Exception:
        log.exception("flywheel: could not record the result of %s", call.endpoint)
        _safe_end(call.span, None)
    return result


def _safe_end(span: SpanHandle, error: BaseException | None) -> None:
    try:
        span.end(error=error)
    except Exception:
        log.exception("flywheel: could not end span")


# The two wrappers differ only in ``await``; all the work is in _prepare and _settle.


def _sync_wrapper(original: Any, endpoint: str, opts: _Options, helper: str | None = None) -> Any:
    @functools.wraps(original)
    def create(*args: Any, **kwargs: Any) -> Any:
        call = _prepare(endpoint, kwargs, opts, helper)
        if call is None:
            return original(*args, **kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            _safe_end(call.span, exc)
            raise
        return _settle(call, result, opts.capture, False)

    create._flywheel_original = original  # type: ignore[attr-defined]
    return create


def _async_wrapper(original: Any, endpoint: str, opts: _Options, helper: str | None = None) -> Any:
    @functools.wraps(original)
    async def create(*args: Any, **kwargs: Any) -> Any:
        call = _prepare(endpoint, kwargs, opts, helper)
        if call is None:
            return await original(*args, **kwargs)
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            _safe_end(call.span, exc)
            raise
        return _settle(call, result, opts.capture, True)

    create._flywheel_original = original  # type: ignore[attr-defined]
    return create


# -- streams ------------------------------------------------------------------------------------
#
# An SDK stream (``openai.Stream`` / ``AsyncStream``, by far the common case) is handed to the
# caller inside an instance of a subclass of its own class (so ``isinstance`` holds) that holds
# the SDK's stream and uses only its public surface: it iterates it, closes it, and passes any
# other attribute (``response``, ...) on to it. The chunks are the SDK's own objects, passed
# through one recording generator. When the wrapper itself asked for ``include_usage``, the
# usage-only chunk this adds is recorded and not passed on, and the ``"usage": null`` the
# server then puts in every other chunk is taken off the chunk's set fields (see
# ``_StreamState.see_chunk``). Anything else that comes back from ``create(stream=True)`` gets
# the same wrapper without the SDK class among its bases.


class _StreamState:
    """What a stream delivered so far (chunk by chunk); ends the span with it."""

    __slots__ = ("call", "capture", "text", "tool_calls", "usage", "model", "first_ns", "final")

    def __init__(self, call: _Call, capture: bool) -> None:
        self.call = call
        self.capture = capture
        self.text: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.usage: Any = None
        self.model: str | None = None
        self.first_ns = 0
        self.final: Any = None

    def see_chunk(self, chunk: Any) -> bool:
        """Record one chat chunk; False when the caller must not see it. Never raises."""
        try:
            choices = chunk.choices
            if choices:
                delta = choices[0].delta
                if delta is not None:
                    content = delta.content
                    if content:
                        if not self.first_ns:
                            self.first_ns = _time_ns()
                        if self.capture:
                            self.text.append(content)
                    if delta.tool_calls:
                        if not self.first_ns:
                            self.first_ns = _time_ns()
                        if self.capture:
                            self._add_tool_calls(delta.tool_calls)
            else:
                usage = chunk.usage
                if usage is not None:
                    self.usage = usage
                    if self.call.added_usage:  # the usage-only chunk we asked for
                        return False
            if self.call.added_usage and chunk.usage is None:
                # Asked for usage, the server sends ``"usage": null`` in every chunk; unasked,
                # the key is absent. The field reads None either way; taking it off the set
                # fields keeps ``model_fields_set``, ``to_dict()`` and ``to_json()`` (and any
                # ``exclude_unset`` dump) the unwrapped client's. ``model_fields_set`` is the
                # model's own set (pydantic 2, and the SDK's pydantic 1 shim).
                chunk.model_fields_set.discard("usage")
            if not self.model:  # (an Azure content-filter chunk comes first, model "")
                self.model = chunk.model
        except Exception:
            log.exception("flywheel: could not record a stream chunk")
        return True

    def _add_tool_calls(self, deltas: Any) -> None:
        for tc in deltas:
            slot = self.tool_calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            fn = tc.function
            if fn is not None:
                slot["name"] += fn.name or ""
                slot["arguments"] += fn.arguments or ""

    def see_event(self, event: Any) -> bool:
        """Record one responses event (all are shown). Never raises."""
        try:
            kind = getattr(event, "type", "")
            if kind == "response.output_text.delta":
                if not self.first_ns:
                    self.first_ns = _time_ns()
                if self.capture:
                    self.text.append(event.delta)
            elif kind == "response.function_call_arguments.delta":
                if not self.first_ns:
                    self.first_ns = _time_ns()
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                self.final = event.response
        except Exception:
            log.exception("flywheel: could not record a stream event")
        return True

    def see(self) -> Any:
        """The per-item recorder for this stream's endpoint."""
        return self.see_event if self.call.endpoint == "responses" else self.see_chunk

    def end(self, error: BaseException | None = None) -> None:
        """Finish the span with what arrived (called at the end, on error or on close)."""
        span = self.call.span
        if span.ended:
            return
        try:
            if self.first_ns:
                span.set_attribute(
                    "time_to_first_token_ms", (self.first_ns - span.started_ns) / 1e6
                )
            if self.final is not None:  # responses: the final event has it all
                _finish(self.call, self.final, self.capture)
                return
            if self.model:
                span.model = self.model
            if self.usage is not None:
                span.input_tokens, span.output_tokens = _usage_pair(self.call.endpoint, self.usage)
            if self.capture and error is None:
                output: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
                if self.tool_calls:
                    output["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
                span.output = output
            span.end(error=error)
        except Exception:
            log.exception("flywheel: could not end a stream span")


def _recorded(state: _StreamState, items: Any) -> Any:
    """Yield what ``items`` yields (minus what ``state`` hides); end the span with the stream."""
    see = state.see()
    try:
        for item in items:
            if see(item):
                yield item
    except GeneratorExit:  # closed or dropped before the end
        state.end()
        raise
    except BaseException as exc:
        state.end(exc)
        raise
    state.end()


async def _arecorded(state: _StreamState, items: Any) -> Any:
    see = state.see()
    try:
        async for item in items:
            if see(item):
                yield item
    except GeneratorExit:
        state.end()
        raise
    except BaseException as exc:
        state.end(exc)
        raise
    state.end()


_OWN = frozenset(("_flywheel_stream", "_flywheel_state", "_flywheel_iter"))


class _TracedBase:
    """What every traced stream has: the stream it wraps, the recording state (ended at the
    latest when the caller drops the traced stream: nothing the SDK holds refers back to it),
    and every other attribute passed on to the wrapped stream."""

    _flywheel_stream: Any
    _flywheel_state: _StreamState
    _flywheel_iter: Any

    def __getattr__(self, name: str) -> Any:  # only names the class and instance lack
        if name in _OWN:
            raise AttributeError(name)
        return getattr(self._flywheel_stream, name)

    def __del__(self) -> None:
        try:
            self._flywheel_state.end()
        except Exception:
            pass


class _TracedStream(_TracedBase):
    """A sync stream: iteration, ``with`` and ``close()`` as ``openai.Stream`` has them."""

    def __init__(self, stream: Any, call: _Call, capture: bool) -> None:
        self._flywheel_stream = stream
        self._flywheel_state = state = _StreamState(call, capture)
        self._flywheel_iter = _recorded(state, stream)

    def __next__(self) -> Any:
        return self._flywheel_iter.__next__()

    def __iter__(self) -> Any:
        # as the SDK's: a loop left early leaves the stream open, to be read on
        for item in self._flywheel_iter:  # noqa: UP028 - ``yield from`` would close it
            yield item

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._flywheel_stream.close()
        finally:
            self._flywheel_state.end()


class _TracedAsyncStream(_TracedBase):
    """An async stream: iteration, ``async with``, ``close()`` and ``aclose()`` as
    ``openai.AsyncStream`` has them."""

    def __init__(self, stream: Any, call: _Call, capture: bool) -> None:
        self._flywheel_stream = stream
        self._flywheel_state = state = _StreamState(call, capture)
        self._flywheel_iter = _arecorded(state, stream)

    async def __anext__(self) -> Any:
        return await self._flywheel_iter.__anext__()

    async def __aiter__(self) -> Any:
        async for item in self._flywheel_iter:
            yield item

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._flywheel_stream.close()
        finally:
            self._flywheel_state.end()

    async def aclose(self) -> None:
        await self.close()


def _sdk_stream_classes() -> tuple[type, type] | None:
    try:
        import openai

        return openai.Stream, openai.AsyncStream
    except Exception:  # pragma: no cover - an SDK without these classes
        return None


_SDK = _sdk_stream_classes()
_STREAM_CLASSES: dict[tuple[type, bool], type] = {}


def _traced_stream(result: Any, call: _Call, capture: bool, *, is_async: bool) -> Any:
    """The traced stream around ``result``: for an SDK stream an instance of a subclass of its
    own class (so ``isinstance`` holds; the SDK's ``__init__`` is not run, nothing of its
    state is copied), else the plain wrapper."""
    cls = result.__class__
    sub = _STREAM_CLASSES.get((cls, is_async))
    if sub is None:
        traced = _TracedAsyncStream if is_async else _TracedStream
        if _SDK is not None and issubclass(cls, _SDK[1] if is_async else _SDK[0]):
            sub = type(cls.__name__, (traced, cls), {"__module__": __name__})
        else:
            sub = traced
        _STREAM_CLASSES[cls, is_async] = sub
    return sub(result, call, capture)


# -- the .stream() helpers ------------------------------------------------------------------------


def _stream_helper(original: Any) -> Any:
    """Wrap ``chat.completions.stream`` / ``responses.stream``: take flywheel's arguments off
    the call, hand them (in a header the SDK never sends) to the wrapped ``create`` the SDK
    calls on entry, and return the SDK's own manager, made to end that span on exit."""

    @functools.wraps(original)
    def stream(*args: Any, **kwargs: Any) -> Any:
        helper = _Helper(_own_kwargs(kwargs))
        if _Mark is not None:
            kwargs["extra_headers"] = {
                **(kwargs.get("extra_headers") or {}),
                _MARK_HEADER: _Mark(helper),
            }
        manager = original(*args, **kwargs)
        try:
            return _traced_manager(manager, helper)
        except Exception:
            log.exception("flywheel: could not trace a stream helper")
            return manager

    stream._flywheel_original = original  # type: ignore[attr-defined]
    return stream


class _ManagerBase:
    """Holds the SDK's manager and passes on what the traced manager does not define."""

    _flywheel_manager: Any
    _flywheel_helper: _Helper

    def __init__(self, manager: Any, helper: _Helper) -> None:
        self._flywheel_manager = manager
        self._flywheel_helper = helper

    def __getattr__(self, name: str) -> Any:  # only names the class and instance lack
        if name in ("_flywheel_manager", "_flywheel_helper"):
            raise AttributeError(name)
        return getattr(self._flywheel_manager, name)


class _SyncManager(_ManagerBase):
    def __enter__(self) -> Any:
        return self._flywheel_manager.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._flywheel_manager.__exit__(*exc)
        finally:
            _end_helper(self._flywheel_helper)


class _AsyncManager(_ManagerBase):
    async def __aenter__(self) -> Any:
        return await self._flywheel_manager.__aenter__()

    async def __aexit__(self, *exc: Any) -> Any:
        try:
            return await self._flywheel_manager.__aexit__(*exc)
        finally:
            _end_helper(self._flywheel_helper)


def _end_helper(helper: _Helper) -> None:
    """Leaving the helper's ``with`` ends the span (idempotent: a stream read to its end has
    ended it already; one left early ends with what arrived)."""
    if helper.stream is not None:
        helper.stream._flywheel_state.end()


_MANAGERS: dict[type, type] = {}


def _traced_manager(manager: Any, helper: _Helper) -> Any:
    """The SDK's manager inside an instance of a subclass of its own class (``isinstance``
    holds; entering and leaving it are the SDK manager's own)."""
    cls = type(manager)
    sub = _MANAGERS.get(cls)
    if sub is None:
        mixin = _AsyncManager if hasattr(cls, "__aexit__") else _SyncManager
        sub = _MANAGERS[cls] = type(cls.__name__, (mixin, cls), {"__module__": __name__})
    return sub(manager, helper)
