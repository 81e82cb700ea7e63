"""The Kafka shell every service and the replay share: one producer, one dead letter, one read-to-end.

Written once, tested once (``tests/unit/infra/test_kafka.py``, ``tests/integration/test_kafka_shell.py``):

- :class:`KafkaProducer` wraps a confluent-kafka ``Producer``: a full local
  queue (``BufferError``) is drained by polling and the record retried; a
  record the client rejects at once (``MSG_SIZE_TOO_LARGE``, an unknown
  partition, ...) is not raised into the caller's loop but returned as a
  :class:`Failure` and counted; every delivery report that carries an error
  is kept as a :class:`Failure` until the next :meth:`KafkaProducer.barrier`
  (a flush) hands them to the caller, who decides: retry, dead-letter, or stop
  before committing the input.
- :func:`dead_letter` builds the ``dead-letters`` record of an input that
  could not be processed: the reason, where it came from, and its raw value,
  truncated to :data:`MAX_RAW_BYTES` with the size and sha256 of the whole
  value, so that a dead letter is never too large to deliver itself.
- :func:`read_to_end` reads partitions of (compacted) topics from their
  beginning to their end as of the call, and says where it stopped, so that a
  service can bootstrap its state (catalog, user histories, model versions)
  and then follow the topics from there.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from contract.records import DeadLetter

log = logging.getLogger(__name__)

MAX_RAW_BYTES = 64 * 1024
"""Bytes of an input's raw value kept in its dead letter (the size and sha256 of the whole are kept too)."""
QUEUE_FULL_POLL_S = 0.05
"""How long a full local queue is polled (serving delivery reports) before the record is retried."""


class ProducerLike(Protocol):
    def produce(self, topic: str, value: Any = ..., key: Any = ..., partition: int = ..., on_delivery: Any = ...) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...
    def flush(self, timeout: float = ...) -> int: ...


DeliveryCallback = Callable[[KafkaError | None, Any], None]


@dataclass(frozen=True)
class Failure:
    """A record that was not delivered: at once (``rejected``) or by its delivery report."""

    topic: str
    key: bytes | None
    size: int
    error: str
    code: int | None = None
    rejected: bool = False

    @property
    def too_large(self) -> bool:
        return self.code in (KafkaError.MSG_SIZE_TOO_LARGE, getattr(KafkaError, "_MSG_SIZE_TOO_LARGE", -999))

    @property
    def reason(self) -> str:
        """A short, stable label for metrics (not the error's wording)."""
        if self.too_large:
            return "too_large"
        return "rejected" if self.rejected else "undelivered"

    def __str__(self) -> str:
        how = "rejected" if self.rejected else "undelivered"
        return f"{self.topic}: {how} ({self.size} bytes): {self.error}"


@dataclass
class Barrier:
    """What a :meth:`KafkaProducer.barrier` found: the failures since the last one, and what is still queued."""

    failures: list[Failure] = field(default_factory=list)
    undelivered: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.undelivered

    def describe(self, limit: int = 5) -> str:
        parts = [str(f) for f in self.failures[:limit]]
        if len(self.failures) > limit:
            parts.append(f"... {len(self.failures) - limit} more")
        if self.undelivered:
            parts.append(f"{self.undelivered} record(s) still queued")
        return "; ".join(parts) or "ok"


class KafkaProducer:
    """One producer with the project's error policy (see the module doc); thread-safe like the client."""

    def __init__(self, producer: ProducerLike, *, name: str = "producer") -> None:
        self.producer = producer
        self.name = name
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0

    @classmethod
    def create(cls, kafka: Any, client_id: str, **extra: Any) -> KafkaProducer:
        """A producer with the project's defaults (``kafka``: :class:`contract.settings.KafkaSettings`)."""
        from confluent_kafka import Producer

        conf = kafka.producer_config(**{
            "client.id": client_id,
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            **extra,
        })  # fmt: skip
        return cls(Producer(conf), name=client_id)

    def _note(self, failure: Failure) -> None:
        with self._lock:
            self._failures.append(failure)
            self.failed += 1

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
    ) -> Failure | None:
        """Queue one record; None when queued, else the :class:`Failure` (also kept for the barrier).

        ``on_delivery(err, msg)`` is called with the delivery report, as the
        client does (not for a record rejected at once).
        """
        size = len(value or b"") + len(key or b"")

        def report(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                self._note(Failure(topic, key, size, str(err), code=err.code()))
            if on_delivery is not None:
                on_delivery(err, msg)

        while True:
            try:
                if partition >= 0:
                    self.producer.produce(topic, value=value, key=key, partition=partition, on_delivery=report)
                else:
                    self.producer.produce(topic, value=value, key=key, on_delivery=report)
                self.sent += 1
                return None
            except BufferError:  # local queue full: serve delivery reports, then retry
                self.producer.poll(QUEUE_FULL_POLL_S)
            except KafkaException as exc:  # rejected by the client: too large, unknown partition, ...
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                failure = Failure(
                    topic, key, size, str(err or exc), code=err.code() if err is not None else None, rejected=True
                )
                self._note(failure)
                log.error("%s: %s", self.name, failure)
                return failure

    def poll(self, timeout: float = 0.0) -> int:
        return self.producer.poll(timeout)

    def take_failures(self) -> list[Failure]:
        """The failures noted since the last call (delivery reports already served)."""
        with self._lock:
            out, self._failures = self._failures, []
        return out

    def barrier(self, timeout: float) -> Barrier:
        """Flush: wait until every queued record is acknowledged; return what failed since the last barrier."""
        left = self.producer.flush(timeout)
        return Barrier(self.take_failures(), left)

    def close(self, timeout: float = 10.0) -> Barrier:
        result = self.barrier(timeout)
        if not result.ok:
            log.warning("%s closing: %s", self.name, result.describe())
        return result


# --------------------------------------------------------------------------- dead letters
def dead_letter(
    *,
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | str | None,
    value: bytes | None,
    error: BaseException | str,
    ts: int | None = None,
    max_raw_bytes: int = MAX_RAW_BYTES,
) -> DeadLetter:
    """The ``dead-letters`` record of an input: its origin, the reason, its raw value (truncated, hashed)."""
    raw = value or b""
    reason = str(error) or type(error).__name__
    if len(raw) > max_raw_bytes:
        digest = hashlib.sha256(raw).hexdigest()
        reason = f"{reason} [raw value truncated: {len(raw)} bytes, sha256 {digest}]"
        raw = raw[:max_raw_bytes]
    if len(reason) > 4096:
        reason = reason[:4093] + "..."
    return DeadLetter.of(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        key=key[:1024] if key is not None else None,
        value=raw,
        error=reason,
        ts=int(time.time() * 1000) if ts is None else ts,
    )


def dead_letter_of(message: Any, error: BaseException | str, ts: int | None = None) -> DeadLetter:
    """:func:`dead_letter` of a consumed confluent-kafka message."""
    return dead_letter(
        source_topic=message.topic(), partition=message.partition(), offset=message.offset(),
        key=message.key(), value=message.value(), error=error, ts=ts,
    )


# --------------------------------------------------------------------------- read to end
@dataclass
class ReadResult:
    """What :func:`read_to_end` read: the records handled, where each partition stopped, whether all ended."""

    records: int
    positions: dict[tuple[str, int], int]
    complete: bool
    seconds: float


class ConsumerLike(Protocol):
    def list_topics(self, topic: str | None = ..., timeout: float = ...) -> Any: ...
    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = ...) -> tuple[int, int]: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Any]: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...


class TopicMissing(Exception):
    """A topic :func:`partitions_of` was asked about is not usable."""


def partitions_of(consumer: ConsumerLike, topic: str, timeout: float = 30.0) -> list[int]:
    """The partitions of ``topic``; :class:`TopicMissing` when it does not exist or has an error.

    A leader not elected yet (a broker that has just restarted) is waited for, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        error = meta.error if meta is not None else None
        retriable = error is not None and error.code() in _RETRIABLE_METADATA - {KafkaError.UNKNOWN_TOPIC_OR_PART}
        if not retriable or time.monotonic() + 0.5 >= deadline:
            break
        log.info("metadata of %s: %s; retrying", topic, error)
        time.sleep(0.5)
    if meta is None or meta.error is not None or not meta.partitions:
        reason = meta.error if meta is not None and meta.error is not None else "no such topic"
        raise TopicMissing(f"topic {topic} is not usable ({reason}); create the topics first (make topics)")
    return sorted(meta.partitions)


_RETRIABLE_METADATA = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN, KafkaError._WAIT_COORD,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_COORDINATOR, KafkaError.BROKER_NOT_AVAILABLE,
})  # fmt: skip
"""Errors of a watermark query that a broker just (re)started answers with for a while."""


def watermarks(consumer: ConsumerLike, tp: TopicPartition, *, deadline: float) -> tuple[int, int]:
    """``(low, high)`` of a partition, retried (with backoff) on the errors of a broker that has just
    restarted or moved a leader (``NOT_LEADER_FOR_PARTITION``, ...) until ``deadline`` (monotonic)."""
    delay = 0.1
    while True:
        left = deadline - time.monotonic()
        try:
            return consumer.get_watermark_offsets(tp, timeout=max(left, 1.0))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if isinstance(err, KafkaError) else None
            if code not in _RETRIABLE_METADATA or time.monotonic() + delay >= deadline:
                raise
            log.info("watermarks of %s[%d]: %s; retrying in %.1f s", tp.topic, tp.partition, exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def read_to_end(
    consumer: ConsumerLike,
    topics: Sequence[str] | Iterable[tuple[str, int]],
    handle: Callable[[Any], None],
    *,
    timeout_s: float = 60.0,
    stop: threading.Event | None = None,
    batch: int = 5000,
) -> ReadResult:
    """Assign the partitions from their beginning and hand every record to ``handle`` up to their end.

    ``topics``: topic names (all their partitions) or ``(topic, partition)``
    pairs.  The end is each partition's high watermark when the call starts;
    positions are checked too, so control records (transaction markers,
    never delivered) do not hold the read open.  Errors on messages are
    handed to ``handle`` like records (it decides).  Returns where each
    partition stopped (the offset to continue from) and whether every
    partition reached its end before ``timeout_s`` or ``stop``.
    """
    started = time.monotonic()
    pairs: list[tuple[str, int]] = []
    for t in topics:
        if isinstance(t, tuple):
            pairs.append(t)
        else:
            pairs.extend((t, p) for p in partitions_of(consumer, t, timeout=timeout_s))
    ends: dict[tuple[str, int], int] = {}
    positions: dict[tuple[str, int], int] = {}
    for topic, p in pairs:
        low, high = watermarks(consumer, TopicPartition(topic, p), deadline=started + timeout_s)
        positions[(topic, p)] = OFFSET_BEGINNING if high <= low else low
        if high > low:
            ends[(topic, p)] = high
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in pairs])
    records = 0
    deadline = started + timeout_s
    pending = dict(ends)
    while pending and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        for msg in consumer.consume(num_messages=batch, timeout=0.2):
            handle(msg)
            if msg.error() is not None:
                continue
            records += 1
            tp = (msg.topic(), msg.partition())
            if tp in pending and msg.offset() + 1 >= pending[tp]:
                del pending[tp]
        if pending:
            for tp in consumer.position([TopicPartition(t, p) for t, p in pending]):
                if tp.offset >= 0 and tp.offset >= pending[(tp.topic, tp.partition)]:
                    pending.pop((tp.topic, tp.partition), None)
    if ends:
        for tp in consumer.position([TopicPartition(t, p) for t, p in ends]):
            positions[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else ends[(tp.topic, tp.partition)]
    return ReadResult(records, positions, not pending, time.monotonic() - started)
