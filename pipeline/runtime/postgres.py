"""PostgreSQL access: the only module that imports ``psycopg`` (and runs yoyo migrations).

Other modules receive a connection object from here and use its DB-API methods; SQL text lives
next to the domain it serves (``pipeline.refstore``, ``pipeline.invoicing.ledger``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
T = TypeVar("T")

Connection = psycopg.Connection
DatabaseError = psycopg.Error
IntegrityError = psycopg.errors.IntegrityError


CONNECT_TIMEOUT_S = 10  # libpq connect_timeout: a server that does not answer fails the attempt after this
# TCP keepalives: a peer that vanished without closing the connection (host down, network cut) is
# noticed after about idle + interval × count = 25 s instead of the kernel's two hours. A server that is
# frozen but whose host is up (SIGSTOP) still answers keepalives: only a statement timeout on the
# client's side (the stage watchdog) bounds that.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

_wait_listeners: list[Callable[[], None]] = []


def add_wait_listener(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a ``Reconnecting`` waits before retrying (the database is away):
    a process's watchdog counts that as progress, since every such wait is bounded by ``give_up_s``."""
    _wait_listeners.append(listener)


def remove_wait_listener(listener: Callable[[], None]) -> None:
    """Undo ``add_wait_listener`` (no error when it is not registered)."""
    if listener in _wait_listeners:
        _wait_listeners.remove(listener)


def connect(url: str, autocommit: bool = False, statement_timeout_s: float | None = None) -> psycopg.Connection:
    """Open a connection (at most ``CONNECT_TIMEOUT_S`` = 10 s to connect, TCP keepalives on).

    ``statement_timeout_s``: the session's server-side ``statement_timeout`` (none by default); a
    statement running longer is cancelled with ``psycopg.errors.QueryCanceled``.
    Raises ``psycopg.OperationalError`` when the server cannot be reached.
    """
    kwargs: dict[str, Any] = dict(_KEEPALIVES)
    if statement_timeout_s is not None:
        kwargs["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means the server went away (retry after reconnecting)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not is_conflict(exc)


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadlock or serialization failure: the transaction was rolled back by the
    server and may simply be run again."""
    return isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)


def jsonb(value: Any) -> Any:
    """Wrap a Python value for a ``jsonb`` parameter."""
    return Jsonb(value)


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Block until the database accepts connections; raises ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with connect(url) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"database at {url} not ready after {timeout_s}s: {exc}") from exc
            time.sleep(0.5)


class Reconnecting:
    """A long-lived connection that survives the server going away: ``run(work)`` executes
    ``work(conn)`` in a transaction; on a lost connection it closes it, waits (0.5 s doubling to
    5 s), reconnects and runs ``work`` again; a deadlock or serialization failure runs it again.
    ``work`` must be idempotent per attempt (a failed attempt is rolled back).

    Bounds (seconds): each connection attempt ``CONNECT_TIMEOUT_S`` (10); each statement
    ``statement_timeout_s`` (default: ``Settings.postgres_statement_timeout_s``, 60), a cancelled
    statement being retried like a lost connection; one ``run`` retries for at most
    ``give_up_s``. Raises the last error after ``give_up_s`` or on any other error."""

    def __init__(self, url: str, give_up_s: float = 300.0, statement_timeout_s: float | None = None) -> None:
        self.url = url
        self.give_up_s = give_up_s
        if statement_timeout_s is None:
            from pipeline.config import get_settings

            statement_timeout_s = get_settings().postgres_statement_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self._conn: psycopg.Connection | None = None

    def run(self, work: Callable[[psycopg.Connection], T]) -> T:
        deadline = time.monotonic() + self.give_up_s
        delay = 0.5
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.url, statement_timeout_s=self.statement_timeout_s)
                with self._conn.transaction():
                    return work(self._conn)
            except Exception as exc:
                if is_conflict(exc) and time.monotonic() <= deadline:
                    log.info("transaction conflict (%s); running it again", exc)
                    continue
                if not is_disconnect(exc) or time.monotonic() > deadline:
                    raise
                log.warning("database unavailable (%s); reconnecting in %.1fs", exc, delay)
                self.close()
                for listener in list(_wait_listeners):
                    listener()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        """Close the connection (a later ``run`` opens a new one)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def with_reconnect(url: str, work: Callable[[psycopg.Connection], T], give_up_s: float = 300.0) -> T:
    """Run ``work(conn)`` once in a transaction on a fresh connection, waiting out a lost server
    (see ``Reconnecting``)."""
    db = Reconnecting(url, give_up_s)
    try:
        return db.run(work)
    finally:
        db.close()


def migrate(url: str) -> list[str]:
    """Apply pending migrations from ``pipeline/migrations`` with yoyo; returns the ids applied."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(url.replace("postgresql://", "postgresql+psycopg://", 1))
    migrations = read_migrations(str(MIGRATIONS))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]
