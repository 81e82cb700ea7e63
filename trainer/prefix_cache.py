"""The bounded LRU of per-item encoder states below the trainable layers."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor


class PrefixCache:
    """Bounded LRU of per-item encoder states below the trainable layers.

    An entry is keyed by item_id (or by the text hash when no id is given),
    remembers the hash of the text it was computed from (a changed text is a
    miss and replaces the entry) and holds either the hidden states after the
    last frozen layer, unpadded (``[tokens, hidden]``; the attention mask is
    all ones over exactly those tokens, so the length *is* the mask), or,
    when the whole encoder is frozen, the pooled encoder output (``[hidden]``).

    ``signature`` names the model prefix the entries belong to; attaching the
    cache to a model with another prefix empties it.
    """

    def __init__(self, capacity: int = 50_000, *, dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.dtype = dtype
        self.signature: str | None = None
        self._entries: OrderedDict[str, tuple[str, Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def get(self, key: str, text_digest: str) -> Tensor | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] != text_digest:
            del self._entries[key]
            self.invalidations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: str, text_digest: str, value: Tensor) -> None:
        self._entries[key] = (text_digest, value.detach().to(self.dtype))
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def invalidate(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {
            "entries": float(len(self)),
            "hits": float(self.hits),
            "misses": float(self.misses),
            "invalidations": float(self.invalidations),
            "hit_rate": self.hits / total if total else 0.0,
        }
