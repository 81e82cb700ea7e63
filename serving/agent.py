"""The scoring agent: a thin Kafka loop around :mod:`serving.scoring` and :mod:`serving.loader`.

Client choice: **confluent-kafka with threads**, not aiokafka.  librdkafka
fetches, batches and sends in its own C threads and releases the GIL while
it waits, so the Python threads only decode, score and encode; aiokafka
would run the Kafka protocol itself in Python on the same event loop (and
core) as the decoding, and inference would still need an executor.  On two
cores the difference decides whether 2,000 requests/s fit.

Threads (all daemons; :meth:`ServingAgent.stop` ends them in order):

* **state** — reads ``items``, ``user-history`` and ``model-updates`` by
  *assignment* from the beginning (not as a group member: every agent needs
  all of them).  :meth:`ServingAgent.start` first reads them up to the end
  offsets taken at start-up (the catalog, each user's recent history, the
  popularity of recent clicks, the newest announced version), then this
  thread keeps tailing them.
* **loader** — :class:`~serving.loader.ModelLoader`: loads announced
  versions and computes item vectors in the background, then swaps one
  reference.
* **requests** — a member of the ``group_id`` consumer group on
  ``rec-requests`` (cooperative-sticky, so agents share the partitions and
  join/leave without stopping the others).  It only fetches and decodes:
  each request goes to the scorer's queue, a malformed one to
  ``dead-letters``; it never waits on inference (past ``max_queued``
  requests it pauses fetching but keeps polling).
* **scorer** — takes everything queued (up to ``max_batch``: a micro-batch
  is whatever arrived while the previous one was scored, so a lone request
  waits for nobody), reads the live snapshot once, scores the batch with
  one user-tower call and one matrix product against cached item vectors,
  and produces the recommendations.

Offsets of ``rec-requests`` are stored only once the recommendation (or
dead letter) of that request *and every earlier one in its partition* is
acknowledged by the broker (at-least-once; ``request_id`` identifies
duplicates), and committed by librdkafka's auto-commit, on revocation and
at shutdown.

Malformed inputs: a request that does not decode goes to ``dead-letters``
with the reason; a malformed record on the state topics is logged,
counted and dead-lettered while tailing (not while re-reading history at
start-up, which earlier runs already reported).  Unknown candidate ids are
skipped and counted; a request with none known gets the popularity
fallback over the whole catalog.  The agent keeps running in every case.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from contract.errors import ConfigError, RecordError, StreamrecError
from contract.records import DeadLetter, Item, ModelUpdate, Recommendation, RecRequest, UserHistory
from contract.settings import KafkaSettings
from contract.topics import (
    DEAD_LETTERS,
    ITEMS,
    MODEL_UPDATES,
    REC_REQUESTS,
    RECOMMENDATIONS,
    USER_HISTORY,
)
from serving.loader import CatalogState, ModelHolder, ModelLoader, fallback_snapshot
from serving.metrics import ServingMetrics
from serving.scoring import ExplorePolicy, Query, Scored, Scorer, appended_items
from serving.settings import FALLBACK_VERSION, ServingSettings, check_runtime
from trainer.popularity import Popularity
from trainer.weights import WeightStore

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")


class AgentError(StreamrecError):
    """The agent cannot start or had to stop (a missing topic, a fatal Kafka error)."""


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- offsets
class OffsetLedger:
    """In-flight input offsets per partition; the committable offset is the first unfinished one.

    ``track`` offsets in fetch order (ascending per partition), ``done`` them
    in any order; :meth:`committable` gives, per partition that advanced,
    the offset to store (one past the longest finished prefix).  O(1)
    amortised per offset; thread-safe.
    """

    def __init__(self) -> None:
        self._order: dict[int, deque[int]] = {}
        self._done: dict[int, set[int]] = {}
        self._next: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    def track(self, partition: int, offset: int) -> None:
        with self._lock:
            if partition not in self._order:
                self._order[partition], self._done[partition] = deque(), set()
            self._order[partition].append(offset)

    def done(self, partition: int, offset: int) -> None:
        with self._lock:
            order = self._order.get(partition)
            if order is None:
                return  # partition revoked meanwhile
            finished = self._done[partition]
            finished.add(offset)
            advanced = None
            while order and order[0] in finished:
                advanced = order.popleft()
                finished.discard(advanced)
            if advanced is not None:
                self._next[partition] = advanced + 1
                self._dirty.add(partition)

    def committable(self) -> dict[int, int]:
        """Partitions whose committable offset advanced since the last call, with that offset."""
        with self._lock:
            out = {p: self._next[p] for p in self._dirty}
            self._dirty.clear()
            return out

    def in_flight(self, partitions: set[int] | None = None) -> int:
        with self._lock:
            return sum(
                len(order) - len(self._done[p])
                for p, order in self._order.items()
                if partitions is None or p in partitions
            )

    def forget(self, partitions: set[int]) -> None:
        with self._lock:
            for p in partitions:
                self._order.pop(p, None)
                self._done.pop(p, None)
                self._next.pop(p, None)
                self._dirty.discard(p)


# --------------------------------------------------------------------------- user state
class UserState:
    """Each user's recent history (most recent last) and the popularity of recent clicks."""

    def __init__(self, history_len: int, popularity: Popularity) -> None:
        self.history_len = history_len
        self.popularity = popularity
        self._histories: dict[str, tuple[str, ...]] = {}

    def apply(self, record: UserHistory) -> int:
        """Replace a user's history; the items newly appended count as clicks. Return how many."""
        old = self._histories.get(record.user_id, ())
        clicks = appended_items(old, record.items, self.history_len)
        self._histories[record.user_id] = tuple(record.items[-self.history_len :])
        return self.popularity.add(clicks, record.ts)

    def remove(self, user_id: str) -> None:
        self._histories.pop(user_id, None)

    def history(self, user_id: str) -> tuple[str, ...]:
        return self._histories.get(user_id, ())

    def __len__(self) -> int:
        return len(self._histories)


@dataclass(slots=True)
class _Pending:
    request: RecRequest
    arrived: float
    partition: int
    offset: int


# --------------------------------------------------------------------------- the agent
class ServingAgent:
    """Scores rec-requests with the live model and hot-swaps versions (see the module doc).

    ``start()`` rebuilds the state, loads the newest valid version and joins
    the group, returning once requests are being consumed; ``stop()`` drains
    the queue, flushes, commits and closes.  Everything runs in background
    threads, so a test can run an agent in-process.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ServingSettings,
        *,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.device = check_runtime(settings)
        self.metrics = metrics or ServingMetrics()
        self.store = WeightStore(settings.weights_root)
        self.catalog = CatalogState()
        self.popularity = Popularity(settings.popularity_half_life_s)
        self.users = UserState(settings.history_len, self.popularity)
        self.holder = ModelHolder(fallback_snapshot(FALLBACK_VERSION, []))
        self.loader = ModelLoader(
            holder=self.holder,
            catalog=self.catalog,
            store=self.store,
            metrics=self.metrics,
            model_name=settings.model_name,
            device=self.device,
            encode_batch=settings.encode_batch,
            prefix_cache_items=settings.prefix_cache_items,
            nice=settings.loader_nice,
            fallback_version=FALLBACK_VERSION,
        )
        self.scorer = Scorer(
            self.popularity,
            fallback_version=FALLBACK_VERSION,
            history_len=settings.history_len,
            trending=settings.trending_items,
            blend=settings.cold_start_blend,
            policy=ExplorePolicy(
                kind=settings.explore,
                epsilon=settings.explore_epsilon,
                temperature=settings.explore_temperature,
                pool=settings.explore_pool,
                seed=settings.explore_seed,
            ),
            refresh_s=settings.popularity_refresh_s,
        )
        self.ledger = OffsetLedger()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._queue: deque[_Pending] = deque()
        self._queued = threading.Condition()
        self._fetching_done = threading.Event()
        self._paused = False
        self._assigned: set[int] = set()  # rec-requests partitions this agent owns now
        self._revoked_in_fetch: set[int] = set()  # partitions revoked during the current fetch
        self._threads: list[threading.Thread] = []
        self._producer: Producer | None = None
        self._state_consumer: Consumer | None = None
        self._live = False  # state tailing past the start-up end offsets
        self._topics = {
            "items": ITEMS.real_name(kafka),
            "history": USER_HISTORY.real_name(kafka),
            "updates": MODEL_UPDATES.real_name(kafka),
            "requests": REC_REQUESTS.real_name(kafka),
            "recommendations": RECOMMENDATIONS.real_name(kafka),
            "dead": DEAD_LETTERS.real_name(kafka),
        }
        self._torch_threads: int | None = None

    # --- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> ServingAgent:
        """Rebuild state, load a model, start the threads; return once the group assigned partitions."""
        started = time.monotonic()
        s = self.settings
        if s.metrics_port:
            try:
                self.metrics.serve(s.metrics_port)
            except OSError as exc:
                raise ConfigError("STREAMREC_SERVING_METRICS_PORT", f"cannot listen on {s.metrics_port}: {exc}") from None
        if s.torch_threads:
            import torch

            self._torch_threads = torch.get_num_threads()  # restored by stop()
            torch.set_num_threads(s.torch_threads)
        self._producer = Producer(self.kafka.producer_config(**{"linger.ms": s.linger_ms, "logger": _rdkafka_log}))
        try:
            latest = self._rebuild()
            self.loader.load_initial(latest)
        except BaseException:
            if self._state_consumer is not None:
                self._state_consumer.close()
            self.stop()
            raise
        self._live = True
        self.loader.start()
        self._spawn("serving-state", self._state_loop)
        self._spawn("serving-scorer", self._score_loop)
        self._spawn("serving-requests", self._request_loop)
        left = (timeout or s.startup_timeout_s) - (time.monotonic() - started)
        if not self.ready.wait(max(left, 1.0)):
            self.stop()
            raise AgentError(f"not assigned to the {self._topics['requests']} group within the start-up timeout")
        if self.error is not None:
            self.stop()
            raise AgentError(f"agent failed while starting: {self.error}") from self.error
        log.info(
            "serving %s: %d items, %d users, model %s; ready in %.1f s",
            self._topics["requests"], len(self.catalog), len(self.users), self.holder.current.version,
            time.monotonic() - started,
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued requests, flush, commit, close.  Idempotent."""
        self._stop.set()
        with self._queued:
            self._queued.notify_all()
        for t in reversed(self._threads):
            t.join(timeout)
        self._threads.clear()
        self.loader.stop(timeout)
        if self._producer is not None:
            self._producer.flush(timeout)
            self._producer = None
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the agent stops (True) or ``timeout`` passes (False)."""
        return self._stop.wait(timeout)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a dead thread must stop the agent, not hang it
                log.exception("%s thread failed; stopping the agent", name)
                self.error = exc
                self._stop.set()
                self.ready.set()

        t = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # --- state topics ------------------------------------------------------------------------
    def _rebuild(self) -> ModelUpdate | None:
        """Read the state topics up to their current end; return the newest announced version."""
        conf = self.kafka.confluent_config(**{
            "group.id": f"{self.settings.group_id}-state-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            "logger": _rdkafka_log,
        })  # fmt: skip
        consumer = Consumer(conf)
        self._state_consumer = consumer
        timeout = self.settings.startup_timeout_s
        parts: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        for key in ("items", "history", "updates"):
            topic = self._topics[key]
            md = consumer.list_topics(topic, timeout=timeout)
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                reason = meta.error if meta is not None else "not in the metadata"
                raise AgentError(f"topic {topic} is not usable: {reason} (create the topics first)")
            for p in sorted(meta.partitions):
                lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                parts.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                if hi > lo:
                    ends[(topic, p)] = hi
        consumer.assign(parts)
        latest: ModelUpdate | None = None
        count = 0
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5000, timeout=0.2):
                update = self._handle_state(msg)
                count += 1
                if update is not None and update.model == self.settings.model_name and (
                    latest is None or update.version > latest.version
                ):
                    latest = update
            if ends:
                positions = consumer.position([TopicPartition(t, p) for t, p in ends])
                for tp in positions:
                    if tp.offset >= 0 and tp.offset >= ends[(tp.topic, tp.partition)]:
                        del ends[(tp.topic, tp.partition)]
        if ends:
            log.warning(
                "start-up: %d state partition(s) not read to the end within %.0f s; serving anyway",
                len(ends), timeout,
            )
        log.info(
            "start-up: read %d state records: %d items, %d users, %d clicks, newest announced version %s",
            count, len(self.catalog), len(self.users), self.popularity.clicks,
            latest.version if latest else None,
        )
        return latest

    def _state_loop(self) -> None:
        consumer = self._state_consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                first = consumer.poll(0.2)  # returns on the first record: a new item is applied at once
                if first is None:
                    continue
                for msg in [first, *consumer.consume(num_messages=1000, timeout=0)]:
                    update = self._handle_state(msg)
                    if update is not None:
                        self.loader.announce(update)
        finally:
            consumer.close()

    def _handle_state(self, msg: Message) -> ModelUpdate | None:
        """Apply one state record; return it when it is a model update."""
        err = msg.error()
        if err is not None:
            self._kafka_error(err, "state topics")
            return None
        topic, value = msg.topic(), msg.value()
        try:
            if topic == self._topics["items"]:
                if value is None:
                    self.catalog.remove(_key(msg))
                else:
                    self.catalog.upsert(Item.from_json(value))
            elif topic == self._topics["history"]:
                if value is None:
                    self.users.remove(_key(msg))
                else:
                    self.users.apply(UserHistory.from_json(value))
            elif topic == self._topics["updates"] and value is not None:
                return ModelUpdate.from_json(value)
        except RecordError as exc:
            where = f"{topic}[{msg.partition()}]@{msg.offset()}"
            log.warning("invalid record at %s: %s", where, exc)
            if self._live:
                self._dead_letter(msg, exc, "invalid_state_record")
        return None

    # --- requests --------------------------------------------------------------------------------
    def _request_loop(self) -> None:
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
                [self._topics["requests"]],
                on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
            )
            while not self._stop.is_set():
                self._backpressure(consumer)
                msg = consumer.poll(0.1)
                if msg is not None:
                    msgs = [msg]
                    if s.max_batch > 1:
                        self._revoked_in_fetch.clear()
                        msgs += consumer.consume(num_messages=s.max_batch - 1, timeout=0)
                        if msg.partition() in self._revoked_in_fetch:
                            # Revoked (and committed below msg) by a rebalance inside consume():
                            # its new owner, or this agent after a re-assignment, reads it again.
                            log.info("dropping %s[%d]@%d: partition revoked while fetching",
                                     msg.topic(), msg.partition(), msg.offset())  # fmt: skip
                            msgs.pop(0)
                    self._accept(msgs)
                self._store_offsets(consumer)
        finally:
            # The scorer finishes what was queued; then every answer is acknowledged and committed.
            self._fetching_done.set()
            with self._queued:
                self._queued.notify_all()
            for t in self._threads:
                if t.name == "serving-scorer":
                    t.join(60.0)
            if self._producer is not None:
                self._producer.flush(30.0)
            if consumer is not None:
                self._close_requests(consumer)

    def _close_requests(self, consumer: Consumer) -> None:
        self._store_offsets(consumer)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed: %s", exc)
        consumer.close()

    def _accept(self, msgs: list[Message]) -> None:
        arrived = time.perf_counter()
        accepted: list[_Pending] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._kafka_error(err, self._topics["requests"])
                continue
            part, off = msg.partition(), msg.offset()
            self.ledger.track(part, off)
            try:
                request = RecRequest.from_json(msg.value())
            except RecordError as exc:
                log.info("dead-lettering %s[%d]@%d: %s", msg.topic(), part, off, exc)
                self._dead_letter(msg, exc, "invalid_request", ledger=True)
                continue
            accepted.append(_Pending(request, arrived, part, off))
        if accepted:
            with self._queued:
                self._queue.extend(accepted)
                self._queued.notify()

    def _backpressure(self, consumer: Consumer) -> None:
        queued = len(self._queue)
        if not self._paused and queued >= self.settings.max_queued:
            consumer.pause(consumer.assignment())
            self._paused = True
            log.warning("%d requests queued: fetching paused", queued)
        elif self._paused and queued <= self.settings.max_queued // 2:
            consumer.resume(consumer.assignment())
            self._paused = False
            log.info("fetching resumed")

    def _store_offsets(self, consumer: Consumer) -> None:
        ready = self.ledger.committable()
        if not ready:
            return
        topic = self._topics["requests"]
        try:
            consumer.store_offsets(offsets=[TopicPartition(topic, p, o) for p, o in ready.items()])
        except KafkaException as exc:  # a partition revoked meanwhile
            log.debug("store_offsets: %s", exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._set_assigned(self._assigned | {tp.partition for tp in partitions})
        log.info("assigned %s (now %s)", sorted(tp.partition for tp in partitions), sorted(self._assigned))
        if self._paused and partitions:
            consumer.pause(partitions)
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let the scorer finish the revoked partitions' requests, then commit them."""
        parts = {tp.partition for tp in partitions}
        log.info("revoked %s", sorted(parts))
        with self._queued:
            self._queued.notify_all()
        deadline = time.monotonic() + 30.0
        while self.ledger.in_flight(parts) and time.monotonic() < deadline:
            if self._producer is not None:
                self._producer.flush(0.1)
        self._store_offsets(consumer)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            log.debug("commit on revoke: %s", exc)
        self.ledger.forget(parts)
        self._revoked_in_fetch |= parts
        self._set_assigned(self._assigned - parts)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = {tp.partition for tp in partitions}
        log.warning("lost partitions %s (their requests may be answered twice)", sorted(parts))
        self.ledger.forget(parts)
        self._revoked_in_fetch |= parts
        self._set_assigned(self._assigned - parts)

    def _set_assigned(self, partitions: set[int]) -> None:
        self._assigned = partitions
        self.metrics.assigned_partitions.set(len(partitions))

    # --- scoring -------------------------------------------------------------------------------
    def _take(self) -> list[_Pending]:
        with self._queued:
            if not self._queue:
                self._queued.wait(0.05)
            n = min(len(self._queue), self.settings.max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _score_loop(self) -> None:
        producer = self._producer
        assert producer is not None
        while True:
            batch = self._take()
            producer.poll(0)
            if not batch:
                if self._fetching_done.is_set():
                    return
                continue
            self._score(batch, producer)

    def _score(self, batch: list[_Pending], producer: Producer) -> None:
        sm = self.holder.current  # one read: the whole batch is scored by this snapshot
        self.metrics.batch_size.observe(len(batch))
        users = self.users
        queries = [Query(p.request, users.history(p.request.user_id)) for p in batch]
        try:
            results: list[Scored] = self.scorer.score(sm, queries)
        except Exception as exc:  # a scoring bug must not lose requests silently
            log.exception("scoring a batch of %d failed under model %s", len(batch), sm.version)
            for p in batch:
                self._dead_letter_request(p, f"scoring failed under model {sm.version}: {exc}")
            return
        topic = self._topics["recommendations"]
        ts = now_ms()
        m = self.metrics
        for p, r in zip(batch, results, strict=True):
            rec = Recommendation(
                request_id=r.request.request_id,
                user_id=r.request.user_id,
                items=r.items,
                model_version=r.model_version,
                ts=ts,
            )
            self._produce(producer, topic, rec.kafka_key(), rec.to_json(), p.partition, p.offset)
            m.requests.labels(path=r.path).inc()
            if r.unknown_candidates:
                m.unknown_candidates.inc(r.unknown_candidates)
        done = time.perf_counter()
        for p in batch:
            m.latency.observe(done - p.arrived)
        producer.poll(0)

    # --- producing --------------------------------------------------------------------------------
    def _produce(self, producer: Producer, topic: str, key: bytes, value: bytes, part: int, off: int) -> None:
        ledger = self.ledger

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                log.error("could not deliver to %s (input %d@%d): %s", topic, part, off, err)
                self.metrics.produce_errors.inc()
            ledger.done(part, off)

        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=delivered)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.05)

    def _dead_letter(self, msg: Message, error: BaseException | str, reason: str, *, ledger: bool = False) -> None:
        dl = DeadLetter.of(
            source_topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            value=msg.value(),
            error=error if isinstance(error, BaseException) else RuntimeError(error),
            ts=now_ms(),
        )
        self.metrics.dead_letters.labels(reason=reason).inc()
        producer = self._producer
        assert producer is not None
        if ledger:
            self._produce(producer, self._topics["dead"], dl.kafka_key(), dl.to_json(), msg.partition(), msg.offset())
        else:
            producer.produce(self._topics["dead"], key=dl.kafka_key(), value=dl.to_json())

    def _dead_letter_request(self, p: _Pending, error: str) -> None:
        dl = DeadLetter.of(
            source_topic=self._topics["requests"],
            partition=p.partition,
            offset=p.offset,
            key=p.request.kafka_key(),
            value=p.request.to_json(),
            error=error,
            ts=now_ms(),
        )
        self.metrics.dead_letters.labels(reason="scoring_failed").inc()
        assert self._producer is not None
        self._produce(self._producer, self._topics["dead"], dl.kafka_key(), dl.to_json(), p.partition, p.offset)

    def _kafka_error(self, err: KafkaError, where: str) -> None:
        if err.fatal():
            raise AgentError(f"fatal Kafka error on {where}: {err}")
        log.warning("Kafka error on %s: %s", where, err)

    # --- introspection (tests, benchmarks) ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        sm = self.holder.current
        return {
            "model_version": sm.version,
            "items": len(sm),
            "catalog": len(self.catalog),
            "users": len(self.users),
            "queued": len(self._queue),
            "assigned": sorted(self._assigned),
            "refused": list(self.loader.refused),
        }


def _key(msg: Message) -> str:
    key = msg.key()
    return key.decode("utf-8", errors="replace") if key is not None else ""
