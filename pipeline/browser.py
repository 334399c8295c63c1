"""Debian's ``chromium`` for the portal's headless browser test (issue 17): ``ensure_chromium()`` returns the
binary, installing the package with ``apt-get`` (as root, else ``sudo -n``) when it is missing, as
``pipeline.monitoring.prometheus.ensure_installed`` does for Prometheus. Never downloads a browser build of
its own (Playwright's ``install`` is not used); fails loudly when it cannot install."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path(os.environ.get("PIPELINE_CHROMIUM_BIN", "/usr/bin/chromium"))
HEADLESS_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
"""Chromium flags of the tests: headless, no sandbox (root in CI), no network of its own."""


class BrowserError(RuntimeError):
    """Chromium is missing and could not be installed; the message says what to do."""


def ensure_chromium(binary: Path = CHROMIUM, timeout_s: float = 1200) -> Path:
    """The Chromium binary (``PIPELINE_CHROMIUM_BIN``, default ``/usr/bin/chromium``), installing Debian's
    ``chromium`` package first when it is missing (``apt-get install -y --no-install-recommends chromium``;
    on failure ``apt-get update`` once and again). Each apt call has a deadline of ``timeout_s`` seconds.
    Raises ``BrowserError`` when there is no apt-get, no root (nor ``sudo -n``) or the install fails."""
    if os.access(binary, os.X_OK):
        return binary
    manual = "install Debian's package (`sudo apt-get install chromium`) or set PIPELINE_CHROMIUM_BIN"
    apt = shutil.which("apt-get")
    if apt is None:
        raise BrowserError(f"Chromium is not installed ({binary} missing) and there is no apt-get: {manual}")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True,
                                                 timeout=30).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        raise BrowserError(f"Chromium is not installed ({binary} missing) and installing it needs root: {manual}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "--no-install-recommends", "chromium"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:  # an empty or stale package list: update it once and try again
        subprocess.run([*prefix, apt, "update"], capture_output=True, text=True, env=env, timeout=timeout_s)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0 or not os.access(binary, os.X_OK):
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BrowserError(f"installing Chromium failed (exit {done.returncode}): {manual}\n{tail}")
    return binary
