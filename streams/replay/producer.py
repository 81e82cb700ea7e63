"""Produce a replay stream to Kafka, paced in event time.

Each record goes to ``spec.real_name(settings)`` with key ``record.kafka_key()``
and value ``record.to_json()``, through one confluent-kafka producer built from
``settings.producer_config()`` (murmur2 partitioner, so impressions and clicks
of a user land in the same partition as with Faust and Java clients).

Delivery is asynchronous: a delivery callback counts what the broker
acknowledged, ``poll(0)`` serves callbacks as we go, a full local queue
(``BufferError``) is drained by polling and the record retried, and the stream
ends with a single ``flush``.  Any record that was not acknowledged makes
:func:`produce` raise :class:`ProduceError`, which carries the counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaException, Producer
from tqdm import tqdm

from contract.errors import StreamrecError
from contract.settings import KafkaSettings
from streams.replay import ReplayEvent

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.5
"""Longest single ``poll`` while pacing, so callbacks keep being served."""


class KafkaProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` the replay uses (a fake in unit tests)."""

    def produce(
        self, topic: str, value: bytes, key: bytes, on_delivery: Callable[..., Any]
    ) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


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
    producer: KafkaProducerLike | None = None,
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
    producer: a ready producer (tests); default: ``confluent_kafka.Producer``
        built from ``settings.producer_config()``.
    clock: monotonic seconds (tests).

    Raises :class:`ProduceError` if any record was not delivered.
    """
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 or None, got {speed}")
    if producer is None:
        producer = _make_producer(settings)

    topic_of: dict[str, str] = {}  # logical -> real
    logical_of: dict[str, str] = {}  # real -> logical
    counts: dict[str, int] = {}
    errors: list[str] = []
    failed = produced = 0

    def on_delivery(err: Any, msg: Any) -> None:
        nonlocal failed
        if err is None:
            counts[logical_of[msg.topic()]] += 1
            return
        failed += 1
        _note_error(errors, f"{msg.topic()}: {err}", max_errors_logged)

    start = clock()
    first_ts: int | None = None
    bar = tqdm(total=total, unit="rec", disable=not progress, mininterval=0.5, desc="replay")
    try:
        for spec, record in events:
            topic = topic_of.get(spec.name)
            if topic is None:
                topic = topic_of[spec.name] = spec.real_name(settings)
                logical_of[topic] = spec.name
                counts.setdefault(spec.name, 0)
            if speed is not None:
                if first_ts is None:
                    first_ts = record.ts
                due = (record.ts - first_ts) / 1000.0 / speed
                while (wait := due - (clock() - start)) > 0:
                    producer.poll(min(wait, MAX_WAIT_S))
            key, value = record.kafka_key(), record.to_json()
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: serve callbacks to make room, retry
                    producer.poll(0.1)
                except KafkaException as exc:  # rejected by the client (e.g. too large)
                    failed += 1
                    _note_error(errors, f"{topic}: rejected: {exc}", max_errors_logged)
                    break
            produced += 1
            producer.poll(0)
            bar.update(1)
    finally:
        bar.close()
        remaining = producer.flush(flush_timeout)
        if remaining:
            failed += remaining
            _note_error(
                errors,
                f"{remaining} record(s) unacknowledged after a {flush_timeout}s flush",
                len(errors) + 1,
            )
    result = ProduceResult(
        counts=dict(counts),
        produced=produced,
        failed=failed,
        elapsed_s=clock() - start,
        first_errors=tuple(errors),
    )
    log.info(
        "replay delivered %d records in %.1fs (%.0f/s): %s",
        result.delivered,
        result.elapsed_s,
        result.rate,
        result.counts,
    )
    if failed:
        raise ProduceError.undelivered(result)
    return result


def _note_error(errors: list[str], message: str, max_logged: int) -> None:
    if len(errors) < max_logged:
        errors.append(message)
        log.error("delivery failed: %s", message)


def _make_producer(settings: KafkaSettings) -> KafkaProducerLike:
    try:
        return Producer(settings.producer_config(**{
            "client.id": "streamrec-replay",
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
        }))  # fmt: skip
    except KafkaException as exc:
        raise ProduceError(f"cannot create a Kafka producer: {exc}") from exc
