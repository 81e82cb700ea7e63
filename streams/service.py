"""The join worker's service: the partition cores, one batch at a time, outputs before state.

:class:`JoinService` runs inside the Faust app of :mod:`streams.app` (which
describes the per-batch protocol); it owns one :class:`~streams.join.JoinCore`
per assigned partition and composes the worker's parts: offset checks
(:mod:`streams.gaps`), decoding (:mod:`streams.decode`), durable delivery
(:mod:`streams.delivery`) and the state table (:mod:`streams.restore`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import faust

from contract.errors import RecordError
from contract.records import Click, Impression
from contract.settings import KafkaSettings
from contract.topics import CLICKS, DEAD_LETTERS, IMPRESSIONS, LABELED, USER_HISTORY
from infra.kafka import dead_letter
from streams.decode import decode_input
from streams.delivery import Delivery, Send
from streams.gaps import InputGaps
from streams.join import Example, HistoryUpdate, JoinCore, Output, Rejected
from streams.join_settings import JoinSettings
from streams.metrics import JoinMetrics
from streams.offsets import Verdict
from streams.restore import changelog_records, changelog_topic_name, drop_partition, restore_core

log = logging.getLogger(__name__)

_CORE_COUNTS = (
    "duplicate_impressions", "duplicate_clicks", "behind_impressions", "behind_clicks", "behind_early_clicks",
)  # fmt: skip
"""The core's counts (:attr:`streams.join.JoinCore.counts`) the metrics follow."""


class _Batch:
    """What one batch (or one idle tick) emits, and its counts for the metrics."""

    __slots__ = (
        "sends", "histories", "partitions", "seeks", "impressions", "clicks", "replayed", "stale",
        "positives", "negatives", "late", "orphans", "invalid", "malformed",
    )  # fmt: skip

    def __init__(self) -> None:
        self.sends: list[Send] = []
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
        *,
        delivery: Delivery | None = None,
    ) -> None:
        self.app = app
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
        self.delivery = delivery or Delivery(kafka, self.dead_letter_topic, metrics)
        self._lock = asyncio.Lock()
        self._rebalances_seen = 0
        self._duplicates_seen: dict[int, Counter[str]] = {}
        self._inputs = {
            self.impressions_topic: (IMPRESSIONS.name, Impression),
            self.clicks_topic: (CLICKS.name, Click),
        }
        self.gaps = InputGaps(
            lambda: self.app.consumer,
            {topic: stream for topic, (stream, _type) in self._inputs.items()},
            IMPRESSIONS.name,
            metrics,
        )
        self._max_skew_ms = join.max_future_skew_ms
        self._positives = metrics.labeled.labels(label="positive")
        self._negatives = metrics.labeled.labels(label="negative")
        self._impressions_in = metrics.events_in.labels(topic=IMPRESSIONS.name)
        self._clicks_in = metrics.events_in.labels(topic=CLICKS.name)
        self._dead_orphan = metrics.dead_letters.labels(reason="orphan")
        self._dead_invalid = metrics.dead_letters.labels(reason="invalid")
        self._dead_malformed = metrics.dead_letters.labels(reason="malformed")

    def close(self) -> None:
        self.delivery.close()

    # --- partitions --------------------------------------------------------------------------
    def core(self, partition: int) -> JoinCore:
        core = self.cores.get(partition)
        if core is None:
            core = self.cores[partition] = restore_core(self.table.data, partition, self.config)
            self._duplicates_seen[partition] = Counter(core.counts)
        return core

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == self.impressions_topic}
        async with self._lock:
            for p in partitions:
                if self.cores.pop(p, None) is not None:
                    log.info("partition %d revoked: join state dropped", p)
                self._duplicates_seen.pop(p, None)
                self.gaps.forget(p)
                drop_partition(self.table.data, p)
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

    def _touch_backlogged(self) -> None:
        for p, (impressions, clicks) in self.gaps.backlog(self.cores).items():
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
            self._touch_backlogged()
            batch = _Batch()
            handle = self._handle
            for event in events:
                handle(event.message, batch)
            await self._emit_and_persist(batch)
            await self.gaps.seek(batch.seeks)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _handle(self, msg: Any, batch: _Batch) -> None:
        partition = msg.partition
        stream, record_type = self._inputs[msg.topic]
        core = self.core(partition)
        verdict = self.gaps.check((msg.topic, partition), msg.offset, core.next_offset(stream), batch.seeks)
        if verdict is Verdict.STALE:  # fetched before a pending seek: the re-read brings it again
            batch.stale += 1
            return
        if verdict is Verdict.SEEK:
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
            record = decode_input(msg, record_type, self._max_skew_ms)
        except RecordError as exc:
            core.skip(stream, msg.offset)
            log.warning("dead-letter %s[%d]@%d: %s", msg.topic, partition, msg.offset, exc)
            dead = dead_letter(
                source_topic=msg.topic, partition=partition, offset=msg.offset,
                key=msg.key, value=msg.value, error=exc,
            )  # fmt: skip
            batch.sends.append((self.dead_letter_topic, msg.key, dead.to_json(), -1))
            batch.malformed += 1
            return
        if isinstance(record, Impression):
            outputs = core.on_impression(record, msg.offset)
        else:
            outputs = core.on_click(record, msg.offset)
        if outputs:
            self._route(outputs, partition, batch)

    def _route(self, outputs: list[Output], partition: int, batch: _Batch) -> None:
        labeled = self.labeled_topic
        sends = batch.sends
        for out in outputs:
            if type(out) is Example:
                sends.append((labeled, out.user_id.encode(), out.to_json(), -1))
                if out.label:
                    batch.positives += 1
                    batch.late += out.late
                else:
                    batch.negatives += 1
            elif type(out) is HistoryUpdate:
                batch.histories[out.user_id] = out
            else:
                self._dead_letter_click(out, partition, batch)

    def _dead_letter_click(self, rejected: Rejected, partition: int, batch: _Batch) -> None:
        click = rejected.click
        log.info("dead-letter %s[%d]@%d: %s", self.clicks_topic, partition, rejected.offset, rejected.reason)
        dead = dead_letter(
            source_topic=self.clicks_topic, partition=partition, offset=rejected.offset,
            key=click.user_id, value=click.to_json(), error=rejected.reason, ts=click.ts,
        )  # fmt: skip
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
            self.delivery.send_all(sends)
            await self.delivery.barrier("outputs")
        # Outputs are durable: now the state that says they were emitted.
        state: list[Send] = []
        for p, core in self.cores.items():
            changes = core.drain_changes_json()
            if changes:
                state += changelog_records(self.table.data, self.changelog_topic, p, changes)
        if state:
            self.delivery.send_all(state)
            await self.delivery.barrier("join state")
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
            for kind in _CORE_COUNTS:
                new = core.counts[kind] - seen[kind]
                if not new:
                    continue
                seen[kind] = core.counts[kind]
                name, _, what = kind.partition("_")
                if name == "duplicate":
                    m.duplicates.labels(kind=what).inc(new)
                else:
                    m.behind_watermark.labels(kind=what).inc(new)
                    log.warning(
                        "partition %d: %d %s arrived more than a window (%d ms) behind the watermark %d "
                        "(a backfill?): closed at once, their clicks become late positives",
                        p, new, what.replace("_", " "), self.config.window_ms, core.watermark,
                    )  # fmt: skip

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
            self._touch_backlogged()
            batch = _Batch()
            batch.partitions.update(owned)
            for p in sorted(owned):
                outputs = self.core(p).tick()
                if outputs:
                    self._route(outputs, p, batch)
            await self._emit_and_persist(batch)
            await self.gaps.seek(self.gaps.due_seeks(self.cores, owned))
