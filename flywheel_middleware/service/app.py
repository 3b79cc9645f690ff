"""The HTTP service: telemetry and feedback ingestion, the resolver for non-Python apps, the dashboard.

Rules it keeps:
- writes need a write key (``X-API-Key``, ``Authorization: Bearer``, or ``?key=`` because
  ``navigator.sendBeacon`` cannot set headers); keys come from ``FLYWHEEL_API_KEYS``
  (comma-separated) and ``service.api_keys``; read keys (``FLYWHEEL_READ_KEYS``,
  ``service.read_keys``) and write keys may read the dashboard's JSON and the resolver, which
  are open only when no key is configured at all;
- a browser write from another origin must be on ``service.cors_origins``;
- bodies are bounded (``service.max_body_bytes``, ``service.max_batch_events``, field lengths),
  and so is their JSON's shape (``service.max_json_*``), checked before anything recurses;
- the whole batch is validated before any event is queued, so bad input is a 4xx that names
  the field and stores nothing; nothing a client sends can produce a 5xx;
- ingestion never touches the database: accepted records go to the recorder's queue (its
  writer batches them into the store), so neither a burst nor an outage holds a request;
- dashboard views are computed one at a time off the request threads and cached briefly
  (``views.ViewCache``), so they cannot starve the resolver.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel_middleware import runtime
from flywheel_middleware.capture.otlp_spans import as_rollout_id
from flywheel_middleware.capture.records import TelemetryRecord
from flywheel_middleware.environment import env_number
from flywheel_middleware.errors import InvalidFeedbackError
from flywheel_middleware.recording.recorder import Receipt
from flywheel_middleware.service.schemas import FeedbackIn, TelemetryBatchIn, TelemetryEventIn
from flywheel_middleware.service.views import ViewCache, ViewsBusy
from flywheel_middleware.tables import TELEMETRY_EVENT, client_uid

log = logging.getLogger("flywheel_middleware.service")

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEYS_ENV = "FLYWHEEL_API_KEYS"
ACK_TIMEOUT_ENV = "FLYWHEEL_ACK_TIMEOUT"
READ_KEYS_ENV = "FLYWHEEL_READ_KEYS"
READ_PATHS = ("/v1/dashboard/", "/v1/config/")  # need a read key once any key is configured
READ_KEY_MISSING = (
    "missing or wrong API key: send a read or write key as X-API-Key, "
    "Authorization: Bearer KEY, or ?key=KEY"
)
ACCEPTED_TYPES = ("application/json", "text/plain", "")
DASHBOARD_TTL = 5.0  # seconds a dashboard response is served as it is


class ApiError(Exception):
    """A client error with a status and a message that says what is wrong."""

    def __init__(self, status: int, error: str, problems: list[str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.problems = problems or []


def _error_body(status: int, error: str, problems: list[str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": error}
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=status)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(body)"


def format_validation(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: where, what, and the value that was given (shortened)."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _loc(loc)
        if prefix:
            where = (
                prefix + ("" if where.startswith("[") else ".") + where
                if where != "(body)"
                else prefix
            )
        got = err.get("input")
        shown = ""
        if err["type"] not in ("missing",) and not isinstance(got, dict | list):
            text = repr(got)
            shown = f" (got {text[:60]}{'…' if len(text) > 60 else ''})"
        lines.append(f"{where}: {err['msg']}{shown}")
    return lines[:50]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on a body's JSON shape (``service.max_json_*``), checked before anything recurses."""

    depth: int = 64
    keys: int = 1_000
    items: int = 10_000


# a string (and the colon that makes it a key), or a bracket or comma outside strings
_JSON_TOKEN = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")(\s*:)?|[\[\]{},]')


def _short_path(path: list[Any], text: str) -> str:
    """The first steps of a path kept by ``check_depth`` (keys as match spans), for a message."""
    parts: list[Any] = []
    for step in path[:4]:
        if isinstance(step, tuple):
            raw = text[step[0] : step[1]]
            try:
                key = json.loads(raw)
            except ValueError:
                key = raw.strip('"')
            parts.append(str(key)[:40])
        elif step is not None:
            parts.append(step)
    return _loc(tuple(parts)) + ("…" if len(path) > 4 else "")


def check_depth(text: str, limit: int) -> None:
    """Refuse JSON text nested deeper than ``limit``, naming where, without parsing it."""
    path: list[Any] = []  # per open container: an index (array), a key's span or None (object)
    for m in _JSON_TOKEN.finditer(text):
        c = text[m.start()]
        if c == '"':
            if m.group(2) and path and not isinstance(path[-1], int):
                path[-1] = m.span(1)
        elif c in "[{":
            if len(path) >= limit:
                where = _short_path(path, text)
                raise ApiError(
                    413,
                    f"{where}: JSON nested deeper than {limit} levels (service.max_json_depth)",
                )
            path.append(0 if c == "[" else None)
        elif c in "]}":
            if path:
                path.pop()
        elif path and isinstance(path[-1], int):
            path[-1] += 1


def parse_json(body: bytes, limits: JsonLimits = JsonLimits()) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"the body is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    if not text.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    check_depth(text, limits.depth)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(413, "the body's JSON is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    check_json(data, limits)
    return data


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate"
    return None


def check_json(value: Any, limits: JsonLimits = JsonLimits()) -> None:
    """Refuse what no store can keep (NUL, lone surrogates, keys included) and objects or bodies
    with more keys or values than ``limits``, naming where; iterative, so depth costs no stack."""
    stack: list[tuple[Any, str]] = [(value, "")]
    items = 0
    while stack:
        node, where = stack.pop()
        items += 1
        if items > limits.items:
            raise ApiError(
                413,
                f"{where or '(body)'}: the body holds more than {limits.items} JSON values "
                "(service.max_json_items)",
            )
        if isinstance(node, str):
            problem = _bad_text(node)
            if problem:
                raise ApiError(422, f"{where or '(body)'}: the text {problem}")
        elif isinstance(node, dict):
            if len(node) > limits.keys:
                raise ApiError(
                    413,
                    f"{where or '(body)'}: an object with {len(node)} keys; the limit is "
                    f"{limits.keys} (service.max_json_keys)",
                )
            children = []
            for k, v in node.items():
                problem = _bad_text(k)
                if problem:
                    raise ApiError(422, f"{where or '(body)'}: a key {problem}")
                children.append((v, f"{where}.{k}" if where else k))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(node))))


_event_list = TypeAdapter(list[TelemetryEventIn])


def parse_telemetry(data: Any, max_events: int) -> list[TelemetryEventIn]:
    """Every event of the body, with envelope defaults applied; raises ApiError on any problem."""
    defaults: dict[str, Any] = {}
    try:
        if isinstance(data, list):
            if len(data) > max_events:
                raise ApiError(
                    413, f"a batch may hold at most {max_events} events; got {len(data)}"
                )
            events = _event_list.validate_python(data)
        elif isinstance(data, dict) and "events" in data:
            raw = data.get("events")
            if isinstance(raw, list) and len(raw) > max_events:
                raise ApiError(413, f"a batch may hold at most {max_events} events; got {len(raw)}")
            batch = TelemetryBatchIn.model_validate(data)
            events = batch.events
            defaults = {"session_id": batch.session_id, "rollout_id": batch.rollout_id}
        elif isinstance(data, dict):
            events = [TelemetryEventIn.model_validate(data)]
        else:
            raise ApiError(
                422,
                'the body must be an event object, a list of events, or {"events": [...]}; '
                f"got a JSON {type(data).__name__}",
            )
    except ValidationError as exc:
        raise ApiError(422, "invalid telemetry", format_validation(exc)) from None
    if not events:
        raise ApiError(422, "the batch has no events")
    problems = []
    for i, ev in enumerate(events):
        if ev.session_id is None and defaults.get("session_id") is not None:
            ev.session_id = defaults["session_id"]
        if ev.rollout_id is None and defaults.get("rollout_id") is not None:
            ev.rollout_id = defaults["rollout_id"]
        if ev.session_id is None and ev.rollout_id is None:
            problems.append(
                f"events[{i}]: needs a rollout_id or a session_id (on the event or the batch)"
            )
    if problems:
        raise ApiError(422, "invalid telemetry", problems)
    return events


def _keys(env: str, *sources: list[str] | None) -> list[str]:
    from_env = [k.strip() for k in os.environ.get(env, "").split(",")]
    return [k for k in [*from_env, *(k for src in sources for k in (src or []))] if k]


def _matches(given: str | None, keys: list[str]) -> bool:
    if not given:
        return False
    g = given.encode()
    ok = False
    for key in keys:  # compare with every key in constant time
        ok |= hmac.compare_digest(g, key.encode())
    return ok


class Settings:
    """The service's settings, resolved once from the config, the environment and arguments."""

    def __init__(
        self,
        config: Any,
        api_keys: list[str] | None = None,
        cors_origins: list[str] | None = None,
        read_keys: list[str] | None = None,
    ) -> None:
        svc = config.service
        self.api_keys = _keys(API_KEYS_ENV, svc.api_keys, api_keys)
        self.read_keys = _keys(READ_KEYS_ENV, svc.read_keys, read_keys)
        self.cors_origins = list(dict.fromkeys([*svc.cors_origins, *(cors_origins or [])]))
        self.max_body_bytes = svc.max_body_bytes
        self.max_batch_events = svc.max_batch_events
        self.json_limits = JsonLimits(svc.max_json_depth, svc.max_json_keys, svc.max_json_items)
        self.ack_timeout = env_number(ACK_TIMEOUT_ENV, 10.0)

    def key_ok(self, given: str | None) -> bool:
        """May read: a write key or a read key."""
        return _matches(given, self.api_keys) | _matches(given, self.read_keys)

    def write_key_ok(self, given: str | None) -> bool:
        return _matches(given, self.api_keys)

    @property
    def reads_open(self) -> bool:
        """With no key configured at all (the offline demo), anyone may read."""
        return not self.api_keys and not self.read_keys

    def origin_ok(self, origin: str, own: str) -> bool:
        return origin == own or "*" in self.cors_origins or origin in self.cors_origins


def _given_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("key")


def require_write_key(settings: Settings, request: Request) -> None:
    """Refuse a write without a write key, or from a browser origin not allowed (ApiError)."""
    if not settings.api_keys:
        raise ApiError(
            401,
            f"this service has no API keys configured; set {API_KEYS_ENV} or service.api_keys",
        )
    given = _given_key(request)
    if not settings.write_key_ok(given):
        if settings.key_ok(given):
            raise ApiError(403, "this API key may only read; writes need a write key")
        raise ApiError(
            401,
            "missing or wrong API key: send X-API-Key, Authorization: Bearer KEY, or ?key=KEY",
        )
    origin = request.headers.get("origin")
    if origin and origin != "null":
        own = f"{request.url.scheme}://{request.url.netloc}"
        if not settings.origin_ok(origin, own):
            raise ApiError(403, f"origin {origin!r} is not in service.cors_origins")


def kept_or_503(receipt: Receipt, timeout: float) -> None:
    """Return once a request's records are kept (on the service's local disk or in the
    store), so an acknowledged write survives the process being killed; a 503 (the client
    retries) when neither takes them within ``timeout`` seconds (``Settings.ack_timeout``:
    ``FLYWHEEL_ACK_TIMEOUT``, default 10)."""
    if not receipt.kept(timeout):
        raise ApiError(
            503,
            "the service could not keep the records in time: its journal refuses writes "
            "and the store does not answer; retry later",
        )


async def acknowledge(receipt: Receipt, timeout: float) -> None:
    """``kept_or_503`` off the event loop."""
    await run_in_threadpool(kept_or_503, receipt, timeout)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, f"the body is {size} bytes; the limit is {limit}")
    chunks = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class ReadGuard:
    """ASGI middleware: once any key is configured, READ_PATHS need a read or a write key."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(READ_PATHS)
            and not self.settings.reads_open
            and not self.settings.key_ok(_given_key(Request(scope)))
        ):
            response = _error_body(401, READ_KEY_MISSING)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    config: Any = None,
    *,
    api_keys: list[str] | None = None,
    cors_origins: list[str] | None = None,
    read_keys: list[str] | None = None,
) -> FastAPI:
    """The ASGI app. It uses the process runtime (``fw.configure``) for the store and recorder."""
    from flywheel_middleware import __version__

    cfg = config if config is not None else runtime.get_config()
    settings = Settings(cfg, api_keys, cors_origins, read_keys)
    views = ViewCache(DASHBOARD_TTL)
    from flywheel_middleware.service import otlp

    otlp_routes, otlp_traces = otlp.otlp_router(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:  # open the store and start the recorder now, not in a request that queues a record
            await run_in_threadpool(runtime.get_recorder)
        except Exception as exc:
            log.warning("flywheel service: the recorder did not start yet: %s", exc)
        otlp_traces.start()
        yield
        await run_in_threadpool(otlp_traces.stop)  # open traces' rollouts go to the recorder

    app = FastAPIOffline(  # /docs from assets in the package: no CDN
        redoc_url=None,  # Redoc's bundle fetches its logo from a CDN
        lifespan=lifespan,
        title="flywheel-middleware",
        version=__version__,
        description=(
            "Ingest implicit telemetry and explicit feedback, resolve workflow configs, "
            "and show the flywheel's dashboard. Writes need an API key (X-API-Key header, "
            "Authorization: Bearer, or ?key= for navigator.sendBeacon); the dashboard's JSON and "
            "the resolver need a read or write key once any key is configured."
        ),
    )
    app.state.settings = settings
    app.state.config = cfg
    app.add_middleware(ReadGuard, settings=settings)  # inside CORS: preflights never need a key
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Content-Type", "X-API-Key", "Authorization"],
        max_age=600,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_body(exc.status, exc.error, exc.problems)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            problems.append(f"{_loc(tuple(err.get('loc', ())))}: {err.get('msg')}")
        return _error_body(422, "invalid request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_body(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        log.exception("flywheel service error")
        return _error_body(500, f"internal error: {type(exc).__name__}")

    def check_write(request: Request) -> None:
        require_write_key(settings, request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            raise ApiError(
                415,
                f"content type {ctype!r} is not accepted; send application/json or text/plain JSON",
            )

    json_body = {"application/json": {}, "text/plain": {}}

    @app.post(
        "/v1/telemetry",
        status_code=202,
        summary="Ingest UI telemetry events (a single event, a list, or a batch envelope)",
        openapi_extra={"requestBody": {"required": True, "content": json_body}},
        responses={
            202: {"description": "kept: on the service's local disk (its journal) or in the store"},
            503: {},
            401: {},
            403: {},
            413: {},
            415: {},
            422: {},
        },
        tags=["ingest"],
    )
    async def telemetry(request: Request) -> JSONResponse:
        check_write(request)
        body = await read_body(request, settings.max_body_bytes)
        data = parse_json(body, settings.json_limits)
        events = parse_telemetry(data, settings.max_batch_events)
        rec = runtime.get_recorder()
        receipt = rec.receipt()
        now = time.time_ns()
        for ev in events:  # all validated: now queue every one
            rec.enqueue(
                TelemetryRecord(
                    session_id=ev.session_id,
                    rollout_id=as_rollout_id(ev.rollout_id) if ev.rollout_id else None,
                    event_type=ev.event_type,
                    payload=ev.payload,
                    client_ts=float(ev.client_ts) if ev.client_ts is not None else None,
                    received_at=now,
                    uid=client_uid(TELEMETRY_EVENT.name, ev.id, ev.session_id, ev.rollout_id)
                    if ev.id is not None
                    else None,
                )
            )
        await acknowledge(receipt, settings.ack_timeout)
        return JSONResponse({"accepted": len(events)}, status_code=202)

    @app.post(
        "/v1/feedback",
        status_code=202,
        summary="Record explicit feedback about a rollout (kept at once; the rollout is not looked up)",
        openapi_extra={"requestBody": {"required": True, "content": json_body}},
        responses={
            202: {"description": "kept: on the service's local disk (its journal) or in the store"},
            503: {},
            401: {},
            403: {},
            413: {},
            415: {},
            422: {},
        },
        tags=["ingest"],
    )
    async def feedback(request: Request) -> JSONResponse:
        check_write(request)
        body = await read_body(request, settings.max_body_bytes)
        data = parse_json(body, settings.json_limits)
        if not isinstance(data, dict):
            raise ApiError(422, f"the body must be a JSON object; got a JSON {type(data).__name__}")
        try:
            fb = FeedbackIn.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, "invalid feedback", format_validation(exc)) from None
        kwargs = fb.model_dump(exclude={"rollout_id", "rating"}, exclude_none=True)
        rollout_id = as_rollout_id(fb.rollout_id)  # an OTel trace id names its ingested rollout
        receipt = runtime.get_recorder().receipt()
        try:  # no database on this path: the recorder's journal keeps it, even during an outage
            runtime.feedback(rollout_id, fb.rating, check_rollout=False, **kwargs)
        except InvalidFeedbackError as exc:
            raise ApiError(422, str(exc)) from None
        await acknowledge(receipt, settings.ack_timeout)
        return JSONResponse({"accepted": 1}, status_code=202)

    @app.get(
        "/v1/config/{workflow}",
        summary="The workflow config this unit (user, session or request id) should use",
        responses={401: {}, 404: {}},
        tags=["resolver"],
    )
    def config_for(workflow: str, request: Request, unit: str | None = None) -> JSONResponse:
        if settings.api_keys and not settings.key_ok(_given_key(request)):
            raise ApiError(401, READ_KEY_MISSING)
        if len(workflow) > 200 or (unit is not None and len(unit) > 200):
            raise ApiError(422, "workflow and unit are at most 200 characters")
        from flywheel_middleware.loop.versions import stored_config

        resolution = runtime.resolve(workflow, unit)
        if resolution is None:
            raise ApiError(404, f"unknown workflow {workflow!r}")
        # the stored config: ${VAR} references, never the values this process filled in
        config = stored_config(runtime.get_store(), runtime.get_config(), workflow, resolution)
        return JSONResponse(
            {
                "workflow": workflow,
                "unit": unit,
                "config": config,
                "version_id": resolution.version_id,
                "experiment_id": resolution.experiment_id,
                "variant": resolution.variant,
                "propensity": resolution.propensity,
            }
        )

    @app.get("/v1/health", summary="Liveness, the store, and the recorder's counters", tags=["ops"])
    def health() -> JSONResponse:
        rec = runtime.get_recorder()
        body: dict[str, Any] = {"status": "ok", "version": __version__}
        try:
            store = runtime.get_store()
            store.execute("SELECT 1")
            body["store"] = store.dialect
        except Exception as exc:
            body["status"] = "degraded"
            body["store_error"] = f"{type(exc).__name__}: {exc}"
        counters = rec.counters
        body["recorder"] = {
            "pending": rec.pending,
            "queued": counters.queued,
            "written": counters.written,
            "spilled": counters.spilled,
            "last_error": counters.last_error,
        }
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    # -- dashboard -----------------------------------------------------------------------

    app.include_router(otlp_routes)  # POST /v1/traces

    from flywheel_middleware.service import dashboard, page

    @app.get("/", include_in_schema=False)
    async def index(request: Request, workflow: str | None = None) -> Response:
        """The page with its data embedded when the reader may read it (else it asks for a key)."""
        if not (settings.reads_open or settings.key_ok(_given_key(request))):
            return HTMLResponse(page.render(None, None))
        listing = await view_body(("workflows",), dashboard.workflows)
        names = [w["workflow"] for w in json.loads(listing)]
        chosen = workflow if workflow in names else (names[0] if names else None)
        body = None
        if chosen is not None:
            body = await view_body(
                ("workflow", chosen, dashboard.DEFAULT_BUCKETS),
                lambda store: dashboard.workflow_view(store, cfg, chosen),
            )
        return HTMLResponse(page.render(listing, body))

    @app.get("/flywheel.js", include_in_schema=False)
    def snippet() -> Response:
        return FileResponse(STATIC_DIR / "flywheel.js", media_type="text/javascript")

    async def view_body(key: tuple[Any, ...], compute: Any) -> bytes:
        def render() -> bytes:
            return JSONResponse(compute(runtime.get_store())).body

        try:
            return await views.get(key, render)
        except ViewsBusy:
            raise ApiError(429, "the dashboard is busy; retry in a few seconds") from None

    async def view(key: tuple[Any, ...], compute: Any) -> Response:
        return Response(await view_body(key, compute), media_type="application/json")

    @app.get("/v1/dashboard/workflows", summary="Workflows with rollouts", tags=["dashboard"])
    async def dashboard_workflows() -> Response:
        return await view(("workflows",), dashboard.workflows)

    @app.get(
        "/v1/dashboard/workflows/{workflow}",
        summary="Everything the dashboard shows for one workflow",
        tags=["dashboard"],
    )
    async def dashboard_workflow(
        workflow: str, buckets: int = dashboard.DEFAULT_BUCKETS
    ) -> Response:
        if not 2 <= buckets <= 200:
            raise ApiError(422, "buckets must be between 2 and 200")
        if len(workflow) > 200:
            raise ApiError(422, "workflow is at most 200 characters")
        return await view(
            ("workflow", workflow, buckets),
            lambda store: dashboard.workflow_view(store, cfg, workflow, buckets=buckets),
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    _add_body_schemas(app)
    return app


def _add_body_schemas(app: FastAPI) -> None:
    """Describe the hand-parsed bodies in the OpenAPI document (schemathesis and clients use it)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        ref = "#/components/schemas/{model}"
        telemetry = TypeAdapter(
            TelemetryBatchIn | list[TelemetryEventIn] | TelemetryEventIn
        ).json_schema(ref_template=ref)
        feedback = FeedbackIn.model_json_schema(ref_template=ref)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for doc in (telemetry, feedback):
            components.update(doc.pop("$defs", {}))
        components["FeedbackIn"] = feedback
        bodies = {
            "/v1/telemetry": telemetry,
            "/v1/feedback": {"$ref": ref.format(model="FeedbackIn")},
        }
        for path, body_schema in bodies.items():
            op = schema["paths"][path]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {t: {"schema": body_schema} for t in ("application/json", "text/plain")},
            }
            op["security"] = [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}]
        for path, item in schema["paths"].items():  # reads: a read or write key, if any is set
            if path.startswith(READ_PATHS):
                item["get"]["security"] = [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}, {}]
        schema["components"]["securitySchemes"] = {
            "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": "key"},
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
