"""Telemetry input: CloudEvents on ``telemetry.events`` → usage events keyed by account (issue 6).

Pure functions, no I/O. Reading follows the CloudEvents Kafka protocol binding v1.0 (with the
``cloudevents`` package, ``cloudevents.core.bindings.kafka``):

- **structured mode** when the ``content-type`` header begins with ``application/cloudevents``
  (binding §3.1): the whole event is the value, in the JSON event format (``+json``);
- **binary mode** otherwise (binding §3.2): attributes in ``ce_<name>`` headers, ``content-type``
  = ``datacontenttype``, the value is ``data``.

An event must carry the required attributes of the CloudEvents spec v1.0 (``id``, ``source``,
``specversion`` = ``1.0``, ``type``) and, for usage, ``time`` (RFC 3339, with an offset) and
``subject`` (who used it). Its ``type`` selects the ``MetricDefinition`` (``pipeline.metrics_catalog``)
that says where the value is in ``data`` and how windows aggregate it; the subject → account mapping
of the reference data gives the account. Identity is (``source``, ``id``), as the spec defines it:
``telemetry_event_id`` is a stable function of it (SPEC §2).

Whatever cannot be accepted raises ``RejectedInput`` with a dead-letter reason code:
``UNDECODABLE`` (neither mode, not UTF-8, not JSON, unsupported event format), ``SCHEMA_VIOLATION``
(missing or invalid attributes, value not found at the metric's path or not a number),
``UNKNOWN_EVENT_TYPE``, ``UNKNOWN_SUBJECT``, ``FUTURE_EVENT``, ``NEGATIVE_VALUE``,
``VALUE_OUT_OF_RANGE``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from pipeline.metrics_catalog import MetricDefinition, compiled_path
from pipeline.money import quantity
from pipeline.records import UsageEvent
from pipeline.reference import ReferenceData

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
STRUCTURED_PREFIX = "application/cloudevents"  # binding §3.1: structured mode content types
REQUIRED_ATTRIBUTES = ("id", "source", "specversion", "type")  # CloudEvents spec v1.0 "Required Attributes"
MAX_ABS_VALUE = Decimal(10) ** 15  # no interval or event measures this much: a corrupt or hostile value
_FORMAT = JSONFormat()


class RejectedInput(ValueError):
    """Input ingest cannot accept; ``reason`` is the dead-letter reason code (see the module doc)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class OutsideServiceDates(RejectedInput):
    """A billing rule refused the reading (SPEC §3): its meter (or subject) is known, but no service
    point covered its date. ``event`` is the reading as it would be billed to the nearest service
    point's account (for the record on ``usage.late``)."""

    def __init__(self, event: UsageEvent, message: str) -> None:
        super().__init__("OUTSIDE_SERVICE_DATES", message)
        self.event = event


@dataclass(frozen=True, slots=True)
class TelemetryEvent:
    """What ingest takes from one CloudEvent.

    Attributes:
        id / source / type / subject: the CloudEvents attributes (``subject`` ``None`` when absent).
        time: the ``time`` attribute in UTC, truncated to whole milliseconds (the precision on topics).
        data: the event data as decoded by the JSON event format (dict, list, str, bytes or None).
    """

    id: str
    source: str
    type: str
    subject: str | None
    time: datetime
    data: Any

    @property
    def time_ms(self) -> int:
        """``time`` as epoch milliseconds."""
        return (self.time - EPOCH) // MS


def _event_factory(attributes: dict[str, Any], data: Any) -> CloudEvent:
    # The v1.0 CloudEvent constructor fills a missing id and time with a fresh UUID and "now": a
    # producer's missing identity or event time must be refused, not invented.
    missing = [name for name in (*REQUIRED_ATTRIBUTES, "time") if name not in attributes]
    if missing:
        raise RejectedInput("SCHEMA_VIOLATION", f"missing CloudEvents attribute(s) {', '.join(missing)}")
    return CloudEvent(attributes, data)


def _header(headers: tuple[tuple[str, bytes], ...], name: str) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def read_cloudevent(headers: tuple[tuple[str, bytes], ...], value: bytes | None) -> TelemetryEvent:
    """Decode one Kafka record of ``telemetry.events`` (CloudEvents Kafka protocol binding v1.0).

    ``headers`` are the record's (name, bytes) pairs and ``value`` its bytes. Only ``ce_*`` headers
    and ``content-type`` are read (other headers may be anything). Raises ``RejectedInput`` with
    ``UNDECODABLE`` or ``SCHEMA_VIOLATION``.
    """
    raw_ct = _header(headers, "content-type")
    try:
        content_type = None if raw_ct is None else raw_ct.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedInput("UNDECODABLE", "content-type header is not UTF-8") from exc
    relevant = {k.lower(): v for k, v in headers
                if k.lower().startswith(ce_kafka.CE_PREFIX) or k.lower() == "content-type"}
    structured = content_type is not None and content_type.lower().startswith(STRUCTURED_PREFIX)
    if structured:
        media = content_type.split(";")[0].strip().lower()  # type: ignore[union-attr]
        if media != _FORMAT.CONTENT_TYPE:
            raise RejectedInput("UNDECODABLE", f"unsupported structured event format {media!r} (only JSON)")
        if value is None:
            raise RejectedInput("UNDECODABLE", "structured-mode record without a value")
    elif not any(k.startswith(ce_kafka.CE_PREFIX) for k in relevant):
        raise RejectedInput(
            "UNDECODABLE", "not a CloudEvent: no structured content-type (application/cloudevents…) and no ce_ headers"
        )
    # the key is not handed over: the partitionkey extension is not needed, and a non-UTF-8 key must not
    # make an otherwise valid event unreadable
    message = ce_kafka.KafkaMessage(headers=relevant, key=None, value=value or b"")
    try:
        if structured:
            event = ce_kafka.from_structured(message, _FORMAT, _event_factory)
        else:
            event = ce_kafka.from_binary(message, _FORMAT, _event_factory)
    except RejectedInput:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RejectedInput("UNDECODABLE", f"{type(exc).__name__}: {exc}"[:500]) from exc
    except Exception as exc:  # the SDK raises many kinds on malformed events: all are schema violations
        raise RejectedInput("SCHEMA_VIOLATION", f"invalid CloudEvent: {type(exc).__name__}: {exc}"[:500]) from exc
    attrs = event.get_attributes()
    for name in (*REQUIRED_ATTRIBUTES, "subject"):
        text = attrs.get(name)
        if isinstance(text, str) and not _is_unicode(text):
            raise RejectedInput("SCHEMA_VIOLATION", f"attribute {name} is not valid Unicode text")
    try:
        ms = (attrs["time"].astimezone(UTC) - EPOCH) // MS
        time = EPOCH + ms * MS
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise RejectedInput("SCHEMA_VIOLATION", f"time {attrs['time'].isoformat()} is out of range in UTC") from exc
    return TelemetryEvent(attrs["id"], attrs["source"], attrs["type"], attrs.get("subject"), time, event.get_data())


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes such as "\ud800"
        return False
    return True


def identity_bytes(source: str, event_id: str) -> bytes:
    """CloudEvents identity (``source``, ``id``) as bytes: ``<len(source)>:<source><id>`` in UTF-8, so no
    two different pairs give the same bytes (SPEC §2: the identity is the pair)."""
    raw = source.encode("utf-8")
    return b"%d:%s%s" % (len(raw), raw, event_id.encode("utf-8"))


def telemetry_event_id(source: str, event_id: str) -> str:
    """The usage event id of CloudEvent (``source``, ``id``): ``ce:`` + 32 hex digits of the SHA-256 of
    ``identity_bytes``. Stable across processes and runs (SPEC §2)."""
    return f"ce:{hashlib.sha256(identity_bytes(source, event_id)).hexdigest()[:32]}"


def distinct_value(thing: Any) -> Decimal:
    """A number standing for one distinct thing (a user id ...) for ``unique_count`` windows.

    Windows count distinct values (``pipeline.windowing.windows.aggregate``), so the thing is mapped
    to an integer: the first 7 bytes of its BLAKE2b digest (< 2^56; for 10^5 distinct things per window
    the chance of any collision is below 10^-6). Strings hash as themselves, other JSON values as their
    JSON text (so ``42`` and ``"42"`` are the same user).
    """
    text = thing if isinstance(thing, str) else json.dumps(thing, sort_keys=True)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=7).digest()
    return Decimal(int.from_bytes(digest, "big"))


def _number(raw: Any, path: str) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise RejectedInput("SCHEMA_VIOLATION", f"value at {path} is not a number: {type(raw).__name__}")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise RejectedInput("SCHEMA_VIOLATION", f"value at {path} is not finite: {raw!r}")
        raw = repr(raw)  # the shortest text that reads back as the same float
    try:
        value = Decimal(raw)
    except (InvalidOperation, ValueError) as exc:
        raise RejectedInput("SCHEMA_VIOLATION", f"value at {path} is not a number: {str(raw)[:80]!r}") from exc
    if not value.is_finite():
        raise RejectedInput("SCHEMA_VIOLATION", f"value at {path} is not finite: {str(raw)[:80]!r}")
    if abs(value) >= MAX_ABS_VALUE:
        raise RejectedInput("VALUE_OUT_OF_RANGE", f"value at {path} is out of range: {str(raw)[:80]}")
    return value


def extract_value(definition: MetricDefinition, data: Any) -> Decimal:
    """The usage value of one event of ``definition`` from its ``data`` (issue 6).

    ``count``: 1 per event. ``unique_count``: ``distinct_value`` of the one JSON value at
    ``value_path``. Otherwise the one number at ``value_path`` (JSON number or numeric string),
    rounded half-up to 6 decimal places (SPEC §4). Raises ``RejectedInput`` with ``SCHEMA_VIOLATION``
    (no single value at the path, not a number), ``VALUE_OUT_OF_RANGE`` (|value| ≥ 10^15) or
    ``NEGATIVE_VALUE`` (below zero and the metric does not allow it).
    """
    if definition.aggregation == "count":
        return Decimal(1)
    path = definition.value_path or "$"
    matches = compiled_path(path).find(data) if isinstance(data, dict | list) else []
    if len(matches) != 1:
        raise RejectedInput("SCHEMA_VIOLATION", f"{path} matches {len(matches)} values in data, not 1")
    raw = matches[0].value
    if definition.aggregation == "unique_count":
        if raw is None or raw == "" or isinstance(raw, dict | list):
            raise RejectedInput("SCHEMA_VIOLATION", f"value at {path} is not an identifier: {raw!r}"[:200])
        return distinct_value(raw)
    value = quantity(_number(raw, path)) + 0  # + 0 turns -0 into 0
    if value < 0 and not definition.allow_negative:
        raise RejectedInput("NEGATIVE_VALUE", f"value at {path} is negative: {value}")
    return value


def to_usage_event(event: TelemetryEvent, ref: ReferenceData, now_ms: int, future_bound_ms: int) -> UsageEvent:
    """Map one decoded CloudEvent to a usage event (pure; SPEC §1, issue 6).

    The event's ``type`` selects the metric definition; ``subject`` on the event's UTC date gives the
    account; the value comes from ``extract_value``. The usage event is instantaneous
    (``event_end = event_time = time``), its version is its time, its quality ``A`` (actual) and its
    source the CloudEvents ``source``. Raises ``OutsideServiceDates`` when the subject is mapped, but
    not on that date (a billing rule), and ``RejectedInput``: ``UNKNOWN_EVENT_TYPE``,
    ``UNKNOWN_SUBJECT`` (absent or never mapped), ``FUTURE_EVENT`` (time later than
    ``now_ms + future_bound_ms``), or a value problem (see ``extract_value``).
    """
    definition = ref.event_types.get(event.type)
    if definition is None:
        raise RejectedInput("UNKNOWN_EVENT_TYPE", f"no metric is defined for event type {event.type!r}"[:300])
    if event.subject is None:
        raise RejectedInput("UNKNOWN_SUBJECT", "the event has no subject attribute: no account to bill")
    account = ref.account_of_subject(event.subject, event.time.date())
    outside = account is None
    if outside:
        account = ref.nearest_subject_account(event.subject, event.time.date())
        if account is None:
            raise RejectedInput("UNKNOWN_SUBJECT", f"subject {event.subject!r} has no account"[:300])
    if event.time_ms > now_ms + future_bound_ms:
        raise RejectedInput("FUTURE_EVENT", f"event time {event.time.isoformat()} is more than "
                            f"{future_bound_ms // 1000} s ahead of the clock")
    value = extract_value(definition, event.data)
    usage = UsageEvent(
        event_id=telemetry_event_id(event.source, event.id),
        account=account,
        series=f"{definition.metric}/{event.subject}",
        metric=definition.metric,
        unit=definition.unit,
        event_time=event.time,
        event_end=event.time,
        value=value,
        version=event.time,
        quality="A",
        source=event.source,
    )
    if outside:
        raise OutsideServiceDates(usage, f"subject {event.subject} had no account on {event.time.date()} (nearest: "
                                  f"{account}); re-submit with `pipeline late replay` once it is mapped that day")
    return usage


# --- producing (gateways, the sample generator, tests, benchmarks) ------------------------------------------------
def encode_cloudevent(
    attributes: dict[str, Any], data: Any, mode: Literal["binary", "structured"] = "binary"
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """``(value, headers)`` of a Kafka record carrying one CloudEvent in ``mode`` (binding §3.1/§3.2).

    ``attributes`` are CloudEvents attributes (``time`` a timezone-aware ``datetime``); ``data`` JSON
    data. Raises the SDK's ``CloudEventValidationError`` on invalid attributes.
    """
    event = CloudEvent(dict(attributes), data)
    message = ce_kafka.to_binary(event, _FORMAT) if mode == "binary" else ce_kafka.to_structured(event, _FORMAT)
    return message.value, list(message.headers.items())


# --- a sample stream (``pipeline publish telemetry``, tests, benchmarks) ---------------------------------------------
SAMPLE_SUBJECTS = ("tenant-a/app-1", "tenant-a/app-2", "tenant-b", "tenant-c")  # pipeline/data/reference.json


@dataclass(frozen=True, slots=True)
class SampleEvent:
    """One generated CloudEvent: attributes, JSON data and the content mode to publish it in."""

    attributes: dict[str, Any]
    data: Any
    mode: Literal["binary", "structured"]

    def record(self) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """``(key, value, headers)`` of the Kafka record; the key is the subject (one subject, one partition)."""
        value, headers = encode_cloudevent(self.attributes, self.data, self.mode)
        return str(self.attributes["subject"]).encode(), value, headers


def sample_stream(
    start: datetime, end: datetime, seed: int = 1, duplicate_share: float = 0.1,
    subjects: tuple[str, ...] = SAMPLE_SUBJECTS,
) -> tuple[list[SampleEvent], int]:
    """A shuffled telemetry stream for the bundled sample metrics over the hours of ``[start, end)`` (UTC),
    and how many of its events are repeats.

    Per subject and hour: 0–6 API requests (``com.example.api.request``), one storage measurement of
    0–500 GB-hours (``com.example.storage.usage``, ``data.usage.gb_hours``) and, in about a third of the
    hours, 1–3 users of a pool of 12 active (``com.example.user.active``, ``data.user.id``). Then
    ``duplicate_share`` of the events are sent again (in either content mode: same source and id), and
    everything is shuffled, so events arrive out of order. Deterministic for a given ``seed``.
    """
    rng = random.Random(seed)
    events: list[SampleEvent] = []

    def add(source: str, event_id: str, ce_type: str, subject: str, at: datetime, data: Any) -> None:
        attrs = {"specversion": "1.0", "id": event_id, "source": source, "type": ce_type, "subject": subject,
                 "time": at, "datacontenttype": "application/json"}
        events.append(SampleEvent(attrs, data, rng.choice(("binary", "structured"))))

    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while hour < end:
        for subject in subjects:
            for i in range(rng.randint(0, 6)):
                at = hour + timedelta(milliseconds=rng.randrange(3_600_000))
                add(f"/api-gateway/{rng.choice(('eu-1', 'us-2'))}", f"req-{subject}-{hour:%Y%m%d%H}-{i}",
                    "com.example.api.request", subject, at, {"path": "/v1/items", "ms": rng.randint(3, 900)})
            add("/storage/metering", f"sto-{subject}-{hour:%Y%m%d%H}", "com.example.storage.usage", subject,
                hour + timedelta(minutes=rng.randrange(60)), {"usage": {"gb_hours": rng.randint(0, 50_000) / 100}})
            if rng.random() < 0.33:
                for i in range(rng.randint(1, 3)):
                    add("/auth/sessions", f"act-{subject}-{hour:%Y%m%d%H}-{i}", "com.example.user.active", subject,
                        hour + timedelta(seconds=rng.randrange(3600)), {"user": {"id": f"user-{rng.randrange(12)}"}})
        hour += timedelta(hours=1)
    events = [e for e in events if start <= e.attributes["time"] < end]
    repeats = [SampleEvent(e.attributes, e.data, rng.choice(("binary", "structured")))
               for e in rng.sample(events, int(len(events) * duplicate_share))]
    stream = events + repeats
    rng.shuffle(stream)
    return stream, len(repeats)
