"""Row-wise Adagrad with forgetting: the optimizer of the per-id rows (user embeddings, id biases).

torch's Adagrad keeps one accumulator per *coordinate*.  On an embedding row
that whitens the step: a coordinate that carries only noise (most of a
64-wide item space whose signal lives in a few directions) moves as far as
the one that carries the user's taste.  Row-wise Adagrad (the optimizer of
large embedding tables in DLRM/FBGEMM) keeps one accumulator per *row*, the
mean squared gradient over its coordinates, so a row moves along its raw
gradient and its step still shrinks with the evidence the row has seen, as a
counter's average does.

``decay`` < 1 forgets old evidence: each time a row is touched its
accumulator is multiplied by ``decay`` before the new gradient is added, so a
row that has seen many labels keeps a floor on its step size and can follow a
change of interests (1 = plain Adagrad, whose steps vanish).  Rows that a step
does not touch are left alone: no decay, no move.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class RowAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of each parameter (dim 0), and forgetting."""

    def __init__(self, params: Iterable, lr: float = 0.1, decay: float = 1.0, eps: float = 1e-10) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        super().__init__(params, {"lr": lr, "decay": decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, eps = group["lr"], group["decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g: Tensor = p.grad
                if g.is_sparse:
                    g = g.to_dense()
                rows = g.reshape(g.shape[0], -1) if g.ndim else g.reshape(1, 1)
                state = self.state[p]
                sq = rows.float().pow(2).mean(1, keepdim=True)
                if "sum" not in state:
                    state["sum"] = torch.zeros_like(sq)
                acc: Tensor = state["sum"]
                touched = sq > 0
                acc.copy_(torch.where(touched, acc * decay + sq, acc))
                scale = torch.where(touched, lr / (acc.sqrt() + eps), torch.zeros_like(acc))
                p.add_(-(rows * scale.to(rows.dtype)).reshape(p.shape))
        return loss
