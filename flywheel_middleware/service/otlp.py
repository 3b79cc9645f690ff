"""``POST /v1/traces``: OTLP/HTTP trace export, so an agent traced with OpenTelemetry (in any
language) feeds the store with no code of ours in its process.

The OTLP/HTTP specification's rules: ``application/x-protobuf`` or ``application/json`` bodies
(JSON with hex trace and span ids), ``Content-Encoding: gzip``; success is an
``ExportTraceServiceResponse`` in the request's encoding, with ``partial_success`` (rejected
spans and why) when some spans could not be taken; an error is a ``google.rpc.Status`` in the
request's encoding, with a message that names the problem. Writes need a write key, as on the
other write endpoints. Spans go to ``otlp_traces.TraceAssembler``, which queues them for the
recorder and writes each trace's rollout when it closes; the answer waits until the spans are
in the recorder's journal or the store (``app.kept_or_503``).

Tuning (environment): ``FLYWHEEL_OTLP_MAX_BYTES`` (a body, compressed or not; default 20 MiB),
``FLYWHEEL_OTLP_SETTLE`` (seconds a trace stays open after its root span, default 1) and
``FLYWHEEL_OTLP_GRACE`` (seconds after its last span a trace without a root closes, default 600).

A service killed with SIGKILL keeps every acknowledged span (its journal), but the traces it
held open get no rollout from it. ``otlp_recovery.Recovery`` gives them theirs: after start-up
(once the recorder has replayed dead processes' journals) and every
``FLYWHEEL_OTLP_RECOVER_EVERY`` seconds, on a thread of its own, it writes the rollout of each
stored trace that has none and whose newest span ended more than ``FLYWHEEL_OTLP_GRACE`` +
``FLYWHEEL_OTLP_LATE`` seconds ago (no live service can still hold it open), built from the
stored spans by the code a live close runs; the store keeps one rollout per id.
"""

from __future__ import annotations

import binascii
import zlib
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.concurrency import run_in_threadpool

from flywheel_middleware import runtime
from flywheel_middleware.capture.otlp_spans import RejectedSpan, Resource, ingested_span
from flywheel_middleware.capture.otlp_traces import TraceAssembler
from flywheel_middleware.environment import env_number
from flywheel_middleware.service.app import (
    ApiError,
    Settings,
    kept_or_503,
    read_body,
    require_write_key,
)
from flywheel_middleware.service.otlp_recovery import Recovery

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CONTENT_TYPES = {PROTOBUF: PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}
MAX_BYTES_ENV = "FLYWHEEL_OTLP_MAX_BYTES"
SETTLE_ENV = "FLYWHEEL_OTLP_SETTLE"
GRACE_ENV = "FLYWHEEL_OTLP_GRACE"
_GRPC_CODE = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 503: 14}  # google.rpc.Code
_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
_MAX_REASONS = 5


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body under its ``Content-Encoding`` (gzip, deflate or none), at most ``limit`` bytes."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send gzip or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit)
        if inflater.unconsumed_tail:
            raise ApiError(413, f"the body is larger than {limit} bytes once decompressed")
        out += inflater.flush()
    except zlib.error as exc:
        raise ApiError(400, f"the body is not valid {encoding} data ({exc})") from None
    if not inflater.eof:
        raise ApiError(400, f"the {encoding} body is truncated")
    return out


def _hex_to_base64(value: Any) -> Any:
    """An OTLP/JSON id (hex) as the base64 that protobuf's JSON reader takes for bytes; an id
    that is not hex becomes empty, so its span is rejected as having no valid id."""
    if not isinstance(value, str):
        return value
    try:
        return binascii.b2a_base64(bytes.fromhex(value), newline=False).decode("ascii")
    except ValueError:
        return ""


def _fix_ids(obj: dict[str, Any]) -> None:
    for key in _ID_KEYS:
        if key in obj:
            obj[key] = _hex_to_base64(obj[key])


def _children(obj: Any, *keys: str) -> list[Any]:
    for key in keys:
        value = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(value, list):
            return value
    return []


def _short(exc: Exception) -> str:
    """An error's text, its middle cut when long (a parser names every enclosing field)."""
    text = str(exc)
    return text if len(text) <= 300 else f"{text[:100]} … {text[-180:]}"


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/JSON body (lowerCamelCase or proto field names, hex ids, int64 as text or
    numbers, unknown fields ignored) as the request message."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"an OTLP/JSON body is an object; got a JSON {type(data).__name__}")
    for rs in _children(data, "resourceSpans", "resource_spans"):
        for ss in _children(rs, "scopeSpans", "scope_spans"):
            for span in _children(ss, "spans"):
                if isinstance(span, dict):
                    _fix_ids(span)
                    for link in _children(span, "links"):
                        if isinstance(link, dict):
                            _fix_ids(link)
    try:
        return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ApiError(
            400, f"the body is not an OTLP trace export request: {_short(exc)}"
        ) from None


def decode(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """The export request a body holds, in its content type's encoding."""
    if content_type == JSON:
        return decode_json(body)
    try:
        return ExportTraceServiceRequest.FromString(body)
    except DecodeError as exc:
        raise ApiError(
            400, f"the body is not an OTLP protobuf trace export request: {exc}"
        ) from None


def ingest(message: ExportTraceServiceRequest, assembler: TraceAssembler) -> list[str]:
    """Hand every span of an export request to ``assembler``; the reasons of those rejected."""
    rejected: list[str] = []
    for rs in message.resource_spans:
        resource = Resource(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                try:
                    assembler.add(ingested_span(span, resource))
                except RejectedSpan as exc:
                    rejected.append(str(exc))
    return rejected


def _encode(message: Any, content_type: str) -> bytes:
    if content_type == JSON:
        return orjson.dumps(json_format.MessageToDict(message))
    return message.SerializeToString()


def export_response(rejected: list[str], content_type: str) -> Response:
    """200 with an ``ExportTraceServiceResponse``: ``partial_success`` when spans were rejected."""
    message = ExportTraceServiceResponse()
    if rejected:
        reasons = list(dict.fromkeys(rejected))
        text = "; ".join(reasons[:_MAX_REASONS])
        if len(reasons) > _MAX_REASONS:
            text += f"; and {len(reasons) - _MAX_REASONS} more"
        message.partial_success.rejected_spans = len(rejected)
        message.partial_success.error_message = f"{len(rejected)} span(s) rejected: {text}"
    return Response(_encode(message, content_type), media_type=content_type)


def status_response(status: int, error: str, content_type: str) -> Response:
    """An error as OTLP/HTTP sends it: a ``google.rpc.Status`` (JSON unless protobuf was sent)."""
    message = status_pb2.Status(code=_GRPC_CODE.get(status, 2), message=error)
    content_type = content_type if content_type == PROTOBUF else JSON
    return Response(_encode(message, content_type), status_code=status, media_type=content_type)


class OtlpThreads:
    """What runs beside the route: the assembler's closing thread and trace recovery."""

    def __init__(self, assembler: TraceAssembler) -> None:
        self.assembler = assembler
        self.recovery = Recovery.from_environment(assembler)

    def start(self) -> None:
        self.assembler.start()
        self.recovery.start()

    def stop(self) -> int:
        """Stop both; the open traces' rollouts go to the recorder. How many closed."""
        self.recovery.stop()
        return self.assembler.stop()


def otlp_router(settings: Settings) -> tuple[APIRouter, OtlpThreads]:
    """The ``/v1/traces`` route, and the threads the app starts and stops."""
    max_bytes = int(env_number(MAX_BYTES_ENV, 20 * 1024 * 1024))
    assembler = TraceAssembler(
        lambda record: runtime.get_recorder().enqueue(record),
        settle=env_number(SETTLE_ENV, 1.0, allow_zero=True),
        grace=env_number(GRACE_ENV, 600.0, allow_zero=True),
    )
    router = APIRouter()

    def take(body: bytes, content_type: str, encoding: str) -> list[str]:
        message = decode(decompress(body, encoding, max_bytes), content_type)
        receipt = runtime.get_recorder().receipt()
        rejected = ingest(message, assembler)
        kept_or_503(receipt, settings.ack_timeout)
        return rejected

    @router.post(
        "/v1/traces",
        summary="OTLP/HTTP trace export (protobuf or JSON, gzip): traces become rollouts",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {PROTOBUF: {}, JSON: {}},
            },
            "security": [{"ApiKeyHeader": []}],
        },
        responses={
            200: {"description": "ExportTraceServiceResponse: the spans are kept"},
            400: {},
            401: {},
            415: {},
            503: {},
        },
        tags=["ingest"],
    )
    async def traces(request: Request) -> Response:
        raw_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        content_type = CONTENT_TYPES.get(raw_type, "")
        try:
            require_write_key(settings, request)
            if not content_type:
                raise ApiError(
                    415,
                    f"content type {raw_type!r} is not accepted on /v1/traces; "
                    f"send {PROTOBUF} or {JSON} (OTLP/HTTP)",
                )
            encoding = request.headers.get("content-encoding", "").strip().lower()
            body = await read_body(request, max_bytes)
            assembler.start()
            rejected = await run_in_threadpool(take, body, content_type, encoding)
        except ApiError as exc:
            return status_response(exc.status, exc.error, content_type)
        return export_response(rejected, content_type)

    return router, OtlpThreads(assembler)
