"""Replay producers: turn a dataset into the event streams of DESIGN.md and produce them.

* :mod:`streams.replay.movielens` converts MovieLens-100k ratings into items,
  impressions and clicks (pure, no Kafka).
* :mod:`streams.replay.synthetic` generates a seeded stream with a known
  ground-truth click model and a concept drift.
* :mod:`streams.replay.producer` produces any such stream to Kafka, paced in
  event time.
* ``python -m streams.replay`` (:mod:`streams.replay.cli`) ties them together.

A stream is an iterable of :data:`ReplayEvent` ``(topic spec, record)`` pairs in
non-decreasing event time ``record.ts``; catalog items come before any event
that shows them.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np

from contract.records import Record
from contract.topics import TopicSpec

ReplayEvent: TypeAlias = tuple[TopicSpec, Record]
"""One record of a replay stream and the topic it belongs to."""


def event_order(ts: np.ndarray, kind: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Indices that sort events by event time, then ``kind``, then ``seq``.

    ``kind`` breaks ties between record types at the same millisecond (a lower
    kind goes first: items, then impressions, then clicks), ``seq`` keeps the
    source order within a kind, so the merge is total and reproducible.
    """
    return np.lexsort((seq, kind, ts))
