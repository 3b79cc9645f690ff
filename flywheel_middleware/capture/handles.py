"""Rollouts and spans: the cheap API the agent's code and the adapters call.

Parenting is carried by one ``contextvars`` variable, so spans nest correctly across asyncio
tasks and copied contexts; adapters that learn parents from their framework (LangChain's
``parent_run_id``) pass ``parent=`` explicitly instead.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flywheel_middleware.capture import otel_mirror as otel
from flywheel_middleware.capture.ids import new_rollout_id, new_span_id
from flywheel_middleware.capture.records import RolloutRecord, SpanRecord, pack_call
from flywheel_middleware.capture.serialize import snapshot

F = TypeVar("F", bound=Callable[..., Any])

SPAN_KINDS = frozenset(
    {"agent", "chain", "llm", "tool", "retriever", "embedding", "reward", "event", "node"}
)

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("flywheel_current", default=None)


_runtime_module: Any = None


def _runtime() -> Any:
    """The runtime module, imported on first use (it imports this module)."""
    global _runtime_module
    if _runtime_module is None:
        from flywheel_middleware import runtime

        _runtime_module = runtime
    return _runtime_module


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _error_field(error: BaseException | str | None) -> str | None:
    """What a record stores for an error given as an exception, a text or nothing."""
    return None if error is None else error if isinstance(error, str) else _error_text(error)


class RolloutHandle(RolloutRecord):
    """An open rollout. Use it as a context manager (sync or async), or ``finish()`` it.

    It is its own record: finishing queues this very object, so nothing is copied on the
    agent's thread (``started_at``/``ended_at`` hold ``time.time_ns()`` until written).
    """

    __slots__ = (
        "unit_id",
        "_config",
        "_resolved",
        "_seq",
        "_lock",
        "_token",
        "_finished",
        "_otel",
        "_recorder",
    )

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
        recorder: Any = None,
        start_ns: int | None = None,
    ) -> None:
        self.id = rollout_id or new_rollout_id()
        self.workflow = workflow
        self.user_id = user_id
        self.session_id = session_id
        self.config_version_id = None
        self.experiment_id = None
        self.variant = None
        self.propensity = None
        self.input = snapshot(input)
        self.output = None
        self.status = "running"
        self.error = None
        self.started_at = start_ns or time.time_ns()
        self.ended_at = None
        self.latency_ms = None
        self.input_tokens = None
        self.output_tokens = None
        self.total_tokens = None
        self.cost = None
        self.reward = None
        self.tags = list(tags) if tags else None
        self.metadata = dict(metadata) if metadata else None
        self.unit_id = unit_id
        self._config: dict[str, Any] | None = None
        self._resolved = False
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._token: contextvars.Token | None = None
        self._finished = False
        self._recorder = recorder
        self._otel = otel.start(f"workflow {workflow}", None, self.started_at)

    @property
    def started_ns(self) -> int:
        return self.started_at

    @property
    def ended_ns(self) -> int | None:
        return self.ended_at

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
                resolver = _runtime().get_resolver()
                unit = self.unit_id or self._unit_for(getattr(resolver, "unit_kind", None))
                resolution = resolver.resolve(self.workflow, unit)
            except Exception:
                resolution = None
            if resolution is not None:
                self._config = resolution.config
                self.config_version_id = resolution.version_id
                self.experiment_id = resolution.experiment_id
                self.variant = resolution.variant
                self.propensity = resolution.propensity
        return self._config if self._config is not None else {}

    def _unit_for(self, unit_kind: Callable[[str], str | None] | None) -> str:
        """The id the experiment randomises over: its ``unit`` (user, session or request)."""
        kind = unit_kind(self.workflow) if unit_kind is not None else None
        if kind == "request":
            return self.id
        if kind == "session_id" and self.session_id:
            return self.session_id
        return self.user_id or self.session_id or self.id

    def set_config(self, config: dict[str, Any], **resolution: Any) -> None:
        """Pin the config (and its version/variant/propensity) chosen elsewhere for this rollout."""
        self._resolved = True
        self._config = config
        for key, value in resolution.items():
            setattr(self, key, value)

    def set_input(self, value: Any) -> None:
        self.input = snapshot(value)

    def set_output(self, value: Any) -> None:
        self.output = snapshot(value)

    def set_metadata(self, key: str, value: Any) -> None:
        if self.metadata is None:
            self.metadata = {}
        self.metadata[key] = value

    def add_usage(
        self, input_tokens: int | None, output_tokens: int | None, cost: float | None = None
    ) -> None:
        with self._lock:
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
        _runtime().feedback(self.id, rating, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def finish(
        self,
        output: Any = None,
        error: BaseException | str | None = None,
        end_ns: int | None = None,
    ) -> None:
        """End the rollout and queue it for the store. Safe to call twice (second is ignored)."""
        if self._finished:
            return
        self._finished = True
        end = self.ended_at = end_ns or time.time_ns()
        if output is not None:
            self.output = snapshot(output)
        if error is not None:
            self.status = "failed"
            self.error = _error_field(error)
        elif self.status == "running":
            self.status = "succeeded"
        self.latency_ms = (end - self.started_at) / 1e6
        if self.input_tokens is not None or self.output_tokens is not None:
            self.total_tokens = (self.input_tokens or 0) + (self.output_tokens or 0)
        if self._otel is not None:
            otel.end(
                self._otel,
                kind="workflow",
                rollout_id=self.id,
                workflow=self.workflow,
                model=None,
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                error=self.error,
                attributes=None,
                end_ns=end,
            )
        _runtime().forget_active(self.id)
        (self._recorder or _runtime().recorder()).enqueue(self)

    def __enter__(self) -> RolloutHandle:
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:
                pass
            self._token = None
        self.finish(error=exc)

    async def __aenter__(self) -> RolloutHandle:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<Rollout {self.id} workflow={self.workflow!r} status={self.status}>"


class _SpanSetters:
    """What an adapter sets on an open span, the same on a ``SpanHandle`` and a ``CallHandle``."""

    __slots__ = ()
    input: Any
    output: Any
    attributes: dict[str, Any] | None
    model: str | None
    input_tokens: int | None
    output_tokens: int | None

    def set_input(self, value: Any) -> None:
        self.input = snapshot(value)

    def set_output(self, value: Any) -> None:
        self.output = snapshot(value)

    def set_attribute(self, key: str, value: Any) -> None:
        if self.attributes is None:
            self.attributes = {}
        self.attributes[key] = value

    def set_model(self, model: str | None) -> None:
        self.model = model

    def set_usage(self, input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens


class SpanHandle(SpanRecord, _SpanSetters):
    """An open span. ``end()`` queues it (it is its own record); ``with`` makes it current."""

    __slots__ = ("rollout", "_token", "_ended", "_otel", "_owns_rollout")

    def __init__(
        self,
        name: str,
        kind: str,
        rollout: RolloutHandle,
        parent: SpanHandle | RolloutHandle | None,
        *,
        node: str | None = None,
        input: Any = None,
        model: str | None = None,
        attributes: dict[str, Any] | None = None,
        start_ns: int | None = None,
        span_id: int | None = None,
    ) -> None:
        self.id = span_id or new_span_id()
        self.rollout = rollout
        self.rollout_id = rollout.id
        self.workflow = rollout.workflow
        self.trace_id = None
        self.parent_id = parent.span_id if parent is not None else None
        self.sequence = next(rollout._seq)
        self.kind = kind
        self.name = name
        self.node = node
        self.status = "ok"
        self.error = None
        self.started_at = start_ns or time.time_ns()
        self.ended_at = None
        self.duration_ms = None
        self.model = model
        self.input = snapshot(input)
        self.output = None
        self.input_tokens = None
        self.output_tokens = None
        self.attributes = dict(attributes) if attributes else None
        self._token: contextvars.Token | None = None
        self._ended = False
        self._owns_rollout = False
        # Spans follow their rollout: OTel is checked once, when the rollout opens.
        parent_otel = parent._otel if parent is not None else rollout._otel
        self._otel = (
            otel.start(name, parent_otel, self.started_at) if parent_otel is not None else None
        )

    @property
    def span_id(self) -> int:
        return self.id

    @property
    def started_ns(self) -> int:
        return self.started_at

    def set_error(self, error: BaseException | str) -> None:
        self.status = "error"
        self.error = _error_field(error)

    def end(
        self,
        output: Any = None,
        error: BaseException | str | None = None,
        end_ns: int | None = None,
    ) -> None:
        """Finish the span and queue it. A second call is ignored."""
        if self._ended:
            return
        self._ended = True
        end = self.ended_at = end_ns or time.time_ns()
        self.duration_ms = (end - self.started_at) / 1e6
        if output is not None:
            self.output = snapshot(output)
        if error is not None:
            self.set_error(error)
        rollout = self.rollout
        if self.input_tokens or self.output_tokens:
            rollout.add_usage(self.input_tokens, self.output_tokens)
        if self._otel is not None:
            otel.end(
                self._otel,
                kind=self.kind,
                rollout_id=rollout.id,
                workflow=rollout.workflow,
                model=self.model,
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                error=self.error,
                attributes=self.attributes,
                end_ns=end,
            )
        (rollout._recorder or _runtime().recorder()).enqueue(self)
        if self._owns_rollout:
            rollout.finish(output=self.output, error=self.error, end_ns=end)

    def activate(self) -> contextvars.Token:
        """Make this span the current parent; pass the token to ``deactivate``."""
        return _current.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token) -> None:
        try:
            _current.reset(token)
        except ValueError:
            pass

    def __enter__(self) -> SpanHandle:
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:
                pass
            self._token = None
        self.end(error=exc)

    async def __aenter__(self) -> SpanHandle:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

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
    workflow: str,
    name: str,
    kind: str,
    start_ns: int,
    *,
    input: Any = None,
    output: Any = None,
    error: BaseException | str | None = None,
    model: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    attributes: dict[str, Any] | None = None,
    node: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Record a finished call that was its own rollout with one span; return the rollout id.

    What an adapter records for a root call that had no children (a model invoked directly):
    both records are built once, at the end, with none of an open rollout's machinery (lock,
    span counter, OTel span, the map of open rollouts), which is most of their cost on the
    agent's thread. ``input`` and ``output`` are stored as given (pass values built for
    them). With an OTel SDK installed the open-handle path runs instead, so OTel sees it.
    """
    end_ns = time.time_ns()
    if otel.tracer() is not None:
        span = open_root_span(
            workflow, name, kind, start_ns, input=input, model=model, attributes=attributes,
            node=node, user_id=user_id, session_id=session_id, tags=tags, metadata=metadata,
        )  # fmt: skip
        span.set_usage(input_tokens, output_tokens)
        span.end(output=output, error=error, end_ns=end_ns)
        return span.rollout_id
    return queue_call(
        workflow, name, kind, node, start_ns, end_ns, model, input, output, _error_field(error),
        input_tokens, output_tokens, attributes, user_id, session_id, tags, metadata,
    )  # fmt: skip


def queue_call(
    workflow: str,
    name: str,
    kind: str,
    node: str | None,
    start_ns: int,
    end_ns: int,
    model: str | None,
    input: Any,
    output: Any,
    error: str | None,
    input_tokens: int | None,
    output_tokens: int | None,
    attributes: dict[str, Any] | None,
    user_id: str | None,
    session_id: str | None,
    tags: list[str] | None,
    metadata: dict[str, Any] | None,
) -> str:
    """``record_call`` without its checks, arguments by position: an adapter's hot path calls
    it directly (keyword arguments and one more call level cost µs in a real agent call).
    The caller has made sure no OTel SDK is installed (``otel.tracer()`` is None)."""
    rollout_id = new_rollout_id()
    call = pack_call(
        (
            new_span_id(), rollout_id, workflow, kind, name, node, error, start_ns, end_ns,
            (end_ns - start_ns) / 1e6, model, input, output, input_tokens, output_tokens,
            attributes, user_id, session_id, tags, metadata,
        )
    )  # fmt: skip  # the order of CallRecord.COLUMNS
    runtime = _runtime()
    runtime.recorder().enqueue(call)
    runtime.note_finished(rollout_id, workflow)
    return rollout_id


class CallHandle(_SpanSetters):
    """An open call that is its own rollout with one span and will never have a child (a
    model call made outside any rollout, its span never made current).

    It has the span's surface an adapter writes to (``model``, ``input_tokens``, ``output``,
    ``set_attribute``, ``end``...) and ends as one ``queue_call``: none of an open rollout's
    machinery (handle, lock, span counter, map of open rollouts, a second record) on the
    agent's thread. Only without an OTel SDK (``otel.tracer()`` is None): with one, adapters
    open real handles so OTel sees the span. ``input`` is snapshotted here, like a span's.
    """

    __slots__ = (
        "workflow",
        "name",
        "kind",
        "started_at",
        "model",
        "input",
        "output",
        "input_tokens",
        "output_tokens",
        "attributes",
        "user_id",
        "session_id",
        "tags",
        "metadata",
        "_ended",
    )

    def __init__(
        self,
        workflow: str,
        name: str,
        kind: str,
        *,
        input: Any = None,
        model: str | None = None,
        attributes: dict[str, Any] | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.workflow = workflow
        self.name = name
        self.kind = kind
        self.started_at = time.time_ns()
        self.model = model
        self.input = snapshot(input)
        self.output: Any = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.attributes = attributes
        self.user_id = user_id
        self.session_id = session_id
        self.tags = list(tags) if tags else None
        self.metadata = dict(metadata) if metadata else None
        self._ended = False

    @property
    def started_ns(self) -> int:
        return self.started_at

    def end(
        self,
        output: Any = None,
        error: BaseException | str | None = None,
        end_ns: int | None = None,
    ) -> None:
        """Queue the call's rollout and span. A second call is ignored."""
        if self._ended:
            return
        self._ended = True
        if output is not None:
            self.output = snapshot(output)
        queue_call(
            self.workflow, self.name, self.kind, None, self.started_at, end_ns or time.time_ns(),
            self.model, self.input, self.output, _error_field(error), self.input_tokens,
            self.output_tokens, self.attributes, self.user_id, self.session_id, self.tags,
            self.metadata,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<Call {self.kind}:{self.name} workflow={self.workflow!r}>"


def open_root_span(
    workflow: str,
    name: str,
    kind: str,
    start_ns: int,
    *,
    input: Any = None,
    model: str | None = None,
    attributes: dict[str, Any] | None = None,
    node: str | None = None,
    **rollout_fields: Any,
) -> SpanHandle:
    """Open a rollout and the span that owns it (ending the span finishes the rollout), both
    started at ``start_ns``; ``input`` and ``attributes`` are stored as given.
    ``rollout_fields``: user_id, session_id, tags, metadata."""
    rollout = open_rollout(workflow, input=input, start_ns=start_ns, **rollout_fields)
    span = SpanHandle(name, kind, rollout, None, node=node, model=model, start_ns=start_ns)
    span._owns_rollout = True
    span.input = input
    span.attributes = attributes
    return span


def open_rollout(workflow: str, **kwargs: Any) -> RolloutHandle:
    """Open a rollout without making it current (for adapters driven by callbacks)."""
    handle = RolloutHandle(workflow, **kwargs)
    _runtime().remember_active(handle)
    return handle


def rollout(
    workflow: str,
    *,
    user_id: str | None = None,
    session_id: str | None = None,
    input: Any = None,
    tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    unit_id: str | None = None,
) -> RolloutHandle:
    """Open a rollout; use it with ``with`` or ``async with`` so adapters inside attach to it."""
    return open_rollout(
        workflow,
        user_id=user_id,
        session_id=session_id,
        input=input,
        tags=tags,
        metadata=metadata,
        unit_id=unit_id,
    )


def start_span(
    name: str,
    kind: str = "chain",
    *,
    parent: SpanHandle | RolloutHandle | None = None,
    rollout: RolloutHandle | None = None,
    workflow: str | None = None,
    **kwargs: Any,
) -> SpanHandle:
    """Start a span without making it current.

    The parent is ``parent`` if given, else the current span. With no rollout at all, one is
    opened implicitly for ``workflow`` (default: the span's name) and finished with the span.
    """
    if parent is None and rollout is None:
        parent = _current.get()
    if rollout is None:
        rollout = parent.rollout if parent is not None else None
    if rollout is None:
        rollout = open_rollout(workflow or name, input=kwargs.get("input"))
        span = SpanHandle(name, kind, rollout, None, **kwargs)
        span._owns_rollout = True
        return span
    return SpanHandle(name, kind, rollout, parent, **kwargs)


def span(
    name: str,
    kind: str = "chain",
    *,
    node: str | None = None,
    input: Any = None,
    model: str | None = None,
    attributes: dict[str, Any] | None = None,
    workflow: str | None = None,
) -> SpanHandle:
    """A span under the current span or rollout; use with ``with`` / ``async with``."""
    return start_span(
        name, kind, node=node, input=input, model=model, attributes=attributes, workflow=workflow
    )


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
