"""``make demo``: MovieLens-100k replayed as a live stream through a real broker.

What it does, in order:

1. Finds a broker: ``$STREAMREC_BOOTSTRAP_SERVERS`` if set, else the local
   broker of ``make kafka-up`` if it runs on 127.0.0.1:9092, else it starts
   its own local broker on a free port and stops it at the end (also on
   Ctrl-C).  A broker it did not start is left running.
2. Creates every DESIGN.md topic under a per-run prefix (``demo-<run>-``,
   unless ``$STREAMREC_TOPIC_PREFIX`` is set), so runs never mix.
3. Replays MovieLens-100k (items, impressions, clicks in event-time order).
4. Prints the per-topic record counts, read back from the broker.

The join, trainer and scoring agent are separate issues; until they land this
demo covers the foundation only and says so in its output.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

from infra.admin import ensure_topics
from infra.broker import DEFAULT_PORT, BrokerError, LocalBroker, kafka_dir, running_pid
from streams.errors import StreamrecError
from streams.settings import KafkaSettings, load
from streams.topics import ALL_TOPICS

log = logging.getLogger(__name__)


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
    consumer = Consumer(settings.confluent_config(**{"group.id": f"demo-count-{uuid.uuid4().hex}"}))
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
    from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig
    from streams.replay.producer import produce

    started = time.monotonic()
    with broker_for_demo() as broker:
        prefix = os.environ.get("STREAMREC_TOPIC_PREFIX") or f"demo-{time.strftime('%Y%m%d-%H%M%S')}-"
        settings = load(KafkaSettings, bootstrap_servers=broker.bootstrap, topic_prefix=prefix)
        print(f"broker: {broker.describe()}")
        print(f"topics: prefix {prefix!r}")
        ensure_topics(settings)
        replay = MovieLensReplay.from_path(None, MovieLensReplayConfig(limit=args.limit, seed=args.seed))
        expected = replay.counts()
        result = produce(replay.stream(), settings, speed=args.speed, total=sum(expected.values()))
        print(f"replayed MovieLens-100k: {result.delivered:,} records at {result.rate:,.0f} records/s")
        counts = topic_counts(settings)
        print("\nrecords per topic (read back from the broker):")
        for name, n in counts.items():
            print(f"  {settings.topic(name):<40} {n:>9,}")
        missing = {k: v for k, v in expected.items() if counts.get(k) != v}
        if missing:
            print(f"error: the broker holds different counts than were produced: {missing}", file=sys.stderr)
            return 1
        print(
            "\nThis demo covers the foundation (broker, topics, replay). The join into `labeled`,\n"
            "the continual trainer and the scoring agent are not part of it yet."
        )
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.demo",
        description="Replay MovieLens-100k through a real Kafka broker and report what happened.",
    )
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N ratings")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replay's slates")
    parser.add_argument(
        "--speed", type=float, default=None,
        help="event-time speed-up (e.g. 1e6); default: as fast as possible",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("infra.broker.librdkafka").setLevel(logging.CRITICAL)
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
