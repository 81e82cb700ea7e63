"""Child processes: the services' environment, their start and their clean stop, ports.

:func:`service_env` is the one place that says how a service (the join
worker, the trainer, the scoring agent) is configured from the outside: the
:class:`~contract.settings.KafkaSettings` of this process and the service's
own settings by field name, as the ``STREAMREC_*`` variables the service
reads at start-up.  The pipeline, the benchmarks and the tests spawn services
with it.

Each :class:`Service` (``python -m streams.worker``, ``python -m trainer``,
``python -m serving``) runs in its own session with its log in a file.
Leaving the :class:`ServiceGroup` block, normally, on an exception or on
Ctrl-C, sends SIGTERM to every service (each checkpoints and exits), waits,
and SIGKILLs what is left after the timeout.  On Linux a service also gets
SIGTERM if the parent dies without cleaning up (even by SIGKILL), so no
orphans remain.  The same helpers (:func:`terminate`,
:func:`parent_death_signal`, :func:`log_tail`) run the local Kafka broker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import SecretStr

from contract.errors import StreamrecError
from contract.settings import ENV_PREFIX, PROJECT_ROOT, KafkaSettings

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40

SERVICE_PREFIXES: dict[str, str] = {
    "join": f"{ENV_PREFIX}JOIN_",
    "trainer": f"{ENV_PREFIX}TRAINER_",
    "serving": f"{ENV_PREFIX}SERVING_",
}
"""The environment prefix of each service's settings (``streams.join_settings``, ``trainer.service_settings``,
``serving.settings``)."""
SERVICE_MODULES: dict[str, str] = {"join": "streams.worker", "trainer": "trainer", "serving": "serving"}
"""What ``python -m`` runs for each service."""
CHILD_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",  # the service's log file is current when we read its tail
    "HF_HUB_OFFLINE": "1",  # the encoder comes from the cache (make assets), never from the network
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ServiceDiedError(StreamrecError):
    """A service exited while the pipeline still needed it."""


# --- the environment of a service ----------------------------------------------------------


def env_value(value: Any) -> str:
    """A setting's value as its environment variable holds it (what pydantic-settings reads back)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path | int | float):
        return str(value)
    return json.dumps(value)  # lists and dicts: pydantic-settings parses complex values as JSON


def kafka_env(kafka: KafkaSettings) -> dict[str, str]:
    """Every Kafka setting of ``kafka`` that has a value, as ``STREAMREC_*`` variables."""
    values = {name: getattr(kafka, name) for name in type(kafka).model_fields}
    return {f"{ENV_PREFIX}{name.upper()}": env_value(v) for name, v in values.items() if v is not None}


def service_env(
    kafka: KafkaSettings,
    service: str,
    *,
    inherit: bool = True,
    base: Mapping[str, str] | None = None,
    **settings: Any,
) -> dict[str, str]:
    """The environment to spawn ``service`` (``join``, ``trainer`` or ``serving``) with.

    ``base`` (default: this process's environment) plus the Kafka settings of
    ``kafka``, the service's ``settings`` by field name (``batch_size=64`` →
    ``STREAMREC_TRAINER_BATCH_SIZE=64``) and :data:`CHILD_ENV`.  With
    ``inherit=False`` the service's own variables of ``base``
    (``STREAMREC_TRAINER_*`` for the trainer) are left out, so that only
    ``settings`` and the defaults apply.
    """
    try:
        prefix = SERVICE_PREFIXES[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICE_PREFIXES)}") from None
    env = dict(os.environ if base is None else base)
    if not inherit:
        env = {k: v for k, v in env.items() if not k.startswith(prefix)}
    env.update(kafka_env(kafka))
    env.update({f"{prefix}{name.upper()}": env_value(value) for name, value in settings.items() if value is not None})
    env.update(CHILD_ENV)
    return env


# --- processes -----------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
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


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` exits (it need not be our child); True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)
    try:
        while alive(pid):
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


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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
    elif wait_exit(pid, timeout):
        return True
    log.warning("pid %d did not stop %.0f s after SIGTERM; sending SIGKILL", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    else:
        wait_exit(pid, 10.0)
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
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
    the *thread* that started the child: start children from the main thread.
    """
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


# --- ports -----------------------------------------------------------------------------------


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


# --- services --------------------------------------------------------------------------------


@dataclass
class Service:
    """One service process: ``python -m <module> <args>`` with ``env`` (see :func:`service_env`)."""

    name: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @classmethod
    def of(cls, service: str, env: Mapping[str, str], *args: str, name: str | None = None) -> Service:
        """The ``join``, ``trainer`` or ``serving`` service, its module from :data:`SERVICE_MODULES`."""
        return cls(name or service, SERVICE_MODULES[service], env, tuple(args))

    def start(self, log_dir: Path, base_env: Mapping[str, str] | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        env = {**(base_env or {}), **self.env} if base_env or self.env else None
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=PROJECT_ROOT,  # the project is importable from there even without an install
                start_new_session=True,  # Ctrl-C reaches us, and we stop the services in order
                preexec_fn=parent_death_signal(),  # noqa: PLW1509 - only prctl between fork and exec
            )
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise :class:`ServiceDiedError` with the log tail if the service has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = log_tail(self.log_path) if self.log_path else ""
            raise ServiceDiedError(
                f"{self.name} exited with code {self.proc.returncode}; last lines of {self.log_path}:\n{tail}"
            )

    def stop(self, timeout: float) -> bool:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. True when it stopped on SIGTERM."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        clean = terminate(self.proc.pid, timeout, self.proc)
        log.info("%s %s", self.name, "stopped" if clean else "killed after the stop timeout")
        return clean

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ServiceGroup:
    """Start services in order; stop them in reverse order when the block ends."""

    def __init__(
        self,
        services: list[Service],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        self.services = services
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.stop_timeout = stop_timeout

    def __enter__(self) -> ServiceGroup:
        try:
            for s in self.services:
                s.start(self.log_dir, self.env)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __getitem__(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def check(self) -> None:
        for s in self.services:
            s.check()

    def stop(self) -> dict[str, bool]:
        # Ctrl-C during the stop must not leave a service behind: finish the stop first.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            started = time.monotonic()
            result = {s.name: s.stop(self.stop_timeout) for s in reversed(self.services)}
            log.info("services stopped in %.1f s", time.monotonic() - started)
            return result
        finally:
            signal.signal(signal.SIGINT, previous)
