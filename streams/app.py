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
2. decode each value (:mod:`streams.decode`; values are consumed raw, so a
   malformed one reaches us instead of being dropped by Faust); a value that
   does not decode, whose message key is not its user_id, or whose event time
   is far after its Kafka timestamp, goes to ``dead-letters`` with the reason
   (logged as ``topic[partition]@offset``);
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

Outputs and state go through one :class:`infra.kafka.KafkaProducer`
(:mod:`streams.delivery`; a record too large to deliver is dead-lettered
instead).  This module is the Faust shell only: the batch logic is
:class:`streams.service.JoinService`, over the pure core of
:mod:`streams.join`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faust

from contract.settings import KafkaSettings, default_cache_dir
from contract.topics import CLICKS, IMPRESSIONS
from streams.delivery import JoinWorkerError
from streams.join_settings import JoinSettings
from streams.metrics import JoinMetrics
from streams.restore import STATE_TABLE, app_id, changelog_topic_name
from streams.service import JoinService

__all__ = ["JoinService", "JoinWorkerError", "app_id", "changelog_topic_name", "create_app"]

log = logging.getLogger(__name__)


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
    app = _faust_app(kafka, join)
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
        partitions=kafka.partitions,
        key_type=bytes,  # raw keys "<partition>/<state key>"; values are JSON
    )
    service = JoinService(app, kafka, join, table, metrics or JoinMetrics())
    app.join_service = service  # type: ignore[attr-defined]
    _connect(app, inputs, service, join)
    return app


def _faust_app(kafka: KafkaSettings, join: JoinSettings) -> faust.App:
    ident = app_id(kafka, join)
    datadir = Path(join.data_dir or default_cache_dir() / "join" / ident)
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    session = join.session_timeout_s
    return faust.App(
        ident,
        broker=kafka.faust_broker(),
        broker_credentials=kafka.faust_credentials(),
        store="memory://",
        autodiscover=False,
        datadir=str(datadir),
        topic_partitions=kafka.partitions,
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


def _connect(app: faust.App, inputs: Any, service: JoinService, join: JoinSettings) -> None:
    """The agent over both inputs, the idle timer, and the revocation and shutdown hooks."""

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
