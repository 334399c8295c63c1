"""Telemetry end to end over the real broker and real Postgres (issue 6): a generated stream of CloudEvents
in both content modes, with repeats, out of order, for several accounts and the three sample metrics,
ends as invoice lines whose totals equal an independent batch computation per account, period and
component; every repeat is dropped by ingest and every bad record is dead-lettered with its bytes."""

from __future__ import annotations

import random
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.codec import default_codec
from pipeline.ingest.nem12 import read_nem12
from pipeline.ingest.telemetry import encode_cloudevent, sample_stream
from pipeline.records import DeadLetter, UsageEvent
from pipeline.reference import BUNDLED_REFERENCE
from pipeline.runtime.kafka import committed_offsets, read_all
from tests.integration.conftest import DATA, Env, publish_files
from tests.telemetrybill import expected_telemetry_bills

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, prefix: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_consumed(env: Env, stage: str, topic: str, timeout_s: float = 300) -> None:
    """Until ``stage`` committed every record of ``topic`` (partitions that got none count as done)."""
    tps = [(topic, p) for p in range(env.settings.partitions)]
    ends = {tp: 0 for tp in tps}
    for m in read_all(env.settings.kafka_bootstrap, topic, timeout_s=60):
        ends[(m.topic, m.partition)] = max(ends[(m.topic, m.partition)], m.offset + 1)
    deadline = time.monotonic() + timeout_s
    while True:
        env.check_alive()
        done = committed_offsets(env.settings.kafka_bootstrap, env.topics.group(stage), tps)
        if all(end == 0 or done[tp] >= end for tp, end in ends.items()):
            return
        assert time.monotonic() < deadline, f"{stage} has not consumed {topic}: {done} vs {ends}"
        time.sleep(0.5)


def _bad_records(now: datetime) -> list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """(expected reason, key, value, headers) of records ingest must dead-letter."""
    at = now - timedelta(days=2)

    def event(mode: str = "binary", data: object = None, **over: object) -> tuple[bytes, list[tuple[str, bytes]]]:
        attrs = {"id": f"bad-{sorted(over.items())}", "source": "/test/bad", "type": "com.example.api.request",
                 "subject": "tenant-b", "time": at, "datacontenttype": "application/json", **over}
        return encode_cloudevent({k: v for k, v in attrs.items() if v is not None}, data, mode)  # type: ignore[arg-type]

    no_id = [h for h in event()[1] if h[0] != "ce_id"]
    out = []
    for reason, (value, headers) in [
        ("UNKNOWN_SUBJECT", event(subject="tenant-unknown")),
        ("UNKNOWN_SUBJECT", event("structured", subject=None)),
        ("UNKNOWN_EVENT_TYPE", event(type="com.example.unknown")),
        ("FUTURE_EVENT", event("structured", time=now + timedelta(days=3))),
        ("NEGATIVE_VALUE", event(type="com.example.storage.usage", data={"usage": {"gb_hours": -1}})),
        ("SCHEMA_VIOLATION", event("structured", type="com.example.user.active", data={"user": {}})),
        ("SCHEMA_VIOLATION", (b"{}", no_id)),
        ("UNDECODABLE", (b"\x00\x01 not an event", [("trace", b"\xff")])),
        ("UNDECODABLE", (b"{truncated", [("content-type", b"application/cloudevents+json")])),
    ]:
        out.append((reason, b"tenant-b", value, headers))
    return out


def test_telemetry_stream_bills_exactly_like_the_batch_computation(pipeline_env: Env) -> None:
    env = pipeline_env
    port = _free_port()
    # the stream spans 9 days: keep every id in the dedupe state so that all repeats stop at ingest
    env.env["PIPELINE_TELEMETRY_DEDUPE_HORIZON_S"] = str(30 * 86_400)
    env.start("ingest", PIPELINE_METRICS_PORT=str(port))
    for stage in ("windowing", "rating", "invoicing"):
        env.start(stage)

    now = datetime.now(UTC)
    # nine days up to a UTC midnight at least an hour old; every hourly and daily window closes once its
    # series is quiet. Relative to today, so the test does not age; the accounts' periods start on the 1st
    # (UTC, Sydney) and the 15th (New York)
    end = (now - timedelta(hours=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    stream, repeats = sample_stream(end - timedelta(days=9), end, seed=6)
    bad = _bad_records(now)
    producer = env.producer()
    for e in stream:
        key, value, headers = e.record()
        producer.send(env.topics.telemetry_events, key, value, headers)
    for _reason, key, value, headers in bad:
        producer.send(env.topics.telemetry_events, key or b"", value or b"", headers)
    producer.flush()
    modes = Counter(e.mode for e in stream)
    assert repeats > 100 and modes["binary"] > 1000 and modes["structured"] > 1000
    _wait_consumed(env, "ingest", env.topics.telemetry_events)
    env.wait_accounted(published=len(stream) + len(bad))

    # the ledger equals the batch computation, per account, period and component
    want = expected_telemetry_bills([(e.attributes, e.data) for e in stream], BUNDLED_REFERENCE)
    got = env.ledger_totals()
    assert {a for a, _ in want} == {"TEL-3001", "TEL-3002", "TEL-3003"}
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key in want:
        assert got[key] == want[key], key
    assert env.sql("SELECT count(*) - count(DISTINCT line_id) FROM invoice_lines")[0][0] == 0

    # ingest forwarded each event once, dropped every repeat, dead-lettered exactly the bad records
    codec = default_codec()
    distinct = len(stream) - repeats
    usage = [codec.decode(m.value, UsageEvent) for m in read_all(env.settings.kafka_bootstrap, env.topics.usage_events)]
    assert len(usage) == len({u.event_id for u in usage}) == distinct
    dead = [codec.decode(m.value, DeadLetter) for m in read_all(env.settings.kafka_bootstrap, env.topics.dlq_ingest)]
    assert Counter(d.reason for d in dead) == Counter(reason for reason, *_ in bad)
    assert sorted((d.value, d.headers) for d in dead) == sorted((v, tuple(h)) for _r, _k, v, h in bad)
    assert {(d.stage, d.topic) for d in dead} == {("ingest", env.topics.telemetry_events)}

    m = _scrape(port, "pipeline_ingest_records_total")
    outcomes: Counter[str] = Counter()
    for name, value in m.items():
        outcomes[name.split('outcome="')[1].split('"')[0]] += int(value)
    assert outcomes == {"accepted": distinct, "duplicate": repeats, "dead_lettered": len(bad)}
    assert sum(outcomes.values()) == len(stream) + len(bad)
    assert m['pipeline_ingest_records_total{input="telemetry",outcome="dead_lettered",reason="UNDECODABLE"}'] == 2
    assert env.stop_all() == {s: [0] for s in ("ingest", "windowing", "rating", "invoicing")}


def test_ingest_killed_mid_stream_forwards_each_event_exactly_once(pipeline_env: Env) -> None:
    """SIGKILL at random points: the duplicate-detection state (RocksDB + changelog) and the output commit in
    one Kafka transaction, so after restarts every event is on usage.events exactly once and no repeat is."""
    env = pipeline_env
    env.env["PIPELINE_TELEMETRY_DEDUPE_HORIZON_S"] = str(30 * 86_400)
    env.env["PIPELINE_BATCH_MAX_RECORDS"] = "100"  # many small transactions to die in
    env.start("ingest")
    end = (datetime.now(UTC) - timedelta(hours=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    stream, repeats = sample_stream(end - timedelta(days=6), end, seed=11, duplicate_share=0.3)
    tps = [(env.topics.telemetry_events, p) for p in range(env.settings.partitions)]

    def committed() -> int:
        return sum(max(o, 0) for o in committed_offsets(env.settings.kafka_bootstrap, env.topics.group("ingest"),
                                                        tps).values())

    rng = random.Random(11)
    producer = env.producer()
    kills = 0
    for i in range(0, len(stream), 800):
        before = committed()
        for e in stream[i:i + 800]:
            key, value, headers = e.record()
            producer.send(env.topics.telemetry_events, key, value, headers)
        producer.flush()
        if i + 800 >= len(stream):
            break
        deadline = time.monotonic() + 90
        while committed() <= before:  # this incarnation is at work on the chunk: kill it in the middle
            env.check_alive()
            assert time.monotonic() < deadline, env.log_tail("ingest")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        env.stop(env.procs["ingest"][-1], signal.SIGKILL)
        kills += 1
        env.start("ingest")  # same instance id: fences the dead transaction at once
    assert kills >= 4
    _wait_consumed(env, "ingest", env.topics.telemetry_events)
    codec = default_codec()
    usage = [codec.decode(m.value, UsageEvent) for m in read_all(env.settings.kafka_bootstrap, env.topics.usage_events)]
    assert len(usage) == len({u.event_id for u in usage}) == len(stream) - repeats
    restored = re.findall(r"restored partition \d+ from (\d+) changelog records", env.log_tail("ingest", 10**7))
    assert sum(map(int, restored)) > 0  # later incarnations started from the dead ones' committed state
    assert read_all(env.settings.kafka_bootstrap, env.topics.dlq_ingest) == []


def test_two_ingest_processes_share_both_topics_and_survive_a_dead_peer(pipeline_env: Env) -> None:
    """Meter readings and CloudEvents through two ingest processes: partitions of the two input topics move
    between them on rebalances (and to the survivor when one is killed); each interval and each event is
    forwarded once, however often it was published."""
    env = pipeline_env
    env.env["PIPELINE_TELEMETRY_DEDUPE_HORIZON_S"] = str(30 * 86_400)
    files = sorted((DATA / "nem12").glob("*.zip"))[:6]
    end = (datetime.now(UTC) - timedelta(hours=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    stream, repeats = sample_stream(end - timedelta(days=3), end, seed=5, duplicate_share=0.2)
    thirds = [stream[i::3] for i in range(3)]
    producer = env.producer()

    def publish(part: int) -> int:
        for e in thirds[part]:
            key, value, headers = e.record()
            producer.send(env.topics.telemetry_events, key, value, headers)
        producer.flush()
        return publish_files(env, files)  # every time again: repeats of the same intervals

    def consumed() -> None:
        _wait_consumed(env, "ingest", env.topics.telemetry_events)
        _wait_consumed(env, "ingest", env.topics.meter_readings)

    # rebalances happen between deliveries: a transaction committed across a rebalance is fatal to the
    # runtime (KIP-447 generation check), which a supervisor restart would cover but this test has none
    a = env.start("ingest", instance="a")
    readings = publish(0)
    consumed()
    env.start("ingest", instance="b")
    _wait_restored(env, "ingest-b", 1)
    readings += publish(1)
    consumed()
    taken = _restores(env, "ingest-b")
    env.stop(a, signal.SIGKILL)  # not restarted: "b" takes over its partitions of both topics
    env.procs["ingest"].remove(a)
    _wait_restored(env, "ingest-b", taken + 1)
    time.sleep(1)
    readings += publish(2)
    consumed()

    codec = default_codec()
    records = read_all(env.settings.kafka_bootstrap, env.topics.usage_events)
    usage = [codec.decode(m.value, UsageEvent) for m in records if codec.record_name(m.value) == "UsageEvent"]
    markers = [m for m in records if codec.record_name(m.value) == "SeriesMarker"]
    assert len(markers) + len(usage) == len(records) and markers  # each file's completion markers, too
    meter = [u for u in usage if u.event_id.startswith("nem12:")]
    telemetry = [u for u in usage if u.event_id.startswith("ce:")]
    assert len(meter) + len(telemetry) == len(usage)
    intervals = {r.identity for f in files for r in read_nem12(f).readings}
    assert readings == 3 * sum(len(read_nem12(f).readings) for f in files)
    assert sorted(u.event_id for u in meter) == sorted(intervals)
    assert len(telemetry) == len({u.event_id for u in telemetry}) == len(stream) - repeats
    assert read_all(env.settings.kafka_bootstrap, env.topics.dlq_ingest) == []
    assert env.stop_all() == {"ingest": [0]}


def _restores(env: Env, log_name: str) -> int:
    path = env.log_dir / f"{log_name}.log"
    return (path.read_text(errors="replace") if path.exists() else "").count("restored partition")


def _wait_restored(env: Env, log_name: str, count: int, timeout_s: float = 90) -> None:
    """Until the process logging to ``<log_name>.log`` has restored ``count`` partitions (its assignments)."""
    deadline = time.monotonic() + timeout_s
    while _restores(env, log_name) < count:
        env.check_alive()
        assert time.monotonic() < deadline, f"{log_name} got no partition"
        time.sleep(0.2)
