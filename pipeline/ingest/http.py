"""HTTP ingestion for gateways that do not speak Kafka (issue 6): a FastAPI app in front of the idempotent producer.

Endpoints (OpenAPI at ``/openapi.json``, Swagger UI at ``/docs``):

* ``POST /v1/meter-readings`` — ``application/json``: a JSON array of readings (``MeterReadingIn``,
  mirroring ``pipeline.records.MeterReading``) → one Avro ``MeterReading`` per element on
  ``meter.readings``, key = NMI, exactly as the NEM12 gateway publishes them. Numbers may be JSON
  numbers or strings; both are read as exact ``Decimal`` (never float).
* ``POST /v1/events`` — CloudEvents 1.0 over HTTP (CloudEvents HTTP protocol binding): one event in
  structured mode (``application/cloudevents+json``) or binary mode (``ce-*`` headers), or a batch
  (``application/cloudevents-batch+json``, a JSON array). Each event is validated by the
  ``cloudevents`` package (``cloudevents.core.v1.event.CloudEvent``) and published to
  ``telemetry.events`` in the CloudEvents **Kafka protocol binding, structured content mode**
  (value = the event in the JSON event format, header ``content-type: application/cloudevents+json``;
  ``cloudevents.core.bindings.kafka.to_structured``), key = the ``partitionkey`` extension if
  present (Kafka binding §3), else ``subject``. Beyond the spec's REQUIRED attributes (``id``,
  ``source``, ``specversion`` 1.0, ``type``) this pipeline needs ``time`` (RFC 3339 with an offset:
  windows are by event time) and ``subject`` (who used it: mapped to the account) — refused here with
  422 rather than dead-lettered later by the ingest stage.
* ``GET /v1/health`` — liveness, no key needed.

Authentication: header ``X-API-Key`` must be one of ``Settings.api_keys``; missing or wrong → 401.

Acknowledgement: the 202 answer is sent only after the broker has acknowledged every record of the
request (``acks=all``, idempotent producer: ``IdempotentProducer.send_and_wait``); if it does not
within ``ack_timeout_s`` the answer is 503 ``KAFKA_UNAVAILABLE`` and the client retries.

Idempotency (what makes a retried request land on the topic once): a request carrying an
``Idempotency-Key`` header (IETF draft "The Idempotency-Key HTTP Header Field") is remembered per
(API key, endpoint, Idempotency-Key) once it succeeded: the same request again gets the original
response (header ``Idempotent-Replayed: true``) and produces nothing. The same key with another body
is refused (422 ``IDEMPOTENCY_KEY_REUSED``); while the first request is still in flight a repeat gets
409 ``IDEMPOTENCY_KEY_IN_USE``. Failed requests (4xx, 503) are not remembered. **Horizon**: the memory
is in-process and bounded: an entry lives ``Settings.http_idempotency_ttl_s`` (default 24 h) and at
most ``idempotency_max_entries`` (default 100,000) entries are kept, the oldest evicted first; a
retry after that, after a server restart or against another server process is produced again. Behind
this, records carry deterministic identities the pipeline de-duplicates on: a meter reading is
(NMI, suffix, interval start) with its ``version`` (SPEC §2: an equal version is a duplicate, which the
ingest stage drops), a CloudEvent is (source, id) (CloudEvents 1.0 §3.1.1, de-duplicated by ingest).
One request repeating an identity is refused (422 ``DUPLICATE_READING`` / ``DUPLICATE_EVENT``).
``tests/integration/test_http_ingest.py`` proves both layers on the real broker.

Run it with ``pipeline serve http`` (uvicorn; ``PIPELINE_HTTP_HOST``/``_PORT``, ``PIPELINE_API_KEYS``).

Errors: ``{"error": {"code": "...", "field": "...", "message": "..."}}`` (``field`` names the
offending field, e.g. ``readings[3].value``, ``events[1].source``, ``ce-id``, or is null), with
400 (body not JSON), 401 (API key), 409/422 (idempotency), 413 (more than ``Settings.http_max_batch``
records, or a body over ``max_body_bytes``), 415 (content type), 422 (validation), 503 (Kafka).
"""

# No ``from __future__ import annotations``: FastAPI must see the real annotations of the route
# functions, which are closures over ``create_app``'s locals (the API-key dependency).
import binascii
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, Protocol

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dateutil.parser import isoparse
from fastapi import Depends, FastAPI, Header, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.codec import Codec, default_codec
from pipeline.config import Settings
from pipeline.records import MeterReading
from pipeline.runtime.kafka import KafkaIOError, OutRecord
from pipeline.topology import Topics

__all__ = [
    "CE_BATCH",
    "CE_STRUCTURED",
    "ApiError",
    "IdempotencyCache",
    "MeterReadingIn",
    "RecordSender",
    "create_app",
]

CE_STRUCTURED = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
MAX_BODY_BYTES = 16 * 1024 * 1024
IDEMPOTENCY_MAX_ENTRIES = 100_000
_CE_REQUIRED = ("specversion", "id", "source", "type")  # CloudEvents 1.0 §3.1 REQUIRED attributes
_PIPELINE_REQUIRED = ("time", "subject")  # optional in CloudEvents, needed to bill: event time, who used it
_ENERGY_UNITS = {u.upper(): u for u in ("kWh", "Wh", "MWh", "kVArh", "VArh", "MVArh")}  # what ingest bills
_JSON_FORMAT = JSONFormat()


HTTP_REQUESTS = Counter("pipeline_http_requests_total", "HTTP requests answered, by route template, method and status",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("pipeline_http_request_seconds", "time to answer an HTTP request (202: Kafka acknowledged "
                         "every record)", ["route", "method"])


class RecordSender(Protocol):
    """What the app needs from a producer: ``pipeline.runtime.kafka.IdempotentProducer`` has it."""

    def send_and_wait(self, records: Sequence[OutRecord], timeout_s: float = 30.0) -> None:
        """Produce ``records``; return once all are acknowledged; raise ``KafkaIOError`` otherwise."""


class ApiError(Exception):
    """An error answer: HTTP ``status`` and the machine-readable ``code``, ``field`` and ``message``."""

    def __init__(self, status: int, code: str, field: str | None, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field, self.message, self.headers = status, code, field, message, headers

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "field": self.field, "message": self.message}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --- request and response models --------------------------------------------------------------------
class MeterReadingIn(BaseModel):
    """One interval reading as a gateway sends it; becomes one ``MeterReading`` (topic ``meter.readings``).

    The interval is ``interval_start`` + either ``interval_end`` or ``interval_length`` (minutes);
    datetimes need an explicit offset and are stored in UTC. ``value`` is in ``uom`` (``kWh``,
    ``Wh``, ``MWh``, ``kVArh``, ``VArh``, ``MVArh``; case-insensitive), ≥ 0 and < 10**15, at most 6
    decimal places. ``version`` is the reading's UpdateDateTime: for one (NMI, suffix, interval start) a
    higher version supersedes, an equal or lower one is a duplicate (SPEC §2) — so it is required.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [{
        "nmi": "NEM1201002", "suffix": "E1", "uom": "kWh", "interval_start": "2005-03-15T00:00:00+10:00",
        "interval_length": 30, "value": "0.412", "quality": "A", "version": "2005-03-16T09:12:00+10:00",
    }]})

    nmi: str = Field(pattern=r"^[A-Za-z0-9]{1,10}$", description="National Metering Identifier (MDFF 200 field 2)")
    suffix: str = Field(pattern=r"^[A-Za-z0-9]{2,3}$",
                        description="NMI channel suffix: E1 import, B1 export, Q1/K1 reactive (MDFF 200 field 5)")
    uom: str = Field(description="unit of measure of value: kWh, Wh, MWh, kVArh, VArh or MVArh")
    interval_start: AwareDatetime = Field(description="start of the interval, RFC 3339 with offset")
    interval_end: AwareDatetime | None = Field(None, description="end of the interval (exclusive); or interval_length")
    interval_length: int | None = Field(None, gt=0, le=1440, validate_default=True,
                                        description="interval length in minutes; or interval_end")
    value: Decimal = Field(ge=0, lt=Decimal(10) ** 15, decimal_places=6,
                           description="the interval's quantity in uom (string or number)")
    quality: Literal["A", "E", "S", "F", "N", "V"] = Field(description="MDFF quality flag")
    reason_code: str | None = Field(None, pattern=r"^[0-9]{1,3}$", description="MDFF reason code")
    version: AwareDatetime = Field(description="UpdateDateTime: the supersession version (SPEC §2)")

    @field_validator("uom")
    @classmethod
    def _canonical_uom(cls, v: str) -> str:
        unit = _ENERGY_UNITS.get(v.upper())
        if unit is None:
            # pydantic fills {name} placeholders only (no conversions such as !r): quote the value here
            raise PydanticCustomError("uom", "unit of measure {uom} is not one of {units}",
                                      {"uom": repr(v), "units": ", ".join(_ENERGY_UNITS.values())})
        return unit

    @field_validator("value", mode="before")
    @classmethod
    def _no_float_or_bool(cls, v: Any) -> Any:
        if isinstance(v, bool | float):  # the body is parsed with Decimal numbers: this is only direct use
            raise PydanticCustomError("decimal_type", "value must be a decimal string or JSON number")
        return v

    @field_validator("interval_end")
    @classmethod
    def _end_after_start(cls, v: Any, info: Any) -> Any:
        start = info.data.get("interval_start")
        if v is not None and start is not None and v <= start:
            raise PydanticCustomError("interval", "interval_end must be after interval_start")
        return v

    @field_validator("interval_length")
    @classmethod
    def _end_xor_length(cls, v: int | None, info: Any) -> int | None:
        if "interval_start" in info.data and (v is None) == (info.data.get("interval_end") is None):
            raise PydanticCustomError("interval", "give exactly one of interval_end and interval_length")
        return v

    def to_record(self, source_file: str, record: int) -> MeterReading:
        """The ``MeterReading`` of this reading (UTC times; ``source_file#record`` names the request)."""
        start = self.interval_start.astimezone(UTC)
        end = (self.interval_end.astimezone(UTC) if self.interval_end is not None
               else start + timedelta(minutes=self.interval_length or 0))
        return MeterReading(self.nmi, self.suffix.upper(), self.uom, start, end, self.value, self.quality,
                            self.reason_code, self.version.astimezone(UTC), "UpdateDateTime", source_file, record)


_READINGS = TypeAdapter(list[MeterReadingIn])


class Accepted(BaseModel):
    """The 202 answer: how many records the broker acknowledged, on which topic, for which request."""

    accepted: int
    topic: str
    request_id: str


class ErrorDetail(BaseModel):
    """``code``: machine-readable (``INVALID_FIELD``, ``MISSING_API_KEY``...); ``field``: the offending field
    (``readings[3].value``, ``events[1].source``, ``ce-id``, ``X-API-Key``) or null; ``message``: for people."""

    code: str
    field: str | None
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "body is not JSON"), (401, "missing or wrong API key"),
        (409, "a request with this Idempotency-Key is still in flight"), (413, "too many records or too large"),
        (415, "unsupported content type"), (422, "invalid record (field named), or Idempotency-Key reused"),
        (503, "Kafka did not acknowledge the records: retry"))
}


# --- idempotency ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Stored:
    fingerprint: str
    status: int
    body: bytes
    stored_at: float


class IdempotencyCache:
    """Responses of succeeded requests by (client, endpoint, Idempotency-Key), bounded in time and size.

    An entry lives ``ttl_s`` seconds (``clock`` is monotonic seconds) and at most ``max_entries`` are
    kept (the oldest go first). Thread-safe. ``begin`` returns the stored response to replay, or
    ``None`` after marking the key in flight (then ``finish`` or ``abandon`` it). Raises ``ApiError``
    409 ``IDEMPOTENCY_KEY_IN_USE`` while the key is in flight, 422 ``IDEMPOTENCY_KEY_REUSED`` when the
    key was used with another request body.
    """

    def __init__(self, ttl_s: float, max_entries: int = IDEMPOTENCY_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._done: OrderedDict[tuple[str, ...], _Stored] = OrderedDict()
        self._in_flight: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._done)

    def begin(self, key: tuple[str, ...], fingerprint: str) -> _Stored | None:
        with self._lock:
            self._expire()
            stored = self._done.get(key)
            if stored is None and key in self._in_flight:
                raise ApiError(409, "IDEMPOTENCY_KEY_IN_USE", "Idempotency-Key",
                               "a request with this Idempotency-Key is still being processed: retry later")
            if stored is None:
                self._in_flight[key] = fingerprint
                return None
            if stored.fingerprint != fingerprint:
                raise ApiError(422, "IDEMPOTENCY_KEY_REUSED", "Idempotency-Key",
                               "this Idempotency-Key was already used for a different request body")
            return stored

    def finish(self, key: tuple[str, ...], status: int, body: bytes) -> None:
        with self._lock:
            fingerprint = self._in_flight.pop(key)
            self._done[key] = _Stored(fingerprint, status, body, self.clock())
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)

    def abandon(self, key: tuple[str, ...]) -> None:
        with self._lock:
            self._in_flight.pop(key, None)

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        while self._done:
            oldest = next(iter(self._done.values()))
            if oldest.stored_at > horizon:
                break
            self._done.popitem(last=False)


# --- the app -------------------------------------------------------------------------------------------
def create_app(
    settings: Settings,
    producer: RecordSender,
    codec: Codec | None = None,
    *,
    ack_timeout_s: float = 30.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    idempotency_max_entries: int = IDEMPOTENCY_MAX_ENTRIES,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The HTTP ingestion app (see the module docstring): API keys, topics, batch limit and idempotency
    horizon from ``settings``; records go through ``producer.send_and_wait`` (the idempotent producer).
    """
    codec = codec or default_codec()
    topics = Topics(settings)
    keys = [k.get_secret_value().encode() for k in settings.api_keys]
    cache = IdempotencyCache(settings.http_idempotency_ttl_s, idempotency_max_entries, clock)
    max_batch = settings.http_max_batch
    app = FastAPI(
        title="Metering pipeline: HTTP ingestion", version="1",
        description="Meter readings and CloudEvents for gateways that do not speak Kafka. Every answer 202 means "
        "the broker acknowledged every record. Send an Idempotency-Key header to retry safely.",
    )
    app.state.idempotency = cache
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of PIPELINE_API_KEYS")

    async def client(key: Annotated[str | None, Security(api_key_header)]) -> str:
        if not key:
            raise ApiError(401, "MISSING_API_KEY", "X-API-Key", "send an API key in the X-API-Key header",
                           {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})
        for known in keys:
            if hmac.compare_digest(known, key.encode()):
                return hashlib.sha256(known).hexdigest()[:16]  # names the client without keeping the key
        raise ApiError(401, "INVALID_API_KEY", "X-API-Key", "the API key is not valid",
                       {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    IdemKey = Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=255, pattern=r'^"?[\x21-\x7e]+"?$',
        description="retry-safe requests: the same key and body within the horizon returns the first answer "
        "and produces nothing")]

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p not in ("header", "body", "query")]
        return ApiError(422, "INVALID_FIELD", ".".join(loc) or None, err.get("msg", "invalid request")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return ApiError(exc.status_code, code, None, str(exc.detail), dict(exc.headers or {})).response()

    async def handle(request: Request, who: str, endpoint: str, idem: str | None, accepted_types: tuple[str, ...],
                     build: Callable[[bytes, str, Request], tuple[str, list[OutRecord]]]) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in accepted_types and not (endpoint == "events" and _has_ce_headers(request)):
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type",
                           f"Content-Type {ctype or '(none)'!r} is not accepted; use {' or '.join(accepted_types)}")
        body = await _read_body(request, max_body_bytes)
        key = idem.strip('"') if idem else None
        request_id = key or uuid.uuid4().hex
        cache_key = (who, endpoint, key or "")
        if key is not None:
            fingerprint = hashlib.sha256(b"\0".join(
                [ctype.encode(), *_ce_header_items(request), body])).hexdigest()
            stored = cache.begin(cache_key, fingerprint)
            if stored is not None:
                return Response(stored.body, stored.status, media_type="application/json",
                                headers={"Idempotent-Replayed": "true"})
        try:
            topic, records = build(body, request_id, request)
            try:
                await run_in_threadpool(producer.send_and_wait, records, ack_timeout_s)
            except KafkaIOError as exc:
                raise ApiError(503, "KAFKA_UNAVAILABLE", None,
                               f"the records were not acknowledged by Kafka ({exc}); retry the request") from exc
        except BaseException:
            if key is not None:
                cache.abandon(cache_key)
            raise
        out = Accepted(accepted=len(records), topic=topic, request_id=request_id).model_dump_json().encode()
        if key is not None:
            cache.finish(cache_key, 202, out)
        return Response(out, 202, media_type="application/json")

    def build_readings(body: bytes, request_id: str, _request: Request) -> tuple[str, list[OutRecord]]:
        raw = _parse_json(body)
        if not isinstance(raw, list):
            raise ApiError(422, "INVALID_FIELD", "readings", "the body must be a JSON array of readings")
        if len(raw) > max_batch:
            raise ApiError(413, "BATCH_TOO_LARGE", "readings",
                           f"{len(raw)} readings in one request; at most {max_batch} (PIPELINE_HTTP_MAX_BATCH)")
        try:
            readings = _READINGS.validate_python(raw)
        except ValidationError as exc:
            raise _validation_error(exc, "readings") from exc
        source = f"http /v1/meter-readings request {request_id}"
        records, seen = [], {}
        for i, reading in enumerate(readings):
            rec = reading.to_record(source, i + 1)
            other = seen.setdefault((rec.identity, rec.version), i)
            if other != i:
                raise ApiError(422, "DUPLICATE_READING", f"readings[{i}]",
                               f"readings[{i}] has the identity and version of readings[{other}] "
                               f"({rec.identity}, version {rec.version.isoformat()})")
            records.append(OutRecord(topics.meter_readings, rec.nmi.encode(), codec.encode(rec),
                                     [("source_file", source.encode())]))
        return topics.meter_readings, records

    def build_events(body: bytes, _request_id: str, request: Request) -> tuple[str, list[OutRecord]]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == CE_BATCH:
            raw = _parse_json(body, exact=False)
            if not isinstance(raw, list):
                raise ApiError(422, "INVALID_FIELD", "events", f"a {CE_BATCH} body must be a JSON array of events")
            if len(raw) > max_batch:
                raise ApiError(413, "BATCH_TOO_LARGE", "events",
                               f"{len(raw)} events in one request; at most {max_batch} (PIPELINE_HTTP_MAX_BATCH)")
            events = [_structured_event(obj, f"events[{i}].") for i, obj in enumerate(raw)]
        elif ctype == CE_STRUCTURED:
            events = [_structured_event(_parse_json(body, exact=False), "")]
        else:
            events = [_binary_event(request, body)]
        seen: dict[tuple[str, str], int] = {}
        for i, ev in enumerate(events):
            other = seen.setdefault((ev.get_source(), ev.get_id()), i)
            if other != i:
                raise ApiError(422, "DUPLICATE_EVENT", f"events[{i}].id",
                               f"events[{i}] repeats source {ev.get_source()!r} and id {ev.get_id()!r} of "
                               f"events[{other}]")
        records = []
        for ev in events:
            msg = ce_kafka.to_structured(ev, _JSON_FORMAT, key_mapper=_event_key)
            key = msg.key.encode() if isinstance(msg.key, str) else msg.key
            records.append(OutRecord(topics.telemetry_events, key, msg.value, list(msg.headers.items())))
        return topics.telemetry_events, records

    @app.post("/v1/meter-readings", status_code=202, response_model=Accepted, responses=_ERRORS,
              summary="Publish interval meter readings to meter.readings",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "array", "items": {"$ref": "#/components/schemas/MeterReadingIn"}}}}}})
    async def post_meter_readings(request: Request, who: Annotated[str, Depends(client)],
                                  idempotency_key: IdemKey = None) -> Response:
        """A JSON array of readings; 202 once Kafka acknowledged all of them, nothing published otherwise
        (validation happens before anything is sent)."""
        return await handle(request, who, "meter-readings", idempotency_key, ("application/json",), build_readings)

    @app.post("/v1/events", status_code=202, response_model=Accepted, responses=_ERRORS,
              summary="Publish CloudEvents to telemetry.events",
              openapi_extra={"requestBody": {"required": True, "content": {
                  CE_STRUCTURED: {"schema": {"$ref": "#/components/schemas/CloudEventJson"}},
                  CE_BATCH: {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/CloudEventJson"}}},
              }}})
    async def post_events(request: Request, who: Annotated[str, Depends(client)],
                          idempotency_key: IdemKey = None) -> Response:
        """One CloudEvent (structured or binary mode) or a batch; 202 once Kafka acknowledged all of them."""
        return await handle(request, who, "events", idempotency_key, (CE_STRUCTURED, CE_BATCH), build_events)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Any]) -> Response:
        t0 = time.monotonic()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "other")  # the template, never the raw path (bounded labels)
            HTTP_REQUESTS.labels(template, request.method, str(status)).inc()
            HTTP_SECONDS.labels(template, request.method).observe(time.monotonic() - t0)

    @app.get("/v1/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/healthz", summary="Liveness (monitoring)", include_in_schema=False)
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz", summary="Readiness (monitoring)", include_in_schema=False)
    async def readyz() -> Response:
        fatal = getattr(producer, "fatal_error", None)  # the idempotent producer cannot go on
        if fatal is not None:
            return Response(f"not ready: producer failed: {fatal}\n", status_code=503, media_type="text/plain")
        return Response("ready\n", media_type="text/plain")

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            reading = MeterReadingIn.model_json_schema(ref_template="#/components/schemas/{model}")
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps.update(reading.pop("$defs", {}))
            comps["MeterReadingIn"] = reading
            comps["CloudEventJson"] = _CLOUDEVENT_SCHEMA
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# --- helpers -------------------------------------------------------------------------------------------
_CLOUDEVENT_SCHEMA: dict[str, Any] = {
    "type": "object", "description": "A CloudEvent in the JSON event format (CloudEvents 1.0); this pipeline "
    "also needs time and subject",
    "required": [*_CE_REQUIRED, *_PIPELINE_REQUIRED],
    "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]}, "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1, "format": "uri-reference"},
        "type": {"type": "string", "minLength": 1}, "subject": {"type": "string", "minLength": 1},
        "time": {"type": "string", "format": "date-time"}, "datacontenttype": {"type": "string"},
        "dataschema": {"type": "string", "format": "uri"}, "data": {}, "data_base64": {"type": "string"},
    },
    "additionalProperties": {"type": ["string", "integer", "boolean"], "description": "extension attributes"},
}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", None, f"the body is {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", None, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(body: bytes, exact: bool = True) -> Any:
    """The JSON body, numbers with a fraction as ``Decimal`` when ``exact`` (meter readings), else as float
    (CloudEvents data passes through the SDK's JSON format, which uses float); raises ``ApiError`` 400
    ``MALFORMED_JSON``."""
    try:
        return json.loads(body, parse_float=Decimal if exact else float, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "MALFORMED_JSON", None, f"the body is not valid JSON: {exc}") from exc


def _field(prefix: str, loc: Sequence[Any]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _validation_error(exc: ValidationError, prefix: str) -> ApiError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = _field(prefix, first["loc"])
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    code = "MISSING_FIELD" if first["type"] == "missing" else "INVALID_FIELD"
    return ApiError(422, code, field, f"{field}: {first['msg']}{more}")


def _has_ce_headers(request: Request) -> bool:
    return any(name.startswith("ce-") for name in request.headers)


def _ce_header_items(request: Request) -> list[bytes]:
    """The ``ce-*`` headers (binary mode attributes) as bytes, sorted: part of the request's fingerprint."""
    return sorted(f"{k}:{v}".encode() for k, v in request.headers.items() if k.startswith("ce-"))


def _event_key(event: Any) -> str:
    return event.get_extension("partitionkey") or event.get_subject()


def _structured_event(obj: Any, prefix: str) -> CloudEvent:
    """Validate one event of the JSON event format (CloudEvents 1.0 §3, JSON format §3); ``ApiError`` 422."""
    if not isinstance(obj, dict):
        raise ApiError(422, "INVALID_FIELD", prefix.rstrip(".") or "event", "a CloudEvent must be a JSON object")
    obj = {k: v for k, v in obj.items() if v is not None or k in _CE_REQUIRED}  # JSON null = absent (JSON format)
    _check_present(obj, prefix)
    if "data" in obj and "data_base64" in obj:
        raise ApiError(422, "INVALID_FIELD", f"{prefix}data_base64", "an event has either data or data_base64")
    _check_common(obj, prefix)
    try:
        return _JSON_FORMAT.read(CloudEvent, json.dumps(obj))
    except CloudEventValidationError as exc:
        raise _ce_error(exc, prefix) from exc
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "INVALID_FIELD", f"{prefix}data_base64", f"data_base64 is not base64: {exc}") from exc


def _binary_event(request: Request, body: bytes) -> CloudEvent:
    """Validate one event in HTTP binary content mode (``ce-*`` headers + data in the body)."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    attrs = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    _check_present(attrs, "ce-")
    _check_common(attrs, "ce-")
    message = ce_http.HTTPMessage(
        headers={k: v for k, v in headers.items() if k.startswith("ce-") or k == "content-type"}, body=body)
    try:
        return ce_http.from_binary(message, _JSON_FORMAT, CloudEvent)
    except CloudEventValidationError as exc:
        raise _ce_error(exc, "ce-") from exc


def _check_present(attrs: dict[str, Any], prefix: str) -> None:
    """The REQUIRED attributes, then time and subject (checked first: the SDK would invent an id and a time)."""
    for attr in _CE_REQUIRED:
        if attr not in attrs:
            raise ApiError(422, "MISSING_FIELD", f"{prefix}{attr}",
                           f"{prefix}{attr}: the REQUIRED CloudEvents attribute {attr!r} is missing")
    for attr in _PIPELINE_REQUIRED:
        if attr not in attrs:
            raise ApiError(422, "MISSING_FIELD", f"{prefix}{attr}",
                           f"{prefix}{attr}: this pipeline needs the {attr!r} attribute to bill the event "
                           "(event time / who used it)")


def _check_common(attrs: dict[str, Any], prefix: str) -> None:
    if attrs.get("specversion") != "1.0":
        raise ApiError(422, "INVALID_FIELD", f"{prefix}specversion",
                       f"{prefix}specversion: {attrs.get('specversion')!r} is not supported; use '1.0'")
    if "time" in attrs:
        try:
            parsed = isoparse(attrs["time"]) if isinstance(attrs["time"], str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise ApiError(422, "INVALID_FIELD", f"{prefix}time",
                           f"{prefix}time: {attrs['time']!r} is not an RFC 3339 timestamp with an offset")
    for name, value in attrs.items():
        if name not in ("data", "data_base64") and isinstance(value, dict | list | float):
            raise ApiError(422, "INVALID_FIELD", f"{prefix}{name}",
                           f"{prefix}{name}: attribute values are strings, integers or booleans (CloudEvents 1.0 §2)")


def _ce_error(exc: CloudEventValidationError, prefix: str) -> ApiError:
    attr, problems = next(iter(exc.errors.items()))
    return ApiError(422, "INVALID_FIELD", f"{prefix}{attr}", f"{prefix}{attr}: {'; '.join(map(str, problems))}")
