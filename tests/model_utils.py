"""Helpers shared by tests that need a model that has 'trained' (no Kafka)."""

from __future__ import annotations

import torch

from trainer.model import RecModel


def perturb(model: RecModel, seed: int, scale: float = 0.05) -> None:
    """Stand-in for training: move every trainable tensor a little (seeded): the parameters and the
    per-user posterior's means (which the learner fits in closed form)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
