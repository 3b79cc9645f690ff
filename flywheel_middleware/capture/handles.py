"""Rollouts and spans: the cheap API the agent's code and the adapters call.

One handle family: ``RolloutHandle`` and ``SpanHandle`` share one enter/exit (``with`` makes a
handle current, leaving ends it). Parenting is carried by one ``contextvars`` variable, so
spans nest correctly across asyncio tasks and copied contexts; adapters that learn parents
from their framework (LangChain's ``parent_run_id``) pass ``parent=`` explicitly instead.

A span started with no parent owns a rollout of its own. That rollout is opened only when
something needs it (a child span, ``span.rollout``); a root span that ends without any (a
model called directly, the common case) is queued as one call record, as ``record_call``
queues a finished call. Mirrored into OpenTelemetry (opt-in), a root span is its trace's
root: one OTel span per flywheel span, and a "workflow" span only for an explicit rollout.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import logging
import operator
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flywheel_middleware.capture import backend, otel_mirror
from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import (
    CALL_ROLLOUT_FIELDS,
    CALL_SPAN_FIELDS,
    RolloutRecord,
    SpanRecord,
    pack_call,
    rollout_status,
    token_total,
)
from flywheel_middleware.capture.serialize import snapshot

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("flywheel_middleware")

_call_span_values = operator.attrgetter(*CALL_SPAN_FIELDS)  # a root span's part of its call
_current: contextvars.ContextVar[Any] = contextvars.ContextVar("flywheel_current", default=None)
_opening = threading.Lock()  # two children of one root span, in two threads, open one rollout


def _new_opening_lock() -> None:
    global _opening
    _opening = threading.Lock()  # a fork may have happened while another thread held it


os.register_at_fork(after_in_child=_new_opening_lock)


def _error_field(error: BaseException | str | None) -> str | None:
    """What a record stores for an error given as an exception, a text or nothing."""
    if error is None or isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


class _Handle:
    """What both handle kinds share: ``end`` once, ``with`` makes current and ends."""

    __slots__ = ()
    _token: contextvars.Token | None
    _ended: bool
    started_at: int
    input: Any
    output: Any

    @property
    def started_ns(self) -> int:
        return self.started_at

    @property
    def ended(self) -> bool:
        """Whether ``end()`` (or leaving ``with``) has ended it."""
        return self._ended

    def end(
        self,
        output: Any = None,
        error: BaseException | str | None = None,
        end_ns: int | None = None,
    ) -> None:
        """End the handle and queue it for the store. A second call is ignored."""
        if self._ended:
            return
        self._ended = True
        if output is not None:
            self.output = snapshot(output)
        self._finish(_error_field(error), end_ns or time.time_ns())

    def _finish(self, error: str | None, end: int) -> None:
        """What ending means for this kind of handle."""
        raise NotImplementedError

    def activate(self) -> contextvars.Token:
        """Make this handle the current parent without ending it later; see ``deactivate``."""
        return _current.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token) -> None:
        try:
            _current.reset(token)
        except ValueError:  # reset from another context: the context itself is gone
            pass

    def __enter__(self) -> Any:
        if self._token is None:  # entered again inside itself: it is current already
            self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        token, self._token = self._token, None
        if token is not None:
            self.deactivate(token)
        try:
            self.end(error=exc)
        except Exception:  # the host's own exception, if any, goes on unchanged
            log.exception("flywheel: ending %r failed", self)

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def set_input(self, value: Any) -> None:
        self.input = snapshot(value)

    def set_output(self, value: Any) -> None:
        self.output = snapshot(value)


class RolloutHandle(RolloutRecord, _Handle):
    """An open rollout. Use it as a context manager (sync or async), or ``finish()`` it.

    It is its own record: finishing queues this very object, so nothing is copied on the
    agent's thread (``started_at``/``ended_at`` hold ``time.time_ns()`` until written).
    """

    __slots__ = ("unit_id", "_config", "_resolved", "_seq", "_lock", "_token", "_ended", "_otel")

    def __init__(
        self,
        workflow: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        input: Any = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        unit_id: str | None = None,
        rollout_id: str | None = None,
        start_ns: int | None = None,
        mirror: bool = True,
    ) -> None:
        """``mirror=False``: no OTel span of its own (a root span's rollout: that span is the
        mirrored trace's root already)."""
        super().__init__(
            id=rollout_id or new_rollout_id(),
            workflow=workflow,
            user_id=user_id,
            session_id=session_id,
            input=snapshot(input),
            status="running",
            started_at=start_ns or time.time_ns(),
            tags=list(tags) if tags else None,
            metadata=dict(metadata) if metadata else None,
        )
        self.unit_id = unit_id
        self._config: dict[str, Any] | None = None
        self._resolved = False
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._token = None
        self._ended = False
        self._otel = (
            otel_mirror.start(f"workflow {workflow}", None, self.started_at) if mirror else None
        )
        backend.current().rollout_opened(self.id, workflow)

    # The rollout is the root of its own span tree.
    @property
    def rollout(self) -> RolloutHandle:
        return self

    @property
    def span_id(self) -> None:
        return None

    @property
    def config(self) -> dict[str, Any]:
        """The workflow config the resolver chose for this request (resolved on first use)."""
        if not self._resolved:
            self._resolved = True
            try:
                resolution = backend.current().resolve(self)
            except Exception:  # a resolver failure must not break the agent: no config
                resolution = None
            if resolution is not None:
                self.set_config(
                    resolution.config,
                    config_version_id=resolution.version_id,
                    experiment_id=resolution.experiment_id,
                    variant=resolution.variant,
                    propensity=resolution.propensity,
                )
        return self._config if self._config is not None else {}

    def set_config(self, config: dict[str, Any], **resolution: Any) -> None:
        """Pin the config (and its version/variant/propensity) chosen elsewhere for this rollout."""
        self._resolved = True
        self._config = config
        for key, value in resolution.items():
            setattr(self, key, value)

    def set_metadata(self, key: str, value: Any) -> None:
        if self.metadata is None:
            self.metadata = {}
        self.metadata[key] = value

    def add_usage(
        self, input_tokens: int | None, output_tokens: int | None, cost: float | None = None
    ) -> None:
        with self._lock:
            if self._ended:  # a child that ended after its rollout: the rollout is queued
                return
            if input_tokens:
                self.input_tokens = (self.input_tokens or 0) + int(input_tokens)
            if output_tokens:
                self.output_tokens = (self.output_tokens or 0) + int(output_tokens)
            if cost:
                self.cost = (self.cost or 0.0) + float(cost)

    def next_sequence(self) -> int:
        return next(self._seq)

    def feedback(self, rating: Any = None, **kwargs: Any) -> None:
        """Shortcut for ``fw.feedback(this_rollout.id, ...)``."""
        backend.current().feedback(self.id, rating, **kwargs)

    def _finish(self, error: str | None, end: int) -> None:
        self.ended_at = end
        self.error = error or self.error
        self.status = rollout_status(self.error)
        self.latency_ms = (end - self.started_at) / 1e6
        with self._lock:  # no child adds usage from here on (see add_usage)
            self.total_tokens = token_total(self.input_tokens, self.output_tokens)
        if self._otel is not None:
            otel_mirror.end(self._otel, self, end)
        sink = backend.current()
        sink.rollout_finished(self.id, self.workflow)
        sink.enqueue(self)

    finish = _Handle.end  # a rollout is finished, a span ended: the same call

    def __repr__(self) -> str:
        return f"<Rollout {self.id} workflow={self.workflow!r} status={self.status}>"


class SpanHandle(SpanRecord, _Handle):
    """An open span. ``end()`` queues it (it is its own record); ``with`` makes it current.

    With no ``parent`` it is a root span that owns a rollout of ``workflow``: the rollout
    ends with it, and is opened only if something needs it (see the module docstring).
    ``user_id``, ``session_id``, ``tags`` and ``metadata`` are that rollout's.
    """

    __slots__ = ("_rollout", "_owned", "_token", "_ended", "_otel")

    def __init__(
        self,
        name: str,
        kind: str = "chain",
        *,
        parent: SpanHandle | RolloutHandle | None = None,
        workflow: str | None = None,
        node: str | None = None,
        input: Any = None,
        model: str | None = None,
        attributes: dict[str, Any] | None = None,
        start_ns: int | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id=new_span_id(),
            kind=kind,
            name=name,
            node=node,
            started_at=start_ns or time.time_ns(),
            model=model,
            input=snapshot(input),
            attributes=dict(attributes) if attributes else None,
        )
        self._token = None
        self._ended = False
        self._otel = None
        if parent is None:
            self.rollout_id = new_rollout_id()
            self.workflow = workflow or name
            self.parent_id = None
            self.sequence = 0
            self._rollout: RolloutHandle | None = None
            # the rollout's fields, in call-record order (CALL_ROLLOUT_FIELDS)
            self._owned: tuple[Any, ...] | None = (user_id, session_id, tags, metadata)
            self._otel = otel_mirror.start(name, None, self.started_at)  # a mirrored trace's root
            # feedback for its rollout id is accepted before the rollout opens
            backend.current().rollout_opened(self.rollout_id, self.workflow)
            return
        rollout = parent.rollout
        self._rollout = rollout
        self._owned = None
        self.rollout_id = rollout.id
        self.workflow = rollout.workflow
        self.parent_id = parent.span_id
        self.sequence = rollout.next_sequence()
        parent_otel = parent._otel if parent._otel is not None else rollout._otel
        if parent_otel is not None:
            self._otel = otel_mirror.start(name, parent_otel, self.started_at)

    @property
    def span_id(self) -> int:
        return self.id

    @property
    def rollout(self) -> RolloutHandle:
        """The rollout this span belongs to (a root span's own is opened here, on first use)."""
        rollout = self._rollout
        if rollout is not None:
            return rollout
        with _opening:
            if self._rollout is not None:
                return self._rollout
            rollout = RolloutHandle(
                self.workflow,
                rollout_id=self.rollout_id,
                input=self.input,
                start_ns=self.started_at,
                mirror=False,
                **dict(zip(CALL_ROLLOUT_FIELDS, self._owned, strict=True)),  # type: ignore[arg-type]
            )
            rollout.next_sequence()  # this span is number 0
            if self._ended:  # already queued as a call record: a late child only joins it
                rollout._ended = True
                backend.current().rollout_finished(rollout.id, rollout.workflow)
            self._rollout = rollout
            return rollout

    def set_input(self, value: Any) -> None:
        self.input = snapshot(value)
        if self._owned is not None and self._rollout is not None:  # its rollout's input too
            self._rollout.input = self.input

    def set_attribute(self, key: str, value: Any) -> None:
        if self.attributes is None:
            self.attributes = {}
        self.attributes[key] = value

    def set_model(self, model: str | None) -> None:
        self.model = model

    def set_usage(self, input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens

    def set_error(self, error: BaseException | str) -> None:
        self.status = "error"
        self.error = _error_field(error)

    def _finish(self, error: str | None, end: int) -> None:
        """Queue the span (and its own rollout, if it has one)."""
        if error is not None:
            self.set_error(error)
        self.ended_at = end
        self.duration_ms = (end - self.started_at) / 1e6
        rollout = self._rollout
        if rollout is None and self._owned is not None:
            with _opening:  # a child opening the rollout right now either wins or sees _ended
                rollout = self._rollout
        if self._otel is not None:
            otel_mirror.end(self._otel, self, end)
        if rollout is None:  # a root span that never needed its rollout: one call record
            call = pack_call((self.id, *_call_span_values(self), *self._owned))  # type: ignore[misc]
            sink = backend.current()
            sink.enqueue(call)
            sink.rollout_finished(self.rollout_id, self.workflow)
            return
        if self.input_tokens or self.output_tokens:
            rollout.add_usage(self.input_tokens, self.output_tokens)
        backend.current().enqueue(self)
        if self._owned is not None:
            rollout.finish(output=self.output, error=self.error, end_ns=end)

    def __repr__(self) -> str:
        return f"<Span {self.id} {self.kind}:{self.name}>"


# -- the functions users and adapters call ------------------------------------------------


def current() -> SpanHandle | RolloutHandle | None:
    """The innermost open span or rollout in this context."""
    return _current.get()


def current_rollout() -> RolloutHandle | None:
    cur = _current.get()
    return cur.rollout if cur is not None else None


def current_span() -> SpanHandle | None:
    cur = _current.get()
    return cur if isinstance(cur, SpanHandle) else None


def record_call(
    name: str,
    kind: str = "llm",
    *,
    start_ns: int,
    end_ns: int | None = None,
    output: Any = None,
    error: BaseException | str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    **fields: Any,
) -> str:
    """Record a finished call that was its own rollout with one span; return the rollout id.

    ``fields``: the ``SpanHandle`` keywords (workflow, node, input, model, attributes, and
    the rollout's user_id, session_id, tags, metadata). It is a root span ended at once, so
    it is queued as one call record (and, with the OTel mirror on, is one OTel span).
    """
    span = SpanHandle(name, kind, start_ns=start_ns, **fields)
    span.set_usage(input_tokens, output_tokens)
    span.end(output=output, error=error, end_ns=end_ns)
    return span.rollout_id


def rollout(workflow: str, **fields: Any) -> RolloutHandle:
    """Open a rollout; use it with ``with`` or ``async with`` so adapters inside attach to it
    (or ``finish()`` it yourself). ``fields``: the ``RolloutHandle`` keywords (user_id,
    session_id, input, tags, metadata, unit_id)."""
    return RolloutHandle(workflow, **fields)


def start_span(
    name: str,
    kind: str = "chain",
    *,
    parent: SpanHandle | RolloutHandle | None = None,
    **fields: Any,
) -> SpanHandle:
    """A span under ``parent``, else the current span or rollout, not yet current (``with``
    makes it current and ends it). With neither it is a root span owning a rollout of
    ``workflow`` (default: the span's name). ``fields``: the ``SpanHandle`` keywords."""
    if parent is None:
        parent = _current.get()
    return SpanHandle(name, kind, parent=parent, **fields)


span = start_span  # ``with fw.span("lookup", kind="tool") as s:`` reads better; the same call


def traced(
    func: F | None = None, *, name: str | None = None, kind: str = "chain", capture: bool = True
) -> Any:
    """Decorator: each call of a sync or async function becomes a span (inputs and output kept)."""

    def decorate(fn: F) -> F:
        span_name = name or fn.__qualname__
        signature = inspect.signature(fn)

        def arguments(args: tuple, kwargs: dict) -> Any:
            if not capture:
                return None
            try:
                bound = signature.bind_partial(*args, **kwargs)
                return dict(bound.arguments)
            except TypeError:
                return {"args": args, "kwargs": kwargs}

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with start_span(span_name, kind, input=arguments(args, kwargs)) as s:
                    result = await fn(*args, **kwargs)
                    if capture:
                        s.set_output(result)
                    return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with start_span(span_name, kind, input=arguments(args, kwargs)) as s:
                result = fn(*args, **kwargs)
                if capture:
                    s.set_output(result)
                return result

        return wrapper  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate
