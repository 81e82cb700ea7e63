"""Serving's state, without Kafka: what the agent knows and what it has yet to answer.

* :class:`ServingTopics` — the real names of the six topics the agent touches.
* :class:`CatalogState` — the catalog as read from ``items``, and which items
  changed since the loader last looked (the loader turns those into vectors).
* :class:`UserState` — each user's recent history and the popularity of recent
  clicks (an item newly appended to a history counts as a click).
* :class:`StateRecords` — applies one record of ``items``, ``user-history`` or
  ``model-updates`` to those, and hands model updates back to the caller.
* :class:`RequestQueue` — decoded requests waiting for the scorer.
* :class:`OffsetLedger` — which ``rec-requests`` offsets may be committed
  (every earlier request of the partition answered or dead-lettered).

Everything here is thread-safe where the agent shares it between threads
(noted per class), and each piece is tested on its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from contract.records import Item, ModelUpdate, RecRequest, UserHistory
from contract.settings import KafkaSettings
from contract.topics import (
    DEAD_LETTERS,
    ITEMS,
    MODEL_UPDATES,
    REC_REQUESTS,
    RECOMMENDATIONS,
    USER_HISTORY,
)
from serving.scoring import appended_items
from trainer.catalog import Catalog, CatalogEntry
from trainer.popularity import Popularity


@dataclass(frozen=True)
class ServingTopics:
    """The real (prefixed) names of the topics the agent reads and writes."""

    items: str
    history: str
    updates: str
    requests: str
    recommendations: str
    dead: str

    @classmethod
    def of(cls, kafka: KafkaSettings) -> ServingTopics:
        return cls(
            items=ITEMS.real_name(kafka),
            history=USER_HISTORY.real_name(kafka),
            updates=MODEL_UPDATES.real_name(kafka),
            requests=REC_REQUESTS.real_name(kafka),
            recommendations=RECOMMENDATIONS.real_name(kafka),
            dead=DEAD_LETTERS.real_name(kafka),
        )

    @property
    def state(self) -> list[str]:
        """The compacted topics the agent rebuilds its state from, in the order they are read."""
        return [self.items, self.history, self.updates]


# --------------------------------------------------------------------------- the catalog
class CatalogState:
    """The catalog as read from ``items``, and which items changed since the loader last looked.

    Written by the state thread, read by the loader thread and the query index (locked).
    """

    def __init__(self) -> None:
        self._catalog = Catalog()
        self._changed: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self.generation = 0
        """Bumped by every change (text, categories, removal): what the query index compares."""
        self.wakeup: Callable[[], None] = lambda: None

    def upsert(self, item: Item) -> bool:
        with self._lock:
            changed = self._catalog.upsert(item)
            if changed:
                self._changed[item.item_id] = None
                self.generation += 1
        if changed:
            self.wakeup()
        return changed

    def remove(self, item_id: str) -> bool:
        with self._lock:
            removed = self._catalog.remove(item_id)
            if removed:
                self._changed[item_id] = None
                self.generation += 1
        if removed:
            self.wakeup()
        return removed

    def entries(self) -> list[tuple[str, CatalogEntry]]:
        """Every item in first-insertion order (clears the change set: the caller sees everything)."""
        with self._lock:
            self._changed.clear()
            return [(i, self._catalog.get(i)) for i in self._catalog.item_ids()]  # type: ignore[misc]

    def take_changes(self) -> dict[str, CatalogEntry | None]:
        """Items changed since the last call (entry, or None when removed)."""
        with self._lock:
            ids, self._changed = list(self._changed), {}
            return {i: self._catalog.get(i) for i in ids}

    def has_changes(self) -> bool:
        return bool(self._changed)

    def lookup(self, item_ids: Sequence[str]) -> list[CatalogEntry | None]:
        """The current entry of each item (None when unknown), without touching the change set."""
        with self._lock:
            get = self._catalog.get
            return [get(i) for i in item_ids]

    def __len__(self) -> int:
        return len(self._catalog)


# --------------------------------------------------------------------------- user state
class UserState:
    """Each user's recent history (most recent last) and the popularity of recent clicks.

    Written by the state thread only; the scorer reads one user's history at a
    time (a tuple, replaced whole).
    """

    def __init__(self, history_length: int, popularity: Popularity) -> None:
        self.history_length = history_length
        self.popularity = popularity
        self._histories: dict[str, tuple[str, ...]] = {}

    def apply(self, record: UserHistory) -> int:
        """Replace a user's history; the items newly appended count as clicks. Return how many."""
        old = self._histories.get(record.user_id, ())
        clicks = appended_items(old, record.items, self.history_length)
        self._histories[record.user_id] = tuple(record.items[-self.history_length :])
        return self.popularity.add(clicks, record.ts)

    def remove(self, user_id: str) -> None:
        self._histories.pop(user_id, None)

    def history(self, user_id: str) -> tuple[str, ...]:
        return self._histories.get(user_id, ())

    def __len__(self) -> int:
        return len(self._histories)


# --------------------------------------------------------------------------- state records
class StateRecords:
    """Applies records of the state topics to the catalog and the user state.

    ``apply`` takes a consumed message (anything with ``topic()``, ``key()``
    and ``value()``) and raises :class:`~contract.errors.RecordError` for a
    record that does not decode; a tombstone removes the item or user.
    """

    def __init__(self, topics: ServingTopics, catalog: CatalogState, users: UserState) -> None:
        self.topics = topics
        self.catalog = catalog
        self.users = users

    def apply(self, msg: Any) -> ModelUpdate | None:
        """Apply one state record; return it when it is a model update."""
        topic, value = msg.topic(), msg.value()
        if topic == self.topics.items:
            if value is None:
                self.catalog.remove(message_key(msg))
            else:
                self.catalog.upsert(Item.from_json(value))
        elif topic == self.topics.history:
            if value is None:
                self.users.remove(message_key(msg))
            else:
                self.users.apply(UserHistory.from_json(value))
        elif topic == self.topics.updates and value is not None:
            return ModelUpdate.from_json(value)
        return None


def message_key(msg: Any) -> str:
    key = msg.key()
    return key.decode("utf-8", errors="replace") if key is not None else ""


# --------------------------------------------------------------------------- pending requests
@dataclass(slots=True)
class Pending:
    """A decoded request waiting for its answer, and where it came from."""

    request: RecRequest
    arrived: float
    partition: int
    offset: int


class RequestQueue:
    """Requests fetched but not yet scored: the request thread puts, the scorer takes (locked).

    :meth:`close` says no more will come; the scorer then finishes what is queued.
    """

    def __init__(self) -> None:
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closed = threading.Event()

    def put(self, pending: list[Pending]) -> None:
        with self._cond:
            self._queue.extend(pending)
            self._cond.notify()

    def take(self, most: int, wait_s: float = 0.05) -> list[Pending]:
        """Everything queued, up to ``most``; waits up to ``wait_s`` when nothing is."""
        with self._cond:
            if not self._queue:
                self._cond.wait(wait_s)
            n = min(len(self._queue), most)
            return [self._queue.popleft() for _ in range(n)]

    def wake(self) -> None:
        """Wake a waiting scorer (e.g. to let it see a revocation or a stop sooner)."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self._closed.set()
        self.wake()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __len__(self) -> int:
        return len(self._queue)


# --------------------------------------------------------------------------- offsets
class OffsetLedger:
    """In-flight input offsets per partition; the committable offset is the first unfinished one.

    ``track`` offsets in fetch order (ascending per partition), ``done`` them
    in any order; :meth:`committable` gives, per partition that advanced,
    the offset to store (one past the longest finished prefix).  O(1)
    amortised per offset; thread-safe.
    """

    def __init__(self) -> None:
        self._order: dict[int, deque[int]] = {}
        self._done: dict[int, set[int]] = {}
        self._next: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    def track(self, partition: int, offset: int) -> None:
        with self._lock:
            if partition not in self._order:
                self._order[partition], self._done[partition] = deque(), set()
            self._order[partition].append(offset)

    def done(self, partition: int, offset: int) -> None:
        with self._lock:
            order = self._order.get(partition)
            if order is None:
                return  # partition revoked meanwhile
            finished = self._done[partition]
            finished.add(offset)
            advanced = None
            while order and order[0] in finished:
                advanced = order.popleft()
                finished.discard(advanced)
            if advanced is not None:
                self._next[partition] = advanced + 1
                self._dirty.add(partition)

    def pending(self, partition: int, offset: int) -> bool:
        """Whether ``offset`` is tracked and not done yet (False once its partition is forgotten)."""
        with self._lock:
            order = self._order.get(partition)
            return order is not None and offset not in self._done[partition] and offset in order

    def committable(self) -> dict[int, int]:
        """Partitions whose committable offset advanced since the last call, with that offset."""
        with self._lock:
            out = {p: self._next[p] for p in self._dirty}
            self._dirty.clear()
            return out

    def in_flight(self, partitions: set[int] | None = None) -> int:
        with self._lock:
            return sum(
                len(order) - len(self._done[p])
                for p, order in self._order.items()
                if partitions is None or p in partitions
            )

    def forget(self, partitions: set[int]) -> None:
        with self._lock:
            for p in partitions:
                self._order.pop(p, None)
                self._done.pop(p, None)
                self._next.pop(p, None)
                self._dirty.discard(p)
