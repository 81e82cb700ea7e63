"""The command line of the local broker (``python -m infra.broker --help``)::

    fetch                 resolve the jars (idempotent)
    up [--port 9092]      start a detached broker, wait until it is ready
    down [--port P]       stop it with SIGTERM (controlled shutdown)
    status [--port P]     running (exit 0) or stopped (exit 3)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from infra.broker.errors import BrokerError
from infra.broker.jars import KAFKA_VERSION, fetch_jars
from infra.broker.local import DEFAULT_PORT, LIBRDKAFKA_LOGGER, LocalBroker, run_homes, running_pid
from infra.processes import terminate

STATUS_STOPPED = 3
"""Exit status of ``status`` when no broker runs."""


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
    for port, home in run_homes(args.cache_dir, args.port):
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
    homes = run_homes(args.cache_dir, args.port)
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
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default INFO")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (--log-level DEBUG)")
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
        level=logging.DEBUG if args.verbose else args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL)
    commands = {"fetch": _cmd_fetch, "up": _cmd_up, "down": _cmd_down, "status": _cmd_status}
    try:
        return commands[args.command](args)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
