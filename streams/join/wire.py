"""The join's hand-written JSON and its persisted state: what each state key holds, and how.

Everything the join writes is encoded here, without a validation pass (every
field is correct by construction), because it is written for every event:

* :func:`quote` / :func:`json_list`: JSON strings and lists of strings, used by
  the output records (:mod:`streams.join.outputs`) too;
* the state of one partition is a set of keys with JSON values (``None`` =
  deleted), written to the worker's changelog and read back by
  :meth:`streams.join.JoinCore.restore`:

  ==============  ==============================================================
  ``w``           ``{"max_ts": [imp, clk], "wm", "seq", "next_offset": [imp, clk]}``
  ``i/<imp id>``  one remembered impression (:class:`ImpressionState`)
  ``o/<imp id>``  early clicks of an impression not seen yet: ``[[click, offset, seq, expiry], ...]``
  ``h/<user id>`` the user's click history: ``[[ts, seq, item_id, impression_id], ...]``
  ==============  ==============================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from contract.records import Click

quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
"""A string as a JSON string literal (ASCII, as ``json.dumps``)."""
compact_json = json.JSONEncoder(separators=(",", ":")).encode

Entry: TypeAlias = tuple[int, int, str, str]
"""A history entry: (click ts, arrival seq, item_id, impression_id), kept sorted."""
Early: TypeAlias = tuple[Click, int, int, int]
"""A buffered early click: (click, offset, seq, expiry)."""


def json_list(items: list[str]) -> str:
    """A list of strings as JSON."""
    return "[" + ",".join(map(quote, items)) + "]"


class ImpressionState:
    """One remembered impression: open until its window closes, then closed until evicted."""

    __slots__ = (
        "impression_id", "user_id", "ts", "items", "positives", "held", "beyond", "closed", "arrival",
        "_items_json", "propensities", "model_version",
    )  # fmt: skip

    def __init__(
        self,
        impression_id: str,
        user_id: str,
        ts: int,
        items: tuple[str, ...],
        propensities: tuple[float, ...] | None = None,
        model_version: str | None = None,
    ) -> None:
        self.impression_id = impression_id
        self.user_id = user_id
        self.ts = ts
        self.items = items
        self.positives: set[str] = set()  # items whose positive was emitted (or is held, below)
        # in-window positives not emitted yet (positives_at_close): item -> (click ts, value), emitted
        # with the impression's negatives when its window closes
        self.held: dict[str, tuple[int, float | None]] = {}
        self.beyond: dict[str, tuple[int, float | None]] = {}  # clicks after the window end, while open
        self.closed = False
        # the partition's arrival count when it arrived: a closed impression is remembered until
        # its event-time retention has passed *and* late_hold_events more events have arrived
        self.arrival = 0
        self._items_json: str | None = None
        self.propensities = propensities  # the logging policy's, copied into each example
        self.model_version = model_version

    def propensity(self, position: int) -> float | None:
        return None if self.propensities is None else self.propensities[position]

    def state_json(self) -> bytes:
        """:meth:`state` encoded as JSON, fast (this is written for every impression)."""
        if self._items_json is None:
            self._items_json = json_list(list(self.items))
        s = f'{{"u":{quote(self.user_id)},"ts":{self.ts},"items":{self._items_json}'
        if self.propensities is not None:
            s += ',"p":[' + ",".join(map(repr, self.propensities)) + "]"
        if self.model_version is not None:
            s += f',"mv":{quote(self.model_version)}'
        if self.positives:
            s += f',"pos":{json_list(sorted(self.positives))}'
        for key, clicks in (("held", self.held), ("beyond", self.beyond)):
            if clicks:
                s += f',"{key}":{{' + ",".join(
                    f'{quote(k)}:[{t},{"null" if v is None else repr(v)}]' for k, (t, v) in clicks.items()
                ) + "}"
        if self.closed:
            s += ',"closed":true'
        if self.arrival:
            s += f',"a":{self.arrival}'
        return (s + "}").encode()

    def state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"u": self.user_id, "ts": self.ts, "items": list(self.items)}
        if self.propensities is not None:
            s["p"] = list(self.propensities)
        if self.model_version is not None:
            s["mv"] = self.model_version
        if self.positives:
            s["pos"] = sorted(self.positives)
        if self.held:
            s["held"] = {k: list(v) for k, v in self.held.items()}
        if self.beyond:
            s["beyond"] = {k: list(v) for k, v in self.beyond.items()}
        if self.closed:
            s["closed"] = True
        if self.arrival:
            s["a"] = self.arrival
        return s

    @classmethod
    def from_state(cls, impression_id: str, s: Mapping[str, Any]) -> ImpressionState:
        p = s.get("p")
        rec = cls(
            impression_id, s["u"], int(s["ts"]), tuple(s["items"]),
            None if p is None else tuple(float(x) for x in p), s.get("mv"),
        )  # fmt: skip
        rec.positives = set(s.get("pos", ()))
        rec.held = {k: (int(v[0]), v[1]) for k, v in s.get("held", {}).items()}
        rec.beyond = {k: (int(v[0]), v[1]) for k, v in s.get("beyond", {}).items()}
        rec.closed = bool(s.get("closed", False))
        rec.arrival = int(s.get("a", 0))
        return rec


# --- the other keys -------------------------------------------------------------------------
def watermark_state(max_ts: list[int | None], watermark: int, seq: int, next_offset: list[int]) -> dict[str, Any]:
    return {"max_ts": list(max_ts), "wm": watermark, "seq": seq, "next_offset": list(next_offset)}


def early_state(early: Iterable[Early] | None) -> list[Any] | None:
    value = [[c.to_dict(), off, seq, exp] for c, off, seq, exp in early or ()]
    return value or None


def early_from_state(value: list[Any]) -> list[Early]:
    return [(Click.from_dict(c), int(off), int(seq), int(exp)) for c, off, seq, exp in value]


def history_state(hist: list[Entry] | None) -> list[Any] | None:
    return [list(e) for e in hist] if hist else None


def history_from_state(value: list[Any]) -> list[Entry]:
    return sorted((int(t), int(s), i, m) for t, s, i, m in value)
