"""How the join worker makes its outputs and state durable: one producer, one delivery barrier.

Outputs and changelog writes go through one :class:`infra.kafka.KafkaProducer`
(idempotent, murmur2 partitioner like Faust and Java): it is much cheaper per
message than Faust's producer path, and its barrier (a flush) is a real
delivery barrier, so the worker commits nothing that is not on the broker.

A record the client or the broker refuses as too large (a ``labeled`` or
``user-history`` record of a long history of long ids, a state key of a huge
slate) cannot be delivered by retrying: it goes to ``dead-letters`` instead
(the dead letter is small by construction: :func:`infra.kafka.dead_letter`
truncates the value and keeps its size and sha256), counted as
``dead_letters_total{reason="too_large"}``, and the worker goes on.  A state
key dead-lettered so is missing after a restore of its partition (its
outputs went out).  Any other failure stops the worker
(:class:`JoinWorkerError`) before the batch is acknowledged: it is redone
after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, TypeAlias

from confluent_kafka import KafkaError

from contract.errors import StreamrecError
from contract.settings import KafkaSettings
from infra.kafka import Barrier, Failure, KafkaProducer, dead_letter
from streams.metrics import JoinMetrics

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 60.0
CLIENT_ID = "streamrec-join"
PRODUCER_OVERRIDES: dict[str, Any] = {
    "delivery.report.only.error": True,  # no Python callback per delivered message
    "linger.ms": 5,
    "queue.buffering.max.messages": 1_000_000,
}

Send: TypeAlias = tuple[str, bytes | None, bytes | None, int]
"""One record to produce: ``(topic, key, value, partition)``; partition -1 = by key."""


class JoinWorkerError(StreamrecError):
    """The worker cannot make its outputs or state durable; it stops rather than lose work."""


class Delivery:
    """Sends the worker's records and waits until the broker has them (see the module doc)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        dead_letter_topic: str,
        metrics: JoinMetrics,
        *,
        producer: KafkaProducer | None = None,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self.kafka = kafka
        self.dead_letter_topic = dead_letter_topic
        self.flush_timeout_s = flush_timeout_s
        self._producer = producer
        self._too_large: list[tuple[str, bytes | None, bytes | None, int, str]] = []
        self._dead_too_large = metrics.dead_letters.labels(reason="too_large")

    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer.create(self.kafka, CLIENT_ID, **PRODUCER_OVERRIDES)
        return self._producer

    def send_all(self, records: Iterable[Send]) -> None:
        """Queue every record; a too-large one is kept for its dead letter (at the barrier)."""
        send = self.producer().send
        on_report = self._on_report
        for topic, key, value, partition in records:
            failure = send(topic, value, key, partition=partition, on_delivery=on_report)
            if failure is None:
                continue
            if not failure.too_large:
                raise JoinWorkerError(f"could not produce to {failure}")
            self._too_large.append((topic, key, value, partition, failure.error))

    def _on_report(self, err: KafkaError | None, msg: Any) -> None:
        """Delivery reports (errors only): a record the broker refused as too large."""
        if err is not None and Failure(msg.topic(), None, 0, str(err), code=err.code()).too_large:
            self._too_large.append((msg.topic(), msg.key(), msg.value(), msg.partition(), str(err)))

    async def barrier(self, what: str) -> int:
        """Wait until the broker acknowledged everything sent so far, the dead letters of too
        large records included; return how many records were dead-lettered so.

        Raises:
            JoinWorkerError: a record was not delivered for another reason, or in time.
        """
        producer = self.producer()
        result = await asyncio.to_thread(producer.barrier, self.flush_timeout_s)
        self._raise_unless_delivered(what, result, too_large_ok=True)
        too_large, self._too_large = self._too_large, []
        if not too_large:
            return 0
        for topic, key, value, partition, error in too_large:
            log.error("dead-letter: a %d-byte record for %s[%d] is too large to deliver: %s",
                      len(value or b""), topic, partition, error)  # fmt: skip
            dead = dead_letter(
                source_topic=topic, partition=partition, offset=-1, key=key, value=value,
                error=f"{what}: too large to deliver to {topic}: {error}",
            )  # fmt: skip
            failure = producer.send(self.dead_letter_topic, dead.to_json(), key[:1024] if key else None)
            if failure is not None:
                raise JoinWorkerError(f"could not dead-letter a too large record of {topic}: {failure}")
        result = await asyncio.to_thread(producer.barrier, self.flush_timeout_s)
        self._too_large = []
        self._raise_unless_delivered(f"dead letters of too large {what}", result, too_large_ok=False)
        self._dead_too_large.inc(len(too_large))
        return len(too_large)

    def _raise_unless_delivered(self, what: str, result: Barrier, *, too_large_ok: bool) -> None:
        failures = [f for f in result.failures if not (too_large_ok and f.too_large)]
        if failures or result.undelivered:
            detail = Barrier(failures, result.undelivered).describe()
            raise JoinWorkerError(f"could not deliver the {what}: {detail} (after {self.flush_timeout_s:.0f} s)")

    def close(self) -> None:
        if self._producer is not None:
            result = self._producer.close(10)
            if result.undelivered:
                log.warning("%d message(s) undelivered at shutdown (they will be redone)", result.undelivered)
            self._producer = None
