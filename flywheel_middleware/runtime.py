"""Process-wide state behind the public API: the configuration, the store, the recorder.

Everything is created lazily on first use, so importing flywheel_middleware costs nothing
and an adapter used before ``configure`` still records into the embedded default store.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flywheel_middleware.capture import backend, otel_mirror
from flywheel_middleware.capture.records import FeedbackRecord, Record, utcnow
from flywheel_middleware.errors import InvalidFeedbackError, UnknownRolloutError, safe_url
from flywheel_middleware.tables import FEEDBACK, MAX_CLIENT_ID, client_uid

if TYPE_CHECKING:
    from flywheel_middleware.config import FlywheelConfig
    from flywheel_middleware.learn.routing import RouteDecision
    from flywheel_middleware.loop.resolver import Resolution
    from flywheel_middleware.recording.recorder import Recorder
    from flywheel_middleware.store.database import Store

log = logging.getLogger("flywheel_middleware")

FEEDBACK_SOURCES = ("explicit", "implicit", "rule", "judge", "business")
_THUMBS = {
    "up": 1.0,
    "down": 0.0,
    True: 1.0,
    False: 0.0,
    "+1": 1.0,
    "-1": 0.0,
}  # 1 == True, 0 == False


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.config: FlywheelConfig | None = None
        self.store_url: str | None = None
        self.store: Store | None = None
        self.recorder: Recorder | None = None
        self.resolver: Any = None
        # Rollouts open in this process, and finished ones not yet confirmed written (id ->
        # workflow): feedback for them is accepted without asking the store.
        self.active: OrderedDict[str, str] = OrderedDict()
        self.recent: OrderedDict[str, str] = OrderedDict()


_state = _State()
_MAX_KNOWN = 100_000  # rollout ids kept in each of _State.active and _State.recent


def _reset_after_fork() -> None:
    global _state
    old = _state
    _state = _State()
    _state.config = old.config
    _state.store_url = old.store_url


os.register_at_fork(after_in_child=_reset_after_fork)


def configure(
    path: str | os.PathLike[str] | None = None,
    *,
    store_url: str | None = None,
    config: FlywheelConfig | dict[str, Any] | str | None = None,
    otel: bool | None = None,
    **recorder_options: Any,
) -> FlywheelConfig:
    """Load configuration and (re)open the store. Call once at start-up.

    ``path`` is a YAML file; ``config`` may instead be a parsed config, a dict or YAML text.
    ``store_url`` (or ``FLYWHEEL_STORE_URL``) overrides the file's store. ``otel=True`` (or
    ``otel: {emit: true}`` in the YAML) mirrors rollouts and spans into OpenTelemetry.
    """
    from flywheel_middleware.config import (
        FlywheelConfig,
        config_from_dict,
        load_config,
        parse_config,
    )
    from flywheel_middleware.store.database import Store

    if config is None:
        cfg = load_config(path)
    elif isinstance(config, FlywheelConfig):
        cfg = config.model_copy(deep=True)  # the options below must not change the caller's
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    else:
        cfg = parse_config(config)
    for key, value in recorder_options.items():
        if key not in type(cfg.store).model_fields:
            raise TypeError(f"configure() got an unknown option {key!r}")
        setattr(cfg.store, key, value)
    if otel is not None:
        cfg.otel.emit = otel
    url = store_url or os.environ.get("FLYWHEEL_STORE_URL") or cfg.store.url
    store = Store(url)  # opens (and migrates) now, so a bad URL fails here with a clear error
    shutdown()
    with _state.lock:
        _state.config = cfg
        _state.store_url = url
        _state.store = store
        _state.resolver = None
        otel_mirror.set_enabled(cfg.otel.emit)
    if cfg.store.handle_signals:  # here, on the main thread as a rule, not at the first record
        from flywheel_middleware.recording import exits

        exits.install_signal_handlers()
    return cfg


def get_config() -> FlywheelConfig:
    """The process's configuration (``./flywheel.yaml`` or defaults until ``configure``)."""
    with _state.lock:
        if _state.config is None:
            from flywheel_middleware.config import load_config

            _state.config = load_config()
            otel_mirror.set_enabled(_state.config.otel.emit)
        return _state.config


def get_store() -> Store:
    """The process's store (opened, and its schema brought to head, on first use)."""
    store = _unopened_store()
    store.ensure_schema()
    return store


def _unopened_store() -> Store:
    """The process's store without touching the database: what the capture path uses, so
    a store that is down at start-up never holds up an agent (the recorder's and the
    resolver's threads connect, and retry)."""
    return _state.store or _create_once("store", _open_store)


def get_recorder() -> Recorder:
    """The process's recorder (started on first use, restarted after a fork)."""
    return _state.recorder or _create_once("recorder", _start_recorder)


def _create_once(name: str, create: Any) -> Any:
    """``_state.<name>``, made by ``create()`` by the first thread to get here."""
    with _state.lock:
        if getattr(_state, name) is None:
            setattr(_state, name, create())
        return getattr(_state, name)


def _open_store() -> Store:
    from flywheel_middleware.store.database import Store

    url = _state.store_url or os.environ.get("FLYWHEEL_STORE_URL") or get_config().store.url
    _state.store_url = url
    return Store(url, migrate=False)


def _start_recorder() -> Recorder:
    from flywheel_middleware.plugin_system.manager import install_redaction
    from flywheel_middleware.recording.recorder import Recorder
    from flywheel_middleware.recording.secrets import secret_redactor

    cfg = get_config().store
    recorder = Recorder(
        _unopened_store(),
        queue_size=cfg.queue_size,
        batch_size=cfg.batch_size,
        flush_interval=cfg.flush_interval,
        spill_dir=_journal_base(),
        exit_timeout=cfg.exit_timeout,
        writer=os.environ.get("FLYWHEEL_WRITER") or cfg.writer,
        durability=cfg.durability,
        journal_interval=cfg.journal_interval,
        max_buffer_mb=cfg.max_buffer_mb,
        handle_signals=cfg.handle_signals,
        secrets=secret_redactor(get_config().redaction),
    )
    recorder.add_listener(_check_triggers, tables=("feedback",))
    recorder.add_listener(_report_unknown_rollouts, tables=("feedback",))
    install_redaction(recorder, get_config())  # redact_span hooks and YAML redactors
    return recorder


def flush(timeout: float | None = 30.0) -> bool:
    """Write everything recorded so far, and whatever an earlier process left in the
    store's journal; True when it all reached the store in time."""
    rec = _state.recorder
    if rec is None:
        from flywheel_middleware.recording.journal import has_orphans, journal_dir

        store = _unopened_store()
        folder = journal_dir(store.url, store.sqlite_path, _journal_base())
        if not has_orphans(folder):
            return True
        rec = get_recorder()
    return rec.flush(timeout)


def _journal_base() -> str | None:
    return get_config().store.spill_dir or os.environ.get("FLYWHEEL_SPILL_DIR")


def shutdown() -> None:
    """Flush and stop the recorder and close the store (also happens at interpreter exit)."""
    with _state.lock:
        recorder, _state.recorder = _state.recorder, None
        store, _state.store = _state.store, None
    # Closed outside the lock: the writer's listeners (triggers) may need it to finish.
    if recorder is not None:
        recorder.close()
    if store is not None:
        store.dispose()
    _state.active.clear()
    _state.recent.clear()


# -- resolver -------------------------------------------------------------------------------


def set_resolver(resolver: Any) -> None:
    """Install the object whose ``resolve(workflow, unit_id)`` picks each request's config
    (and, optionally, whose ``unit_kind(workflow)`` names what an experiment randomises)."""
    _state.resolver = resolver


def get_resolver() -> Any:
    """The installed resolver, else the loop's: versions and experiments from the store."""
    if _state.resolver is None:
        from flywheel_middleware.loop.versions import StoreResolver

        _state.resolver = StoreResolver(_unopened_store(), get_config())
    return _state.resolver


def resolve(workflow: str, unit_id: str | None = None) -> Resolution | None:
    return get_resolver().resolve(workflow, unit_id)


def _unit_of(handle: Any, unit_kind: str | None) -> str:
    """The id an experiment randomises over: its ``unit`` (user, session or request)."""
    if handle.unit_id:
        return handle.unit_id
    if unit_kind == "request":
        return handle.id
    if unit_kind == "session_id" and handle.session_id:
        return handle.session_id
    return handle.user_id or handle.session_id or handle.id


# -- what capture hands over ----------------------------------------------------------------


class ProcessBackend:
    """The capture layer's backend in this process (see ``capture.backend``)."""

    def enqueue(self, record: Any) -> None:
        (_state.recorder or get_recorder()).enqueue(record)

    def rollout_opened(self, rollout_id: str, workflow: str) -> None:
        active = _state.active
        active[rollout_id] = workflow
        if len(active) > _MAX_KNOWN:  # spans a host never ended: forget the oldest
            active.popitem(last=False)

    def rollout_finished(self, rollout_id: str, workflow: str) -> None:
        _state.active.pop(rollout_id, None)
        recent = _state.recent
        recent[rollout_id] = workflow
        if len(recent) > _MAX_KNOWN:
            recent.popitem(last=False)

    def resolve(self, handle: Any) -> Resolution | None:
        resolver = get_resolver()
        unit_kind = getattr(resolver, "unit_kind", None)  # optional in a user's resolver
        unit = _unit_of(handle, unit_kind(handle.workflow) if unit_kind is not None else None)
        return resolver.resolve(handle.workflow, unit)

    def feedback(self, rollout_id: str, rating: Any = None, **kwargs: Any) -> None:
        feedback(rollout_id, rating, **kwargs)

    def otel_emit(self) -> bool:
        return get_config().otel.emit


backend.install(ProcessBackend())


def _rollout_known(rollout_id: str) -> bool:
    """Whether ``rollout_id`` is a rollout of this process or of the store. A store that
    cannot answer (down, timing out) is not held against the caller: the feedback is kept,
    and the writer reports it if the rollout never turns up."""
    if rollout_id in _state.active or rollout_id in _state.recent:
        return True
    from flywheel_middleware.store.queries import missing_rollouts

    try:
        return not missing_rollouts(get_store(), {rollout_id})
    except Exception as exc:
        log.warning("flywheel: could not look rollout %s up (%s); feedback kept", rollout_id, exc)
        return True


# -- feedback -------------------------------------------------------------------------------


def feedback(
    rollout_id: str,
    rating: Any = None,
    *,
    key: str | None = None,
    value: float | bool | None = None,
    thumbs: Any = None,
    comment: str | None = None,
    source: str = "explicit",
    span_id: int | None = None,
    user_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    id: str | None = None,
    check_rollout: bool = True,
) -> None:
    """Record a signal about a rollout: a 1–5 rating, a thumb, a comment or any keyed value.

    ``id`` is the caller's name for this feedback: given again with the same id about the same
    rollout (a retried request, a redelivered webhook), it is stored once.

    Raises InvalidFeedbackError for a bad value and UnknownRolloutError for an unknown rollout;
    nothing is stored in either case. ``check_rollout=False`` skips the rollout lookup (the
    service's path: a request never waits on the database), and the writer reports feedback
    about a rollout it never saw.
    """
    rollout_id = getattr(rollout_id, "id", rollout_id)  # accept the rollout handle itself
    if not isinstance(rollout_id, str) or not rollout_id:
        raise InvalidFeedbackError(f"rollout_id must be a non-empty string, got {rollout_id!r}")
    if source not in FEEDBACK_SOURCES:
        raise InvalidFeedbackError(
            f"feedback source {source!r} is not one of {', '.join(FEEDBACK_SOURCES)}"
        )
    chosen = [
        name for name, v in (("rating", rating), ("thumbs", thumbs), ("key", key)) if v is not None
    ]
    if len(chosen) > 1:
        raise InvalidFeedbackError(
            f"give one of rating=, thumbs= or key=, not {' and '.join(chosen)}"
        )
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, int | float) or math.isnan(rating):
            raise InvalidFeedbackError(f"rating must be a number from 1 to 5, got {rating!r}")
        if not 1 <= rating <= 5:
            raise InvalidFeedbackError(f"rating must be between 1 and 5, got {rating!r}")
        key, num = "rating", float(rating)
    elif thumbs is not None:
        if thumbs not in _THUMBS:
            raise InvalidFeedbackError(
                f"thumbs must be 'up' or 'down' (or True/False), got {thumbs!r}"
            )
        key, num = "thumbs", _THUMBS[thumbs]
    elif key is not None:
        if not isinstance(key, str) or not key.strip() or len(key) > 100:
            raise InvalidFeedbackError(
                f"feedback key must be a short non-empty string, got {key!r}"
            )
        if value is None:
            num = None
        elif (
            isinstance(value, bool)
            or isinstance(value, int | float)
            and not math.isnan(value)
            and not math.isinf(value)
        ):
            num = float(value)
        else:
            raise InvalidFeedbackError(
                f"feedback value for {key!r} must be a finite number, got {value!r}"
            )
    elif comment is not None:
        key, num = "comment", None
    else:
        raise InvalidFeedbackError("feedback needs rating=, thumbs=, key= or comment=")
    if comment is not None and not isinstance(comment, str):
        raise InvalidFeedbackError(f"comment must be a string, got {type(comment).__name__}")
    if id is not None and (not isinstance(id, str) or not id or len(id) > MAX_CLIENT_ID):
        raise InvalidFeedbackError(
            f"feedback id must be a non-empty string of at most {MAX_CLIENT_ID} characters, "
            f"got {id!r}"
        )
    if check_rollout and not _rollout_known(rollout_id):
        raise UnknownRolloutError(
            f"no rollout with id {rollout_id!r} in {safe_url(get_store().url)}"
        )
    record = FeedbackRecord(
        rollout_id=rollout_id,
        span_id=span_id,
        source=source,
        key=key,
        value=num,
        comment=comment,
        user_id=user_id,
        created_at=utcnow(),
        metadata=metadata,
        uid=client_uid(FEEDBACK.name, id, rollout_id) if id is not None else None,
    )
    get_recorder().enqueue(record)


# -- work done on the writer thread after each batch ----------------------------------------


def _check_triggers(by_table: dict[str, list[Record]]) -> None:
    """Check the low-rating improvement triggers when new ratings land (on the writer
    thread, never the agent's; the loop is imported only then)."""
    ratings = [r for r in by_table.get("feedback", ()) if r.key == "rating"]
    if not ratings:
        return
    from flywheel_middleware.loop.triggers import check_low_rating_triggers

    check_low_rating_triggers(get_store(), get_config(), {r.rollout_id for r in ratings})


def _report_unknown_rollouts(by_table: dict[str, list[Record]]) -> None:
    """Feedback accepted without a lookup (the service's, or while the store was down)
    about a rollout the store does not have: said once per batch, on the writer thread."""
    ids = {r.rollout_id for r in by_table.get("feedback", ())}
    ids -= {*_state.active, *_state.recent}
    if not ids:
        return
    from flywheel_middleware.store.queries import missing_rollouts

    missing = missing_rollouts(get_store(), ids)
    if missing:
        log.warning(
            "flywheel: feedback about %d rollouts the store does not have (yet), e.g. %s",
            len(missing),
            min(missing),
        )


# -- adaptive routing -----------------------------------------------------------------------


def route(
    skills: Sequence[str] | str = (),
    *,
    load: dict[str, float] | None = None,
    rollout: Any = None,
) -> RouteDecision:
    """Choose an agent for a request needing ``skills`` (Thompson sampling over
    ``routing.agents``) and record the choice on ``rollout`` (default: the current rollout);
    ``load`` overrides this process's in-flight counts (``decision.release()`` or ``with``)."""
    from flywheel_middleware.learn import routing

    return routing.route(get_store(), get_config(), skills, load=load, rollout=rollout)
