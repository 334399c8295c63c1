"""``pipeline status``: the on-call facts in one terminal view, for machines without Grafana.

Per process the CLI registered (``prometheus.targets_dir``): up (``/healthz`` answers), ready (``/readyz``),
consumer lag and last commit (its ``/metrics``). Per stage, from Kafka and Postgres directly: records of its
input committed vs on the topics. Dead letters and refusals by stage and reason (``dlq.ingest``, the ledger's
``dead_letters`` table, ``usage.late``), ledger lines, invoices by status and the outbox backlog.

``gather`` does the I/O (every call bounded by a timeout); ``render`` is a pure function of its result.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.monitoring import prometheus

HTTP_TIMEOUT_S = 3.0


def _get(address: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET, (0, error) when nothing answers within ``HTTP_TIMEOUT_S``."""
    try:
        with urllib.request.urlopen(address, timeout=HTTP_TIMEOUT_S) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        return 0, str(exc)


def process_facts(target_file: Path) -> dict[str, Any]:
    """What one registered process says about itself: service, address, up, ready, lag (records, summed over its
    partitions), seconds since its last commit, restarts are not known here (Prometheus has them)."""
    entry = json.loads(target_file.read_text())[0]
    address = entry["targets"][0]
    facts: dict[str, Any] = {
        "service": entry["labels"]["service"],
        "instance": entry["labels"].get("pipeline_instance", "0"),
        "address": address,
        "up": False,
        "ready": False,
        "lag": None,
        "last_commit_s": None,
    }
    status, _ = _get(f"http://{address}/healthz")
    facts["up"] = status == 200
    if status == 0:
        return facts
    facts["ready"] = _get(f"http://{address}/readyz")[0] == 200
    status, text = _get(f"http://{address}/metrics")
    if status != 200:
        return facts
    lag = 0.0
    seen_lag = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pipeline_consumer_lag_records":
                lag += sample.value
                seen_lag = True
            elif sample.name in (
                "pipeline_last_commit_timestamp_seconds",
                "pipeline_relay_last_round_timestamp_seconds",
            ):
                facts["last_commit_s"] = max(0.0, time.time() - sample.value)
    facts["lag"] = int(lag) if seen_lag else None
    return facts


def gather(settings: Settings) -> dict[str, Any]:
    """Every fact ``render`` shows (JSON-able). Kafka and Postgres must answer (their clients' timeouts)."""
    from pipeline.codec import default_codec
    from pipeline.operations.reconcile import progress
    from pipeline.records import DeadLetter, LateEvent
    from pipeline.runtime import postgres
    from pipeline.runtime.kafka import read_all
    from pipeline.topology import Topics

    topics = Topics(settings)
    codec = default_codec()
    targets = sorted(prometheus.targets_dir(settings).glob("*.json"))
    dead: Counter[str] = Counter()
    for m in read_all(settings.kafka_bootstrap, topics.dlq_ingest, timeout_s=60):
        d = codec.decode(m.value, DeadLetter)
        dead[f"{d.stage} {d.reason}"] += 1
    refused: Counter[str] = Counter()
    for m in read_all(settings.kafka_bootstrap, topics.usage_late, timeout_s=60):
        late = codec.decode(m.value, LateEvent)
        refused[f"{late.stage} {late.reason}"] += 1
    with postgres.connect(settings.database_url) as conn:
        for stage, reason, n in conn.execute("SELECT stage, reason, count(*) FROM dead_letters GROUP BY 1, 2"):
            dead[f"{stage} {reason}"] += n
        lines = conn.execute("SELECT count(*) FROM invoice_lines").fetchone()[0]
        invoices = dict(conn.execute("SELECT status, count(*) FROM invoices GROUP BY status").fetchall())
        backlog = conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0]
    return {
        "prometheus": prometheus.status(settings),
        "processes": [process_facts(t) for t in targets],
        "offsets": {stage: {"committed": done, "end": end} for stage, (done, end) in progress(settings).items()},
        "dead_letters": dict(sorted(dead.items())),
        "refused": dict(sorted(refused.items())),
        "ledger_lines": lines,
        "invoices": invoices,
        "outbox_backlog": backlog,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


def render(facts: dict[str, Any]) -> str:
    """The terminal view of ``gather``'s result."""
    out = [f"prometheus: {facts['prometheus']}", "", f"{'process':<14}{'up':<6}{'ready':<7}{'lag':>10}  last commit"]
    if not facts["processes"]:
        out.append(
            "  (no process registered: start stages with `pipeline demo`, or `pipeline run` with "
            "PIPELINE_METRICS_PORT set)"
        )
    for p in facts["processes"]:
        name = p["service"] + ("" if p["instance"] == "0" else f"#{p['instance']}")
        out.append(
            f"{name:<14}{'up' if p['up'] else 'DOWN':<6}{'yes' if p['ready'] else 'no':<7}"
            f"{'-' if p['lag'] is None else format(p['lag'], ','):>10}  {_age(p['last_commit_s'])}"
        )
    out += ["", "input committed / on the topics (offsets; transaction markers count):"]
    for stage, o in facts["offsets"].items():
        out.append(f"  {stage:<12}{o['committed']:>12,} / {o['end']:<12,} behind {o['end'] - o['committed']:,}")
    for title, key in (("dead letters", "dead_letters"), ("refused (usage.late)", "refused")):
        counts = facts[key]
        out.append(f"\n{title}: {sum(counts.values()):,}")
        out += [f"  {what:<40}{n:>10,}" for what, n in counts.items()]
    inv = facts["invoices"]
    out += [
        "",
        f"ledger lines: {facts['ledger_lines']:,}   invoices: {inv.get('OPEN', 0):,} open, "
        f"{inv.get('FINALIZED', 0):,} finalized   outbox backlog: {facts['outbox_backlog']:,}",
    ]
    return "\n".join(out)
