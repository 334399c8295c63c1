"""Telemetry: CloudEvents (Kafka protocol binding, binary and structured mode) → usage events, metric
definitions from the reference data, and the window policies they give the windowing stage (issue 6)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from pipeline.config import Settings
from pipeline.ingest.telemetry import (
    RejectedInput,
    TelemetryEvent,
    distinct_value,
    encode_cloudevent,
    identity_bytes,
    read_cloudevent,
    telemetry_event_id,
    to_usage_event,
)
from pipeline.metrics_catalog import MetricDefinition, policies_from_catalog
from pipeline.records import UsageEvent
from pipeline.reference import BUNDLED_REFERENCE, ReferenceData, ReferenceFile, TelemetrySubject

T0 = datetime(2026, 11, 1, 10, 30, 15, 123456, tzinfo=UTC)
T0_MS = datetime(2026, 11, 1, 10, 30, 15, 123000, tzinfo=UTC)  # topics carry milliseconds
NOW_MS = int(datetime(2026, 11, 20, tzinfo=UTC).timestamp() * 1000)
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def ref() -> ReferenceData:
    return ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))


def attrs(**over: object) -> dict:
    base = {"id": "evt-1", "source": "/gateway/eu-1", "type": "com.example.storage.usage", "subject": "tenant-b",
            "time": T0, "datacontenttype": "application/json"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def read(mode: str, data: object = None, **over: object) -> TelemetryEvent:
    value, headers = encode_cloudevent(attrs(**over), data if data is not None else {"usage": {"gb_hours": 1.25}},
                                       mode)  # type: ignore[arg-type]
    return read_cloudevent(tuple(headers), value)


def usage(ref: ReferenceData, mode: str = "binary", data: object = None, **over: object) -> UsageEvent:
    return to_usage_event(read(mode, data, **over), ref, NOW_MS, DAY_MS)


def rejected(thunk: Callable[[], object]) -> str:
    with pytest.raises(RejectedInput) as info:
        thunk()
    assert str(info.value)
    return info.value.reason


# --- reading both content modes ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_both_modes_give_the_same_usage_event(ref: ReferenceData, mode: str) -> None:
    assert usage(ref, mode) == UsageEvent(
        event_id="ce:" + hashlib.sha256(b"13:/gateway/eu-1evt-1").hexdigest()[:32],
        account="TEL-3002",
        series="storage_gb_hours/tenant-b",
        metric="storage_gb_hours",
        unit="GB-h",
        event_time=T0_MS,
        event_end=T0_MS,
        value=Decimal("1.25"),
        version=T0_MS,
        quality="A",
        source="/gateway/eu-1",
    )


def test_wire_shapes_follow_the_kafka_binding() -> None:
    value, headers = encode_cloudevent(attrs(), {"usage": {"gb_hours": 2}}, "binary")
    h = dict(headers)
    assert (h["ce_id"], h["ce_source"], h["ce_type"], h["ce_subject"], h["ce_specversion"], h["content-type"]) == (
        b"evt-1", b"/gateway/eu-1", b"com.example.storage.usage", b"tenant-b", b"1.0", b"application/json")
    assert json.loads(value) == {"usage": {"gb_hours": 2}}
    value, headers = encode_cloudevent(attrs(), {"usage": {"gb_hours": 2}}, "structured")
    assert headers == [("content-type", b"application/cloudevents+json")]
    body = json.loads(value)
    assert (body["id"], body["specversion"], body["data"]) == ("evt-1", "1.0", {"usage": {"gb_hours": 2}})


def test_structured_mode_is_chosen_by_content_type_prefix_and_other_headers_are_ignored() -> None:
    body = json.dumps({"specversion": "1.0", "id": "x", "source": "/s", "type": "t", "subject": "tenant-b",
                       "time": "2026-11-01T10:30:15+10:00", "data": {"a": 1}}).encode()
    headers = (("Content-Type", b"application/cloudevents+json; charset=utf-8"), ("trace", b"\xff\xfe"),
               ("ce_id", b"ignored-in-structured-mode"))
    ev = read_cloudevent(headers, body)
    assert (ev.id, ev.source, ev.type, ev.subject, ev.data) == ("x", "/s", "t", "tenant-b", {"a": 1})
    assert ev.time == datetime(2026, 11, 1, 0, 30, 15, tzinfo=UTC)  # +10:00 read as UTC


def test_binary_mode_without_content_type_reads_json_data() -> None:
    headers = (("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s"), ("ce_type", b"t"),
               ("ce_time", b"2026-11-01T00:00:00Z"), ("binary-trace", b"\x80\x81"))
    assert read_cloudevent(headers, b'{"usage": {"gb_hours": "3.5"}}').data == {"usage": {"gb_hours": "3.5"}}


# --- values per aggregation ----------------------------------------------------------------------------------------
def test_count_metric_counts_one_per_event_whatever_the_data(ref: ReferenceData) -> None:
    ev = usage(ref, type="com.example.api.request", subject="tenant-a/app-2", data={"path": "/v1/x", "ms": 12})
    assert (ev.metric, ev.unit, ev.value, ev.account, ev.series) == (
        "api_requests", "request", Decimal(1), "TEL-3001", "api_requests/tenant-a/app-2")


@pytest.mark.parametrize(("raw", "expected"), [
    (2, "2"), ("3.5", "3.5"), (0.1, "0.1"), (1e-7, "0"), (0.0000005, "0.000001"), (-0.0, "0"),
    ("12345678901234.5", "12345678901234.5"),
])
def test_sum_metric_reads_the_number_at_its_json_path(ref: ReferenceData, raw: object, expected: str) -> None:
    ev = usage(ref, data={"usage": {"gb_hours": raw}, "other": 99})
    assert ev.value == Decimal(expected) and str(ev.value) != "-0.000000"


def test_unique_count_metric_carries_a_stable_number_per_distinct_thing(ref: ReferenceData) -> None:
    def user(uid: object) -> Decimal:
        return usage(ref, type="com.example.user.active", data={"user": {"id": uid}}).value

    alice = user("alice")
    assert alice == Decimal(int.from_bytes(hashlib.blake2b(b"alice", digest_size=7).digest(), "big"))
    assert alice == distinct_value("alice") and 0 <= alice < 2**56 and alice == alice.to_integral_value()
    assert user("bob") != alice
    assert user(42) == user("42")  # JSON text of a number is its identity
    assert usage(ref, type="com.example.user.active", data={"user": {"id": "alice"}}).unit == "user-day"


def test_identity_is_the_pair_source_id(ref: ReferenceData) -> None:
    assert identity_bytes("ab", "c") != identity_bytes("a", "bc")
    assert telemetry_event_id("ab", "c") != telemetry_event_id("a", "bc")
    assert usage(ref, id="1").event_id == usage(ref, "structured", id="1").event_id != usage(ref, id="2").event_id
    assert usage(ref, source="/other").event_id != usage(ref).event_id


# --- rejections ------------------------------------------------------------------------------------------------------
def _binary(*drop: str, **over: bytes) -> tuple[tuple[tuple[str, bytes], ...], bytes]:
    h = {"ce_specversion": b"1.0", "ce_id": b"1", "ce_source": b"/s", "ce_type": b"com.example.api.request",
         "ce_subject": b"tenant-b", "ce_time": b"2026-11-01T00:00:00Z", **over}
    return tuple((k, v) for k, v in h.items() if k not in drop), b"{}"


UNREADABLE = [
    ("UNDECODABLE", (), b"plain bytes, no headers"),
    ("UNDECODABLE", (("content-type", b"application/json"),), b'{"id": "1"}'),  # binary mode needs ce_ headers
    ("UNDECODABLE", (("content-type", b"application/cloudevents+json"),), b"{not json"),
    ("UNDECODABLE", (("content-type", b"application/cloudevents+json"),), b"\xff\xfe{}"),
    ("UNDECODABLE", (("content-type", b"application/cloudevents+json"),), None),
    ("UNDECODABLE", (("content-type", b"application/cloudevents+avro"),), b"\x00"),
    ("UNDECODABLE", (("content-type", b"application/cloudevents-batch+json"),), b"[]"),
    ("UNDECODABLE", (("content-type", b"\xff"),), b"{}"),
    ("SCHEMA_VIOLATION", (("content-type", b"application/cloudevents+json"),), b"[1, 2]"),
    ("SCHEMA_VIOLATION", *_binary("ce_id")),
    ("SCHEMA_VIOLATION", *_binary("ce_source")),
    ("SCHEMA_VIOLATION", *_binary("ce_type")),
    ("SCHEMA_VIOLATION", *_binary("ce_specversion")),
    ("SCHEMA_VIOLATION", *_binary("ce_time")),  # usage needs its event time: never "now"
    ("SCHEMA_VIOLATION", *_binary(ce_specversion=b"0.3")),
    ("SCHEMA_VIOLATION", *_binary(ce_time=b"2026-11-01T00:00:00")),  # no offset
    ("SCHEMA_VIOLATION", *_binary(ce_time=b"yesterday")),
    ("SCHEMA_VIOLATION", *_binary(ce_time=b"0001-01-01T00:00:00+14:00")),  # before year 1 in UTC
    ("SCHEMA_VIOLATION", *_binary(ce_time=b"9999-12-31T23:59:59-14:00")),  # after year 9999 in UTC
    ("SCHEMA_VIOLATION", *_binary(ce_id=b"")),
    ("UNDECODABLE", *_binary(ce_id=b"\xff")),  # binary-mode attribute values are UTF-8 text
    ("SCHEMA_VIOLATION", *_binary(**{"ce_bad-name": b"x"})),  # attribute names are a-z0-9 (spec v1.0)
    ("SCHEMA_VIOLATION", (("content-type", b"application/cloudevents+json"),),
     b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "time": "2026-11-01T00:00:00Z", '
     b'"subject": "\\ud800"}'),  # a lone surrogate is not text
]


@pytest.mark.parametrize(("reason", "headers", "value"), UNREADABLE, ids=[f"{r}-{i}" for i, (r, *_) in
                                                                          enumerate(UNREADABLE)])
def test_unreadable_records_are_refused_with_a_reason(reason: str, headers: tuple, value: bytes | None) -> None:
    got = rejected(lambda: read_cloudevent(headers, value))
    assert got == reason, got


UNACCEPTABLE = [
    ("UNKNOWN_EVENT_TYPE", {"type": "com.example.unknown"}, None),
    ("UNKNOWN_SUBJECT", {"subject": None}, None),
    ("UNKNOWN_SUBJECT", {"subject": "tenant-z"}, None),
    ("FUTURE_EVENT", {"time": datetime(2026, 11, 21, 0, 0, 0, 1000, tzinfo=UTC)}, None),  # now + 1 day + 1 ms
    ("NEGATIVE_VALUE", {}, {"usage": {"gb_hours": -0.5}}),
    ("SCHEMA_VIOLATION", {}, {"usage": {"gbhours": 1}}),
    ("SCHEMA_VIOLATION", {}, {"usage": {"gb_hours": True}}),
    ("SCHEMA_VIOLATION", {}, {"usage": {"gb_hours": "NaN"}}),
    ("SCHEMA_VIOLATION", {}, {"usage": {"gb_hours": "1,5"}}),
    ("SCHEMA_VIOLATION", {}, {"usage": {"gb_hours": [1]}}),
    ("SCHEMA_VIOLATION", {}, {"usage": {"gb_hours": None}}),
    ("SCHEMA_VIOLATION", {}, ["usage"]),
    ("SCHEMA_VIOLATION", {"datacontenttype": "text/plain"}, "gb_hours=1"),
    ("VALUE_OUT_OF_RANGE", {}, {"usage": {"gb_hours": 1e15}}),
    ("VALUE_OUT_OF_RANGE", {}, {"usage": {"gb_hours": "-1" + "0" * 40}}),
    ("SCHEMA_VIOLATION", {"type": "com.example.user.active"}, {"user": {"id": ""}}),
    ("SCHEMA_VIOLATION", {"type": "com.example.user.active"}, {"user": {"id": {"nested": 1}}}),
    ("SCHEMA_VIOLATION", {"type": "com.example.user.active"}, {"user": {}}),
]


@pytest.mark.parametrize(("reason", "over", "data"), UNACCEPTABLE, ids=[f"{r}-{i}" for i, (r, *_) in
                                                                        enumerate(UNACCEPTABLE)])
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_unacceptable_events_are_refused_with_a_reason(
    ref: ReferenceData, mode: str, reason: str, over: dict, data: object
) -> None:
    assert rejected(lambda: usage(ref, mode, data, **over)) == reason


def test_future_bound_is_inclusive(ref: ReferenceData) -> None:
    at_bound = datetime(2026, 11, 21, tzinfo=UTC)
    assert usage(ref, time=at_bound).event_time == at_bound


def test_subject_mapping_is_effective_dated() -> None:
    base = ReferenceData.from_file(ReferenceFile.read(BUNDLED_REFERENCE))
    moved = ReferenceData.build(
        list(base.accounts.values()), [], [], [], list(base.metrics.values()),
        [TelemetrySubject(subject="s", account="TEL-3001", effective_from=date(2026, 1, 1),
                          effective_to=date(2026, 11, 1)),
         TelemetrySubject(subject="s", account="TEL-3003", effective_from=date(2026, 11, 1))],
    )
    last_day = datetime(2026, 10, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert usage(moved, subject="s", time=last_day).account == "TEL-3001"
    assert usage(moved, subject="s").account == "TEL-3003"
    before = datetime(2025, 12, 31, tzinfo=UTC)
    assert rejected(lambda: usage(moved, subject="s", time=before)) == "OUTSIDE_SERVICE_DATES"  # a billing rule
    assert rejected(lambda: usage(moved, subject="never-mapped", time=before)) == "UNKNOWN_SUBJECT"  # bad input
    assert [s.subject for s in moved.service_ranges("TEL-3003")] == ["s"]  # subject days are service days


# --- metric definitions ---------------------------------------------------------------------------------------------
def test_metric_definitions_are_validated() -> None:
    ok = {"metric": "m", "event_type": "t", "aggregation": "sum", "unit": "u", "value_path": "$.a.b[0]"}
    assert MetricDefinition(**ok).window_minutes == 60
    assert MetricDefinition(**{**ok, "aggregation": "count", "value_path": None}).value_path is None
    for bad in ({"value_path": None}, {"value_path": "$.a[?(@.x)"}, {"metric": "energy_import"},
                {"aggregation": "median"}, {"window_minutes": 0}, {"unit": ""}, {"extra": 1}):
        with pytest.raises(ValidationError):
            MetricDefinition(**{**ok, **bad})


def test_reference_file_refuses_repeated_event_types_and_unknown_accounts() -> None:
    raw = json.loads(BUNDLED_REFERENCE.read_text())
    again = dict(raw["metric_definitions"][0], metric="other")
    with pytest.raises(ValidationError, match="repeat a event_type"):
        ReferenceFile.model_validate({**raw, "metric_definitions": [*raw["metric_definitions"], again]})
    lost = {"subject": "x", "account": "NOBODY", "effective_from": "2024-01-01"}
    with pytest.raises(ValidationError, match="unknown account"):
        ReferenceFile.model_validate({**raw, "telemetry_subjects": [lost]})


def test_bundled_sample_prices_every_defined_metric(ref: ReferenceData) -> None:
    assert set(ref.metrics) == {"api_requests", "storage_gb_hours", "active_users"}
    assert {m.aggregation for m in ref.metrics.values()} == {"count", "sum", "unique_count"}
    book = ref.book_on("TEL-3001", date(2026, 11, 1))
    assert book is not None and book.id == "SAMPLE-SAAS-USAGE"
    kinds = {m: [c.kind for c in book.usage_components(m)] for m in ref.metrics}
    assert kinds == {"api_requests": ["per_unit"], "storage_gb_hours": ["tiered"], "active_users": ["per_unit"]}


# --- window policies for the windowing stage -------------------------------------------------------------------------
def test_window_policies_come_from_definitions_and_fall_back_to_settings(ref: ReferenceData) -> None:
    settings = Settings(out_of_orderness_s=120, idle_timeout_s=5, allowed_lateness_days=3,
                        metric_policies={"legacy_metric": {"window_minutes": 15, "aggregation": "max"}})
    calls: list[str] = []

    def definitions() -> dict[str, MetricDefinition]:
        calls.append("definitions")
        return ref.metrics

    refreshes: list[bool] = []
    policy = policies_from_catalog(settings, definitions, lambda: refreshes.append(True) or True)
    users = policy("active_users")
    assert (users.size_ms, users.aggregation, users.out_of_orderness_ms, users.allowed_lateness_ms,
            users.idle_timeout_ms) == (1440 * 60_000, "unique_count", 120_000, 3 * 86_400_000, 5000)
    assert (policy("api_requests").size_ms, policy("api_requests").aggregation) == (3_600_000, "count")
    assert policy("storage_gb_hours").aggregation == "sum"
    assert calls == ["definitions"] * 3
    energy = policy("energy_import")  # meter channels never read the catalog
    assert (energy.size_ms, energy.aggregation) == (30 * 60_000, "sum") and len(calls) == 3
    legacy = policy("legacy_metric")  # undefined: one refresh, then PIPELINE_METRIC_POLICIES
    assert (legacy.size_ms, legacy.aggregation) == (15 * 60_000, "max") and refreshes == [True]
    assert policy("legacy_metric") is legacy and policy("active_users") is users and refreshes == [True]


def test_a_definition_may_set_its_own_lateness(ref: ReferenceData) -> None:
    d = MetricDefinition(metric="m", event_type="t", aggregation="latest", unit="u", value_path="$.v",
                         window_minutes=5, allowed_lateness_days=0.5)
    p = policies_from_catalog(Settings(), lambda: {"m": d})("m")
    assert (p.size_ms, p.allowed_lateness_ms, p.aggregation) == (300_000, 43_200_000, "latest")


def test_event_time_is_truncated_to_milliseconds_in_utc() -> None:
    ev = read("binary", time=datetime(2026, 11, 1, 20, 0, 0, 999999, tzinfo=UTC) + timedelta(hours=0))
    assert ev.time == datetime(2026, 11, 1, 20, 0, 0, 999000, tzinfo=UTC)
    assert ev.time_ms == int(datetime(2026, 11, 1, 20, 0, 0, tzinfo=UTC).timestamp()) * 1000 + 999
