"""The record contract: every type accepts its valid form and rejects each kind of invalid one."""

from __future__ import annotations

import base64
import json

import pytest

from contract.errors import RecordError
from contract.records import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    Click,
    DeadLetter,
    Impression,
    Item,
    Labeled,
    ModelUpdate,
    Recommendation,
    RecRequest,
    UserHistory,
    example_id,
)
from contract.topics import ALL_TOPICS

VALID: dict[type, dict] = {
    Item: {"item_id": "i1", "text": "Toy Story (1995)", "categories": ["Animation"], "ts": 0},
    Impression: {
        "impression_id": "imp1",
        "user_id": "u1",
        "items": ["i1", "i2", "i3"],
        "ts": 1000,
        "context": {"page": "home"},
        "propensities": [0.5, 0.3, 0.2],
    },
    Click: {"impression_id": "imp1", "user_id": "u1", "item_id": "i2", "ts": 1500, "value": 4.0},
    Labeled: {
        "example_id": "imp1:i2",
        "impression_id": "imp1",
        "user_id": "u1",
        "item_id": "i2",
        "position": 1,
        "label": 1,
        "value": 4.0,
        "history": ["i9"],
        "impression_ts": 1000,
        "label_ts": 1500,
        "late": False,
        "ts": 1500,
    },
    UserHistory: {"user_id": "u1", "items": ["i9", "i2"], "ts": 1500},
    RecRequest: {"request_id": "r1", "user_id": "u1", "ts": 2000, "k": 5, "candidates": ["i1", "i2"]},
    Recommendation: {
        "request_id": "r1",
        "user_id": "u1",
        "items": [{"item_id": "i2", "score": 0.9, "propensity": 0.8}, {"item_id": "i1", "score": 0.1}],
        "model_version": "3",
        "ts": 2001,
    },
    ModelUpdate: {
        "model": "streamrec",
        "version": 3,
        "uri": "file:///weights/v000003/manifest.json",
        "sha256": "ab" * 32,
        "kind": "delta",
        "base_version": 2,
        "created_ts": 5,
        "metrics": {"auc": 0.71},
        "trained_examples": 1200,
        "source_offsets": {"labeled:0": 300},
        "ts": 5,
    },
    DeadLetter: {
        "source_topic": "clicks",
        "partition": 2,
        "offset": 17,
        "key": "u1",
        "error": "Click.ts: Field required",
        "raw_value": base64.b64encode(b"{}").decode(),
        "ts": 9,
    },
}

KEYS = {
    Item: b"i1",
    Impression: b"u1",
    Click: b"u1",
    Labeled: b"u1",
    UserHistory: b"u1",
    RecRequest: b"u1",
    Recommendation: b"u1",
    ModelUpdate: b"streamrec",
    DeadLetter: b"u1",
}


def test_every_topic_has_a_valid_example() -> None:
    assert set(VALID) == set(RECORD_TYPES.values()) == {t.record for t in ALL_TOPICS}


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_valid_roundtrip(cls) -> None:
    rec = cls.from_dict(VALID[cls])
    assert rec.schema_version == SCHEMA_VERSION
    assert cls.from_json(rec.to_json()) == rec
    assert rec.kafka_key() == KEYS[cls]
    # The wire form is plain JSON with the DESIGN.md field names.
    wire = json.loads(rec.to_json())
    for field, value in VALID[cls].items():
        assert wire[field] == value


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_missing_required_field_names_it(cls) -> None:
    required = [n for n, f in cls.model_fields.items() if f.is_required()]
    assert "ts" in required
    for name in required:
        data = dict(VALID[cls])
        del data[name]
        with pytest.raises(RecordError) as info:
            cls.from_dict(data)
        assert info.value.field == name
        assert "required" in info.value.reason.lower()


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_not_json_and_not_an_object(cls) -> None:
    for raw in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"42", None):
        with pytest.raises(RecordError) as info:
            cls.from_json(raw)
        assert info.value.field == "<json>"


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_wrong_types_are_rejected_not_coerced(cls) -> None:
    for bad_ts in ("1000", 1.5, -1, None, True):
        with pytest.raises(RecordError) as info:
            cls.from_dict({**VALID[cls], "ts": bad_ts})
        assert info.value.field == "ts"


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_unknown_schema_version_is_refused(cls) -> None:
    with pytest.raises(RecordError) as info:
        cls.from_dict({**VALID[cls], "schema_version": SCHEMA_VERSION + 1})
    assert info.value.field == "schema_version"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    rec = Click.from_dict({**VALID[Click], "new_field": 1})
    assert "new_field" not in json.loads(rec.to_json())


def test_optional_fields_are_left_out_when_unset() -> None:
    rec = Click(impression_id="a", user_id="u", item_id="x", ts=1)
    assert "value" not in json.loads(rec.to_json())


@pytest.mark.parametrize(
    ("cls", "change", "field"),
    [
        (Item, {"item_id": ""}, "item_id"),
        (Item, {"text": ""}, "text"),
        (Item, {"categories": "Comedy"}, "categories"),
        (Impression, {"items": []}, "items"),
        (Impression, {"items": ["a", "a"]}, "items"),
        (Impression, {"items": ["a", ""], "propensities": None}, "items.1"),  # the empty id, by position
        (Impression, {"propensities": [0.5, 0.5]}, "<record>"),
        (Impression, {"propensities": [0.5, 0.0, 0.5]}, "<record>"),
        (Impression, {"context": [1]}, "context"),
        (Click, {"value": "4"}, "value"),
        (Click, {"item_id": 7}, "item_id"),
        (Labeled, {"label": 2}, "label"),
        (Labeled, {"position": -1}, "position"),
        (Labeled, {"example_id": "imp1:other"}, "<record>"),
        (Labeled, {"late": "no"}, "late"),
        (Labeled, {"history": "i9"}, "history"),
        (RecRequest, {"k": 0}, "k"),
        (RecRequest, {"candidates": ["a", "a"]}, "candidates"),
        (Recommendation, {"items": [{"item_id": "x"}]}, "items.0.score"),
        (Recommendation, {"items": [{"item_id": "x", "score": 1.0, "propensity": 0}]}, "items.0.propensity"),
        (ModelUpdate, {"sha256": "XYZ"}, "sha256"),
        (ModelUpdate, {"kind": "partial"}, "kind"),
        (ModelUpdate, {"base_version": None}, "<record>"),
        (ModelUpdate, {"base_version": 3}, "<record>"),
        (ModelUpdate, {"version": 0}, "version"),
        (DeadLetter, {"error": ""}, "error"),
        (UserHistory, {"items": [1, 2]}, "items.0"),
    ],
)
def test_each_kind_of_invalid(cls, change, field) -> None:
    with pytest.raises(RecordError) as info:
        cls.from_dict({**VALID[cls], **change})
    assert info.value.field == field
    assert info.value.record_type == cls.__name__
    assert str(info.value).startswith(f"{cls.__name__}.{field}: ")


def test_constructor_validates_too() -> None:
    with pytest.raises(RecordError) as info:
        Click(impression_id="a", user_id="u", item_id="x", ts=1, value=float("nan"))
    assert info.value.field == "value"
    assert "finite" in info.value.reason


def test_records_are_immutable() -> None:
    rec = Click.from_dict(VALID[Click])
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError type
        rec.ts = 5  # type: ignore[misc]


def test_example_id_is_impression_and_item() -> None:
    assert example_id("imp1", "i2") == "imp1:i2"


def test_dead_letter_keeps_the_raw_bytes_and_reason() -> None:
    raw = b"\x00\xffnot json"
    dl = DeadLetter.of(
        source_topic="impressions", partition=1, offset=5, key=b"u9", value=raw,
        error=RecordError("Impression", "<json>", "not valid JSON"), ts=3,
    )
    back = DeadLetter.from_json(dl.to_json())
    assert back.raw() == raw
    assert back.key == "u9"
    assert back.kafka_key() == b"u9"
    assert back.error == "Impression.<json>: not valid JSON"
    assert DeadLetter.of(source_topic="t", partition=0, offset=0, key=None, value=None,
                         error=ValueError(), ts=0).error == "ValueError"


# --------------------------------------------------------------------------- example ids (issue 12 item 7)
def test_example_ids_are_unambiguous_and_always_valid() -> None:
    from contract.errors import RecordError
    from contract.records import (
        MAX_ID,
        Click,
        Impression,
        Labeled,
        RecRequest,
        UserHistory,
        example_id,
    )

    # "a:b" + "c" and "a" + "b:c" would collide: an impression id cannot hold ':'
    with pytest.raises(RecordError, match="impression_id"):
        Impression(impression_id="a:b", user_id="u", items=["c"], ts=1)
    with pytest.raises(RecordError, match="impression_id"):
        Click(impression_id="a:b", user_id="u", item_id="c", ts=1)
    ok = Impression(impression_id="a", user_id="u", items=["b:c"], ts=1)
    assert example_id(ok.impression_id, "b:c").split(":", 1) == ["a", "b:c"]
    # the longest ids still make a valid example (it was capped at 512 characters)
    imp, item = "i" * MAX_ID, "j" * MAX_ID
    ex = Labeled(example_id=example_id(imp, item), impression_id=imp, user_id="u", item_id=item, position=0,
                 label=1, impression_ts=1, label_ts=1, ts=1)
    assert Labeled.from_json(ex.to_json()) == ex
    # every id of a list is bounded like a single one
    long_id = "x" * (MAX_ID + 1)
    for bad in (
        lambda: Impression(impression_id="a", user_id="u", items=[long_id], ts=1),
        lambda: UserHistory(user_id="u", items=[long_id], ts=1),
        lambda: RecRequest(request_id="r", user_id="u", k=1, candidates=[long_id], ts=1),
    ):
        with pytest.raises(RecordError):
            bad()


def test_exploration_fields_are_optional_and_checked() -> None:
    """Impression.request_id/model_version and Labeled.propensity/model_version (issue 13): optional,
    left out when unset, and a propensity outside (0, 1] or an empty id is refused by name."""
    imp = Impression.from_dict({**VALID[Impression], "request_id": "r1", "model_version": "3"})
    assert (imp.request_id, imp.model_version) == ("r1", "3")
    assert Impression.from_json(imp.to_json()) == imp
    lab = Labeled.from_dict({**VALID[Labeled], "propensity": 0.25, "model_version": "fallback:popularity"})
    assert (lab.propensity, lab.model_version) == (0.25, "fallback:popularity")
    assert Labeled.from_json(lab.to_json()) == lab
    assert Labeled.from_dict({**VALID[Labeled], "propensity": 1}).propensity == 1.0  # a JSON int is a number
    for cls in (Impression, Labeled):
        plain = json.loads(cls.from_dict(VALID[cls]).to_json())
        assert "model_version" not in plain and "request_id" not in plain and "propensity" not in plain
    for cls, change, field in [
        (Labeled, {"propensity": 0.0}, "propensity"),
        (Labeled, {"propensity": 1.5}, "propensity"),
        (Labeled, {"propensity": "0.5"}, "propensity"),
        (Labeled, {"model_version": ""}, "model_version"),
        (Impression, {"request_id": ""}, "request_id"),
        (Impression, {"model_version": 3}, "model_version"),
    ]:
        with pytest.raises(RecordError) as info:
            cls.from_dict({**VALID[cls], **change})
        assert info.value.field == field
