"""Input contiguity: the join applies every input offset in order, or re-reads it.

Faust can hand an agent a stream with holes.  Around a rebalance or a table
recovery, events that reach a stream while flow control is suspended (or that
carry an older consumer generation) are *skipped and acknowledged*
(faust-streaming 0.15, ``Stream._py_aiter`` and its Cython twin), so their
offsets get committed although no agent ever saw them; prefetched events can
also arrive after Faust's seek to the committed offsets.  Seen on this
project's broker as a restarted worker that jumped from offset 104 to 124 of
one partition, or started a partition at its committed offset 607 while the
state held nothing of it: each hole is examples lost for good.

So the join does not trust the consumer's position: its state records, per
input partition, the next offset it must apply
(:meth:`streams.join.JoinCore.next_offset`).  :class:`GapGuard` compares every
delivered offset with it:

* below: redelivered, the state already holds it (the caller skips it);
* equal: apply it;
* above: a hole.  The caller seeks the partition back to the expected offset
  and drops everything of that partition until the re-read arrives.  Events
  fetched before the seek (offsets above the one that revealed the hole) are
  *stale* and dropped: every delivered offset above the highest one delivered
  so far.  The first event at or below it is the re-read.  A re-read that
  starts above the expected offset is sought once more, and applied when it
  starts at the same offset again: then the hole is real (offsets taken by
  transaction markers, or removed by retention).  Inputs written by
  transactional producers therefore cost two seeks per transaction.

A seek can itself be lost: Faust's consumer loop, still iterating a fetch from
before the seek, records a later read offset and then drops the re-read events
as already read.  A partition whose re-read has not started within
``reseek_after_s`` is sought again (:meth:`GapGuard.due`), also when nothing
else arrives for it.

A hole at the end of a partition is revealed by no event; the worker finds it
from the consumer's highwater (records past the state's offset, none delivered
for a while) and registers it with :meth:`GapGuard.expect`.  Such a re-read
may bring nothing (the offsets held transaction markers only, or retention
removed them), so it is given up after a few seeks.

Pure logic: no Faust, no Kafka; the worker performs the seeks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass


class Verdict(enum.Enum):
    APPLY = "apply"
    """Apply the event (its offset is the expected one, or the hole before it is real)."""
    REPLAYED = "replayed"
    """Below the expected offset: the state already holds it."""
    SEEK = "seek"
    """A hole before this event: seek back to the expected offset; drop the event."""
    STALE = "stale"
    """Fetched before a seek that is still pending: drop it."""


@dataclass(slots=True)
class _Pending:
    expected: int
    marker: int  # the highest offset delivered since the hole: anything above is stale
    since: float
    seeks_left: int | None  # None: until the re-read arrives (an event revealed the hole)
    candidate: int | None = None  # a re-read that started above ``expected``, to confirm


class GapGuard:
    """Tracks the pending re-reads of the partitions of one worker.  Keys are any hashable
    partition ids (the worker uses ``(topic, partition)``)."""

    def __init__(self, reseek_after_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not reseek_after_s > 0:
            raise ValueError(f"reseek_after_s must be > 0, got {reseek_after_s}")
        self.reseek_after_s = reseek_after_s
        self._clock = clock
        self._pending: dict[Hashable, _Pending] = {}

    def check(self, key: Hashable, offset: int, expected: int) -> Verdict:
        """Classify the event at ``offset`` of partition ``key`` whose state expects ``expected``."""
        pending = self._pending.get(key)
        if pending is not None:
            if offset > pending.marker:
                pending.marker = offset
                return Verdict.STALE
            if offset <= expected or offset == pending.candidate:
                del self._pending[key]  # the re-read has started (above expected: a real hole)
                return Verdict.REPLAYED if offset < expected else Verdict.APPLY
            # The re-read seems to start above the expected offset: a real hole, or an event
            # fetched before the seek.  Seek once more; a real hole starts there again.
            pending.candidate = pending.marker = offset
            pending.since = self._clock()
            return Verdict.SEEK
        if offset < expected:
            return Verdict.REPLAYED
        if offset == expected:
            return Verdict.APPLY
        self._pending[key] = _Pending(expected, offset, self._clock(), None)
        return Verdict.SEEK

    def expect(self, key: Hashable, expected: int, delivered_up_to: int, seeks: int = 3) -> None:
        """Register a hole no event revealed (the caller seeks ``key`` to ``expected``): events
        above ``delivered_up_to`` are stale; give up after ``seeks`` seeks without a re-read."""
        self._pending[key] = _Pending(expected, delivered_up_to, self._clock(), max(0, seeks - 1))

    def due(self) -> tuple[list[tuple[Hashable, int]], list[Hashable]]:
        """``(seeks, abandoned)``: the partitions whose re-read has not started within
        ``reseek_after_s`` (seek them again, to the returned offset), and the end-of-partition
        re-reads given up (nothing came back)."""
        now = self._clock()
        seeks: list[tuple[Hashable, int]] = []
        abandoned: list[Hashable] = []
        for key, pending in self._pending.items():
            if now - pending.since < self.reseek_after_s:
                continue
            if pending.seeks_left == 0:
                abandoned.append(key)
                continue
            if pending.seeks_left is not None:
                pending.seeks_left -= 1
            pending.since = now
            seeks.append((key, pending.expected))
        for key in abandoned:
            del self._pending[key]
        return seeks, abandoned

    def confirming(self, key: Hashable) -> bool:
        """Whether ``key``'s re-read started above the expected offset and is being confirmed."""
        pending = self._pending.get(key)
        return pending is not None and pending.candidate is not None

    def pending(self, key: Hashable) -> bool:
        """Whether a re-read of ``key`` is outstanding (its events are not applied yet)."""
        return key in self._pending

    def forget(self, keys: Iterable[Hashable]) -> None:
        """Drop pending re-reads (the partitions were revoked)."""
        for key in keys:
            self._pending.pop(key, None)

    def __len__(self) -> int:
        return len(self._pending)
