"""The record contract of DESIGN.md: one class per topic value, usable without Faust.

Every record is a frozen pydantic model with ``schema_version`` and event time
``ts`` (epoch milliseconds).  Values travel as UTF-8 JSON; optional fields that
are unset are left out of the JSON.  Unknown fields are ignored so that a
reader on this version accepts records written by a newer minor writer.

Every way a record can be invalid (not JSON, a missing field, a wrong type, a
rule between fields) raises one error type, :class:`RecordError`, which names
the field and the reason::

    >>> Click.from_json(b'{"schema_version": 1, "user_id": "u1"}')
    Traceback (most recent call last):
    ...
    contract.errors.RecordError: Click.impression_id: Field required
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.errors import RecordError

SCHEMA_VERSION = 1
"""The newest schema version this code writes and understands."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

MAX_ID = 512
"""Characters of any id (user, item, impression, request)."""
Id = Field(min_length=1, max_length=MAX_ID)
ImpressionId = Field(min_length=1, max_length=MAX_ID, pattern=r"^[^:]+$")
"""An impression id has no ':', so that ``example_id = impression_id + ':' + item_id`` is unambiguous
(``"a:b" + "c"`` and ``"a" + "b:c"`` cannot both exist) and splits back at its first ':'."""
ExampleId = Field(min_length=3, max_length=2 * MAX_ID + 1)
IdStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID)]
"""An id inside a list (slate, history, candidates): bounded like a single one."""
EpochMs = Field(ge=0, le=2**53)
MAX_QUERY = 1_000
"""Characters of a request's free-text ``query``."""


def _first_error(record_type: str, exc: ValidationError) -> RecordError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return RecordError(record_type, "<json>", f"not valid JSON ({err['msg']})")
    loc = ".".join(str(p) for p in err["loc"]) or "<record>"
    if err["type"] == "model_type" and not err["loc"]:
        return RecordError(record_type, "<json>", "value must be a JSON object")
    msg = err["msg"].removeprefix("Value error, ")
    return RecordError(record_type, loc, msg)


class Record(BaseModel):
    """Base of every topic value.  Subclasses set ``TOPIC`` and ``KEY_FIELD``."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    TOPIC: ClassVar[str]
    KEY_FIELD: ClassVar[str]

    schema_version: int = SCHEMA_VERSION
    ts: int = EpochMs

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _first_error(type(self).__name__, exc) from None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if not 1 <= v <= SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {v}; this reader knows 1..{SCHEMA_VERSION}")
        return v

    # --- (de)serialisation -------------------------------------------------
    @classmethod
    def from_json(cls, data: bytes | bytearray | str | None) -> Self:
        """Decode and validate one JSON value; raise :class:`RecordError` when invalid."""
        if data is None:
            raise RecordError(cls.__name__, "<json>", "empty value (tombstone or null)")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise _first_error(cls.__name__, exc) from None

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Validate a decoded mapping (JSON types only, as from ``json.loads``)."""
        return cls.from_json(_json_dumps(data))

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def kafka_key(self) -> bytes:
        """The message key of DESIGN.md for this record, UTF-8 encoded."""
        return str(getattr(self, self.KEY_FIELD) or "").encode()


def _json_dumps(data: Any) -> str:
    try:
        return json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecordError("Record", "<json>", f"not JSON-serialisable: {exc}") from None


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def _unique(values: list[str] | None, what: str) -> list[str] | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat an item_id")
    return values


class Item(Record):
    """``items`` (compacted, key item_id): the catalog entry, text for the item tower."""

    TOPIC: ClassVar[str] = "items"
    KEY_FIELD: ClassVar[str] = "item_id"

    item_id: str = Id
    text: str = Field(min_length=1, max_length=20_000)
    categories: list[str] = Field(default_factory=list)


class Impression(Record):
    """``impressions`` (key user_id): a slate shown to a user, items in position order."""

    TOPIC: ClassVar[str] = "impressions"
    KEY_FIELD: ClassVar[str] = "user_id"

    impression_id: str = ImpressionId
    user_id: str = Id
    items: list[IdStr] = Field(min_length=1, max_length=1000)
    context: dict[str, Any] | None = None
    propensities: list[float] | None = None
    """One per slate item, in (0, 1]: the probability that the logging policy chose the item at its
    position given the items above it (what serving's exploration writes; at position 0 it is the
    probability that the item was shown there).  Off-policy evaluation needs it (:mod:`trainer.ope`)."""
    request_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    """The rec-request this slate answered, when it came from a recommendation."""
    model_version: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    """The recommendation's ``model_version`` (a version number or ``"fallback:popularity"``)."""

    @field_validator("items")
    @classmethod
    def _items_unique(cls, v: list[str]) -> list[str]:
        return _unique(v, "a slate")  # type: ignore[return-value]

    @model_validator(mode="after")
    def _propensities_match(self) -> Impression:
        p = self.propensities
        if p is not None:
            if len(p) != len(self.items):
                raise ValueError(
                    f"propensities has {len(p)} entries but the slate has {len(self.items)} items"
                )
            if any(not (0.0 < x <= 1.0) for x in p):
                raise ValueError("propensities must lie in (0, 1]")
        return self


class Click(Record):
    """``clicks`` (key user_id): a click on an item of an earlier impression."""

    TOPIC: ClassVar[str] = "clicks"
    KEY_FIELD: ClassVar[str] = "user_id"

    impression_id: str = ImpressionId
    user_id: str = Id
    item_id: str = Id
    value: float | None = None

    @field_validator("value")
    @classmethod
    def _value_finite(cls, v: float | None) -> float | None:
        return _finite(v)


class Labeled(Record):
    """``labeled`` (key user_id): one training example; ``example_id`` is the idempotency key."""

    TOPIC: ClassVar[str] = "labeled"
    KEY_FIELD: ClassVar[str] = "user_id"

    example_id: str = ExampleId
    impression_id: str = ImpressionId
    user_id: str = Id
    item_id: str = Id
    position: int = Field(ge=0)
    label: Literal[0, 1]
    value: float | None = None
    history: list[IdStr] = Field(default_factory=list, max_length=10_000)
    impression_ts: int = EpochMs
    label_ts: int = EpochMs
    late: bool = False
    propensity: float | None = Field(default=None, gt=0.0, le=1.0)
    """The impression's propensity of this item (see ``Impression.propensities``): the probability that
    the logging policy chose it at ``position`` given the items above it; None = not logged."""
    model_version: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    """The impression's ``model_version``: which version (or fallback) chose the slate."""

    @field_validator("value")
    @classmethod
    def _value_finite(cls, v: float | None) -> float | None:
        return _finite(v)

    @model_validator(mode="after")
    def _example_id_matches(self) -> Labeled:
        if self.example_id != example_id(self.impression_id, self.item_id):
            raise ValueError("example_id must equal impression_id + ':' + item_id")
        return self


def example_id(impression_id: str, item_id: str) -> str:
    """The idempotency key of a labeled example (DESIGN.md §2): unambiguous, as impression ids have no ':'."""
    return f"{impression_id}:{item_id}"



class UserHistory(Record):
    """``user-history`` (compacted, key user_id): recent items, most recent last."""

    TOPIC: ClassVar[str] = "user-history"
    KEY_FIELD: ClassVar[str] = "user_id"

    user_id: str = Id
    items: list[IdStr] = Field(default_factory=list, max_length=10_000)


class RecRequest(Record):
    """``rec-requests`` (key user_id): ask for the top-k items, of the candidates if given."""

    TOPIC: ClassVar[str] = "rec-requests"
    KEY_FIELD: ClassVar[str] = "user_id"

    request_id: str = Id
    user_id: str = Id
    k: int = Field(ge=1, le=10_000)
    candidates: list[IdStr] | None = Field(default=None, max_length=100_000)
    query: str | None = Field(default=None, min_length=1, max_length=MAX_QUERY)
    """Optional free text ("quiet sci-fi with robots"): the candidates are ranked by how well their
    text and categories match it, blended with the model's score when the user has a history
    (DESIGN.md §5.4).  1-1,000 characters, not only whitespace."""

    @field_validator("candidates")
    @classmethod
    def _candidates_unique(cls, v: list[str] | None) -> list[str] | None:
        return _unique(v, "candidates")

    @field_validator("query")
    @classmethod
    def _query_has_text(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must contain a non-whitespace character")
        return v


class ScoredItem(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    item_id: str = Id
    score: float
    propensity: float | None = Field(default=None, gt=0.0, le=1.0)


class Recommendation(Record):
    """``recommendations`` (key user_id): the ranked answer to one request."""

    TOPIC: ClassVar[str] = "recommendations"
    KEY_FIELD: ClassVar[str] = "user_id"

    request_id: str = Id
    user_id: str = Id
    items: list[ScoredItem]
    model_version: str = Id


class ModelUpdate(Record):
    """``model-updates`` (compacted, key = model name): announces a published version."""

    TOPIC: ClassVar[str] = "model-updates"
    KEY_FIELD: ClassVar[str] = "model"

    model: str = Field(default="streamrec", min_length=1, max_length=256)
    version: int = Field(ge=1)
    uri: str = Field(min_length=1)
    sha256: str
    kind: Literal["full", "delta"]
    base_version: int | None = Field(default=None, ge=1)
    created_ts: int = EpochMs
    metrics: dict[str, float] = Field(default_factory=dict)
    trained_examples: int = Field(ge=0)
    source_offsets: dict[str, int] = Field(default_factory=dict)
    """Next offset to consume per ``"topic:partition"`` of the data this version trained on."""

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("must be 64 lowercase hex characters (a sha256 digest)")
        return v

    @model_validator(mode="after")
    def _delta_has_base(self) -> ModelUpdate:
        if self.kind == "delta":
            if self.base_version is None:
                raise ValueError("a delta version needs base_version")
            if self.base_version >= self.version:
                raise ValueError("base_version must be older than version")
        return self


class DeadLetter(Record):
    """``dead-letters`` (key = the original key): an input that could not be processed."""

    TOPIC: ClassVar[str] = "dead-letters"
    KEY_FIELD: ClassVar[str] = "key"

    source_topic: str = Field(min_length=1)
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    key: str | None = None
    error: str = Field(min_length=1)
    raw_value: str = ""
    """The original value bytes, base64-encoded."""

    @classmethod
    def of(
        cls,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | str | None,
        value: bytes | None,
        error: str | BaseException,
        ts: int,
    ) -> DeadLetter:
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            key=key,
            error=str(error) or type(error).__name__,
            raw_value=base64.b64encode(value or b"").decode("ascii"),
            ts=ts,
        )

    def raw(self) -> bytes:
        return base64.b64decode(self.raw_value)


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TOPIC: cls
    for cls in (
        Item,
        Impression,
        Click,
        Labeled,
        UserHistory,
        RecRequest,
        Recommendation,
        ModelUpdate,
        DeadLetter,
    )
}
"""Logical topic name (DESIGN.md, without prefix) → record type of its values."""
