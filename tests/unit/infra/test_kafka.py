"""Pure parts of the Kafka shell: dead letters never too large to deliver, failure labels."""

from __future__ import annotations

import hashlib

from confluent_kafka import KafkaError

from infra.kafka import MAX_RAW_BYTES, Barrier, Failure, dead_letter


def test_a_dead_letter_keeps_small_values_whole() -> None:
    dl = dead_letter(source_topic="t", partition=1, offset=2, key=b"k", value=b"\xffraw", error=ValueError("bad"))
    assert dl.raw() == b"\xffraw" and dl.error == "bad" and dl.key == "k"


def test_a_dead_letter_truncates_a_huge_value_and_names_its_size_and_hash() -> None:
    raw = b"z" * (MAX_RAW_BYTES * 3)
    dl = dead_letter(source_topic="t", partition=0, offset=0, key="k" * 5000, value=raw, error="x" * 10_000)
    assert len(dl.raw()) == MAX_RAW_BYTES
    assert hashlib.sha256(raw).hexdigest() in dl.error or len(dl.error) <= 4096
    assert len(dl.error) <= 4096 and len(dl.key or "") <= 1024
    assert len(dl.to_json()) < 4 * MAX_RAW_BYTES


def test_failure_reasons_are_stable_labels() -> None:
    big = Failure("t", None, 10, "Message size too large", code=KafkaError.MSG_SIZE_TOO_LARGE, rejected=True)
    assert big.too_large and big.reason == "too_large"
    assert Failure("t", None, 1, "timed out", code=KafkaError._MSG_TIMED_OUT).reason == "undelivered"
    assert Barrier().ok and not Barrier(undelivered=1).ok
    assert "still queued" in Barrier(undelivered=2).describe()
