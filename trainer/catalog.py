"""The item catalog the trainer and the scoring agent see: item_id -> text + categories.

It is fed from the compacted ``items`` topic (:class:`contract.records.Item`).
The item tower reads texts from it, the category head its labels.  A text
change is visible through :meth:`Catalog.text_hash`, which the frozen-prefix
cache of :mod:`trainer.model` uses to invalidate stale entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from contract.records import Item


def text_hash(text: str) -> str:
    """A short, stable digest of an item text (the same in every process)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    text: str
    categories: tuple[str, ...]
    ts: int
    text_hash: str


class Catalog:
    """Latest text and categories per item_id (last write wins, as in a compacted topic)."""

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for item in items:
            self.upsert(item)

    def upsert(self, item: Item) -> bool:
        """Insert or replace one item; return True when its text or categories changed."""
        old = self._entries.get(item.item_id)
        new = CatalogEntry(
            text=item.text,
            categories=tuple(item.categories),
            ts=item.ts,
            text_hash=old.text_hash if old is not None and old.text == item.text else text_hash(item.text),
        )
        self._entries[item.item_id] = new
        return old is None or old.text != new.text or old.categories != new.categories

    def remove(self, item_id: str) -> bool:
        """Drop an item (a tombstone on the topic); return whether it was present."""
        return self._entries.pop(item_id, None) is not None

    def text(self, item_id: str) -> str:
        """The item's text; KeyError when the item is unknown."""
        return self._entries[item_id].text

    def categories(self, item_id: str) -> list[str]:
        """The item's categories (possibly empty); KeyError when the item is unknown."""
        return list(self._entries[item_id].categories)

    def text_hash(self, item_id: str) -> str:
        return self._entries[item_id].text_hash

    def get(self, item_id: str) -> CatalogEntry | None:
        return self._entries.get(item_id)

    def entries(self) -> Mapping[str, CatalogEntry]:
        """Read-only view item_id -> entry (for hot loops that look up many items)."""
        return MappingProxyType(self._entries)

    def item_ids(self) -> list[str]:
        """All known item_ids, in first-insertion order."""
        return list(self._entries)

    def category_names(self) -> list[str]:
        """Every category used by some item, sorted (a vocabulary for the category head)."""
        return sorted({c for e in self._entries.values() for c in e.categories})

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Catalog({len(self)} items)"
