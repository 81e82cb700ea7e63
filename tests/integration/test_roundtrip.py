"""Every record type of the contract survives a trip through its topic on a real broker."""

from __future__ import annotations

import pytest

from contract.records import (
    Click,
    DeadLetter,
    Impression,
    Item,
    Labeled,
    ModelUpdate,
    Recommendation,
    Record,
    RecRequest,
    ScoredItem,
    UserHistory,
    example_id,
)
from contract.settings import KafkaSettings
from contract.topics import ALL_TOPICS, CLICKS, IMPRESSIONS, TopicSpec
from tests.kafka_utils import consume, consume_raw, java_partition, produce

pytestmark = pytest.mark.integration

TS = 1_700_000_000_000

SAMPLES: dict[str, Record] = {
    "items": Item(item_id="i1", text="Toy Story (1995)", categories=["Animation", "Comedy"], ts=TS),
    "impressions": Impression(
        impression_id="imp-1", user_id="u1", items=["i1", "i2", "i3"], ts=TS,
        context={"device": "tv", "page": 2}, propensities=[0.5, 0.25, 0.25],
    ),
    "clicks": Click(impression_id="imp-1", user_id="u1", item_id="i2", ts=TS + 1500, value=4.0),
    "labeled": Labeled(
        example_id=example_id("imp-1", "i2"), impression_id="imp-1", user_id="u1", item_id="i2",
        position=1, label=1, value=4.0, history=["i7", "i9"], impression_ts=TS, label_ts=TS + 1500,
        ts=TS + 1500,
    ),
    "user-history": UserHistory(user_id="u1", items=["i7", "i9", "i2"], ts=TS + 1500),
    "rec-requests": RecRequest(request_id="r-1", user_id="u1", k=2, candidates=["i1", "i2", "i3"], ts=TS),
    "recommendations": Recommendation(
        request_id="r-1", user_id="u1", model_version="3", ts=TS + 20,
        items=[ScoredItem(item_id="i3", score=0.9, propensity=0.6), ScoredItem(item_id="i1", score=0.1)],
    ),
    "model-updates": ModelUpdate(
        model="streamrec", version=3, uri="file:///weights/v3.safetensors", sha256="ab" * 32,
        kind="delta", base_version=2, created_ts=TS, metrics={"auc": 0.71}, trained_examples=1024,
        source_offsets={"labeled:0": 512}, ts=TS,
    ),
    "dead-letters": DeadLetter.of(
        source_topic="clicks", partition=2, offset=41, key=b"u1", value=b"{not json",
        error="Click.<json>: not valid JSON", ts=TS,
    ),
}  # fmt: skip

# The message key of each topic, as DESIGN.md's table says.
DESIGN_KEY_FIELD = {
    "items": "item_id",
    "impressions": "user_id",
    "clicks": "user_id",
    "labeled": "user_id",
    "user-history": "user_id",
    "rec-requests": "user_id",
    "recommendations": "user_id",
    "model-updates": "model",
    "dead-letters": "key",
}


def test_samples_cover_every_topic() -> None:
    assert set(SAMPLES) == {spec.name for spec in ALL_TOPICS} == set(DESIGN_KEY_FIELD)
    for spec in ALL_TOPICS:
        assert isinstance(SAMPLES[spec.name], spec.record)


@pytest.mark.parametrize("spec", ALL_TOPICS, ids=lambda s: s.name)
def test_record_round_trips_with_its_design_key(kafka_settings: KafkaSettings, spec: TopicSpec) -> None:
    record = SAMPLES[spec.name]
    assert produce(kafka_settings, spec, [record]) == 1

    [(key, value, partition, _offset)] = consume_raw(
        kafka_settings, spec.real_name(kafka_settings), count=1, timeout=30
    )
    assert key == str(getattr(record, DESIGN_KEY_FIELD[spec.name])).encode()
    assert partition == java_partition(key, kafka_settings.partitions)
    decoded = spec.record.from_json(value)
    assert decoded == record
    assert type(decoded) is type(record)

    assert consume(kafka_settings, spec, count=1, timeout=30) == [record]


def test_one_users_events_share_a_partition_as_java_places_them(kafka_settings: KafkaSettings) -> None:
    users = [f"user-{i}" for i in range(24)]
    impressions = [
        Impression(impression_id=f"imp-{u}-{n}", user_id=u, items=["i1", "i2"], ts=TS + n)
        for n in range(3)
        for u in users
    ]
    clicks = [Click(impression_id=f"imp-{u}-0", user_id=u, item_id="i1", ts=TS + 10) for u in users]
    produce(kafka_settings, IMPRESSIONS, impressions)
    produce(kafka_settings, CLICKS, clicks)

    got_imp = consume_raw(kafka_settings, IMPRESSIONS.real_name(kafka_settings), count=len(impressions))
    got_clk = consume_raw(kafka_settings, CLICKS.real_name(kafka_settings), count=len(clicks))
    assert len(got_imp) == len(impressions) and len(got_clk) == len(clicks)

    partition_of: dict[bytes, int] = {}
    for key, _value, partition, _offset in got_imp + got_clk:
        assert key is not None
        assert partition == java_partition(key, kafka_settings.partitions), key
        assert partition_of.setdefault(key, partition) == partition, f"{key!r} split across partitions"
    assert len(set(partition_of.values())) > 1, "24 users should not all hash to one partition"

    # Within a partition one user's events keep the order they were produced in.
    for user in users:
        ids = [
            Impression.from_json(v).impression_id
            for k, v, _p, _o in sorted(got_imp, key=lambda r: r[3])
            if k == user.encode()
        ]
        assert ids == [f"imp-{user}-{n}" for n in range(3)]
