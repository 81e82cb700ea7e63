"""The scoring agent on a real broker: live version, hot swap under load, refused versions,
labels learned by its own per-user posterior, zero-shot new items, dead letters.

The agent runs in-process (its threads), so a test can wait on its swap and
read its counters; requests and recommendations go through the broker.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contract.records import (
    DeadLetter,
    Item,
    Labeled,
    Recommendation,
    RecRequest,
    UserHistory,
    example_id,
)
from contract.settings import KafkaSettings
from contract.topics import (
    DEAD_LETTERS,
    ITEMS,
    LABELED,
    MODEL_UPDATES,
    REC_REQUESTS,
    RECOMMENDATIONS,
    USER_HISTORY,
)
from serving.agent import AgentError, ServingAgent
from serving.settings import FALLBACK_VERSION, ServingSettings
from tests.kafka_utils import consume, produce, produce_raw
from trainer.model import ModelConfig, RecModel, build_model
from trainer.weights import WeightStore

pytestmark = pytest.mark.integration

CONFIG = ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=64, max_history=8, freeze_layers=1)
TEXTS = {
    "s1": "Apollo 13: astronauts in a damaged spacecraft",
    "s2": "Star Wars: rebels fight the empire in space",
    "c1": "Julie and Julia: a cook learns French recipes",
    "r1": "Notting Hill: a romantic comedy in London",
    "w1": "Unforgiven: an old gunslinger in the wild west",
    "d1": "Microcosmos: a documentary about insects",
}


@pytest.fixture(scope="module")
def model() -> RecModel:
    return build_model(CONFIG)


@pytest.fixture
def store(tmp_path: Path) -> WeightStore:
    return WeightStore(tmp_path / "weights")


def perturbed(model: RecModel, amount: float) -> RecModel:
    other = build_model(CONFIG)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.item_tower.proj.weight.add_(amount)
        other.click_head.bias.add_(amount)
    return other


def seed_catalog(kafka: KafkaSettings, histories: dict[str, list[str]] | None = None) -> None:
    produce(kafka, ITEMS, [Item(item_id=i, text=t, ts=1_000) for i, t in TEXTS.items()])
    if histories:
        produce(kafka, USER_HISTORY, [UserHistory(user_id=u, items=h, ts=2_000) for u, h in histories.items()])


@contextmanager
def running_agent(
    kafka: KafkaSettings, store: WeightStore, producer_config: dict[str, object] | None = None, **overrides: object
) -> Iterator[ServingAgent]:
    values: dict[str, object] = {
        "weights_root": store.url, "group_id": f"serving-{uuid.uuid4().hex[:8]}", "popularity_refresh_s": 0.0,
    }
    settings = ServingSettings(**(values | overrides))
    agent = ServingAgent(kafka, settings, producer_config=producer_config).start(timeout=90)
    try:
        yield agent
    finally:
        agent.stop()
    assert agent.error is None


class Recommendations:
    """Reads recommendations from the beginning (by assignment) and keeps them by request_id."""

    def __init__(self, kafka: KafkaSettings) -> None:
        topic = RECOMMENDATIONS.real_name(kafka)
        self.consumer = Consumer(kafka.confluent_config(**{
            "group.id": f"test-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        }))  # fmt: skip
        parts = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.by_id: dict[str, Recommendation] = {}
        self.keys: dict[str, bytes | None] = {}
        self.duplicated: list[str] = []  # request ids answered more than once

    def wait_for(self, request_ids: list[str], timeout: float = 30.0) -> list[Recommendation]:
        """The recommendations of ``request_ids`` (in that order); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while any(r not in self.by_id for r in request_ids):
            left = deadline - time.monotonic()
            missing = [r for r in request_ids if r not in self.by_id]
            assert left > 0, f"no recommendation within {timeout} s for {len(missing)} request(s): {missing[:5]}"
            for msg in self.consumer.consume(num_messages=1000, timeout=min(left, 0.5)):
                assert msg.error() is None, msg.error()
                rec = Recommendation.from_json(msg.value())
                if rec.request_id in self.by_id:
                    self.duplicated.append(rec.request_id)
                self.by_id[rec.request_id] = rec
                self.keys[rec.request_id] = msg.key()
        return [self.by_id[r] for r in request_ids]

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def recs(kafka_settings: KafkaSettings) -> Iterator[Recommendations]:
    r = Recommendations(kafka_settings)
    yield r
    r.close()


def request(rid: str, user: str = "u1", k: int = 3, candidates: list[str] | None = None) -> RecRequest:
    return RecRequest(request_id=rid, user_id=user, k=k, candidates=candidates, ts=int(time.time() * 1000))


# --------------------------------------------------------------------------- tests
def test_a_request_gets_the_top_k_of_the_live_version(
    kafka_settings: KafkaSettings, store: WeightStore, model: RecModel, recs: Recommendations
) -> None:
    seed_catalog(kafka_settings, {"u1": ["s1", "c1"]})
    produce(kafka_settings, MODEL_UPDATES, [store.publish(model, version=1)])
    with running_agent(kafka_settings, store) as agent:
        assert agent.holder.current.version == "1"
        produce(kafka_settings, REC_REQUESTS, [
            request("whole", k=4),
            request("cands", k=5, candidates=["r1", "d1", "not-an-item"]),
            request("newbie", user="nobody", k=10),
        ])  # fmt: skip
        whole, cands, newbie = recs.wait_for(["whole", "cands", "newbie"])
        assert {r.model_version for r in (whole, cands, newbie)} == {"1"}
        assert len(whole.items) == 4 and len({s.item_id for s in whole.items}) == 4
        assert [s.score for s in whole.items] == sorted((s.score for s in whole.items), reverse=True)
        assert {s.item_id for s in cands.items} == {"r1", "d1"}  # the unknown candidate is skipped
        assert len(newbie.items) == len(TEXTS)  # k larger than the catalog: all of it
        assert recs.keys["whole"] == b"u1" and whole.user_id == "u1"
        m = agent.metrics
        assert m.value("requests_total", {"path": "model"}) == 2
        assert m.value("requests_total", {"path": "cold"}) == 1
        assert m.value("unknown_candidates_total") == 1
        assert m.value("model_version") == 1


def test_hot_swap_under_load_loses_nothing_and_switches_versions(
    kafka_settings: KafkaSettings, store: WeightStore, model: RecModel, recs: Recommendations
) -> None:
    seed_catalog(kafka_settings, {"u1": ["s1", "s2"], "u2": ["c1"]})
    produce(kafka_settings, MODEL_UPDATES, [store.publish(model, version=1)])
    v2 = perturbed(model, 0.05)
    with running_agent(kafka_settings, store) as agent:
        # Hold the loader inside the swap until requests were served meanwhile (then it loads for real).
        loading, release = threading.Event(), threading.Event()
        real_load = agent.store.load

        def gated_load(*args: object, **kwargs: object) -> RecModel:
            loading.set()
            assert release.wait(60)
            return real_load(*args, **kwargs)

        agent.store.load = gated_load  # type: ignore[method-assign]
        sent: list[str] = []
        chunks: list[tuple[str, list[str]]] = []  # (live version when produced, request ids)
        n = after_swap = 0

        def chunk() -> tuple[str, list[Recommendation]]:
            nonlocal n
            live = agent.holder.current.version
            ids = [f"r{n}-{i}" for i in range(20)]
            produce(kafka_settings, REC_REQUESTS, [request(r, user=f"u{i % 3}", k=3) for i, r in enumerate(ids)])
            chunks.append((live, ids))
            sent.extend(ids)
            n += 1
            return live, recs.wait_for(ids)  # closed loop: each chunk is answered before the next

        for _ in range(2):
            chunk()
        produce(kafka_settings, MODEL_UPDATES, [store.publish(v2, version=2, kind="delta", base_version=1)])
        assert loading.wait(30)
        for _ in range(3):  # the swap is under way: requests are answered by v1, without waiting
            _, answered = chunk()
            assert {r.model_version for r in answered} == {"1"}
        release.set()
        while after_swap < 3:
            assert n < 500, "the swap did not complete"
            live, answered = chunk()
            if live == "2":
                after_swap += 1
                assert {r.model_version for r in answered} == {"2"}, "a request after the swap got the old version"
        assert set(recs.by_id) == set(sent) and recs.duplicated == []  # none lost, none twice
        assert all(len(r.items) == 3 for r in recs.by_id.values())
        assert agent.metrics.value("swaps_total") == 2  # start-up + the hot swap
        assert agent.metrics.value("model_version") == 2
    assert consume(kafka_settings, DEAD_LETTERS, count=1, timeout=2) == []


def test_corrupt_versions_are_refused_and_the_old_one_keeps_serving(
    kafka_settings: KafkaSettings, store: WeightStore, model: RecModel, recs: Recommendations
) -> None:
    seed_catalog(kafka_settings, {"u1": ["s1"]})
    produce(kafka_settings, MODEL_UPDATES, [store.publish(model, version=1)])
    with running_agent(kafka_settings, store) as agent:
        wrong_sha = store.publish(perturbed(model, 0.1), version=2).model_copy(update={"sha256": "f" * 64})
        truncated = store.publish(perturbed(model, 0.2), version=3)
        wfile = Path(store.path) / "v000003" / "weights.safetensors"
        wfile.write_bytes(wfile.read_bytes()[: wfile.stat().st_size // 2])
        produce(kafka_settings, MODEL_UPDATES, [wrong_sha, truncated])
        assert agent.loader.wait_until(lambda: len(agent.loader.refused) == 2, timeout=60)
        assert sorted(agent.loader.refused) == [(2, "checksum"), (3, "truncated")]
        produce(kafka_settings, REC_REQUESTS, [request("after-refusal")])
        (rec,) = recs.wait_for(["after-refusal"])
        assert rec.model_version == "1" and len(rec.items) == 3
        m = agent.metrics
        assert m.value("refused_versions_total", {"reason": "checksum"}) == 1
        assert m.value("refused_versions_total", {"reason": "truncated"}) == 1
        assert m.value("model_version") == 1


def test_a_forged_model_update_pointing_outside_the_store_is_refused_and_never_served(
    kafka_settings: KafkaSettings, store: WeightStore, model: RecModel, recs: Recommendations, tmp_path: Path
) -> None:
    seed_catalog(kafka_settings, {"u1": ["s1"]})
    produce(kafka_settings, MODEL_UPDATES, [store.publish(model, version=1)])
    with running_agent(kafka_settings, store) as agent:
        # A valid version (right sha256, right model name) written outside the configured store.
        forged = WeightStore(tmp_path / "attacker").publish(perturbed(model, 0.5), version=2)
        produce(kafka_settings, MODEL_UPDATES, [forged])
        assert agent.loader.wait_until(lambda: len(agent.loader.refused) == 1, timeout=60)
        assert agent.loader.refused == [(2, "foreign")]
        produce(kafka_settings, REC_REQUESTS, [request("after-forgery")])
        (rec,) = recs.wait_for(["after-forgery"])
        assert rec.model_version == "1"
        assert agent.metrics.value("refused_versions_total", {"reason": "foreign"}) == 1
        assert agent.metrics.value("model_version") == 1


def test_a_new_item_is_recommended_by_its_text_without_any_click(
    kafka_settings: KafkaSettings, store: WeightStore, model: RecModel, recs: Recommendations
) -> None:
    # Space films are what people click; the new film is about space too.
    seed_catalog(kafka_settings, {"a": ["s1", "s2"], "b": ["s1"], "c": ["s2", "s1"]})
    produce(kafka_settings, MODEL_UPDATES, [store.publish(model, version=1)])
    with running_agent(kafka_settings, store) as agent:
        new = Item(item_id="new", text="Gravity: astronauts stranded in space after a spacecraft accident", ts=5_000)
        produce(kafka_settings, ITEMS, [new])
        assert agent.holder.wait_for(lambda sm: "new" in sm.index, timeout=30) is not None
        produce(kafka_settings, REC_REQUESTS, [
            request("cold", user="first-visit", k=len(TEXTS) + 1),
            request("warm", user="a", k=2, candidates=["new", "c1"]),
        ])  # fmt: skip
        cold, warm = recs.wait_for(["cold", "warm"])
        ranked = [s.item_id for s in cold.items]
        assert cold.model_version == "1" and set(ranked) == {*TEXTS, "new"}
        assert ranked[:2] == ["s1", "s2"]  # the clicked items
        assert ranked[2] == "new"  # ...then, by text similarity to them, the never-clicked new item
        assert "new" in {s.item_id for s in warm.items} and warm.model_version == "1"
        assert agent.metrics.value("items_encoded_total") == len(TEXTS) + 1


CATEGORIES = {"s1": "space", "s2": "space", "c1": "other", "r1": "other", "w1": "other", "d1": "other"}


def test_labels_reach_a_users_scores_before_any_new_version(
    kafka_settings: KafkaSettings, store: WeightStore, recs: Recommendations
) -> None:
    # The agent's own per-user posterior (serving/refresh.py) learns from `labeled` as it arrives.
    # Its features are the two category shares here (no catalog text basis without a trainer).
    cfg = CONFIG.model_copy(update={"categories": ["space", "other"], "user_posterior_dims": 0})
    produce(kafka_settings, ITEMS, [Item(item_id=i, text=t, categories=[CATEGORIES[i]], ts=1_000) for i, t in TEXTS.items()])
    produce(kafka_settings, USER_HISTORY, [UserHistory(user_id="fan", items=["s1"], ts=2_000)])
    produce(kafka_settings, MODEL_UPDATES, [store.publish(build_model(cfg), version=1)])

    def margin(rec: Recommendation) -> float:
        by = {s.item_id: s.score for s in rec.items}
        space = [v for i, v in by.items() if CATEGORIES[i] == "space"]
        other = [v for i, v in by.items() if CATEGORIES[i] == "other"]
        return sum(space) / len(space) - sum(other) / len(other)

    with running_agent(kafka_settings, store, posterior_refresh=True, posterior_refresh_s=0.05) as agent:
        produce(kafka_settings, REC_REQUESTS, [request("before", user="fan", k=len(TEXTS))])
        (before,) = recs.wait_for(["before"])
        slates = [
            Labeled(example_id=example_id(f"imp{n}", i), impression_id=f"imp{n}", user_id="fan", item_id=i,
                    position=p, label=int(CATEGORIES[i] == "space"), history=["s1"], impression_ts=3_000 + n,
                    label_ts=4_000 + n, ts=5_000 + n)
            for n in range(3) for p, i in enumerate(TEXTS)
        ]  # fmt: skip
        produce(kafka_settings, LABELED, slates + slates[:2])  # the last two are redeliveries
        produce_raw(kafka_settings, LABELED.real_name(kafka_settings), [(b"fan", b"{not json")])
        deadline = time.monotonic() + 30
        while agent.metrics.value("posterior_examples_total") < len(slates) and time.monotonic() < deadline:
            time.sleep(0.1)
        produce(kafka_settings, REC_REQUESTS, [request("after", user="fan", k=len(TEXTS))])
        (after,) = recs.wait_for(["after"])
        m = agent.metrics
        assert m.value("posterior_examples_total") == len(slates)
        assert m.value("posterior_skipped_total", {"reason": "duplicate"}) == 2
        assert m.value("posterior_skipped_total", {"reason": "invalid_record"}) == 1
        assert before.model_version == after.model_version == "1"  # no new version: the agent learned it
        assert margin(after) > margin(before) + 0.5
        assert {s.item_id for s in after.items[:2]} == {"s1", "s2"}  # the space items on top


def test_malformed_requests_go_to_dead_letters_and_serving_continues(
    kafka_settings: KafkaSettings, store: WeightStore, recs: Recommendations
) -> None:
    seed_catalog(kafka_settings, {"u1": ["s1"], "u2": ["s1", "c1"]})
    topic = REC_REQUESTS.real_name(kafka_settings)
    bad = [
        (b"u1", b"not json at all"),
        (b"u1", b'{"schema_version": 1, "request_id": "x", "user_id": "u1", "k": 0, "ts": 1}'),
        (b"u1", None),
        (b"u1", b"[1, 2, 3]"),
    ]
    group = f"serving-{uuid.uuid4().hex[:8]}"
    with running_agent(kafka_settings, store, group_id=group) as agent:  # nothing published: fallback
        produce_raw(kafka_settings, topic, bad)
        produce(kafka_settings, REC_REQUESTS, [request("fine", user="u1", k=2)])
        (rec,) = recs.wait_for(["fine"])
        assert rec.model_version == FALLBACK_VERSION
        assert [s.item_id for s in rec.items] == ["s1", "c1"]  # popularity over recent clicks
        letters = consume(kafka_settings, DEAD_LETTERS, count=len(bad), timeout=30)
        assert len(letters) == len(bad)
        assert all(isinstance(d, DeadLetter) and d.source_topic == topic and d.key == "u1" for d in letters)
        by_raw = {d.raw(): d.error for d in letters}
        assert "not valid JSON" in by_raw[b"not json at all"]
        assert "RecRequest.k" in by_raw[bad[1][1]]
        assert "empty value" in by_raw[b""]
        assert "JSON object" in by_raw[b"[1, 2, 3]"]
        assert agent.metrics.value("dead_letters_total", {"reason": "invalid_request"}) == len(bad)
    # Every request was answered or dead-lettered, and the group committed past all of them.
    check = Consumer(kafka_settings.confluent_config(**{"group.id": group}))
    try:
        parts = check.list_topics(topic, timeout=30).topics[topic].partitions
        committed = check.committed([TopicPartition(topic, p) for p in parts], timeout=30)
        ends = {p: check.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        assert {tp.partition: max(tp.offset, 0) for tp in committed} == ends
    finally:
        check.close()


def test_an_answer_too_large_to_deliver_is_dead_lettered_and_serving_continues(
    kafka_settings: KafkaSettings, store: WeightStore, recs: Recommendations
) -> None:
    """A huge k over a large catalog: the recommendation exceeds the producer's message.max.bytes."""
    seed_catalog(kafka_settings, {"u1": ["s1"]})
    many = [Item(item_id=f"film-{n:03d}-{'x' * 80}", text=f"film number {n}", ts=1_000) for n in range(40)]
    produce(kafka_settings, ITEMS, many)
    topic = REC_REQUESTS.real_name(kafka_settings)
    group = f"serving-{uuid.uuid4().hex[:8]}"
    with running_agent(kafka_settings, store, {"message.max.bytes": 2_000}, group_id=group) as agent:
        produce(kafka_settings, REC_REQUESTS, [request("huge", k=100), request("small", k=2)])
        (small,) = recs.wait_for(["small"])
        assert small.model_version == FALLBACK_VERSION and len(small.items) == 2
        (letter,) = consume(kafka_settings, DEAD_LETTERS, count=1, timeout=30)
        assert isinstance(letter, DeadLetter) and letter.source_topic == topic
        assert RecRequest.from_json(letter.raw()).request_id == "huge"
        assert "recommendation not deliverable" in letter.error and "too large" in letter.error
        assert agent.metrics.value("dead_letters_total", {"reason": "answer_too_large"}) == 1
        assert agent.metrics.value("requests_total", {"path": "fallback"}) == 1
        produce(kafka_settings, REC_REQUESTS, [request("later", k=1)])
        (later,) = recs.wait_for(["later"])  # the agent kept serving
        assert "huge" not in recs.by_id
    # the dead-lettered request was committed past like the answered ones
    check = Consumer(kafka_settings.confluent_config(**{"group.id": group}))
    try:
        parts = check.list_topics(topic, timeout=30).topics[topic].partitions
        committed = check.committed([TopicPartition(topic, p) for p in parts], timeout=30)
        ends = {p: check.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        assert {tp.partition: max(tp.offset, 0) for tp in committed} == ends
    finally:
        check.close()


def test_missing_topics_fail_at_start_up_naming_the_topic(kafka_bootstrap: str, tmp_path: Path) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"missing-{uuid.uuid4().hex[:8]}-")
    agent = ServingAgent(kafka, ServingSettings(weights_root=str(tmp_path), startup_timeout_s=20))
    with pytest.raises(AgentError, match=f"topic {kafka.topic_prefix}items is not usable"):
        agent.start()


def test_two_agents_in_one_group_share_requests_and_hand_over_without_loss(
    kafka_settings: KafkaSettings, store: WeightStore, model: RecModel, recs: Recommendations
) -> None:
    """Scale-out: a second agent joins the group mid-stream, then the first leaves.

    Requests stream in all the while (users spread over every partition).  The
    handovers are graceful (cooperative rebalance; a revoked partition's
    requests are answered and committed first), so every request is answered
    exactly once, both agents answer some, and the survivor answers the rest.
    """
    users = [f"u{i}" for i in range(40)]
    seed_catalog(kafka_settings, {u: ["s1", "c1"] for u in users})
    produce(kafka_settings, MODEL_UPDATES, [store.publish(model, version=1)])
    group = f"serving-{uuid.uuid4().hex[:8]}"
    sent: list[str] = []
    chunks = itertools.count()  # the streaming thread and the test both send chunks

    def chunk(size: int = 40) -> None:
        n = next(chunks)
        ids = [f"g{n}-{i}" for i in range(size)]
        produce(kafka_settings, REC_REQUESTS, [request(r, user=users[i % len(users)], k=2) for i, r in enumerate(ids)])
        sent.extend(ids)

    def streaming(stop: threading.Event) -> None:
        while not stop.is_set():
            chunk(10)
            time.sleep(0.02)

    def served(agent: ServingAgent) -> float:
        return sum(agent.metrics.value("requests_total", {"path": p}) for p in ("model", "cold", "fallback"))

    with running_agent(kafka_settings, store, group_id=group) as first:
        chunk()
        recs.wait_for(list(sent))
        stop_streaming = threading.Event()
        producer = threading.Thread(target=streaming, args=(stop_streaming,), daemon=True)
        producer.start()
        try:
            with running_agent(kafka_settings, store, group_id=group) as second:
                # The group settles into two members; requests keep flowing through it.
                deadline = time.monotonic() + 60
                while not (first.status()["assigned"] and second.status()["assigned"]):
                    assert time.monotonic() < deadline, "the second agent never got a share of the partitions"
                    time.sleep(0.2)
                before = served(first), served(second)
                chunk()
                recs.wait_for(list(sent), timeout=60)
                assert served(first) > before[0] and served(second) > before[1]  # both answer a share
                first.stop()  # leaves the group mid-stream: its partitions move to the second agent
                time.sleep(1.0)
                stop_streaming.set()
                producer.join(30)
                chunk()
                recs.wait_for(list(sent), timeout=60)
                topic = REC_REQUESTS.real_name(kafka_settings)
                partitions = recs.consumer.list_topics(topic, timeout=30).topics[topic].partitions
                assert second.status()["assigned"] == sorted(partitions)  # the survivor owns them all
        finally:
            stop_streaming.set()
            producer.join(30)
    assert set(recs.by_id) == set(sent)  # none lost
    assert recs.duplicated == []  # none answered twice
    assert served(first) + served(second) == len(sent)
    assert {r.model_version for r in recs.by_id.values()} == {"1"}
