"""The data-parallel trainer service: one :class:`~trainer.service.TrainerService` per rank, in lockstep.

``torchrun --standalone --nproc-per-node N -m trainer`` (``make trainer NPROC=N``) starts N
ranks; each is the trainer of :mod:`trainer.service` with these differences (the collectives
are :mod:`trainer.distributed`):

- **Its share of ``labeled``.**  Rank *r* consumes the partitions *p* with ``p % N == r``
  (a partition added later too); every rank reads the whole ``items`` topic (the catalog).
- **One round per loop iteration.**  After its fetch, every rank takes part in one all-reduce of
  a few numbers: a batch is due, examples queued, offsets moved since the last checkpoint, a
  stop was asked for (SIGTERM on any rank stops them all at the same iteration), and rank 0's
  clock (``publish_every_s``, ``checkpoint_every_s``).  Every decision below is taken from it,
  or from step counts that are equal on every rank, so all ranks call the same collectives.
- **A synchronized step.**  When any rank's batch is due, every rank cuts one (possibly empty),
  holds back its share for the guardrail and tells the others how many examples it has; then
  every rank makes ``updates_per_batch`` updates on the gradients averaged over the group
  (weighted by each rank's examples; an empty rank contributes zero), so the replicas stay
  equal.  ``examples_trained`` is the group's.
- **Rank 0 publishes.**  It gets every rank's held-back examples and trained positives (the
  guardrail and its popularity fallback see the whole stream), judges, writes the version,
  announces it, and tells the others which version it published (they take it as their
  distillation teacher).  The other ranks never write the store nor announce.  The prequential
  metrics in the manifest and logs are rank 0's (its share of the stream).
- **One checkpoint, written by rank 0.**  It gathers each rank's offsets, dedupe window,
  trained-ids log size and own learner state (replay buffer, metrics, RNG), and checks that the
  replicas are equal (a digest of the trainable parameters; a difference stops the group).  The
  checkpoint records the world size: a group of another size refuses it.  Each rank's
  trained-ids log is its own file (``<path>.rank<r>``); each commits its own offsets.
- **A rank that dies** makes the next collective of the others fail (or time out after
  ``STREAMREC_TRAINER_DDP_TIMEOUT_S``): they stop without a checkpoint, torchrun tears the group
  down, and a restart of the whole group resumes from the last checkpoint (nothing skipped,
  nothing trained twice, as for one process).

The checkpoint directory (and the weight store) must be reachable by every rank: one host, or a
shared filesystem.  The metrics endpoint of local rank *l* is ``metrics_port + l``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from contract.records import Labeled, ModelUpdate
from contract.settings import KafkaSettings
from contract.topics import MODEL_UPDATES
from infra.kafka import KafkaProducer
from trainer.checkpoint import Checkpoint, load_checkpoint, remove_stale_temp_files
from trainer.checkpointer import Checkpointer
from trainer.device import resolve_device
from trainer.distributed import (
    GradientAverager,
    Group,
    GroupError,
    RankInfo,
    attach,
    broadcast_model,
    check_world_size,
    merge_learner_state,
    needs_centring,
    owner,
    rank_path,
    replica_digest,
    share,
    split_learner_state,
    sync_centring,
    synced_step,
)
from trainer.guardrail import Refusal
from trainer.metrics import finite
from trainer.publisher import Publisher
from trainer.service import PARTITION_CHECK_S, TrainerService, _fmt
from trainer.service_metrics import TrainerMetrics
from trainer.service_settings import TrainerSettings

log = logging.getLogger(__name__)


class GroupCheckpointer(Checkpointer):
    """The checkpoint schedule of a rank: rank 0 writes, every rank keeps the bookkeeping."""

    def moved(self, offsets: dict[int, int]) -> bool:
        """Whether the offsets moved since the last checkpoint."""
        return offsets != self._offsets

    def mark(self, offsets: dict[int, int]) -> None:
        """A checkpoint (written by rank 0) covers these offsets now."""
        self.steps_since = 0
        self._offsets = dict(offsets)
        self.last = time.monotonic()


class DistributedTrainerService(TrainerService):
    """One rank of the data-parallel trainer (see the module doc)."""

    def __init__(
        self, settings: TrainerSettings, kafka: KafkaSettings, info: RankInfo, *, metrics: TrainerMetrics | None = None
    ) -> None:
        own: dict[str, Any] = {}
        if settings.trained_ids_log is not None:
            own["trained_ids_log"] = Path(rank_path(settings.trained_ids_log, info.rank))
        if settings.metrics_port:
            own["metrics_port"] = settings.metrics_port + info.local_rank
        super().__init__(settings.model_copy(update=own) if own else settings, kafka, metrics=metrics)
        self.info = info
        self.checkpointer: GroupCheckpointer = GroupCheckpointer(self.settings)
        self.group: Group | None = None
        self.averager: GradientAverager | None = None
        self._stop_requested = threading.Event()
        """stop() asks; the round makes every rank stop at the same iteration (``_stop``)."""
        self._unchecked_version: int | None = None
        """Rank 0: a version written to the store that no checkpoint covers yet (never announced)."""

    # --- control -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set() or self._stop.is_set()

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def _group(self) -> Group:
        assert self.group is not None, "the group is joined at start-up"
        return self.group

    def run(self) -> None:
        super().run()
        if self.group is not None:  # after a failure the process exits; torchrun tears the group down
            self.group.close()

    # --- start-up -----------------------------------------------------------------------
    def _device_of_rank(self) -> torch.device:
        dev = resolve_device(self.settings.device)  # checked at construction
        if dev.type == "cuda":  # one GPU per local rank; the learner's "cuda" is then this one
            return torch.device("cuda", self.info.local_rank)
        return dev

    def _start(self) -> None:
        s, info = self.settings, self.info
        self.group = group = Group.init(info, device=self._device_of_rank(), timeout_s=s.ddp_timeout_s)
        self.source.open()
        if self.is_main:  # the only rank that writes the store and announces
            announcer = KafkaProducer.create(self.kafka, f"{s.group_id}-updates")
            self.publisher = Publisher(s, self.store, announcer, MODEL_UPDATES.real_name(self.kafka), self.metrics)
        labeled_parts = self.source.partitions(self.labeled_topic)
        mine = self._own_partitions(labeled_parts)
        if not mine:
            log.warning("rank %d owns none of the %d partitions of %s (more ranks than partitions): it "
                        "takes part in every update with no examples", info.rank, len(labeled_parts),
                        self.labeled_topic)
        self.source.load_catalog(self.catalog, self._stop_requested)
        if self.is_main:
            remove_stale_temp_files(s.checkpoint_dir)  # one trainer group per checkpoint dir
        group.barrier("the start-up barrier (catalog loaded)")
        ckpt = load_checkpoint(s.checkpoint_dir)
        if ckpt is not None:
            check_world_size(ckpt.service_state, info.world, where=str(s.checkpoint_dir))
        self._build_learner(ckpt)
        assert self.learner is not None
        self.averager = attach(self.learner, group)
        self._resume(ckpt)
        broadcast_model(self.model, group)  # equal replicas from the start (they should be already)
        if needs_centring(self.learner):
            sync_centring(self.learner, group)
        if self.publisher is not None:
            self.publisher.retry_pending()  # checkpointed before its announcement was acknowledged
        self.source.assign({p: self._start_offset(p) for p in mine})
        group.barrier("the start-up barrier (resumed)")
        log.info("rank %d of %d training from %s at %s; %d items in the catalog%s", info.rank, info.world,
                 self.labeled_topic, ", ".join(f"[{p}]@{o}" for p, o in sorted(self.feed.offsets.items())) or "-",
                 len(self.catalog),
                 f"; next version {self.publisher.next_version}" if self.publisher is not None else "")

    def _resume(self, ckpt: Checkpoint | None) -> None:
        assert self.learner is not None
        rank, world = self.info.rank, self.info.world
        if self.publisher is not None:
            self.publisher.restore(None if ckpt is None else ckpt.service_state)
        if ckpt is None:
            log.info("no checkpoint in %s: starting a fresh model", self.settings.checkpoint_dir)
            self.ids_log.open(0)
            return
        st = ckpt.service_state
        parts: list[dict[str, Any]] = list(st.get("ranks") or [])
        part = parts[rank] if rank < len(parts) else {}
        self.learner.load_state_dict(merge_learner_state(ckpt.learner_state, part.get("learner")))
        prefix = f"{self.labeled_topic}:"
        offsets = {int(k[len(prefix):]): off for k, off in ckpt.offsets.items() if k.startswith(prefix)}
        offsets = {p: off for p, off in offsets.items() if owner(p, world) == rank}
        sizes = [int(p.get("recent_example_ids", 0)) for p in parts]
        start = sum(sizes[:rank])
        self.feed.resume(offsets, ckpt.recent_example_ids[start : start + (sizes[rank] if rank < len(sizes) else 0)])
        self._steps = int(st.get("steps", 0))
        if self.is_main:
            self.holdout.restore(st, self.store, self._device(), self.model)
            if self.holdout.live_version is not None:
                self.metrics.live_version.set(self.holdout.live_version)
        else:
            live = st.get("live_version")
            self.holdout.live_version = int(live) if live is not None else None
        log.info("rank %d resumed from checkpoint of %s: %d examples trained by the group, %d steps, "
                 "offsets %s, live version %s", rank,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ckpt.created_ts / 1000)),
                 ckpt.examples_trained, self._steps, offsets, self.holdout.live_version)
        self.ids_log.open(int(part.get("trained_ids_log_size", 0)))

    # --- the loop -------------------------------------------------------------------------
    def _iterate(self) -> None:
        s, group = self.settings, self._group()
        now = time.monotonic()
        for partition, offset, example in self.source.fetch(self.feed.poll_timeout(now), self.catalog):
            self.feed.add(partition, offset, example, time.monotonic())
        now = time.monotonic()
        r = group.agree(
            {
                "due": float(self.feed.due(now)),
                "queued": float(self.feed.queued()),
                "moved": float(self.checkpointer.moved(self.feed.offsets)),
                "stop": float(self._stop_requested.is_set()),
            },
            main={
                "publish_time": float(now - self._last_publish >= s.publish_every_s),
                "checkpoint_time": float(now - self.checkpointer.last >= s.checkpoint_every_s),
            },
        )
        if r["due"] > 0:
            self._train_batch(now)
        if self._steps_since_attempt > 0 and (
            self._steps_since_attempt >= s.publish_every_steps or r["publish_time"] > 0
        ):
            self._publish(now)
        reason = None
        if self.checkpointer.steps_since >= s.checkpoint_every_steps:
            reason = f"{self.checkpointer.steps_since} steps"
        elif r["due"] == 0 and r["queued"] == 0 and r["moved"] > 0 and r["checkpoint_time"] > 0:
            reason = "idle"
        if reason is not None:
            self._checkpoint(reason=reason)
        if r["stop"] > 0:
            self._stop.set()  # every rank leaves the loop here, then checkpoints together
        pause, resume = self.feed.backpressure(s.max_queued_per_partition)
        self.source.pause(pause)
        self.source.resume(resume)
        if now - self._last_log >= s.log_every_s:
            self._log_progress(now)
        if now - self._last_partition_check >= PARTITION_CHECK_S:
            self._check_new_partitions()

    def _train_batch(self, now: float) -> None:
        assert self.learner is not None and self.averager is not None
        group = self._group()
        taken = self.feed.take(now)
        train, held = self.holdout.split(taken.examples)
        self.metrics.taken(taken.consumed, taken.duplicates, len(held))
        positives = [ex for ex in train if ex.label == 1]
        shared: list[tuple[int, list[Labeled], list[Labeled]]] = group.all_gather_object(
            (len(train), held if not self.is_main else [], positives if not self.is_main else []),
            what="the batch round",
        )
        if self.is_main:  # the guardrail sees every rank's held-back examples and trained positives
            for _n, their_held, their_positives in shared[1:]:
                self.holdout.split(their_held)  # all of them are held back: into the guardrail's examples
                self.holdout.trained(their_positives)
        if sum(n for n, _, _ in shared) > 0:
            started = time.perf_counter()
            result, _trained = synced_step(self.learner, train, group, self.averager)
            self._steps += 1
            self._steps_since_attempt += 1
            self.checkpointer.stepped()
            if self.is_main:
                self.holdout.trained(train)
            if result is not None:
                self._last_step_metrics = {k: float(v) for k, v in result.items()}
                self.metrics.stepped(len(train), time.perf_counter() - started, result, self._prequential())
        self.feed.advance(taken.advanced)
        self.ids_log.write(train, held)

    # --- publishing -----------------------------------------------------------------------
    def _publish(self, now: float) -> None:
        assert self.learner is not None
        group = self._group()
        self._last_publish = now
        self._steps_since_attempt = 0
        offsets = group.gather_object(self._source_offsets(), what="the offsets gather")
        update = self._attempt(offsets or []) if self.is_main else None
        version = group.broadcast_object(None if update is None else update.version, what="the publish decision")
        if version is None:
            return
        if not self.is_main:
            self.holdout.live_version = int(version)
        self.learner.set_teacher(self.model.trainable_state_dict())
        self._checkpoint(reason=f"version {version}")  # before the announcement (publisher doc)
        if update is not None and self.publisher is not None:
            self.publisher.announce(update)
            log.info("published version %d (%s%s) after %d examples trained by %d ranks: auc %s, logloss %s "
                     "(rank 0's prequential); offsets %s", update.version, update.kind,
                     f" on {update.base_version}" if update.base_version else "", update.trained_examples,
                     self.info.world, _fmt(update.metrics.get("prequential_window_auc")),
                     _fmt(update.metrics.get("prequential_window_log_loss")), update.source_offsets)
            self.publisher.prune()

    def _attempt(self, offsets: list[dict[str, int]]) -> ModelUpdate | None:
        """Rank 0: the guardrail, then the store write (not announced yet); the update, or None."""
        assert self.publisher is not None and self.learner is not None
        self.publisher.retry_pending()
        bad = [k for k, t in self.model.trainable_state_dict().items() if not bool(torch.isfinite(t).all())]
        if bad:
            self._refuse(Refusal.NON_FINITE, f"non-finite parameters {bad[:5]}")
            return None
        verdict = self.holdout.judge(self.learner)
        if not verdict.ok:
            if verdict.refusal is not None:  # else postponed: too few held-back examples yet
                self._refuse(verdict.refusal, verdict.why)
            return None
        metrics = {f"prequential_{k}": v for k, v in self._prequential().items() if finite(v)}
        metrics.update({f"step_{k}": v for k, v in self._last_step_metrics.items() if finite(v)})
        metrics.update(verdict.metrics)
        metrics["trainer_ranks"] = float(self.info.world)
        union = {k: v for part in offsets for k, v in part.items()}
        update = self.publisher.publish(self.model, metrics=metrics, trained_examples=self._examples_trained(),
                                        source_offsets=dict(sorted(union.items())), announce=False)
        if update is not None:
            self._unchecked_version = update.version
            self.holdout.promote(update.version, verdict, self.model, self.store, self._device())
        return update

    # --- checkpoints ----------------------------------------------------------------------
    def _checkpoint(self, *, reason: str) -> None:
        if self.learner is None or self.group is None:
            return
        group = self.group
        self.source.flush_dead_letters()  # the offsets move past their records
        state = self.learner.state_dict()
        _replicated, own = split_learner_state(state)
        part = {
            "rank": self.info.rank,
            "partitions": sorted(self.feed.offsets),
            "offsets": self._source_offsets(),
            "recent_example_ids": self.feed.dedupe.state(),
            "trained_ids_log_size": self.ids_log.size(),
            "learner": None if self.is_main else own,  # rank 0's is the checkpoint's learner state
            "digest": replica_digest(self.model),
        }
        parts = group.gather_object(part, what="the checkpoint gather")
        error: str | None = None
        failure: BaseException | None = None
        if parts is not None:
            try:
                self._write_checkpoint(state, parts, reason)
            except Exception as exc:  # told to every rank, then raised here
                failure, error = exc, f"{type(exc).__name__}: {exc}"
        error = group.broadcast_object(error, what="the checkpoint outcome")
        if failure is not None:
            raise failure
        if error is not None:
            raise GroupError(f"rank {self.info.rank}: rank 0 could not write the checkpoint ({error})")
        if not self.is_main:
            self.checkpointer.mark(self.feed.offsets)
        self._unchecked_version = None
        self.source.commit(self.feed.offsets)

    def _write_checkpoint(self, state: dict[str, Any], parts: list[dict[str, Any]], reason: str) -> None:
        """Rank 0: one checkpoint of the whole group."""
        assert self.publisher is not None
        digests = {p["digest"] for p in parts}
        if len(digests) != 1:
            raise GroupError("the replicas diverged (their trainable parameters differ: "
                             + ", ".join(f"rank {p['rank']} {p['digest'][:12]}" for p in parts)
                             + "); not checkpointing a state no rank holds")
        parts = sorted(parts, key=lambda p: p["rank"])  # (gathered in rank order already)
        offsets = {k: v for p in parts for k, v in p["offsets"].items()}
        ckpt = Checkpoint(
            learner_state=state,
            offsets=dict(sorted(offsets.items())),
            examples_trained=self._examples_trained(),
            recent_example_ids=[k for p in parts for k in p["recent_example_ids"]],
            model_config=self.model.config.model_dump(mode="json"),
            settings=self.settings.model_dump(mode="json"),
            service_state={
                "steps": self._steps,
                **self.publisher.state(),
                **self.holdout.state(),
                "world_size": self.info.world,
                "ranks": [
                    {
                        "partitions": p["partitions"],
                        "recent_example_ids": len(p["recent_example_ids"]),  # its slice of the list above
                        "trained_ids_log_size": int(p["trained_ids_log_size"]),
                        "learner": p["learner"],
                    }
                    for p in parts
                ],
            },
        )
        self.checkpointer.save(ckpt, self.feed.offsets, reason)

    # --- housekeeping ---------------------------------------------------------------------
    def _close(self) -> None:
        pub = self.publisher
        if pub is not None and pub.pending is not None and self._unchecked_version is not None:
            # The group failed between the store write and its checkpoint (a rank died): announcing
            # it now would put serving on a version the restarted group does not descend from.
            log.warning("version %d is in the store but no checkpoint covers it: not announcing it "
                        "(the restarted group numbers past it)", pub.pending.version)
            pub.pending = None
        super()._close()

    def _own_partitions(self, partitions: list[int]) -> list[int]:
        return share(partitions, self.info.rank, self.info.world)  # partitions added later too
