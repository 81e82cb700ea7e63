"""Data-parallel training on ``torch.distributed``: the process group, the partition share, the
gradient average, the lockstep round and the per-rank parts of the checkpoint.

``torchrun --standalone --nproc-per-node N -m trainer`` starts N ranks (gloo on the CPU, NCCL
on CUDA, one GPU per local rank); the service side is :mod:`trainer.distributed_service`.  A
process without ``WORLD_SIZE`` (or with 1) is the single-process trainer, untouched by this module.

- **Partitions.**  Partition *p* of ``labeled`` belongs to rank ``p % N`` (:func:`share`): a
  static assignment, because the checkpoint holds every rank's offsets and the group restarts
  as one.  A checkpoint written by a group of another size is refused (:func:`check_world_size`).
- **Replicas.**  Every rank holds the whole model.  They start equal (rank 0's trainable
  parameters and buffers are broadcast, :func:`broadcast_model`; also after the text centring,
  :func:`sync_centring`) and stay equal bit for bit: each optimizer update averages the
  gradients of every trainable parameter (the dense ones, the hashed id embeddings and the
  rows of the row-wise Adagrad alike, sent densely) weighted by each rank's example count
  (:func:`average_gradients`), so every rank applies the same update to the same weights.
- **Lockstep.**  Every rank calls the same collectives in the same order: the service's loop
  agrees once per iteration on a few numbers (:meth:`Group.agree`: examples due, a stop asked
  for, rank 0's clock for the time-based schedules), and when any rank has examples every rank
  makes exactly ``updates_per_batch`` synchronized updates, a rank without examples with zero
  weight (:func:`synced_step`).
- **Failures.**  A collective that fails (a rank died: its sockets close; or one did not answer
  within ``STREAMREC_TRAINER_DDP_TIMEOUT_S``) raises :class:`GroupError`; the rank stops without
  a checkpoint, torchrun stops the others, and a restart of the group resumes from the last one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from contract.errors import ConfigError
from contract.records import Labeled
from trainer.checkpoint import CheckpointError
from trainer.learner import ContinualLearner
from trainer.model import RecModel
from trainer.posterior import PosteriorExamples
from trainer.source import TrainerServiceError

log = logging.getLogger(__name__)

WORLD_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"
PER_RANK_LEARNER_KEYS = ("replay", "metrics", "rng", "seen", "examples_skipped", "steps")
"""The parts of :meth:`ContinualLearner.state_dict` each rank has its own of (its examples' replay
buffer, prequential metrics, RNG...); every other part (model, optimizers, teacher, the group's
``examples_trained``) is the same on every rank and saved once, from rank 0."""


class GroupError(TrainerServiceError):
    """The trainer group cannot go on: a rank died or stopped answering (see the module doc)."""


# --- who is who --------------------------------------------------------------------------
@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_from_env(environ: Mapping[str, str] | None = None) -> RankInfo | None:
    """This process's place in a torchrun group; None when it is the single-process trainer."""
    env = os.environ if environ is None else environ
    raw = env.get(WORLD_ENV, "").strip()
    if not raw:
        return None
    try:
        world = int(raw)
        rank = int(env.get(RANK_ENV, "0"))
        local = int(env.get(LOCAL_RANK_ENV, str(rank)))
    except ValueError:
        raise ConfigError(WORLD_ENV, f"{WORLD_ENV}={raw!r}, {RANK_ENV}={env.get(RANK_ENV)!r} and "
                          f"{LOCAL_RANK_ENV}={env.get(LOCAL_RANK_ENV)!r} must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(WORLD_ENV, f"rank {rank} of a world of {world} (local rank {local}) is impossible")
    if world == 1:
        return None
    return RankInfo(rank, world, local)


def owner(partition: int, world: int) -> int:
    """The rank that trains on ``partition`` (static: ``partition % world``)."""
    return partition % world


def share(partitions: Iterable[int], rank: int, world: int) -> list[int]:
    """The partitions of ``rank`` among ``partitions`` (sorted)."""
    return sorted(p for p in partitions if owner(p, world) == rank)


# --- the process group -------------------------------------------------------------------
class Group:
    """The process group of a data-parallel trainer, with collectives that fail clearly.

    Tensor collectives run on ``device`` (NCCL on CUDA, gloo on the CPU); object collectives
    (checkpoint parts, held-back examples, decisions of rank 0) on a gloo group on the CPU.
    """

    def __init__(self, info: RankInfo, device: torch.device, objects: Any = None) -> None:
        self.info = info
        self.rank, self.world = info.rank, info.world
        self.device = device
        self._objects = objects

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @classmethod
    def init(cls, info: RankInfo, *, device: torch.device, timeout_s: float, init_method: str | None = None) -> Group:
        """Join the group (``env://`` as set by torchrun, unless ``init_method``)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(backend, init_method=init_method or "env://", rank=info.rank,
                                    world_size=info.world, timeout=timeout)
            objects = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        except (RuntimeError, ValueError) as exc:
            raise GroupError(f"rank {info.rank}/{info.world}: cannot join the trainer group ({_first_line(exc)})") from exc
        log.info("rank %d of %d (local rank %d, pid %d) joined the trainer group: %s on %s, timeout %.0fs",
                 info.rank, info.world, info.local_rank, os.getpid(), backend, device, timeout_s)
        return cls(info, device, objects)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # gloo/NCCL: a peer's sockets closed, or a timeout
            raise GroupError(
                f"rank {self.rank}/{self.world}: {what} failed: another rank died or did not answer "
                f"in time ({_first_line(exc)}); stopping the group without a checkpoint (a restart "
                "of the whole group resumes from the last one)"
            ) from exc

    # --- tensors ---------------------------------------------------------------------------
    def all_reduce_(self, tensor: Tensor, what: str = "an all-reduce") -> Tensor:
        self._call(what, dist.all_reduce, tensor)
        return tensor

    def all_sum(self, values: Sequence[float], what: str = "an all-reduce") -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return [float(v) for v in self.all_reduce_(t, what).cpu()]

    def agree(self, every: Mapping[str, float], main: Mapping[str, float] | None = None) -> dict[str, float]:
        """The lockstep round: ``every`` summed over the ranks, and rank 0's ``main`` values (one
        all-reduce; the other ranks' ``main`` values are ignored, so every rank reads rank 0's)."""
        main = main or {}
        keys = list(every) + list(main)
        vals = [float(v) for v in every.values()] + [float(v) if self.is_main else 0.0 for v in main.values()]
        return dict(zip(keys, self.all_sum(vals, "the lockstep round"), strict=True))

    def broadcast_(self, tensor: Tensor, src: int = 0, what: str = "a broadcast") -> None:
        self._call(what, dist.broadcast, tensor, src)

    def barrier(self, what: str = "a barrier") -> None:
        # an all-reduce, not dist.barrier: NCCL's barrier guesses a device
        self.all_sum([0.0], what)

    # --- objects -----------------------------------------------------------------------------
    def broadcast_object(self, obj: Any, src: int = 0, what: str = "a broadcast") -> Any:
        box = [obj if self.rank == src else None]
        self._call(what, dist.broadcast_object_list, box, src, group=self._objects)
        return box[0]

    def all_gather_object(self, obj: Any, what: str = "an all-gather") -> list[Any]:
        out: list[Any] = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj, group=self._objects)
        return out

    def gather_object(self, obj: Any, what: str = "a gather") -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.world if self.is_main else None
        self._call(what, dist.gather_object, obj, out, dst=0, group=self._objects)
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# --- replicas ----------------------------------------------------------------------------
def _synced_tensors(model: RecModel) -> list[Tensor]:
    """What can differ between replicas: the trainable parameters and every buffer (the frozen
    encoder is loaded from the same files on every rank)."""
    return [p.data for p in model.parameters() if p.requires_grad] + list(model.buffers())


def broadcast_model(model: RecModel, group: Group, src: int = 0) -> None:
    """Make every replica equal to rank ``src``'s (trainable parameters and buffers)."""
    for t in _synced_tensors(model):
        if t.dtype == torch.bool:  # not every backend reduces bools
            carrier = t.to(torch.uint8)
            group.broadcast_(carrier, src, "the model broadcast")
            t.copy_(carrier.bool())
        else:
            group.broadcast_(t, src, "the model broadcast")


def needs_centring(learner: ContinualLearner) -> bool:
    model = learner.model
    return bool(model.config.center_text) and not bool(model.item_tower.centred)


def sync_centring(learner: ContinualLearner, group: Group) -> bool:
    """Centre a fresh model's text vectors the same way on every rank (before its first update).

    Each rank centres on its catalog; the lowest rank that could (a non-empty catalog) is
    broadcast to the others, so no rank centres on its own inside a step later.  Returns whether
    the model is centred now.  Replicas agree on :func:`needs_centring`, so either every rank
    calls this or none.
    """
    learner._maybe_center()  # noqa: SLF001 - the learner's own "before the first update" rule
    flags = [0.0] * group.world
    flags[group.rank] = float(bool(learner.model.item_tower.centred))
    done = group.all_sum(flags, "the centring round")
    centred = [r for r, f in enumerate(done) if f > 0]
    if not centred:
        return False
    broadcast_model(learner.model, group, src=centred[0])
    return True


def replica_digest(model: RecModel) -> str:
    """sha256 of the trainable parameters and buffers: equal on every rank, or the replicas diverged."""
    h = hashlib.sha256()
    for t in _synced_tensors(model):
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- gradients -----------------------------------------------------------------------------
def average_gradients(params: Sequence[Tensor], weight: float, group: Group) -> float:
    """Replace each parameter's gradient by the ranks' average weighted by ``weight`` (this
    rank's examples; 0 = this rank contributes nothing); returns the total weight.

    One all-reduce of one flat buffer: every gradient (sparse ones densely), one "has a gradient"
    flag per parameter and the weight.  A parameter no contributing rank has a gradient for keeps
    ``None`` (the optimizers then leave it alone), and with a total weight of 0 every gradient is
    ``None`` (no rank had an example: the update changes nothing).
    """
    if not params:
        return group.all_sum([weight], "the gradient all-reduce")[0]
    dev = params[0].device
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    flat = torch.zeros(total + len(params) + 1, dtype=torch.float32, device=dev)
    if weight > 0:
        off = 0
        for i, p in enumerate(params):
            g = p.grad
            if g is not None:
                g = g.to_dense() if g.is_sparse else g
                flat[off : off + sizes[i]].copy_(g.reshape(-1)).mul_(weight)
                flat[total + i] = 1.0
            off += sizes[i]
        flat[-1] = weight
    group.all_reduce_(flat, "the gradient all-reduce")
    weight_sum = float(flat[-1])
    has = flat[total : total + len(params)].cpu().tolist()
    off = 0
    for i, p in enumerate(params):
        if weight_sum > 0 and has[i] > 0:
            p.grad = flat[off : off + sizes[i]].div(weight_sum).reshape(p.shape).to(p.dtype)
        else:
            p.grad = None
        off += sizes[i]
    return weight_sum


class GradientAverager:
    """The learner's ``grad_hook`` in a group: :func:`average_gradients` at every update, with the
    weight of this rank's current step (:meth:`begin`); counts the updates made.  Its
    :attr:`posterior` is the learner's ``posterior_hook`` (:class:`PosteriorGather`), begun and
    completed with it."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.weight = 0.0
        self.calls = 0
        self.posterior = PosteriorGather(group)

    def begin(self, weight: float) -> None:
        self.weight = float(weight)
        self.calls = 0
        self.posterior.begin()

    def __call__(self, params: list[Tensor]) -> None:
        self.calls += 1
        average_gradients(params, self.weight, self.group)

    def complete(self, learner: ContinualLearner) -> None:
        """The updates this rank's step did not make (no examples, or an early return): made now
        with zero weight, so every rank takes part in exactly ``updates_per_batch`` of them."""
        want = learner.config.updates_per_batch
        if self.calls > want:
            raise GroupError(f"rank {self.group.rank}: the learner made {self.calls} updates in one step, "
                             f"the group expects {want} (updates_per_batch)")
        self.weight = 0.0
        while self.calls < want:
            empty_update(learner)
        self.posterior.complete(learner)


def empty_update(learner: ContinualLearner) -> float:
    """One optimizer update without examples of this rank: the learner's own update path
    (learning-rate schedule, clipping, non-finite check) on the other ranks' gradients."""
    params = [p for opt in learner.optimizers for g in opt.param_groups for p in g["params"]]
    zero = params[0].sum() * 0.0  # a graph to run backward on; the grad hook ignores it (weight 0)
    return learner._update(zero)  # noqa: SLF001 - the same update as a step's, hook included


class PosteriorGather:
    """The learner's ``posterior_hook`` in a group: every rank's posterior examples of the step,
    gathered in rank order, so every replica makes the same closed-form update of the per-user
    posterior (trainer/posterior.py) and the replicas stay bit-identical."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.calls = 0

    def begin(self) -> None:
        self.calls = 0

    def __call__(self, examples: PosteriorExamples) -> PosteriorExamples:
        self.calls += 1
        parts = self.group.all_gather_object(examples.cpu(), "the posterior's all-gather")
        return PosteriorExamples.concat(parts)

    def complete(self, learner: ContinualLearner) -> None:
        """A rank whose step made no posterior update (no examples) takes part in the gather now,
        and applies the others' examples."""
        if learner.has_posteriors and self.calls == 0:
            k = learner.user_posterior.k if learner.user_posterior is not None else 0
            learner.learn_posterior(PosteriorExamples.empty(k))


def attach(learner: ContinualLearner, group: Group) -> GradientAverager:
    """Make the learner average its gradients over the group at every update (and gather the
    per-user posterior's examples of every step)."""
    averager = GradientAverager(group)
    learner.grad_hook = averager
    learner.posterior_hook = averager.posterior
    return averager


def synced_step(
    learner: ContinualLearner, examples: Sequence[Labeled], group: Group, averager: GradientAverager
) -> tuple[dict[str, float] | None, int]:
    """One lockstep step of every rank (call it on every rank when any has examples): this rank's
    step stats (None without examples) and the examples the group trained.

    ``learner.examples_trained`` is the group's count on every rank (the warm-up reads it, and the
    published ``trained_examples`` is it).
    """
    if needs_centring(learner):
        sync_centring(learner, group)
    before = learner.examples_trained
    averager.begin(len(examples))
    stats = learner.step(list(examples)) if examples else None
    averager.complete(learner)
    mine = learner.examples_trained - before
    trained = int(group.all_sum([mine], "the step count")[0])
    learner.examples_trained = before + trained
    return stats, trained


# --- checkpoint parts ----------------------------------------------------------------------
def split_learner_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the replicated part, this rank's own part) of a learner state dict."""
    own = {k: v for k, v in state.items() if k in PER_RANK_LEARNER_KEYS}
    shared = {k: v for k, v in state.items() if k not in PER_RANK_LEARNER_KEYS}
    return shared, own


def merge_learner_state(main_state: Mapping[str, Any], own: Mapping[str, Any] | None) -> dict[str, Any]:
    """Rank 0's learner state with a rank's own parts in place of rank 0's (None: rank 0 itself)."""
    out = dict(main_state)
    if own:
        out.update(own)
    return out


def checkpoint_world_size(service_state: Mapping[str, Any]) -> int:
    return int(service_state.get("world_size", 1))


def check_world_size(service_state: Mapping[str, Any], world: int, *, where: str) -> None:
    """Refuse a checkpoint written by a group of another size (a single process counts as 1)."""
    found = checkpoint_world_size(service_state)
    if found == world:
        return
    how = "a single trainer process" if found == 1 else f"a group of {found} trainer ranks"
    now = "a single trainer process" if world == 1 else f"a group of {world} ranks"
    raise CheckpointError(
        f"checkpoint {where} was written by {how}, and this is {now}: each rank's offsets, dedupe "
        f"window and trained-ids log belong to a partition share of {found}; restart with "
        f"{'no torchrun' if found == 1 else f'torchrun --nproc-per-node {found}'} to resume it, or "
        "point STREAMREC_TRAINER_CHECKPOINT_DIR at an empty directory to start a new lineage "
        "(STREAMREC_TRAINER_INIT_FROM can start it from a published version)"
    )


def rank_path(path: os.PathLike[str] | str, rank: int) -> str:
    """Rank ``rank``'s file of a per-process file (``<path>.rank<r>``)."""
    return f"{os.fspath(path)}.rank{rank}"
