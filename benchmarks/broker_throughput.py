"""Broker throughput: produce and consume N impression records with the project's client settings.

    python benchmarks/broker_throughput.py [--n 200000] [--partitions 4] [--local]

Uses the broker at ``$STREAMREC_BOOTSTRAP_SERVERS`` or, with ``--local``, a
:class:`~infra.broker.LocalBroker` it starts (and removes) itself.  The
records go to a fresh topic ``bench-<uuid8>-impressions`` that is deleted at
the end.  Values are encoded before the produce clock starts and decoded
after the consume clock stops; the JSON codec's own rates are reported
separately (``encode_rps``, ``decode_rps``).  The last line printed is JSON::

    {"n": 200000, "produce_rps": ..., "consume_rps": ..., ...}

Other benchmarks import :func:`measure` (or :func:`produce_timed` /
:func:`consume_timed`) to reuse the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contract.errors import ConfigError
from contract.records import Impression
from contract.settings import KafkaSettings, load
from contract.topics import IMPRESSIONS
from infra.admin import AdminError, delete_topics, ensure_topics
from infra.broker import BrokerError, LocalBroker
from infra.kafka import KafkaProducer

log = logging.getLogger(__name__)

Message = tuple[bytes, bytes]


class BenchmarkError(RuntimeError):
    """Delivery failed or fewer records came back than were sent."""


def make_impressions(n: int, *, users: int = 10_000, items: int = 1_682, slate: int = 10, seed: int = 0) -> list[Impression]:
    """``n`` realistic impressions: MovieLens-sized catalog, slates of ``slate`` items, increasing ts."""
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    return [
        Impression(
            impression_id=f"imp-{i}",
            user_id=f"u{rng.randrange(users)}",
            items=[f"ml-{j}" for j in rng.sample(range(items), slate)],
            ts=t0 + i * 10,
            context={"device": rng.choice(("web", "ios", "android", "tv"))},
        )
        for i in range(n)
    ]


def encode(records: Sequence[Impression]) -> tuple[list[Message], float]:
    """Key and JSON value of each record, and the encode rate in records/s."""
    start = time.perf_counter()
    messages = [(r.kafka_key(), r.to_json()) for r in records]
    return messages, len(records) / max(time.perf_counter() - start, 1e-9)


def produce_timed(settings: KafkaSettings, topic: str, messages: Sequence[Message], *, timeout: float = 300.0) -> float:
    """Seconds to produce ``messages`` and have every one acknowledged (one flush at the end)."""
    producer = KafkaProducer.create(settings, "bench-producer", logger=logging.getLogger(f"{__name__}.librdkafka"))
    start = time.perf_counter()
    for i, (key, value) in enumerate(messages):
        producer.send(topic, value, key)  # a rejected record is kept for the barrier below
        if i % 1000 == 0:
            producer.poll(0)
    result = producer.barrier(timeout)
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise BenchmarkError(f"producing to {topic}: {result.describe()}")
    return elapsed


def consume_timed(settings: KafkaSettings, topic: str, n: int, *, timeout: float = 300.0) -> tuple[float, list[bytes]]:
    """Seconds to read ``n`` messages from the beginning of every partition, and their values."""
    consumer = Consumer(settings.confluent_config(**{
        "group.id": f"bench-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "logger": logging.getLogger(f"{__name__}.librdkafka"),
    }))  # fmt: skip
    values: list[bytes] = []
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        start = time.perf_counter()
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        deadline = time.monotonic() + timeout
        while len(values) < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is not None:
                    raise BenchmarkError(f"consuming {topic}: {msg.error()}")
                values.append(msg.value())
        elapsed = time.perf_counter() - start
    finally:
        consumer.close()
    if len(values) < n:
        raise BenchmarkError(f"read {len(values)} of {n} records from {topic} in {timeout:.0f} s")
    return elapsed, values


def measure(settings: KafkaSettings, n: int, *, partitions: int | None = None) -> dict[str, Any]:
    """Produce then consume ``n`` impressions on a fresh topic; return the figures (records/s, MB/s)."""
    bench = settings.model_copy(update={"topic_prefix": f"bench-{uuid.uuid4().hex[:8]}-"})
    topic = IMPRESSIONS.real_name(bench)
    ensure_topics(bench, [IMPRESSIONS], partitions=partitions)
    try:
        records = make_impressions(n)
        messages, encode_rps = encode(records)
        payload = sum(len(k) + len(v) for k, v in messages)
        produce_s = produce_timed(bench, topic, messages)
        consume_s, values = consume_timed(bench, topic, n)
        start = time.perf_counter()
        decoded = [Impression.from_json(v) for v in values]
        decode_rps = n / max(time.perf_counter() - start, 1e-9)
        if {r.impression_id for r in decoded} != {r.impression_id for r in records}:
            raise BenchmarkError("the records read back differ from the records sent")
    finally:
        _delete_topic(bench)
    mb = payload / 1e6
    return {
        "n": n,
        "partitions": partitions or settings.partitions,
        "payload_mb": round(mb, 2),
        "produce_s": round(produce_s, 3),
        "produce_rps": round(n / produce_s),
        "produce_mb_s": round(mb / produce_s, 1),
        "consume_s": round(consume_s, 3),
        "consume_rps": round(n / consume_s),
        "consume_mb_s": round(mb / consume_s, 1),
        "encode_rps": round(encode_rps),
        "decode_rps": round(decode_rps),
    }


def _delete_topic(settings: KafkaSettings) -> None:
    try:
        delete_topics(settings, [IMPRESSIONS])
    except AdminError as exc:  # cleanup must not hide the figures or the original error
        log.warning("could not delete benchmark topic %s: %s", IMPRESSIONS.real_name(settings), exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Produce/consume throughput of the Kafka broker.")
    parser.add_argument("--n", type=int, default=200_000, help="records (default 200,000)")
    parser.add_argument("--partitions", type=int, default=None, help="default: $STREAMREC_PARTITIONS (4)")
    parser.add_argument("--local", action="store_true", help="start a local jar broker instead of using "
                        "$STREAMREC_BOOTSTRAP_SERVERS")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(f"{__name__}.librdkafka").setLevel(logging.ERROR)
    if args.n < 1:
        parser.error("--n must be at least 1")
    broker: LocalBroker | None = None
    try:
        settings = load(KafkaSettings)
        extra: dict[str, Any] = {}
        if args.local:
            broker = LocalBroker(partitions=args.partitions or settings.partitions).start()
            settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap})
            extra["broker_start_s"] = round(broker.startup_seconds or 0.0, 2)
            print(f"local broker ready at {broker.bootstrap} in {broker.startup_seconds:.1f} s")
        print(f"broker {settings.bootstrap_servers}: {args.n:,} impression records")
        result = measure(settings, args.n, partitions=args.partitions)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, AdminError, BenchmarkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.close()
    result.update(extra)
    print(f"produce: {result['produce_rps']:>10,} records/s  ({result['produce_mb_s']} MB/s, {result['produce_s']} s)")
    print(f"consume: {result['consume_rps']:>10,} records/s  ({result['consume_mb_s']} MB/s, {result['consume_s']} s)")
    print(f"json:    encode {result['encode_rps']:,}/s, decode+validate {result['decode_rps']:,}/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
