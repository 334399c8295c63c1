"""The local Prometheus of ``pipeline stack up --with-monitoring``, and the scrape targets the CLI registers.

Prometheus runs as a plain child process on 127.0.0.1 (never the Debian package's service), with its own
configuration and data under ``<stack_dir>/prometheus/``::

    prometheus.yml      written by every start: scrape/evaluation interval, the repo's alert rules
                        (``deploy/prometheus/alerts.yml``, the file docker-compose mounts too), and one
                        job ``pipeline`` that discovers its targets from ``targets/*.json``
    targets/            one file per process started by the CLI (``pipeline run``, ``pipeline serve http``,
                        ``pipeline demo``): file-based service discovery, read again on every change
    data/, prometheus.log, prometheus.pid

The binary is ``PIPELINE_PROMETHEUS_BIN`` (default ``/usr/bin/prometheus``, Debian's ``prometheus``
package, 2.42); when it is missing, ``ensure_installed`` installs the package with ``apt-get`` (as root, or
through ``sudo -n``) or says exactly what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
JOB = "pipeline"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_children: dict[int, subprocess.Popen[bytes]] = {}


class PrometheusError(Exception):
    """Prometheus cannot be installed, started or asked; the message says what to do."""


def folder(settings: Settings) -> Path:
    """``<stack_dir>/prometheus``."""
    return settings.stack_dir.resolve() / "prometheus"


def targets_dir(settings: Settings) -> Path:
    """Where the CLI writes one file-based service discovery file per process it starts."""
    return folder(settings) / "targets"


def url(settings: Settings) -> str:
    """The base URL of the local Prometheus."""
    return f"http://127.0.0.1:{settings.prometheus_port}"


# --- targets (file-based service discovery) -----------------------------------------------------------


def register_target(settings: Settings, service: str, port: int, instance_id: str = "0") -> Path:
    """Announce a process's ``/metrics`` on ``port`` to Prometheus (labels ``service`` and
    ``pipeline_instance``); returns the file written (``unregister_target`` removes it)."""
    host = "127.0.0.1" if settings.metrics_addr in ("", "0.0.0.0", "::") else settings.metrics_addr
    path = targets_dir(settings) / f"{service}-{instance_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # Prometheus reads *.json only: it never sees half a file
    partial.write_text(
        json.dumps([{"targets": [f"{host}:{port}"], "labels": {"service": service, "pipeline_instance": instance_id}}])
    )
    partial.replace(path)
    return path


def unregister_target(path: Path) -> None:
    """Remove a target file (a process stopped on purpose is no longer expected up)."""
    path.unlink(missing_ok=True)


# --- installation ---------------------------------------------------------------------------------------


def ensure_installed(settings: Settings) -> Path:
    """The Prometheus binary, installing Debian's ``prometheus`` package first if it is missing (``apt-get``
    as root, else ``sudo -n apt-get``). Raises ``PrometheusError`` naming the command to run when it cannot."""
    binary = settings.prometheus_bin
    if os.access(binary, os.X_OK):
        return binary
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    apt = shutil.which("apt-get")
    manual = "install Debian's package (`sudo apt-get install prometheus`) or set PIPELINE_PROMETHEUS_BIN"
    if apt is None:
        raise PrometheusError(f"Prometheus is not installed ({binary} missing) and there is no apt-get: {manual}")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif (
        shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    ):
        prefix = ["sudo", "-n"]
    else:
        raise PrometheusError(f"Prometheus is not installed ({binary} missing) and installing it needs root: {manual}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "--no-install-recommends", "prometheus"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # an empty or stale package list: update it once and try again
        subprocess.run([*prefix, apt, "update"], capture_output=True, text=True, env=env, timeout=900)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not (os.access(binary, os.X_OK) or shutil.which("prometheus")):
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PrometheusError(f"installing Prometheus failed (exit {done.returncode}): {manual}\n{tail}")
    return binary if os.access(binary, os.X_OK) else Path(shutil.which("prometheus") or binary)


def promtool(settings: Settings) -> Path:
    """``promtool`` of the same installation (beside the server binary)."""
    tool = ensure_installed(settings).parent / "promtool"
    if not os.access(tool, os.X_OK):
        raise PrometheusError(f"{tool} is missing (it comes with the `prometheus` package)")
    return tool


# --- the server -----------------------------------------------------------------------------------------


def write_config(settings: Settings, rules: Path = RULES) -> Path:
    """Write ``prometheus.yml`` (JSON is YAML): interval ``prometheus_scrape_interval_s``, the rules file,
    the ``pipeline`` job over ``targets/*.json``. Returns its path."""
    interval = f"{max(1, round(settings.prometheus_scrape_interval_s * 1000))}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(rules.resolve())],
        "scrape_configs": [
            {
                "job_name": JOB,
                "file_sd_configs": [{"files": [str(targets_dir(settings) / "*.json")], "refresh_interval": "5s"}],
            }
        ],
    }
    path = folder(settings) / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    targets_dir(settings).mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by `pipeline stack up --with-monitoring`; edits are overwritten\n"
        + json.dumps(config, indent=1)
        + "\n"
    )
    return path


def pid(settings: Settings) -> int | None:
    """The pid of the Prometheus started by ``up``, or ``None`` when it is not running."""
    try:
        found = int((folder(settings) / "prometheus.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    child = _children.get(found)
    if child is not None:
        if child.poll() is None:
            return found
        del _children[found]
        return None
    try:
        cmdline = Path(f"/proc/{found}/cmdline").read_bytes()
        state = Path(f"/proc/{found}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return found if state not in ("Z", "X") and b"prometheus" in cmdline else None


def up(settings: Settings, rules: Path = RULES, timeout_s: float = START_TIMEOUT_S) -> str:
    """Start the local Prometheus unless it runs (installing it if needed) and wait until it answers
    ``/-/ready`` (at most ``timeout_s`` seconds). Returns its URL. Raises ``PrometheusError``."""
    base = url(settings)
    if pid(settings) is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", settings.prometheus_port)) == 0:
                raise PrometheusError(
                    f"port 127.0.0.1:{settings.prometheus_port} is in use by a process not started by "
                    "`pipeline stack` (the Debian prometheus service?); stop it or set "
                    "PIPELINE_PROMETHEUS_PORT"
                )
        binary = ensure_installed(settings)
        config = write_config(settings, rules)
        check = subprocess.run(
            [str(binary.parent / "promtool"), "check", "config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode != 0:
            raise PrometheusError(f"promtool rejects {config}:\n{check.stdout}{check.stderr}")
        home = folder(settings)
        with open(home / "prometheus.log", "ab") as log:
            process = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={home / 'data'}",
                    f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
                    "--web.enable-lifecycle",
                    "--storage.tsdb.retention.time=7d",
                    "--log.level=warn",
                ],
                cwd=home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _children[process.pid] = process
        (home / "prometheus.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout_s
    while True:
        running = pid(settings)
        if running is None:
            raise PrometheusError(
                f"Prometheus exited during start-up; see {folder(settings) / 'prometheus.log'}:\n"
                + _tail(folder(settings) / "prometheus.log")
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/-/ready", timeout=2) as answer:
            if answer.status == 200:
                return base
        if time.monotonic() > deadline:
            raise PrometheusError(
                f"Prometheus (pid {running}) not ready on {base} after {timeout_s:.0f} s; it is left "
                "running, `pipeline stack down` stops it"
            )
        time.sleep(0.25)


def down(settings: Settings) -> None:
    """Stop the Prometheus started by ``up`` (SIGTERM, SIGKILL after 30 s); a no-op when it is not running."""
    running = pid(settings)
    if running is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(running, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while pid(settings) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid(settings) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running, signal.SIGKILL)
            time.sleep(0.5)
    (folder(settings) / "prometheus.pid").unlink(missing_ok=True)


def status(settings: Settings) -> str:
    """``running (pid N) on http://127.0.0.1:PORT`` or ``stopped``."""
    running = pid(settings)
    return f"running (pid {running}) on {url(settings)}" if running is not None else "stopped"


def query(base: str, promql: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """An instant query through the HTTP API; returns ``data.result`` (vector samples: ``metric`` labels and
    ``value`` [time, "text"]). Raises ``PrometheusError`` when Prometheus does not answer within ``timeout_s``
    or refuses the query."""
    return _api(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout_s)["result"]


def alerts(base: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The alerts Prometheus holds (pending or firing), each with ``labels``, ``state`` and ``activeAt``."""
    return _api(f"{base}/api/v1/alerts", timeout_s)["alerts"]


def _api(address: str, timeout_s: float) -> Any:
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        raise PrometheusError(f"{address}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"{address}: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{address}: {body}")
    return body["data"]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
