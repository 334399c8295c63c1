"""Monitoring pieces without a broker (issue 16): the /healthz, /readyz and /metrics server over real HTTP,
and the arrival and window-close times that travel in headers from ingest to the ledger."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta

from pipeline.records import UsageWindow
from pipeline.runtime import timing
from pipeline.runtime.health import HealthServer
from pipeline.runtime.kafka import Incoming
from pipeline.runtime.processor import FakeContext
from tests.unit.test_windowing_processor import CODEC, T0, TOPICS, Harness, event


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_endpoints_answer_from_their_checks_beside_the_metrics() -> None:
    state = {"ready": False, "live": True}

    def ready() -> str | None:
        return None if state["ready"] else "restoring partition 2"

    def live() -> str | None:
        if state["live"] is None:
            raise RuntimeError("boom")
        return None if state["live"] else "no progress for 200 s while polling"

    server = HealthServer(0, live=live, ready=ready)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/readyz") == (503, "restoring partition 2\n")
        state["ready"] = True
        assert _get(f"{base}/readyz") == (200, "ready\n")
        state["live"] = False
        assert _get(f"{base}/healthz") == (503, "no progress for 200 s while polling\n")
        state["live"] = None  # a check that fails is an unhealthy answer, not a dead server
        status, body = _get(f"{base}/healthz")
        assert status == 503 and "boom" in body
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "# TYPE process_start_time_seconds gauge" in body
    finally:
        server.close()


def test_timing_headers() -> None:
    rec = Incoming("t", 0, 0, None, b"", (("x", b"1"), (timing.ARRIVED, b"1700")), 2000)
    assert timing.arrival_ms(rec) == 1700
    assert timing.arrival_ms(rec._replace(headers=())) == 2000  # the gateway's Kafka timestamp
    assert timing.read_ms(((timing.ARRIVED, b"junk"),), timing.ARRIVED) is None
    assert timing.earliest(None, 5) == 5 and timing.earliest(7, 5) == 5 and timing.earliest(None, None) is None
    assert timing.headers(1, 2) == [(timing.ARRIVED, b"1"), (timing.CLOSED, b"2")]
    assert timing.headers(None) is None


def test_a_window_revision_carries_the_earliest_arrival_of_its_events_since_the_last_revision() -> None:
    h = Harness(ctx=FakeContext())

    def send(arrived: int, *events: object) -> None:
        batch = []
        for e in events:
            batch.append(
                Incoming(
                    TOPICS.usage_events, 0, h.offset, b"ACC-1", CODEC.encode(e), ((timing.ARRIVED, b"%d" % arrived),), 0
                )
            )
            h.offset += 1
        h.proc.process_batch(batch, h.ctx)
        h.proc.punctuate(h.clock[0], h.ctx)

    h.clock[0] = 9_000
    send(500, event(0, "1"))
    send(300, event(1, "2"))  # arrived earlier (another gateway's clock), folded into the same window
    send(800, event(20, "1"))  # moves the series clock past window 0: it is emitted
    send(900, event(0, "1.5", version=2))  # a correction: revision 1 carries only its own arrival
    send(950, event(40, "1"))
    h.close_all()
    revisions = [
        (CODEC.decode(v, UsageWindow), hdrs)
        for (t, _k, v), hdrs in zip(h.ctx.forwarded, h.ctx.headers, strict=True)
        if t == TOPICS.usage_windows
    ]
    first = [(w.revision, hdrs) for w, hdrs in revisions if w.window_start == T0]
    assert first == [
        (0, [(timing.ARRIVED, b"300"), (timing.CLOSED, b"9000")]),
        (1, [(timing.ARRIVED, b"900"), (timing.CLOSED, b"9000")]),
    ]
    later = {w.window_start: hdrs[0] for w, hdrs in revisions if w.window_start != T0}
    assert later[T0 + timedelta(minutes=90)] == (timing.ARRIVED, b"800")  # slot 20 = 100 min: window 90-120


def test_pipeline_status_renders_every_fact() -> None:
    from pipeline.monitoring.status import render

    text = render(
        {
            "prometheus": "stopped",
            "processes": [
                {"service": "ingest", "instance": "0", "up": True, "ready": True, "lag": 1234, "last_commit_s": 3.2},
                {"service": "rating", "instance": "1", "up": False, "ready": False, "lag": None, "last_commit_s": None},
            ],
            "offsets": {"ingest": {"committed": 90, "end": 100}},
            "dead_letters": {"ingest UNKNOWN_NMI": 2},
            "refused": {},
            "ledger_lines": 5000,
            "invoices": {"OPEN": 3, "FINALIZED": 40},
            "outbox_backlog": 7,
        }
    )
    lines = text.splitlines()
    assert lines[0] == "prometheus: stopped"
    assert any(line.split() == ["ingest", "up", "yes", "1,234", "3", "s", "ago"] for line in lines)
    assert any(line.split() == ["rating#1", "DOWN", "no", "-", "-"] for line in lines)
    assert "  ingest                90 / 100          behind 10" in lines
    assert "dead letters: 2" in lines and any(line.split() == ["ingest", "UNKNOWN_NMI", "2"] for line in lines)
    assert "refused (usage.late): 0" in lines
    assert lines[-1].split() == [
        "ledger",
        "lines:",
        "5,000",
        "invoices:",
        "3",
        "open,",
        "40",
        "finalized",
        "outbox",
        "backlog:",
        "7",
    ]
