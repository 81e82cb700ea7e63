"""Decoding one input of the join: its value, its key, its event time.

Values are consumed raw, so a malformed one reaches the worker instead of
being dropped by Faust.  :func:`decode_input` raises
:class:`~contract.errors.RecordError` (the worker dead-letters the input with
the reason) for a value that does not decode (:mod:`contract.records`), a
message key that is not the record's user_id (co-partitioning), or an event
time far after the record's Kafka timestamp
(:func:`~streams.join.check_event_time`).
"""

from __future__ import annotations

from typing import Any

from contract.errors import RecordError
from contract.records import Click, Impression
from streams.join import check_event_time


def decode_input(msg: Any, record_type: type[Impression] | type[Click], max_future_skew_ms: int) -> Impression | Click:
    """The record of a Faust message (``.key``, ``.value``, ``.timestamp`` in seconds or None)."""
    record = record_type.from_json(msg.value)
    if msg.key != record.user_id.encode():
        raise RecordError(
            record_type.__name__,
            "<key>",
            f"message key {msg.key!r} is not the user_id {record.user_id!r} (co-partitioning)",
        )
    if max_future_skew_ms:
        kafka_ts = msg.timestamp  # seconds (Faust); None when the record has none
        check_event_time(
            record_type.__name__, record.ts, None if kafka_ts is None else round(kafka_ts * 1000),
            max_future_skew_ms,
        )  # fmt: skip
    return record
