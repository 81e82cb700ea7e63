"""Replays produced to a real broker come back complete, keyed for co-partitioning."""

from __future__ import annotations

from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from contract.settings import KafkaSettings
from contract.topics import CLICKS, IMPRESSIONS, ITEMS, TopicSpec
from streams.replay import cli
from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig
from streams.replay.producer import produce
from streams.replay.synthetic import SyntheticConfig, SyntheticStream
from tests.kafka_utils import consume, consume_raw, java_partition

pytestmark = pytest.mark.integration

LIMIT = 500


def _topic_size(settings: KafkaSettings, spec: TopicSpec) -> int:
    """Messages in the topic (sum of high watermarks; the topics are fresh, so low = 0)."""
    topic = spec.real_name(settings)
    consumer = Consumer(
        settings.confluent_config(**{"group.id": "size-probe", "enable.auto.commit": False})
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def movielens_slice() -> MovieLensReplay:
    from infra.assets import AssetError, movielens_path

    try:
        path = movielens_path()
    except AssetError as exc:
        pytest.skip(f"MovieLens-100k not available: {exc}")
    return MovieLensReplay.from_path(path, MovieLensReplayConfig(limit=LIMIT))


def test_a_movielens_slice_arrives_complete(
    kafka_settings: KafkaSettings, movielens_slice: MovieLensReplay
) -> None:
    stream = list(movielens_slice.stream())
    expected = Counter(spec.name for spec, _ in stream)
    assert expected["impressions"] == LIMIT

    result = produce(stream, kafka_settings, speed=None, progress=False)
    assert result.counts == dict(expected) == movielens_slice.counts()
    assert result.failed == 0

    for spec in (ITEMS, IMPRESSIONS, CLICKS):
        want = sorted(r.to_json() for s, r in stream if s is spec)
        got = consume(kafka_settings, spec, count=expected[spec.name], timeout=30)
        assert sorted(r.to_json() for r in got) == want, spec.name
        assert _topic_size(kafka_settings, spec) == expected[spec.name], (
            spec.name
        )  # and nothing else


def test_impressions_and_clicks_of_a_user_share_a_partition(
    kafka_settings: KafkaSettings, movielens_slice: MovieLensReplay
) -> None:
    counts = movielens_slice.counts()
    produce(movielens_slice.stream(), kafka_settings, progress=False, speed=None)
    parts = kafka_settings.partitions
    for spec in (IMPRESSIONS, CLICKS):
        raw = consume_raw(
            kafka_settings, spec.real_name(kafka_settings), count=counts[spec.name], timeout=30
        )
        assert len(raw) == counts[spec.name]
        assert all(p == java_partition(key, parts) for key, _v, p, _o in raw)


def test_the_cli_replays_synthetic_data(
    kafka_settings: KafkaSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STREAMREC_BOOTSTRAP_SERVERS", kafka_settings.bootstrap_servers)
    monkeypatch.setenv("STREAMREC_TOPIC_PREFIX", kafka_settings.topic_prefix)
    monkeypatch.setenv("STREAMREC_PARTITIONS", str(kafka_settings.partitions))
    args = ["--users", "20", "--items", "30", "--new-items", "5", "--events", "200", "--seed", "7"]
    # paced: 200 impressions at 1 s mean gap, 100000x faster, takes ~2 ms of wall time
    assert cli.main(["synthetic", *args, "--speed", "100000", "--no-progress"]) == 0
    assert "delivered" in capsys.readouterr().out

    world = SyntheticStream(SyntheticConfig(users=20, items=30, new_items=5, events=200, seed=7))
    expected = world.counts()
    for spec in (ITEMS, IMPRESSIONS, CLICKS):
        got = consume(kafka_settings, spec, count=expected[spec.name], timeout=30)
        assert len(got) == expected[spec.name], spec.name
    impressions = consume(kafka_settings, IMPRESSIONS, count=expected["impressions"], timeout=30)
    imp = impressions[0]
    assert imp.context["p_click"] == [
        world.true_probability(imp.impression_id, i) for i in imp.items
    ]
