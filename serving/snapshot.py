"""The snapshot requests are scored against, and how it is built: pure torch, no threads, no I/O.

What requests see is a :class:`ServingModel`: an immutable snapshot of a
model, the vectors of every catalog item under that model, the item index and
the version.  :class:`ModelHolder` holds the current snapshot; replacing it is
one attribute assignment, so a micro-batch that has read ``holder.current``
finishes on that snapshot while the next one gets the new one, and no request
ever waits for a swap.

Building blocks (the loader thread, :mod:`serving.loader`, strings them
together): :func:`encode_entries` (the item tower over catalog entries,
shortest texts first), :func:`model_snapshot` / :func:`fallback_snapshot`,
:func:`apply_item_changes` (a catalog change applied to a snapshot: only the
new or changed items are encoded), :func:`same_item_tower` (a version whose
item tower equals the live one reuses its vectors) and :func:`check_finite`
(a version with NaN/inf weights is refused).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from contract.records import Item
from trainer.catalog import Catalog, CatalogEntry
from trainer.weights import WeightsError, WeightsReason

if TYPE_CHECKING:
    from trainer.model import RecModel


# --------------------------------------------------------------------------- the snapshot
@dataclass(frozen=True, eq=False)
class ServingModel:
    """Everything one micro-batch needs, never mutated after construction."""

    version: str
    """``model_version`` of its recommendations: the published version number, or the fallback's name."""
    number: int | None
    """The published version, None for the fallback."""
    model: RecModel | None
    item_ids: tuple[str, ...]
    index: Mapping[str, int]
    """item_id -> row of ``item_vecs`` / position in ``item_ids`` (a plain dict for lookup speed;
    like everything here, never mutated once the snapshot is built)."""
    item_vecs: torch.Tensor | None
    """``[len(item_ids), d]`` on the serving device; None for the fallback."""
    text_hashes: tuple[str, ...]
    created: float = field(default_factory=time.monotonic)
    source_offsets: Mapping[str, int] = field(default_factory=dict)
    """The version's ``source_offsets`` (``"topic:partition"`` -> next offset it trained up to): which
    labeled examples it has learned (:mod:`serving.refresh` adds the newer ones); empty for the fallback."""

    def __len__(self) -> int:
        return len(self.item_ids)

    def history_matrix(self, histories: Sequence[Sequence[str]], length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, mask)``, each ``[len(histories), max(length, 1)]``: the catalog rows of each history's
        last ``length`` known items (unknown ids skipped), valid first, recent last, for the user tower."""
        width = max(length, 1)
        rows = np.zeros((len(histories), width), dtype=np.int64)
        mask = np.zeros((len(histories), width), dtype=bool)
        get = self.index.get
        for r, hist in enumerate(histories):
            known = [j for j in map(get, hist) if j is not None][-width:]
            rows[r, : len(known)] = known
            mask[r, : len(known)] = True
        return rows, mask


def fallback_snapshot(version: str, entries: Sequence[tuple[str, CatalogEntry]]) -> ServingModel:
    """A model-less snapshot that lists the catalog (for the popularity fallback)."""
    return _snapshot(version, None, None, entries, None)


def _snapshot(
    version: str, number: int | None, model: RecModel | None,
    entries: Sequence[tuple[str, CatalogEntry]], vecs: torch.Tensor | None,
) -> ServingModel:
    ids = tuple(i for i, _ in entries)
    return ServingModel(
        version=version,
        number=number,
        model=model,
        item_ids=ids,
        index={i: r for r, i in enumerate(ids)},
        item_vecs=vecs,
        text_hashes=tuple(e.text_hash for _, e in entries),
    )


def encode_entries(
    model: RecModel, entries: Sequence[tuple[str, CatalogEntry]], *, batch: int
) -> torch.Tensor:
    """Item vectors ``[n, d]`` of catalog entries, in their order.

    Texts go to the item tower ``batch`` at a time, shortest first, so each
    call pads little (chunks of mixed lengths measured 2.7x slower).
    """
    dev = model.item_tower.proj.weight.device
    if not entries:
        return torch.zeros((0, model.vector_width), device=dev)
    order = sorted(range(len(entries)), key=lambda r: len(entries[r][1].text))
    parts = []
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = [entries[r] for r in order[start : start + batch]]
            parts.append(
                model.encode_items(
                    [e.text for _, e in chunk],
                    [i for i, _ in chunk],
                    [e.text_hash for _, e in chunk],
                    [e.categories for _, e in chunk],
                )
            )
        vecs = torch.cat(parts)
        out = torch.empty_like(vecs)
        out[torch.tensor(order, device=vecs.device)] = vecs
    return out


def model_snapshot(
    number: int, model: RecModel, entries: Sequence[tuple[str, CatalogEntry]], vecs: torch.Tensor,
    source_offsets: Mapping[str, int] | None = None,
) -> ServingModel:
    """The snapshot of version ``number``: its model, the catalog's item vectors ``vecs`` and the
    labeled offsets the version trained up to."""
    return replace(_snapshot(str(number), number, model, entries, vecs), source_offsets=dict(source_offsets or {}))


def apply_item_changes(
    sm: ServingModel,
    changes: Mapping[str, CatalogEntry | None],
    encode: Callable[[Sequence[tuple[str, CatalogEntry]]], torch.Tensor] | None,
) -> ServingModel | None:
    """A new snapshot with ``changes`` (entry, or None = removed) applied; None if nothing changes.

    New items are appended (in the order of ``changes``), changed texts are
    re-encoded in place, removed items dropped.  ``encode`` computes vectors
    with the snapshot's model (None for a model-less snapshot).
    """
    removed = {i for i, e in changes.items() if e is None and i in sm.index}
    fresh = [
        (i, e)
        for i, e in changes.items()
        if e is not None and (i not in sm.index or sm.text_hashes[sm.index[i]] != e.text_hash)
    ]
    if not removed and not fresh:
        return None
    new_vecs = encode(fresh) if (encode is not None and fresh and sm.item_vecs is not None) else None
    fresh_row = {i: r for r, (i, _) in enumerate(fresh)}
    keep = [r for r, i in enumerate(sm.item_ids) if i not in removed]
    ids = [sm.item_ids[r] for r in keep]
    hashes = [changes[i].text_hash if i in fresh_row else sm.text_hashes[r] for r, i in zip(keep, ids, strict=True)]  # type: ignore[union-attr]
    appended = [(i, e) for i, e in fresh if i not in sm.index]
    ids.extend(i for i, _ in appended)
    hashes.extend(e.text_hash for _, e in appended)

    vecs = None
    if sm.item_vecs is not None:
        if new_vecs is None:
            raise ValueError("a snapshot with vectors needs an encoder for its changes")
        base = sm.item_vecs[torch.tensor(keep, dtype=torch.long, device=sm.item_vecs.device)].clone()
        replaced = [(r_new, fresh_row[i]) for r_new, i in enumerate(ids[: len(keep)]) if i in fresh_row]
        if replaced:
            dst = torch.tensor([a for a, _ in replaced], device=base.device)
            src = torch.tensor([b for _, b in replaced], device=base.device)
            base[dst] = new_vecs[src].to(base.dtype)
        tail = torch.tensor([fresh_row[i] for i, _ in appended], dtype=torch.long, device=base.device)
        vecs = torch.cat([base, new_vecs[tail].to(base.dtype)]) if appended else base
    return ServingModel(
        version=sm.version,
        number=sm.number,
        model=sm.model,
        item_ids=tuple(ids),
        index={i: r for r, i in enumerate(ids)},
        item_vecs=vecs,
        text_hashes=tuple(hashes),
        source_offsets=sm.source_offsets,
    )


def same_item_tower(a: RecModel, b: RecModel) -> bool:
    """Whether two models compute the same item vectors (same config and item-tower tensors)."""
    if a.config != b.config:
        return False
    sa, sb = a.item_tower.state_dict(), b.item_tower.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def check_finite(sm: ServingModel) -> None:
    """Refuse a snapshot whose item vectors, or a probe user's scores, are not finite (broken weights)."""
    if sm.model is None or sm.item_vecs is None:
        return
    with torch.inference_mode():
        if not bool(torch.isfinite(sm.item_vecs).all()):
            raise WeightsError(f"version {sm.version}: item vectors are not finite (NaN/inf weights)", WeightsReason.NON_FINITE)
        d = sm.item_vecs.shape[1] if sm.item_vecs.ndim == 2 else sm.model.vector_width
        dev = sm.item_vecs.device
        probe = sm.model.encode_users(
            torch.zeros((1, 1, d), device=dev), torch.zeros((1, 1), dtype=torch.bool, device=dev), ["probe"]
        )
        items = sm.item_vecs[:64] if len(sm.item_vecs) else torch.ones((1, d), device=dev)
        if not bool(torch.isfinite(sm.model.score_matrix(probe, items)).all()):
            raise WeightsError(f"version {sm.version}: scores are not finite (NaN/inf weights)", WeightsReason.NON_FINITE)


# --------------------------------------------------------------------------- the holder
class ModelHolder:
    """The one reference to the live snapshot: read it lock-free, replace it atomically."""

    def __init__(self, initial: ServingModel) -> None:
        self._current = initial
        self._changed = threading.Condition()

    @property
    def current(self) -> ServingModel:
        return self._current

    def swap(self, new: ServingModel) -> ServingModel:
        """Make ``new`` the live snapshot; return the old one."""
        with self._changed:
            old, self._current = self._current, new
            self._changed.notify_all()
        return old

    def wait_for(self, predicate: Callable[[ServingModel], bool], timeout: float) -> ServingModel | None:
        """Block until ``predicate(current)`` holds (return it) or ``timeout`` passes (None)."""
        with self._changed:
            ok = self._changed.wait_for(lambda: predicate(self._current), timeout=timeout)
            return self._current if ok else None




def items_entries(items: Iterable[Item]) -> list[tuple[str, CatalogEntry]]:
    """Catalog entries of some items (last write wins), for tests and benchmarks."""
    cat = Catalog(items)
    return [(i, cat.get(i)) for i in cat.item_ids()]  # type: ignore[misc]
