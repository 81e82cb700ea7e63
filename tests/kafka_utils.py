"""Produce and consume helpers for tests that talk to the real broker of ``kafka_bootstrap``.

Every helper stops on a record count or a timeout, never on a sleep::

    produce(kafka_settings, IMPRESSIONS, [impression])
    got = consume(kafka_settings, IMPRESSIONS, count=1, timeout=30)

Without ``group``, a consumer reads every partition from the beginning by
assignment (no group join, so no rebalance wait); with ``group`` it
subscribes as a member of that consumer group and commits what it read, so
a later call with the same group continues after it.  Records come in
partition order only: compare sets, or sort, across partitions.

``java_partition`` is the Java client's default partitioner (murmur2) in pure
Python, to check the co-partitioning promise of DESIGN.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contract.records import Record
from contract.settings import KafkaSettings
from contract.topics import TopicSpec
from infra.kafka import KafkaProducer

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

RawRecord = tuple[bytes | None, bytes | None, int, int]
"""(key, value, partition, offset) of one consumed message."""


class KafkaTestError(Exception):
    """A produce or consume helper failed (delivery error, missing topic, broker error)."""


# --- producing ---------------------------------------------------------------------------


def produce(settings: KafkaSettings, spec: TopicSpec, records: Iterable[Record], *, timeout: float = 30.0) -> int:
    """Send ``records`` to ``spec``'s topic (key = ``kafka_key()``, value = JSON); return how many.

    Uses the project's producer settings (murmur2 partitioner, idempotence).
    Raises :class:`KafkaTestError` if any delivery failed.
    """
    return produce_raw(
        settings,
        spec.real_name(settings),
        ((r.kafka_key(), r.to_json()) for r in records),
        timeout=timeout,
    )


def produce_raw(
    settings: KafkaSettings,
    topic_name: str,
    messages: Iterable[tuple[bytes | None, bytes | None]],
    *,
    timeout: float = 30.0,
) -> int:
    """Send ``(key, value)`` byte pairs as they are (a None value is a tombstone); return how many."""
    producer = KafkaProducer.create(settings, "test-producer", logger=_rdkafka_log)
    sent = 0
    for key, value in messages:
        producer.send(topic_name, value, key)  # a rejected record is kept for the barrier below
        sent += 1
        producer.poll(0)
    result = producer.barrier(timeout)
    if not result.ok:
        raise KafkaTestError(f"producing to {topic_name} failed: {result.describe()}")
    return sent


# --- consuming -----------------------------------------------------------------------------


def consume(
    settings: KafkaSettings,
    spec: TopicSpec,
    *,
    count: int,
    timeout: float = 30.0,
    group: str | None = None,
) -> list[Record]:
    """Read up to ``count`` records of ``spec``'s topic, decoded with ``spec.record.from_json``.

    Returns as soon as ``count`` were read, or what was read when ``timeout`` passed.
    A value that does not decode raises RecordError, noted with ``topic[partition]@offset``.
    """
    topic = spec.real_name(settings)
    out: list[Record] = []
    for _key, value, partition, offset in consume_raw(settings, topic, count=count, timeout=timeout, group=group):
        try:
            out.append(spec.record.from_json(value))
        except Exception as exc:
            exc.add_note(f"while decoding {topic}[{partition}]@{offset}")
            raise
    return out


def consume_raw(
    settings: KafkaSettings,
    topic_name: str,
    *,
    count: int,
    timeout: float = 30.0,
    group: str | None = None,
) -> list[RawRecord]:
    """Read up to ``count`` messages as ``(key, value, partition, offset)``; stop at count or timeout."""
    conf = settings.confluent_config(**{
        "group.id": group or f"test-{uuid.uuid4().hex[:12]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": group is not None,
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 100,  # the default 500 ms would add half a second to most reads
        "logger": _rdkafka_log,
    })  # fmt: skip
    consumer = Consumer(conf)
    out: list[RawRecord] = []
    deadline = time.monotonic() + timeout
    try:
        if group is None:
            md = consumer.list_topics(topic_name, timeout=timeout)
            meta = md.topics.get(topic_name)
            if meta is None or meta.error is not None:
                reason = meta.error if meta is not None else "not in the metadata"
                raise KafkaTestError(f"cannot consume {topic_name}: {reason}")
            consumer.assign([TopicPartition(topic_name, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)])
        else:
            consumer.subscribe([topic_name])
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("consume %s: %d of %d after %.0f s", topic_name, len(out), count, timeout)
                break
            for msg in consumer.consume(num_messages=min(count - len(out), 10_000), timeout=min(left, 1.0)):
                if msg.error() is not None:
                    raise KafkaTestError(f"consuming {topic_name} failed: {msg.error()}")
                out.append((msg.key(), msg.value(), msg.partition(), msg.offset()))
    finally:
        consumer.close()
    return out


# --- the Java client's partitioner -------------------------------------------------------------

_M32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """``org.apache.kafka.common.utils.Utils.murmur2``: a signed 32-bit hash, like Java's int."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & _M32
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & _M32
        k ^= k >> 24
        k = (k * m) & _M32
        h = (h * m) & _M32
        h ^= k
    tail = length & ~3
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & _M32
    h ^= h >> 13
    h = (h * m) & _M32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def java_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner (and Faust's) picks for a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class FakeMessage:
    """A consumed confluent-kafka message, as much of it as the services read (for unit tests of pure logic)."""

    def __init__(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int = 0, offset: int = 0
    ) -> None:
        self._t, self._k, self._v, self._p, self._o = topic, key, value, partition, offset

    def topic(self) -> str:
        return self._t

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def error(self) -> None:
        return None

