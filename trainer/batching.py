"""Labeled examples -> one typed :class:`Batch` of tensors for :class:`trainer.losses.RecTrain`.

Items repeat far more than examples: a batch lists each *unique* item once
(candidates and history items together) and the examples point into that
list, so the item tower encodes every item once per batch.  Likewise the
items of one slate share their user and history: a batch lists each unique
(user, history) *context* once, and the user tower encodes each once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from contract.records import Labeled
from trainer.catalog import Catalog


@dataclass
class Batch:
    """Tensors of one training/scoring batch (b examples, u unique items, c contexts, h history slots)."""

    item_ids: list[str]
    """The u unique items of the batch; the item tower encodes each once."""
    texts: list[str]
    """Their texts, aligned with ``item_ids``."""
    text_hashes: list[str]
    candidate: Tensor
    """[b] long: index into ``item_ids`` of each example's shown item."""
    context: Tensor
    """[b] long: index of each example's (user, history) context."""
    history: Tensor
    """[c, h] long: indices into ``item_ids``; valid entries first, most recent last."""
    history_mask: Tensor
    """[c, h] bool: which history slots are real."""
    user_ids: list[str]
    """The c contexts' user ids."""
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
    propensity: Tensor | None = None
    """[b] float: each example's logged propensity (``Labeled.propensity``), 1 where none was
    logged; the click loss's inverse-propensity weights (:func:`trainer.losses.ipw_weights`)."""
    position: Tensor | None = None
    """[b] long: each example's slate position (``Labeled.position``); the train-time position term
    (:meth:`trainer.model.RecModel.position_logits`)."""

    def __len__(self) -> int:
        return len(self.example_ids)

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
    entries = catalog.entries()

    kept: list[int] = []
    cands: list[int] = []
    contexts: list[int] = []
    context_index: dict[tuple[str, tuple[int, ...]], int] = {}
    hists: list[tuple[int, ...]] = []
    context_users: list[str] = []
    for n, ex in enumerate(examples):
        if ex.item_id not in entries:
            continue
        kept.append(n)
        i = index.get(ex.item_id)
        if i is None:
            i = index[ex.item_id] = len(item_ids)
            item_ids.append(ex.item_id)
        cands.append(i)
        row = _history_row(ex.history, max_history, entries, index, item_ids) if max_history > 0 else []
        key = (ex.user_id, tuple(row))
        c = context_index.get(key)
        if c is None:
            c = context_index[key] = len(hists)
            hists.append(key[1])
            context_users.append(ex.user_id)
        contexts.append(c)

    b = len(kept)
    nc = len(hists)
    h = max((len(x) for x in hists), default=0)
    flat = [0] * (nc * h)
    flat_mask = [False] * (nc * h)
    for r, hist in enumerate(hists):
        if hist:
            flat[r * h : r * h + len(hist)] = hist
            flat_mask[r * h : r * h + len(hist)] = [True] * len(hist)
    history = torch.tensor(flat, dtype=torch.long).view(nc, h)
    history_mask = torch.tensor(flat_mask, dtype=torch.bool).view(nc, h)

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
    item_entries = [entries[i] for i in item_ids]
    if cat_index:
        rows: list[int] = []
        cols: list[int] = []
        for row, e in enumerate(item_entries):
            for c in e.categories:
                col = cat_index.get(c)
                if col is not None:
                    rows.append(row)
                    cols.append(col)
        if rows:
            r, c = torch.tensor(rows), torch.tensor(cols)
            targets[r, c] = 1.0
            cat_mask[r] = True

    batch = Batch(
        item_ids=item_ids,
        texts=[e.text for e in item_entries],
        text_hashes=[e.text_hash for e in item_entries],
        candidate=torch.tensor(cands, dtype=torch.long),
        context=torch.tensor(contexts, dtype=torch.long),
        history=history,
        history_mask=history_mask,
        user_ids=context_users,
        labels=labels,
        weights=w,
        values=values,
        value_mask=value_mask,
        category_targets=targets,
        category_mask=cat_mask,
        example_ids=[ex.example_id for ex in kept_ex],
        propensity=torch.tensor(
            [ex.propensity if ex.propensity is not None else 1.0 for ex in kept_ex], dtype=torch.float32
        ),
        position=torch.tensor([ex.position for ex in kept_ex], dtype=torch.long),
    )
    return batch, kept


def _history_row(
    history: Sequence[str],
    max_history: int,
    entries: Mapping[str, object],
    index: dict[str, int],
    item_ids: list[str],
) -> list[int]:
    """Indices of the ``max_history`` most recent known items of a history (adding new items)."""
    row: list[int] = []
    for h in history[-max_history:]:
        j = index.get(h)
        if j is None:  # only items new to this batch need the catalog check
            if h not in entries:  # rare: drop the unknown items, then keep the most recent
                return _history_row([x for x in history if x in entries], max_history, entries, index, item_ids)
            j = index[h] = len(item_ids)
            item_ids.append(h)
        row.append(j)
    return row
