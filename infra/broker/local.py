"""A real single-node KRaft Apache Kafka 3.9.1 broker, launched with ``java`` alone.

The broker runs from the jars of :mod:`infra.broker.jars`.  A
:class:`LocalBroker` formats a data directory (once) and runs ``kafka.Kafka``
as one combined broker+controller node on loopback::

    with LocalBroker() as broker:          # free ports, a temporary home
        print(broker.bootstrap)            # "127.0.0.1:40123"

Every broker has a *home* folder holding ``server.properties``,
``server.log``, ``broker.pid`` and ``data/``.  Starting again on the same
home keeps the data.  Without an explicit home, a broker on a fixed port
lives in ``<cache>/kafka/run-<port>`` and one on a free port (``port=0``) in
a fresh temporary folder under ``<cache>/kafka/tmp`` that :meth:`close`
removes.  :func:`running_pid` and :func:`run_homes` find the brokers of a
cache again (the command line of :mod:`infra.broker.cli` uses them).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from infra.broker.errors import BrokerError, BrokerStartError, PortInUseError
from infra.broker.jars import KAFKA_VERSION, fetch_jars, find_tool, kafka_dir
from infra.processes import (
    alive,
    cmdline,
    free_ports,
    log_tail,
    parent_death_signal,
    port_in_use,
    terminate,
)

log = logging.getLogger(__name__)

LIBRDKAFKA_LOGGER = "infra.broker.librdkafka"
"""The logger of the admin client that waits for the broker (the CLIs silence it)."""
LOG4J_CONFIG = Path(__file__).resolve().parents[1] / "log4j.properties"
JVM_OPTIONS: tuple[str, ...] = (
    "-Xms512m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
DEFAULT_PORT = 9092
_LOG_ROTATE_BYTES = 64 * 1024 * 1024


def new_cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding (Kafka's Uuid format, never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # StorageTool would read it as an option
            return cid


def _prune_stale_homes(tmp_root: Path, older_than: float = 3600.0) -> None:
    """Remove temporary broker homes left by killed processes (no live broker, untouched for an hour)."""
    now = time.time()
    for d in tmp_root.glob("broker-*"):
        try:
            if now - d.stat().st_mtime > older_than and running_pid(d) is None:
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed stale temporary broker home %s", d)
        except OSError:
            continue


class LocalBroker:
    """One combined broker+controller KRaft node on loopback, run from the cached jars.

    ``port=0`` picks a free port at the first :meth:`start`; later starts of the
    same object reuse the ports chosen then (so clients can reconnect).
    ``detached=True`` starts java in its own session so that it outlives this
    Python process (used by ``python -m infra.broker up``); otherwise java is
    asked to terminate when this process dies, so a killed test run does not
    leave a broker behind.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        controller_port: int = 0,
        home: Path | str | None = None,
        cache_dir: Path | None = None,
        host: str = "127.0.0.1",
        partitions: int = 4,
        detached: bool = False,
        startup_timeout: float = 120.0,
        stop_timeout: float = 60.0,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        if not 0 <= port < 65536 or not 0 <= controller_port < 65536:
            raise ValueError(f"ports must lie in 0..65535, got {port} and {controller_port}")
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.cache_dir = cache_dir
        self.partitions = partitions
        self.detached = detached
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.properties = dict(properties or {})
        self._temporary_home = home is None and port == 0
        if home is not None:
            self._home: Path | None = Path(home).resolve()
        elif port:
            self._home = kafka_dir(cache_dir) / f"run-{port}"
        else:
            self._home = None  # created at start()
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        """Seconds from launching java until the broker answered metadata requests."""
        self.last_stop_forced = False
        """True when the last :meth:`stop` had to SIGKILL the broker after ``stop_timeout``."""

    # --- paths ---------------------------------------------------------------------
    @property
    def home(self) -> Path:
        if self._home is None:
            tmp_root = kafka_dir(self.cache_dir) / "tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            _prune_stale_homes(tmp_root)
            self._home = Path(tempfile.mkdtemp(prefix="broker-", dir=tmp_root))
        return self._home

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients; known once the broker has been started (or a port given)."""
        if not self.port:
            raise BrokerError("the broker has no port yet: call start() first")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid of the running broker of this home, or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return running_pid(self.home) if self._home is not None else None

    def is_running(self) -> bool:
        return self.pid is not None

    # --- lifecycle -------------------------------------------------------------------------
    def server_properties(self) -> dict[str, str]:
        """The broker configuration (one combined KRaft node on loopback), ports resolved."""
        listener = f"PLAINTEXT://{self.host}:{self.port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"{listener},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": listener,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # 50 by default; fewer makes the first consumer group on a fresh broker ready sooner.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "group.initial.rebalance.delay.ms": "0",
            "num.recovery.threads.per.data.dir": "1",
            "auto.create.topics.enable": "true",
        }
        props.update(self.properties)
        return props

    def start(self) -> LocalBroker:
        """Format the data dir if new, start java and wait until the broker lists itself."""
        if self.is_running():
            raise BrokerError(f"a broker is already running from {self.home} (pid {self.pid})")
        java = find_tool("java", "install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)")
        for p in (self.port, self.controller_port):
            if p and port_in_use(p, self.host):
                raise PortInUseError(
                    f"port {p} on {self.host} is already in use: stop what listens there "
                    f"(`python -m infra.broker status`) or choose another port"
                )
        libs = fetch_jars(self.cache_dir)
        if not self.port or not self.controller_port:
            a, b = free_ports(2, self.host)
            self.port = self.port or a
            self.controller_port = self.controller_port or (b if b != self.port else a)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            "# written by infra/broker.py; rewritten at every start\n"
            + "".join(f"{k}={v}\n" for k, v in self.server_properties().items())
        )
        classpath = f"{libs}{os.sep}*"
        base = [java, *JVM_OPTIONS, f"-Dlog4j.configuration=file:{LOG4J_CONFIG}", "-cp", classpath]
        self._format(base)

        log.info("starting Kafka %s on %s (home %s)", KAFKA_VERSION, self.bootstrap, self.home)
        started = time.monotonic()
        if self.log_file.is_file() and self.log_file.stat().st_size > _LOG_ROTATE_BYTES:
            self.log_file.replace(self.log_file.with_suffix(".log.1"))
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(
                [*base, "kafka.Kafka", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=self.detached,
                preexec_fn=None if self.detached else parent_death_signal(),
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(started + self.startup_timeout)
        except BaseException:
            self._kill()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info("Kafka ready on %s in %.1f s (pid %d)", self.bootstrap, self.startup_seconds, self._proc.pid)
        return self

    def _format(self, base: list[str]) -> None:
        if (self.data_dir / "meta.properties").is_file():
            log.info("reusing formatted storage in %s", self.data_dir)
            return
        cmd = [*base, "kafka.tools.StorageTool", "format", "--ignore-formatted",
               "-t", new_cluster_id(), "-c", str(self.config_file)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise BrokerStartError(
                f"formatting {self.data_dir} failed (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr).strip()[-3000:]
            )
        log.info("formatted new storage in %s", self.data_dir)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        admin = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise BrokerStartError(
                    f"the Kafka broker (java) exited with code {rc} before it was ready; "
                    f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"the Kafka broker was not ready on {self.bootstrap} after "
                    f"{self.startup_timeout:.0f} s; last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if not _accepts(self.host, self.port):
                # Not listening yet: wait for the process (returns early if java dies).
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
                continue
            if admin is None:
                admin = AdminClient({
                    "bootstrap.servers": self.bootstrap,
                    "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
                })  # fmt: skip
            try:
                if admin.list_topics(timeout=1.0).brokers:
                    return
            except KafkaException as exc:
                log.debug("broker not ready yet: %s", exc)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (controlled shutdown), wait; SIGKILL only if it is still alive after ``timeout``."""
        timeout = self.stop_timeout if timeout is None else timeout
        pid = self.pid
        if pid is None:
            self._proc = None
            return
        log.info("stopping Kafka broker pid %d on %s", pid, self.bootstrap)
        started = time.monotonic()
        self.last_stop_forced = not terminate(pid, timeout, proc=self._proc)
        log.info("Kafka broker pid %d stopped in %.1f s", pid, time.monotonic() - started)
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def close(self) -> None:
        """Stop the broker; remove its home too when it was a temporary one."""
        try:
            self.stop()
        finally:
            if self._temporary_home and self._home is not None:
                shutil.rmtree(self._home, ignore_errors=True)
                self._home = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalBroker({self.host}:{self.port or '?'}, home={self._home}, pid={self.pid})"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def running_pid(home: Path) -> int | None:
    """The pid in ``home/broker.pid`` if that process is alive and is the broker of this home."""
    try:
        pid = int((home / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not alive(pid):
        return None
    cmd = cmdline(pid)
    if cmd and ("kafka.Kafka" not in cmd or str(home / "server.properties") not in cmd):
        return None  # the pid was reused by another process
    return pid


def run_homes(cache_dir: Path | None, port: int | None) -> list[tuple[int, Path]]:
    root = kafka_dir(cache_dir)
    if port is not None:
        return [(port, root / f"run-{port}")]
    homes = []
    for d in sorted(root.glob("run-*")):
        suffix = d.name.removeprefix("run-")
        if d.is_dir() and suffix.isdigit():
            homes.append((int(suffix), d))
    return homes
