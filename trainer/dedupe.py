"""Redelivered examples: the bounded window of recent example keys, and the key itself.

Kafka delivers at least once, and a producer may resend: an example_id seen
recently is a redelivery, not a new label.  One implementation, used where
examples enter training: the trainer service's feed (:mod:`trainer.feed`,
checkpointed with the offsets) and a learner fed directly (offline evaluation,
benchmarks: :class:`trainer.learner.ContinualLearner`, off in the service).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from contract.records import Labeled


def dedupe_key(example: Labeled) -> str:
    """The idempotency key: example_id, except that a late positive (which corrects the fake
    negative of the same example_id) is an example of its own."""
    return f"{example.example_id}#late" if example.late else example.example_id


class DedupeWindow:
    """The most recent ``capacity`` example keys, to drop redelivered examples (0 = off)."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        self.capacity = capacity
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        for i in ids:
            self.add(i)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._set

    def __len__(self) -> int:
        return len(self._order)

    def add(self, example_id: str) -> None:
        if self.capacity <= 0 or example_id in self._set:
            return
        self._order.append(example_id)
        self._set.add(example_id)
        while len(self._order) > self.capacity:
            self._set.discard(self._order.popleft())

    def first_time(self, example: Labeled) -> bool:
        """Remember the example; False when it was already in the window (a redelivery)."""
        key = dedupe_key(example)
        if key in self._set:
            return False
        self.add(key)
        return True

    def state(self) -> list[str]:
        return list(self._order)
