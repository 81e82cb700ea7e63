"""Labeled examples of the closed loop's synthetic world, built in-process (no Kafka, no join).

Shared by the benchmarks that run a policy against :class:`streams.replay.simulate.LoopWorld`
offline: the examples a shown slate gives the trainer (as the join would write them: position,
label, the user's clicked history as of the impression, the logged propensity) and the
candidate rows a policy scores (the user against items of the catalog).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.records import Labeled, example_id
from streams.replay.simulate import LoopWorld


class Histories:
    """Each user's clicked items, oldest first (what the join's history holds)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self._clicked: dict[str, list[str]] = {}

    def of(self, user: str) -> list[str]:
        return list(self._clicked.get(user, [])[-self.length :])

    def add(self, user: str, items: Sequence[str]) -> None:
        self._clicked.setdefault(user, []).extend(items)


def click_probabilities(world: LoopWorld, e: int, rows: Sequence[int]) -> np.ndarray:
    """The true click probability of each item of the slate of catalog ``rows`` at request ``e``
    (the position effect included)."""
    return world.truth(e)[list(rows)] * world.position_factor[: len(rows)]


def react(world: LoopWorld, e: int, rows: Sequence[int]) -> tuple[np.ndarray, float]:
    """The clicks (0/1 per position) that request ``e``'s user gives the slate of catalog ``rows``
    (common random numbers: :meth:`LoopWorld.draws`), and the slate's expected clicks."""
    p = click_probabilities(world, e, rows)
    uniform, _delay = world.draws(e)
    return (uniform[list(rows)] < p).astype(np.int8), float(p.sum())


def slate_examples(
    world: LoopWorld, e: int, rows: Sequence[int], labels: Sequence[int], history: list[str],
    propensities: Sequence[float] | None, version: str,
) -> list[Labeled]:  # fmt: skip
    """The labeled examples of request ``e``'s slate (impression id ``r<e>``)."""
    user, ts = world.request_user[e], int(world.request_ts[e])
    imp = f"r{e}"
    return [
        Labeled(
            example_id=example_id(imp, world.item_ids[r]), impression_id=imp, user_id=user,
            item_id=world.item_ids[r], position=j, label=int(labels[j]), history=history, impression_ts=ts,
            label_ts=ts, ts=ts, propensity=None if propensities is None else float(propensities[j]),
            model_version=version,
        )  # fmt: skip
        for j, r in enumerate(rows)
    ]


def candidate_examples(world: LoopWorld, e: int, rows: Sequence[int], history: list[str]) -> list[Labeled]:
    """Request ``e``'s user against the catalog ``rows``, to score (position 0, no label: built
    without validation, as they never leave the process)."""
    user, ts = world.request_user[e], int(world.request_ts[e])
    imp = f"q{e}"
    return [
        Labeled.model_construct(
            example_id=f"{imp}:{world.item_ids[r]}", impression_id=imp, user_id=user, item_id=world.item_ids[r],
            position=0, label=0, value=None, history=history, impression_ts=ts, label_ts=ts, late=False,
            propensity=None, model_version=None, ts=ts,
        )  # fmt: skip
        for r in rows
    ]
