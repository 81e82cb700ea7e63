"""Produce a replay stream to Kafka, paced in event time.

Each record goes to ``spec.real_name(settings)`` with key ``record.kafka_key()``
and value ``record.to_json()``, through the project's shared producer
(:class:`infra.kafka.KafkaProducer`, built from ``settings.producer_config()``:
murmur2 partitioner, so impressions and clicks of a user land in the same
partition as with Faust and Java clients).

Delivery is asynchronous: a delivery callback counts what the broker
acknowledged, ``poll(0)`` serves callbacks as we go, a full local queue is
drained and the record retried (by the shared producer), a record the client
rejects is counted as failed, and the stream ends with a single barrier
(flush).  Any record that was not acknowledged makes :func:`produce` raise
:class:`ProduceError`, which carries the counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from tqdm import tqdm

from contract.errors import StreamrecError
from contract.settings import KafkaSettings
from contract.topics import TopicSpec
from infra.kafka import KafkaProducer, ProducerLike
from streams.replay import ReplayEvent

log = logging.getLogger(__name__)

CLIENT_ID = "streamrec-replay"
MAX_WAIT_S = 0.5
"""Longest single ``poll`` while pacing, so callbacks keep being served."""


@dataclass(frozen=True)
class ProduceResult:
    """What one replay delivered."""

    counts: dict[str, int]
    """Acknowledged records per logical topic (DESIGN.md name, without prefix)."""
    produced: int
    """Records handed to the client."""
    failed: int
    """Records not acknowledged (delivery error, rejected by the client, or not flushed in time)."""
    elapsed_s: float
    first_errors: tuple[str, ...] = field(default=())

    @property
    def delivered(self) -> int:
        return sum(self.counts.values())

    @property
    def rate(self) -> float:
        """Acknowledged records per wall-clock second."""
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else float("inf")


class ProduceError(StreamrecError):
    """Some records of a replay were not delivered; ``result`` has the counts."""

    def __init__(self, message: str, result: ProduceResult | None = None) -> None:
        self.result = result
        super().__init__(message)

    @classmethod
    def undelivered(cls, result: ProduceResult) -> ProduceError:
        first = "; ".join(result.first_errors) or "no error detail"
        return cls(
            f"{result.failed} of {result.produced} records were not delivered (first errors: {first})",
            result,
        )


def produce(
    events: Iterable[ReplayEvent],
    settings: KafkaSettings,
    *,
    speed: float | None = None,
    total: int | None = None,
    progress: bool = True,
    flush_timeout: float = 60.0,
    producer: ProducerLike | KafkaProducer | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_errors_logged: int = 5,
) -> ProduceResult:
    """Produce every ``(spec, record)`` of ``events``; return the per-topic counts.

    speed: event-time speed-up; the record with event time ``ts`` is sent when
        ``(ts - first ts) / 1000 / speed`` wall seconds have passed since the
        first one (10_000 replays a day of events in under 9 s).  None = as fast
        as possible.
    total: number of records, for the progress bar only.
    progress: show a tqdm progress bar (on stderr).
    flush_timeout: seconds the final flush may wait for acknowledgements.
    producer: a ready producer, or a client to wrap (tests); default: a
        :class:`~infra.kafka.KafkaProducer` built from ``settings.producer_config()``.
    clock: monotonic seconds (tests).

    Raises :class:`ProduceError` if any record was not delivered.
    """
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 or None, got {speed}")
    if producer is None:
        producer = _make_producer(settings)
    elif not isinstance(producer, KafkaProducer):
        producer = KafkaProducer(producer, name=CLIENT_ID)
    tally = _Tally(max_errors_logged)
    start = clock()
    first_ts: int | None = None
    bar = tqdm(total=total, unit="rec", disable=not progress, mininterval=0.5, desc="replay")
    try:
        for spec, record in events:
            topic = tally.topic(spec, settings)
            if speed is not None:
                if first_ts is None:
                    first_ts = record.ts
                due = (record.ts - first_ts) / 1000.0 / speed
                while (wait := due - (clock() - start)) > 0:
                    producer.poll(min(wait, MAX_WAIT_S))
            failure = producer.send(topic, record.to_json(), record.kafka_key(), on_delivery=tally.on_delivery)
            if failure is not None:  # rejected by the client (e.g. too large)
                tally.failed_with(str(failure))
            tally.produced += 1
            producer.poll(0)
            bar.update(1)
    finally:
        bar.close()
        remaining = producer.barrier(flush_timeout).undelivered
        if remaining:
            tally.failed_with(f"{remaining} record(s) unacknowledged after a {flush_timeout}s flush",
                              n=remaining, always=True)  # fmt: skip
    result = tally.result(clock() - start)
    log.info(
        "replay delivered %d records in %.1fs (%.0f/s): %s",
        result.delivered,
        result.elapsed_s,
        result.rate,
        result.counts,
    )
    if result.failed:
        raise ProduceError.undelivered(result)
    return result


class _Tally:
    """What a replay sent, what the broker acknowledged per logical topic, and the first errors."""

    def __init__(self, max_errors_logged: int) -> None:
        self.max_errors_logged = max_errors_logged
        self.topic_of: dict[str, str] = {}  # logical -> real
        self.logical_of: dict[str, str] = {}  # real -> logical
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.failed = self.produced = 0

    def topic(self, spec: TopicSpec, settings: KafkaSettings) -> str:
        topic = self.topic_of.get(spec.name)
        if topic is None:
            topic = self.topic_of[spec.name] = spec.real_name(settings)
            self.logical_of[topic] = spec.name
            self.counts.setdefault(spec.name, 0)
        return topic

    def on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.counts[self.logical_of[msg.topic()]] += 1
        else:
            self.failed_with(f"{msg.topic()}: {err}")

    def failed_with(self, message: str, n: int = 1, always: bool = False) -> None:
        self.failed += n
        if always or len(self.errors) < self.max_errors_logged:
            self.errors.append(message)
            log.error("delivery failed: %s", message)

    def result(self, elapsed_s: float) -> ProduceResult:
        return ProduceResult(
            counts=dict(self.counts),
            produced=self.produced,
            failed=self.failed,
            elapsed_s=elapsed_s,
            first_errors=tuple(self.errors),
        )


def _make_producer(settings: KafkaSettings) -> KafkaProducer:
    try:
        return KafkaProducer.create(settings, CLIENT_ID)
    except KafkaException as exc:
        raise ProduceError(f"cannot create a Kafka producer: {exc}") from exc
