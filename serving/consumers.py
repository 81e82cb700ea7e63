"""The agent's two Kafka consumers: the state topics (by assignment) and ``rec-requests`` (as a group member).

Client choice: **confluent-kafka with threads**, not aiokafka.  librdkafka
fetches, batches and sends in its own C threads and releases the GIL while
it waits, so the Python threads only decode, score and encode; aiokafka
would run the Kafka protocol itself in Python on the same event loop (and
core) as the decoding, and inference would still need an executor.  On two
cores the difference decides whether 2,000 requests/s fit.

:class:`StateReader` reads ``items``, ``user-history`` and ``model-updates``
by *assignment* from the beginning (not as a group member: every agent needs
all of them): :meth:`StateReader.rebuild` reads them up to the end offsets
taken at start-up (:func:`infra.kafka.read_to_end`), then
:meth:`StateReader.tail` keeps following them.  A malformed state record is
logged, counted and dead-lettered while tailing (not while re-reading
history at start-up, which earlier runs already reported).

:class:`RequestLoop` is a member of the ``group_id`` consumer group on
``rec-requests`` (cooperative-sticky, so agents share the partitions and
join/leave without stopping the others).  It only fetches and decodes: each
request goes to the scorer's queue, a malformed one to ``dead-letters``; it
never waits on inference (past ``max_queued`` requests it pauses fetching but
keeps polling).  Offsets are stored only once the answer of that request
*and every earlier one in its partition* is acknowledged
(:class:`~serving.state.OffsetLedger`), and committed by librdkafka's
auto-commit, on revocation and at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from contract.errors import RecordError, StreamrecError
from contract.records import ModelUpdate, RecRequest
from contract.settings import KafkaSettings
from infra.kafka import TopicMissing, read_to_end
from serving.answers import Outbox
from serving.metrics import ServingMetrics
from serving.settings import ServingSettings
from serving.state import OffsetLedger, Pending, RequestQueue, StateRecords

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")


class AgentError(StreamrecError):
    """The agent cannot start or had to stop (a missing topic, a fatal Kafka error)."""


def raise_if_fatal(err: KafkaError, where: str) -> None:
    """A fatal client error stops the agent (AgentError); any other is logged."""
    if err.fatal():
        raise AgentError(f"fatal Kafka error on {where}: {err}")
    log.warning("Kafka error on %s: %s", where, err)


# --------------------------------------------------------------------------- state topics
class StateReader:
    """Rebuilds the state from the compacted topics, then follows them (see the module doc)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ServingSettings,
        *,
        records: StateRecords,
        outbox: Outbox,
        announce: Callable[[ModelUpdate], None],
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.records = records
        self.outbox = outbox
        self.announce = announce
        self.live = False  # tailing past the start-up end offsets: malformed records are dead-lettered
        self._consumer: Consumer | None = None

    def rebuild(self, stop: threading.Event) -> ModelUpdate | None:
        """Read the state topics up to their current end; return the newest announced version."""
        self._consumer = consumer = Consumer(self.kafka.confluent_config(**{
            "group.id": f"{self.settings.group_id}-state-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            "logger": _rdkafka_log,
        }))  # fmt: skip
        latest: ModelUpdate | None = None
        model_name = self.settings.model_name

        def handle(msg: Message) -> None:
            nonlocal latest
            update = self.handle(msg)
            if update is not None and update.model == model_name and (latest is None or update.version > latest.version):
                latest = update

        timeout = self.settings.startup_timeout_s
        try:
            read = read_to_end(consumer, self.records.topics.state, handle, timeout_s=timeout, stop=stop)
        except TopicMissing as exc:
            raise AgentError(str(exc)) from None
        if not read.complete:
            log.warning("start-up: state topics not read to the end within %.0f s; serving anyway", timeout)
        users = self.records.users
        log.info(
            "start-up: read %d state records in %.1f s: %d items, %d users, %d clicks, newest announced version %s",
            read.records, read.seconds, len(self.records.catalog), len(users), users.popularity.clicks,
            latest.version if latest else None,
        )  # fmt: skip
        return latest

    def tail(self, stop: threading.Event) -> None:
        """Follow the state topics from where :meth:`rebuild` stopped; closes the consumer at the end."""
        consumer = self._consumer
        assert consumer is not None, "rebuild() first"
        self.live = True
        try:
            while not stop.is_set():
                first = consumer.poll(0.2)  # returns on the first record: a new item is applied at once
                if first is None:
                    continue
                for msg in [first, *consumer.consume(num_messages=1000, timeout=0)]:
                    update = self.handle(msg)
                    if update is not None:
                        self.announce(update)
        finally:
            self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def handle(self, msg: Message) -> ModelUpdate | None:
        """Apply one state record; return it when it is a model update."""
        err = msg.error()
        if err is not None:
            raise_if_fatal(err, "state topics")
            return None
        try:
            return self.records.apply(msg)
        except RecordError as exc:
            log.warning("invalid record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            if self.live:
                self.outbox.dead_letter_input(msg, exc, "invalid_state_record", tracked=False)
        return None


# --------------------------------------------------------------------------- requests
class RequestLoop:
    """The ``rec-requests`` group member: fetch, decode, queue; store offsets the ledger allows."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ServingSettings,
        *,
        topic: str,
        queue: RequestQueue,
        ledger: OffsetLedger,
        outbox: Outbox,
        metrics: ServingMetrics,
        on_assigned: Callable[[], None],
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.topic = topic
        self.queue = queue
        self.ledger = ledger
        self.outbox = outbox
        self.metrics = metrics
        self.on_assigned = on_assigned
        self.assigned: set[int] = set()  # rec-requests partitions this agent owns now
        self._paused = False
        self._revoked_in_fetch: set[int] = set()  # partitions revoked during the current fetch

    def run(self, stop: threading.Event, drain: Callable[[], None]) -> None:
        """Fetch until ``stop``; then ``drain()`` (every queued request answered) and commit."""
        s = self.settings
        consumer: Consumer | None = None
        try:
            consumer = Consumer(self.kafka.confluent_config(**{
                "group.id": s.group_id,
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
                "auto.commit.interval.ms": 1000,
                "auto.offset.reset": s.request_offset_reset,
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.partition.eof": False,
                "logger": _rdkafka_log,
            }))  # fmt: skip
            consumer.subscribe(
                [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            while not stop.is_set():
                self._fetch(consumer)
        finally:
            drain()  # the scorer finishes what was queued; then every answer is acknowledged
            if consumer is not None:
                self._close(consumer)

    def _fetch(self, consumer: Consumer) -> None:
        self._backpressure(consumer)
        msg = consumer.poll(0.1)
        if msg is not None:
            msgs = [msg]
            if self.settings.max_batch > 1:
                self._revoked_in_fetch.clear()
                msgs += consumer.consume(num_messages=self.settings.max_batch - 1, timeout=0)
                if msg.partition() in self._revoked_in_fetch:
                    # Revoked (and committed below msg) by a rebalance inside consume():
                    # its new owner, or this agent after a re-assignment, reads it again.
                    log.info("dropping %s[%d]@%d: partition revoked while fetching",
                             msg.topic(), msg.partition(), msg.offset())  # fmt: skip
                    msgs.pop(0)
            self._accept(msgs)
        self._store_offsets(consumer)

    def _close(self, consumer: Consumer) -> None:
        self._store_offsets(consumer)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed: %s", exc)
        consumer.close()

    def _accept(self, msgs: list[Message]) -> None:
        arrived = time.perf_counter()
        accepted: list[Pending] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                raise_if_fatal(err, self.topic)
                continue
            part, off = msg.partition(), msg.offset()
            self.ledger.track(part, off)
            try:
                request = RecRequest.from_json(msg.value())
            except RecordError as exc:
                log.info("dead-lettering %s[%d]@%d: %s", msg.topic(), part, off, exc)
                self.outbox.dead_letter_input(msg, exc, "invalid_request", tracked=True)
                continue
            accepted.append(Pending(request, arrived, part, off))
        if accepted:
            self.queue.put(accepted)

    def _backpressure(self, consumer: Consumer) -> None:
        queued, most = len(self.queue), self.settings.max_queued
        if not self._paused and queued >= most:
            consumer.pause(consumer.assignment())
            self._paused = True
            log.warning("%d requests queued: fetching paused", queued)
        elif self._paused and queued <= most // 2:
            consumer.resume(consumer.assignment())
            self._paused = False
            log.info("fetching resumed")

    def _store_offsets(self, consumer: Consumer) -> None:
        ready = self.ledger.committable()
        if not ready:
            return
        try:
            consumer.store_offsets(offsets=[TopicPartition(self.topic, p, o) for p, o in ready.items()])
        except KafkaException as exc:  # a partition revoked meanwhile
            log.debug("store_offsets: %s", exc)

    # --- rebalance callbacks (run inside poll/consume, on this loop's thread) ----------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._set_assigned(self.assigned | {tp.partition for tp in partitions})
        log.info("assigned %s (now %s)", sorted(tp.partition for tp in partitions), sorted(self.assigned))
        if self._paused and partitions:
            consumer.pause(partitions)
        self.on_assigned()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let the scorer finish the revoked partitions' requests, then commit them."""
        parts = {tp.partition for tp in partitions}
        log.info("revoked %s", sorted(parts))
        self.queue.wake()
        deadline = time.monotonic() + 30.0
        while self.ledger.in_flight(parts) and time.monotonic() < deadline:
            self.outbox.flush(0.1)
        self._store_offsets(consumer)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            log.debug("commit on revoke: %s", exc)
        self._forget(parts)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = {tp.partition for tp in partitions}
        log.warning("lost partitions %s (their requests may be answered twice)", sorted(parts))
        self._forget(parts)

    def _forget(self, parts: set[int]) -> None:
        self.ledger.forget(parts)
        self._revoked_in_fetch |= parts
        self._set_assigned(self.assigned - parts)

    def _set_assigned(self, partitions: set[int]) -> None:
        self.assigned = partitions
        self.metrics.assigned_partitions.set(len(partitions))
