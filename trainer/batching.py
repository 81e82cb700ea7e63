"""Labeled examples -> one typed :class:`Batch` of tensors for :class:`trainer.model.RecTrain`.

Items repeat far more than examples: a batch lists each *unique* item once
(candidates and history items together) and the examples point into that
list, so the item tower encodes every item once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from streams.records import Labeled
from trainer.catalog import Catalog


@dataclass
class Batch:
    """Tensors of one training/scoring batch (b examples, u unique items, h history slots)."""

    item_ids: list[str]
    """The u unique items of the batch; the item tower encodes each once."""
    texts: list[str]
    """Their texts, aligned with ``item_ids``."""
    text_hashes: list[str]
    candidate: Tensor
    """[b] long: index into ``item_ids`` of each example's shown item."""
    history: Tensor
    """[b, h] long: indices into ``item_ids``; valid entries first, most recent last."""
    history_mask: Tensor
    """[b, h] bool: which history slots are real."""
    user_ids: list[str]
    labels: Tensor
    """[b] float 0/1: clicked or not."""
    weights: Tensor
    """[b] float: per-example loss weights (1, or 1/rate for downsampled negatives)."""
    values: Tensor
    """[b] float: the click's value where it has one (0 elsewhere)."""
    value_mask: Tensor
    """[b] bool: the example is a click with a value."""
    category_targets: Tensor
    """[u, C] float multi-hot of each unique item's categories."""
    category_mask: Tensor
    """[u] bool: the item has at least one known category."""
    example_ids: list[str]

    def __len__(self) -> int:
        return len(self.user_ids)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
        return Batch(**moved)


def build_batch(
    examples: Sequence[Labeled],
    catalog: Catalog,
    *,
    max_history: int,
    categories: Sequence[str] = (),
    weights: Sequence[float] | None = None,
) -> tuple[Batch, list[int]]:
    """Build a batch from examples whose shown item is in the catalog.

    Returns the batch and the indices (into ``examples``) of the examples it
    holds: an example whose item is not (yet) in the catalog cannot be scored
    and is left out; history items missing from the catalog are dropped.  The
    history keeps the ``max_history`` most recent known items.
    """
    index: dict[str, int] = {}
    item_ids: list[str] = []

    def idx(item_id: str) -> int:
        i = index.get(item_id)
        if i is None:
            i = index[item_id] = len(item_ids)
            item_ids.append(item_id)
        return i

    kept: list[int] = []
    cands: list[int] = []
    hists: list[list[int]] = []
    for n, ex in enumerate(examples):
        if ex.item_id not in catalog:
            continue
        kept.append(n)
        cands.append(idx(ex.item_id))
        known = [h for h in ex.history if h in catalog]
        hists.append([idx(h) for h in known[-max_history:]] if max_history > 0 else [])

    b = len(kept)
    h = max((len(x) for x in hists), default=0)
    history = torch.zeros((b, h), dtype=torch.long)
    history_mask = torch.zeros((b, h), dtype=torch.bool)
    for row, hist in enumerate(hists):
        if hist:
            history[row, : len(hist)] = torch.tensor(hist, dtype=torch.long)
            history_mask[row, : len(hist)] = True

    kept_ex = [examples[n] for n in kept]
    labels = torch.tensor([float(ex.label) for ex in kept_ex], dtype=torch.float32)
    values = torch.tensor(
        [float(ex.value) if ex.value is not None else 0.0 for ex in kept_ex], dtype=torch.float32
    )
    value_mask = torch.tensor(
        [ex.value is not None and ex.label == 1 for ex in kept_ex], dtype=torch.bool
    )
    w = (
        torch.tensor([float(weights[n]) for n in kept], dtype=torch.float32)
        if weights is not None
        else torch.ones(b, dtype=torch.float32)
    )

    cat_index = {c: i for i, c in enumerate(categories)}
    targets = torch.zeros((len(item_ids), len(cat_index)), dtype=torch.float32)
    cat_mask = torch.zeros(len(item_ids), dtype=torch.bool)
    entries = [catalog.get(i) for i in item_ids]
    if cat_index:
        for row, e in enumerate(entries):
            assert e is not None
            cols = [cat_index[c] for c in e.categories if c in cat_index]
            if cols:
                targets[row, cols] = 1.0
                cat_mask[row] = True

    batch = Batch(
        item_ids=item_ids,
        texts=[e.text for e in entries],  # type: ignore[union-attr]
        text_hashes=[e.text_hash for e in entries],  # type: ignore[union-attr]
        candidate=torch.tensor(cands, dtype=torch.long),
        history=history,
        history_mask=history_mask,
        user_ids=[ex.user_id for ex in kept_ex],
        labels=labels,
        weights=w,
        values=values,
        value_mask=value_mask,
        category_targets=targets,
        category_mask=cat_mask,
        example_ids=[ex.example_id for ex in kept_ex],
    )
    return batch, kept
