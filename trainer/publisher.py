"""Publishing: a version (full, or a delta on the last full one) to the store, announced on model-updates.

Full: with ``publish_kind=full``, for the first version (or after the base
was lost), every ``full_every``-th version, and whenever the delta (what
changed since the base) would be at least half the size of a full snapshot.
A store that cannot take a version (disk full, unreachable fsspec store) is
counted by reason and logged; training goes on and the next attempt retries.
An announcement that is not delivered is counted
(``announce_failures_total``, ``unannounced_version``), logged, and sent again
at the next publish attempt (or superseded by a newer version) and at shutdown;
the version is in the store meanwhile (serving finds it there at start-up).

Order with the checkpoint (the service's publish): write to the store →
promote (live copy, teacher) → **checkpoint** → announce.  A version is
announced only once a checkpoint of its lineage exists, so a crash (SIGKILL)
can never leave serving on a version N while the resumed trainer goes on from
an earlier state and forks the lineage.  The checkpoint names the version as
``pending`` (not yet acknowledged); a restart announces it again first (a
repeat is harmless: serving skips a version not newer than its live one).  A
crash between the store write and the checkpoint leaves an unannounced
version that the restart numbers past (:meth:`Publisher.restore`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from contract.errors import RecordError
from contract.records import ModelUpdate
from infra.kafka import KafkaProducer
from trainer.model import RecModel
from trainer.service_metrics import IO_ERROR, TrainerMetrics
from trainer.service_settings import TrainerSettings
from trainer.weights import (
    WeightsError,
    WeightsReason,
    WeightStore,
    changed_tensors,
    cpu_state,
    state_bytes,
)

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 30.0
"""How long an announcement may take to be acknowledged before it counts as failed."""


class Publisher:
    """Version numbering, full/delta choice, store writes and announcements of one trainer."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: WeightStore,
        producer: KafkaProducer,
        topic: str,
        metrics: TrainerMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.topic = topic
        self.metrics = metrics
        self.next_version = 1
        self.last_full_version: int | None = None
        self.publishes_since_full = 0
        self.base_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the last full version's tensors: deltas are what differs from it."""
        self.pending: ModelUpdate | None = None
        """The newest published version whose announcement failed (sent again at the next attempt)."""

    # --- checkpoint -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "next_version": self.next_version,
            "last_full_version": self.last_full_version,
            "publishes_since_full": self.publishes_since_full,
            "pending_announcement": None if self.pending is None else self.pending.to_json().decode(),
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue the numbering (past anything in the store) and the delta base of a checkpoint.

        Versions in the store from the checkpoint's ``next_version`` on are **orphans**: written by
        a trainer that died before the checkpoint that would have owned them (or put there by
        someone else).  No checkpoint descends from them, so they are removed (an agent starting
        up must not pick one from the store), and the numbering continues past them (a number
        never names two different versions)."""
        self.next_version = self.store.next_version()
        if state is None:
            return
        owned = int(state.get("next_version", 1))
        orphans = [v for v in self.store.versions() if v >= owned]
        for v in orphans:
            log.warning("removing version %d from the store: no checkpoint descends from it (a trainer "
                        "that died between writing it and checkpointing, or not this trainer's)", v)
            self.store.remove(v)
        self.metrics.orphans_removed(len(orphans))
        self.next_version = max(self.next_version, owned)
        self.last_full_version = state.get("last_full_version")
        self.publishes_since_full = int(state.get("publishes_since_full", 0))
        pending = state.get("pending_announcement")
        if pending:
            try:
                self.pending = ModelUpdate.from_json(str(pending))
            except RecordError as exc:
                log.warning("dropping the checkpointed pending announcement: %s", exc)
        if self.last_full_version is not None and self.last_full_version not in self.store.versions():
            self.last_full_version = None  # pruned or lost: the next version is full
        if self.last_full_version is not None and self.settings.publish_kind == "delta":
            try:
                self.base_state = self.store.state(int(self.last_full_version))
            except (WeightsError, OSError) as exc:
                log.warning("base version %s cannot be read (%s); the next version is full",
                            self.last_full_version, exc)
                self.last_full_version = None

    # --- publishing -------------------------------------------------------------------------
    def delta_tensors(self, model: RecModel) -> dict[str, torch.Tensor] | None:
        """The tensors of the next version when it is a delta; None when it is full (module doc)."""
        s = self.settings
        if (
            s.publish_kind != "delta"
            or self.last_full_version is None
            or self.base_state is None
            or self.publishes_since_full + 1 >= s.full_every
        ):
            return None
        state = model.state_dict()
        tensors = changed_tensors(state, self.base_state)
        if not tensors or 2 * state_bytes(tensors) >= state_bytes(state):
            log.info("a delta would hold %.1f of %.1f MB: publishing a full version",
                     state_bytes(tensors) / 1e6, state_bytes(state) / 1e6)
            return None
        return tensors

    def publish(
        self,
        model: RecModel,
        *,
        metrics: dict[str, float],
        trained_examples: int,
        source_offsets: dict[str, int],
        announce: bool = True,
    ) -> ModelUpdate | None:
        """Write the next version and announce it; None when the store could not take it.

        With ``announce=False`` it is only written and kept as :attr:`pending` (in :meth:`state`):
        the caller checkpoints, then calls :meth:`announce` (module doc: the order).
        """
        tensors = self.delta_tensors(model)
        update = self._write(model, tensors, metrics, trained_examples, source_offsets)
        if update is None:
            return None
        self.next_version = update.version + 1
        if tensors is not None:
            self.publishes_since_full += 1
        else:
            self.last_full_version = update.version
            self.publishes_since_full = 0
            if self.settings.publish_kind == "delta":
                self.base_state = cpu_state(model)
        with contextlib.suppress(WeightsError, OSError):
            self.metrics.published_bytes.labels(kind=update.kind).inc(self.store.manifest(update.version).size)
        if announce:
            self.announce(update)
        elif self.pending is None or self.pending.version < update.version:
            self.pending = update  # not acknowledged yet: checkpointed as such
        self.metrics.published.labels(kind=update.kind).inc()
        self.metrics.live_version.set(update.version)
        return update

    def _write(
        self,
        model: RecModel,
        tensors: dict[str, torch.Tensor] | None,
        metrics: dict[str, float],
        trained_examples: int,
        source_offsets: dict[str, int],
    ) -> ModelUpdate | None:
        delta = tensors is not None
        for attempt in (1, 2):
            version = self.next_version
            try:
                return self.store.publish(
                    model,
                    version=version,
                    kind="delta" if delta else "full",
                    base_version=self.last_full_version if delta else None,
                    tensors=tensors,
                    metrics=metrics,
                    trained_examples=trained_examples,
                    source_offsets=source_offsets,
                    model_name=self.settings.model_name,
                )
            except (WeightsError, OSError) as exc:
                reason = exc.reason if isinstance(exc, WeightsError) else IO_ERROR
                if reason == WeightsReason.EXISTS and attempt == 1:  # another writer took the number
                    self.next_version = self.store.next_version()
                    continue
                # Storage trouble (disk full, unreachable fsspec store): keep training, retry later.
                self.metrics.publish_failures.labels(reason=str(reason)).inc()
                log.error("publishing version %d to %s failed (%s): %s", version, self.store.url, reason, exc)
                return None
        return None

    # --- announcing -------------------------------------------------------------------------
    def announce(self, update: ModelUpdate) -> bool:
        """Send the record of a published version and wait for it; a failure is kept for a retry."""
        self.producer.send(self.topic, update.to_json(), update.kafka_key())
        barrier = self.producer.barrier(ANNOUNCE_TIMEOUT_S)
        if barrier.ok:
            if self.pending is not None and self.pending.version <= update.version:
                self.pending = None
                self.metrics.unannounced.set(0)
            return True
        if self.pending is None or self.pending.version < update.version:
            self.pending = update
        self.metrics.announce_failed(self.pending.version)
        log.error("announcing version %d on %s failed (%s); it is in the store at %s; announcing it again "
                  "at the next publish attempt", update.version, self.topic, barrier.describe(), update.uri)
        return False

    def retry_pending(self) -> None:
        """Announce again the version whose announcement failed, if the store still has it."""
        pending = self.pending
        if pending is None:
            return
        if pending.version not in self.store.versions():
            log.warning("version %d was never announced and is gone from the store", pending.version)
            self.pending = None
            self.metrics.unannounced.set(0)
            return
        if self.announce(pending):
            log.info("announced version %d on %s (retry)", pending.version, self.topic)

    def prune(self) -> None:
        if not self.settings.keep_versions:
            return
        try:
            self.store.prune(self.settings.keep_versions)
        except (WeightsError, OSError) as exc:
            log.warning("pruning the weight store failed: %s", exc)
