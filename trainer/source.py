"""The trainer's Kafka side: the consumer of ``labeled`` and ``items``, and its dead letters.

Partitions are *assigned* (no group rebalancing) and positioned at the
checkpointed offsets; the group's committed offsets are only written (for lag
monitoring), never trusted over the checkpoint.  The catalog is bootstrapped
by reading the compacted ``items`` topic to its end as of start-up
(:func:`infra.kafka.read_to_end`), then followed from where that stopped.
A record that cannot be used goes to ``dead-letters``
(:func:`infra.kafka.dead_letter`), through the shared producer shell.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from contract.errors import RecordError, StreamrecError
from contract.records import Item, Labeled
from contract.settings import KafkaSettings
from contract.topics import DEAD_LETTERS, ITEMS, LABELED
from infra.kafka import (
    KafkaProducer,
    TopicMissing,
    dead_letter,
    dead_letter_of,
    partitions_of,
    read_to_end,
)
from trainer.catalog import Catalog
from trainer.service_metrics import TrainerMetrics
from trainer.service_settings import TrainerSettings

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

CATALOG_LOAD_TIMEOUT_S = 600.0
"""Longest start-up read of ``items`` (a trainer must not train on a partial catalog: it fails instead)."""
DEAD_LETTER_FLUSH_S = 10.0
"""How long a checkpoint waits for the dead letters of the records it moves past."""


class TrainerServiceError(StreamrecError):
    """The trainer service cannot start or go on (missing topic, broker unreachable...)."""


class Source:
    """The consumer, the item follower and the dead-letter producer of one trainer."""

    def __init__(self, settings: TrainerSettings, kafka: KafkaSettings, metrics: TrainerMetrics) -> None:
        self.settings = settings
        self.kafka = kafka
        self.metrics = metrics
        self.labeled_topic = LABELED.real_name(kafka)
        self.items_topic = ITEMS.real_name(kafka)
        self.dead_topic = DEAD_LETTERS.real_name(kafka)
        self.consumer: Consumer | None = None
        self.dead_letters: KafkaProducer | None = None
        self.item_positions: dict[int, int] = {}

    def open(self) -> None:
        self.dead_letters = KafkaProducer.create(self.kafka, f"{self.settings.group_id}-dead-letters")
        self.consumer = Consumer(self.kafka.confluent_config(**{
            "group.id": self.settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.settings.start_offset,
            "enable.partition.eof": False,
            "logger": _rdkafka_log,
        }))  # fmt: skip

    def _consumer(self) -> Consumer:
        if self.consumer is None:
            raise TrainerServiceError("the consumer is not open")
        return self.consumer

    def partitions(self, topic: str) -> list[int]:
        try:
            return partitions_of(self._consumer(), topic)
        except KafkaException as exc:
            raise TrainerServiceError(f"cannot reach the brokers at {self.kafka.bootstrap_servers}: {exc}") from exc
        except TopicMissing as exc:
            raise TrainerServiceError(str(exc)) from exc

    # --- start-up -------------------------------------------------------------------------
    def load_catalog(self, catalog: Catalog, stop: threading.Event) -> None:
        """Read ``items`` from its beginning to its end as of now; remember where to follow it from."""
        consumer = self._consumer()
        pairs = [(self.items_topic, p) for p in self.partitions(self.items_topic)]
        try:
            result = read_to_end(consumer, pairs, lambda msg: self._item(msg, catalog),
                                 timeout_s=CATALOG_LOAD_TIMEOUT_S, stop=stop)
        except KafkaException as exc:
            raise TrainerServiceError(f"reading {self.items_topic}: {exc}") from exc
        if not result.complete and not stop.is_set():
            raise TrainerServiceError(f"the catalog load did not reach the end of {self.items_topic} in "
                                      f"{CATALOG_LOAD_TIMEOUT_S:.0f}s ({result.records} records read)")
        self.item_positions = {p: off for (_t, p), off in result.positions.items()}
        consumer.unassign()
        self.metrics.catalog.set(len(catalog))
        log.info("catalog: %d items from %s in %.1fs", len(catalog), self.items_topic, result.seconds)

    def start_offset(self, partition: int, checkpointed: int | None) -> int:
        """The checkpointed offset of a partition, else its beginning or end (start_offset)."""
        low, high = self._consumer().get_watermark_offsets(TopicPartition(self.labeled_topic, partition), timeout=30)
        if checkpointed is None:
            return low if self.settings.start_offset == "earliest" else high
        if checkpointed < low:
            log.warning("%s[%d]: checkpoint offset %d was deleted by retention (first is %d): "
                        "%d examples lost", self.labeled_topic, partition, checkpointed, low, low - checkpointed)
            return low
        return checkpointed

    def assign(self, labeled: dict[int, int]) -> None:
        """Follow ``items`` from where the catalog load stopped and ``labeled`` from these offsets."""
        tps = [TopicPartition(self.items_topic, p, off) for p, off in self.item_positions.items()]
        tps += [TopicPartition(self.labeled_topic, p, off) for p, off in labeled.items()]
        self._consumer().assign(tps)

    def add_partitions(self, labeled: dict[int, int]) -> None:
        self._consumer().incremental_assign([TopicPartition(self.labeled_topic, p, o) for p, o in labeled.items()])

    # --- records ----------------------------------------------------------------------------
    def fetch(self, timeout: float, catalog: Catalog) -> list[tuple[int, int, Labeled | None]]:
        """Consume: items go into the catalog; labeled records come back as (partition, offset, example
        or None when malformed and dead-lettered)."""
        out: list[tuple[int, int, Labeled | None]] = []
        for msg in self._consumer().consume(num_messages=2000, timeout=timeout):
            if msg.error() is not None:
                self._message_error(msg)
            elif msg.topic() == self.labeled_topic:
                try:
                    example: Labeled | None = Labeled.from_json(msg.value())
                except RecordError as exc:
                    self.dead_letter(msg, exc)
                    example = None
                out.append((msg.partition(), msg.offset(), example))
            elif msg.topic() == self.items_topic:
                self._item(msg, catalog)
        if self.dead_letters is not None:
            self.dead_letters.poll(0)
        return out

    def _message_error(self, msg: Message) -> None:
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise TrainerServiceError(f"fatal consumer error: {err}")
        log.warning("consumer error on %s[%s]: %s", msg.topic(), msg.partition(), err)

    def _item(self, msg: Message, catalog: Catalog) -> None:
        if msg.error() is not None:
            self._message_error(msg)
            return
        self.metrics.items.inc()
        value = msg.value()
        if value is None:  # tombstone on the compacted topic: the item is gone
            key = msg.key()
            if key:
                catalog.remove(key.decode("utf-8", errors="replace"))
            return
        try:
            item = Item.from_json(value)
        except RecordError as exc:
            self.dead_letter(msg, exc)
            return
        catalog.upsert(item)
        self.metrics.catalog.set(len(catalog))

    # --- dead letters -----------------------------------------------------------------------
    def dead_letter(self, msg: Message, error: BaseException | str) -> None:
        log.warning("%s[%d]@%d -> dead-letters: %s", msg.topic(), msg.partition(), msg.offset(), error)
        self._send_dead(msg.topic(), msg.key(), dead_letter_of(msg, error).to_json())

    def dead_letter_example(self, partition: int, offset: int, example: Labeled, reason: str) -> None:
        """Dead-letter a valid example that cannot be trained (its item never came)."""
        log.warning("%s[%d]@%d -> dead-letters: %s", self.labeled_topic, partition, offset, reason)
        dl = dead_letter(source_topic=self.labeled_topic, partition=partition, offset=offset,
                         key=example.kafka_key(), value=example.to_json(), error=reason)
        self._send_dead(self.labeled_topic, example.kafka_key(), dl.to_json())

    def _send_dead(self, source_topic: str, key: bytes | None, value: bytes) -> None:
        assert self.dead_letters is not None
        if self.dead_letters.send(self.dead_topic, value, key) is not None:
            self.metrics.dead_letter_failures.inc()
        self.metrics.dead_lettered(source_topic)

    def flush_dead_letters(self) -> None:
        """Wait for the dead letters sent so far (before the offsets move past their records); report losses."""
        if self.dead_letters is None:
            return
        barrier = self.dead_letters.barrier(DEAD_LETTER_FLUSH_S)
        delivery_failures = [f for f in barrier.failures if not f.rejected]  # rejected ones: counted at send
        if delivery_failures or barrier.undelivered:
            self.metrics.dead_letter_failures.inc(len(delivery_failures))
            log.error("dead letters not delivered to %s: %s", self.dead_topic, barrier.describe())

    # --- offsets and flow -------------------------------------------------------------------
    def commit(self, offsets: dict[int, int]) -> None:
        """Commit the checkpointed offsets to the group (monitoring; the checkpoint is the truth)."""
        if self.consumer is None or not offsets:
            return
        tps = [TopicPartition(self.labeled_topic, p, o) for p, o in sorted(offsets.items())]
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            log.warning("committing offsets to group %s failed: %s", self.settings.group_id, exc)

    def lag(self, offsets: dict[int, int]) -> int:
        total = 0
        for p, off in offsets.items():
            try:
                _low, high = self._consumer().get_watermark_offsets(
                    TopicPartition(self.labeled_topic, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                total += max(0, high - off)
        return total

    def pause(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer().pause([TopicPartition(self.labeled_topic, p) for p in partitions])

    def resume(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer().resume([TopicPartition(self.labeled_topic, p) for p in partitions])

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the consumer: %s", exc)
            self.consumer = None
        if self.dead_letters is not None:
            barrier = self.dead_letters.close(10)
            if not barrier.ok:
                self.metrics.dead_letter_failures.inc(len([f for f in barrier.failures if not f.rejected]))
            self.dead_letters = None
