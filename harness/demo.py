"""``make demo``: the whole pipeline on MovieLens-100k replayed as a live stream.

What it does, in order:

1. Finds a broker: ``$STREAMREC_BOOTSTRAP_SERVERS`` if set, else the local
   broker of ``make kafka-up`` if it runs on 127.0.0.1:9092, else it starts
   its own local broker on a free port and stops it at the end (also on
   Ctrl-C).  A broker it did not start is left running.
2. Creates every DESIGN.md topic under a per-run prefix (``demo-<run>-``,
   unless ``$STREAMREC_TOPIC_PREFIX`` is set), so runs never mix.
3. Starts the streams worker, the trainer and the scoring agent as separate
   processes, replays MovieLens-100k (items, impressions, clicks in event-time
   order) at ``--speed`` times event time, and sends recommendation requests
   for active users while it runs (see :mod:`harness.pipeline`).
4. Waits for the join to label everything and the trainer to publish a
   version covering it, stops every service (SIGTERM; also on Ctrl-C), and
   prints the report: events in, labels vs the batch reference, versions (and
   the guardrail's refusals by reason, the bytes written per version kind)
   and their prequential metrics over event time, hit rate@k of the trained
   versions against the popularity fallback on the same requests (the clicks
   that followed), freshness, the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import TopicPartition

from contract.errors import StreamrecError
from contract.settings import KafkaSettings, default_cache_dir, load
from contract.topics import ALL_TOPICS
from harness.live import reader
from infra.broker import (
    DEFAULT_PORT,
    LIBRDKAFKA_LOGGER,
    BrokerError,
    LocalBroker,
    kafka_dir,
    running_pid,
)

log = logging.getLogger(__name__)

DEMO_SPEED = 100_000.0
"""MovieLens-100k spans about 215 days of event time: at 100,000x the replay takes about 3 minutes."""
DEMO_SLATE_SIZE = 5
"""Items per impression in the demo (the replay's default is 10): halves the labeled stream."""
DEMO_JOIN_SETTINGS = {"idle_timeout_s": 3}
"""A short idle timeout, so the windows still open when the replay ends close soon after."""
DEMO_TRAINER_SETTINGS = {
    # 100,000 slates of DEMO_SLATE_SIZE give 500,000 labeled examples in ~3 minutes: on 2 CPU cores
    # shared with the broker, the join and the scorer, the trainer (frozen encoder: each item's text
    # vector is computed once) keeps up with steps of 4,096 examples, every negative included.
    "batch_size": 4096,
    "max_batch_wait_s": 2,
    # One torch thread: on the two cores the trainer shares with the broker, the join, the scorer and
    # the replay, a second thread's spinning OpenMP worker costs more than it computes. Measured on
    # 2026-12-02: click -> first version trained on it, p50 8.5 s and 9.1 s with 1 thread against
    # 18.8 s and 27.1 s with torch's default of 2 (two make demo runs each).
    "torch_threads": 1,
    "publish_every_s": 10,
    # Every version stays in the run's store, so the report can count the bytes of each kind
    # (versions are deltas by default: a full one every STREAMREC_TRAINER_FULL_EVERY).
    "keep_versions": 0,
}


@dataclass
class BrokerHandle:
    bootstrap: str
    owned: LocalBroker | None
    """The broker this run started (and must stop), or None when it was already there."""

    def describe(self) -> str:
        if self.owned is not None:
            return f"{self.bootstrap} (started for this run in {self.owned.startup_seconds:.1f} s)"
        return f"{self.bootstrap} (already running; left running)"


@contextlib.contextmanager
def broker_for_demo() -> Iterator[BrokerHandle]:
    """The broker to use, started here only when none is given or running."""
    if os.environ.get("STREAMREC_BOOTSTRAP_SERVERS"):
        yield BrokerHandle(os.environ["STREAMREC_BOOTSTRAP_SERVERS"], None)
        return
    if running_pid(kafka_dir() / f"run-{DEFAULT_PORT}") is not None:
        yield BrokerHandle(f"127.0.0.1:{DEFAULT_PORT}", None)
        return
    broker = LocalBroker(port=0)
    broker.start()
    try:
        yield BrokerHandle(broker.bootstrap, broker)
    finally:
        broker.close()


def topic_counts(settings: KafkaSettings, timeout: float = 10.0) -> dict[str, int]:
    """Records per DESIGN.md topic, from the broker's partition offsets (high − low watermark)."""
    consumer = reader(settings)
    try:
        counts: dict[str, int] = {}
        metadata = consumer.list_topics(timeout=timeout)
        for spec in ALL_TOPICS:
            name = spec.real_name(settings)
            parts = metadata.topics.get(name)
            total = 0
            for p in (parts.partitions if parts else {}):
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=timeout)
                total += high - low
            counts[spec.name] = total
        return counts
    finally:
        consumer.close()


def run(args: argparse.Namespace) -> int:
    # lazy: the pipeline imports torch and the services (seconds); --help and bad arguments answer at once
    from harness.pipeline import PipelineConfig, run_pipeline

    started = time.monotonic()
    with broker_for_demo() as broker:
        prefix = os.environ.get("STREAMREC_TOPIC_PREFIX") or f"demo-{time.strftime('%Y%m%d-%H%M%S')}-"
        settings = load(KafkaSettings, bootstrap_servers=broker.bootstrap, topic_prefix=prefix)
        out_dir = args.out or default_cache_dir() / "demo" / prefix.rstrip("-")
        print(f"broker: {broker.describe()}")
        print(f"topics: prefix {prefix!r}; logs, weights and the plot in {out_dir}")
        cfg = PipelineConfig(
            out_dir=out_dir,
            limit=args.limit,
            slate_size=args.slate_size,
            seed=args.seed,
            speed=args.speed,
            requests_per_s=args.requests_per_s,
            drain_timeout_s=args.drain_timeout,
            join=DEMO_JOIN_SETTINGS,
            trainer=DEMO_TRAINER_SETTINGS,
        )
        report = run_pipeline(settings, cfg)
        counts = topic_counts(settings)
        print()
        print(report.format())
        print("records per topic (read back from the broker):")
        for name, n in counts.items():
            print(f"  {settings.topic(name):<40} {n:>9,}")
    print(f"done in {time.monotonic() - started:.0f} s")
    # No version is a result, not a failure, when the guardrail refused every candidate (none beat
    # the popularity fallback); it is a failure when the trainer never got as far as a candidate.
    evaluated = bool(report.versions) or any(report.refusals.values())
    return 0 if report.labels_match_reference and evaluated else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.demo",
        description="Replay MovieLens-100k through a real Kafka broker and report what happened.",
    )
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N ratings (default: all)")
    parser.add_argument("--slate-size", type=int, default=DEMO_SLATE_SIZE,
                        help=f"items per impression (default {DEMO_SLATE_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replay's slates and requests")
    parser.add_argument(
        "--speed", type=float, default=DEMO_SPEED,
        help=f"event-time speed-up of the replay (default {DEMO_SPEED:g}: MovieLens' 7 months in ~3 minutes)",
    )
    parser.add_argument("--requests-per-s", type=float, default=20.0, help="recommendation requests sent per second")
    parser.add_argument("--drain-timeout", type=float, default=200.0,
                        help="after the replay, longest wait for labels and a version covering them (s)")
    parser.add_argument("--out", type=Path, default=None, help="where logs, weights and the plot go")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="of this process (the services log into their files under --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL)
    try:
        return run(args)
    except (StreamrecError, BrokerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped cleanly", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
