"""The training wrapper of :class:`~trainer.model.RecModel`: the losses and their task weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.batching import Batch
from trainer.model import ModelOutput, RecModel


@dataclass
class TrainOutput:
    loss: Tensor
    losses: dict[str, float]
    output: ModelOutput
    id_loss: Tensor | None = None
    """The loss over the examples allowed to train the per-id rows (``id_mask``); None = all of them."""


class RecTrain(nn.Module):
    """Owns the losses: weighted click BCE, category BCE, value Huber, and distillation.

    Distillation pulls the click probabilities towards a teacher's (the last
    published model) at temperature ``T``: BCE(sigmoid(s/T), sigmoid(t/T)) * T^2.
    """

    def __init__(self, model: RecModel, *, distill_weight: float = 0.0, distill_temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def forward(
        self, batch: Batch, teacher_logits: Tensor | None = None, id_mask: Tensor | None = None
    ) -> TrainOutput:
        """``id_mask`` (``[b]`` bool): also return the loss of only these examples, whose gradient
        the learner gives the per-id rows (replayed examples train the shared parts only)."""
        out = self.model(batch)
        total, parts, id_loss = self.losses(batch, out, teacher_logits, id_mask)
        return TrainOutput(total, parts, output=out, id_loss=id_loss)

    def losses(
        self, batch: Batch, out: ModelOutput, teacher_logits: Tensor | None = None, id_mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float], Tensor | None]:
        tw = self.model.config.task_weights
        logits = out.click_logits.float()
        w = batch.weights.to(logits.dtype)
        norm = w.sum().clamp_min(1e-12)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none") * w
        click = bce.sum() / norm
        id_loss = None
        if id_mask is not None:  # the same normalisation: the rows' steps keep their scale
            id_loss = tw.click * (bce * id_mask.to(bce.dtype)).sum() / norm
        total = tw.click * click
        parts = {"click": float(click.detach())}
        if out.category_logits is not None and bool(batch.category_mask.any()):
            m = batch.category_mask
            cat = F.binary_cross_entropy_with_logits(out.category_logits.float()[m], batch.category_targets[m])
            total = total + tw.category * cat
            parts["category"] = float(cat.detach())
        if out.value_pred is not None and bool(batch.value_mask.any()):
            m = batch.value_mask
            val = F.smooth_l1_loss(out.value_pred.float()[m], batch.values[m])
            total = total + tw.value * val
            parts["value"] = float(val.detach())
        if teacher_logits is not None and self.distill_weight > 0:
            t = self.distill_temperature
            target = torch.sigmoid(teacher_logits.float().detach() / t)
            per = F.binary_cross_entropy_with_logits(logits / t, target, reduction="none") * (t * t)
            distill = per.mean()
            total = total + self.distill_weight * distill
            if id_loss is not None:
                id_loss = id_loss + self.distill_weight * (per * id_mask.to(per.dtype)).sum() / per.numel()
            parts["distill"] = float(distill.detach())
        parts["loss"] = float(total.detach())
        return total, parts, id_loss
