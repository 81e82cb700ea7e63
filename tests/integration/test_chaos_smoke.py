"""The chaos run's parts that need no services: its burst lands on a real broker where it says, its
expectations agree with the contract, its forged versions are refused by the weight store, and its
figures count what they claim (the run itself: ``make chaos``, minutes)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from benchmarks.chaos_figures import (
    injected_accounting,
    label_figures,
    request_figures,
    trained_figures,
)
from benchmarks.chaos_inputs import Expect, burst, forge_versions, join_input, send_raw
from contract.records import Click, DeadLetter, Impression, Labeled, Recommendation, ScoredItem
from contract.settings import KafkaSettings
from harness.live import Msg, high_watermarks
from infra.kafka import dead_letter
from streams.join import reference_join
from trainer.weight_manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    WeightsError,
    WeightsReason,
)
from trainer.weights import WeightStore

pytestmark = pytest.mark.integration

MOVIES = [str(i) for i in range(1, 1201)]
T = 880_000_000_000


def test_burst_lands_where_it_says_and_matches_the_contract(kafka_settings: KafkaSettings) -> None:
    last = Impression(impression_id="ml-1-2", user_id="1", items=["1", "2"], ts=T)
    records = burst(random.Random(0), event_ts=T, movies=MOVIES, last_impression=last,
                    kafka_ts_ms=int(time.time() * 1000))  # fmt: skip
    sent = send_raw(kafka_settings, records)
    assert all(r.landed for r in sent), [(r.kind, r.error) for r in sent if not r.landed]
    per_topic: dict[str, int] = {}
    for r in sent:
        per_topic[r.topic] = per_topic.get(r.topic, 0) + 1
    for topic, n in per_topic.items():
        assert sum(high_watermarks(kafka_settings, kafka_settings.topic(topic)).values()) == n, topic
    contradicting = {"click-orphan", "click-not-in-slate", "click-other-user"}
    for r in sent:
        if r.topic in ("impressions", "clicks"):
            taken = join_input(r, 86_400_000) is not None
            assert taken == (r.expect is not Expect.DEAD_LETTER or r.kind in contradicting), r.kind


def _fake_full_version(root: Path, version: int) -> None:
    vdir = root / f"v{version:06d}"
    vdir.mkdir(parents=True)
    (vdir / WEIGHTS_FILE).write_bytes(b"not really safetensors")
    man = Manifest(version=version, kind="full", base_version=None, sha256="0" * 64, size=22,
                   model_name="streamrec", model_config={}, metrics={}, trained_examples=1,
                   source_offsets={}, created_ts=1, tensors=1)  # fmt: skip
    (vdir / MANIFEST_FILE).write_bytes(man.to_json())


def test_forged_versions_are_refused_by_a_store_with_the_key(tmp_path: Path) -> None:
    weights, foreign = tmp_path / "weights", tmp_path / "elsewhere"
    _fake_full_version(weights, 1)
    forged = forge_versions(weights, foreign, b"k3y")
    assert {f.kind for f in forged} == {"unsigned-in-store", "wrongly-signed-in-store", "signed-outside-store"}
    store = WeightStore(weights, signing_key="k3y")
    reasons = {}
    for f in forged:
        with pytest.raises(WeightsError) as err:
            store.load(f.update)
        reasons[f.kind] = err.value.reason
    assert reasons == {
        "unsigned-in-store": WeightsReason.SIGNATURE,
        "wrongly-signed-in-store": WeightsReason.SIGNATURE,
        "signed-outside-store": WeightsReason.FOREIGN,
    }


def _msg(offset: int, value: bytes, ts: int = 0) -> Msg:
    return Msg(0, offset, ts, value)


def test_figures_count_what_they_claim() -> None:
    imp = Impression(impression_id="i1", user_id="u", items=["a", "b", "c"], ts=1_000)
    click = Click(impression_id="i1", user_id="u", item_id="a", ts=2_000)
    ref = reference_join([imp], [click], window_ms=10_000)

    def lab(item: str, label: int, late: bool = False) -> bytes:
        return Labeled(example_id=f"i1:{item}", impression_id="i1", user_id="u", item_id=item, position=0,
                       label=label, impression_ts=1_000, label_ts=2_000, late=late, ts=2_000).to_json()  # fmt: skip

    # a: negative + late positive (flipped), b: right and re-emitted, c: missing
    got = [_msg(0, lab("a", 0)), _msg(1, lab("a", 1, late=True)), _msg(2, lab("b", 0)), _msg(3, lab("b", 0))]
    fig = label_figures(got, ref, {})
    assert (fig.missing, fig.unexpected, fig.flipped, fig.reemitted) == (1, 1, 1, 1)
    assert fig.patterns == {"ref {1} -> got {0,1L}": 1, "ref {0} -> got {}": 1}

    lineage = b"T i1:a\nT i1:a\nT i1:b\nT i1:b\n"  # a: negative + late positive, b: trained twice
    tf = trained_figures(lineage, got, [(b"T i1:a\nT i1:b\nT i1:c\n", b"trained-ids log: rolling back 14 bytes")])
    assert (tf.more_than_once, tf.rolled_back) == (1, 2)

    def rec(rid: str) -> bytes:
        return Recommendation(request_id=rid, user_id="u", items=[ScoredItem(item_id="a", score=1.0)],
                              model_version="1", ts=1).to_json()  # fmt: skip

    rf = request_figures([_msg(0, rec("r1")), _msg(1, rec("r1")), _msg(2, rec("zz"))], ["r1", "r2"])
    assert (rf.answered_0, rf.answered_more, rf.unknown_answers) == (1, 1, 1)

    records = burst(random.Random(1), event_ts=T, movies=MOVIES, last_impression=None, kafka_ts_ms=T)
    for n, r in enumerate(records):
        r.partition, r.offset = 0, n
    bad = next(r for r in records if r.kind == "imp-garbage")
    dl = dead_letter(source_topic="p-impressions", partition=0, offset=bad.offset, key=None, value=bad.value,
                     error="Impression.<json>: not valid JSON")  # fmt: skip
    acc = injected_accounting(records, [DeadLetter.from_json(dl.to_json())], "p-")
    assert acc.dead_lettered == 1 and "imp-garbage" not in acc.not_dead_lettered
    assert acc.must_dead_letter == sum(r.expect is Expect.DEAD_LETTER for r in records)
