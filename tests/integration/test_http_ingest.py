"""HTTP ingestion as a real server process (`pipeline serve http`: uvicorn) against the real local Kafka.

Proves: a valid batch is on the topic once, as the records the pipeline reads (Avro MeterReading keyed
by NMI; CloudEvents in the Kafka structured binding keyed by subject); retrying the same request with
the same Idempotency-Key returns the first answer and produces nothing (the topic's record count does
not move); a retry without the key is produced again with the same identity and version, and the
ingest stage passes it on once (SPEC §2 duplicates); an invalid batch is a 4xx naming the field and
produces nothing; a wrong API key is 401; the OpenAPI document is served; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat

from pipeline.codec import default_codec
from pipeline.ingest.nem12 import read_nem12
from pipeline.records import MeterReading, UsageEvent
from pipeline.runtime.kafka import committed_offsets, read_all
from tests.integration.conftest import DATA, Env

pytestmark = pytest.mark.integration

KEY = "it-key-0f3a"
NEM12_FILE = DATA / "nem12" / "NEM12#000000000000001#CNRGYMDP#NEMMCO.zip"
_AEST = timezone(timedelta(hours=10))


@dataclass
class Server:
    env: Env
    url: str
    proc: subprocess.Popen
    log: Path

    def post(self, path: str, body: bytes, ctype: str, key: str | None = KEY, **headers: str) -> httpx.Response:
        hdrs = {"Content-Type": ctype, **headers, **({"X-API-Key": key} if key else {})}
        return httpx.post(self.url + path, content=body, headers=hdrs, timeout=60)

    def records(self, topic: str) -> list:
        return read_all(self.env.settings.kafka_bootstrap, topic, timeout_s=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(pipeline_env: Env) -> Iterator[Server]:
    port = _free_port()
    env = {**pipeline_env.env, "PIPELINE_API_KEYS": json.dumps([KEY, "second-key"]),
           "PIPELINE_HTTP_PORT": str(port), "PIPELINE_HTTP_MAX_BATCH": "500"}
    log = pipeline_env.log_dir / "http.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "http"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    srv = Server(pipeline_env, f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(srv.url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_consumed(env: Env, stage: str, records: list, timeout_s: float = 120) -> None:
    """Until ``stage`` committed past every given record (partitions without records have no offset)."""
    ends: dict[tuple[str, int], int] = {}
    for m in records:
        ends[(m.topic, m.partition)] = max(ends.get((m.topic, m.partition), 0), m.offset + 1)
    deadline = time.monotonic() + timeout_s
    while True:
        env.check_alive()
        done = committed_offsets(env.settings.kafka_bootstrap, env.topics.group(stage), list(ends))
        if all(done[tp] >= end for tp, end in ends.items()):
            return
        assert time.monotonic() < deadline, (done, ends, env.log_tail(stage))
        time.sleep(0.5)


def _as_json(r: MeterReading) -> dict:
    """A real NEM12 interval as a gateway would post it (AEST offsets, value as a decimal string)."""
    return {"nmi": r.nmi, "suffix": r.suffix, "uom": r.uom,
            "interval_start": r.interval_start.astimezone(_AEST).isoformat(),
            "interval_end": r.interval_end.astimezone(_AEST).isoformat(), "value": str(r.value),
            "quality": r.quality, "reason_code": r.reason_code, "version": r.version.isoformat()}


def test_meter_readings_land_on_the_topic_once(server: Server) -> None:
    env, topic = server.env, server.env.topics.meter_readings
    real = [r for r in read_nem12(NEM12_FILE).readings if r.nmi == "NEM1201002" and r.suffix == "E1"][:96]
    assert len(real) == 96  # two days of 30-minute intervals
    body = json.dumps([_as_json(r) for r in real]).encode()

    first = server.post("/v1/meter-readings", body, "application/json", **{"Idempotency-Key": "gw7-2005-03-15"})
    assert first.status_code == 202, first.text
    assert first.json() == {"accepted": 96, "topic": topic, "request_id": "gw7-2005-03-15"}
    # the gateway did not see the answer and retries: same answer, nothing produced
    again = server.post("/v1/meter-readings", body, "application/json", **{"Idempotency-Key": "gw7-2005-03-15"})
    assert (again.status_code, again.content, again.headers["Idempotent-Replayed"]) == (202, first.content, "true")

    records = server.records(topic)
    assert len(records) == 96
    codec = default_codec()
    got = sorted((codec.decode(m.value, MeterReading) for m in records), key=lambda r: r.interval_start)
    source = "http /v1/meter-readings request gw7-2005-03-15"
    assert got == [MeterReading(r.nmi, r.suffix, r.uom, r.interval_start, r.interval_end, r.value, r.quality,
                                r.reason_code, r.version, "UpdateDateTime", source, i)
                   for i, r in enumerate(real, 1)]
    assert {m.key for m in records} == {b"NEM1201002"}
    assert {m.partition for m in records} == {records[0].partition}  # keyed like the NEM12 gateway

    # an invalid batch: 422 naming the field, nothing produced; a wrong key: 401
    bad = [_as_json(r) for r in real[:10]]
    bad[5]["value"] = "-0.5"
    resp = server.post("/v1/meter-readings", json.dumps(bad).encode(), "application/json")
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "readings[5].value" and resp.json()["error"]["code"] == "INVALID_FIELD"
    resp = server.post("/v1/meter-readings", body, "application/json", key="not-a-key")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "INVALID_API_KEY"
    resp = server.post("/v1/meter-readings", body, "application/json", key=None)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "MISSING_API_KEY"
    assert len(server.records(topic)) == 96

    # a retry without an Idempotency-Key is produced again, with the same identities and versions: the
    # ingest stage forwards each interval once (the repeat is a duplicate, SPEC §2)
    resp = server.post("/v1/meter-readings", body, "application/json", key="second-key")
    assert resp.status_code == 202 and "Idempotent-Replayed" not in resp.headers
    assert len(server.records(topic)) == 192
    ingest = env.start("ingest")
    _wait_consumed(env, "ingest", server.records(topic))
    events = [codec.decode(m.value, UsageEvent) for m in server.records(env.topics.usage_events)]
    assert sorted(e.event_id for e in events) == sorted(r.identity for r in real)
    assert {(e.account, e.metric) for e in events} == {("ACC-1002", "energy_import")}
    assert sum(e.value for e in events) == sum(r.value for r in real)
    assert server.records(env.topics.dlq_ingest) == []
    assert env.stop(ingest) == 0

    assert server.proc.send_signal(signal.SIGTERM) is None and server.proc.wait(30) == 0, server.log.read_text()


EVENTS = [
    {"specversion": "1.0", "id": f"req-{i}", "source": "/gateways/api-7", "type": "com.example.api.request",
     "subject": subject, "time": f"2024-05-01T10:0{i}:00+10:00", "data": {"requests": i + 1}}
    for i, subject in enumerate(["tenant-42", "tenant-42", "tenant-7"])
]


def test_cloudevents_land_on_the_topic_once_in_the_kafka_binding(server: Server) -> None:
    topic = server.env.topics.telemetry_events
    batch = json.dumps(EVENTS).encode()
    first = server.post("/v1/events", batch, "application/cloudevents-batch+json", **{"Idempotency-Key": "b-1"})
    assert first.status_code == 202 and first.json()["accepted"] == 3, first.text
    again = server.post("/v1/events", batch, "application/cloudevents-batch+json", **{"Idempotency-Key": "b-1"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    single = {**EVENTS[0], "id": "req-single"}
    resp = server.post("/v1/events", json.dumps(single).encode(), "application/cloudevents+json")
    assert resp.status_code == 202 and resp.json()["accepted"] == 1

    # invalid: 4xx naming the attribute, nothing produced
    broken = [EVENTS[0], {k: v for k, v in EVENTS[1].items() if k != "source"}]
    resp = server.post("/v1/events", json.dumps(broken).encode(), "application/cloudevents-batch+json")
    assert (resp.status_code, resp.json()["error"]["field"]) == (422, "events[1].source")
    resp = server.post("/v1/events", batch, "application/json")
    assert (resp.status_code, resp.json()["error"]["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    resp = server.post("/v1/events", batch, "application/cloudevents-batch+json", key="wrong")
    assert resp.status_code == 401

    records = server.records(topic)
    assert len(records) == 4
    fmt = JSONFormat()
    got = {}
    for m in records:
        assert dict(m.headers) == {"content-type": b"application/cloudevents+json"}  # structured mode
        ev = ce_kafka.from_kafka(ce_kafka.KafkaMessage(dict(m.headers), m.key, m.value), fmt)
        assert m.key == ev.get_subject().encode()
        got[ev.get_id()] = (ev.get_source(), ev.get_type(), ev.get_subject(), ev.get_time().isoformat(),
                            ev.get_data())
    assert got == {e["id"]: (e["source"], e["type"], e["subject"], e["time"], e["data"])
                   for e in [*EVENTS, single]}

    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/v1/meter-readings", "/v1/events"} <= set(spec["paths"])
    assert server.proc.send_signal(signal.SIGTERM) is None and server.proc.wait(30) == 0, server.log.read_text()

