"""The local stack without Docker: one Kafka broker (KRaft) and one PostgreSQL cluster on loopback.

``up`` assembles and starts both as plain processes under ``settings.stack_dir``; ``down`` stops
only what ``up`` started (recognised by its pid files); ``reset`` also deletes their data.
The broker's jars come from Maven Central through ``stack/pom.xml`` (fetched once per machine).

Layout of ``<stack_dir>``::

    kafka/libs/         broker jars (kept by reset)
    kafka/config/       server.properties, log4j2.properties (rewritten by every up)
    kafka/data/         log.dirs (KRaft metadata + topics)
    kafka/logs/         server.log (log4j), kafka.out (JVM stdout/stderr)
    kafka/kafka.pid     pid of the broker started by up
    pg/data/            the PostgreSQL cluster (postmaster.pid is its pid file)
    pg/log, pg/sock/    server log, Unix socket directory
    state/              local state stores of the stages (deleted by reset)
    prometheus/         the local Prometheus of ``up(monitoring=True)`` (``pipeline.monitoring.prometheus``)

Plain functions; the CLI wires them up as ``pipeline stack up|down|status|reset``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings, get_settings

POM = Path(__file__).resolve().parent.parent / "stack" / "pom.xml"
PG_ROLE = "pipeline"  # the application role the stages use
PG_OWNER = "pipeline_owner"  # owns the schema, runs the migrations
PG_DATABASE = "pipeline"
PG_SUPERUSER = "postgres"
KAFKA_START_TIMEOUT_S = 120.0
KAFKA_STOP_TIMEOUT_S = 60.0
PG_START_TIMEOUT_S = 60.0
_UNIX_SOCKET_PATH_MAX = 107  # sun_path limit on Linux, minus the terminating NUL


class StackError(Exception):
    """A local stack operation failed; the message says what and where to look."""


@dataclass(frozen=True, slots=True)
class _Paths:
    root: Path

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def libs(self) -> Path:
        return self.kafka / "libs"

    @property
    def kafka_config(self) -> Path:
        return self.kafka / "config"

    @property
    def kafka_data(self) -> Path:
        return self.kafka / "data"

    @property
    def kafka_logs(self) -> Path:
        return self.kafka / "logs"

    @property
    def kafka_pid(self) -> Path:
        return self.kafka / "kafka.pid"

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg / "data"

    @property
    def pg_sock(self) -> Path:
        return self.pg / "sock"

    @property
    def state(self) -> Path:
        return self.root / "state"


# --- public API ------------------------------------------------------------------------------


def up(settings: Settings | None = None, *, timeout_s: float = KAFKA_START_TIMEOUT_S, monitoring: bool = False) -> None:
    """Start the local Kafka broker and PostgreSQL cluster; a no-op for parts already running.

    The first call on a machine downloads the broker's jars with Maven (``stack/pom.xml``),
    formats the KRaft storage and runs ``initdb``. Returns once the broker answers an admin
    ``list_topics`` on ``127.0.0.1:<kafka_port>`` (waiting at most ``timeout_s`` seconds) and
    PostgreSQL accepts connections, with role and database ``pipeline`` present.

    With ``monitoring`` it also starts the local Prometheus (installing Debian's package if needed;
    ``pipeline.monitoring.prometheus``), scraping every process the CLI starts.

    Raises ``StackError`` when a tool is missing, a port is taken by a process this module did
    not start, or a service fails to start in time (the message carries the log's tail).
    """
    settings = settings or get_settings()
    paths = _paths(settings)
    with _lock(paths):
        _kafka_up(settings, paths, timeout_s)
        _pg_up(settings, paths)
        if monitoring:
            from pipeline.monitoring import prometheus

            try:
                prometheus.up(settings)
            except prometheus.PrometheusError as exc:
                raise StackError(str(exc)) from exc


def down(settings: Settings | None = None) -> None:
    """Stop the broker, the PostgreSQL cluster and the Prometheus started by ``up``; a no-op for stopped parts.

    Kafka gets SIGTERM and up to 60 s to shut down cleanly, then SIGKILL. PostgreSQL is stopped
    with ``pg_ctl stop -m fast``. Processes not started by ``up`` (no pid file of ours) are never
    touched. Raises ``StackError`` when ``pg_ctl stop`` fails.
    """
    settings = settings or get_settings()
    paths = _paths(settings)
    with _lock(paths):
        from pipeline.monitoring import prometheus

        prometheus.down(settings)
        _kafka_down(paths)
        _pg_down(settings, paths)


def status(settings: Settings | None = None) -> dict[str, str]:
    """One line per service, e.g. ``{"kafka": "running (pid 42) on 127.0.0.1:19092", ...}``.

    A stopped service reads ``"stopped"``, with a note when its port is held by a process that
    ``up`` did not start. Never raises for a stopped or half-installed stack.
    """
    settings = settings or get_settings()
    paths = _paths(settings)
    result: dict[str, str] = {}
    for name, pid, port in (
        ("kafka", _kafka_pid(paths), settings.kafka_port),
        ("postgres", _pg_pid(paths), settings.postgres_port),
    ):
        if pid is not None:
            result[name] = f"running (pid {pid}) on 127.0.0.1:{port}"
        elif _port_in_use(port):
            result[name] = f"stopped (port {port} is in use by a process not started by `pipeline stack`)"
        else:
            result[name] = "stopped"
    from pipeline.monitoring import prometheus

    result["prometheus"] = prometheus.status(settings)
    return result


def reset(settings: Settings | None = None) -> None:
    """Stop the stack (``down``) and delete its data: Kafka's log dirs, the PostgreSQL cluster and
    ``<stack_dir>/state`` (plus ``settings.state_dir`` when it lies inside ``stack_dir``).

    The downloaded jars are kept. Raises ``StackError`` when stopping fails.
    """
    settings = settings or get_settings()
    paths = _paths(settings)
    down(settings)
    with _lock(paths):
        targets = [paths.kafka_data, paths.pg, paths.state]
        state_dir = settings.state_dir.resolve()
        if state_dir.is_relative_to(paths.root) and state_dir != paths.root:
            targets.append(state_dir)
        for target in targets:
            shutil.rmtree(target, ignore_errors=True)


# --- Kafka -----------------------------------------------------------------------------------


def _kafka_up(settings: Settings, paths: _Paths, timeout_s: float) -> None:
    pid = _kafka_pid(paths)
    log_starts: dict[Path, int] = {}  # where this start's lines begin in the (appended) logs
    if pid is None:
        paths.kafka_pid.unlink(missing_ok=True)
        for port in (settings.kafka_port, settings.kafka_controller_port):
            if _port_in_use(port):
                raise StackError(
                    f"port 127.0.0.1:{port} is already in use by a process not started by "
                    f"`pipeline stack` (no live pid in {paths.kafka_pid}); stop it or set "
                    "PIPELINE_KAFKA_PORT / PIPELINE_KAFKA_CONTROLLER_PORT"
                )
        _fetch_jars(paths)
        java = _java()
        server_properties = _write_kafka_config(settings, paths)
        _format_storage(java, paths, server_properties)
        log_starts = {log: _size(log) for log in _kafka_logs(paths)}
        pid = _start_broker(java, settings, paths, server_properties)
    _wait_for_broker(settings, paths, pid, timeout_s, log_starts)


def _fetch_jars(paths: _Paths) -> None:
    if not any(paths.libs.glob("*.jar")):
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("Maven (`mvn`) is not on PATH; it is needed once to fetch the broker's jars")
        if not POM.is_file():
            raise StackError(f"{POM} is missing")
        staging = paths.kafka / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        _run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            what="fetching the Kafka jars with Maven",
        )
        shutil.rmtree(paths.libs, ignore_errors=True)
        staging.rename(paths.libs)  # only a complete download becomes libs/
    _check_jars(paths.libs)


def _check_jars(libs: Path) -> None:
    names = sorted(p.name for p in libs.glob("*.jar"))
    problems = []
    if not any(n.startswith("kafka_2.13-") for n in names):
        problems.append("no kafka_2.13 jar")
    if not any(n.startswith("log4j-slf4j-impl-") for n in names):
        problems.append("no log4j-slf4j-impl jar (the broker would log nothing)")
    if sum(n.startswith("slf4j-api-") for n in names) != 1:
        problems.append("not exactly one slf4j-api jar")
    jackson = {n.rsplit("-", 1)[1] for n in names if n.startswith("jackson-")}
    if len(jackson) > 1:
        problems.append(f"several Jackson versions {sorted(jackson)}")
    if problems:
        raise StackError(f"{libs} looks broken ({'; '.join(problems)}); delete it and run `up` again")


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise StackError("no Java runtime found (JAVA_HOME or `java` on PATH); the broker needs Java 17+")
    return java


def _write_kafka_config(settings: Settings, paths: _Paths) -> Path:
    for folder in (paths.kafka_config, paths.kafka_data, paths.kafka_logs):
        folder.mkdir(parents=True, exist_ok=True)
    client = f"127.0.0.1:{settings.kafka_port}"
    controller = f"127.0.0.1:{settings.kafka_controller_port}"
    server_properties = paths.kafka_config / "server.properties"
    server_properties.write_text(
        f"""# written by `pipeline stack up`; edits are overwritten
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={controller}
listeners=PLAINTEXT://{client},CONTROLLER://{controller}
advertised.listeners=PLAINTEXT://{client},CONTROLLER://{controller}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={paths.kafka_data}
auto.create.topics.enable=false
# one broker: every internal topic with replication factor 1 (else transactions never work)
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
# faster first transactional producer / consumer group on one broker
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
# small machine
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
num.replica.fetchers=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
"""
    )
    (paths.kafka_config / "log4j2.properties").write_text(
        f"""# written by `pipeline stack up`; edits are overwritten
status = warn
name = pipeline-local-kafka
# keep logging while the broker's own shutdown hook runs (SIGTERM), instead of losing its tail
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {paths.kafka_logs / "server.log"}
appender.file.filePattern = {paths.kafka_logs / "server.log.%i"}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""
    )
    return server_properties


def _format_storage(java: str, paths: _Paths, server_properties: Path) -> None:
    if (paths.kafka_data / "meta.properties").exists():
        return
    classpath = ["-cp", f"{paths.libs}/*", "kafka.tools.StorageTool"]
    log4j = f"-Dlog4j2.configurationFile={paths.kafka_config / 'log4j2.properties'}"
    cluster_id = _run([java, log4j, *classpath, "random-uuid"], what="generating a cluster id").strip()
    _run(
        [
            java,
            log4j,
            *classpath,
            "format",
            "--standalone",
            "-t",
            cluster_id,
            "-c",
            str(server_properties),
            "--ignore-formatted",
        ],
        what="formatting the KRaft storage",
    )


def _start_broker(java: str, settings: Settings, paths: _Paths, server_properties: Path) -> int:
    command = [
        java,
        *shlex.split(settings.kafka_heap),
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={paths.kafka_config / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={paths.kafka_logs}",
        "-cp",
        f"{paths.libs}/*",
        "kafka.Kafka",
        str(server_properties),
    ]
    with open(paths.kafka_logs / "kafka.out", "ab") as out:
        process = subprocess.Popen(
            command,
            cwd=paths.kafka,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[process.pid] = process  # keep the handle so the child is reaped, not left a zombie
    _write_atomically(paths.kafka_pid, f"{process.pid}\n")
    return process.pid


def _wait_for_broker(
    settings: Settings, paths: _Paths, pid: int, timeout_s: float, log_starts: dict[Path, int]
) -> None:
    from pipeline.runtime.kafka import broker_answers  # imported late: `status` needs no librdkafka

    deadline = time.monotonic() + timeout_s
    last_error = "the client port never opened"
    while time.monotonic() < deadline:
        if not _alive(pid, b"kafka.Kafka"):
            paths.kafka_pid.unlink(missing_ok=True)
            raise StackError(
                f"the Kafka broker (pid {pid}) exited during start-up\n{_kafka_log_tail(paths, log_starts)}"
            )
        if _port_open(settings.kafka_port):
            if broker_answers(f"127.0.0.1:{settings.kafka_port}", timeout_s=5):
                return
            last_error = "the broker does not answer metadata requests yet"
        time.sleep(0.25)
    raise StackError(
        f"the Kafka broker (pid {pid}) was not ready on 127.0.0.1:{settings.kafka_port} after "
        f"{timeout_s:.0f} s ({last_error}); it is left running, `pipeline stack down` stops it\n"
        f"{_kafka_log_tail(paths, log_starts)}"
    )


def _kafka_down(paths: _Paths, sig: int = signal.SIGTERM) -> None:
    pid = _kafka_pid(paths)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a paused broker (pause_kafka) would never handle SIGTERM
            os.kill(pid, sig)
        if not _wait_exit(pid, KAFKA_STOP_TIMEOUT_S):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 10.0)
    paths.kafka_pid.unlink(missing_ok=True)


def _kafka_pid(paths: _Paths) -> int | None:
    pid = _read_pid(paths.kafka_pid)
    return pid if pid is not None and _alive(pid, b"kafka.Kafka") else None


def _kafka_logs(paths: _Paths) -> tuple[Path, Path]:
    return paths.kafka_logs / "kafka.out", paths.kafka_logs / "server.log"


def _kafka_log_tail(paths: _Paths, log_starts: dict[Path, int]) -> str:
    parts = []
    for log in _kafka_logs(paths):
        if log.is_file():
            parts.append(f"--- last lines of {log} ---\n{_tail(log, start=log_starts.get(log, 0))}")
    return "\n".join(parts) or f"(no logs in {paths.kafka_logs})"


# --- PostgreSQL ------------------------------------------------------------------------------


def _pg_up(settings: Settings, paths: _Paths) -> None:
    if _pg_pid(paths) is None:
        if _port_in_use(settings.postgres_port):
            raise StackError(
                f"port 127.0.0.1:{settings.postgres_port} is already in use by a process not started by "
                f"`pipeline stack` (no live postmaster.pid in {paths.pg_data}); stop it or set "
                "PIPELINE_POSTGRES_PORT"
            )
        _pg_prepare(settings, paths)
        socket_dir = str(paths.pg_sock)
        if len(f"{socket_dir}/.s.PGSQL.{settings.postgres_port}") > _UNIX_SOCKET_PATH_MAX:
            socket_dir = ""  # path too long for a Unix socket: serve TCP only
        options = (
            f"-p {settings.postgres_port} -c listen_addresses=127.0.0.1 "
            f"-k {shlex.quote(socket_dir) if socket_dir else chr(39) * 2}"
        )
        _run_pg(
            settings,
            paths,
            [
                "pg_ctl",
                "-D",
                str(paths.pg_data),
                "-l",
                str(paths.pg / "log"),
                "-w",
                "-t",
                str(int(PG_START_TIMEOUT_S)),
                "start",
                "-o",
                options,
            ],
            what="starting PostgreSQL",
        )
    _pg_bootstrap(settings, paths)


def _pg_prepare(settings: Settings, paths: _Paths) -> None:
    paths.pg_sock.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for item in (paths.pg, *paths.pg.rglob("*")):  # the whole pg folder belongs to the server's user
            if item.owner() != PG_SUPERUSER:
                shutil.chown(item, PG_SUPERUSER, PG_SUPERUSER)
        check = subprocess.run(
            ["runuser", "-u", PG_SUPERUSER, "--", "test", "-w", str(paths.pg), "-a", "-x", str(paths.pg)],
            cwd="/",
            check=False,
        )
        if check.returncode != 0:
            blocked = next((p for p in reversed(paths.pg.parents) if not os.stat(p).st_mode & 0o001), paths.pg)
            raise StackError(
                f"the `{PG_SUPERUSER}` user cannot reach {paths.pg} (PostgreSQL refuses to run as "
                f"root): {blocked} is not traversable by others; `chmod o+x {blocked}` or set "
                "PIPELINE_STACK_DIR to a reachable folder"
            )
    if not (paths.pg_data / "PG_VERSION").exists():
        shutil.rmtree(paths.pg_data, ignore_errors=True)  # a half-done initdb of ours
        _run_pg(
            settings,
            paths,
            [
                "initdb",
                "-D",
                str(paths.pg_data),
                "-U",
                PG_SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            what="initialising the PostgreSQL cluster (initdb)",
        )


def _pg_bootstrap(settings: Settings, paths: _Paths) -> None:
    from pipeline.runtime import postgres  # imported late: `status` needs no driver

    url = f"postgresql://{PG_SUPERUSER}@127.0.0.1:{settings.postgres_port}/postgres"
    deadline = time.monotonic() + PG_START_TIMEOUT_S
    while True:
        try:
            conn = postgres.connect(url, autocommit=True)
            break
        except postgres.DatabaseError as exc:
            if time.monotonic() > deadline:
                raise StackError(
                    f"PostgreSQL does not answer on 127.0.0.1:{settings.postgres_port}: {exc}\n"
                    f"--- last lines of {paths.pg / 'log'} ---\n{_tail(paths.pg / 'log')}"
                ) from exc
            time.sleep(0.25)
    with conn:
        for role in (PG_ROLE, PG_OWNER):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'ALTER ROLE "{PG_OWNER}" CREATEDB')  # `pipeline replay` gives each generation a database
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{PG_DATABASE}" OWNER "{PG_OWNER}"')


def _pg_down(settings: Settings, paths: _Paths) -> None:
    if _pg_pid(paths) is not None:
        _run_pg(
            settings,
            paths,
            ["pg_ctl", "-D", str(paths.pg_data), "-m", "fast", "-w", "-t", "60", "stop"],
            what="stopping PostgreSQL",
        )


def _pg_pid(paths: _Paths) -> int | None:
    pid = _read_pid(paths.pg_data / "postmaster.pid")
    return pid if pid is not None and _alive(pid, b"postgres") else None


def _run_pg(settings: Settings, paths: _Paths, command: list[str], *, what: str) -> str:
    tool = str(settings.postgres_bin / command[0])
    if not os.access(tool, os.X_OK):
        raise StackError(f"{tool} not found; set PIPELINE_POSTGRES_BIN to the PostgreSQL server binaries")
    command = [tool, *command[1:]]
    if os.geteuid() == 0:  # the server refuses to run as root
        command = ["runuser", "-u", PG_SUPERUSER, "--", *command]
    return _run(command, what=what, cwd=paths.pg)


# --- helpers ---------------------------------------------------------------------------------

_children: dict[int, subprocess.Popen[bytes]] = {}


def _paths(settings: Settings) -> _Paths:
    return _Paths(settings.stack_dir.resolve())


@contextlib.contextmanager
def _lock(paths: _Paths) -> Iterator[None]:
    """Serialise up/down/reset of one stack dir across processes."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: Sequence[str], *, what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            list(command), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise StackError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise StackError(f"{what} failed (exit {done.returncode}): {shlex.join(command)}\n{output}")
    return done.stdout


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, marker: bytes) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line contains ``marker``."""
    child = _children.get(pid)
    if child is not None:
        # our own child: trust its handle (its /proc cmdline may still be Python's between fork and exec)
        if child.poll() is not None:
            del _children[pid]
            return False
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        # a JVM whose launcher thread (the thread-group leader) has exited shows as a zombie while its other
        # threads still shut the broker down and hold its ports: alive until every thread is gone
        return any(_task_state(task) not in ("Z", "X", "") for task in Path(f"/proc/{pid}/task").glob("*"))
    return marker in cmdline


def _task_state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid, b""):
            return True
        time.sleep(0.1)
    return False


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _port_in_use(port: int) -> bool:
    """Whether something listens on ``port`` (on loopback or on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return _port_open(port)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, lines: int = 40, *, start: int = 0) -> str:
    """The last ``lines`` lines of ``path`` written after byte offset ``start``."""
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            handle.seek(max(start, end - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(unreadable)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def stop_postgres(settings: Settings | None = None) -> None:
    """Stop only the local PostgreSQL of the stack (operators and failure tests; ``up`` restarts it)."""
    settings = settings or get_settings()
    _pg_down(settings, _paths(settings))


def start_postgres(settings: Settings | None = None) -> None:
    """Start only the local PostgreSQL of the stack again (idempotent)."""
    settings = settings or get_settings()
    _pg_up(settings, _paths(settings))


# --- faults: broker and database restarts and pauses (failure tests, soak scripts; issue 12) -------


def kafka_pid(settings: Settings | None = None) -> int | None:
    """The pid of the local broker started by ``up``, or ``None`` when it is not running."""
    settings = settings or get_settings()
    return _kafka_pid(_paths(settings))


def stop_kafka(settings: Settings | None = None, sig: int = signal.SIGTERM) -> None:
    """Stop only the local broker with signal ``sig`` and wait until the process is gone.

    ``SIGTERM`` is a clean shutdown (up to 60 s, then SIGKILL, as ``down``); ``SIGKILL`` a crash: the
    broker recovers its logs on the next start. A paused broker is resumed first. A no-op when the
    broker is not running. ``start_kafka`` (or ``up``) starts it again.
    """
    settings = settings or get_settings()
    paths = _paths(settings)
    with _lock(paths):
        _kafka_down(paths, sig)


def start_kafka(settings: Settings | None = None, *, timeout_s: float = KAFKA_START_TIMEOUT_S) -> None:
    """Start only the local broker again (a no-op when it runs) and return once it answers a
    metadata request. Raises ``StackError`` when it is not ready within ``timeout_s`` seconds."""
    settings = settings or get_settings()
    paths = _paths(settings)
    with _lock(paths):
        _kafka_up(settings, paths, timeout_s)


def restart_kafka(
    settings: Settings | None = None,
    sig: int = signal.SIGTERM,
    *,
    down_s: float = 0.0,
    timeout_s: float = KAFKA_START_TIMEOUT_S,
) -> float:
    """Stop the local broker with ``sig`` (``SIGTERM`` clean, ``SIGKILL`` crash), keep it down for
    ``down_s`` more seconds, start it again and wait until it answers (at most ``timeout_s`` s).

    Returns ``time.monotonic()`` at the moment the broker answered again, so a caller can measure
    how long clients take to recover from then. Raises ``StackError`` when the broker does not come
    back in time.
    """
    settings = settings or get_settings()
    stop_kafka(settings, sig)
    if down_s > 0:
        time.sleep(down_s)
    start_kafka(settings, timeout_s=timeout_s)
    return time.monotonic()


@contextlib.contextmanager
def kafka_paused(settings: Settings | None = None) -> Iterator[int]:
    """Freeze the local broker (SIGSTOP) for the duration of the ``with`` block, then resume it
    (SIGCONT), also when the block raises. Open connections stay established but nothing answers:
    a hung broker or a long GC pause, as opposed to a restart. Yields the broker's pid.

    Raises ``StackError`` when the broker is not running.
    """
    settings = settings or get_settings()
    pid = kafka_pid(settings)
    if pid is None:
        raise StackError("the local Kafka broker is not running; nothing to pause")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def pause_kafka(settings: Settings | None = None, seconds: float = 15.0) -> float:
    """Freeze the local broker for ``seconds`` (SIGSTOP, then SIGCONT; see ``kafka_paused``).

    Returns ``time.monotonic()`` right after it was resumed. Raises ``StackError`` when the broker
    is not running.
    """
    with kafka_paused(settings):
        time.sleep(seconds)
    return time.monotonic()


def restart_postgres(settings: Settings | None = None, *, down_s: float = 0.0) -> float:
    """Stop the local PostgreSQL (``pg_ctl stop -m fast``: sessions are terminated), keep it down
    for ``down_s`` seconds, start it again; returns ``time.monotonic()`` once it accepts
    connections. Raises ``StackError`` when stopping or starting fails."""
    settings = settings or get_settings()
    stop_postgres(settings)
    if down_s > 0:
        time.sleep(down_s)
    start_postgres(settings)
    return time.monotonic()
