"""Settings of the impression–click join worker, read once from ``STREAMREC_JOIN_*``.

Build them with :func:`contract.settings.load` so that a value that cannot work
fails at start-up naming its environment variable::

    >>> from contract.settings import load
    >>> load(JoinSettings, window_ms=0)
    Traceback (most recent call last):
    ...
    contract.errors.ConfigError: setting STREAMREC_JOIN_WINDOW_MS: Input should be greater than or equal to 1

Event-time settings are milliseconds (they compare with record ``ts``);
wall-clock settings are seconds.  The partition count is not a join setting:
the worker requires its inputs and its state changelog to have
``STREAMREC_PARTITIONS`` partitions, the count the topics are created with
(:class:`contract.settings.KafkaSettings`).  :func:`load_worker_settings`
reads both and accepts the names of :data:`DEPRECATED_ENV` with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.errors import ConfigError
from contract.settings import KafkaSettings, load
from streams.join import JoinConfig

log = logging.getLogger(__name__)

ENV_PREFIX = "STREAMREC_JOIN_"
DEPRECATED_ENV: dict[str, str] = {
    "STREAMREC_JOIN_PARTITIONS": "STREAMREC_PARTITIONS",
}
"""Old environment names the worker still accepts (with a warning) -> the name to use now."""


class JoinSettings(BaseSettings):
    """Join semantics (window, lateness, ...) and how the worker runs (group, ports, batches)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # --- join semantics (event time, ms) ----------------------------------------------
    window_ms: int = Field(
        default=30 * 60_000,
        ge=1,
        description="Attribution window: a click at ts <= impression ts + window is a positive.",
    )
    allowed_lateness_ms: int = Field(
        default=5_000,
        ge=0,
        description="How far behind the newest event of its stream an event may arrive and still count.",
    )
    positives_at_close: bool = Field(
        default=True,
        description=(
            "Emit an in-window positive with its impression's negatives when the window closes (true), "
            "not when the click comes (false: fresher by up to the window, but for a window's time the "
            "trainer has an impression's clicks without its non-clicks; in the closed loop that cost "
            "650 clicks of 7,300, see README). Late positives are emitted when they come either way."
        ),
    )
    orphan_grace_ms: int = Field(
        default=60_000,
        ge=0,
        description="A click seen before its impression waits until the watermark passes click ts + grace.",
    )
    closed_retention_ms: int = Field(
        default=60 * 60_000,
        ge=0,
        description=(
            "Closed impressions are remembered until the watermark passes impression ts + window + "
            "retention, for late clicks and duplicate suppression."
        ),
    )
    history_length: int = Field(
        default=50, ge=1, le=10_000, description="Items in a user's history (most recent last)."
    )
    orphan_buffer_max: int = Field(
        default=100_000, ge=1, description="Early clicks buffered per partition before the oldest is dead-lettered."
    )

    watermark_lead_ms: int = Field(
        default=60_000,
        ge=0,
        description=(
            "An event moves its stream's watermark at most this far past the wall clock, so one clock "
            "ahead cannot close the windows of its partition (the event keeps its ts)."
        ),
    )
    late_hold_events: int = Field(
        default=20_000,
        ge=0,
        description=(
            "A closed impression is forgotten only once its event-time retention has passed and this "
            "many further events arrived on its partition (an early click already past its grace waits "
            "as long), so a backfill's or a lagging producer's clicks join as late positives, not orphans."
        ),
    )
    early_per_impression_max: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Early clicks buffered for one impression not seen yet; more go to dead-letters.",
    )

    max_future_skew_ms: int = Field(
        default=24 * 3_600_000,
        ge=0,
        description=(
            "An event whose ts is more than this after its Kafka record timestamp goes to dead-letters "
            "(one clock far ahead would close every window of its partition); 0 = no check."
        ),
    )

    # --- wall clock (s) -------------------------------------------------------------------
    idle_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "A stream without events this long stops holding the watermark back; both idle closes the "
            "windows that have ended by the later of (newest event ts + idle time) and the wall clock."
        ),
    )

    # --- the worker -------------------------------------------------------------------------
    app_id: str = Field(
        default="streamrec-join",
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Consumer group and changelog-topic prefix (the Kafka topic prefix is prepended).",
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off.")
    web_port: int = Field(default=0, ge=0, le=65535, description="Faust web server port; 0 = off.")
    batch_max: int = Field(default=2_000, ge=1, le=100_000, description="Events per processing batch.")
    batch_within_s: float = Field(
        default=0.05, gt=0, le=10, description="Longest wait to fill a batch."
    )
    session_timeout_s: float = Field(
        default=10.0,
        ge=6,
        le=300,
        description="Consumer-group session timeout: how soon a dead worker's partitions move.",
    )
    commit_interval_s: float = Field(default=1.0, gt=0, le=60, description="Offset commit interval.")
    data_dir: Path | None = Field(
        default=None, description="Faust data directory (default: a folder per app id in the cache dir)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> JoinSettings:
        if self.metrics_port and self.metrics_port == self.web_port:
            raise ValueError("metrics_port: must differ from web_port")
        return self

    def join_config(self) -> JoinConfig:
        """The event-time semantics handed to the pure join core."""
        return JoinConfig(
            window_ms=self.window_ms,
            allowed_lateness_ms=self.allowed_lateness_ms,
            idle_timeout_s=self.idle_timeout_s,
            orphan_grace_ms=self.orphan_grace_ms,
            orphan_buffer_max=self.orphan_buffer_max,
            closed_retention_ms=self.closed_retention_ms,
            history_length=self.history_length,
            watermark_lead_ms=self.watermark_lead_ms,
            late_hold_events=self.late_hold_events,
            early_per_impression_max=self.early_per_impression_max,
            positives_at_close=self.positives_at_close,
        )

    def tick_interval_s(self) -> float:
        """How often the worker checks for idle streams (a quarter of the idle timeout, at most 1 s)."""
        return min(1.0, self.idle_timeout_s / 4)


def load_worker_settings() -> tuple[KafkaSettings, JoinSettings]:
    """The worker's settings from the environment; a deprecated name (:data:`DEPRECATED_ENV`)
    is used for its new one, with a warning, unless the new one says otherwise.

    Raises:
        ConfigError: naming the variable (a deprecated one that contradicts its new name too).
    """
    overrides: dict[str, str] = {}
    for old, new in DEPRECATED_ENV.items():
        value = os.environ.get(old)
        if value is None:
            continue
        current = os.environ.get(new)
        if current is not None and current != value:
            raise ConfigError(old, f"is deprecated (use {new}) and says {value!r} while {new} says {current!r}")
        log.warning("%s is deprecated: use %s (read as %s=%s)", old, new, new, value)
        overrides[new.removeprefix("STREAMREC_").lower()] = value
    return load(KafkaSettings, **overrides), load(JoinSettings)
