"""The HTTP ingestion app in process (FastAPI TestClient) with a recording sender instead of Kafka:
authentication, validation naming the field, exact decimals, limits, idempotency, the CloudEvents
bindings, OpenAPI. The real server against the real broker is tests/integration/test_http_ingest.py."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.ingest.http import CE_BATCH, CE_STRUCTURED, ApiError, IdempotencyCache, create_app
from pipeline.ingest.telemetry import read_cloudevent
from pipeline.records import MeterReading
from pipeline.runtime.kafka import KafkaIOError, OutRecord

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

KEY = "test-key-1"
AUTH = {"X-API-Key": KEY}
READING = {"nmi": "NEM1201002", "suffix": "E1", "uom": "kwh", "interval_start": "2005-03-15T00:00:00+10:00",
           "interval_length": 30, "value": "0.412", "quality": "A", "version": "2005-03-16T09:12:00+10:00"}
EVENT = {"specversion": "1.0", "id": "evt-1", "source": "/gateway/7", "type": "com.example.api.request",
         "subject": "tenant-42", "time": "2024-05-01T10:00:00Z", "data": {"requests": 3}}


class Recorder:
    """Stands in for the idempotent producer: records what would be sent; can be told to fail."""

    def __init__(self) -> None:
        self.sent: list[OutRecord] = []
        self.fail = False

    def send_and_wait(self, records: Sequence[OutRecord], timeout_s: float = 30.0) -> None:
        if self.fail:
            raise KafkaIOError("2 of 2 records not acknowledged within 30.0s")
        self.sent.extend(records)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sender() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(sender: Recorder, clock: Clock) -> TestClient:
    settings = Settings(api_keys=[KEY, "other-key"], http_max_batch=3, http_idempotency_ttl_s=60,
                        topic_prefix="t.")
    return TestClient(create_app(settings, sender, max_body_bytes=4096, idempotency_max_entries=2, clock=clock))


def post_readings(client: TestClient, body, headers: dict | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/meter-readings", content=content,
                       headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def error(resp) -> tuple[int, str, str | None]:
    e = resp.json()["error"]
    assert set(resp.json()) == {"error"} and set(e) == {"code", "field", "message"} and e["message"]
    return resp.status_code, e["code"], e["field"]


# --- authentication -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "code"), [({}, "MISSING_API_KEY"), ({"X-API-Key": "nope"}, "INVALID_API_KEY"),
                                               ({"X-API-Key": KEY + "x"}, "INVALID_API_KEY")])
def test_a_missing_or_wrong_key_is_401_before_anything_else(client: TestClient, sender: Recorder, headers, code):
    for path in ("/v1/meter-readings", "/v1/events"):
        resp = client.post(path, content=b"not json at all", headers={"Content-Type": "application/json", **headers})
        assert error(resp) == (401, code, "X-API-Key")
        assert resp.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'
    assert sender.sent == []


def test_every_configured_key_works(client: TestClient, sender: Recorder):
    assert post_readings(client, [READING], {"X-API-Key": "other-key"}).status_code == 202
    assert len(sender.sent) == 1


def test_health_and_openapi_need_no_key(client: TestClient):
    assert client.get("/v1/health").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/meter-readings"]["post"]
    assert post["security"] == [{"APIKeyHeader": []}]
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key", "description": "one of PIPELINE_API_KEYS"}
    assert post["requestBody"]["content"]["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/MeterReadingIn"}
    reading = spec["components"]["schemas"]["MeterReadingIn"]
    assert set(reading["required"]) == {"nmi", "suffix", "uom", "interval_start", "value", "quality", "version"}
    assert {"202", "401", "413", "415", "422", "503"} <= set(post["responses"])
    assert set(spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]) == {CE_STRUCTURED, CE_BATCH}
    assert "Idempotency-Key" in {p["name"] for p in post["parameters"]}


# --- meter readings ----------------------------------------------------------------------------------------
def test_readings_become_avro_meter_readings_keyed_by_nmi(client: TestClient, sender: Recorder):
    second = {**READING, "suffix": "b1", "uom": "Wh", "interval_length": None,
              "interval_start": "2005-03-14T14:30:00Z", "interval_end": "2005-03-14T15:00:00Z", "value": 12,
              "quality": "E", "reason_code": "52"}
    resp = post_readings(client, [READING, second], {"Idempotency-Key": "batch-1"})
    assert resp.status_code == 202
    assert resp.json() == {"accepted": 2, "topic": "t.meter.readings", "request_id": "batch-1"}
    codec = default_codec()
    got = [codec.decode(r.value, MeterReading) for r in sender.sent]
    source = "http /v1/meter-readings request batch-1"
    version = datetime(2005, 3, 15, 23, 12, tzinfo=UTC)
    assert got == [
        MeterReading("NEM1201002", "E1", "kWh", datetime(2005, 3, 14, 14, 0, tzinfo=UTC),
                     datetime(2005, 3, 14, 14, 30, tzinfo=UTC), Decimal("0.412"), "A", None, version,
                     "UpdateDateTime", source, 1),
        MeterReading("NEM1201002", "B1", "Wh", datetime(2005, 3, 14, 14, 30, tzinfo=UTC),
                     datetime(2005, 3, 14, 15, 0, tzinfo=UTC), Decimal(12), "E", "52", version,
                     "UpdateDateTime", source, 2),
    ]
    assert {(r.topic, r.key, tuple(r.headers or ())) for r in sender.sent} == {
        ("t.meter.readings", b"NEM1201002", (("source_file", source.encode()),))}


def test_json_numbers_are_read_exactly(client: TestClient, sender: Recorder):
    body = json.dumps([{**READING, "value": "X"}]).replace('"X"', "0.1234567890").encode()
    assert error(post_readings(client, body)) == (422, "INVALID_FIELD", "readings[0].value")  # > 6 places
    body = json.dumps([{**READING, "value": "X"}]).replace('"X"', "123456789012.123456").encode()
    assert post_readings(client, body).status_code == 202
    assert default_codec().decode(sender.sent[0].value, MeterReading).value == Decimal("123456789012.123456")


@pytest.mark.parametrize(("change", "field", "code"), [
    ({"nmi": None}, "readings[1].nmi", "MISSING_FIELD"),
    ({"nmi": "NEM-1201002"}, "readings[1].nmi", "INVALID_FIELD"),
    ({"suffix": "E"}, "readings[1].suffix", "INVALID_FIELD"),
    ({"uom": "kW"}, "readings[1].uom", "INVALID_FIELD"),
    ({"interval_start": "2005-03-15T00:00:00"}, "readings[1].interval_start", "INVALID_FIELD"),  # no offset
    ({"interval_length": None}, "readings[1].interval_length", "INVALID_FIELD"),
    ({"interval_end": "2005-03-15T00:30:00+10:00"}, "readings[1].interval_length", "INVALID_FIELD"),  # both
    ({"interval_length": None, "interval_end": "2005-03-14T23:30:00+10:00"}, "readings[1].interval_end",
     "INVALID_FIELD"),
    ({"value": "-0.1"}, "readings[1].value", "INVALID_FIELD"),
    ({"value": "abc"}, "readings[1].value", "INVALID_FIELD"),
    ({"value": "1000000000000000"}, "readings[1].value", "INVALID_FIELD"),  # >= 10**15: no meter measures that
    ({"value": True}, "readings[1].value", "INVALID_FIELD"),
    ({"quality": "X"}, "readings[1].quality", "INVALID_FIELD"),
    ({"reason_code": "x1"}, "readings[1].reason_code", "INVALID_FIELD"),
    ({"version": None}, "readings[1].version", "MISSING_FIELD"),
    ({"colour": "blue"}, "readings[1].colour", "INVALID_FIELD"),
])
def test_an_invalid_reading_is_422_naming_the_field_and_nothing_is_sent(client, sender, change, field, code):
    bad = {k: v for k, v in {**READING, **change}.items() if v is not None}
    resp = post_readings(client, [READING, bad])
    assert error(resp) == (422, code, field)
    assert resp.json()["error"]["message"].startswith(f"{field}: ")
    assert sender.sent == []


def test_an_unsupported_unit_is_named_in_the_message(client, sender):
    resp = post_readings(client, [{**READING, "uom": "kW"}])
    assert error(resp) == (422, "INVALID_FIELD", "readings[0].uom")
    message = resp.json()["error"]["message"]
    assert message == ("readings[0].uom: unit of measure 'kW' is not one of kWh, Wh, MWh, kVArh, VArh, MVArh"), message
    assert "{" not in message and sender.sent == []


def test_a_repeated_identity_in_one_batch_is_refused(client: TestClient, sender: Recorder):
    assert error(post_readings(client, [READING, {**READING, "value": "0.5"}])) == (
        422, "DUPLICATE_READING", "readings[1]")
    assert sender.sent == []


@pytest.mark.parametrize(("body", "ctype", "expected"), [
    (b"[{", "application/json", (400, "MALFORMED_JSON", None)),
    (b"[NaN]", "application/json", (400, "MALFORMED_JSON", None)),
    (b'{"nmi": "x"}', "application/json", (422, "INVALID_FIELD", "readings")),
    (json.dumps([READING]).encode(), "text/csv", (415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type")),
    (json.dumps([READING] * 4).encode(), "application/json", (413, "BATCH_TOO_LARGE", "readings")),
    (b"[" + b" " * 5000 + b"]", "application/json", (413, "PAYLOAD_TOO_LARGE", None)),
])
def test_request_level_errors(client: TestClient, sender: Recorder, body: bytes, ctype: str, expected):
    resp = client.post("/v1/meter-readings", content=body, headers={"Content-Type": ctype, **AUTH})
    assert error(resp) == expected
    assert sender.sent == []


def test_an_empty_batch_is_accepted_and_sends_nothing(client: TestClient, sender: Recorder):
    assert post_readings(client, []).json()["accepted"] == 0 and sender.sent == []


def test_kafka_not_acknowledging_is_503_and_is_not_remembered(client: TestClient, sender: Recorder):
    sender.fail = True
    resp = post_readings(client, [READING], {"Idempotency-Key": "k-503"})
    assert error(resp) == (503, "KAFKA_UNAVAILABLE", None)
    sender.fail = False
    resp = post_readings(client, [READING], {"Idempotency-Key": "k-503"})  # the retry is produced
    assert resp.status_code == 202 and "Idempotent-Replayed" not in resp.headers and len(sender.sent) == 1


# --- idempotency ------------------------------------------------------------------------------------------------
def test_a_retry_with_the_same_key_returns_the_first_answer_and_sends_nothing(client, sender, clock):
    first = post_readings(client, [READING], {"Idempotency-Key": "abc"})
    clock.now += 59
    again = post_readings(client, [READING], {"Idempotency-Key": "abc"})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.content == first.content and again.headers["Idempotent-Replayed"] == "true"
    assert len(sender.sent) == 1
    # the key is per API key: another client's same key is its own request
    assert post_readings(client, [READING], {"Idempotency-Key": "abc", "X-API-Key": "other-key"}).status_code == 202
    assert len(sender.sent) == 2


def test_the_same_key_with_another_body_is_refused(client: TestClient, sender: Recorder):
    post_readings(client, [READING], {"Idempotency-Key": "abc"})
    resp = post_readings(client, [{**READING, "value": "9"}], {"Idempotency-Key": "abc"})
    assert error(resp) == (422, "IDEMPOTENCY_KEY_REUSED", "Idempotency-Key")
    assert len(sender.sent) == 1


def test_without_a_key_a_retry_is_produced_again_with_the_same_identity(client: TestClient, sender: Recorder):
    post_readings(client, [READING])
    post_readings(client, [READING])
    codec = default_codec()
    a, b = (codec.decode(r.value, MeterReading) for r in sender.sent)
    assert (a.identity, a.version) == (b.identity, b.version)  # ingest/windowing see a duplicate (SPEC §2)
    assert a.source_file != b.source_file


def test_the_horizon_is_bounded_in_time_and_size(client: TestClient, sender: Recorder, clock: Clock):
    post_readings(client, [READING], {"Idempotency-Key": "a"})
    clock.now += 61  # past the 60 s horizon: a retry is produced again
    assert "Idempotent-Replayed" not in post_readings(client, [READING], {"Idempotency-Key": "a"}).headers
    post_readings(client, [READING], {"Idempotency-Key": "b"})
    post_readings(client, [READING], {"Idempotency-Key": "c"})  # max 2 entries: "a" is evicted
    assert "Idempotent-Replayed" in post_readings(client, [READING], {"Idempotency-Key": "c"}).headers
    assert "Idempotent-Replayed" not in post_readings(client, [READING], {"Idempotency-Key": "a"}).headers
    assert len(sender.sent) == 5  # a, a after the horizon, b, c, a after eviction


def test_a_key_in_flight_is_409():
    cache = IdempotencyCache(ttl_s=60)
    assert cache.begin(("c", "e", "k"), "f1") is None
    with pytest.raises(ApiError) as caught:
        cache.begin(("c", "e", "k"), "f1")
    assert (caught.value.status, caught.value.code) == (409, "IDEMPOTENCY_KEY_IN_USE")
    cache.abandon(("c", "e", "k"))
    assert cache.begin(("c", "e", "k"), "f1") is None
    cache.finish(("c", "e", "k"), 202, b"{}")
    assert cache.begin(("c", "e", "k"), "f1").body == b"{}"


def test_a_malformed_idempotency_key_is_422(client: TestClient):
    assert error(post_readings(client, [READING], {"Idempotency-Key": "a b"})) == (
        422, "INVALID_FIELD", "Idempotency-Key")


# --- CloudEvents ----------------------------------------------------------------------------------------------------
def post_events(client: TestClient, body, ctype: str = CE_BATCH, headers: dict | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/events", content=content, headers={"Content-Type": ctype, **AUTH, **(headers or {})})


def test_a_structured_event_is_published_in_the_kafka_structured_binding(client: TestClient, sender: Recorder):
    resp = post_events(client, EVENT, CE_STRUCTURED)
    assert resp.status_code == 202 and resp.json()["topic"] == "t.telemetry.events"
    (rec,) = sender.sent
    assert (rec.topic, rec.key, rec.headers) == ("t.telemetry.events", b"tenant-42",
                                                 [("content-type", b"application/cloudevents+json")])
    assert json.loads(rec.value) == EVENT  # the event as sent, nothing invented
    event = ce_kafka.from_kafka(ce_kafka.KafkaMessage(dict(rec.headers), rec.key, rec.value), JSONFormat())
    assert (event.get_id(), event.get_source(), event.get_data()) == ("evt-1", "/gateway/7", {"requests": 3})
    # and the telemetry side of the ingest stage reads it
    got = read_cloudevent(tuple(rec.headers), rec.value)
    assert (got.id, got.source, got.subject, got.time, got.data) == (
        "evt-1", "/gateway/7", "tenant-42", datetime(2024, 5, 1, 10, tzinfo=UTC), {"requests": 3})


def test_a_batch_is_one_record_per_event(client: TestClient, sender: Recorder):
    events = [EVENT, {**EVENT, "id": "evt-2", "subject": "tenant-7", "partitionkey": "pk-1"},
              {**EVENT, "id": "evt-3", "data": None, "data_base64": "AAEC", "datacontenttype": "application/x"}]
    resp = post_events(client, events)
    assert resp.json()["accepted"] == 3
    assert [r.key for r in sender.sent] == [b"tenant-42", b"pk-1", b"tenant-42"]  # partitionkey, else subject
    assert json.loads(sender.sent[2].value)["data_base64"] == "AAEC"


def test_binary_mode_http_is_accepted(client: TestClient, sender: Recorder):
    headers = {f"ce-{k}": v for k, v in EVENT.items() if k != "data"}
    resp = post_events(client, b'{"requests": 3}', "application/json", headers)
    assert resp.status_code == 202
    assert json.loads(sender.sent[0].value) == {**EVENT, "datacontenttype": "application/json"}


@pytest.mark.parametrize(("events", "field", "code"), [
    ([EVENT, {k: v for k, v in EVENT.items() if k != "id"}], "events[1].id", "MISSING_FIELD"),
    ([{k: v for k, v in EVENT.items() if k != "source"}], "events[0].source", "MISSING_FIELD"),
    ([{**EVENT, "specversion": "0.3"}], "events[0].specversion", "INVALID_FIELD"),
    ([{**EVENT, "id": ""}], "events[0].id", "INVALID_FIELD"),
    ([{**EVENT, "id": 7}], "events[0].id", "INVALID_FIELD"),
    ([{**EVENT, "time": "yesterday"}], "events[0].time", "INVALID_FIELD"),
    ([{**EVENT, "time": "2024-05-01T10:00:00"}], "events[0].time", "INVALID_FIELD"),
    ([{k: v for k, v in EVENT.items() if k != "time"}], "events[0].time", "MISSING_FIELD"),
    ([{k: v for k, v in EVENT.items() if k != "subject"}], "events[0].subject", "MISSING_FIELD"),
    ([{**EVENT, "Bad-Name": "x"}], "events[0].Bad-Name", "INVALID_FIELD"),
    ([{**EVENT, "ext": {"a": 1}}], "events[0].ext", "INVALID_FIELD"),
    ([{**EVENT, "data_base64": "AAEC"}], "events[0].data_base64", "INVALID_FIELD"),
    ([EVENT, EVENT], "events[1].id", "DUPLICATE_EVENT"),
    ([3], "events[0]", "INVALID_FIELD"),
    ({"not": "a list"}, "events", "INVALID_FIELD"),
])
def test_an_invalid_event_is_422_naming_the_attribute(client, sender, events, field, code):
    assert error(post_events(client, events)) == (422, code, field)
    assert sender.sent == []


def test_events_request_level_errors(client: TestClient, sender: Recorder):
    assert error(post_events(client, [EVENT], "application/json")) == (415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type")
    assert error(post_events(client, [EVENT] * 4)) == (413, "BATCH_TOO_LARGE", "events")
    headers = {f"ce-{k}": v for k, v in EVENT.items() if k not in ("data", "id")}
    assert error(post_events(client, b"{}", "application/json", headers)) == (422, "MISSING_FIELD", "ce-id")
    assert sender.sent == []


def test_an_event_retry_with_the_same_key_is_not_produced_again(client: TestClient, sender: Recorder):
    first = post_events(client, [EVENT], headers={"Idempotency-Key": '"7f1c"'})
    again = post_events(client, [EVENT], headers={"Idempotency-Key": '"7f1c"'})
    assert again.headers["Idempotent-Replayed"] == "true" and again.content == first.content
    assert first.json()["request_id"] == "7f1c" and len(sender.sent) == 1


def test_unknown_paths_use_the_error_format(client: TestClient):
    assert error(client.get("/v1/nothing")) == (404, "NOT_FOUND", None)
    assert error(client.get("/v1/events", headers=AUTH)) == (405, "METHOD_NOT_ALLOWED", None)
