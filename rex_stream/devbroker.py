"""Run a real single-node Apache Kafka 4.x broker locally, without Docker.

The broker jars come from Maven Central (``org.apache.kafka:kafka_2.13`` and its
runtime dependencies) and are cached on disk; the broker runs as a plain
``java -cp`` subprocess in combined broker+controller KRaft mode on 127.0.0.1.

Python API::

    from rex_stream.devbroker import LocalBroker, create_topics

    with LocalBroker() as broker:                 # temp data dir, free ports
        create_topics(broker.bootstrap, {"in": 3, "out": 3})
        ...

    broker = LocalBroker(port=9092, data_dir=Path("/tmp/kafka-data"))
    broker.start()
    broker.stop()      # SIGTERM (controlled shutdown), SIGKILL after a timeout
    broker.start()     # same data dir, same ports, no re-format
    broker.kill()      # SIGKILL, for crash tests

CLI::

    python -m rex_stream.devbroker fetch                  # only download the jars
    python -m rex_stream.devbroker start --port 9092 --data-dir DIR

Environment:

``REX_KAFKA_CACHE``
    Cache root for the jars (default ``~/.cache/rex_stream/kafka``); jars of
    version V live in ``<root>/<V>/libs``.
``REX_KAFKA_JAVA``
    The ``java`` executable to use (else ``$JAVA_HOME/bin/java``, else ``java``
    on ``PATH``). Kafka 4.x brokers need Java 17 or newer.
``REX_KAFKA_HEAP``
    Broker heap size (default ``512m``).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "PINNED",
    "BrokerStartError",
    "DevBrokerError",
    "JarFetchError",
    "JavaNotFoundError",
    "LocalBroker",
    "create_topics",
    "default_cache_root",
    "ensure_kafka_jars",
    "find_java",
    "free_port",
    "wait_for_broker",
]

log = logging.getLogger(__name__)

#: Newest Kafka 4.x whose broker starts under the Java 17 installed here.
PINNED = "4.4.0"
#: Pinned so that Maven 3.8's ancient default binding (2.8) is never used.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
#: Used only if the Kafka dependency tree carries no log4j2 jar of its own.
FALLBACK_LOG4J_VERSION = "2.25.5"
MIN_JAVA_MAJOR = 17
DEFAULT_HEAP = "512m"

_MARKER = ".rex-complete"
_STATE_FILE = "devbroker.json"
_LOG4J_GROUP = "org.apache.logging.log4j"


class DevBrokerError(RuntimeError):
    """Base class for errors of this module."""


class JavaNotFoundError(DevBrokerError):
    """No Java >= 17 runtime was found."""


class JarFetchError(DevBrokerError):
    """The Kafka jars could not be fetched (no Maven, no network, bad version)."""


class BrokerStartError(DevBrokerError):
    """The broker process failed to format, start or become ready in time."""


# --------------------------------------------------------------------------- java


def _java_major(java: str) -> int | None:
    try:
        proc = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if not m:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8.0_x" style
        major = int(m.group(2))
    return major


def find_java() -> str:
    """Return a ``java`` executable of version >= 17, or raise JavaNotFoundError."""
    candidates: list[str] = []
    if env := os.environ.get("REX_KAFKA_JAVA"):
        candidates.append(env)
    if home := os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(home) / "bin" / "java"))
    if on_path := shutil.which("java"):
        candidates.append(on_path)
    seen: list[str] = []
    for cand in candidates:
        if cand in seen:
            continue
        seen.append(cand)
        major = _java_major(cand)
        if major is not None and major >= MIN_JAVA_MAJOR:
            return cand
    if not seen:
        raise JavaNotFoundError(
            "no java executable found (set REX_KAFKA_JAVA or JAVA_HOME, or install "
            f"a Java {MIN_JAVA_MAJOR}+ runtime, e.g. apt-get install openjdk-17-jre-headless)"
        )
    raise JavaNotFoundError(
        f"Kafka 4.x needs Java {MIN_JAVA_MAJOR}+; none of {seen} qualifies "
        "(set REX_KAFKA_JAVA or JAVA_HOME)"
    )


# --------------------------------------------------------------------------- jars


def default_cache_root() -> Path:
    """``$REX_KAFKA_CACHE`` or ``~/.cache/rex_stream/kafka``."""
    env = os.environ.get("REX_KAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rex_stream" / "kafka"


def _pom(dependencies: list[tuple[str, str, str]]) -> str:
    deps = "\n".join(
        "    <dependency><groupId>{}</groupId><artifactId>{}</artifactId>"
        "<version>{}</version></dependency>".format(*d)
        for d in dependencies
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>rex.stream.local</groupId>\n"
        "  <artifactId>kafka-broker-libs</artifactId>\n"
        "  <version>0</version>\n"
        "  <packaging>pom</packaging>\n"
        "  <dependencies>\n"
        f"{deps}\n"
        "  </dependencies>\n"
        "</project>\n"
    )


def _mvn_copy(mvn: str, workdir: Path, deps: list[tuple[str, str, str]], out: Path,
              *, transitive: bool) -> None:
    (workdir / "pom.xml").write_text(_pom(deps), encoding="utf-8")
    cmd = [
        mvn, "-q", "-B", "-f", str(workdir / "pom.xml"),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={out}",
        f"-DexcludeTransitive={'false' if transitive else 'true'}",
    ]
    try:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                              timeout=1800, check=False)
    except subprocess.TimeoutExpired as exc:
        raise JarFetchError(f"maven timed out: {' '.join(cmd)}") from exc
    except OSError as exc:
        raise JarFetchError(f"cannot run maven ({mvn}): {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        raise JarFetchError(
            f"maven failed (exit {proc.returncode}) fetching "
            f"{', '.join(':'.join(d) for d in deps)}:\n" + "\n".join(tail)
        )


def _jar_version(libs: Path, artifact: str) -> str | None:
    pat = re.compile(re.escape(artifact) + r"-(\d[\w.\-]*)\.jar$")
    for jar in libs.glob(f"{artifact}-*.jar"):
        if m := pat.match(jar.name):
            return m.group(1)
    return None


def _is_complete(libs: Path, version: str) -> bool:
    marker = libs / _MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    jars = info.get("jars") or []
    return info.get("version") == version and bool(jars) and all(
        (libs / j).is_file() for j in jars
    )


def ensure_kafka_jars(version: str = PINNED, cache_dir: Path | None = None) -> Path:
    """Make sure the broker jars of Kafka ``version`` are cached; return the libs dir.

    ``cache_dir`` is the cache *root* (default :func:`default_cache_root`); the jars
    land in ``<root>/<version>/libs``. Idempotent and safe to call from several
    processes at once (file lock); a complete download is marked by a marker file,
    so later calls need neither Maven nor the network.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    vdir = root / version
    libs = vdir / "libs"
    if _is_complete(libs, version):
        return libs
    vdir.mkdir(parents=True, exist_ok=True)
    with open(vdir / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if _is_complete(libs, version):
            return libs
        mvn = os.environ.get("REX_KAFKA_MVN") or shutil.which("mvn")
        if not mvn:
            raise JarFetchError("Maven (mvn) not found on PATH; it is needed once to "
                                "download the Kafka jars (apt-get install maven)")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix="libs.tmp-", dir=vdir))
        try:
            with tempfile.TemporaryDirectory(prefix="rex-kafka-pom-") as work:
                workdir = Path(work)
                _mvn_copy(mvn, workdir, [("org.apache.kafka", "kafka_2.13", version)],
                          staging, transitive=True)
                # Kafka's POM has no SLF4J binding (the tarball adds it), and without
                # one the broker logs nothing. Pick the binding that matches the
                # slf4j-api it resolved, at the log4j2 version it resolved.
                log4j = (_jar_version(staging, "log4j-core")
                         or _jar_version(staging, "log4j-api")
                         or FALLBACK_LOG4J_VERSION)
                slf4j = _jar_version(staging, "slf4j-api") or "1.7"
                binding = "log4j-slf4j-impl" if slf4j.startswith("1.") else "log4j-slf4j2-impl"
                extra = [(_LOG4J_GROUP, a, log4j) for a in ("log4j-api", "log4j-core", binding)
                         if _jar_version(staging, a) is None]
                if extra:
                    _mvn_copy(mvn, workdir, extra, staging, transitive=False)
            jars = sorted(p.name for p in staging.glob("*.jar"))
            if f"kafka_2.13-{version}.jar" not in jars:
                raise JarFetchError(f"maven finished but kafka_2.13-{version}.jar is missing")
            (staging / _MARKER).write_text(
                json.dumps({"version": version, "jars": jars}, indent=1), encoding="utf-8")
            if libs.exists():
                shutil.rmtree(libs)
            os.replace(staging, libs)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched %d Kafka %s jars into %s in %.1fs", len(jars), version, libs,
                 time.monotonic() - started)
        return libs


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _random_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def _admin_conf(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        "logger": logging.getLogger(f"{__name__}.rdkafka"),
    }


def wait_for_broker(bootstrap: str, timeout: float = 60.0) -> None:
    """Block until ``AdminClient.list_topics()`` works and reports a broker."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    admin = AdminClient(_admin_conf(bootstrap))
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            md = admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            if md.brokers:
                return
        except KafkaException as exc:
            last = exc
        time.sleep(0.1)
    raise BrokerStartError(f"broker at {bootstrap} not ready after {timeout:.0f}s: {last}")


def create_topics(bootstrap: str, topics: Mapping[str, int], timeout: float = 30,
                  *, replication_factor: int = 1,
                  config: Mapping[str, str] | None = None) -> None:
    """Create ``{name: partitions}`` topics; existing topics are fine.

    Returns once every topic's partitions have a leader in the metadata, so
    producers and consumers can use them right away.
    """
    if not topics:
        return
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    deadline = time.monotonic() + timeout
    admin = AdminClient(_admin_conf(bootstrap))
    new = [
        NewTopic(name, num_partitions=int(parts), replication_factor=replication_factor,
                 config=dict(config or {}))
        for name, parts in topics.items()
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise DevBrokerError(f"creating topic {name!r} failed: {err}") from exc
    pending = dict(topics)
    while True:
        md = admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        for name in list(pending):
            t = md.topics.get(name)
            if t is not None and t.error is None and t.partitions and all(
                p.leader >= 0 and p.error is None for p in t.partitions.values()
            ):
                del pending[name]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise DevBrokerError(f"topics {sorted(pending)} not ready after {timeout}s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- broker

_LOG4J2_TEMPLATE = """\
# Generated by rex_stream.devbroker: full broker log in a file, WARN+ on the console.
status = warn
name = rex-devbroker
shutdownHook = disable

appender.console.type = Console
appender.console.name = CONSOLE
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [kafka %d{HH:mm:ss,SSS}] %p %m (%c)%n
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = warn

appender.server.type = RollingFile
appender.server.name = SERVER
appender.server.fileName = ${sys:kafka.logs.dir}/server.log
appender.server.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 50MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3

rootLogger.level = info
rootLogger.appenderRef.console.ref = CONSOLE
rootLogger.appenderRef.server.ref = SERVER

logger.request.name = kafka.request.logger
logger.request.level = warn
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = warn
"""


def _prop_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


# Strong references: a broker object dropped while running must still be killed at exit.
_live_brokers: set[LocalBroker] = set()


@atexit.register
def _kill_leftover_brokers() -> None:  # pragma: no cover - exit path
    for broker in list(_live_brokers):
        with contextlib.suppress(Exception):
            broker.kill()


class LocalBroker:
    """A single-node KRaft Kafka broker (broker+controller) on 127.0.0.1.

    ``data_dir`` holds everything: ``kraft/`` (``log.dirs``), ``logs/server.log``
    (broker log), ``logs/console.log`` (JVM stdout/stderr unless ``console`` is
    given), the generated ``server.properties`` and ``log4j2.properties``, and
    ``devbroker.json`` (cluster id and ports, so a restart on the same dir reuses
    them). Without ``data_dir`` a temporary dir is used and deleted on ``close()``
    / context-manager exit (not on ``stop()``, so restarts keep their data).
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | str | None = None,
        version: str = PINNED,
        *,
        controller_port: int | None = None,
        heap: str | None = None,
        cache_dir: Path | None = None,
        extra_properties: Mapping[str, str | int] | None = None,
        console: IO[str] | None = None,
    ) -> None:
        self.version = version
        self.host = "127.0.0.1"
        self._owns_data_dir = data_dir is None
        self.data_dir = (Path(tempfile.mkdtemp(prefix="rex-kafka-")) if data_dir is None
                         else Path(data_dir).expanduser().resolve())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        self.port: int = port or state.get("port") or free_port(self.host)
        # The controller endpoint is part of the formatted (dynamic) quorum: keep it.
        self.controller_port: int = (state.get("controller_port") or controller_port
                                     or free_port(self.host))
        self.heap = heap or os.environ.get("REX_KAFKA_HEAP") or DEFAULT_HEAP
        self.cache_dir = cache_dir
        self.extra_properties = dict(extra_properties or {})
        self._console = console
        self._console_file: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._lock = threading.Lock()

    # ---- paths & properties

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs`` (partition data and metadata log)."""
        return self.data_dir / "kraft"

    @property
    def logs_dir(self) -> Path:
        """Where the broker's own log files go."""
        return self.data_dir / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.data_dir / _STATE_FILE).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self, cluster_id: str) -> None:
        state = {"version": self.version, "cluster_id": cluster_id, "port": self.port,
                 "controller_port": self.controller_port}
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")

    def server_properties(self) -> dict[str, str]:
        ctrl = f"{self.host}:{self.controller_port}"
        props: dict[str, str | int] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.bootstrap.servers": ctrl,
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{ctrl}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{ctrl}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": 1,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # After a kill -9 the restarted broker cannot register until the old
            # registration's session expires (default 9 s): keep that short.
            "broker.heartbeat.interval.ms": 1000,
            "broker.session.timeout.ms": 5000,
            # 128 MiB by default: too much of a 512 MiB heap.
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
        }
        props.update(self.extra_properties)
        return {k: str(v) for k, v in props.items()}

    def _write_configs(self) -> tuple[Path, Path]:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        server = self.data_dir / "server.properties"
        server.write_text(
            "# Generated by rex_stream.devbroker; rewritten on every start.\n"
            + "".join(f"{k}={_prop_escape(v)}\n" for k, v in self.server_properties().items()),
            encoding="utf-8",
        )
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2_TEMPLATE, encoding="utf-8")
        return server, log4j

    def _java_cmd(self, java: str, libs: Path, log4j: Path, heap: str) -> list[str]:
        return [
            java, f"-Xmx{heap}", f"-Xms{heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp", str(libs / "*"),
        ]

    # ---- lifecycle

    def _format(self, java: str, libs: Path, server: Path, log4j: Path) -> None:
        if (self.log_dir / "meta.properties").exists():
            return
        cluster_id = self._read_state().get("cluster_id") or _random_cluster_id()
        # A short-lived tool: the C1 compiler alone starts it faster.
        cmd = self._java_cmd(java, libs, log4j, "256m") + ["-XX:TieredStopAtLevel=1"]
        cmd += [
            "kafka.tools.StorageTool", "format", "--standalone",
            "-t", cluster_id, "-c", str(server),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        if proc.returncode != 0:
            raise BrokerStartError(
                f"kafka storage format failed (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr)[-4000:]
            )
        self._write_state(cluster_id)

    def start(self, timeout: float = 90) -> LocalBroker:
        """Start (or restart) the broker and wait until it serves metadata."""
        with self._lock:
            if self.running:
                return self
            t0 = time.monotonic()
            java = find_java()
            libs = ensure_kafka_jars(self.version, self.cache_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            server, log4j = self._write_configs()
            for p in (self.port, self.controller_port):
                if _port_open(self.host, p, timeout=0.2):
                    raise BrokerStartError(f"port {self.host}:{p} is already in use")
            self._format(java, libs, server, log4j)
            self._write_state(self._read_state().get("cluster_id", ""))
            cmd = self._java_cmd(java, libs, log4j, self.heap) + ["kafka.Kafka", str(server)]
            if self._console is not None:
                out: IO[Any] | int = self._console
            else:
                self._console_file = open(self.logs_dir / "console.log", "ab")
                out = self._console_file
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,
            )
            _live_brokers.add(self)
            try:
                self._wait_ready(t0 + timeout)
            except BaseException:
                self._terminate(signal.SIGKILL, 10)
                raise
            self.start_seconds = time.monotonic() - t0
            log.info("kafka %s up at %s in %.1fs (pid %s, data %s)", self.version,
                     self.bootstrap, self.start_seconds, self.pid, self.data_dir)
            return self

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while not _port_open(self.host, self.port, timeout=0.2):
            self._check_alive()
            if time.monotonic() > deadline:
                raise BrokerStartError(self._failure("did not open its port in time"))
            time.sleep(0.1)
        try:
            wait_for_broker(self.bootstrap, timeout=max(1.0, deadline - time.monotonic()))
        except BrokerStartError as exc:
            self._check_alive()
            raise BrokerStartError(self._failure(str(exc))) from None

    def _check_alive(self) -> None:
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is not None:
            raise BrokerStartError(self._failure(f"exited with code {rc} during startup"))

    def _failure(self, what: str) -> str:
        tail = ""
        for f in (self.logs_dir / "console.log", self.server_log):
            with contextlib.suppress(OSError):
                lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
                tail += f"\n--- last lines of {f} ---\n" + "\n".join(lines[-30:])
        return f"kafka broker ({self.bootstrap}, data {self.data_dir}) {what}{tail}"

    def _terminate(self, sig: signal.Signals, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("kafka broker pid %s ignored %s for %.0fs; killing it",
                            proc.pid, sig.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # Reap anything else left in the process group (there should be nothing).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
        self._proc = None
        _live_brokers.discard(self)
        return proc.returncode

    def stop(self, timeout: float = 30) -> int | None:
        """Graceful stop: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        with self._lock:
            return self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """Crash the broker: SIGKILL, no controlled shutdown."""
        with self._lock:
            return self._terminate(signal.SIGKILL, 30)

    def close(self) -> None:
        """Stop the broker and delete the data dir if it was a temporary one."""
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def wait(self) -> int:
        """Wait for the broker process to exit on its own; return its exit code."""
        if self._proc is None:
            raise DevBrokerError("broker is not running")
        return self._proc.wait()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({self.bootstrap}, kafka {self.version}, {state}, {self.data_dir})"


# --------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    ev = threading.Event()
    handler = lambda signum, frame: ev.set()  # noqa: E731
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield ev
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _cmd_fetch(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    libs = ensure_kafka_jars(args.version, args.cache_dir)
    n = len(list(libs.glob("*.jar")))
    print(f"kafka {args.version}: {n} jars in {libs} ({time.monotonic() - t0:.1f}s)",
          file=sys.stderr)
    print(libs)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    broker = LocalBroker(
        port=args.port, data_dir=args.data_dir, version=args.version,
        controller_port=args.controller_port, heap=args.heap, cache_dir=args.cache_dir,
        console=sys.stderr,
    )
    with _stop_signals() as stop_requested:
        broker.start(timeout=args.timeout)
        print(f"kafka {broker.version} ready in {broker.start_seconds:.1f}s; data "
              f"{broker.data_dir}; log {broker.server_log}; Ctrl-C to stop", file=sys.stderr)
        print(broker.bootstrap, flush=True)
        rc = 0
        while not stop_requested.wait(1.0):
            if not broker.running:
                print(f"kafka broker exited unexpectedly; see {broker.server_log}",
                      file=sys.stderr)
                rc = 1
                break
        print("stopping kafka broker ...", file=sys.stderr)
        code = broker.stop()
        if rc == 0 and code not in (0, 143, -15, None):
            rc = 1
    if args.data_dir is None:
        broker.close()
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rex_stream.devbroker",
                                     description="Run a local single-node Kafka broker.")
    parser.add_argument("--version", default=PINNED, help=f"Kafka version (default {PINNED})")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="jar cache root (default $REX_KAFKA_CACHE or "
                             "~/.cache/rex_stream/kafka)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="only download the broker jars")
    p = sub.add_parser("start", help="run a broker in the foreground until SIGINT/SIGTERM")
    p.add_argument("--port", type=int, default=None, help="client port (default: free port)")
    p.add_argument("--controller-port", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="persistent data dir (default: temporary, deleted on exit)")
    p.add_argument("--heap", default=None, help=f"JVM heap (default {DEFAULT_HEAP})")
    p.add_argument("--timeout", type=float, default=90.0, help="startup timeout, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "fetch":
            return _cmd_fetch(args)
        return _cmd_start(args)
    except DevBrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
