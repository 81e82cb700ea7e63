"""The feed: fetched ``labeled`` examples queued per partition, cut into micro-batches.

Examples queue per partition, in offset order.  A batch is due when
``batch_size`` examples are queued or the oldest has waited
``max_batch_wait_s``; it takes the heads of the queues in arrival order.
Taking an example out of its queue advances that partition's offset (applied
with :meth:`Feed.advance` once the step succeeded: the offsets say what is
trained, and a checkpoint stores them).  Redelivered example_ids are dropped
here, the one dedupe of the service (:class:`~trainer.dedupe.DedupeWindow`,
checkpointed with the offsets); malformed records arrive as ``None`` (already
dead-lettered) and only advance their offset.

An example whose item is not in the catalog yet *waits*: its partition stops
at it (later examples wait behind it, so offsets stay contiguous) until the
item arrives, for at most ``missing_item_wait_s``; then ``on_expired`` is
called (the service dead-letters it) and the partition moves on.  Other
partitions keep going meanwhile.  No Kafka in here: the service feeds it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from contract.records import Labeled
from trainer.catalog import Catalog
from trainer.dedupe import DedupeWindow

log = logging.getLogger(__name__)

Expired = Callable[[int, int, Labeled, str], None]
"""``on_expired(partition, offset, example, reason)``: an example whose item never came."""


@dataclass
class Entry:
    offset: int
    seq: int
    arrived: float
    example: Labeled | None  # None: malformed, already dead-lettered


@dataclass
class PartitionQueue:
    entries: deque[Entry] = field(default_factory=deque)
    blocked_since: float | None = None
    paused: bool = False


@dataclass
class Taken:
    """What one :meth:`Feed.take` took off the queues."""

    examples: list[Labeled]
    """First deliveries, in arrival order."""
    advanced: dict[int, int]
    """The next offset of each partition taken from, once these are trained."""
    consumed: int = 0
    duplicates: int = 0


class Feed:
    """Per-partition queues, the missing-item wait and the dedupe (see the module doc)."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        batch_size: int,
        max_batch_wait_s: float,
        missing_item_wait_s: float,
        dedupe_window: int,
        on_expired: Expired,
        topic: str = "labeled",
    ) -> None:
        self.catalog = catalog
        self.batch_size = batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.missing_item_wait_s = missing_item_wait_s
        self.on_expired = on_expired
        self.topic = topic
        self.queues: dict[int, PartitionQueue] = {}
        self.offsets: dict[int, int] = {}
        """Next offset per partition: everything before it is trained (or dropped, or dead-lettered)."""
        self.dedupe = DedupeWindow(dedupe_window)
        self._seq = 0

    # --- filling --------------------------------------------------------------------------
    def add_partition(self, partition: int) -> None:
        self.queues.setdefault(partition, PartitionQueue())

    def add(self, partition: int, offset: int, example: Labeled | None, now: float) -> None:
        """Queue one fetched record (``None``: malformed, already dead-lettered)."""
        self._seq += 1
        q = self.queues.setdefault(partition, PartitionQueue())
        q.entries.append(Entry(offset, self._seq, now, example))

    def resume(self, offsets: dict[int, int], recent_keys: Iterable[str]) -> None:
        """Continue from a checkpoint: its offsets and dedupe window."""
        self.offsets.update(offsets)
        for key in recent_keys:
            self.dedupe.add(key)

    # --- state ------------------------------------------------------------------------------
    def queued(self) -> int:
        return sum(len(q.entries) for q in self.queues.values())

    def oldest_arrival(self) -> float | None:
        return min((q.entries[0].arrived for q in self.queues.values() if q.entries), default=None)

    def due(self, now: float) -> bool:
        """Whether a batch should be cut now (full, or its oldest example has waited long enough)."""
        queued = self.queued()
        if queued == 0:
            return False
        if queued >= self.batch_size:
            return True
        oldest = self.oldest_arrival()
        return oldest is not None and now - oldest >= self.max_batch_wait_s

    def poll_timeout(self, now: float, longest: float = 0.2) -> float:
        """How long a fetch may wait without making the oldest example late."""
        oldest = self.oldest_arrival()
        if oldest is None:
            return longest
        return max(0.0, min(longest, oldest + self.max_batch_wait_s - now))

    def backpressure(self, cap: int) -> tuple[list[int], list[int]]:
        """(partitions to pause: ``cap`` queued, to resume: below half of it); marks them."""
        pause, resume = [], []
        for p, q in self.queues.items():
            if not q.paused and len(q.entries) >= cap:
                q.paused = True
                pause.append(p)
            elif q.paused and len(q.entries) < cap // 2:
                q.paused = False
                resume.append(p)
        return pause, resume

    # --- taking -----------------------------------------------------------------------------
    def take(self, now: float) -> Taken:
        """Up to ``batch_size`` records off the queue heads, first arrived first; duplicates dropped."""
        taken = Taken([], {})
        while len(taken.examples) < self.batch_size:
            nxt = self._next_head(now, taken.advanced)
            if nxt is None:
                break
            p, q = nxt
            entry = q.entries.popleft()
            q.blocked_since = None
            taken.advanced[p] = entry.offset + 1
            taken.consumed += 1
            ex = entry.example
            if ex is None:
                continue
            if not self.dedupe.first_time(ex):
                taken.duplicates += 1
                log.debug("dropping redelivered example %s", ex.example_id)
                continue
            taken.examples.append(ex)
        return taken

    def advance(self, advanced: dict[int, int]) -> None:
        """Move the offsets past what a :meth:`take` took (once it is trained)."""
        self.offsets.update(advanced)

    def _ready(self, head: Entry) -> bool:
        return head.example is None or head.example.item_id in self.catalog

    def _next_head(self, now: float, advanced: dict[int, int]) -> tuple[int, PartitionQueue] | None:
        """The queue whose head arrived first among those not waiting for an item."""
        best: tuple[int, PartitionQueue] | None = None
        for p, q in self.queues.items():
            self._expire(p, q, now, advanced)
            if not q.entries or not self._ready(q.entries[0]):
                continue
            if best is None or q.entries[0].seq < best[1].entries[0].seq:
                best = (p, q)
        return best

    def _expire(self, p: int, q: PartitionQueue, now: float, advanced: dict[int, int]) -> None:
        """Start, or end, the wait of a partition whose head's item is not in the catalog."""
        if q.entries and self._ready(q.entries[0]):
            q.blocked_since = None
        while q.entries and not self._ready(q.entries[0]):
            head = q.entries[0]
            assert head.example is not None
            if q.blocked_since is None:
                q.blocked_since = now
                log.info("%s[%d]@%d: item %s not in the catalog yet; the partition waits up to %.0fs",
                         self.topic, p, head.offset, head.example.item_id, self.missing_item_wait_s)
            # each example waits missing_item_wait_s from the later of its arrival and the start of
            # the block, so a slate of unknown items queued together expires together (not N waits)
            if now - max(q.blocked_since, head.arrived) < self.missing_item_wait_s:
                return
            q.entries.popleft()
            advanced[p] = head.offset + 1
            self.on_expired(p, head.offset, head.example,
                            f"item {head.example.item_id} not in the catalog after {self.missing_item_wait_s:.0f}s")
