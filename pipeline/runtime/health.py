"""The monitoring endpoints of every long-running process: ``/metrics``, ``/healthz`` and ``/readyz``.

One small threaded WSGI server (the standard library's ``wsgiref``, like prometheus_client's own
``start_http_server``) in front of prometheus_client's exposition app:

- ``/metrics``: the Prometheus text format of the process's default registry;
- ``/healthz`` (liveness): 200 ``ok`` while the process makes progress, 503 with the reason when its
  ``live`` check says otherwise (a stage whose watchdog saw no progress);
- ``/readyz`` (readiness): 200 ``ready`` once the process can do its work (a stage: it joined its
  group and every partition assigned to it is restored), 503 with the reason before.

The HTTP gateway (FastAPI) serves the same three paths itself (``pipeline.ingest.http``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

log = logging.getLogger(__name__)

Check = Callable[[], str | None]
"""A health check: ``None`` when fine, else a short reason (shown in the 503 body)."""


def _always_fine() -> str | None:
    return None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds: not worth a log line each."""


def health_app(live: Check = _always_fine, ready: Check = _always_fine) -> Callable[..., Iterable[bytes]]:
    """The WSGI application: ``/healthz`` and ``/readyz`` from the two checks, anything else is
    prometheus_client's exposition (``/metrics``)."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            check, word = (live, "ok") if path == "/healthz" else (ready, "ready")
            try:
                problem = check()
            except Exception as exc:  # a failing check is an unhealthy answer, never a crashed server
                problem = f"check failed: {exc}"
            status = "200 OK" if problem is None else "503 Service Unavailable"
            body = (word if problem is None else problem).encode() + b"\n"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    return app


class HealthServer:
    """Serves ``health_app`` on ``addr:port`` from a daemon thread.

    ``port`` 0 picks a free port (``self.port`` tells which). Raises ``OSError`` when the port is taken.
    """

    def __init__(
        self, port: int, addr: str = "127.0.0.1", live: Check = _always_fine, ready: Check = _always_fine
    ) -> None:
        self._server = make_server(addr, port, health_app(live, ready), _ThreadingServer, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-server", daemon=True)
        self._thread.start()
        log.info("monitoring endpoints on http://%s:%d (/metrics, /healthz, /readyz)", addr, self.port)

    def close(self) -> None:
        """Stop serving (returns within about half a second)."""
        self._server.shutdown()
        self._server.server_close()
