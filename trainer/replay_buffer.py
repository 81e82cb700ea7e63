"""A reservoir replay buffer: a uniform sample of everything ever added, in bounded memory.

Algorithm R (Vitter, 1985): the n-th item added enters the buffer with
probability ``capacity / n`` and replaces a uniformly chosen resident, so at
any time every item seen so far is in the buffer with the same probability.
Replaying from it mixes old examples into each update, which counters
catastrophic forgetting in continual learning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K")


class ReservoirBuffer(Generic[T]):
    """Uniform sample of at most ``capacity`` items of a stream (seeded, checkpointable).

    With ``key``, an item whose key is resident **replaces** that resident instead of being
    drawn as a new one: the correction of an item already sampled (a positive that corrects
    the fake negative of its example_id) leaves no stale copy behind.
    """

    def __init__(self, capacity: int, *, seed: int = 0, key: Callable[[T], Any] | None = None) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.seen = 0
        self._items: list[T] = []
        self._rng = random.Random(seed)
        self._key = key
        self._index: dict[Any, int] = {}
        self.replaced = 0
        """Items that replaced a resident of the same key."""

    def add(self, item: T) -> None:
        if self._key is not None:
            k = self._key(item)
            at = self._index.get(k)
            if at is not None:
                self._items[at] = item
                self.replaced += 1
                return
        self.seen += 1
        if self.capacity == 0:
            return
        if len(self._items) < self.capacity:
            self._put(len(self._items), item)
            return
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            self._put(j, item)

    def _put(self, j: int, item: T) -> None:
        if j == len(self._items):
            self._items.append(item)
        else:
            if self._key is not None:
                self._index.pop(self._key(self._items[j]), None)
            self._items[j] = item
        if self._key is not None:
            self._index[self._key(item)] = j

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.add(item)

    def sample(self, k: int) -> list[T]:
        """``min(k, len)`` distinct residents, uniformly at random."""
        k = min(k, len(self._items))
        return self._rng.sample(self._items, k) if k > 0 else []

    def items(self) -> list[T]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # --- checkpoint -----------------------------------------------------------------
    def state_dict(self, encode: Callable[[T], Any] = lambda x: x) -> dict[str, Any]:
        """Residents (through ``encode``), counters and RNG state: plain Python values."""
        return {
            "capacity": self.capacity,
            "seen": self.seen,
            "items": [encode(x) for x in self._items],
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any], decode: Callable[[Any], T] = lambda x: x) -> None:
        self.capacity = int(state["capacity"])
        self.seen = int(state["seen"])
        self._items = [decode(x) for x in state["items"]]
        key = self._key
        self._index = {} if key is None else {key(x): j for j, x in enumerate(self._items)}
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
