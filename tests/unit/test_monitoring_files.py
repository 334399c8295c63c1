"""Static checks of the monitoring and Docker files (issue 16): docker-compose.yml can work for Docker users
(no engine here), the Prometheus and Grafana configs point at the services' real metrics ports and files, and
the dashboard asks only for metrics the processes export."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline import stack
from pipeline.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def pipeline_services() -> dict[str, dict[str, Any]]:
    """Services that run the `pipeline` command."""
    return {name: s for name, s in SERVICES.items() if "pipeline" in " ".join(_command(s))}


def long_running() -> dict[str, tuple[str, int]]:
    """Service → (what it runs, the port its /metrics is on) for every stage, relay and HTTP gateway."""
    out = {}
    for name, s in pipeline_services().items():
        text = " ".join(_command(s))
        env = s["environment"]
        if m := re.search(r"pipeline run (\w+)", text):
            out[name] = (m.group(1), int(env["PIPELINE_METRICS_PORT"]))
        elif "pipeline serve http" in text:
            out[name] = ("http", int(env["PIPELINE_HTTP_PORT"]))
    return out


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path (relative to the repo) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        out[container] = (REPO / host).resolve()
    return out


def test_every_loopback_default_is_overridden_with_a_container_address(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_fields = [name for name, f in Settings.model_fields.items() if any(h in str(f.default) for h in LOOPBACK)]
    assert {"kafka_bootstrap", "database_url", "database_owner_url", "metrics_addr", "http_host"} <= set(
        loopback_fields
    )
    assert set(pipeline_services()) >= {"setup", "ingest", "windowing", "rating", "invoicing", "relay", "http"}
    for name, service in pipeline_services().items():
        env = {k: str(v) for k, v in service["environment"].items()}
        for field in loopback_fields:
            var = f"PIPELINE_{field.upper()}"
            assert var in env, f"{name}: {var} defaults to loopback and is not set"
            assert not any(h in env[var] for h in LOOPBACK), f"{name}: {var}={env[var]}"
        for var in list(Settings.model_fields):
            monkeypatch.delenv(f"PIPELINE_{var.upper()}", raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        settings = Settings()
        host, port = settings.kafka_bootstrap.split(":")
        assert host in SERVICES and port == "9092", settings.kafka_bootstrap  # the broker's PLAINTEXT listener
        assert f"PLAINTEXT://{settings.kafka_bootstrap}" in SERVICES[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        for url, role in ((settings.database_url, stack.PG_ROLE), (settings.database_owner_url, stack.PG_OWNER)):
            parts = urlsplit(url)
            assert (parts.hostname, parts.port, parts.username, parts.path) == (
                "postgres",
                5432,
                role,
                f"/{stack.PG_DATABASE}",
            ), url
            assert (role, parts.password) in ROLES.items(), f"{name}: {role} with that password is not created"
        assert settings.metrics_addr == "0.0.0.0" and settings.metrics_port > 0
        assert not str(settings.stack_dir).startswith(".")  # no discovery files in the mounted repo
        for dependency in ("kafka", "postgres"):
            assert dependency in service["depends_on"]


def _init_roles() -> dict[str, str]:
    postgres = SERVICES["postgres"]
    scripts = [
        host for container, host in _mounts(postgres).items() if container.startswith("/docker-entrypoint-initdb.d/")
    ]
    assert scripts, "the postgres service runs no init script"
    sql = "\n".join(p.read_text() for p in scripts)
    roles = dict(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD '([^']*)'", sql))
    assert re.search(rf"CREATE DATABASE {stack.PG_DATABASE} OWNER {stack.PG_OWNER}\b", sql), sql
    return roles


ROLES = _init_roles()


def test_the_postgres_init_script_creates_the_roles_the_migrations_expect() -> None:
    assert set(ROLES) >= {stack.PG_ROLE, stack.PG_OWNER}
    migrations = "\n".join(p.read_text() for p in (REPO / "pipeline" / "migrations").glob("*.sql"))
    granted = set(re.findall(r"\bTO (\w+)", migrations))
    assert granted <= set(ROLES), granted - set(ROLES)  # every role a migration grants to exists
    env = SERVICES["postgres"]["environment"]
    assert env["POSTGRES_USER"] not in ROLES  # the superuser is not one of the application's roles


def test_prometheus_scrapes_every_process_on_its_real_metrics_port_with_the_rules() -> None:
    prometheus = SERVICES["prometheus"]
    mounts = _mounts(prometheus)
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = mounts[config_arg.split("=", 1)[1]]
    config = yaml.safe_load(config_path.read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in SERVICES, target
                scraped[host] = (job["job_name"], static["labels"]["service"], int(port))
    expected = long_running()
    assert set(expected) == {"ingest", "windowing", "rating", "invoicing", "relay", "http", "usage"}
    for name, (runs, port) in expected.items():
        assert scraped.get(name) == ("pipeline", runs, port), (name, scraped.get(name))
    for rule_file in config["rule_files"]:
        assert mounts[rule_file] == (REPO / "deploy" / "prometheus" / "alerts.yml").resolve()
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert names >= {
        "PipelineProcessDown",
        "PipelineConsumerLagGrowing",
        "PipelineDeadLetterRateHigh",
        "PipelineOutboxBacklogGrowing",
        "PipelineInvoiceFinalizationStuck",
    }
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert set(re.findall(r"pipeline_\w+", rule["expr"])) <= exported_names(), rule["alert"]


def test_grafana_is_provisioned_with_the_dashboard_and_the_prometheus_datasource() -> None:
    grafana = SERVICES["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    source = next(d for d in datasources if d["type"] == "prometheus")
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port == 9090 and "9090:9090" in SERVICES["prometheus"]["ports"]
    providers = yaml.safe_load((provisioning / "dashboards" / "pipeline.yml").read_text())["providers"]
    folder = mounts[providers[0]["options"]["path"]]
    dashboards = list(folder.glob("*.json"))
    assert dashboards == [(REPO / "deploy" / "grafana" / "dashboards" / "pipeline.json").resolve()]
    dashboard = json.loads(dashboards[0].read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def exported_names() -> set[str]:
    """Every sample name the stages, relay and HTTP gateway can export (their metrics are registered when their
    modules are imported), plus Prometheus's own ``up``."""
    from prometheus_client import REGISTRY

    import pipeline.ingest.http
    import pipeline.invoicing.relay
    import pipeline.runtime.loop
    import pipeline.stages  # noqa: F401 - registers every processor's metrics

    names = {"up"}
    for family in REGISTRY.collect():
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def test_the_dashboard_uses_only_metrics_the_processes_export() -> None:
    from tests.integration.test_monitoring import dashboard_metrics

    used = dashboard_metrics()
    assert len(used) >= 20
    assert used <= exported_names(), sorted(used - exported_names())
    for needed in (
        "pipeline_consumer_lag_records",
        "pipeline_reading_to_ledger_seconds_bucket",
        "pipeline_dead_letters_total",
        "pipeline_refused_total",
        "pipeline_outbox_backlog",
        "pipeline_invoices",
        "pipeline_http_requests_total",
        "process_start_time_seconds",
        "up",
    ):
        assert needed in used, needed


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    """``promtool check rules`` and ``promtool test rules deploy/prometheus/alerts_test.yml``: each alert fires
    on its own series after its ``for:``, and not on look-alikes (Prometheus's own rule evaluation)."""
    import subprocess

    from pipeline.monitoring import prometheus

    tool = str(prometheus.promtool(Settings()))
    rules = REPO / "deploy" / "prometheus"
    check = subprocess.run([tool, "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True,
                          timeout=120)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", (rules / "alerts_test.yml").read_text()))
    defined = {r["alert"] for g in yaml.safe_load((rules / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert tested == defined  # every alert has its test
