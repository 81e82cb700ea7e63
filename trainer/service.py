"""The trainer service: ``labeled`` (+ ``items``) from Kafka → continual learner → weight store.

What it does, in order, in one thread:

1. **Catalog.**  Reads the compacted ``items`` topic from the beginning up to
   its end as of start-up (so the catalog is complete), then keeps following
   it: new items and text changes arrive while training (:mod:`trainer.source`).
2. **Resume.**  Loads the checkpoint (refusing one written for another model
   config): learner state, the ``labeled`` offsets trained up to, the
   example_id dedupe window, held-back examples, version counters.  Partitions
   are assigned and positioned at the checkpointed offsets.
3. **Micro-batches.**  Fetched examples queue per partition in the feed
   (:mod:`trainer.feed`: batching, the missing-item wait, the dedupe of
   redelivered example_ids); malformed records go to ``dead-letters`` on
   arrival.  A deterministic ``holdout_fraction`` of example_ids is held back
   from training for the publish guardrail (:mod:`trainer.holdout`).
4. **Publish.**  Every ``publish_every_steps`` steps or ``publish_every_s``
   seconds, if the guardrail passes, writes a version (full, or a delta) to the
   weight store, makes it the live copy and the distillation teacher,
   checkpoints, and only then announces it on ``model-updates``
   (:mod:`trainer.publisher`: a crash never leaves an announced version the
   checkpoint does not descend from).
5. **Checkpoint.**  At every publish, every ``checkpoint_every_steps`` steps,
   when idle (``checkpoint_every_s``) and at SIGTERM/SIGINT: atomically, then
   commits the offsets to the group (:mod:`trainer.checkpointer`).  A restart
   resumes from it: nothing skipped, nothing trained twice.

Configuration (settings → model and learner configs, INIT_FROM) is
:mod:`trainer.configure`; metrics are :mod:`trainer.service_metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from prometheus_client import start_http_server

from contract.errors import ConfigError
from contract.settings import KafkaSettings
from contract.topics import MODEL_UPDATES
from infra.kafka import KafkaProducer
from trainer.catalog import Catalog
from trainer.checkpoint import Checkpoint, load_checkpoint, remove_stale_temp_files
from trainer.checkpointer import Checkpointer, TrainedIdsLog, trained_ids
from trainer.configure import build_learner, check_settings
from trainer.dedupe import DedupeWindow, dedupe_key
from trainer.distributed import check_world_size
from trainer.feed import Feed
from trainer.guardrail import Refusal
from trainer.holdout import Holdout, held_back
from trainer.learner import ContinualLearner
from trainer.metrics import finite
from trainer.model import RecModel
from trainer.publisher import Publisher
from trainer.service_metrics import TrainerMetrics
from trainer.service_settings import ENV_PREFIX, TrainerSettings
from trainer.source import Source, TrainerServiceError
from trainer.weights import WeightsError, WeightStore

__all__ = [  # the service, and what its callers used to import from here
    "DedupeWindow", "TrainerMetrics", "TrainerService", "TrainerServiceError", "dedupe_key", "held_back",
    "offsets_key", "trained_ids",
]

log = logging.getLogger(__name__)

PARTITION_CHECK_S = 60.0
"""How often ``labeled`` is checked for partitions added while the trainer runs."""


def offsets_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


class TrainerService:
    """One trainer process: see the module docstring.  ``run()`` blocks until ``stop()``."""

    def __init__(self, settings: TrainerSettings, kafka: KafkaSettings, *, metrics: TrainerMetrics | None = None) -> None:
        self.settings = settings
        self.kafka = kafka
        self.metrics = metrics or TrainerMetrics()
        try:
            self.store = WeightStore(settings.weights_root, signing_key=settings.signing_key)
        except WeightsError as exc:
            raise ConfigError(f"{ENV_PREFIX}WEIGHTS_ROOT", str(exc)) from exc
        self._init_source = check_settings(settings)  # fail now, not after the catalog load
        self.catalog = Catalog()
        self.source = Source(settings, kafka, self.metrics)
        self.labeled_topic = self.source.labeled_topic
        self.feed = Feed(
            self.catalog, batch_size=settings.batch_size, max_batch_wait_s=settings.max_batch_wait_s,
            missing_item_wait_s=settings.missing_item_wait_s, dedupe_window=settings.dedupe_window,
            on_expired=self.source.dead_letter_example, topic=self.labeled_topic,
        )
        self.holdout = Holdout(settings)
        self.checkpointer = Checkpointer(settings)
        self.ids_log = TrainedIdsLog(settings.trained_ids_log)
        self.publisher: Publisher | None = None
        self.learner: ContinualLearner | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        """Set once the catalog is loaded and the learner resumed (tests wait on it)."""
        self._steps = 0
        self._steps_since_attempt = 0
        self._last_publish = self._last_log = self._last_partition_check = time.monotonic()
        self._last_step_metrics: dict[str, float] = {}
        self._last_trained = 0

    @property
    def model(self) -> RecModel:
        assert self.learner is not None, "no model before the learner is built"
        return self.learner.model

    # --- control ---------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to checkpoint and return (safe from a signal handler or another thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def progress(self) -> dict[str, Any]:
        """A snapshot for monitoring and tests (safe to call from another thread)."""
        pending = self.publisher.pending if self.publisher is not None else None
        return {
            "offsets": self._source_offsets(),
            "steps": self._steps,
            "examples_trained": self._examples_trained(),
            "live_version": self.holdout.live_version,
            **self.metrics.counts,
            "refused": dict(self.metrics.refusals),
            "unannounced": pending.version if pending is not None else None,
        }

    def run(self) -> None:
        """Start, train until :meth:`stop`, checkpoint, close.  Raises on a fatal error."""
        server = None
        if self.settings.metrics_port:
            try:
                server, _thread = start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            except OSError as exc:
                raise TrainerServiceError(
                    f"setting {ENV_PREFIX}METRICS_PORT: cannot listen on {self.settings.metrics_port}: {exc}"
                ) from exc
            log.info("metrics on http://0.0.0.0:%d/metrics", self.settings.metrics_port)
        clean = False
        try:
            self._start()
            self.ready.set()
            while not self._stop.is_set():
                self._iterate()
            clean = True
        finally:
            try:
                if clean:  # after a failure the last good checkpoint stays: the restart resumes from it
                    self._checkpoint(reason="shutdown")
            finally:
                self._close()
                if server is not None:
                    server.shutdown()
                    server.server_close()
        log.info("trainer stopped: %d steps, %d examples trained, version %s live",
                 self._steps, self._examples_trained(), self.holdout.live_version)

    # --- start-up -----------------------------------------------------------------------
    def _start(self) -> None:
        s = self.settings
        self.source.open()
        announcer = KafkaProducer.create(self.kafka, f"{s.group_id}-updates")
        self.publisher = Publisher(s, self.store, announcer, MODEL_UPDATES.real_name(self.kafka), self.metrics)
        labeled_parts = self.source.partitions(self.labeled_topic)
        self.source.load_catalog(self.catalog, self._stop)
        remove_stale_temp_files(s.checkpoint_dir)  # one trainer per checkpoint dir
        ckpt = load_checkpoint(s.checkpoint_dir)
        if ckpt is not None:  # one written by a data-parallel group (trainer/distributed.py) is refused
            check_world_size(ckpt.service_state, 1, where=str(s.checkpoint_dir))
        self._build_learner(ckpt)
        self._resume(ckpt)
        self.publisher.retry_pending()  # checkpointed before its announcement was acknowledged
        self.source.assign({p: self._start_offset(p) for p in labeled_parts})
        log.info("training from %s at %s; %d items in the catalog; next version %d", self.labeled_topic,
                 ", ".join(f"[{p}]@{o}" for p, o in sorted(self.feed.offsets.items())),
                 len(self.catalog), self.publisher.next_version)

    def _build_learner(self, ckpt: Checkpoint | None) -> None:
        self.learner = build_learner(self.settings, self._init_source, ckpt, self.catalog)

    def _resume(self, ckpt: Checkpoint | None) -> None:
        assert self.publisher is not None and self.learner is not None
        self.publisher.restore(None if ckpt is None else ckpt.service_state)
        if ckpt is None:
            log.info("no checkpoint in %s: starting a fresh model", self.settings.checkpoint_dir)
            self.ids_log.open(0)
            return
        self.learner.load_state_dict(ckpt.learner_state)
        prefix = f"{self.labeled_topic}:"
        offsets = {int(k[len(prefix):]): off for k, off in ckpt.offsets.items() if k.startswith(prefix)}
        self.feed.resume(offsets, ckpt.recent_example_ids)
        st = ckpt.service_state
        self._steps = int(st.get("steps", 0))
        self.holdout.restore(st, self.store, self._device(), self.model)
        if self.holdout.live_version is not None:
            self.metrics.live_version.set(self.holdout.live_version)
        log.info("resumed from checkpoint of %s: %d examples trained, %d steps, offsets %s, live version %s",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ckpt.created_ts / 1000)),
                 ckpt.examples_trained, self._steps, ckpt.offsets, self.holdout.live_version)
        self.ids_log.open(int(st.get("trained_ids_log_size", 0)))

    def _start_offset(self, partition: int) -> int:
        off = self.source.start_offset(partition, self.feed.offsets.get(partition))
        self.feed.offsets[partition] = off
        self.feed.add_partition(partition)
        return off

    def _device(self) -> str:
        return str(self.learner.device) if self.learner is not None else "cpu"

    # --- the loop -------------------------------------------------------------------------
    def _iterate(self) -> None:
        now = time.monotonic()
        for partition, offset, example in self.source.fetch(self.feed.poll_timeout(now), self.catalog):
            self.feed.add(partition, offset, example, time.monotonic())
        now = time.monotonic()
        if self._stop.is_set():
            return  # stopping: the shutdown checkpoint covers what was trained; no new version
        if self.feed.due(now):
            self._train_batch(now)
        if self._publish_due(now) and not self._stop.is_set():
            self._publish(now)
        reason = self.checkpointer.due(now, self.feed.offsets, idle=self.feed.queued() == 0)
        if reason is not None:
            self._checkpoint(reason=reason)
        pause, resume = self.feed.backpressure(self.settings.max_queued_per_partition)
        self.source.pause(pause)
        self.source.resume(resume)
        if now - self._last_log >= self.settings.log_every_s:
            self._log_progress(now)
        if now - self._last_partition_check >= PARTITION_CHECK_S:
            self._check_new_partitions()

    def _train_batch(self, now: float) -> None:
        assert self.learner is not None
        taken = self.feed.take(now)
        train, held = self.holdout.split(taken.examples)
        self.metrics.taken(taken.consumed, taken.duplicates, len(held))
        if train:
            started = time.perf_counter()
            result = self.learner.step(train)
            self._steps += 1
            self._steps_since_attempt += 1
            self.checkpointer.stepped()
            self.holdout.trained(train)
            self._last_step_metrics = {k: float(v) for k, v in result.items()}
            self.metrics.stepped(len(train), time.perf_counter() - started, result, self._prequential())
        self.feed.advance(taken.advanced)
        self.ids_log.write(train, held)

    def _prequential(self) -> dict[str, float]:
        assert self.learner is not None
        snap = self.learner.metrics.snapshot()
        return {k: float(v) for k, v in snap.items() if isinstance(v, (int, float))}

    def _examples_trained(self) -> int:
        return int(self.learner.examples_trained) if self.learner is not None else 0

    def _source_offsets(self) -> dict[str, int]:
        return {offsets_key(self.labeled_topic, p): o for p, o in sorted(dict(self.feed.offsets).items())}

    # --- publishing -------------------------------------------------------------------------
    def _publish_due(self, now: float) -> bool:
        if self._steps_since_attempt == 0:
            return False
        return (
            self._steps_since_attempt >= self.settings.publish_every_steps
            or now - self._last_publish >= self.settings.publish_every_s
        )

    def _refuse(self, reason: Refusal, why: str) -> None:
        self.metrics.refused(reason)
        log.warning("guardrail refused the candidate after step %d (reason=%s) %s", self._steps, reason.value, why)

    def _publish(self, now: float) -> None:
        assert self.publisher is not None and self.learner is not None
        # A refused or postponed attempt waits a full interval (steps or seconds) too.
        self._last_publish = now
        self._steps_since_attempt = 0
        self.publisher.retry_pending()
        bad = [k for k, t in self.model.trainable_state_dict().items() if not bool(torch.isfinite(t).all())]
        if bad:
            self._refuse(Refusal.NON_FINITE, f"non-finite parameters {bad[:5]}")
            return
        verdict = self.holdout.judge(self.learner)
        if not verdict.ok:
            if verdict.refusal is not None:  # else postponed: too few held-back examples yet
                self._refuse(verdict.refusal, verdict.why)
            return
        metrics = {f"prequential_{k}": v for k, v in self._prequential().items() if finite(v)}
        metrics.update({f"step_{k}": v for k, v in self._last_step_metrics.items() if finite(v)})
        metrics.update(verdict.metrics)
        update = self.publisher.publish(self.model, metrics=metrics, trained_examples=self._examples_trained(),
                                        source_offsets=self._source_offsets(), announce=False)
        if update is None:
            return
        self.holdout.promote(update.version, verdict, self.model, self.store, self._device())
        self.learner.set_teacher(self.model.trainable_state_dict())
        try:
            self._checkpoint(reason=f"version {update.version}")  # before the announcement (publisher doc)
        except BaseException:
            # No checkpoint descends from this version: never announce it (the restart resumes
            # before it and numbers past it, since the store has it).
            log.error("checkpoint after version %d failed: the version stays unannounced", update.version)
            if self.publisher.pending is not None and self.publisher.pending.version == update.version:
                self.publisher.pending = None
            raise
        self.publisher.announce(update)
        log.info("published version %d (%s%s) after %d examples: auc %s, logloss %s; offsets %s",
                 update.version, update.kind, f" on {update.base_version}" if update.base_version else "",
                 update.trained_examples, _fmt(metrics.get("prequential_window_auc")),
                 _fmt(metrics.get("prequential_window_log_loss")), update.source_offsets)
        self.publisher.prune()

    # --- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self, *, reason: str) -> None:
        if self.learner is None or self.publisher is None:
            return
        self.source.flush_dead_letters()  # the offsets move past their records
        ckpt = Checkpoint(
            learner_state=self.learner.state_dict(),
            offsets=self._source_offsets(),
            examples_trained=self._examples_trained(),
            recent_example_ids=self.feed.dedupe.state(),
            model_config=self.model.config.model_dump(mode="json"),
            settings=self.settings.model_dump(mode="json"),
            service_state={
                "steps": self._steps,
                **self.publisher.state(),
                **self.holdout.state(),
                "trained_ids_log_size": self.ids_log.size(),
            },
        )
        self.checkpointer.save(ckpt, self.feed.offsets, reason)
        self.source.commit(self.feed.offsets)

    # --- housekeeping -----------------------------------------------------------------------
    def _check_new_partitions(self) -> None:
        self._last_partition_check = time.monotonic()
        try:
            parts = self.source.partitions(self.labeled_topic)
        except TrainerServiceError as exc:
            log.warning("partition check failed: %s", exc)
            return
        new = [p for p in self._own_partitions(parts) if p not in self.feed.queues]
        if new:
            self.source.add_partitions({p: self._start_offset(p) for p in new})
            log.info("%s gained partitions %s; consuming them too", self.labeled_topic, new)

    def _own_partitions(self, partitions: list[int]) -> list[int]:
        """The partitions of ``labeled`` this process trains on: all of them (a data-parallel rank
        takes its share, trainer/distributed_service.py)."""
        return partitions

    def _log_progress(self, now: float) -> None:
        elapsed, self._last_log = now - self._last_log, now
        lag = self.source.lag(self.feed.offsets)
        self.metrics.lag.set(lag)
        c = self.metrics.counts
        rate = (c["trained"] - self._last_trained) / max(elapsed, 1e-9)
        self._last_trained = c["trained"]
        log.info(
            "progress: %d trained (%.1f/s), %d held back, %d duplicates, %d dead letters; "
            "step %d, loss %s, prequential auc %s; lag %d, queued %d; live version %s",
            c["trained"], rate, c["held_back"], c["duplicates"], c["dead"],
            self._steps, _fmt(self._last_step_metrics.get("loss")), _fmt(self._prequential().get("window_auc")),
            lag, self.feed.queued(), self.holdout.live_version,
        )

    def _close(self) -> None:
        self.source.close()
        if self.publisher is not None:
            self.publisher.retry_pending()  # a version whose announcement failed: one last try
            if self.publisher.pending is not None:
                log.error("version %d is in the store but was never announced on %s",
                          self.publisher.pending.version, self.publisher.topic)
            self.publisher.producer.close(10)
        self.ids_log.close()


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if finite(v) else "n/a"
