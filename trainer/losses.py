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


def ipw_weights(propensity: Tensor, clip: float) -> Tensor:
    """Inverse-propensity weights ``min(1/p, clip)`` of logged examples (``p`` = 1 where none was logged,
    so those weigh 1); ``clip <= 0`` = off (all ones).

    With the weights, the click loss over logged examples estimates the loss over everything the
    logging policy could have shown, each candidate counted once, instead of over what it chose to
    show (counterfactual risk minimisation): the model stops learning the logging policy's
    selection as if it were the users' preference.  ``p`` is the example's ``Labeled.propensity``
    as logged: at position 0 the probability that the item was shown there, further down (serving's
    exploration) the probability given the items above it.  The clip bounds the variance (and the
    step size of one rare example) at the price of a bias towards the logged distribution.
    """
    if clip <= 0:
        return torch.ones_like(propensity)
    return torch.clamp(1.0 / propensity.clamp_min(1e-12), max=clip)


class RecTrain(nn.Module):
    """Owns the losses: weighted click BCE, category BCE, value Huber, and distillation.

    Distillation pulls the click probabilities towards a teacher's (the last
    published model) at temperature ``T``: BCE(sigmoid(s/T), sigmoid(t/T)) * T^2.

    With ``ModelConfig.position_slots`` the click loss fits ``logit + r[position] - r[0]`` (a shallow
    position tower, see :meth:`trainer.model.RecModel.position_logits`; the model's logit, which
    scoring and serving use, holds ``r[0]``, the top of the slate), so that logit is left to explain
    what the position does not.  Distillation compares the logits without the term.

    ``ipw_clip > 0`` multiplies each example's click-loss weight by :func:`ipw_weights` of its logged
    propensity (``STREAMREC_TRAINER_IPW_CLIP``; the service sets the attribute after building the
    learner, see :func:`trainer.configure.build_learner`).  The weighted loss is normalised by the
    sum of the weights, as the downsampling weights are.
    """

    def __init__(
        self, model: RecModel, *, distill_weight: float = 0.0, distill_temperature: float = 1.0,
        ipw_clip: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.ipw_clip = ipw_clip

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
        if self.ipw_clip > 0 and batch.propensity is not None:
            w = w * ipw_weights(batch.propensity.to(w), self.ipw_clip)
        norm = w.sum().clamp_min(1e-12)
        fit = logits  # what the click loss fits: + the position's term when the model has one
        pos = self.model.position_logits(batch.position) if batch.position is not None else None
        if pos is not None:
            fit = logits + pos.float()
        bce = F.binary_cross_entropy_with_logits(fit, batch.labels, reduction="none") * w
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
