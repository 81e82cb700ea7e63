"""The continual learner: a plain class fed batches of labeled examples (no Kafka inside).

Each :meth:`ContinualLearner.step` is *prequential* (test-then-train): the
model scores the batch first, those predictions update the metrics, and only
then does the model learn from the batch.  Forgetting countermeasures, each
switchable in :class:`LearnerConfig` / :class:`~trainer.model.ModelConfig`:

- a reservoir replay buffer mixes old examples into every update;
- distillation towards the last published model (:meth:`set_teacher`);
- parameter-efficient updates: frozen lower encoder layers, LoRA adapters.

Cost: each unique item is encoded once per batch; the frozen encoder prefix
of an item is computed once and cached (:class:`~trainer.model.PrefixCache`);
the teacher's item vectors are cached too (it does not change between
publishes).  Negative downsampling (off by default) drops a share of the
negatives from the *update* and weights the kept ones by ``1/rate``, so the
predicted probabilities stay calibrated.

``state_dict()`` holds everything a checkpoint needs except Kafka offsets and
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contract.errors import StreamrecError
from contract.records import Labeled
from trainer.batching import Batch, build_batch
from trainer.catalog import Catalog
from trainer.dedupe import DedupeWindow
from trainer.device import DeviceError, resolve_device
from trainer.learner_config import LearnerConfig
from trainer.losses import RecTrain
from trainer.metrics import PrequentialMetrics, binary_metrics
from trainer.model import ModelConfig, RecModel
from trainer.optim import RowAdagrad
from trainer.posterior import (
    ItemBiasPosterior,
    PosteriorExamples,
    UserPosterior,
    posterior_examples,
)
from trainer.prefix_cache import PrefixCache
from trainer.replay_buffer import ReservoirBuffer

log = logging.getLogger(__name__)

STATE_VERSION = 6
"""2: the projection has its own AdamW group and the id rows a row-wise Adagrad (1 cannot be resumed);
3: the history cosine's weight has its own AdamW group (``lr_scale``; 2 cannot be resumed);
4: the Adagrad of the rows has a group per kind (item ids, user rows, positions; 3 cannot be resumed).
5: the per-user posterior's precisions (``posterior``; 4 cannot be resumed).
6: the item-id biases' posterior (``item_bias``; 5 cannot be resumed)."""
CENTER_ITEMS = 4096
"""Catalog items whose mean text vector centres a fresh model (the first ids in sorted order)."""


class LearnerError(StreamrecError):
    """A learner that cannot run as configured, or a checkpoint that does not fit it."""


class ContinualLearner:
    """Test-then-train multi-task learner over :class:`~contract.records.Labeled` batches."""

    # --- data-parallel hook (trainer/distributed.py): None in a single process -------------------
    grad_hook: Callable[[list[Tensor]], None] | None = None
    """Called at every optimizer update with the parameters, before clipping: a data-parallel rank
    replaces their gradients by the group's average there (trainer/distributed.py)."""
    posterior_hook: Callable[[PosteriorExamples], PosteriorExamples] | None = None
    """Called once per step with the examples the per-user posterior learns from: a data-parallel
    rank returns the whole group's (every replica then makes the same update)."""

    def __init__(self, model: RecModel, config: LearnerConfig | None = None, catalog: Catalog | None = None) -> None:
        self.config = config or LearnerConfig()
        self.catalog = catalog if catalog is not None else Catalog()
        try:
            self.device = resolve_device(self.config.device)
        except DeviceError as exc:
            raise LearnerError(str(exc)) from exc
        self.model = model.to(self.device)
        self.item_bias: ItemBiasPosterior | None = None
        """The item-id biases' posterior (LearnerConfig.item_bias_prior_stds); None = Adagrad at lr_ids."""
        if self.config.item_bias_prior_stds and self.model.item_id_bias is not None:
            self.model.fit_item_bias_in_closed_form()  # before the optimizers: no optimizer holds them
            self.item_bias = ItemBiasPosterior(
                self.model.item_id_bias.weight.data,
                prior_stds=self.config.item_bias_prior_stds,
                forgetting=self.config.item_bias_forgetting,
                newton_steps=self.config.posterior_newton_steps,
            )
        self.amp = self.device.type == "cuda" and self.config.bf16
        if self.config.prefix_cache_size and model.item_tower.frozen > 0:
            self.model.attach_cache(PrefixCache(self.config.prefix_cache_size))
        self.train_wrapper = RecTrain(
            self.model,
            distill_weight=self.config.distill_weight,
            distill_temperature=self.config.distill_temperature,
        )
        self.optimizer = self._make_optimizer()
        self.id_optimizer = self._make_id_optimizer()
        mean = self.model.user_posterior_mean
        self.user_posterior = (
            UserPosterior(
                mean,
                prior_std=self.config.posterior_prior_std,
                forgetting=self.config.posterior_forgetting,
                newton_steps=self.config.posterior_newton_steps,
                refit_every=self.config.posterior_refit_every,
                change_hazard=self.config.posterior_change_hazard,
                full_prior=self.config.posterior_full_prior,
            )
            if mean is not None
            else None
        )
        self.metrics = PrequentialMetrics(self.config.window, threshold=self.config.threshold)
        # keyed by example_id: a positive replaces its example's fake negative (DESIGN.md §3.3)
        self.replay: ReservoirBuffer[Labeled] = ReservoirBuffer(
            self.config.replay_size, seed=self.config.seed, key=_example_id
        )
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self._seen = DedupeWindow(self.config.dedup_window)
        """Redelivered examples are dropped here only when the learner is fed directly; the trainer
        service dedupes in its feed (checkpointed with the offsets) and sets dedup_window=0."""
        self.teacher: RecModel | None = None
        self._teacher_state: dict[str, Tensor] | None = None
        self._teacher_items = PrefixCache(max(self.config.teacher_cache_size, 1))
        self.examples_trained = 0
        self.example_updates = 0
        """Compute: examples (fresh and replayed) times the optimizer steps taken on them."""
        self.examples_skipped = 0
        self.steps = 0
        self.last_scored: tuple[list[Labeled], np.ndarray] = ([], np.zeros(0))
        """The examples the last step scored (prequential) and their predicted probabilities."""

    # --- setup ------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer | None:
        lrs = {
            "encoder": self.config.lr_encoder,
            "projection": self.config.lr_projection,
            "towers": self.config.lr_towers,
            "heads": self.config.lr_heads,
            "scale": self.config.lr_scale,
            "item_ids": self.config.lr_item_ids,
            "posterior": self.config.lr_posterior_weight,
        }
        by_group = self.model.parameter_groups()
        groups = []
        for name, params in by_group.items():
            if name in ("ids", "user_ids", "position"):  # Adagrad's (see _make_id_optimizer)
                continue
            # weight decay on id rows would shrink every row at every step, seen or not
            decay = [p for p in params if p.ndim >= 2 and name != "item_ids"]
            no_decay = [p for p in params if p.ndim < 2 or name == "item_ids"]
            for suffix, ps, wd in (("", decay, self.config.weight_decay), ("_no_decay", no_decay, 0.0)):
                if ps:
                    groups.append(
                        {"name": name + suffix, "params": ps, "lr": lrs[name], "base_lr": lrs[name], "weight_decay": wd}
                    )
        if not groups and not any(by_group[n] for n in ("ids", "user_ids", "position")):
            raise LearnerError("the model has no trainable parameters")
        if not groups:
            return None
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, fused=fused) if fused else torch.optim.AdamW(groups)

    def _make_id_optimizer(self) -> torch.optim.Optimizer | None:
        by_group = self.model.parameter_groups()
        groups = [
            {"name": name, "params": by_group[name], "lr": lr}
            for name, lr in (
                ("ids", self.config.lr_ids),
                ("user_ids", self.config.lr_ids if self.config.lr_user_ids is None else self.config.lr_user_ids),
                ("position", self.config.lr_position),
            )
            if by_group[name]
        ]
        if not groups:
            return None
        # no weight decay: it would shrink every row at every step, seen or not
        if self.config.id_optimizer == "row_adagrad":
            return RowAdagrad(groups, lr=self.config.lr_ids, decay=self.config.id_decay)
        return torch.optim.Adagrad(groups, lr=self.config.lr_ids)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.id_optimizer) if o is not None]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- the teacher --------------------------------------------------------------------
    def set_teacher(self, state: dict[str, Tensor] | None) -> None:
        """Distil towards these weights (full or trainable-only state of the same config); None = off."""
        if state is None:
            self.teacher, self._teacher_state = None, None
            self._teacher_items.clear()
            return
        cache = self.model.prefix_cache
        self.model.attach_cache(None)  # do not deep-copy the cache
        try:
            teacher = copy.deepcopy(self.model)
        finally:
            self.model.attach_cache(cache)
        own = teacher.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise LearnerError(f"teacher state does not fit the model: unknown keys {unknown[:5]}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise LearnerError(f"teacher state does not fit the model: {k} has shape {tuple(v.shape)}")
        teacher.load_state_dict(state, strict=False)
        teacher.requires_grad_(False)
        teacher.eval()
        if cache is not None and _same_prefix(teacher, self.model):
            teacher.attach_cache(cache)
        self.teacher = teacher
        self._teacher_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self._teacher_items.clear()

    def _teacher_logits(self, batch: Batch) -> Tensor | None:
        teacher = self.teacher
        if teacher is None or self.config.distill_weight <= 0:
            return None
        if teacher.user_posterior_mean is not None and self.model.user_posterior_mean is not None:
            # the posterior is per-user state fitted in closed form, not distilled: the teacher scores
            # with the current one, so distillation holds back only what gradients learn
            teacher.user_posterior_mean.copy_(self.model.user_posterior_mean)
        with torch.no_grad(), self._autocast():
            vecs: list[Tensor | None] = [
                self._teacher_items.get(i, h) for i, h in zip(batch.item_ids, batch.text_hashes, strict=True)
            ]
            missing = [n for n, v in enumerate(vecs) if v is None]
            if missing:
                entries = self.catalog.entries()
                fresh = teacher.encode_items(
                    [batch.texts[n] for n in missing],
                    [batch.item_ids[n] for n in missing],
                    [batch.text_hashes[n] for n in missing],
                    [entries[batch.item_ids[n]].categories if batch.item_ids[n] in entries else () for n in missing],
                ).float()
                for row, n in enumerate(missing):
                    vecs[n] = fresh[row]
                    self._teacher_items.put(batch.item_ids[n], batch.text_hashes[n], fresh[row])
            items = torch.stack([v.to(self.device) for v in vecs])  # type: ignore[union-attr]
            users = teacher.encode_users_indexed(items, batch.history, batch.history_mask, batch.user_ids)
            logits = teacher.click_logits(users[batch.context], items[batch.candidate]).float()
            if self.item_bias is not None and teacher.item_id_bias is not None and self.model.item_id_bias is not None:
                # the item biases are fitted in closed form too: the teacher scores with the current ones
                # (its cached item vectors keep its own, so the difference is added here)
                rows = self.model.item_rows([batch.item_ids[c] for c in batch.candidate.tolist()], self.device)
                logits = logits + (self.model.item_id_bias.weight[rows, 0] - teacher.item_id_bias.weight[rows, 0]).float()
            return logits

    # --- learning -------------------------------------------------------------------------
    def _dedup(self, examples: Sequence[Labeled]) -> list[Labeled]:
        if not self.config.dedup_window:
            return list(examples)
        return [ex for ex in examples if self._seen.first_time(ex)]

    def step(self, examples: Sequence[Labeled]) -> dict[str, float]:
        """Score the batch (metrics), then learn from it; return the step's losses and metrics.

        The model is left in training mode; :meth:`predict` and :meth:`evaluate`
        switch to inference mode themselves.
        """
        t0 = time.perf_counter()
        fresh_all = self._dedup(examples)
        known = self.catalog.entries()
        kept = [i for i, ex in enumerate(fresh_all) if ex.item_id in known]
        skipped = len(fresh_all) - len(kept)
        self.examples_skipped += skipped
        stats: dict[str, float] = {
            "examples": float(len(kept)),
            "duplicates": float(len(examples) - len(fresh_all)),
            "skipped": float(skipped),
        }
        if skipped:
            log.debug("skipped %d examples whose item is not in the catalog", skipped)
        if not kept:
            self.last_scored = ([], np.zeros(0))
            return stats
        fresh = [fresh_all[i] for i in kept]
        scored = [not ex.late for ex in fresh]  # a late positive was already scored as a negative
        self._maybe_center()

        # negative downsampling of the update (the scores above cover every fresh example)
        rate = self.config.negative_sampling_rate
        if rate < 1.0:
            draw = torch.rand(len(fresh), generator=self._rng).tolist()
            train_idx = [i for i, ex in enumerate(fresh) if ex.label == 1 or draw[i] < rate]
            weights = [1.0 if fresh[i].label == 1 else 1.0 / rate for i in train_idx]
        else:
            train_idx, weights = list(range(len(fresh))), [1.0] * len(fresh)
        n_replay = int(round(self.config.replay_ratio * len(fresh))) if self.config.replay_size else 0
        replayed = [ex for ex in self.replay.sample(n_replay) if ex.item_id in self.catalog]
        update = [fresh[i] for i in train_idx] + replayed
        weights += [1.0] * len(replayed)

        # With every fresh example in the update and no dropout, train and eval mode compute the
        # same function: the training forward (before the update) is the prequential score.
        one_pass = rate == 1.0 and self.model.config.dropout == 0.0
        if not one_pass:
            fresh_batch, _ = build_batch(
                fresh, self.catalog, max_history=self.model.config.max_history, categories=self.model.config.categories
            )
            probs = self._score(fresh_batch)
        batch, in_batch = build_batch(
            update, self.catalog, max_history=self.model.config.max_history,
            categories=self.model.config.categories, weights=weights,
        )
        batch = batch.to(self.device)
        id_mask = None
        if replayed and self.id_optimizer is not None and not self.config.replay_ids:
            n_fresh = len(train_idx)
            id_mask = torch.tensor([k < n_fresh for k in in_batch], dtype=torch.bool, device=self.device)
        if not self.model.training:  # (toggling every module each step costs more than it seems)
            self.model.train()

        teacher_logits = self._teacher_logits(batch)
        with self._autocast():
            out = self.train_wrapper(batch, teacher_logits, id_mask)
        if one_pass:
            probs = torch.sigmoid(out.output.click_logits[: len(fresh)].detach().float()).cpu().numpy()

        labels = np.array([ex.label for ex in fresh], dtype=np.float32)
        mask = np.array(scored)
        self.metrics.update(labels[mask], probs[mask])
        self.last_scored = ([ex for ex, s in zip(fresh, scored, strict=True) if s], probs[mask])

        grad_norm = self._update(out.loss, out.id_loss)
        for _ in range(self.config.updates_per_batch - 1):
            with self._autocast():
                again = self.train_wrapper(batch, teacher_logits, id_mask)
            grad_norm = self._update(again.loss, again.id_loss)
        if self.user_posterior is not None or self.item_bias is not None:
            # the offsets after the gradient steps: the user rows have already taken up part of the
            # batch's evidence, which the posterior must not count a second time
            with torch.no_grad(), self._autocast():
                after = self.model(batch)
            fresh_rows = [k for k, j in enumerate(in_batch) if j < len(train_idx)]
            late = [update[in_batch[k]].late for k in fresh_rows]
            self.learn_posterior(posterior_examples(self.model, batch, after, fresh_rows, late))

        for ex in fresh:
            self.replay.add(ex)
        self.examples_trained += len(fresh)
        self.example_updates += len(update) * self.config.updates_per_batch
        self.steps += 1
        stats.update(out.losses)
        stats.update({f"batch_{k}": v for k, v in binary_metrics(labels[mask], probs[mask], self.config.threshold).items() if k in ("auc", "log_loss", "ctr")})
        stats.update(
            {
                "trained": float(len(train_idx)),
                "replayed": float(len(replayed)),
                "unique_items": float(len(batch.item_ids)),
                "item_tokens": float(self.model.item_tower.last_encode.get("tokens", 0)),
                "prefix_tokens": float(self.model.item_tower.last_encode.get("prefix_tokens", 0)),
                "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0,
            }
        )
        if self.user_posterior is not None:
            stats["posterior_users"] = float(len(self.user_posterior.rows))
            stats["posterior_changes"] = self.user_posterior.changes
        if self.item_bias is not None:
            stats["item_bias_prior_std"] = self.item_bias.prior_stds[self.item_bias.chosen]
        return stats

    @property
    def has_posteriors(self) -> bool:
        """Whether a closed-form step follows each batch (the per-user posterior, the item biases')."""
        return self.user_posterior is not None or self.item_bias is not None

    def learn_posterior(self, examples: PosteriorExamples) -> int:
        """The closed-form step on these examples (the group's, through :attr:`posterior_hook`): the
        per-user posterior's, then the item biases' with the users' new term in their offsets;
        returns the number of users updated."""
        if not self.has_posteriors:
            return 0
        if self.posterior_hook is not None:
            examples = self.posterior_hook(examples)
        users = 0
        if self.user_posterior is not None:
            mean = self.user_posterior.mean
            rows = examples.rows.to(mean.device)
            before = mean[rows].float()
            users = self.user_posterior.update(examples)
            if self.item_bias is not None and rows.numel():
                weight = self.model.posterior_weight.detach().clamp(0.0, 2.0).float()  # type: ignore[union-attr]
                z = examples.features.to(mean.device, torch.float32)
                moved = weight * ((mean[rows].float() - before) * z).sum(1)
                examples = examples._replace(item_offsets=examples.item_offsets.to(mean.device, torch.float32) + moved)
        if self.item_bias is not None:
            self.item_bias.update(examples)
        return users

    def _update(self, loss: Tensor, id_loss: Tensor | None = None) -> float:
        """One optimizer step on ``loss``; returns the gradient norm (a non-finite one skips the step).

        With ``id_loss`` the per-id rows step on its gradient instead (the fresh examples' part).
        """
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.optimizer is not None:
            warm = self.config.warmup_examples
            factor = min(1.0, (self.examples_trained + 1) / warm) if warm else 1.0
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * (1.0 if g["name"].startswith(("heads", "scale", "posterior")) else factor)
        id_grads = None
        if id_loss is not None and self.id_optimizer is not None:
            id_params = self.model.user_row_parameters()
            id_grads = torch.autograd.grad(id_loss, id_params, retain_graph=True, allow_unused=True)
        loss.backward()
        if id_grads is not None:
            for p, g in zip(id_params, id_grads, strict=True):
                p.grad = g
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        if self.grad_hook is not None:  # data parallel: the group's average gradient (trainer/distributed.py)
            self.grad_hook(params)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if math.isfinite(grad_norm):
            for opt in self.optimizers:
                opt.step()
        else:
            log.warning("non-finite gradient norm at step %d: update skipped", self.steps)
        return grad_norm

    def _maybe_center(self) -> None:
        """Before the first update of a fresh model: centre its text vectors on the catalog."""
        tower = self.model.item_tower
        if not self.model.config.center_text or bool(tower.centred):
            return
        entries = self.catalog.entries()
        if not entries:
            return
        ids = sorted(entries)[:CENTER_ITEMS]
        self.model.center_text([entries[i].text for i in ids], ids, [entries[i].text_hash for i in ids])
        log.info("text vectors centred on %d catalog items", len(ids))

    def _score(self, batch: Batch, model: RecModel | None = None) -> np.ndarray:
        """Click probabilities of a batch, no gradients, inference mode."""
        m = model if model is not None else self.model
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad(), self._autocast():
                logits = m(batch.to(self.device)).click_logits.float()
        finally:
            m.train(was_training)
        return torch.sigmoid(logits).cpu().numpy()

    def predict(self, examples: Sequence[Labeled], model: RecModel | None = None) -> tuple[np.ndarray, list[int]]:
        """Click probabilities of the examples whose item is in the catalog, and their indices."""
        if model is None or model is self.model:
            self._maybe_center()  # a fresh model is centred on first use, scored or trained
        probs: list[np.ndarray] = []
        kept_all: list[int] = []
        for start in range(0, len(examples), self.config.eval_batch_size):
            chunk = examples[start : start + self.config.eval_batch_size]
            batch, kept = build_batch(
                chunk, self.catalog, max_history=self.model.config.max_history, categories=self.model.config.categories
            )
            if kept:
                probs.append(self._score(batch, model))
                kept_all.extend(start + k for k in kept)
        return (np.concatenate(probs) if probs else np.zeros(0)), kept_all

    def evaluate(self, examples: Sequence[Labeled], model: RecModel | None = None) -> dict[str, float]:
        """Metrics of ``model`` (default: the learner's) on the examples; nothing learns."""
        if model is not None and model is not self.model:
            model = model.to(self.device)
            cache = self.model.prefix_cache
            if cache is not None and model.prefix_cache is None and _same_prefix(model, self.model):
                model.attach_cache(cache)
        probs, kept = self.predict(examples, model)
        labels = np.array([examples[i].label for i in kept], dtype=np.float32)
        out = binary_metrics(labels, probs, self.config.threshold)
        out["skipped"] = float(len(examples) - len(kept))
        return out

    # --- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, replay buffer, metrics, teacher, RNG and counters (not Kafka offsets)."""
        rng: dict[str, Any] = {
            "learner": self._rng.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "version": STATE_VERSION,
            "model_config": self.model.config.model_dump(mode="json"),
            "learner_config": self.config.model_dump(mode="json"),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "id_optimizer": self.id_optimizer.state_dict() if self.id_optimizer is not None else None,
            "posterior": self.user_posterior.state_dict() if self.user_posterior is not None else None,
            "item_bias": self.item_bias.state_dict() if self.item_bias is not None else None,
            "replay": self.replay.state_dict(encode=lambda ex: ex.to_json().decode("utf-8")),
            "metrics": self.metrics.state_dict(),
            "teacher": self._teacher_state,
            "rng": rng,
            "seen": self._seen.state(),
            "examples_trained": self.examples_trained,
            "examples_skipped": self.examples_skipped,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a checkpoint of another model config."""
        if state.get("version") != STATE_VERSION:
            raise LearnerError(f"checkpoint state version {state.get('version')!r} is not {STATE_VERSION}")
        theirs = ModelConfig.model_validate(state["model_config"])
        if theirs != self.model.config:
            raise LearnerError(
                "checkpoint was written for another model config: "
                f"{_config_diff(theirs, self.model.config)}"
            )
        if (self.item_bias is None) != (state.get("item_bias") is None):
            raise LearnerError(
                "checkpoint's item-id biases were learned "
                + ("by Adagrad" if state.get("item_bias") is None else "by the per-item posterior")
                + "; set item_bias_prior_stds as it was (empty = Adagrad)"
            )
        self.model.load_state_dict(state["model"], strict=True)
        for opt, key in ((self.optimizer, "optimizer"), (self.id_optimizer, "id_optimizer")):
            if opt is not None:
                opt.load_state_dict(state[key])
        if self.user_posterior is not None:
            self.user_posterior.load_state_dict(state["posterior"])
        if self.item_bias is not None:
            try:
                self.item_bias.load_state_dict(state["item_bias"])
            except ValueError as exc:
                raise LearnerError(f"checkpoint does not fit the learner: {exc}") from exc
        self.replay.load_state_dict(state["replay"], decode=Labeled.from_json)
        self.metrics.load_state_dict(state["metrics"])
        self.set_teacher(state["teacher"])
        self._rng.set_state(state["rng"]["learner"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self._seen = DedupeWindow(self.config.dedup_window, state["seen"])
        self.examples_trained = int(state["examples_trained"])
        self.examples_skipped = int(state["examples_skipped"])
        self.steps = int(state["steps"])


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    diffs = [f"{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db.get(k)]
    return "; ".join(diffs) or "(same fields)"


def _same_prefix(a: RecModel, b: RecModel) -> bool:
    """Whether two models compute the same frozen encoder prefix (so they can share a cache)."""
    if a.prefix_signature() != b.prefix_signature():
        return False
    pa, pb = a.frozen_prefix_parameters(), b.frozen_prefix_parameters()
    return len(pa) == len(pb) and all(x is y or torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def iter_batches(examples: Sequence[Labeled], batch_size: int) -> Iterator[list[Labeled]]:
    """Consecutive batches of a sequence of examples (the last one may be short)."""
    for start in range(0, len(examples), batch_size):
        yield list(examples[start : start + batch_size])


def _example_id(example: Labeled) -> str:
    return example.example_id
