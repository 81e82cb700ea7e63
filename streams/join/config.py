"""The event-time semantics of one join (:class:`JoinConfig`) and the check on event time vs Kafka time."""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import ConfigError, RecordError

NO_WATERMARK = -(2**62)
"""The watermark before any event: below every valid ``ts``."""


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """The event-time semantics of one join; see :mod:`streams.join`."""

    window_ms: int = 30 * 60_000
    allowed_lateness_ms: int = 5_000
    idle_timeout_s: float = 10.0
    orphan_grace_ms: int = 60_000
    orphan_buffer_max: int = 100_000
    closed_retention_ms: int = 60 * 60_000
    history_length: int = 50
    watermark_lead_ms: int = 60_000
    late_hold_events: int = 20_000
    early_per_impression_max: int = 256
    positives_at_close: bool = True

    def __post_init__(self) -> None:
        for name, low in (
            ("window_ms", 1),
            ("allowed_lateness_ms", 0),
            ("orphan_grace_ms", 0),
            ("orphan_buffer_max", 1),
            ("closed_retention_ms", 0),
            ("history_length", 1),
            ("watermark_lead_ms", 0),
            ("late_hold_events", 0),
            ("early_per_impression_max", 1),
        ):
            if getattr(self, name) < low:
                raise ConfigError(name, f"must be >= {low}, got {getattr(self, name)}")
        if not self.idle_timeout_s > 0:
            raise ConfigError("idle_timeout_s", f"must be > 0, got {self.idle_timeout_s}")

    @property
    def history_cap(self) -> int:
        return max(4 * self.history_length, self.history_length + 100)


def check_event_time(record_type: str, ts: int, kafka_ts_ms: int | None, max_future_skew_ms: int) -> None:
    """Refuse an event whose ``ts`` is more than ``max_future_skew_ms`` after its Kafka timestamp.

    One event from a clock far ahead would move its partition's watermark
    there and close every open window at once: a false negative for each
    pending impression, and late positives after.  The record's Kafka
    timestamp (the producer's CreateTime, or the broker's LogAppendTime)
    bounds when the event can have happened; events of the past (replays)
    always pass.  ``0`` turns the check off, and a record without a Kafka
    timestamp is not checked.  A producer that stamps both from the same
    wrong clock is not caught.

    Raises:
        RecordError: field ``ts``, saying by how much and which setting.
    """
    if max_future_skew_ms and kafka_ts_ms is not None and kafka_ts_ms > 0:
        ahead = ts - kafka_ts_ms
        if ahead > max_future_skew_ms:
            raise RecordError(
                record_type,
                "ts",
                f"event time {ts} is {ahead} ms after the record's Kafka timestamp {kafka_ts_ms} "
                f"(more than STREAMREC_JOIN_MAX_FUTURE_SKEW_MS={max_future_skew_ms}): a clock far ahead "
                "would close every window of its partition",
            )
