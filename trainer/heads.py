"""The heads of the two-tower model: click (a dot product of augmented vectors), category, value."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ClickHead(nn.Module):
    """logit = user . item + item bias + user bias + b, on augmented vectors.

    The last column of each vector is its bias; the rest of an item vector
    is unit length and a user vector is ``scale * taste + e_user`` (see
    :class:`RecModel`), so the logit is ``scale * cos(taste, item) +
    e_user . item + biases``: the text similarity of the candidate to the
    user's history, plus a per-user linear model over the item vectors.
    ``item_bias`` is the text part of the item's bias, applied by the model
    when it builds the item vector.  Pairwise or all pairs, the same formula.
    """

    def __init__(self, dim: int, init_ctr: float, init_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.item_bias = nn.Linear(dim, 1)
        nn.init.zeros_(self.item_bias.weight)
        nn.init.zeros_(self.item_bias.bias)
        self.bias = nn.Parameter(torch.tensor(math.log(init_ctr / (1.0 - init_ctr))))

    def scale(self) -> Tensor:
        """The weight of the history's text similarity (the user vector's length before ``e_user``)."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        dot = (user_vecs[..., :-1] * item_vecs[..., :-1]).sum(-1)
        return dot + item_vecs[..., -1] + user_vecs[..., -1] + self.bias

    def matrix(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        return user_vecs[:, :-1] @ item_vecs[:, :-1].T + item_vecs[:, -1][None, :] + user_vecs[:, -1][:, None] + self.bias


class CategoryHead(nn.Module):
    """Multi-label category logits from the item vector (text only)."""

    def __init__(self, dim: int, n_categories: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_categories))

    def forward(self, item_vecs: Tensor) -> Tensor:
        return self.net(item_vecs)


class ValueHead(nn.Module):
    """Expected value of a click (e.g. rating, dwell seconds) for a user-item pair."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1)
        )

    def forward(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        return self.net(torch.cat([user_vecs, item_vecs, user_vecs * item_vecs], dim=-1)).squeeze(-1)
