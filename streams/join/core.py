"""The join state machine of one partition (:class:`JoinCore`); its semantics are in :mod:`streams.join`."""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from contract.records import Click, Impression
from streams.join.config import NO_WATERMARK, JoinConfig
from streams.join.history import Histories
from streams.join.outputs import Example, HistoryUpdate, Output, Rejected
from streams.join.wire import (
    Early,
    ImpressionState,
    compact_json,
    early_from_state,
    early_state,
    json_list,
    watermark_state,
)

_IMP, _CLK = 0, 1
_STREAMS = ("impressions", "clicks")


class JoinCore:
    """The join state of one partition.  Not thread-safe; one caller at a time."""

    def __init__(
        self,
        config: JoinConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall  # seconds since the epoch: bounds how far event time can run ahead
        self._imps: dict[str, ImpressionState] = {}
        self._open: dict[str, ImpressionState] = {}
        # (event time, impression_id): the window end of an open impression, the
        # eviction time of a closed one.  Stale entries are skipped when popped.
        self._deadlines: list[tuple[int, str]] = []
        self._early: dict[str, dict[int, Early]] = {}  # impression_id -> seq -> early click
        self._early_keys: dict[str, set[tuple[Any, ...]]] = {}  # to drop a repeated early click
        self._early_heap: list[tuple[int, int, str]] = []  # (expiry, seq, impression_id)
        self._early_count = 0
        # (arrival, impression_id): closed impressions past their event-time retention, kept
        # until late_hold_events more events have arrived (a lagging click or a backfill's
        # click still finds them); and, in arrival order, early clicks already past their grace
        # on arrival, waiting as long for their impression instead of being orphaned at once
        self._held: list[tuple[int, str]] = []
        self._held_early: deque[tuple[int, str]] = deque()
        self._histories = Histories(config.history_length, config.history_cap)
        self._max_ts: list[int | None] = [None, None]
        now = clock()
        self._last_arrival = [now, now]
        self._watermark = NO_WATERMARK
        self._next_offset = [0, 0]  # per stream: inputs below this offset are in the state
        self._seq = 0
        self._dirty: set[str] = set()
        self.counts: Counter[str] = Counter()
        """Monotonic event counts: duplicate_impressions, duplicate_clicks, and behind_impressions
        / behind_clicks (events that arrived behind the watermark by more than the window)."""

    # --- inputs ---------------------------------------------------------------------------
    def on_impression(self, imp: Impression, offset: int = -1) -> list[Output]:
        """Take one impression in arrival order; return what to emit."""
        out: list[Output] = []
        now = self._arrive(_IMP, imp.ts, offset)
        iid = imp.impression_id
        if iid in self._imps:
            self.counts["duplicate_impressions"] += 1
        else:
            props = None if imp.propensities is None else tuple(imp.propensities)
            rec = ImpressionState(iid, imp.user_id, imp.ts, tuple(imp.items), props, imp.model_version)
            self._imps[iid] = rec
            self._open[iid] = rec
            end = rec.ts + self.config.window_ms
            heapq.heappush(self._deadlines, (end, iid))
            self._dirty.add("i/" + iid)
            rec.arrival = self._seq
            if end < self._watermark:
                # behind the watermark by more than the window (a backfill): it closes now and is
                # remembered by arrival, so that its clicks, arriving next, are late positives
                self.counts["behind_impressions"] += 1
            early = self._early.pop(iid, None)
            if early is not None:
                self._early_keys.pop(iid, None)
                self._dirty.add("o/" + iid)
                self._early_count -= len(early)
                for click, off, _seq, _expiry in early.values():
                    self._apply_click(rec, click, off, out)
        self._advance(now, out)
        return out

    def on_click(self, click: Click, offset: int = -1) -> list[Output]:
        """Take one click in arrival order; return what to emit."""
        out: list[Output] = []
        now = self._arrive(_CLK, click.ts, offset)
        if click.ts + self.config.window_ms < self._watermark:
            self.counts["behind_clicks"] += 1
        rec = self._imps.get(click.impression_id)
        if rec is None:
            self._buffer_early(click, offset, out)
        else:
            self._apply_click(rec, click, offset, out)
        self._advance(now, out)
        return out

    def tick(self) -> list[Output]:
        """Advance the watermark by the wall clock (idle streams); return what to emit."""
        out: list[Output] = []
        self._advance(self._clock(), out)
        return out

    def next_offset(self, stream: str) -> int:
        """The next input offset of ``stream`` (``"impressions"``/``"clicks"``) this state must
        apply (0 before any).  Inputs below it are in the state: redelivered ones must be
        skipped, since the state may have moved past them (a closed impression forgotten, an
        early click matched)."""
        return self._next_offset[_STREAMS.index(stream)]

    def skip(self, stream: str, offset: int) -> None:
        """Record an input that never reaches the core (malformed) as applied."""
        i = _STREAMS.index(stream)
        if offset >= self._next_offset[i]:
            self._next_offset[i] = offset + 1
            self._dirty.add("w")

    def touch(self, impressions: bool = True, clicks: bool = True) -> None:
        """Count a stream as active now: events of it are waiting to be consumed (backlog),
        or consuming paused (a rebalance).  An idle stream is one with nothing to read."""
        now = self._clock()
        if impressions:
            self._last_arrival[_IMP] = now
        if clicks:
            self._last_arrival[_CLK] = now

    # --- observation ----------------------------------------------------------------------
    @property
    def watermark(self) -> int:
        """The partition watermark (:data:`NO_WATERMARK` before it is known)."""
        return self._watermark

    @property
    def max_event_ts(self) -> int | None:
        seen = [t for t in self._max_ts if t is not None]
        return max(seen) if seen else None

    @property
    def open_impressions(self) -> int:
        return len(self._open)

    @property
    def remembered_impressions(self) -> int:
        return len(self._imps)

    @property
    def early_clicks(self) -> int:
        return self._early_count

    def history(self, user_id: str) -> list[str]:
        """The user's clicked items known now, most recent last (at most history_length)."""
        return self._histories.latest(user_id)

    # --- state ----------------------------------------------------------------------------
    def drain_changes(self) -> dict[str, Any]:
        """State keys changed since the last call → JSON-able value, or None when deleted."""
        changes = {key: self._state_of(key) for key in self._dirty}
        self._dirty = set()
        return changes

    def drain_changes_json(self) -> dict[str, bytes | None]:
        """:meth:`drain_changes` with the values encoded as JSON (the changelog values)."""
        changes: dict[str, bytes | None] = {}
        imps = self._imps
        for key in self._dirty:
            if key[0] == "i":
                rec = imps.get(key[2:])
                changes[key] = rec.state_json() if rec is not None else None
            else:
                value = self._state_of(key)
                changes[key] = None if value is None else compact_json(value).encode()
        self._dirty = set()
        return changes

    def snapshot(self) -> dict[str, Any]:
        """Every state key and its value (what :meth:`restore` needs)."""
        keys = ["w"]
        keys += ["i/" + k for k in self._imps]
        keys += ["o/" + k for k in self._early]
        keys += ["h/" + k for k in self._histories.users()]
        return {k: self._state_of(k) for k in keys}

    @classmethod
    def restore(
        cls,
        config: JoinConfig,
        state: Iterable[tuple[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> JoinCore:
        """Rebuild a core from state keys (as written by :meth:`drain_changes`)."""
        core = cls(config, clock, wall)
        early_entries: list[tuple[int, int, str]] = []
        for key, value in state:
            if value is None:
                continue
            kind, ident = key[0], key[2:]
            if key == "w":
                core._max_ts = [value["max_ts"][0], value["max_ts"][1]]
                core._watermark = int(value["wm"])
                core._seq = max(core._seq, int(value["seq"]))
                core._next_offset = [int(o) for o in value.get("next_offset", (0, 0))]
            elif kind == "i":
                rec = ImpressionState.from_state(ident, value)
                core._imps[ident] = rec
                if rec.closed:
                    deadline = rec.ts + config.window_ms + config.closed_retention_ms
                else:
                    core._open[ident] = rec
                    deadline = rec.ts + config.window_ms
                core._deadlines.append((deadline, ident))
            elif kind == "o":
                early = early_from_state(value)
                core._early[ident] = {e[2]: e for e in early}
                core._early_keys[ident] = {_click_key(e[0]) for e in early}
                core._early_count += len(early)
                early_entries.extend((exp, seq, ident) for _c, _off, seq, exp in early)
            elif kind == "h":
                core._histories.load(ident, value)
            else:
                raise ValueError(f"unknown join state key {key!r}")
        # an early click whose impression is known was matched: its deletion was not persisted
        for iid in [i for i in core._early if i in core._imps]:
            core._early_count -= len(core._early.pop(iid))
            core._early_keys.pop(iid, None)
            core._dirty.add("o/" + iid)
        heapq.heapify(core._deadlines)
        for expiry, seq, iid in sorted(early_entries, key=lambda e: e[1]):
            if iid not in core._early:
                continue
            if expiry < core._watermark:  # expired on arrival: it was held
                core._held_early.append((seq, iid))
            else:
                core._early_heap.append((expiry, seq, iid))
        heapq.heapify(core._early_heap)
        seqs = [e[1] for e in early_entries]
        history_seq = core._histories.max_seq()
        if history_seq is not None:
            seqs.append(history_seq)
        core._seq = max([core._seq, *seqs])
        return core

    def _state_of(self, key: str) -> Any:
        if key == "w":
            return watermark_state(self._max_ts, self._watermark, self._seq, self._next_offset)
        kind, ident = key[0], key[2:]
        if kind == "i":
            rec = self._imps.get(ident)
            return rec.state() if rec is not None else None
        if kind == "o":
            early = self._early.get(ident)
            return early_state(early.values() if early else None)
        return self._histories.state(ident)

    # --- internals --------------------------------------------------------------------------
    def _arrive(self, stream: int, ts: int, offset: int) -> float:
        now = self._clock()
        self._last_arrival[stream] = now
        self._seq += 1  # the arrival count: held events are kept for a number of arrivals
        self._dirty.add("w")
        if offset >= self._next_offset[stream]:
            self._next_offset[stream] = offset + 1
        seen = self._max_ts[stream]
        if seen is None or ts > seen:
            # one clock ahead must not move the watermark into the future: an event moves its
            # stream at most watermark_lead_ms past the wall clock (its own ts is kept as is)
            ts = min(ts, int(self._wall() * 1000) + self.config.watermark_lead_ms)
            if seen is None or ts > seen:
                self._max_ts[stream] = ts
        return now

    def _stream_watermark(self, stream: int) -> int:
        seen = self._max_ts[stream]
        return NO_WATERMARK if seen is None else seen - self.config.allowed_lateness_ms

    def _advance(self, now: float, out: list[Output]) -> None:
        idle = self.config.idle_timeout_s
        imp_idle = now - self._last_arrival[_IMP] >= idle
        clk_idle = now - self._last_arrival[_CLK] >= idle
        wm_imp, wm_clk = self._stream_watermark(_IMP), self._stream_watermark(_CLK)
        if imp_idle and clk_idle:
            candidate = max(wm_imp, wm_clk)
        elif imp_idle:
            candidate = min(wm_clk, self._idle_stream_watermark(_IMP, now))
        elif clk_idle:
            candidate = min(wm_imp, self._idle_stream_watermark(_CLK, now))
        else:
            candidate = min(wm_imp, wm_clk)
        if candidate > self._watermark:
            self._watermark = candidate
            self._dirty.add("w")
        wm = self._watermark
        window, keep = self.config.window_ms, self.config.closed_retention_ms
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < wm:
            deadline, iid = heapq.heappop(deadlines)
            rec = self._imps.get(iid)
            if rec is None:
                continue
            if not rec.closed:
                self._close(rec, out)
            elif deadline == rec.ts + window + keep:
                if self._seq - rec.arrival >= self.config.late_hold_events:
                    self._forget(iid)
                else:
                    heapq.heappush(self._held, (rec.arrival, iid))
        early_heap = self._early_heap
        while early_heap and early_heap[0][0] < wm:
            _expiry, seq, iid = heapq.heappop(early_heap)
            self._expire_early(iid, seq, "no impression within the grace period", out)
        self._release_held(out)
        if imp_idle and clk_idle:
            self._close_idle(now, out)

    def _idle_stream_watermark(self, stream: int, now: float) -> float:
        """What an idle stream still holds the watermark back to: its newest event time advanced by
        the wall time it has been idle (event time at the wall-clock rate), minus the lateness.

        On a live stream that is about the wall clock, so the other stream rules as if the idle one
        were not there; in a replay running many times faster than the wall clock, a clicks producer
        that lags (or pauses) does not let the impressions close every window it has not caught up
        with.  A stream never seen does not hold the watermark back."""
        seen = self._max_ts[stream]
        if seen is None:
            return float("inf")
        idle_ms = int((now - self._last_arrival[stream]) * 1000)
        return seen + idle_ms - self.config.allowed_lateness_ms

    def _close_idle(self, now: float, out: list[Output]) -> None:
        """Both streams idle: close the windows that have ended by now, without moving the watermark.

        "Now" in event time is the later of the newest event time plus the idle wall time
        passed (a live stream whose clocks are right, early or late) and the wall clock (a
        replay or backfill of the past, whose windows nothing will close otherwise), minus the
        allowed lateness.  So a quiet live partition keeps its window (a click 5 min after its
        impression is a positive), and a finished replay closes everything at once.
        """
        cfg = self.config
        seen = [t for t in self._max_ts if t is not None]
        if not seen:
            return
        idle_ms = int((now - max(self._last_arrival)) * 1000)
        horizon = max(max(seen) + idle_ms, int(self._wall() * 1000)) - cfg.allowed_lateness_ms
        if self._open:
            for rec in [r for r in self._open.values() if r.ts + cfg.window_ms < horizon]:
                self._close(rec, out)
        if self._early_heap and self._early_heap[0][0] < horizon:
            kept = []
            for entry in self._early_heap:
                if entry[0] < horizon:
                    self._expire_early(entry[2], entry[1], "no impression before both streams went idle", out)
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._early_heap = kept
        while self._held_early:
            seq, iid = self._held_early.popleft()
            self._expire_early(iid, seq, "no impression before both streams went idle", out)

    def _release_held(self, out: list[Output]) -> None:
        """Forget held impressions and dead-letter held early clicks late_hold_events arrivals on."""
        oldest = self._seq - self.config.late_hold_events
        held = self._held
        while held and held[0][0] <= oldest:
            arrival, iid = heapq.heappop(held)
            rec = self._imps.get(iid)
            if rec is not None and rec.closed and rec.arrival == arrival:
                self._forget(iid)  # its event-time retention had passed when it was held
        held_early = self._held_early
        while held_early and held_early[0][0] <= oldest:
            seq, iid = held_early.popleft()
            self._expire_early(iid, seq, "no impression within the grace period (arrived behind the watermark)", out)

    def _forget(self, iid: str) -> None:
        del self._imps[iid]
        self._dirty.add("i/" + iid)

    def _close(self, rec: ImpressionState, out: list[Output]) -> None:
        cfg = self.config
        rec.closed = True
        del self._open[rec.impression_id]
        self._dirty.add("i/" + rec.impression_id)
        heapq.heappush(
            self._deadlines, (rec.ts + cfg.window_ms + cfg.closed_retention_ms, rec.impression_id)
        )
        history = self._history_as_of(rec)
        hjson = json_list(history)
        end = rec.ts + cfg.window_ms
        positives = rec.positives
        iid, user, ts0 = rec.impression_id, rec.user_id, rec.ts
        for position, item in enumerate(rec.items):
            if item not in positives:
                out.append(Example(iid, user, item, position, 0, None, history, ts0, end, False, hjson,
                                   rec.propensity(position), rec.model_version))
        # in-window positives held for the close (positives_at_close), then the late ones
        for late, clicks in ((False, rec.held), (True, rec.beyond)):
            for item, (ts, value) in clicks.items():
                positives.add(item)
                position = rec.items.index(item)
                out.append(Example(iid, user, item, position, 1, value, history, ts0, ts, late, hjson,
                                   rec.propensity(position), rec.model_version))
        rec.held, rec.beyond = {}, {}

    def _apply_click(self, rec: ImpressionState, click: Click, offset: int, out: list[Output]) -> None:
        item = click.item_id
        if click.user_id != rec.user_id:
            reason = (
                f"click user_id {click.user_id!r} differs from user_id {rec.user_id!r} "
                f"of impression {rec.impression_id!r}"
            )
            out.append(Rejected(click, offset, reason, orphan=False))
            return
        if item not in rec.items:
            reason = f"item {item!r} is not in the slate of impression {rec.impression_id!r}"
            out.append(Rejected(click, offset, reason, orphan=False))
            return
        in_window = click.ts <= rec.ts + self.config.window_ms
        if item in rec.positives or (item in rec.beyond and (rec.closed or not in_window)):
            self.counts["duplicate_clicks"] += 1
            if item in rec.beyond and click.ts < rec.beyond[item][0]:
                rec.beyond[item] = (click.ts, click.value)
                self._dirty.add("i/" + rec.impression_id)
            self._earlier_click(rec, click)
            return
        self._dirty.add("i/" + rec.impression_id)
        if item in rec.beyond:
            # an in-window click overtook a later one: it is the positive, not late
            del rec.beyond[item]
            self._forget_click(rec, item)
        if not rec.closed and not in_window:
            rec.beyond[item] = (click.ts, click.value)  # a late positive once the window closes
        else:
            rec.positives.add(item)
            late = rec.closed  # the item's negative is out already
            if not late and self.config.positives_at_close:
                rec.held[item] = (click.ts, click.value)  # emitted with the negatives at the close
            else:
                position = rec.items.index(item)
                history = self._history_as_of(rec)
                out.append(
                    Example(rec.impression_id, rec.user_id, item, position, 1, click.value, history,
                            rec.ts, click.ts, late, None, rec.propensity(position), rec.model_version)
                )  # fmt: skip
        self._remember_click(rec, click, out)

    def _remember_click(self, rec: ImpressionState, click: Click, out: list[Output]) -> None:
        cfg = self.config
        user = rec.user_id
        self._seq += 1
        needed_from = None
        if self._watermark != NO_WATERMARK:
            needed_from = self._watermark - cfg.window_ms - cfg.closed_retention_ms
        entry = (click.ts, self._seq, click.item_id, rec.impression_id)
        items, newest = self._histories.add(user, entry, needed_from)
        self._dirty.add("h/" + user)
        self._dirty.add("w")  # seq
        out.append(HistoryUpdate(user, items, newest))

    def _earlier_click(self, rec: ImpressionState, click: Click) -> None:
        """A repeated click on an example: the history keeps the earliest one."""
        if self._histories.move_earlier(rec.user_id, click.item_id, rec.impression_id, click.ts):
            self._dirty.add("h/" + rec.user_id)

    def _forget_click(self, rec: ImpressionState, item: str) -> None:
        self._histories.remove(rec.user_id, item, rec.impression_id)

    def _history_as_of(self, rec: ImpressionState) -> list[str]:
        return self._histories.as_of(rec.user_id, rec.ts, rec.impression_id)

    def _buffer_early(self, click: Click, offset: int, out: list[Output]) -> None:
        iid = click.impression_id
        cfg = self.config
        keys = self._early_keys.get(iid)
        key = _click_key(click)
        if keys is not None and key in keys:
            self.counts["duplicate_clicks"] += 1
            return
        early = self._early.get(iid)
        if early is not None and len(early) >= cfg.early_per_impression_max:
            reason = (
                f"orphan click: impression {iid!r} not seen yet has {len(early)} early clicks "
                f"(STREAMREC_JOIN_EARLY_PER_IMPRESSION_MAX={cfg.early_per_impression_max})"
            )
            out.append(Rejected(click, offset, reason, orphan=True))
            return
        while self._early_count >= cfg.orphan_buffer_max and (self._early_heap or self._held_early):
            if self._held_early:
                seq, old = self._held_early.popleft()
            else:
                _expiry, seq, old = heapq.heappop(self._early_heap)
            self._expire_early(old, seq, "the early-click buffer is full", out)
        if early is None:
            early = self._early[iid] = {}
            keys = self._early_keys[iid] = set()
        assert keys is not None
        seq = self._seq  # the click's arrival (set by _arrive)
        expiry = click.ts + cfg.orphan_grace_ms
        early[seq] = (click, offset, seq, expiry)
        keys.add(key)
        if expiry < self._watermark:
            self.counts["behind_early_clicks"] += 1
            self._held_early.append((seq, iid))
        else:
            heapq.heappush(self._early_heap, (expiry, seq, iid))
        self._early_count += 1
        self._dirty.add("o/" + iid)

    def _expire_early(self, iid: str, seq: int, why: str, out: list[Output]) -> None:
        early = self._early.get(iid)
        if not early:
            return
        entry = early.pop(seq, None)
        if entry is None:
            return
        click, offset, _seq, _expiry = entry
        self._early_count -= 1
        if early:
            self._early_keys[iid].discard(_click_key(click))
        else:
            del self._early[iid]
            self._early_keys.pop(iid, None)
        self._dirty.add("o/" + iid)
        out.append(Rejected(click, offset, f"orphan click: {why}", orphan=True))


def _click_key(click: Click) -> tuple[Any, ...]:
    """What makes a repeated click the same click (every field)."""
    return (click.ts, click.user_id, click.item_id, click.value, click.schema_version)


# --- the batch reference ------------------------------------------------------------------
