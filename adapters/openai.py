"""OpenAI SDK capture: ``wrap_openai(client)`` records every model call as an ``llm`` span.

    client = wrap_openai(OpenAI(), workflow="qa")
    client.chat.completions.create(model=..., messages=..., flywheel={"user_id": "u1"})

Covers ``chat.completions.create`` (plain and ``stream=True``), ``responses.create`` (plain and
streaming) and ``embeddings.create``, on ``OpenAI`` and ``AsyncOpenAI``. The client is
instrumented in place (its resource objects get a wrapping ``create``) and returned.

Flywheel's own keyword arguments are removed before the call: ``flywheel={...}`` (keys
``workflow``, ``user_id``, ``session_id``, ``tags``, ``metadata``, ``name``) or the
shorthands ``user_id=`` / ``session_id=``. Streams get ``stream_options.include_usage`` when the
caller did not ask for it, and the extra usage-only chunk is dropped before the caller sees
it. Errors are recorded and re-raised unchanged; ``with_raw_response`` and
``with_streaming_response`` calls pass through untraced. Clients derived with
``client.with_options(...)`` are new objects: wrap them too.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from flywheel_middleware import tracing
from flywheel_middleware.serialize import snapshot
from flywheel_middleware.tracing import SpanHandle

from ..ids import new_rollout_id

log = logging.getLogger("flywheel_middleware.adapters.openai")

__all__ = ["wrap_openai"]

_RAW_HEADER = "X-Stainless-Raw-Response"
_OWN_KWARGS = ("flywheel", "user_id", "session_id")
_PARAM_KEYS = (
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
    "tool_choice",
    "response_format",
    "dimensions",
)


def wrap_openai(
    client: Any,
    workflow: str = "openai",
    *,
    capture_content: bool = True,
    apply_config: bool = False,
) -> Any:
    """Instrument an ``OpenAI``/``AsyncOpenAI`` client in place and return it.

    ``workflow`` names the rollout opened for a call made outside any ``fw.rollout``.
    ``capture_content=False`` keeps prompts and answers out of the store (usage still kept).
    ``apply_config=True`` makes each chat/responses call use the rollout's resolved workflow
    config, overriding the caller's values (so the call takes part in experiments):
    ``llm.{model, temperature, top_p, max_tokens, seed, ...}`` and ``prompt.system`` (replaces
    the first system message / ``instructions``) or ``prompt.system_suffix`` (appended).
    """
    if getattr(client, "_flywheel_wrapped", False):
        return client
    is_async = _is_async_client(client)
    opts = _Options(workflow, capture_content, apply_config)
    targets = (
        (("chat", "completions"), "chat"),
        (("responses",), "responses"),
        (("embeddings",), "embeddings"),
    )
    for path, endpoint in targets:
        resource: Any = client
        try:
            for attr in path:
                resource = getattr(resource, attr)
        except AttributeError:  # an older SDK without this resource
            continue
        original = resource.create
        wrapper = _async_wrapper if is_async else _sync_wrapper
        resource.create = wrapper(original, endpoint, opts)
    client._flywheel_wrapped = True
    return client


class _Options:
    __slots__ = ("workflow", "capture", "apply_config")

    def __init__(self, workflow: str, capture: bool, apply_config: bool = False) -> None:
        self.workflow = workflow
        self.capture = capture
        self.apply_config = apply_config


_CONFIG_PARAMS = (
    "model",
    "temperature",
    "top_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "reasoning_effort",
)


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
        elif "max_completion_tokens" in kwargs:
            kwargs["max_completion_tokens"] = llm["max_tokens"]
        else:
            kwargs["max_tokens"] = llm["max_tokens"]
    prompt = config.get("prompt") or {}
    system, suffix = prompt.get("system"), prompt.get("system_suffix")
    if not isinstance(system, str) and not isinstance(suffix, str):
        return
    if endpoint == "responses":
        text = system if isinstance(system, str) else (kwargs.get("instructions") or "")
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


class _Call:
    """What the wrapper learned from the request, and whether it changed stream_options."""

    __slots__ = ("span", "added_usage", "endpoint")

    def __init__(self, span: SpanHandle, added_usage: bool, endpoint: str) -> None:
        self.span = span
        self.added_usage = added_usage
        self.endpoint = endpoint


def _is_passthrough(kwargs: dict[str, Any]) -> bool:
    headers = kwargs.get("extra_headers")
    return bool(headers) and _RAW_HEADER in headers


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


def _begin(endpoint: str, kwargs: dict[str, Any], opts: _Options) -> _Call:
    """Open the span (and a rollout if none is active); may add stream_options to kwargs."""
    own = (
        _own_kwargs(kwargs)
        if ("flywheel" in kwargs or "user_id" in kwargs or "session_id" in kwargs)
        else None
    )
    parent = tracing.current()
    rollout = parent.rollout if parent is not None else None
    opened = False
    if rollout is None:
        own = own or {}
        rollout = tracing.open_rollout(
            own.get("workflow") or opts.workflow,
            rollout_id=new_rollout_id(),
            user_id=own.get("user_id"),
            session_id=own.get("session_id"),
            tags=own.get("tags"),
            metadata=own.get("metadata"),
        )
        opened = True
    if opts.apply_config and endpoint != "embeddings":
        try:
            config = rollout.config
            if config:
                _apply_config(endpoint, kwargs, config)
        except Exception:
            log.exception("flywheel: could not apply the workflow config to %s", endpoint)
    model = kwargs.get("model")
    if endpoint == "chat":
        name, value = "chat.completions", kwargs.get("messages")
    elif endpoint == "responses":
        name = "responses"
        value = kwargs.get("input")
        if kwargs.get("instructions") is not None:
            value = {"instructions": kwargs["instructions"], "input": value}
    else:
        name, value = "embeddings", kwargs.get("input")
    if own and own.get("name"):
        name = own["name"]
    if not opts.capture:
        value = None
    params = None
    for key in _PARAM_KEYS:
        if key in kwargs:
            if params is None:
                params = {}
            params[key] = kwargs[key]
    attributes = {"invocation_params": params} if params else None
    stream = bool(kwargs.get("stream"))
    if stream:
        attributes = attributes or {}
        attributes["stream"] = True
    kind = "embedding" if endpoint == "embeddings" else "llm"
    span = SpanHandle(
        name,
        kind,
        rollout,
        None if opened else parent,
        input=value,
        model=model,
        attributes=attributes,
    )
    if opened:
        rollout.input = snapshot(value)
        span._owns_rollout = True
    added = False
    if stream and endpoint == "chat":
        options = kwargs.get("stream_options")
        if not (options and options.get("include_usage")):
            kwargs["stream_options"] = {**(options or {}), "include_usage": True}
            added = True
    return _Call(span, added, endpoint)


# -- response side ----------------------------------------------------------------------------


def _finish(call: _Call, result: Any, capture: bool) -> None:
    span = call.span
    model = getattr(result, "model", None)
    if model:
        span.model = model
    usage = getattr(result, "usage", None)
    if usage is not None:
        if call.endpoint == "responses":
            span.set_usage(usage.input_tokens, usage.output_tokens)
        elif call.endpoint == "embeddings":
            span.set_usage(usage.prompt_tokens, None)
        else:
            span.set_usage(usage.prompt_tokens, usage.completion_tokens)
    output: Any = None
    if capture:
        if call.endpoint == "embeddings":
            data = getattr(result, "data", None) or []
            dims = len(data[0].embedding) if data else 0
            output = {"count": len(data), "dimensions": dims}
        elif call.endpoint == "chat":
            choices = getattr(result, "choices", None) or []
            if len(choices) == 1:
                output = _message_dict(choices[0].message)
            else:
                output = [_message_dict(c.message) for c in choices]
        else:
            output = getattr(result, "output", None)
    span.end(output=output)


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


def _sync_wrapper(original: Any, endpoint: str, opts: _Options) -> Any:
    @functools.wraps(original)
    def create(*args: Any, **kwargs: Any) -> Any:
        if _is_passthrough(kwargs):
            _own_kwargs(kwargs)
            return original(*args, **kwargs)
        try:
            call = _begin(endpoint, kwargs, opts)
        except Exception:
            log.exception("flywheel: could not start the span for %s", endpoint)
            _own_kwargs(kwargs)
            return original(*args, **kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            _safe_end(call.span, exc)
            raise
        try:
            if kwargs.get("stream"):
                return _traced_stream(result, call, opts.capture, is_async=False)
            _finish(call, result, opts.capture)
        except Exception:
            log.exception("flywheel: could not record the result of %s", endpoint)
        return result

    create._flywheel_original = original  # type: ignore[attr-defined]
    return create


def _async_wrapper(original: Any, endpoint: str, opts: _Options) -> Any:
    @functools.wraps(original)
    async def create(*args: Any, **kwargs: Any) -> Any:
        if _is_passthrough(kwargs):
            _own_kwargs(kwargs)
            return await original(*args, **kwargs)
        try:
            call = _begin(endpoint, kwargs, opts)
        except Exception:
            log.exception("flywheel: could not start the span for %s", endpoint)
            _own_kwargs(kwargs)
            return await original(*args, **kwargs)
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            _safe_end(call.span, exc)
            raise
        try:
            if kwargs.get("stream"):
                return _traced_stream(result, call, opts.capture, is_async=True)
            _finish(call, result, opts.capture)
        except Exception:
            log.exception("flywheel: could not record the result of %s", endpoint)
        return result

    create._flywheel_original = original  # type: ignore[attr-defined]
    return create


def _safe_end(span: SpanHandle, error: BaseException | None) -> None:
    try:
        span.end(error=error)
    except Exception:
        log.exception("flywheel: could not end span")


# -- streams ------------------------------------------------------------------------------------


class _StreamState:
    """Accumulates what a stream delivered, chunk by chunk; decides which chunks to hide."""

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

    def see(self, item: Any) -> bool:
        """Record one chunk/event; False when the caller must not see it."""
        if self.call.endpoint == "responses":
            return self._see_event(item)
        if self.model is None:
            self.model = getattr(item, "model", None)
        usage = getattr(item, "usage", None)
        if usage is not None:
            self.usage = usage
        choices = item.choices
        if not choices:
            return not self.call.added_usage  # the usage-only chunk we asked for
        delta = choices[0].delta
        if delta is not None:
            content = delta.content
            if content:
                if not self.first_ns:
                    self.first_ns = time.time_ns()
                if self.capture:
                    self.text.append(content)
            if delta.tool_calls and self.capture:
                if not self.first_ns:
                    self.first_ns = time.time_ns()
                for tc in delta.tool_calls:
                    slot = self.tool_calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    if tc.id:
                        slot["id"] = tc.id
                    fn = tc.function
                    if fn is not None:
                        slot["name"] += fn.name or ""
                        slot["arguments"] += fn.arguments or ""
        return True

    def _see_event(self, event: Any) -> bool:
        kind = getattr(event, "type", "")
        if kind == "response.output_text.delta" and not self.first_ns:
            self.first_ns = time.time_ns()
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.final = event.response
        return True

    def end(self, error: BaseException | None = None) -> None:
        span = self.call.span
        if span._ended:
            return
        try:
            if self.first_ns:
                span.set_attribute(
                    "time_to_first_token_ms", (self.first_ns - span.started_ns) / 1e6
                )
            if self.call.endpoint == "responses":
                final = self.final
                if final is not None:
                    _finish(self.call, final, self.capture)
                    return
            else:
                if self.model:
                    span.model = self.model
                if self.usage is not None:
                    span.set_usage(self.usage.prompt_tokens, self.usage.completion_tokens)
                if self.capture and error is None:
                    output: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
                    if self.tool_calls:
                        output["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
                    span.output = output
            span.end(error=error)
        except Exception:
            log.exception("flywheel: could not end a stream span")


class _TracedStream:
    """Iterates the SDK's ``Stream`` for the caller, recording as it goes; same surface."""

    def __init__(self, stream: Any, call: _Call, capture: bool) -> None:
        if isinstance(self, _SDK_STREAMS):  # an ``openai.Stream`` subclass: share its state
            self.__dict__.update(stream.__dict__)
        self._stream = stream
        self._state = _StreamState(call, capture)
        self._iter = iter(stream)

    def __iter__(self) -> _TracedStream:
        return self

    def __next__(self) -> Any:
        state = self._state
        while True:
            try:
                item = next(self._iter)
            except StopIteration:
                state.end()
                raise
            except BaseException as exc:
                state.end(exc)
                raise
            try:
                show = state.see(item)
            except Exception:
                log.exception("flywheel: could not record a stream chunk")
                show = True
            if show:
                return item

    def __enter__(self) -> _TracedStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._state.end()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_state") or name in ("_stream", "_iter"):
            raise AttributeError(name)
        return getattr(self._stream, name)

    def __del__(self) -> None:
        try:
            self._state.end()
        except Exception:
            pass


class _TracedAsyncStream:
    """The async twin of ``_TracedStream`` for ``AsyncStream``."""

    def __init__(self, stream: Any, call: _Call, capture: bool) -> None:
        if isinstance(self, _SDK_STREAMS):
            self.__dict__.update(stream.__dict__)
        self._stream = stream
        self._state = _StreamState(call, capture)
        self._iter = stream.__aiter__()

    def __aiter__(self) -> _TracedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        state = self._state
        while True:
            try:
                item = await self._iter.__anext__()
            except StopAsyncIteration:
                state.end()
                raise
            except BaseException as exc:
                state.end(exc)
                raise
            try:
                show = state.see(item)
            except Exception:
                log.exception("flywheel: could not record a stream chunk")
                show = True
            if show:
                return item

    async def __aenter__(self) -> _TracedAsyncStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            self._state.end()

    async def aclose(self) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_state") or name in ("_stream", "_iter"):
            raise AttributeError(name)
        return getattr(self._stream, name)

    def __del__(self) -> None:
        try:
            self._state.end()
        except Exception:
            pass


def _sdk_stream_classes() -> tuple[Any, ...]:
    """Subclasses of the SDK's ``Stream``/``AsyncStream``, so ``isinstance`` checks still hold."""
    try:
        import openai

        class TracedStream(_TracedStream, openai.Stream):  # type: ignore[misc]
            pass

        class TracedAsyncStream(_TracedAsyncStream, openai.AsyncStream):  # type: ignore[misc]
            pass

        return (openai.Stream, openai.AsyncStream, TracedStream, TracedAsyncStream)
    except Exception:  # pragma: no cover - an SDK without these classes
        return ()


_SDK = _sdk_stream_classes()
_SDK_STREAMS: tuple[type, ...] = tuple(_SDK[2:])


def _traced_stream(result: Any, call: _Call, capture: bool, *, is_async: bool) -> Any:
    """The SDK-class-preserving wrapper when ``result`` is an SDK stream, else a plain proxy."""
    if _SDK and isinstance(result, _SDK[1] if is_async else _SDK[0]):
        return (_SDK[3] if is_async else _SDK[2])(result, call, capture)
    return (_TracedAsyncStream if is_async else _TracedStream)(result, call, capture)
