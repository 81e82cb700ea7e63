"""A real single-node KRaft Apache Kafka 3.9.1 broker, launched with ``java`` alone.

The broker jars come from Maven Central (``mvn`` resolves ``kafka_2.13`` and a
logging backend with a pinned maven-dependency-plugin) into the git-ignored
cache, ``<cache>/kafka/3.9.1/libs``.  A :class:`LocalBroker` then formats a
data directory (once) and runs ``kafka.Kafka`` as one combined
broker+controller node on loopback::

    with LocalBroker() as broker:          # free ports, a temporary home
        print(broker.bootstrap)            # "127.0.0.1:40123"

Every broker has a *home* folder holding ``server.properties``,
``server.log``, ``broker.pid`` and ``data/``.  Starting again on the same
home keeps the data.  Without an explicit home, a broker on a fixed port
lives in ``<cache>/kafka/run-<port>`` and one on a free port (``port=0``) in
a fresh temporary folder under ``<cache>/kafka/tmp`` that :meth:`close`
removes.

The command line (``python -m infra.broker --help``)::

    fetch                 resolve the jars (idempotent)
    up [--port 9092]      start a detached broker, wait until it is ready
    down [--port P]       stop it with SIGTERM (controlled shutdown)
    status [--port P]     running (exit 0) or stopped (exit 3)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from contract.errors import StreamrecError
from contract.settings import default_cache_dir

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
MAVEN_ARTIFACTS: tuple[str, ...] = (
    f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}",
    # kafka_2.13 brings no logging backend; Kafka 3.x logs through slf4j + reload4j.
    "org.slf4j:slf4j-reload4j:1.7.36",
    "ch.qos.reload4j:reload4j:1.2.25",
)
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
LOG4J_CONFIG = Path(__file__).with_name("log4j.properties")
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
STATUS_STOPPED = 3
_MANIFEST = ".complete"
_LOG_TAIL_LINES = 40
_LOG_ROTATE_BYTES = 64 * 1024 * 1024


class BrokerError(StreamrecError):
    """The local broker could not be fetched, started or stopped."""


class ToolNotFoundError(BrokerError):
    """``java`` or ``mvn`` is not installed (or not on PATH)."""


class PortInUseError(BrokerError):
    """The requested port already has a listener on it."""


class BrokerStartError(BrokerError):
    """The broker process died or did not become ready in time; the message ends with its log."""


# --- jars ----------------------------------------------------------------------


def kafka_dir(cache_dir: Path | None = None) -> Path:
    """``<cache>/kafka``: jars, broker homes and temporary brokers."""
    return (cache_dir or default_cache_dir()) / "kafka"


def libs_dir(cache_dir: Path | None = None) -> Path:
    """The folder with every runtime jar of the broker."""
    return kafka_dir(cache_dir) / KAFKA_VERSION / "libs"


def jars_present(cache_dir: Path | None = None) -> bool:
    """True when a complete fetch left its manifest and every jar it lists."""
    libs = libs_dir(cache_dir)
    manifest = libs / _MANIFEST
    if not manifest.is_file():
        return False
    lines = manifest.read_text().splitlines()
    if not lines or lines[0] != _manifest_header():
        return False
    jars = [j for j in lines[1:] if j]
    return bool(jars) and all((libs / j).is_file() and (libs / j).stat().st_size > 0 for j in jars)


def _manifest_header() -> str:
    return "# " + " ".join(MAVEN_ARTIFACTS)


def _pom() -> str:
    deps = []
    for coord in MAVEN_ARTIFACTS:
        group, artifact, version = coord.split(":")
        deps.append(
            f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{version}</version></dependency>"
        )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>streamrec</groupId><artifactId>kafka-runtime</artifactId>"
        "<version>1</version><packaging>pom</packaging>\n"
        "  <dependencies>\n" + "\n".join(deps) + "\n  </dependencies>\n</project>\n"
    )


def find_tool(name: str, hint: str) -> str:
    """The path of ``java``/``mvn`` (``$JAVA_HOME/bin`` first for java) or ToolNotFoundError."""
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    path = shutil.which(name)
    if path is None:
        raise ToolNotFoundError(f"`{name}` was not found on PATH: {hint}")
    return path


def fetch_jars(cache_dir: Path | None = None) -> Path:
    """Resolve the broker's runtime jars with Maven into :func:`libs_dir` (once) and return it.

    Idempotent and safe to run concurrently: a file lock serialises fetches,
    the jars are copied into a temporary folder and renamed into place, and a
    manifest written last marks the folder complete.
    """
    libs = libs_dir(cache_dir)
    if jars_present(cache_dir):
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if jars_present(cache_dir):  # another process finished while we waited
            return libs
        mvn = find_tool("mvn", "install Maven 3.8+ (e.g. `apt-get install maven`) to fetch the Kafka jars")
        with tempfile.TemporaryDirectory(dir=libs.parent, prefix=".fetch-") as tmp:
            tmpdir = Path(tmp)
            (tmpdir / "pom.xml").write_text(_pom())
            out = tmpdir / "libs"
            cmd = [
                mvn, "-B", "-q", "--strict-checksums", "-f", str(tmpdir / "pom.xml"),
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime", f"-DoutputDirectory={out}",
            ]  # fmt: skip
            log.info("resolving Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
            started = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip()[-3000:]
                raise BrokerError(f"mvn could not resolve the Kafka jars (exit {proc.returncode}):\n{tail}")
            jars = sorted(p.name for p in out.glob("*.jar"))
            if not any(j.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
                raise BrokerError(f"mvn finished but kafka_2.13-{KAFKA_VERSION}.jar is missing in {out}")
            (out / _MANIFEST).write_text("\n".join([_manifest_header(), *jars]) + "\n")
            if libs.exists():  # an incomplete earlier attempt
                shutil.rmtree(libs)
            out.rename(libs)
        log.info("%d jars ready in %.1f s", len(jars), time.monotonic() - started)
    return libs


# --- ports and processes -----------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``host:port`` (a bind with SO_REUSEADDR fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free right now (chosen by the OS with bind to port 0)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def new_cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding (Kafka's Uuid format, never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # StorageTool would read it as an option
            return cid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child of a parent that does not reap stays as a zombie
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` exits (it need not be our child); True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)
    try:
        while _alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], min(left, 1.0))  # readable when the process exits
            else:
                time.sleep(min(left, 0.1))
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux SIGTERM the child when this process dies (even by SIGKILL).

    ``prctl`` is looked up here, in the parent, so that the child only makes
    one foreign call between fork and exec.  The signal follows the death of
    the *thread* that started the child: start brokers from the main thread.
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


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


# --- the broker ------------------------------------------------------------------------


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
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

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
                    "logger": logging.getLogger(f"{__name__}.librdkafka"),
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


def terminate(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM ``pid`` and wait; SIGKILL after ``timeout``.  True when it stopped on SIGTERM."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            pass
    elif _wait_exit(pid, timeout):
        return True
    log.warning("pid %d did not stop %.0f s after SIGTERM; sending SIGKILL", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    else:
        _wait_exit(pid, 10.0)
    return False


def running_pid(home: Path) -> int | None:
    """The pid in ``home/broker.pid`` if that process is alive and is the broker of this home."""
    try:
        pid = int((home / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    cmd = _cmdline(pid)
    if cmd and ("kafka.Kafka" not in cmd or str(home / "server.properties") not in cmd):
        return None  # the pid was reused by another process
    return pid


def _run_homes(cache_dir: Path | None, port: int | None) -> list[tuple[int, Path]]:
    root = kafka_dir(cache_dir)
    if port is not None:
        return [(port, root / f"run-{port}")]
    homes = []
    for d in sorted(root.glob("run-*")):
        suffix = d.name.removeprefix("run-")
        if d.is_dir() and suffix.isdigit():
            homes.append((int(suffix), d))
    return homes


# --- command line --------------------------------------------------------------------


def _cmd_fetch(args: argparse.Namespace) -> int:
    print(f"Kafka {KAFKA_VERSION} jars: {fetch_jars(args.cache_dir)}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    broker = LocalBroker(
        args.port, cache_dir=args.cache_dir, detached=True, startup_timeout=args.timeout,
        partitions=args.partitions,
    )  # fmt: skip
    pid = broker.pid
    if pid is not None:
        print(f"already running: {broker.bootstrap} (pid {pid}, home {broker.home})")
        return 0
    broker.start()
    print(f"Kafka {KAFKA_VERSION} ready at {broker.bootstrap} (pid {broker.pid}, log {broker.log_file})")
    print(f"broker start time: {broker.startup_seconds:.1f} s until ready")
    print(f"use it with: export STREAMREC_BOOTSTRAP_SERVERS={broker.bootstrap}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = 0
    for port, home in _run_homes(args.cache_dir, args.port):
        pid = running_pid(home)
        if pid is None:
            continue
        started = time.monotonic()
        clean = terminate(pid, args.timeout)
        with contextlib.suppress(FileNotFoundError):
            (home / "broker.pid").unlink()
        how = "stopped" if clean else "killed (did not stop on SIGTERM)"
        print(f"{how}: 127.0.0.1:{port} (pid {pid}) in {time.monotonic() - started:.1f} s")
        stopped += 1
    if not stopped:
        where = f"on port {args.port}" if args.port is not None else "from this cache"
        print(f"no local broker running {where}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    running = 0
    homes = _run_homes(args.cache_dir, args.port)
    for port, home in homes:
        pid = running_pid(home)
        if pid is not None:
            running += 1
            print(f"running: 127.0.0.1:{port} (pid {pid}, home {home})")
        elif home.exists() or args.port is not None:
            print(f"stopped: 127.0.0.1:{port}")
    if not homes:
        print("stopped: no local broker has been started from this cache")
    return 0 if running else STATUS_STOPPED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.broker",
        description=f"A local single-node KRaft Apache Kafka {KAFKA_VERSION} broker (java + Maven jars).",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $STREAMREC_CACHE_DIR or .cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="resolve the broker jars with Maven into the cache (idempotent)")
    up = sub.add_parser("up", help="start a detached broker (no-op when already running)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listener port (default {DEFAULT_PORT})")
    up.add_argument("--partitions", type=int, default=4, help="num.partitions of auto-created topics")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait until ready")
    down = sub.add_parser("down", help="stop the broker with SIGTERM and wait (keeps its data)")
    down.add_argument("--port", type=int, default=None, help="only this broker (default: all)")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds before SIGKILL")
    status = sub.add_parser("status", help="running (exit 0) or stopped (exit 3)")
    status.add_argument("--port", type=int, default=None, help="only this broker (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(f"{__name__}.librdkafka").setLevel(logging.CRITICAL)
    commands = {"fetch": _cmd_fetch, "up": _cmd_up, "down": _cmd_down, "status": _cmd_status}
    try:
        return commands[args.command](args)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
