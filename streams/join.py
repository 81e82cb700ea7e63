"""The impression–click join of DESIGN.md as a pure state machine: no Faust, no Kafka.

One :class:`JoinCore` owns one partition.  Feed it impressions and clicks in
arrival order (:meth:`JoinCore.on_impression`, :meth:`JoinCore.on_click`) and
call :meth:`JoinCore.tick` now and then; each call returns what to emit:
:class:`Example` (a ``labeled`` record), :class:`HistoryUpdate` (a ``user-history``
record) and :class:`Rejected` clicks (for the dead-letter topic).  Examples
and history updates are light objects with the record's field names; they
encode straight to the record's JSON (``to_json``, no validation pass: every
field is correct by construction) or convert to the validated record
(``to_record``).

Semantics (all times are event time in ms unless they say wall clock):

* **Watermarks.**  Each input stream has ``max ts seen − allowed_lateness``;
  the partition watermark is the minimum of the two and never goes back.  A
  stream with no arrival for ``idle_timeout_s`` (wall clock, injectable
  ``clock``) stops holding it back; when both are idle every open window
  closes and every buffered early click is dead-lettered.
* **Window.**  An impression at ``T`` attributes clicks with ``ts <= T + window``:
  the window end is **inclusive**.  The window closes when the watermark
  passes the end (``watermark > T + window``); every shown item not clicked
  by then is emitted with ``label=0`` and ``label_ts = T + window``.
* **Positives** are emitted when the click arrives (``label_ts`` = click ts).
  A click after the window end, or one that arrives after the window closed,
  becomes a positive with ``late=True``, always after the item's negative.
* **Early clicks** (impression not seen yet) wait until the watermark passes
  ``click ts + orphan_grace_ms`` (or the buffer of ``orphan_buffer_max`` is
  full, oldest first), then become orphans.  A click that contradicts its
  impression (item not in the slate, other user) is rejected at once.
* **Duplicates.**  At most one negative and one positive per ``example_id``;
  a repeated impression id or click changes nothing.  Closed impressions are
  remembered until the watermark passes ``T + window + closed_retention_ms``
  (so memory is bounded by event time, not by count); after that a click for
  them is an orphan and a replayed impression would be joined afresh.
* **History.**  Every accepted click (the first one per example_id) goes into
  the user's history.  An example carries the user's last ``history_length``
  clicked items with ``ts < T`` (strictly before the impression, never a click
  of the same impression): no click after the impression can leak in.
  Negatives see every such click that arrived within the lateness; a positive
  sees those that arrived before it.  A history keeps every entry newer than
  ``watermark − window − retention`` (still needed for open or remembered
  impressions) plus the ``history_length`` entries before that, and never
  more than ``max(4 × history_length, history_length + 100)``.

:func:`reference_join` computes the same labels from the whole stream at once;
for any arrival order within the allowed lateness (clicks no earlier than
their impression minus the grace, no later than window + retention after it)
the core emits the same set of ``(example_id, label)``.

State for persistence: :meth:`JoinCore.drain_changes` returns the state keys
changed since the last call (JSON-able values, ``None`` = deleted) and
:meth:`JoinCore.restore` rebuilds a core from such keys.  The state also
records, per input stream, the next offset it must apply
(:meth:`JoinCore.next_offset`), so a worker that restores it skips redelivered
inputs instead of applying them to a state that has moved past them, and
re-reads any it never got (:mod:`streams.offsets`).
"""

from __future__ import annotations

import heapq
import json
import time
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from contract.errors import ConfigError, RecordError
from contract.records import SCHEMA_VERSION, Click, Impression, Labeled, UserHistory, example_id

_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_compact_json = json.JSONEncoder(separators=(",", ":")).encode

NO_WATERMARK = -(2**62)
"""The watermark before any event: below every valid ``ts``."""

_IMP, _CLK = 0, 1
_STREAMS = ("impressions", "clicks")


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """The event-time semantics of one join; see the module docstring."""

    window_ms: int = 30 * 60_000
    allowed_lateness_ms: int = 5_000
    idle_timeout_s: float = 10.0
    orphan_grace_ms: int = 60_000
    orphan_buffer_max: int = 100_000
    closed_retention_ms: int = 60 * 60_000
    history_length: int = 50

    def __post_init__(self) -> None:
        for name, low in (
            ("window_ms", 1),
            ("allowed_lateness_ms", 0),
            ("orphan_grace_ms", 0),
            ("orphan_buffer_max", 1),
            ("closed_retention_ms", 0),
            ("history_length", 1),
        ):
            if getattr(self, name) < low:
                raise ConfigError(name, f"must be >= {low}, got {getattr(self, name)}")
        if not self.idle_timeout_s > 0:
            raise ConfigError("idle_timeout_s", f"must be > 0, got {self.idle_timeout_s}")

    @property
    def history_cap(self) -> int:
        return max(4 * self.history_length, self.history_length + 100)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A click the join cannot use; the worker sends it to ``dead-letters``."""

    click: Click
    offset: int
    """Offset of the click on its partition (-1 when unknown)."""
    reason: str
    orphan: bool
    """True: no impression within the grace; False: the click contradicts its impression."""


def check_event_time(record_type: str, ts: int, kafka_ts_ms: int | None, max_future_skew_ms: int) -> None:
    """Refuse an event whose ``ts`` is more than ``max_future_skew_ms`` after its Kafka timestamp.

    One event from a clock far ahead would move its partition's watermark
    there and close every open window at once: a false negative for each
    pending impression, and late positives after.  The record's Kafka
    timestamp (the producer's CreateTime, or the broker's LogAppendTime)
    bounds when the event can have happened; events of the past (replays)
    always pass.  ``0`` turns the check off, and a record without a Kafka
    timestamp is not checked.  A producer that stamps both from the same
    wrong clock is not caught.

    Raises:
        RecordError: field ``ts``, saying by how much and which setting.
    """
    if max_future_skew_ms and kafka_ts_ms is not None and kafka_ts_ms > 0:
        ahead = ts - kafka_ts_ms
        if ahead > max_future_skew_ms:
            raise RecordError(
                record_type,
                "ts",
                f"event time {ts} is {ahead} ms after the record's Kafka timestamp {kafka_ts_ms} "
                f"(more than STREAMREC_JOIN_MAX_FUTURE_SKEW_MS={max_future_skew_ms}): a clock far ahead "
                "would close every window of its partition",
            )


def json_list(items: list[str]) -> str:
    """A list of strings as JSON."""
    return "[" + ",".join(map(_quote, items)) + "]"


class Example:
    """One ``labeled`` record (DESIGN.md field names), cheap to build and to encode."""

    __slots__ = (
        "impression_id", "user_id", "item_id", "position", "label", "value",
        "history", "impression_ts", "label_ts", "late", "_history_json",
    )  # fmt: skip

    def __init__(
        self,
        impression_id: str,
        user_id: str,
        item_id: str,
        position: int,
        label: int,
        value: float | None,
        history: list[str],
        impression_ts: int,
        label_ts: int,
        late: bool,
        history_json: str | None = None,
    ) -> None:
        self.impression_id = impression_id
        self.user_id = user_id
        self.item_id = item_id
        self.position = position
        self.label = label
        self.value = value
        self.history = history
        self.impression_ts = impression_ts
        self.label_ts = label_ts
        self.late = late
        self._history_json = history_json

    @property
    def example_id(self) -> str:
        return example_id(self.impression_id, self.item_id)

    @property
    def ts(self) -> int:
        return self.label_ts

    def to_json(self) -> bytes:
        """The ``labeled`` value: the JSON of :meth:`to_record` (optional ``value`` left out when None)."""
        hist = self._history_json if self._history_json is not None else json_list(self.history)
        value = "" if self.value is None else f',"value":{self.value!r}'
        return (
            f'{{"schema_version":{SCHEMA_VERSION},"ts":{self.label_ts},'
            f'"example_id":{_quote(self.impression_id + ":" + self.item_id)},'
            f'"impression_id":{_quote(self.impression_id)},"user_id":{_quote(self.user_id)},'
            f'"item_id":{_quote(self.item_id)},"position":{self.position},"label":{self.label}{value},'
            f'"history":{hist},"impression_ts":{self.impression_ts},"label_ts":{self.label_ts},'
            f'"late":{"true" if self.late else "false"}}}'
        ).encode()

    def to_record(self) -> Labeled:
        """The validated :class:`~contract.records.Labeled` record."""
        return Labeled(
            example_id=self.example_id,
            impression_id=self.impression_id,
            user_id=self.user_id,
            item_id=self.item_id,
            position=self.position,
            label=self.label,
            value=self.value,
            history=list(self.history),
            impression_ts=self.impression_ts,
            label_ts=self.label_ts,
            late=self.late,
            ts=self.label_ts,
        )

    def __repr__(self) -> str:
        return (
            f"Example({self.example_id!r}, label={self.label}, late={self.late}, "
            f"label_ts={self.label_ts}, history={self.history!r})"
        )


class HistoryUpdate:
    """One ``user-history`` record: the user's clicked items, most recent last."""

    __slots__ = ("user_id", "items", "ts")

    def __init__(self, user_id: str, items: list[str], ts: int) -> None:
        self.user_id = user_id
        self.items = items
        self.ts = ts

    def to_json(self) -> bytes:
        return (
            f'{{"schema_version":{SCHEMA_VERSION},"ts":{self.ts},'
            f'"user_id":{_quote(self.user_id)},"items":{json_list(self.items)}}}'
        ).encode()

    def to_record(self) -> UserHistory:
        return UserHistory(user_id=self.user_id, items=list(self.items), ts=self.ts)

    def __repr__(self) -> str:
        return f"HistoryUpdate({self.user_id!r}, {self.items!r}, ts={self.ts})"


Output: TypeAlias = Example | HistoryUpdate | Rejected


class _Impression:
    """One remembered impression: open until its window closes, then closed until evicted."""

    __slots__ = ("impression_id", "user_id", "ts", "items", "positives", "beyond", "closed", "_items_json")

    def __init__(self, impression_id: str, user_id: str, ts: int, items: tuple[str, ...]) -> None:
        self.impression_id = impression_id
        self.user_id = user_id
        self.ts = ts
        self.items = items
        self.positives: set[str] = set()  # items whose positive was emitted
        self.beyond: dict[str, tuple[int, float | None]] = {}  # clicks after the window end, while open
        self.closed = False
        self._items_json: str | None = None

    def state_json(self) -> bytes:
        """:meth:`state` encoded as JSON, fast (this is written for every impression)."""
        if self._items_json is None:
            self._items_json = json_list(list(self.items))
        s = f'{{"u":{_quote(self.user_id)},"ts":{self.ts},"items":{self._items_json}'
        if self.positives:
            s += f',"pos":{json_list(sorted(self.positives))}'
        if self.beyond:
            s += ',"beyond":{' + ",".join(
                f'{_quote(k)}:[{t},{"null" if v is None else repr(v)}]' for k, (t, v) in self.beyond.items()
            ) + "}"
        if self.closed:
            s += ',"closed":true'
        return (s + "}").encode()

    def state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"u": self.user_id, "ts": self.ts, "items": list(self.items)}
        if self.positives:
            s["pos"] = sorted(self.positives)
        if self.beyond:
            s["beyond"] = {k: list(v) for k, v in self.beyond.items()}
        if self.closed:
            s["closed"] = True
        return s

    @classmethod
    def from_state(cls, impression_id: str, s: Mapping[str, Any]) -> _Impression:
        rec = cls(impression_id, s["u"], int(s["ts"]), tuple(s["items"]))
        rec.positives = set(s.get("pos", ()))
        rec.beyond = {k: (int(v[0]), v[1]) for k, v in s.get("beyond", {}).items()}
        rec.closed = bool(s.get("closed", False))
        return rec


# A history entry: (click ts, arrival seq, item_id, impression_id), kept sorted.
_Entry: TypeAlias = tuple[int, int, str, str]
# A buffered early click: (click, offset, seq, expiry).
_Early: TypeAlias = tuple[Click, int, int, int]


class JoinCore:
    """The join state of one partition.  Not thread-safe; one caller at a time."""

    def __init__(self, config: JoinConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._imps: dict[str, _Impression] = {}
        self._open: dict[str, _Impression] = {}
        # (event time, impression_id): the window end of an open impression, the
        # eviction time of a closed one.  Stale entries are skipped when popped.
        self._deadlines: list[tuple[int, str]] = []
        self._early: dict[str, list[_Early]] = {}
        self._early_heap: list[tuple[int, int, str]] = []  # (expiry, seq, impression_id)
        self._early_count = 0
        self._histories: dict[str, list[_Entry]] = {}
        self._max_ts: list[int | None] = [None, None]
        now = clock()
        self._last_arrival = [now, now]
        self._watermark = NO_WATERMARK
        self._next_offset = [0, 0]  # per stream: inputs below this offset are in the state
        self._seq = 0
        self._dirty: set[str] = set()
        self.counts: Counter[str] = Counter()
        """Monotonic event counts: duplicate_impressions, duplicate_clicks."""

    # --- inputs ---------------------------------------------------------------------------
    def on_impression(self, imp: Impression, offset: int = -1) -> list[Output]:
        """Take one impression in arrival order; return what to emit."""
        out: list[Output] = []
        now = self._arrive(_IMP, imp.ts, offset)
        iid = imp.impression_id
        if iid in self._imps:
            self.counts["duplicate_impressions"] += 1
        else:
            rec = _Impression(iid, imp.user_id, imp.ts, tuple(imp.items))
            self._imps[iid] = rec
            self._open[iid] = rec
            heapq.heappush(self._deadlines, (rec.ts + self.config.window_ms, iid))
            self._dirty.add("i/" + iid)
            early = self._early.pop(iid, None)
            if early is not None:
                self._dirty.add("o/" + iid)
                self._early_count -= len(early)
                for click, off, _seq, _expiry in early:
                    self._apply_click(rec, click, off, out)
        self._advance(now, out)
        return out

    def on_click(self, click: Click, offset: int = -1) -> list[Output]:
        """Take one click in arrival order; return what to emit."""
        out: list[Output] = []
        now = self._arrive(_CLK, click.ts, offset)
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
        hist = self._histories.get(user_id, [])
        return [e[2] for e in hist[-self.config.history_length :]]

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
                changes[key] = None if value is None else _compact_json(value).encode()
        self._dirty = set()
        return changes

    def snapshot(self) -> dict[str, Any]:
        """Every state key and its value (what :meth:`restore` needs)."""
        keys = ["w"]
        keys += ["i/" + k for k in self._imps]
        keys += ["o/" + k for k in self._early]
        keys += ["h/" + k for k in self._histories]
        return {k: self._state_of(k) for k in keys}

    @classmethod
    def restore(
        cls,
        config: JoinConfig,
        state: Iterable[tuple[str, Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> JoinCore:
        """Rebuild a core from state keys (as written by :meth:`drain_changes`)."""
        core = cls(config, clock)
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
                rec = _Impression.from_state(ident, value)
                core._imps[ident] = rec
                if rec.closed:
                    deadline = rec.ts + config.window_ms + config.closed_retention_ms
                else:
                    core._open[ident] = rec
                    deadline = rec.ts + config.window_ms
                core._deadlines.append((deadline, ident))
            elif kind == "o":
                early = [(Click.from_dict(c), int(off), int(seq), int(exp)) for c, off, seq, exp in value]
                core._early[ident] = early
                core._early_count += len(early)
                core._early_heap.extend((exp, seq, ident) for _c, _off, seq, exp in early)
            elif kind == "h":
                core._histories[ident] = sorted((int(t), int(s), i, m) for t, s, i, m in value)
            else:
                raise ValueError(f"unknown join state key {key!r}")
        # an early click whose impression is known was matched: its deletion was not persisted
        for iid in [i for i in core._early if i in core._imps]:
            core._early_count -= len(core._early.pop(iid))
            core._early_heap = [e for e in core._early_heap if e[2] != iid]
            core._dirty.add("o/" + iid)
        heapq.heapify(core._deadlines)
        heapq.heapify(core._early_heap)
        seqs = [e[1] for h in core._histories.values() for e in h]
        seqs += [e[1] for e in core._early_heap]
        core._seq = max([core._seq, *seqs]) if seqs else core._seq
        return core

    def _state_of(self, key: str) -> Any:
        if key == "w":
            return {
                "max_ts": list(self._max_ts),
                "wm": self._watermark,
                "seq": self._seq,
                "next_offset": list(self._next_offset),
            }
        kind, ident = key[0], key[2:]
        if kind == "i":
            rec = self._imps.get(ident)
            return rec.state() if rec is not None else None
        if kind == "o":
            early = self._early.get(ident)
            return [[c.to_dict(), off, seq, exp] for c, off, seq, exp in early] if early else None
        hist = self._histories.get(ident)
        return [list(e) for e in hist] if hist else None

    # --- internals --------------------------------------------------------------------------
    def _arrive(self, stream: int, ts: int, offset: int) -> float:
        now = self._clock()
        self._last_arrival[stream] = now
        if offset >= self._next_offset[stream]:
            self._next_offset[stream] = offset + 1
            self._dirty.add("w")
        seen = self._max_ts[stream]
        if seen is None or ts > seen:
            self._max_ts[stream] = ts
            self._dirty.add("w")
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
            candidate = wm_clk
        elif clk_idle:
            candidate = wm_imp
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
                del self._imps[iid]
                self._dirty.add("i/" + iid)
        early_heap = self._early_heap
        while early_heap and early_heap[0][0] < wm:
            _expiry, seq, iid = heapq.heappop(early_heap)
            self._expire_early(iid, seq, "no impression within the grace period", out)
        if imp_idle and clk_idle:
            for rec in list(self._open.values()):
                self._close(rec, out)
            while early_heap:
                _expiry, seq, iid = heapq.heappop(early_heap)
                self._expire_early(iid, seq, "no impression before both streams went idle", out)

    def _close(self, rec: _Impression, out: list[Output]) -> None:
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
                out.append(Example(iid, user, item, position, 0, None, history, ts0, end, False, hjson))
        for item, (ts, value) in rec.beyond.items():
            positives.add(item)
            out.append(Example(iid, user, item, rec.items.index(item), 1, value, history, ts0, ts, True, hjson))
        rec.beyond = {}

    def _apply_click(self, rec: _Impression, click: Click, offset: int, out: list[Output]) -> None:
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
            position = rec.items.index(item)
            history = self._history_as_of(rec)
            out.append(
                Example(rec.impression_id, rec.user_id, item, position, 1, click.value, history,
                        rec.ts, click.ts, late)
            )  # fmt: skip
        self._remember_click(rec, click, out)

    def _remember_click(self, rec: _Impression, click: Click, out: list[Output]) -> None:
        cfg = self.config
        user = rec.user_id
        hist = self._histories.get(user)
        if hist is None:
            hist = self._histories[user] = []
        self._seq += 1
        insort(hist, (click.ts, self._seq, click.item_id, rec.impression_id))
        if self._watermark != NO_WATERMARK:
            old = bisect_left(hist, (self._watermark - cfg.window_ms - cfg.closed_retention_ms,))
            if old > cfg.history_length:
                del hist[: old - cfg.history_length]
        if len(hist) > cfg.history_cap:
            del hist[: len(hist) - cfg.history_cap]
        self._dirty.add("h/" + user)
        self._dirty.add("w")  # seq
        items = [e[2] for e in hist[-cfg.history_length :]]
        out.append(HistoryUpdate(user, items, hist[-1][0]))

    def _earlier_click(self, rec: _Impression, click: Click) -> None:
        """A repeated click on an example: the history keeps the earliest one."""
        hist = self._histories.get(rec.user_id, [])
        for i, entry in enumerate(hist):
            if entry[2] == click.item_id and entry[3] == rec.impression_id:
                if click.ts < entry[0]:
                    del hist[i]
                    insort(hist, (click.ts, entry[1], entry[2], entry[3]))
                    self._dirty.add("h/" + rec.user_id)
                return

    def _forget_click(self, rec: _Impression, item: str) -> None:
        hist = self._histories.get(rec.user_id, [])
        for i, entry in enumerate(hist):
            if entry[2] == item and entry[3] == rec.impression_id:
                del hist[i]
                return

    def _history_as_of(self, rec: _Impression) -> list[str]:
        hist = self._histories.get(rec.user_id)
        if not hist:
            return []
        n = self.config.history_length
        iid = rec.impression_id
        j = bisect_left(hist, (rec.ts,)) - 1
        items: list[str] = []
        while j >= 0 and len(items) < n:
            entry = hist[j]
            if entry[3] != iid:
                items.append(entry[2])
            j -= 1
        items.reverse()
        return items

    def _buffer_early(self, click: Click, offset: int, out: list[Output]) -> None:
        iid = click.impression_id
        early = self._early.get(iid)
        if early is not None and any(c == click for c, *_ in early):
            self.counts["duplicate_clicks"] += 1
            return
        while self._early_count >= self.config.orphan_buffer_max and self._early_heap:
            _expiry, seq, old = heapq.heappop(self._early_heap)
            self._expire_early(old, seq, "the early-click buffer is full", out)
        if early is None:
            early = self._early[iid] = []
        self._seq += 1
        expiry = click.ts + self.config.orphan_grace_ms
        early.append((click, offset, self._seq, expiry))
        heapq.heappush(self._early_heap, (expiry, self._seq, iid))
        self._early_count += 1
        self._dirty.add("o/" + iid)
        self._dirty.add("w")

    def _expire_early(self, iid: str, seq: int, why: str, out: list[Output]) -> None:
        early = self._early.get(iid)
        if not early:
            return
        for i, (click, offset, s, _expiry) in enumerate(early):
            if s == seq:
                del early[i]
                self._early_count -= 1
                if not early:
                    del self._early[iid]
                self._dirty.add("o/" + iid)
                out.append(Rejected(click, offset, f"orphan click: {why}", orphan=True))
                return


# --- the batch reference ------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceJoin:
    """What the join must emit for a whole stream, computed at once (see :func:`reference_join`)."""

    examples: tuple[Example, ...]
    orphans: tuple[Click, ...]
    invalid: tuple[Click, ...]

    def pairs(self) -> set[tuple[str, int]]:
        """The emitted set: ``(example_id, label)``."""
        return {(e.example_id, e.label) for e in self.examples}

    def positives(self) -> set[str]:
        return {e.example_id for e in self.examples if e.label == 1}

    def negatives(self) -> set[str]:
        return {e.example_id for e in self.examples if e.label == 0}


def reference_join(
    impressions: Iterable[Impression],
    clicks: Iterable[Click],
    *,
    window_ms: int,
    history_length: int = 50,
) -> ReferenceJoin:
    """The labels of DESIGN.md from the whole stream at once (no watermarks, no arrival order).

    * The first impression of each id counts; a click whose impression id is
      never seen is an orphan; one on another user or an item outside the slate
      is invalid.
    * Per (impression, item): clicked at ``ts <= impression ts + window`` →
      one positive (``label_ts`` = the earliest such click); clicked only later
      → a negative at the window end and a late positive; never → a negative.
    * History as of the impression: the user's last ``history_length`` clicked
      items (the earliest accepted click per example, by ts) with
      ``ts < impression ts``, excluding the impression's own clicks.
    """
    first: dict[str, tuple[int, Impression]] = {}
    for order, imp in enumerate(impressions):
        first.setdefault(imp.impression_id, (order, imp))
    orphans: list[Click] = []
    invalid: list[Click] = []
    clicked: dict[tuple[str, str], Click] = {}  # earliest click per example, ties by stream order
    for click in clicks:
        found = first.get(click.impression_id)
        if found is None:
            orphans.append(click)
            continue
        imp = found[1]
        if click.user_id != imp.user_id or click.item_id not in imp.items:
            invalid.append(click)
            continue
        key = (click.impression_id, click.item_id)
        if key not in clicked or click.ts < clicked[key].ts:
            clicked[key] = click
    # history entries per user: (ts, impression order, item, impression id)
    by_user: dict[str, list[tuple[int, int, str, str]]] = {}
    for (iid, item), click in clicked.items():
        by_user.setdefault(click.user_id, []).append((click.ts, first[iid][0], item, iid))
    for entries in by_user.values():
        entries.sort()
    examples: list[Example] = []
    for _order, imp in sorted(first.values(), key=lambda p: p[0]):
        prior = [
            item
            for ts, _o, item, iid in by_user.get(imp.user_id, [])
            if ts < imp.ts and iid != imp.impression_id
        ]
        history = prior[-history_length:]
        end = imp.ts + window_ms
        iid, user = imp.impression_id, imp.user_id
        for position, item in enumerate(imp.items):
            click = clicked.get((iid, item))
            if click is None or click.ts > end:
                examples.append(Example(iid, user, item, position, 0, None, history, imp.ts, end, False))
            if click is not None:
                late = click.ts > end
                examples.append(Example(iid, user, item, position, 1, click.value, history, imp.ts, click.ts, late))
    return ReferenceJoin(tuple(examples), tuple(orphans), tuple(invalid))
