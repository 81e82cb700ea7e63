"""The shared Kafka shell (infra/kafka.py) against a real broker: errors returned, not raised; read to end."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer

from contract.settings import KafkaSettings
from contract.topics import DEAD_LETTERS, ITEMS
from infra.kafka import KafkaProducer, dead_letter, read_to_end


def test_a_record_too_large_is_a_failure_not_a_crash_and_the_rest_is_delivered(kafka_settings: KafkaSettings) -> None:
    topic = ITEMS.real_name(kafka_settings)
    shell = KafkaProducer.create(kafka_settings, "test-shell", **{"message.max.bytes": 150_000})
    assert shell.send(topic, b"v0", b"k0") is None
    failure = shell.send(topic, b"x" * 200_000, b"big")
    assert failure is not None and failure.rejected and failure.too_large and failure.reason == "too_large"
    assert shell.send(topic, b"v1", b"k1") is None
    result = shell.barrier(30)
    assert result.undelivered == 0
    assert [f.reason for f in result.failures] == ["too_large"]  # kept once for the caller
    assert shell.barrier(5).ok  # and handed over only once

    # the dead letter of the big record is small enough to deliver itself
    dl = dead_letter(source_topic=topic, partition=0, offset=7, key=b"big", value=b"x" * 200_000, error=failure.error)
    assert "sha256" in dl.error and len(dl.raw()) < 200_000
    assert shell.send(DEAD_LETTERS.real_name(kafka_settings), dl.to_json(), dl.kafka_key()) is None
    assert shell.barrier(30).ok

    consumer = Consumer(kafka_settings.confluent_config(**{
        "group.id": f"test-shell-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
    }))  # fmt: skip
    try:
        seen: list[bytes] = []
        read = read_to_end(consumer, [topic], lambda m: seen.append(m.value()) if m.error() is None else None,
                           timeout_s=30)
        assert read.complete and read.records == 2
        assert sorted(seen) == [b"v0", b"v1"]
        assert sum(o for (t, _p), o in read.positions.items() if o >= 0) == 2  # continue from the end
        empty = read_to_end(consumer, [(topic, p) for (_t, p) in read.positions], lambda m: None, timeout_s=5)
        assert empty.complete
    finally:
        consumer.close()
