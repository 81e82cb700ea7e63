"""The shell's watermark query rides out a broker that has just restarted (found by the chaos run:
serving exited at start-up with NOT_LEADER_FOR_PARTITION)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infra.kafka import watermarks


class _Consumer:
    def __init__(self, failures: list[int]) -> None:
        self.failures = failures
        self.calls = 0

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.failures:
            raise KafkaException(KafkaError(self.failures.pop(0)))
        return (0, 42)


def test_watermarks_retry_the_errors_of_a_restarting_broker() -> None:
    consumer = _Consumer([KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE])
    assert watermarks(consumer, TopicPartition("t", 0), deadline=time.monotonic() + 10) == (0, 42)
    assert consumer.calls == 3


def test_watermarks_give_up_at_the_deadline_and_on_other_errors() -> None:
    always = _Consumer([KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    with pytest.raises(KafkaException):
        watermarks(always, TopicPartition("t", 0), deadline=time.monotonic() + 0.5)
    fatal = _Consumer([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        watermarks(fatal, TopicPartition("t", 0), deadline=time.monotonic() + 10)
    assert fatal.calls == 1
