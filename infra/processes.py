"""The pipeline's services as child processes, stopped cleanly whatever happens.

Each service (`python -m streams.worker`, `python -m trainer`, `python -m
serving`) runs in its own session with its log in a file. Leaving the
:class:`ServiceGroup` block, normally, on an exception or on Ctrl-C, sends
SIGTERM to every service (each checkpoints and exits), waits, and SIGKILLs
what is left after the timeout. On Linux a service also gets SIGTERM if the
parent dies without cleaning up (even by SIGKILL), so no orphans remain.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from contract.errors import StreamrecError
from infra.broker import log_tail, parent_death_signal, terminate

log = logging.getLogger(__name__)


class ServiceDiedError(StreamrecError):
    """A service exited while the pipeline still needed it."""


@dataclass
class Service:
    name: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, log_dir: Path, base_env: Mapping[str, str]) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        env = {**base_env, **self.env}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
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
        self, services: list[Service], *, log_dir: Path, env: Mapping[str, str], stop_timeout: float = 30.0
    ) -> None:
        self.services = services
        self.log_dir = log_dir
        self.env = dict(env)
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
