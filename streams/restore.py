"""The join state in the worker's Faust table ``join-state``: restore a partition, write its changes.

The table's keys are ``"<partition>/<state key>"`` (the state keys of
:mod:`streams.join.wire`) on changelog partition = input partition; its
values are JSON.  Faust recovers the table from its changelog on assignment;
:func:`restore_core` rebuilds a partition's :class:`~streams.join.JoinCore`
from the recovered keys, :func:`changelog_records` turns the keys a batch
changed into changelog writes in a crash-safe order, and
:func:`drop_partition` forgets a revoked partition.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

from contract.settings import KafkaSettings
from streams.delivery import Send
from streams.join import JoinConfig, JoinCore
from streams.join_settings import JoinSettings

log = logging.getLogger(__name__)

STATE_TABLE = "join-state"


def app_id(kafka: KafkaSettings, join: JoinSettings) -> str:
    """Consumer group id and changelog prefix: the topic prefix + ``STREAMREC_JOIN_APP_ID``."""
    return f"{kafka.topic_prefix}{join.app_id}"


def changelog_topic_name(kafka: KafkaSettings, join: JoinSettings) -> str:
    return f"{app_id(kafka, join)}-{STATE_TABLE}-changelog"


def state_key(partition: int, key: str) -> bytes:
    return f"{partition}/{key}".encode()


def restore_core(store: MutableMapping[Any, Any], partition: int, config: JoinConfig) -> JoinCore:
    """The core of ``partition`` rebuilt from the table (values: JSON bytes, or decoded by recovery)."""
    prefix = f"{partition}/"
    state = []
    for key, value in store.items():
        k = key.decode() if isinstance(key, bytes) else str(key)
        if k.startswith(prefix):
            state.append((k[len(prefix) :], json.loads(value) if isinstance(value, bytes) else value))
    core = JoinCore.restore(config, state)
    log.info(
        "partition %d: join state restored (%d impressions, %d early clicks, watermark %s)",
        partition,
        core.remembered_impressions,
        core.early_clicks,
        core.watermark if core.max_event_ts is not None else "none",
    )
    return core


def changelog_records(
    store: MutableMapping[Any, Any], topic: str, partition: int, changes: dict[str, bytes | None]
) -> list[Send]:
    """The changelog writes of a partition's changed keys (the store is updated too).

    Upserts, then the watermark key (with the input offsets the state
    covers), then deletions.  The producer is idempotent, so what survives a
    crash is a prefix: without ``w`` the batch is replayed over upserts only
    (each a no-op again); with it, a lost deletion is redone after the restore.
    """
    meta = changes.pop("w", None)
    items = [(k, v) for k, v in changes.items() if v is not None]
    if meta is not None:
        items.append(("w", meta))
    items += [(k, v) for k, v in changes.items() if v is None]
    records: list[Send] = []
    for key, value in items:
        skey = state_key(partition, key)
        if value is None:
            store.pop(skey, None)
        else:
            store[skey] = value  # bytes; recovery stores the decoded JSON
        records.append((topic, skey, value, partition))
    return records


def drop_partition(store: MutableMapping[Any, Any], partition: int) -> None:
    """Forget the keys of a revoked partition (its new owner recovers them from the changelog)."""
    prefix = f"{partition}/".encode()
    for key in [k for k in store if isinstance(k, bytes) and k.startswith(prefix)]:
        store.pop(key, None)
