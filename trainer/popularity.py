"""Item popularity: clicks per item with exponential decay in event time.

The fallback ranking of serving (a user without a model version is served
the most popular items) and the yardstick of the trainer's guardrail (a
version replaces the fallback only when it beats it on held-back data), so it
lives with the model, below both.

A click's event time comes from its producer, so it is bounded before it
weighs anything: a click stamped more than ``max_future_s`` (10 min) past the
wall clock would otherwise weigh ``2**(lead / half-life)`` (a click 23 h ahead
under a 1 h half-life counts 2**23 times), and one near 2**53 would rebase
every other weight to zero.  Such a click counts at the newest plausible event
time seen so far (before any, like the first plausible one: weight 1): it is
one click, never more.  Event times in the past are trusted as they are (a
replay of old data, a long gap), since a stale click can only weigh less.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np


class Popularity:
    """Clicks per item with exponential decay in event time (thread-safe)."""

    _REBASE = 256.0  # rescale when weights reach 2**256, far below float64's 2**1024

    def __init__(
        self, half_life_s: float, *, max_future_s: float = 600.0, clock_ms: Callable[[], int] | None = None
    ) -> None:
        if not half_life_s > 0:
            raise ValueError("half_life_s must be > 0")
        if not max_future_s >= 0:
            raise ValueError("max_future_s must be >= 0")
        self.half_life_ms = half_life_s * 1000.0
        self.max_future_ms = int(max_future_s * 1000)
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._weights: dict[str, float] = {}
        self._ref_ts: int | None = None
        self._newest: int | None = None  # the newest plausible event time counted
        self.future_clicks = 0  # clicks stamped past the wall clock (+ max_future_s), counted at _newest
        self._lock = threading.Lock()
        self.generation = 0
        self.clicks = 0

    def add(self, item_ids: Iterable[str], ts: int) -> int:
        """Count one click on each item at event time ``ts``; return how many."""
        ids = list(item_ids)
        if not ids:
            return 0
        with self._lock:
            if ts > self._clock_ms() + self.max_future_ms:
                self.future_clicks += len(ids)
                if self._newest is None:  # nothing plausible yet: weight 1, like the first plausible click
                    self._count(ids, 1.0)
                    return len(ids)
                ts = self._newest
            self._newest = ts if self._newest is None else max(self._newest, ts)
            if self._ref_ts is None:
                self._ref_ts = ts
            exponent = (ts - self._ref_ts) / self.half_life_ms
            if exponent > self._REBASE:
                factor = 2.0 ** (-exponent)
                self._weights = {i: w * factor for i, w in self._weights.items() if w * factor > 0.0}
                self._ref_ts, exponent = ts, 0.0
            self._count(ids, 2.0 ** max(exponent, -1074.0))
        return len(ids)

    def _count(self, ids: list[str], w: float) -> None:
        for item in ids:
            self._weights[item] = self._weights.get(item, 0.0) + w
        self.generation += 1
        self.clicks += len(ids)

    def vector(self, item_ids: Sequence[str]) -> np.ndarray:
        """Popularity of each item scaled to [0, 1] by the most popular one (zeros without clicks)."""
        with self._lock:
            get = self._weights.get
            v = np.fromiter((get(i, 0.0) for i in item_ids), dtype=np.float64, count=len(item_ids))
        top = v.max(initial=0.0)
        return v / top if top > 0 else v

    def __len__(self) -> int:
        return len(self._weights)

    def state(self) -> dict[str, object]:
        """Everything needed to rebuild this estimate (JSON- and ``torch.load(weights_only)``-safe)."""
        with self._lock:
            return {"half_life_s": self.half_life_ms / 1000.0, "ref_ts": self._ref_ts, "newest_ts": self._newest,
                    "weights": dict(self._weights), "clicks": self.clicks}

    @classmethod
    def from_state(cls, state: dict[str, object], half_life_s: float) -> Popularity:
        """An estimate restored from :meth:`state`; one kept under another half-life starts empty."""
        pop = cls(half_life_s)
        if float(state.get("half_life_s", -1.0)) != float(half_life_s):  # type: ignore[arg-type]
            return pop
        ref = state.get("ref_ts")
        pop._ref_ts = None if ref is None else int(ref)  # type: ignore[call-overload]
        newest = state.get("newest_ts", ref)
        pop._newest = None if newest is None else int(newest)  # type: ignore[call-overload]
        pop._weights = {str(k): float(v) for k, v in dict(state.get("weights", {})).items()}  # type: ignore[call-overload]
        pop.clicks = int(state.get("clicks", 0))  # type: ignore[call-overload]
        pop.generation = 1 if pop._weights else 0
        return pop
