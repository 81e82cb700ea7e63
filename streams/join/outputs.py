"""What the join emits: ``labeled`` examples, ``user-history`` updates and rejected clicks.

Examples and history updates are light objects with the record's field
names; they encode straight to the record's JSON (``to_json``, no validation
pass: every field is correct by construction) or convert to the validated
record (``to_record``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from contract.records import SCHEMA_VERSION, Click, Labeled, UserHistory, example_id
from streams.join.wire import json_list, quote


@dataclass(frozen=True, slots=True)
class Rejected:
    """A click the join cannot use; the worker sends it to ``dead-letters``."""

    click: Click
    offset: int
    """Offset of the click on its partition (-1 when unknown)."""
    reason: str
    orphan: bool
    """True: no impression within the grace; False: the click contradicts its impression."""


class Example:
    """One ``labeled`` record (DESIGN.md field names), cheap to build and to encode."""

    __slots__ = (
        "impression_id", "user_id", "item_id", "position", "label", "value",
        "history", "impression_ts", "label_ts", "late", "_history_json", "propensity", "model_version",
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
        propensity: float | None = None,
        model_version: str | None = None,
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
        self.propensity = propensity
        """The impression's propensity of this item (the logging policy's), when it carried one."""
        self.model_version = model_version
        """The version (or fallback) whose recommendation the impression showed, when it said."""

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
        if self.propensity is not None:
            value += f',"propensity":{self.propensity!r}'
        if self.model_version is not None:
            value += f',"model_version":{quote(self.model_version)}'
        return (
            f'{{"schema_version":{SCHEMA_VERSION},"ts":{self.label_ts},'
            f'"example_id":{quote(self.impression_id + ":" + self.item_id)},'
            f'"impression_id":{quote(self.impression_id)},"user_id":{quote(self.user_id)},'
            f'"item_id":{quote(self.item_id)},"position":{self.position},"label":{self.label}{value},'
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
            propensity=self.propensity,
            model_version=self.model_version,
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
            f'"user_id":{quote(self.user_id)},"items":{json_list(self.items)}}}'
        ).encode()

    def to_record(self) -> UserHistory:
        return UserHistory(user_id=self.user_id, items=list(self.items), ts=self.ts)

    def __repr__(self) -> str:
        return f"HistoryUpdate({self.user_id!r}, {self.items!r}, ts={self.ts})"


Output: TypeAlias = Example | HistoryUpdate | Rejected
