"""Loading persisted state keys into a fresh :class:`~streams.join.JoinCore` (its ``restore``).

The keys are those of :mod:`streams.join.wire`.  Besides loading them, this
redoes what a crash may have left undone: an early click whose impression is
known was matched (its deletion was not persisted), and the order in which
closed impressions are forgotten (the ``closed_max`` bound) is rebuilt from
their ``until``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from streams.join.wire import ImpressionState

if TYPE_CHECKING:
    from streams.join.core import JoinCore


def load_state(core: JoinCore, state: Iterable[tuple[str, Any]]) -> None:
    """Load ``state`` (key, JSON-able value) into ``core``, which must be fresh."""
    for key, value in state:
        if value is None:
            continue
        kind, ident = key[0], key[2:]
        if key == "w":
            core._load_marks(value)
        elif kind == "i":
            rec = ImpressionState.from_state(ident, value)
            core._imps[ident] = rec
            if rec.closed:
                if rec.until is None:  # written before ``until`` existed
                    rec.until = rec.ts + core.config.window_ms + core.config.closed_retention_ms
                deadline = rec.until
            else:
                core._open[ident] = rec
                deadline = rec.ts + core.config.window_ms
            core._deadlines.append((deadline, ident))
        elif kind == "o":
            core._early.load(ident, value)
        elif kind == "h":
            core._histories.load(ident, value)
        else:
            raise ValueError(f"unknown join state key {key!r}")
    # an early click whose impression is known was matched: its deletion was not persisted
    for iid in [i for i in core._early.ids() if i in core._imps]:
        core._early.pop(iid)
        core._dirty.add("o/" + iid)
    closed = sorted((rec.until or 0, iid) for iid, rec in core._imps.items() if rec.closed)
    core._closed = dict.fromkeys(iid for _until, iid in closed)
    heapq.heapify(core._deadlines)
    seqs = [s for s in (core._early.max_seq(), core._histories.max_seq()) if s is not None]
    core._seq = max([core._seq, *seqs])
