"""The Faust app around the pure join core: ``create_app(kafka_settings, join_settings)``.

One agent reads **both** input topics through one Faust topic description, so
the events of impressions[p] and clicks[p] reach one loop in arrival order.
Both topics have the same partition count, so Faust's assignor gives partition
``p`` of both (and of the state changelog) to the same worker; that worker
owns one :class:`~streams.join.JoinCore` per partition.

Per batch (``stream.take_events``), in this order:

1. check each input's offset against the next offset the partition's state
   must apply (:mod:`streams.offsets`): below it, skip it (the state holds it:
   redelivered after a restart or a move); above it, a hole (Faust skipped and
   acknowledged events around a rebalance): seek the partition back to the
   state's offset and drop its events until the re-read arrives.  So the
   state's offsets, not the group's committed offsets, decide what is read:
   committed offsets may run ahead of the state (skipped events) or lag it;
2. decode each value with :mod:`contract.records` (values are consumed raw, so
   a malformed one reaches us instead of being dropped by Faust); a value
   that does not decode, whose message key is not its user_id, or whose
   event time is far after its Kafka timestamp
   (:func:`~streams.join.check_event_time`), goes to ``dead-letters`` with
   the reason (logged as ``topic[partition]@offset``);
3. feed the core of the event's partition;
4. produce the outputs (``labeled``, ``user-history`` coalesced per user,
   ``dead-letters`` for orphan and contradicting clicks) and **wait until the
   broker has them**;
5. write the state keys the batch changed to the changelog of the Faust table
   ``join-state`` (key ``"<partition>/<state key>"``, on changelog partition
   = input partition): upserts, then the watermark key ``w`` (which records
   the input offsets the state covers), then deletions; wait until the broker
   has them too;
6. seek the partitions with a hole back to their state's offset;
7. only then return, so Faust acks the batch and may commit its offsets.

So the changelog never holds state whose outputs are not durable, and the
state records which inputs it holds.  After a crash the restored state skips
the inputs it already holds (committed offsets lag the state, and the two
input topics commit independently: without the skip, a click replayed for an
impression the state already forgot would become an orphan, or a forgotten
impression replayed without its click would get a false negative).  Inputs
after the recorded offsets are processed again; their outputs may repeat,
with the same example_id.  What survives a crash of the changelog writes is
a prefix (idempotent producer, one partition): without ``w`` the batch is
redone over its own upserts (no-ops); with it, a lost deletion is redone
after the restore.

On assignment Faust recovers ``join-state`` from its changelog; the core of
a partition is rebuilt from the recovered keys on first use.  Events handed
over while the worker is still rebalancing are not applied (the state may be
incomplete); the offset check re-reads them.  On revocation the core and its
keys are dropped.  A partition whose consumer position passed the state's
offset while nothing of it arrived for a while (a hole at the end of the
input, which no later event reveals) is sought back too.  A timer advances
idle partitions by the wall clock.  A stream counts as idle only when nothing
of it is waiting to be read (the consumer's highwater is not past the state's
offset), never while rebalancing, and the idle clocks restart after a
rebalance: a pause in consuming never closes windows.

Outputs and state go through one confluent-kafka producer (idempotent,
murmur2 partitioner like Faust and Java): it is much cheaper per message than
Faust's producer path and its ``flush`` is a real delivery barrier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import KafkaError, Producer
from faust.types import TP

from contract.errors import RecordError, StreamrecError
from contract.records import Click, DeadLetter, Impression
from contract.settings import KafkaSettings, default_cache_dir
from contract.topics import CLICKS, DEAD_LETTERS, IMPRESSIONS, LABELED, USER_HISTORY
from streams.join import Example, HistoryUpdate, JoinCore, Rejected, check_event_time
from streams.join_settings import JoinSettings
from streams.metrics import JoinMetrics
from streams.offsets import GapGuard, Verdict

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

STATE_TABLE = "join-state"
FLUSH_TIMEOUT_S = 60.0
RESEEK_AFTER_S = 5.0
"""A seek back to a hole whose re-read has not started by then is repeated (the seek was lost)."""
END_HOLE_AFTER_S = 3.0
"""A partition whose position passed the state's offset with nothing delivered for this long is
sought back (the events were skipped and no later event reveals the hole)."""


class JoinWorkerError(StreamrecError):
    """The worker cannot make its outputs or state durable; it stops rather than lose work."""


def app_id(kafka: KafkaSettings, join: JoinSettings) -> str:
    """Consumer group id and changelog prefix: the topic prefix + ``STREAMREC_JOIN_APP_ID``."""
    return f"{kafka.topic_prefix}{join.app_id}"


def changelog_topic_name(kafka: KafkaSettings, join: JoinSettings) -> str:
    return f"{app_id(kafka, join)}-{STATE_TABLE}-changelog"


def state_key(partition: int, key: str) -> bytes:
    return f"{partition}/{key}".encode()


class _Batch:
    """What one batch (or one idle tick) emits, and its counts for the metrics."""

    __slots__ = (
        "sends", "histories", "partitions", "seeks", "impressions", "clicks", "replayed", "stale",
        "positives", "negatives", "late", "orphans", "invalid", "malformed",
    )  # fmt: skip

    def __init__(self) -> None:
        self.sends: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.histories: dict[str, HistoryUpdate] = {}  # the last update per user
        self.partitions: set[int] = set()
        self.seeks: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset to re-read from
        self.impressions = self.clicks = self.replayed = self.stale = 0
        self.positives = self.negatives = self.late = 0
        self.orphans = self.invalid = self.malformed = 0


class JoinService:
    """Owns the partition cores, the producer and the metrics of one worker."""

    def __init__(
        self,
        app: faust.App,
        kafka: KafkaSettings,
        join: JoinSettings,
        table: Any,
        metrics: JoinMetrics,
    ) -> None:
        self.app = app
        self.kafka = kafka
        self.join = join
        self.config = join.join_config()
        self.table = table
        self.metrics = metrics
        self.cores: dict[int, JoinCore] = {}
        self.impressions_topic = IMPRESSIONS.real_name(kafka)
        self.clicks_topic = CLICKS.real_name(kafka)
        self.labeled_topic = LABELED.real_name(kafka)
        self.history_topic = USER_HISTORY.real_name(kafka)
        self.dead_letter_topic = DEAD_LETTERS.real_name(kafka)
        self.changelog_topic = changelog_topic_name(kafka, join)
        self._lock = asyncio.Lock()
        self._producer: Producer | None = None
        self._delivery_errors: list[str] = []
        self._rebalances_seen = 0
        self._duplicates_seen: dict[int, Counter[str]] = {}
        self._stream_of = {self.impressions_topic: IMPRESSIONS.name, self.clicks_topic: CLICKS.name}
        self._gaps = GapGuard(RESEEK_AFTER_S)
        self._max_skew_ms = join.max_future_skew_ms
        self._last_delivery: dict[tuple[str, int], float] = {}  # monotonic time of the last event
        self._end_hole_position: dict[tuple[str, int], int] = {}  # position of a pending end hole
        self._no_hole_at: dict[tuple[str, int], int] = {}  # positions whose re-read brought nothing
        self._positives = metrics.labeled.labels(label="positive")
        self._negatives = metrics.labeled.labels(label="negative")
        self._impressions_in = metrics.events_in.labels(topic=IMPRESSIONS.name)
        self._clicks_in = metrics.events_in.labels(topic=CLICKS.name)
        self._dead_orphan = metrics.dead_letters.labels(reason="orphan")
        self._dead_invalid = metrics.dead_letters.labels(reason="invalid")
        self._dead_malformed = metrics.dead_letters.labels(reason="malformed")

    # --- the producer ----------------------------------------------------------------------
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(
                self.kafka.producer_config(
                    logger=_rdkafka_log,
                    on_delivery=self._on_delivery,
                    **{
                        "delivery.report.only.error": True,  # no Python callback per message
                        "linger.ms": 5,
                        "queue.buffering.max.messages": 1_000_000,
                    },
                )
            )
        return self._producer

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def _produce_all(self, messages: Iterable[tuple[str, bytes | None, bytes | None, int]]) -> None:
        produce = self.producer().produce
        for topic, key, value, partition in messages:
            while True:
                try:
                    produce(topic, value, key, partition)
                    break
                except BufferError:  # local queue full: serve delivery reports and retry
                    self.producer().poll(0.05)

    async def _flush(self, what: str) -> None:
        """Wait until the broker acknowledged everything produced so far; raise otherwise."""
        producer = self.producer()
        left = await asyncio.to_thread(producer.flush, FLUSH_TIMEOUT_S)
        if left or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            detail = "; ".join(errors[:5]) or f"{left} message(s) undelivered after {FLUSH_TIMEOUT_S:.0f} s"
            raise JoinWorkerError(f"could not deliver the {what}: {detail}")

    def close(self) -> None:
        if self._producer is not None:
            left = self._producer.flush(10)
            if left:
                log.warning("%d message(s) undelivered at shutdown (they will be redone)", left)
            self._producer = None

    # --- partitions --------------------------------------------------------------------------
    def core(self, partition: int) -> JoinCore:
        core = self.cores.get(partition)
        if core is None:
            prefix = f"{partition}/"
            state = []
            for key, value in self.table.data.items():
                k = key.decode() if isinstance(key, bytes) else str(key)
                if k.startswith(prefix):
                    state.append((k[len(prefix) :], json.loads(value) if isinstance(value, bytes) else value))
            core = self.cores[partition] = JoinCore.restore(self.config, state)
            self._duplicates_seen[partition] = Counter(core.counts)
            log.info(
                "partition %d: join state restored (%d impressions, %d early clicks, watermark %s)",
                partition,
                core.remembered_impressions,
                core.early_clicks,
                core.watermark if core.max_event_ts is not None else "none",
            )
        return core

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == self.impressions_topic}
        async with self._lock:
            for p in partitions:
                if self.cores.pop(p, None) is not None:
                    log.info("partition %d revoked: join state dropped", p)
                self._duplicates_seen.pop(p, None)
                for topic in (self.impressions_topic, self.clicks_topic):
                    self._last_delivery.pop((topic, p), None)
                    self._end_hole_position.pop((topic, p), None)
                    self._no_hole_at.pop((topic, p), None)
                self._gaps.forget([(self.impressions_topic, p), (self.clicks_topic, p)])
                prefix = f"{p}/".encode()
                store = self.table.data
                for key in [k for k in store if isinstance(k, bytes) and k.startswith(prefix)]:
                    store.pop(key, None)
                self.metrics.forget_partition(p)

    def _assigned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.impressions_topic}

    def _ready(self) -> bool:
        return not self.app.rebalancing and self.app.tables.recovery.completed.is_set()

    def _restart_idle_clocks_after_rebalance(self) -> None:
        count = self.app.rebalancing_count
        if count != self._rebalances_seen and not self.app.rebalancing:
            self._rebalances_seen = count
            for core in self.cores.values():
                core.touch()

    def _input_partitions(self) -> Iterator[tuple[Any, str, tuple[str, int], JoinCore | None]]:
        """``(tp, stream name, (topic, partition), core or None)`` of each assigned input partition."""
        for tp in self.app.consumer.assignment():
            stream = self._stream_of.get(tp.topic)
            if stream is not None:
                yield tp, stream, (tp.topic, tp.partition), self.cores.get(tp.partition)

    async def _backlog(self) -> dict[int, tuple[bool, bool]]:
        """Partitions whose impressions / clicks may have records waiting to be processed.

        A stream is idle only when there is nothing to read: one whose consumer
        lags (CPU starvation, a slow fetch, a fresh assignment not fetched yet)
        or that has a hole being re-read must not let the watermark run ahead.
        What was read is the state's next offset, not the consumer position (which
        passes events Faust skipped).  Unknown counts as waiting.
        """
        consumer = self.app.consumer
        waiting: dict[int, list[bool]] = {}
        for tp, stream, key, core in self._input_partitions():
            try:
                highwater = consumer.highwater(tp)
            except Exception as exc:  # mid-rebalance, fetch not started: no information
                log.debug("no highwater for %s: %r", tp, exc)
                highwater = None
            caught_up = (
                core is not None
                and highwater is not None
                and not self._gaps.pending(key)
                and (highwater <= core.next_offset(stream) or self._no_hole_at.get(key) == highwater)
            )
            if not caught_up:
                flags = waiting.setdefault(tp.partition, [False, False])
                flags[0 if stream == IMPRESSIONS.name else 1] = True
        return {p: (f[0], f[1]) for p, f in waiting.items()}

    async def _touch_backlogged(self) -> None:
        for p, (impressions, clicks) in (await self._backlog()).items():
            core = self.cores.get(p)
            if core is not None:
                core.touch(impressions, clicks)

    # --- processing -------------------------------------------------------------------------
    async def process(self, events: Sequence[Any]) -> None:
        """Join one batch of input events; return once outputs and state are durable."""
        started = time.perf_counter()
        async with self._lock:
            if self.app.rebalancing:
                # Events fetched around a rebalance; the state may not be recovered yet.  Not
                # applying them is safe: the offset check re-reads them once the worker is ready.
                self.metrics.deferred.inc(len(events))
                log.info("%d event(s) delivered while rebalancing: re-read after it", len(events))
                return
            self._restart_idle_clocks_after_rebalance()
            await self._touch_backlogged()
            batch = _Batch()
            handle = self._handle
            for event in events:
                handle(event.message, batch)
            await self._emit_and_persist(batch)
            await self._seek(batch.seeks)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _handle(self, msg: Any, batch: _Batch) -> None:
        partition, offset = msg.partition, msg.offset
        key = (msg.topic, partition)
        if msg.topic == self.impressions_topic:
            stream, record_type = IMPRESSIONS.name, Impression
        else:
            stream, record_type = CLICKS.name, Click  # type: ignore[assignment]
        core = self.core(partition)
        self._last_delivery[key] = time.monotonic()
        expected = core.next_offset(stream)
        verdict = self._gaps.check(key, offset, expected)
        if verdict is Verdict.STALE:  # fetched before a pending seek: the re-read brings it again
            batch.stale += 1
            return
        if verdict is Verdict.SEEK:
            if key in batch.seeks:
                pass  # sought back in this batch already
            elif self._gaps.confirming(key):
                log.info("%s[%d]: re-read starts at %d, not %d: seeking once more to confirm",
                         msg.topic, partition, offset, expected)  # fmt: skip
            else:
                log.warning(
                    "%s[%d]: offset %d delivered but the state expects %d: events were skipped "
                    "upstream; re-reading from %d",
                    msg.topic, partition, offset, expected, expected,
                )  # fmt: skip
                self.metrics.input_gaps.inc()
            batch.seeks[key] = expected
            return
        batch.partitions.add(partition)
        if record_type is Impression:
            batch.impressions += 1
        else:
            batch.clicks += 1
        if verdict is Verdict.REPLAYED:
            # redelivered after a restart or a move: the state holds it, its outputs went out
            batch.replayed += 1
            return
        try:
            record = record_type.from_json(msg.value)
            if msg.key != record.user_id.encode():
                raise RecordError(
                    record_type.__name__,
                    "<key>",
                    f"message key {msg.key!r} is not the user_id {record.user_id!r} (co-partitioning)",
                )
            if self._max_skew_ms:
                kafka_ts = msg.timestamp  # seconds (Faust); None when the record has none
                check_event_time(
                    record_type.__name__, record.ts, None if kafka_ts is None else round(kafka_ts * 1000),
                    self._max_skew_ms,
                )
        except RecordError as exc:
            core.skip(stream, msg.offset)
            log.warning("dead-letter %s[%d]@%d: %s", msg.topic, partition, msg.offset, exc)
            dead = DeadLetter.of(
                source_topic=msg.topic,
                partition=partition,
                offset=msg.offset,
                key=msg.key,
                value=msg.value,
                error=exc,
                ts=int(time.time() * 1000),
            )
            batch.sends.append((self.dead_letter_topic, msg.key, dead.to_json(), -1))
            batch.malformed += 1
            return
        if record_type is Impression:
            outputs = core.on_impression(record, msg.offset)  # type: ignore[arg-type]
        else:
            outputs = core.on_click(record, msg.offset)  # type: ignore[arg-type]
        if outputs:
            self._route(outputs, partition, batch)

    def _route(self, outputs: list[Any], partition: int, batch: _Batch) -> None:
        labeled = self.labeled_topic
        sends = batch.sends
        for out in outputs:
            kind = type(out)
            if kind is Example:
                sends.append((labeled, out.user_id.encode(), out.to_json(), -1))
                if out.label:
                    batch.positives += 1
                    batch.late += out.late
                else:
                    batch.negatives += 1
            elif kind is HistoryUpdate:
                batch.histories[out.user_id] = out
            else:
                self._dead_letter_click(out, partition, batch)

    def _dead_letter_click(self, rejected: Rejected, partition: int, batch: _Batch) -> None:
        click = rejected.click
        log.info(
            "dead-letter %s[%d]@%d: %s", self.clicks_topic, partition, rejected.offset, rejected.reason
        )
        dead = DeadLetter.of(
            source_topic=self.clicks_topic,
            partition=partition,
            offset=rejected.offset,
            key=click.user_id,
            value=click.to_json(),
            error=rejected.reason,
            ts=click.ts,
        )
        batch.sends.append((self.dead_letter_topic, click.user_id.encode(), dead.to_json(), -1))
        if rejected.orphan:
            batch.orphans += 1
        else:
            batch.invalid += 1

    async def _emit_and_persist(self, batch: _Batch) -> None:
        sends = batch.sends
        for user, hist in batch.histories.items():
            sends.append((self.history_topic, user.encode(), hist.to_json(), -1))
        if sends:
            self._produce_all(sends)
            await self._flush("outputs")
        # Outputs are durable: now the state that says they were emitted.
        state: list[tuple[str, bytes | None, bytes | None, int]] = []
        store = self.table.data
        topic = self.changelog_topic
        for p, core in self.cores.items():
            changes = core.drain_changes_json()
            if not changes:
                continue
            # Upserts, then the watermark key (with the input offsets the state covers), then
            # deletions.  The producer is idempotent, so what survives a crash is a prefix:
            # without "w" the batch is replayed over upserts only (each a no-op again);
            # with it, a lost deletion is redone after the restore.
            meta = changes.pop("w", None)
            items = [(k, v) for k, v in changes.items() if v is not None]
            if meta is not None:
                items.append(("w", meta))
            items += [(k, v) for k, v in changes.items() if v is None]
            for key, value in items:
                skey = state_key(p, key)
                if value is None:
                    store.pop(skey, None)
                    state.append((topic, skey, None, p))
                else:
                    store[skey] = value  # bytes; recovery stores the decoded JSON
                    state.append((topic, skey, value, p))
        if state:
            self._produce_all(state)
            await self._flush("join state")
        self._count(batch)
        self._update_gauges(batch.partitions)

    def _count(self, batch: _Batch) -> None:
        m = self.metrics
        for counter, n in (
            (self._impressions_in, batch.impressions),
            (self._clicks_in, batch.clicks),
            (self._positives, batch.positives),
            (self._negatives, batch.negatives),
            (m.late_positives, batch.late),
            (m.replayed, batch.replayed),
            (m.stale, batch.stale),
            (m.orphans, batch.orphans),
            (self._dead_orphan, batch.orphans),
            (self._dead_invalid, batch.invalid),
            (self._dead_malformed, batch.malformed),
            (m.history_updates, len(batch.histories)),
        ):
            if n:
                counter.inc(n)

    def _update_gauges(self, partitions: Iterable[int]) -> None:
        m = self.metrics
        for p in partitions:
            core = self.cores.get(p)
            if core is None:
                continue
            label = str(p)
            m.pending.labels(partition=label).set(core.open_impressions)
            m.remembered.labels(partition=label).set(core.remembered_impressions)
            m.early_clicks.labels(partition=label).set(core.early_clicks)
            newest = core.max_event_ts
            if newest is not None and core.watermark > -(2**61):
                m.watermark.labels(partition=label).set(core.watermark)
                m.watermark_lag.labels(partition=label).set(newest - core.watermark)
            seen = self._duplicates_seen.setdefault(p, Counter())
            for kind in ("duplicate_impressions", "duplicate_clicks"):
                new = core.counts[kind] - seen[kind]
                if new:
                    m.duplicates.labels(kind=kind.removeprefix("duplicate_")).inc(new)
                    seen[kind] = core.counts[kind]

    async def tick(self) -> None:
        """Advance every owned partition by the wall clock (idle streams close windows)."""
        if not self._ready() or self._lock.locked():
            return  # a batch is running: it advances its partitions itself; next tick for the rest
        async with self._lock:
            if not self._ready():
                return
            self._restart_idle_clocks_after_rebalance()
            owned = self._assigned_partitions()
            for p in sorted(owned):
                self.core(p)
            await self._touch_backlogged()
            batch = _Batch()
            batch.partitions.update(owned)
            for p in sorted(owned):
                outputs = self.core(p).tick()
                if outputs:
                    self._route(outputs, p, batch)
            await self._emit_and_persist(batch)
            due, abandoned = self._gaps.due()
            for key in abandoned:
                log.info("%s[%d]: nothing to re-read (transaction markers only)", *key)
                self._no_hole_at[key] = self._end_hole_position.pop(key, -1)
            seeks = dict(due)
            seeks.update(self._end_holes())
            await self._seek({k: v for k, v in seeks.items() if k[1] in owned})

    def _end_holes(self) -> dict[tuple[str, int], int]:
        """Input partitions with records past the state's offset (by the consumer's highwater)
        although nothing of them arrived for :data:`END_HOLE_AFTER_S`: their last events were
        skipped upstream.  No broker call: this runs under the lock, on every tick."""
        consumer = self.app.consumer
        now = time.monotonic()
        holes: dict[tuple[str, int], int] = {}
        for tp, stream, key, core in self._input_partitions():
            if core is None or self._gaps.pending(key):
                continue
            if now - self._last_delivery.setdefault(key, now) < END_HOLE_AFTER_S:
                continue
            expected = core.next_offset(stream)
            try:
                highwater = consumer.highwater(tp)
            except Exception as exc:  # mid-rebalance: no information
                log.debug("no highwater for %s: %r", tp, exc)
                continue
            if highwater is None or highwater <= expected or self._no_hole_at.get(key) == highwater:
                continue
            log.warning(
                "%s[%d]: records up to offset %d but the state expects %d and nothing arrived "
                "for %.0f s: events were skipped upstream; re-reading from %d",
                tp.topic, tp.partition, highwater - 1, expected, END_HOLE_AFTER_S, expected,
            )  # fmt: skip
            self._gaps.expect(key, expected, highwater - 1)
            self._end_hole_position[key] = highwater
            self._last_delivery[key] = now
            self.metrics.input_gaps.inc()
            holes[key] = expected
        return holes

    async def _seek(self, offsets: dict[Any, int]) -> None:
        """Move input partitions back to the offsets their state must apply next."""
        if not offsets:
            return
        try:
            await self.app.consumer.seek_wait({TP(t, p): o for (t, p), o in offsets.items()})
        except Exception as exc:  # revoked meanwhile, or a broker error: the guard seeks again
            log.warning("could not seek %s: %r (retrying)", offsets, exc)


def create_app(
    kafka_settings: KafkaSettings,
    join_settings: JoinSettings,
    *,
    metrics: JoinMetrics | None = None,
) -> faust.App:
    """Build the join worker's Faust app (nothing connects until the app starts).

    The :class:`JoinService` is reachable as ``app.join_service``.
    """
    kafka, join = kafka_settings, join_settings
    ident = app_id(kafka, join)
    datadir = Path(join.data_dir or default_cache_dir() / "join" / ident)
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    session = join.session_timeout_s
    app = faust.App(
        ident,
        broker=kafka.faust_broker(),
        broker_credentials=kafka.faust_credentials(),
        store="memory://",
        autodiscover=False,
        datadir=str(datadir),
        topic_partitions=join.partitions,
        topic_replication_factor=kafka.replication_factor,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session,
        broker_heartbeat_interval=max(1.0, session / 5),
        broker_commit_interval=join.commit_interval_s,
        stream_buffer_maxsize=max(4_096, 2 * join.batch_max),
        broker_max_poll_records=join.batch_max,
        web_enabled=bool(join.web_port),
        web_port=join.web_port or 6066,
    )
    inputs = app.topic(
        IMPRESSIONS.real_name(kafka),
        CLICKS.real_name(kafka),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    table = app.Table(
        STATE_TABLE,
        default=None,
        partitions=join.partitions,
        key_type=bytes,  # raw keys "<partition>/<state key>"; values are JSON
    )
    service = JoinService(app, kafka, join, table, metrics or JoinMetrics())
    app.join_service = service  # type: ignore[attr-defined]

    async def join_agent(stream: Any) -> None:
        async for events in stream.take_events(join.batch_max, within=join.batch_within_s):
            try:
                await service.process(events)
            except JoinWorkerError as exc:
                log.critical("%s; stopping the worker (the batch will be redone after a restart)", exc)
                await app.crash(exc)
                raise

    app.agent(inputs, name="join")(join_agent)

    async def idle_tick() -> None:
        try:
            await service.tick()
        except JoinWorkerError as exc:
            log.critical("%s; stopping the worker", exc)
            await app.crash(exc)

    app.timer(join.tick_interval_s(), name="join-idle-tick")(idle_tick)

    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        await service.on_partitions_revoked(revoked)

    app.on_partitions_revoked.connect(on_revoked, weak=False)

    async def on_shutdown(sender: Any, **kwargs: Any) -> None:
        service.close()

    app.on_before_shutdown.connect(on_shutdown, weak=False)
    return app
