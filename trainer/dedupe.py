"""Redelivered examples: the bounded window of recent example keys, and the key itself.

Kafka delivers at least once, and a producer may resend: an example_id seen
recently is a redelivery, not a new label; a positive after its example's
negative is the correction of a fake negative, and is trained.  One implementation, used where
examples enter training: the trainer service's feed (:mod:`trainer.feed`,
checkpointed with the offsets) and a learner fed directly (offline evaluation,
benchmarks: :class:`trainer.learner.ContinualLearner`, off in the service).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from contract.records import Labeled

POSITIVE = "#1"
"""The suffix of a positive's key: an example_id has a negative key and a positive key."""
_OLD_POSITIVE = "#late"  # the positive suffix of checkpoints before the positive-wins rule


def dedupe_key(example: Labeled) -> str:
    """The idempotency key: example_id for a negative, example_id + ``#1`` for a positive.

    A positive of an example_id whose negative came first (a late positive, or the redo of an
    idle close) is an example of its own: it corrects the fake negative (DESIGN.md §3.3)."""
    return example.example_id + POSITIVE if example.label else example.example_id


class DedupeWindow:
    """The most recent ``capacity`` example keys, to drop redelivered examples (0 = off).

    The positive wins: a negative whose example_id already had its positive is dropped too, so
    the trainer never un-learns a click because a redo re-emitted the window's close."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        self.capacity = capacity
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        for i in ids:
            if i.endswith(_OLD_POSITIVE):
                i = i.removesuffix(_OLD_POSITIVE) + POSITIVE
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
        """Remember the example; False when it was already in the window (a redelivery), or when
        it is a negative whose positive was (the positive wins)."""
        key = dedupe_key(example)
        if key in self._set or (not example.label and key + POSITIVE in self._set):
            return False
        self.add(key)
        return True

    def state(self) -> list[str]:
        return list(self._order)
