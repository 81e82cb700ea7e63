"""What a pipeline run does on the broker beside the services: read topics back, send requests.

- :class:`TopicCollector` reads whole topics (all partitions, from the
  beginning) in a background thread while the run goes on, and hands out
  snapshots of what it has read (:class:`Msg`);
- :func:`high_watermarks` and :func:`committed_offsets` tell how far a topic
  goes and how far a consumer group (the trainer's) has read it;
- :class:`ReplayTracker` follows the replay as it is produced (its event time
  and recently active users), and :class:`Requester` sends ``rec-requests``
  for those users at a steady rate, stamped with the replay's event time.

Every consumer here is a plain reader (:func:`reader`): a fresh group id, no
commits.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contract.errors import StreamrecError
from contract.records import Impression, RecRequest
from contract.settings import KafkaSettings
from contract.topics import REC_REQUESTS
from infra.kafka import KafkaProducer
from streams.replay import ReplayEvent

log = logging.getLogger(__name__)


def reader(settings: KafkaSettings, group: str | None = None, **extra: Any) -> Consumer:
    """A consumer that only reads: ``group`` (default: a fresh one) is never committed to."""
    return Consumer(settings.confluent_config(**{
        "group.id": group or f"pipeline-read-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        **extra,
    }))  # fmt: skip


@dataclass(frozen=True)
class Msg:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes


class TopicCollector:
    """Reads whole topics (all partitions, from the beginning) in a background thread."""

    def __init__(self, settings: KafkaSettings, topics: Iterable[str]) -> None:
        self.topics = list(topics)
        self.messages: dict[str, list[Msg]] = {t: [] for t in self.topics}
        self._settings = settings
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> TopicCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def snapshot(self, topic: str) -> list[Msg]:
        with self._lock:
            return list(self.messages[topic])

    def _run(self) -> None:
        consumer = reader(self._settings, **{"enable.partition.eof": False})
        try:
            md = consumer.list_topics(timeout=30)
            consumer.assign([
                TopicPartition(t, p, OFFSET_BEGINNING) for t in self.topics for p in md.topics[t].partitions
            ])
            while not self._stop.is_set():
                batch = consumer.consume(num_messages=5000, timeout=0.2)
                with self._lock:
                    for m in batch:
                        if m.error() is None:
                            self.messages[m.topic()].append(
                                Msg(m.partition(), m.offset(), m.timestamp()[1], m.value() or b"")
                            )
        except BaseException as exc:  # surfaced by the caller
            self.error = exc
            log.exception("topic collector failed")
        finally:
            consumer.close()


def high_watermarks(settings: KafkaSettings, topic: str) -> dict[int, int]:
    consumer = reader(settings)
    try:
        md = consumer.list_topics(topic, timeout=30)
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in md.topics[topic].partitions
        }
    finally:
        consumer.close()


def committed_offsets(settings: KafkaSettings, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    """The offsets ``group`` has committed on ``topic`` (without joining the group)."""
    consumer = reader(settings, group)
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


class ReplayTracker:
    """Follows the replay as it is produced: the current event time and the recently active users."""

    def __init__(self, recent: int = 500) -> None:
        self.event_ts = 0
        self.users: deque[str] = deque(maxlen=recent)
        self.done = threading.Event()
        self.stop = threading.Event()

    def wrap(self, events: Iterable[ReplayEvent]) -> Iterator[ReplayEvent]:
        for spec, rec in events:
            if self.stop.is_set():  # the run is being torn down: end the stream early
                return
            if isinstance(rec, Impression):
                self.event_ts = rec.ts
                self.users.append(rec.user_id)
            yield spec, rec


@contextmanager
def stopping(tracker: ReplayTracker) -> Iterator[ReplayTracker]:
    try:
        yield tracker
    finally:
        tracker.stop.set()


@contextmanager
def running(requester: Requester) -> Iterator[Requester]:
    requester.start()
    try:
        yield requester
    finally:
        requester.stop()


class Requester(threading.Thread):
    """Sends ``rec-requests`` for active users at a steady rate, stamped with the replay's event time."""

    def __init__(self, settings: KafkaSettings, tracker: ReplayTracker, *, rate: float, k: int, seed: int) -> None:
        super().__init__(name="requester", daemon=True)
        self.settings, self.tracker, self.rate, self.k = settings, tracker, rate, k
        self.rng = random.Random(seed)
        self.sent: dict[str, tuple[str, int]] = {}  # request_id -> (user_id, event ts)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=30)

    def run(self) -> None:
        producer = KafkaProducer.create(self.settings, "pipeline-requester", **{"linger.ms": 5})
        topic = REC_REQUESTS.real_name(self.settings)
        n = 0
        try:
            while not self.stop_event.wait(1.0 / self.rate):
                if not self.tracker.users:
                    continue
                user = self.rng.choice(self.tracker.users)
                n += 1
                req = RecRequest(request_id=f"req-{n}", user_id=user, k=self.k, ts=self.tracker.event_ts)
                failure = producer.send(topic, req.to_json(), req.kafka_key())
                if failure is not None:
                    raise StreamrecError(f"a recommendation request was rejected: {failure}")
                self.sent[req.request_id] = (user, req.ts)
                producer.poll(0)
        except BaseException as exc:
            self.error = exc
            log.exception("requester failed")
        finally:
            producer.close(30)
