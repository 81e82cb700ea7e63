"""The pure parts of serving: top-k, popularity fallback, cold start, exploration, offsets, state
records, the request queue, and answers (the outbox and the score loop over a stand-in producer)."""

from __future__ import annotations

import math
from collections import Counter
from types import MappingProxyType

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.errors import ConfigError, RecordError
from contract.records import (
    DeadLetter,
    Item,
    ModelUpdate,
    Recommendation,
    RecRequest,
    ScoredItem,
    UserHistory,
)
from infra.kafka import KafkaProducer
from serving.answers import Outbox, ScoreLoop
from serving.metrics import ServingMetrics
from serving.scoring import (
    ExplorePolicy,
    Popularity,
    Query,
    Scorer,
    appended_items,
    cold_start_scores,
    explore,
    softmax_probs,
    top_k,
)
from serving.settings import FALLBACK_VERSION, check_renamed
from serving.snapshot import ModelHolder, ServingModel
from serving.state import (
    CatalogState,
    OffsetLedger,
    Pending,
    RequestQueue,
    ServingTopics,
    StateRecords,
    UserState,
)
from tests.kafka_utils import FakeMessage


def brute_top_k(scores: list[float], ids: list[str], k: int) -> list[int]:
    key = [(-(s if not math.isnan(s) else -math.inf), ids[i]) for i, s in enumerate(scores)]
    return sorted(range(len(scores)), key=lambda i: key[i])[:k]


# --------------------------------------------------------------------------- top-k
@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(-3, 3), st.text(min_size=1, max_size=4)), max_size=40, unique_by=lambda t: t[1]),
    k=st.integers(0, 45),
)
def test_top_k_matches_brute_force_with_ties(data: list[tuple[int, str]], k: int) -> None:
    scores = [float(s) / 2 for s, _ in data]  # few distinct values: many ties
    ids = [i for _, i in data]
    assert top_k(np.array(scores), ids, k) == brute_top_k(scores, ids, k)


def test_top_k_ties_go_to_the_smaller_item_id() -> None:
    ids = ["b", "c", "a", "d"]
    assert top_k(np.array([1.0, 1.0, 1.0, 2.0]), ids, 3) == [3, 2, 0]  # d, then a < b among the ties


def test_top_k_breaks_ties_by_the_request_and_keeps_the_score_order() -> None:
    ids = [f"i{n:03d}" for n in range(200)]
    scores = np.zeros(200)
    scores[[5, 77]] = [2.0, 1.0]  # two clicked items lead, the rest tie at 0
    a, again, b = top_k(scores, ids, 10, "req-1"), top_k(scores, ids, 10, "req-1"), top_k(scores, ids, 10, "req-2")
    assert a == again  # a redelivered request gets the same answer
    assert a[:2] == b[:2] == [5, 77]  # scores first
    assert a[2:] != b[2:]  # the ties differ between requests...
    fill = {i for n in range(50) for i in top_k(scores, ids, 10, f"r{n}")[2:]}
    assert len(fill) > 100  # ...and spread over the tied items, not the smallest ids
    assert top_k(scores, ids, 10) == [5, 77, 0, 1, 2, 3, 4, 6, 7, 8]  # no salt: the smaller item_id


def test_the_fallback_before_any_click_shows_users_different_items_and_a_request_the_same() -> None:
    scorer = Scorer(Popularity(3600), fallback_version=FALLBACK_VERSION)
    sm = _fallback_sm([f"i{n:03d}" for n in range(100)])
    first, second, again = scorer.score(sm, [Query(_req("r1", 5), ()), Query(_req("r2", 5), ()),
                                             Query(_req("r1", 5), ())])
    ids = [[s.item_id for s in r.items] for r in (first, second, again)]
    assert ids[0] == ids[2] and ids[0] != ids[1] and len(set(ids[0])) == 5


def test_top_k_larger_than_the_catalog_returns_everything_ranked() -> None:
    ids = ["x", "y", "z"]
    assert top_k(np.array([0.1, 0.3, 0.2]), ids, 10) == [1, 2, 0]
    assert top_k(np.array([]), [], 5) == []


def test_top_k_ranks_nan_last() -> None:
    ids = ["a", "b", "c"]
    assert top_k(np.array([np.nan, -5.0, 1.0]), ids, 3) == [2, 1, 0]


# --------------------------------------------------------------------------- popularity
def test_appended_items() -> None:
    assert appended_items([], ["a", "b"], 10) == ["a", "b"]  # first history: all count
    assert appended_items(["a", "b"], ["a", "b", "c"], 10) == ["c"]
    assert appended_items(["a", "b", "c"], ["b", "c", "d", "e"], 10) == ["d", "e"]  # trimmed front
    assert appended_items(["a", "b"], ["a", "b"], 10) == []
    assert appended_items(["a", "b", "c"], ["b", "c", "a"], 10) == ["a"]  # re-click moved to the end
    assert appended_items(["a", "b"], ["x", "y"], 10) == ["x", "y"]  # no overlap: a reset
    assert appended_items(["a", "b", "c", "d"], ["c", "d", "e", "f"], 2) == ["e", "f"]  # limit


def test_popularity_decays_in_event_time() -> None:
    pop = Popularity(half_life_s=10.0)
    pop.add(["old"] * 4, ts=0)
    pop.add(["new"], ts=20_000)  # two half-lives later: 1 click now = 4 clicks then
    v = pop.vector(["old", "new", "never"])
    assert v[0] == pytest.approx(1.0) and v[1] == pytest.approx(1.0) and v[2] == 0.0
    pop.add(["new"], ts=20_000)
    assert list(np.argsort(-pop.vector(["old", "new"]))) == [1, 0]


def test_popularity_survives_long_gaps_without_overflow() -> None:
    pop = Popularity(half_life_s=1.0)
    pop.add(["a"], ts=0)
    pop.add(["b", "b"], ts=10_000_000)  # 10,000 half-lives later: rebased, "a" decayed to 0
    v = pop.vector(["a", "b"])
    assert np.isfinite(v).all() and v[1] == 1.0 and v[0] == 0.0
    pop.add(["a"], ts=10_000_000)
    assert pop.vector(["a", "b"]) == pytest.approx([0.5, 1.0])


def test_popularity_vector_without_clicks_is_zero() -> None:
    assert Popularity(60).vector(["a", "b"]).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- cold start
def test_cold_start_blends_popularity_and_text_similarity() -> None:
    vecs = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]])
    pop = np.array([1.0, 0.0, 0.0, 0.0])  # item 0 trends
    s = cold_start_scores(pop, vecs, trending=5, blend=0.5)
    assert s is not None
    assert s[0] == pytest.approx(1.0)  # 0.5 * 1 + 0.5 * (1 + 1) / 2
    assert s[1] > s[3] > s[2]  # no clicks: ranked by similarity to what trends
    assert s[2] == pytest.approx(0.0)
    assert cold_start_scores(pop, vecs, trending=5, blend=0.0).tolist() == pop.tolist()
    assert cold_start_scores(pop, None, trending=5, blend=0.5).tolist() == pop.tolist()
    assert cold_start_scores(np.zeros(4), vecs, trending=5, blend=0.5) is None


# --------------------------------------------------------------------------- exploration
def _position_distribution(policy: ExplorePolicy, scores: list[float], remaining: list[int]) -> dict[int, float]:
    """The probability of each remaining pool position being chosen next (closed form)."""
    r = len(remaining)
    if policy.kind == "epsilon":
        return {j: (1 - policy.epsilon if n == 0 else 0.0) + policy.epsilon / r for n, j in enumerate(remaining)}
    p = softmax_probs(np.array([scores[j] for j in remaining]) / policy.temperature)
    return dict(zip(remaining, p.tolist(), strict=True))


@pytest.mark.parametrize(
    "policy",
    [ExplorePolicy("epsilon", epsilon=0.3), ExplorePolicy("epsilon", epsilon=1.0), ExplorePolicy("softmax", temperature=0.5)],
)
def test_exploration_propensities_are_the_conditional_choice_probabilities(policy: ExplorePolicy) -> None:
    scores = [3.0, 2.5, 1.0, 0.0, -1.0, -4.0]
    rng = np.random.default_rng(7)
    first = Counter()
    runs = 6000
    for _ in range(runs):
        chosen, props = explore(scores, 3, policy, rng)
        assert len(chosen) == 3 == len(set(chosen))
        assert all(0.0 < p <= 1.0 for p in props)
        remaining = list(range(len(scores)))
        for c, p in zip(chosen, props, strict=True):
            dist = _position_distribution(policy, scores, remaining)
            assert sum(dist.values()) == pytest.approx(1.0)
            assert p == pytest.approx(dist[c])
            remaining.remove(c)
        first[chosen[0]] += 1
    dist0 = _position_distribution(policy, scores, list(range(len(scores))))
    for j, p in dist0.items():  # the empirical first-position frequencies match the propensities
        assert first[j] / runs == pytest.approx(p, abs=0.03)


def test_exploration_off_is_greedy_and_seeded_per_request() -> None:
    assert explore([3.0, 2.0, 1.0], 2, ExplorePolicy(), np.random.default_rng(0)) == ([0, 1], [1.0, 1.0])
    policy = ExplorePolicy("softmax", seed=3)
    a = explore([1.0] * 10, 5, policy, policy.rng("req-1"))
    b = explore([1.0] * 10, 5, policy, policy.rng("req-1"))
    assert a == b
    assert softmax_probs(np.array([-np.inf, -np.inf])).tolist() == [0.5, 0.5]


def test_explore_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        ExplorePolicy("epsilon", epsilon=1.5)
    with pytest.raises(ValueError):
        ExplorePolicy("softmax", temperature=0.0)


# --------------------------------------------------------------------------- the fallback scorer
def _fallback_sm(ids: list[str]) -> ServingModel:
    return ServingModel(
        version=FALLBACK_VERSION, number=None, model=None, item_ids=tuple(ids),
        index=MappingProxyType({i: r for r, i in enumerate(ids)}), item_vecs=None,
        text_hashes=tuple("h" for _ in ids),
    )


def _req(rid: str, k: int, candidates: list[str] | None = None, user: str = "u1") -> RecRequest:
    return RecRequest(request_id=rid, user_id=user, k=k, candidates=candidates, ts=1)


def test_fallback_ranks_by_recent_clicks_and_skips_unknown_candidates() -> None:
    pop = Popularity(3600)
    pop.add(["i2", "i2", "i3"], ts=1000)
    scorer = Scorer(pop, fallback_version=FALLBACK_VERSION, refresh_s=0)
    sm = _fallback_sm(["i1", "i2", "i3", "i4"])
    out = scorer.score(sm, [
        Query(_req("r1", 3), ()),
        Query(_req("r2", 5, ["i4", "nope", "i3"]), ("i1",)),
        Query(_req("r3", 2, ["nope", "gone"]), ()),
    ])
    top = [s.item_id for s in out[0].items]
    assert top[:2] == ["i2", "i3"] and top[2] in ("i1", "i4")  # i1 and i4 tie: broken by the request
    assert [s.score for s in out[0].items] == [1.0, 0.5, 0.0]
    assert out[0].model_version == FALLBACK_VERSION and out[0].path == "fallback"
    assert [s.item_id for s in out[1].items] == ["i3", "i4"] and out[1].unknown_candidates == 1
    assert [s.item_id for s in out[2].items] == ["i2", "i3"]  # none known: the whole catalog
    assert out[2].unknown_candidates == 2 and out[2].path == "fallback"
    assert all(s.propensity is None for r in out for s in r.items)


def test_fallback_with_exploration_carries_propensities() -> None:
    pop = Popularity(3600)
    pop.add(["a", "a", "b"], ts=1)
    scorer = Scorer(pop, fallback_version=FALLBACK_VERSION, policy=ExplorePolicy("epsilon", epsilon=0.5, pool=4))
    out = scorer.score(_fallback_sm(["a", "b", "c", "d"]), [Query(_req("r", 2), ())])
    items = out[0].items
    assert len(items) == 2 and all(s.propensity is not None and 0 < s.propensity <= 1 for s in items)


def test_an_empty_catalog_answers_with_no_items() -> None:
    scorer = Scorer(Popularity(60), fallback_version=FALLBACK_VERSION)
    out = scorer.score(_fallback_sm([]), [Query(_req("r", 3), ())])
    assert out[0].items == []


# --------------------------------------------------------------------------- offsets
def test_offset_ledger_commits_only_a_finished_prefix() -> None:
    ledger = OffsetLedger()
    for off in (10, 11, 12):
        ledger.track(0, off)
    ledger.track(1, 5)
    ledger.done(0, 11)
    assert ledger.committable() == {}  # 10 is still in flight
    ledger.done(0, 10)
    assert ledger.committable() == {0: 12}
    ledger.done(1, 5)
    ledger.done(0, 12)
    assert ledger.committable() == {0: 13, 1: 6}
    assert ledger.committable() == {} and ledger.in_flight() == 0
    ledger.track(2, 0)
    ledger.forget({2})
    ledger.done(2, 0)  # revoked meanwhile: ignored
    assert ledger.committable() == {}


# --------------------------------------------------------------------------- state records and the queue
TOPICS = ServingTopics(items="items", history="history", updates="updates", requests="requests",
                       recommendations="recs", dead="dead")  # fmt: skip


def test_state_records_apply_items_histories_tombstones_and_hand_back_model_updates() -> None:
    catalog, pop = CatalogState(), Popularity(3600)
    users = UserState(3, pop)
    records = StateRecords(TOPICS, catalog, users)
    for item in ("a", "b"):
        assert records.apply(FakeMessage("items", item.encode(), Item(item_id=item, text=f"text {item}", ts=1).to_json())) is None
    assert len(catalog) == 2 and set(catalog.take_changes()) == {"a", "b"}
    records.apply(FakeMessage("history", b"u1", UserHistory(user_id="u1", items=["a", "b", "a", "b"], ts=5).to_json()))
    assert users.history("u1") == ("b", "a", "b") and pop.clicks == 3  # the last history_length count
    records.apply(FakeMessage("items", b"a", None))
    records.apply(FakeMessage("history", b"u1", None))
    assert len(catalog) == 1 and catalog.take_changes() == {"a": None} and users.history("u1") == ()
    update = ModelUpdate(model="streamrec", version=3, kind="full", uri="file:///w/v3/manifest.json",
                         sha256="0" * 64, created_ts=9, trained_examples=0, ts=9)  # fmt: skip
    assert records.apply(FakeMessage("updates", b"streamrec", update.to_json())) == update
    assert records.apply(FakeMessage("updates", b"streamrec", None)) is None
    with pytest.raises(RecordError):
        records.apply(FakeMessage("items", b"x", b"not json"))


def test_request_queue_hands_out_micro_batches_and_drains_after_close() -> None:
    queue = RequestQueue()
    assert queue.take(10, wait_s=0.0) == []
    queue.put([Pending(_req(f"r{i}", 1), 0.0, 0, i) for i in range(5)])
    assert [p.offset for p in queue.take(3)] == [0, 1, 2] and len(queue) == 2
    queue.close()
    assert queue.closed and [p.offset for p in queue.take(3)] == [3, 4]


# --------------------------------------------------------------------------- answers
class _FakeProducer:
    """A confluent-kafka Producer stand-in: refuses values over ``max_bytes`` at once, like the client;
    delivers on poll/flush, with a broker error for values over ``broker_max_bytes``."""

    def __init__(self, max_bytes: int = 10_000, broker_max_bytes: int | None = None, fail_with: int | None = None):
        self.max_bytes, self.broker_max_bytes, self.fail_with = max_bytes, broker_max_bytes, fail_with
        self.queued: list[tuple[str, bytes, object]] = []
        self.delivered: list[tuple[str, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: object = None) -> None:
        if len(value) > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Message size too large"))
        self.queued.append((topic, value, on_delivery))

    def poll(self, timeout: float = 0.0) -> int:
        served = 0
        while self.queued:
            topic, value, cb = self.queued.pop(0)
            err = None
            if self.broker_max_bytes is not None and len(value) > self.broker_max_bytes:
                err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
            elif self.fail_with is not None and topic == TOPICS.recommendations:
                err = KafkaError(self.fail_with, "delivery failed")
            if err is None:
                self.delivered.append((topic, value))
            cb(err, None)  # type: ignore[operator]
            served += 1
        return served

    def flush(self, timeout: float = 0.0) -> int:
        self.poll()
        return len(self.queued)


def _outbox(fake: _FakeProducer) -> tuple[Outbox, OffsetLedger, ServingMetrics]:
    ledger, metrics = OffsetLedger(), ServingMetrics()
    return Outbox(KafkaProducer(fake), topics=TOPICS, ledger=ledger, metrics=metrics), ledger, metrics


def _rec(p: Pending, n_items: int) -> Recommendation:
    items = [ScoredItem(item_id=f"item-{i:05d}", score=1.0) for i in range(n_items)]
    return Recommendation(request_id=p.request.request_id, user_id=p.request.user_id, items=items,
                          model_version="1", ts=2)  # fmt: skip


@pytest.mark.parametrize("where", ["client", "broker"])
def test_an_answer_too_large_to_deliver_is_dead_lettered_and_its_offset_done_after_the_letter(where: str) -> None:
    fake = _FakeProducer(max_bytes=2_000) if where == "client" else _FakeProducer(10**9, broker_max_bytes=2_000)
    outbox, ledger, metrics = _outbox(fake)
    huge, small = Pending(_req("huge", 500), 0.0, 0, 7), Pending(_req("small", 2), 0.0, 0, 8)
    ledger.track(0, 7)
    ledger.track(0, 8)
    assert outbox.answer(huge, _rec(huge, 500)) is (where == "broker")  # refused at once by the client
    assert outbox.answer(small, _rec(small, 2))
    outbox.poll()
    outbox.close(1.0)
    assert ledger.committable() == {0: 9} and ledger.in_flight() == 0
    assert [t for t, _ in fake.delivered] == (["dead", "recs"] if where == "client" else ["recs", "dead"])
    (letter,) = [DeadLetter.from_json(v) for t, v in fake.delivered if t == "dead"]
    assert (letter.source_topic, letter.partition, letter.offset) == ("requests", 0, 7)
    assert RecRequest.from_json(letter.raw()).request_id == "huge"
    assert "recommendation not deliverable" in letter.error and "too large" in letter.error
    assert metrics.value("dead_letters_total", {"reason": "answer_too_large"}) == 1
    assert metrics.value("produce_errors_total") == 0


def test_other_delivery_errors_are_counted_and_retried_and_never_commit_an_unanswered_request() -> None:
    """Issue 12.5: a failed delivery (timed out, ACL) must not mark its request done."""
    fake = _FakeProducer(fail_with=KafkaError._MSG_TIMED_OUT)
    ledger, metrics = OffsetLedger(), ServingMetrics()
    outbox = Outbox(KafkaProducer(fake), topics=TOPICS, ledger=ledger, metrics=metrics, retry_backoff_s=0.0)
    p, q = Pending(_req("r", 2), 0.0, 1, 3), Pending(_req("s", 2), 0.0, 1, 4)
    ledger.track(1, 3)
    ledger.track(1, 4)
    assert outbox.answer(p, _rec(p, 2))
    outbox.poll()  # the delivery fails: offset 3 not done, the answer is sent again
    assert ledger.committable() == {} and ledger.in_flight() == 2 and outbox.retried == 1
    outbox.dead_letter_request(q, "bad", "scoring_failed")
    outbox.poll()  # the letter (offset 4) is delivered, the re-sent answer fails again
    assert ledger.committable() == {} and ledger.in_flight() == 1
    fake.fail_with = None  # the broker is back
    outbox.close(1.0)  # re-sent, now delivered: offsets 3 and 4 committable
    assert ledger.committable() == {1: 5} and ledger.in_flight() == 0 and outbox.retried >= 2
    assert [Recommendation.from_json(v).request_id for t, v in fake.delivered if t == "recs"] == ["r"]
    assert metrics.value("produce_errors_total") == outbox.retried
    assert metrics.value("dead_letters_total", {"reason": "answer_too_large"}) == 0


def test_a_request_whose_dead_letter_fails_stays_uncommitted_and_retries_end_with_its_partition() -> None:
    fake = _FakeProducer()
    ledger, metrics = OffsetLedger(), ServingMetrics()
    outbox = Outbox(KafkaProducer(fake), topics=TOPICS, ledger=ledger, metrics=metrics, retry_backoff_s=0.0)
    real_poll = fake.poll

    def failing_poll(timeout: float = 0.0) -> int:  # every delivery fails (an ACL refusal, say)
        while fake.queued:
            _t, _v, cb = fake.queued.pop(0)
            cb(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized"), None)  # type: ignore[operator]
        return 0

    fake.poll = failing_poll  # type: ignore[method-assign]
    p = Pending(_req("r", 2), 0.0, 0, 9)
    ledger.track(0, 9)
    outbox.dead_letter_request(p, "bad", "scoring_failed")
    outbox.close(0.2)  # gives up at the deadline: the offset stays uncommitted
    assert ledger.committable() == {} and ledger.in_flight() == 1 and outbox.retried >= 1
    assert metrics.value("dead_letters_total", {"reason": "scoring_failed"}) == 1  # one letter, however many tries
    ledger.forget({0})  # revoked: the next owner answers it; the retries stop
    tries = outbox.retried
    outbox.close(0.2)
    assert outbox.retrying == 0 and outbox.retried == tries
    fake.poll = real_poll  # type: ignore[method-assign]


def test_the_score_loop_answers_every_queued_request_and_counts_only_what_it_could_send() -> None:
    ids = [f"film-{i:04d}-{'x' * 40}" for i in range(60)]
    pop = Popularity(3600)
    users = UserState(10, pop)
    holder = ModelHolder(_fallback_sm(ids))
    fake = _FakeProducer(max_bytes=3_000)
    outbox, ledger, metrics = _outbox(fake)
    queue = RequestQueue()
    loop = ScoreLoop(queue=queue, holder=holder, users=users, scorer=Scorer(pop, fallback_version=FALLBACK_VERSION),
                     outbox=outbox, metrics=metrics, max_batch=2)  # fmt: skip
    pending = [Pending(_req("a", 3), 0.0, 0, 0), Pending(_req("huge", 60), 0.0, 0, 1), Pending(_req("b", 1), 0.0, 0, 2)]
    for p in pending:
        ledger.track(p.partition, p.offset)
    queue.put(pending)
    queue.close()
    loop.run()  # returns: closed and drained
    outbox.close(1.0)
    answered = [Recommendation.from_json(v).request_id for t, v in fake.delivered if t == "recs"]
    assert answered == ["a", "b"] and ledger.committable() == {0: 3}
    assert metrics.value("requests_total", {"path": "fallback"}) == 2
    assert metrics.value("dead_letters_total", {"reason": "answer_too_large"}) == 1
    assert metrics.value("batch_size_count") == 2  # max_batch 2: two micro-batches


def test_a_renamed_serving_setting_stops_the_agent_instead_of_being_ignored() -> None:
    check_renamed({"STREAMREC_SERVING_HISTORY_LENGTH": "5"})
    with pytest.raises(ConfigError, match="STREAMREC_SERVING_HISTORY_LENGTH"):
        check_renamed({"STREAMREC_SERVING_HISTORY_LEN": "5"})


# --------------------------------------------------------------------------- popularity vs future timestamps
_HOUR_MS = 3_600_000


def test_popularity_a_click_stamped_in_the_future_weighs_one_click() -> None:
    """A click 23 h ahead under a 1 h half-life must not weigh 2**23 clicks (issue 12.2)."""
    now = 1_700_000_000_000
    pop = Popularity(3600, clock_ms=lambda: now)
    pop.add(["a"] * 3, ts=now - 1000)
    pop.add(["b"], ts=now + 23 * _HOUR_MS)  # poisoned: counts at the newest plausible time
    assert pop.vector(["a", "b"]) == pytest.approx([1.0, 1 / 3])
    assert pop.future_clicks == 1
    pop.add(["a"], ts=now + 5 * 60_000)  # within the 10 min skew: trusted, decays as usual
    assert pop.vector(["a", "b"])[0] == 1.0 and pop.future_clicks == 1


def test_popularity_a_timestamp_near_2_53_zeroes_nothing() -> None:
    now = 1_700_000_000_000
    pop = Popularity(3600, clock_ms=lambda: now)
    pop.add(["b"], ts=2**53)  # before any plausible click: weight 1
    pop.add(["a", "a"], ts=now)
    pop.add(["c"], ts=2**53 - 1)
    v = pop.vector(["a", "b", "c"])
    assert np.isfinite(v).all() and v == pytest.approx([1.0, 0.5, 0.5])
    restored = Popularity.from_state(pop.state(), 3600)
    restored._clock_ms = lambda: now
    restored.add(["c"], ts=2**53)
    assert restored.vector(["a", "b", "c"]) == pytest.approx([1.0, 0.5, 1.0])
