"""The users' click histories the join keeps: what an example's ``history`` is read from.

Every accepted click (the first one per example_id) is an entry ``(click ts,
arrival seq, item_id, impression_id)``; a user's entries are kept sorted.  An
example reads the user's last ``history_length`` items clicked strictly before
its impression (never a click of the same impression).  A history keeps every
entry newer than the oldest still needed (open or remembered impressions)
plus ``history_length`` entries before it, and never more than ``cap``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from typing import Any

from streams.join.wire import Entry, history_from_state, history_state


class Histories:
    """The entries of every user of one partition."""

    def __init__(self, length: int, cap: int) -> None:
        self.length = length
        self.cap = cap
        self._by_user: dict[str, list[Entry]] = {}

    def add(self, user: str, entry: Entry, needed_from: int | None) -> tuple[list[str], int]:
        """Insert ``entry``, forget what is no longer needed (entries older than ``needed_from``
        beyond ``length`` of them, anything beyond ``cap``); return the user's last
        ``length`` items and the newest click ts (the ``user-history`` record)."""
        hist = self._by_user.get(user)
        if hist is None:
            hist = self._by_user[user] = []
        insort(hist, entry)
        if needed_from is not None:
            old = bisect_left(hist, (needed_from,))
            if old > self.length:
                del hist[: old - self.length]
        if len(hist) > self.cap:
            del hist[: len(hist) - self.cap]
        return [e[2] for e in hist[-self.length :]], hist[-1][0]

    def move_earlier(self, user: str, item: str, impression_id: str, ts: int) -> bool:
        """A repeated click on an example: keep the earliest one.  True if the history changed."""
        hist = self._by_user.get(user, [])
        for i, entry in enumerate(hist):
            if entry[2] == item and entry[3] == impression_id:
                if ts < entry[0]:
                    del hist[i]
                    insort(hist, (ts, entry[1], entry[2], entry[3]))
                    return True
                return False
        return False

    def remove(self, user: str, item: str, impression_id: str) -> None:
        hist = self._by_user.get(user, [])
        for i, entry in enumerate(hist):
            if entry[2] == item and entry[3] == impression_id:
                del hist[i]
                return

    def as_of(self, user: str, ts: int, impression_id: str) -> list[str]:
        """The last ``length`` items the user clicked before ``ts``, not on ``impression_id``."""
        hist = self._by_user.get(user)
        if not hist:
            return []
        j = bisect_left(hist, (ts,)) - 1
        items: list[str] = []
        while j >= 0 and len(items) < self.length:
            entry = hist[j]
            if entry[3] != impression_id:
                items.append(entry[2])
            j -= 1
        items.reverse()
        return items

    def latest(self, user: str) -> list[str]:
        """The user's clicked items known now, most recent last (at most ``length``)."""
        return [e[2] for e in self._by_user.get(user, [])[-self.length :]]

    def size(self, user: str) -> int:
        """Entries kept for ``user`` (at most ``cap``)."""
        return len(self._by_user.get(user, ()))

    # --- state ----------------------------------------------------------------------------
    def users(self) -> Iterator[str]:
        return iter(self._by_user)

    def state(self, user: str) -> list[Any] | None:
        return history_state(self._by_user.get(user))

    def load(self, user: str, value: list[Any]) -> None:
        self._by_user[user] = history_from_state(value)

    def max_seq(self) -> int | None:
        return max((e[1] for h in self._by_user.values() for e in h), default=None)
