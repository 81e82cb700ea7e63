"""The worker side of input contiguity: classify delivered offsets, find holes, seek back.

:class:`~streams.offsets.GapGuard` is the pure logic; :class:`InputGaps`
applies it to the input partitions a Faust consumer is assigned:

* every delivered input is checked against the next offset its partition's
  state must apply (:meth:`InputGaps.check`): a hole is logged, counted
  (``input_gaps_total``) and its partition sought back at the end of the batch;
* a partition whose consumer highwater passed the state's offset while
  nothing of it arrived for :data:`END_HOLE_AFTER_S` (a hole at the end of the
  input, which no later event reveals) is sought back too
  (:meth:`InputGaps.due_seeks`, on the idle tick), as is one whose seek was lost;
* a stream counts as backlogged (so it does not let the watermark run ahead)
  while its highwater is past the state's offset or a re-read is pending
  (:meth:`InputGaps.backlog`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from faust.types import TP

from streams.join import JoinCore
from streams.metrics import JoinMetrics
from streams.offsets import GapGuard, Verdict

log = logging.getLogger(__name__)

RESEEK_AFTER_S = 5.0
"""A seek back to a hole whose re-read has not started by then is repeated (the seek was lost)."""
END_HOLE_AFTER_S = 3.0
"""A partition whose position passed the state's offset with nothing delivered for this long is
sought back (the events were skipped and no later event reveals the hole)."""

Key = tuple[str, int]


class InputGaps:
    """The pending re-reads of one worker's input partitions (keys: ``(topic, partition)``)."""

    def __init__(
        self,
        consumer: Callable[[], Any],
        stream_of: Mapping[str, str],
        first_stream: str,
        metrics: JoinMetrics,
    ) -> None:
        self._consumer = consumer  # the app's consumer, read when needed (it changes on restart)
        self._stream_of = dict(stream_of)  # real topic name -> stream name ("impressions"/"clicks")
        self._first_stream = first_stream
        self._metrics = metrics
        self._guard = GapGuard(RESEEK_AFTER_S)
        self._last_delivery: dict[Key, float] = {}  # monotonic time of the last event
        self._end_hole_position: dict[Key, int] = {}  # position of a pending end hole
        self._no_hole_at: dict[Key, int] = {}  # positions whose re-read brought nothing

    def check(self, key: Key, offset: int, expected: int, seeks: dict[Key, int]) -> Verdict:
        """Classify one delivered input; on a hole, note the seek in ``seeks`` (and log it once)."""
        self._last_delivery[key] = time.monotonic()
        verdict = self._guard.check(key, offset, expected)
        if verdict is not Verdict.SEEK:
            return verdict
        topic, partition = key
        if key in seeks:
            pass  # sought back in this batch already
        elif self._guard.confirming(key):
            log.info("%s[%d]: re-read starts at %d, not %d: seeking once more to confirm",
                     topic, partition, offset, expected)  # fmt: skip
        else:
            log.warning(
                "%s[%d]: offset %d delivered but the state expects %d: events were skipped "
                "upstream; re-reading from %d",
                topic, partition, offset, expected, expected,
            )  # fmt: skip
            self._metrics.input_gaps.inc()
        seeks[key] = expected
        return verdict

    def _inputs(self, cores: Mapping[int, JoinCore]) -> Iterator[tuple[Any, str, Key, JoinCore | None]]:
        """``(tp, stream name, (topic, partition), core or None)`` of each assigned input partition."""
        for tp in self._consumer().assignment():
            stream = self._stream_of.get(tp.topic)
            if stream is not None:
                yield tp, stream, (tp.topic, tp.partition), cores.get(tp.partition)

    def _highwater(self, tp: Any) -> int | None:
        try:
            return self._consumer().highwater(tp)
        except Exception as exc:  # mid-rebalance, fetch not started: no information
            log.debug("no highwater for %s: %r", tp, exc)
            return None

    def backlog(self, cores: Mapping[int, JoinCore]) -> dict[int, tuple[bool, bool]]:
        """Partitions whose impressions / clicks may have records waiting to be processed.

        A stream is idle only when there is nothing to read: one whose consumer
        lags (CPU starvation, a slow fetch, a fresh assignment not fetched yet)
        or that has a hole being re-read must not let the watermark run ahead.
        What was read is the state's next offset, not the consumer position (which
        passes events Faust skipped).  Unknown counts as waiting.
        """
        waiting: dict[int, list[bool]] = {}
        for tp, stream, key, core in self._inputs(cores):
            highwater = self._highwater(tp)
            caught_up = (
                core is not None
                and highwater is not None
                and not self._guard.pending(key)
                and (highwater <= core.next_offset(stream) or self._no_hole_at.get(key) == highwater)
            )
            if not caught_up:
                flags = waiting.setdefault(tp.partition, [False, False])
                flags[0 if stream == self._first_stream else 1] = True
        return {p: (f[0], f[1]) for p, f in waiting.items()}

    def due_seeks(self, cores: Mapping[int, JoinCore], owned: set[int]) -> dict[Key, int]:
        """The seeks the idle tick performs: lost seeks repeated, and holes at the end of the input."""
        due, abandoned = self._guard.due()
        for key in abandoned:
            log.info("%s[%d]: nothing to re-read (transaction markers only)", *key)
            self._no_hole_at[key] = self._end_hole_position.pop(key, -1)
        seeks: dict[Key, int] = dict(due)
        seeks.update(self._end_holes(cores))
        return {k: v for k, v in seeks.items() if k[1] in owned}

    def _end_holes(self, cores: Mapping[int, JoinCore]) -> dict[Key, int]:
        """Input partitions with records past the state's offset (by the consumer's highwater)
        although nothing of them arrived for :data:`END_HOLE_AFTER_S`: their last events were
        skipped upstream.  No broker call: this runs under the worker's lock, on every tick."""
        now = time.monotonic()
        holes: dict[Key, int] = {}
        for tp, stream, key, core in self._inputs(cores):
            if core is None or self._guard.pending(key):
                continue
            if now - self._last_delivery.setdefault(key, now) < END_HOLE_AFTER_S:
                continue
            expected = core.next_offset(stream)
            highwater = self._highwater(tp)
            if highwater is None or highwater <= expected or self._no_hole_at.get(key) == highwater:
                continue
            log.warning(
                "%s[%d]: records up to offset %d but the state expects %d and nothing arrived "
                "for %.0f s: events were skipped upstream; re-reading from %d",
                tp.topic, tp.partition, highwater - 1, expected, END_HOLE_AFTER_S, expected,
            )  # fmt: skip
            self._guard.expect(key, expected, highwater - 1)
            self._end_hole_position[key] = highwater
            self._last_delivery[key] = now
            self._metrics.input_gaps.inc()
            holes[key] = expected
        return holes

    async def seek(self, offsets: Mapping[Key, int]) -> None:
        """Move input partitions back to the offsets their state must apply next."""
        if not offsets:
            return
        try:
            await self._consumer().seek_wait({TP(t, p): o for (t, p), o in offsets.items()})
        except Exception as exc:  # revoked meanwhile, or a broker error: the guard seeks again
            log.warning("could not seek %s: %r (retrying)", dict(offsets), exc)

    def forget(self, partition: int) -> None:
        """Drop what is known of a revoked partition's inputs."""
        keys = [(topic, partition) for topic in self._stream_of]
        for key in keys:
            self._last_delivery.pop(key, None)
            self._end_hole_position.pop(key, None)
            self._no_hole_at.pop(key, None)
        self._guard.forget(keys)
