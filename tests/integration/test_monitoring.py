"""Monitoring against a real Prometheus (issue 16): the local stack's Prometheus (Debian's 2.42, started by
``pipeline.monitoring.prometheus`` as `pipeline stack up --with-monitoring` does) scrapes every stage, the relay
and the HTTP gateway of an isolated pipeline through file-based discovery while real NEM12 files and known-bad
records flow; its HTTP API must then show the lag back at 0, reading-to-ledger latency samples and exactly the
dead letters sent. A stage killed with SIGKILL must go ``up == 0`` and fire ``PipelineProcessDown``."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import default_codec
from pipeline.config import Settings
from pipeline.monitoring import prometheus
from pipeline.records import MeterReading
from tests.integration.conftest import DATA, Env, publish_files

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "pipeline.json"
SERVICES = ("ingest", "windowing", "rating", "invoicing", "relay")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_prometheus(tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """The stack's Prometheus on its own port and folder, scraping every second; stopped afterwards."""
    settings = Settings(
        stack_dir=tmp_path / "monitoring", prometheus_port=_free_port(), prometheus_scrape_interval_s=1.0
    )
    base = prometheus.up(settings)
    try:
        yield settings, base
    finally:
        prometheus.down(settings)
        assert prometheus.pid(settings) is None


def _start(env: Env, mon: Settings, service: str) -> int:
    port = _free_port()
    env.start(
        service, PIPELINE_METRICS_PORT=str(port), PIPELINE_STACK_DIR=str(mon.stack_dir), PIPELINE_MONITOR_INTERVAL_S="1"
    )
    return port


def _eventually(
    what: str, probe: Callable[[], Any], env: Env, accept: Callable[[Any], bool] = bool, timeout_s: float = 180.0
) -> Any:
    """Poll ``probe`` every second until ``accept`` takes its value (returned) or ``timeout_s`` passes (fails with
    the last value); the pipeline's processes must stay alive meanwhile."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        env.check_alive()
        try:
            last = probe()
        except prometheus.PrometheusError as exc:
            last = exc
        else:
            if accept(last):
                return last
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout_s:.0f} s; last: {last}"
        time.sleep(1.0)


def _by(base: str, promql: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in prometheus.query(base, promql)}


def _bad_records(env: Env) -> tuple[int, int]:
    """Known-bad input: 3 undecodable records and 2 readings of a meter nobody has (UNKNOWN_NMI), dead-lettered;
    4 readings of NEM1201002 before its service starts (15 March 2005), refused (OUTSIDE_SERVICE_DATES).
    Returns (dead-lettered, refused)."""
    producer = env.producer()
    for i in range(3):
        producer.send(env.topics.meter_readings, b"NOPE%d" % i, b"\x00not avro %d" % i)
    codec = default_codec()
    start = datetime(2005, 3, 1, 14, 0, tzinfo=UTC)
    for nmi, n in (("9999999999", 2), ("NEM1201002", 4)):
        for i in range(n):
            reading = MeterReading(
                nmi,
                "E1",
                "kWh",
                start + timedelta(minutes=30 * i),
                start + timedelta(minutes=30 * (i + 1)),
                Decimal("1.5"),
                "A",
                None,
                start,
                "file",
                "monitoring-test.csv",
                7 + i,
            )
            producer.send(env.topics.meter_readings, nmi.encode(), codec.encode(reading))
    producer.flush()
    return 5, 4


def test_prometheus_scrapes_every_process_lag_returns_to_zero_and_counts_match(
    pipeline_env: Env, local_prometheus: tuple[Settings, str]
) -> None:
    env = pipeline_env
    mon, base = local_prometheus
    env.env["PIPELINE_INVOICE_IDLE_CLOSE_S"] = "5"
    rules = subprocess.run(
        [str(prometheus.promtool(mon)), "check", "rules", str(prometheus.RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rules.returncode == 0 and "SUCCESS" in rules.stdout, rules.stdout + rules.stderr
    ports = {s: _start(env, mon, s) for s in SERVICES}
    http_port = _free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "http", "--port", str(http_port)],
        env={**env.env, "PIPELINE_STACK_DIR": str(mon.stack_dir), "PIPELINE_API_KEYS": '["k"]'},
        stdout=open(env.log_dir / "http-0.log", "ab"),  # noqa: SIM115 - handed to the child
        stderr=subprocess.STDOUT,
    )
    env.procs["http"] = [http]
    up = _eventually(
        "every process up in Prometheus",
        lambda: _by(base, 'up{job="pipeline"}', "service"),
        env,
        lambda u: u.keys() >= {*SERVICES, "http"} and all(v == 1 for v in u.values()),
    )
    assert up == dict.fromkeys((*SERVICES, "http"), 1.0)
    for service, port in ports.items():  # liveness and readiness beside /metrics
        _eventually(f"{service} ready", lambda port=port: _status(f"http://127.0.0.1:{port}/readyz") == 200, env)
        assert _status(f"http://127.0.0.1:{port}/healthz") == 200
    assert _status(f"http://127.0.0.1:{http_port}/readyz") == 200
    assert _status(f"http://127.0.0.1:{http_port}/v1/meter-readings", b"[]") == 401  # no API key

    files = sorted((DATA / "nem12").glob("*.zip"))[:6]
    published = publish_files(env, files)
    bad, refused = _bad_records(env)
    report = env.wait_accounted(published=published + bad + refused)
    assert (report.billed, report.dead_lettered, report.refused) == (published, bad, {"OUTSIDE_SERVICE_DATES": 4})
    env.assert_invoice_events()  # the relay drained the outbox

    lag = _eventually(
        "lag back to 0 on every stage",
        lambda: _by(base, "sum by (stage) (pipeline_consumer_lag_records)", "stage"),
        env,
        lambda v: v.keys() >= {"ingest", "windowing", "rating", "invoicing"} and not any(v.values()),
    )
    assert lag == dict.fromkeys(("ingest", "windowing", "rating", "invoicing"), 0.0)
    dead = _eventually(
        "dead letters counted",
        lambda: _by(base, 'sum by (reason) (pipeline_dead_letters_total{stage="ingest"})', "reason"),
        env,
        lambda d: sum(d.values()) >= bad,
    )
    assert dead == {"UNDECODABLE": 3.0, "UNKNOWN_NMI": 2.0}
    ingest_counts = _by(base, 'sum by (reason) (pipeline_ingest_records_total{outcome="dead_lettered"})', "reason")
    assert ingest_counts == dead
    assert _by(base, "sum by (reason) (pipeline_refused_total)", "reason") == {"OUTSIDE_SERVICE_DATES": 4.0}
    lines = env.line_count()

    def latency_counts() -> tuple[float | None, float]:  # (what Prometheus scraped, what invoicing counts now)
        own = _scrape(ports["invoicing"], "pipeline_reading_to_ledger_seconds_count")
        return _by(base, "sum(pipeline_reading_to_ledger_seconds_count)", "").get(""), own

    latency, _ = _eventually("reading-to-ledger latency scraped", latency_counts, env, lambda c: c[0] == c[1] > 0)
    assert _by(base, "sum(pipeline_window_close_to_ledger_seconds_count)", "") == {"": latency}
    rewound = any("resumed from the last commit" in env.log_tail(s, 10**8) for s in ("windowing", "rating"))
    if rewound:  # a revision redone after an aborted transaction carries no arrival time (kept in memory only)
        assert 0 < latency <= lines
    else:
        assert latency == lines  # one observation per ledger line appended
    buckets = _by(base, "sum by (le) (pipeline_reading_to_ledger_seconds_bucket)", "le")
    # arrival, not event time (2005): every line within the test's minutes; some waited for their windows to close
    assert buckets["+Inf"] == buckets["600.0"] == latency and buckets["0.5"] < latency
    assert _by(base, 'sum(pipeline_http_requests_total{route="/v1/meter-readings",status="401"})', "") == {"": 1.0}
    _eventually("outbox backlog 0", lambda: _by(base, "pipeline_outbox_backlog", "service") == {"relay": 0.0}, env)

    def invoices() -> tuple[dict[str, float], dict[str, float]]:  # (Prometheus, the ledger now)
        ledger = dict(env.sql("SELECT status, count(*) FROM invoices GROUP BY status"))
        return (
            _by(base, 'pipeline_invoices{service="invoicing"}', "status"),
            {s: float(ledger.get(s, 0)) for s in ("OPEN", "REVIEW", "FINALIZED")},
        )

    _eventually("invoices by status as in the ledger", invoices, env, lambda pair: pair[0] == pair[1])
    assert sum(_by(base, "pipeline_state_store_bytes", "stage").values()) > 0

    # the dashboard asks only for metrics the processes export (what Prometheus scraped from them)
    names = set(json.loads(urllib.request.urlopen(f"{base}/api/v1/label/__name__/values", timeout=10).read())["data"])
    used = dashboard_metrics()
    assert used and used <= names, sorted(used - names)

    # `pipeline status` shows the same facts without Prometheus
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", "--json"],
        capture_output=True,
        text=True,
        env={**env.env, "PIPELINE_STACK_DIR": str(mon.stack_dir)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert {p["service"]: (p["up"], p["ready"]) for p in facts["processes"]} == dict.fromkeys(
        (*SERVICES, "http"), (True, True)
    )
    assert {p["service"]: p["lag"] for p in facts["processes"] if p["service"] in SERVICES[:4]} == dict.fromkeys(
        SERVICES[:4], 0
    )
    assert facts["dead_letters"] == {"ingest UNDECODABLE": 3, "ingest UNKNOWN_NMI": 2}
    assert facts["refused"] == {"ingest OUTSIDE_SERVICE_DATES": 4}
    assert facts["ledger_lines"] == lines and facts["outbox_backlog"] == 0


def test_a_killed_stage_goes_down_and_fires_its_alert(
    pipeline_env: Env, local_prometheus: tuple[Settings, str]
) -> None:
    env = pipeline_env
    mon, base = local_prometheus
    _start(env, mon, "rating")
    _eventually("rating up", lambda: _by(base, 'up{service="rating"}', "service") == {"rating": 1.0}, env)
    victim = env.procs["rating"][0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    env.procs.pop("rating")  # died on purpose
    _eventually(
        "rating down", lambda: _by(base, 'up{service="rating"}', "service") == {"rating": 0.0}, env, timeout_s=60
    )
    firing = _eventually(
        "PipelineProcessDown firing",
        lambda: [
            a
            for a in prometheus.alerts(base)
            if a["labels"].get("alertname") == "PipelineProcessDown"
            and a["labels"].get("service") == "rating"
            and a["state"] == "firing"
        ],
        env,
        timeout_s=120,
    )
    assert firing[0]["labels"]["severity"] == "page"


def _scrape(port: int, sample: str) -> float:
    """One sample's value from a process's own /metrics (what Prometheus should have scraped)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == sample)


def _status(address: str, body: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(address, data=body), timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard's queries use (``tests/unit/test_monitoring_files.py`` shares it)."""
    return metric_names_in(json.loads(DASHBOARD.read_text()))


_FUNCTIONS = {
    "sum",
    "rate",
    "increase",
    "max",
    "min",
    "avg",
    "by",
    "without",
    "histogram_quantile",
    "deriv",
    "time",
    "changes",
    "count",
    "topk",
    "delta",
    "le",
    "on",
    "and",
    "or",
    "unless",
    "vector",
    "clamp_min",
    "irate",
    "max_over_time",
    "min_over_time",
    "resets",
    "label_replace",
    "abs",
    "offset",
    "bool",
    "ignoring",
    "group_left",
    "sort_desc",
    "absent",
}


def metric_names_in(dashboard: dict[str, Any]) -> set[str]:
    """Metric names in the ``expr`` of every panel target of a Grafana dashboard (labels, strings and PromQL
    functions left out)."""
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r'"[^"]*"', "", target["expr"])  # label values
            expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
            expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
            names |= {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in _FUNCTIONS}
    return names
