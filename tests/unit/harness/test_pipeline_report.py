"""The demo report's pure parts: the fallback scored on the model's requests, bytes per kind, refusals."""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from contract.records import RecRequest, UserHistory
from harness.pipeline_figures import fallback_hits, refusals_in_log, version_sizes
from harness.pipeline_report import PipelineReport, SameRequests
from serving.scoring import Query, Scorer, appended_items
from serving.snapshot import ServingModel
from trainer.model import ModelConfig, build_model
from trainer.popularity import Popularity
from trainer.weights import WeightStore, changed_tensors, cpu_state

CATALOG = ["a", "b", "c", "d", "e"]


def _h(user: str, items: list[str], ts: int) -> UserHistory:
    return UserHistory(user_id=user, items=items, ts=ts)


def test_fallback_ranks_from_the_history_seen_before_each_request() -> None:
    history = [
        (100, _h("u1", ["c"], 1_000)),
        (110, _h("u2", ["c"], 1_100)),
        (120, _h("u1", ["c", "d"], 1_200)),  # appends d: one click on d
        (300, _h("u3", ["e", "e2"], 2_000)),  # produced after the first request: not seen by it
    ]
    requests = [
        (200, 1, {"c"}, "r1"),  # top-1 then: c (2 clicks) -> hit
        (250, 2, {"a"}, "r2"),  # top-2: c, d -> miss
        (50, 2, {"a"}, ""),  # before any click: all zero; no request salt: ties to the smaller id -> a, b -> hit
        (400, 1, {"c"}, "r4"),  # after u3's history: c still first
    ]
    got = fallback_hits(requests, history, CATALOG, half_life_s=3600, history_length=50)
    assert got == [True, False, True, True]


def test_fallback_popularity_is_the_serving_agents() -> None:
    """The same records through serving's own UserState path give the same scores."""
    recs = [_h("u1", ["a"], 10), _h("u1", ["a", "b"], 20), _h("u2", ["b"], 30_000_000)]
    pop, users = Popularity(60), {}
    for r in recs:
        pop.add(appended_items(users.get(r.user_id, ()), r.items, 50), r.ts)
        users[r.user_id] = tuple(r.items)
    top = list(pop.vector(CATALOG)).index(max(pop.vector(CATALOG)))
    # one request after everything: the fallback's top-1 is the argmax of serving's popularity
    hits = fallback_hits([(10**6, 1, {CATALOG[top]}, "r")], [(i, r) for i, r in enumerate(recs)], CATALOG,
                         half_life_s=60, history_length=50)
    assert hits == [True]


def test_same_request_rates_and_paired_standard_error() -> None:
    same = SameRequests(k=10, model_hits=[True, True, False, False], fallback_hits=[True, False, False, False])
    r = same.rates()
    assert (r["model"], r["fallback"], r["diff"]) == (0.5, 0.25, 0.25)
    assert r["model_se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert r["diff_se"] == pytest.approx(0.5 / 2)  # std(ddof=1) of [0, 1, 0, 0] over sqrt(4)
    text = "\n".join(same.format())
    assert "same 4 measured requests" in text and "model 0.500 ± 0.250" in text and "+0.250 ± 0.250" in text
    assert "no measured request" in SameRequests(k=10, model_hits=[], fallback_hits=[]).format()[0]


def test_refusals_are_counted_by_reason() -> None:
    log = (
        "2026 WARNING trainer.service: guardrail refused the candidate after step 3 (reason=below_fallback) "
        "against the popularity fallback on 500 held-back examples: auc ...\n"
        "2026 WARNING trainer.service: guardrail refused the candidate after step 9 (reason=worse_than_live) x\n"
        "2026 WARNING trainer.service: guardrail refused the candidate after step 12 (reason=below_fallback) y\n"
    )
    counts = refusals_in_log(log)
    assert counts["below_fallback"] == 2 and counts["worse_than_live"] == 1 and counts["non_finite"] == 0


def test_bytes_per_version_kind(tmp_path: Path) -> None:
    model = build_model(ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=32, freeze_layers=1))
    store = WeightStore(tmp_path)
    store.publish(model, version=1)
    base = cpu_state(model)
    with torch.no_grad():
        model.click_head.bias.add_(1.0)
    store.publish(model, version=2, kind="delta", base_version=1, tensors=changed_tensors(model.state_dict(), base))
    sizes, missing = version_sizes(store, [1, 2, 3])
    assert missing == 1 and sizes["full"][0] == 1 and sizes["delta"][0] == 1
    assert sizes["delta"][1] < sizes["full"][1] / 100


def test_report_prints_the_same_request_comparison_bytes_and_refusals() -> None:
    report = PipelineReport(
        events={"items": 5, "impressions": 10, "clicks": 4}, labeled_positives=4, labeled_negatives=6,
        labeled_late=0, labeled_duplicates=0, labels_match_reference=True, reference_positives=4,
        reference_negatives=6, labels_missing=0, labels_unexpected=0, dead_letters=0,
        versions=[{"version": 1, "kind": "full", "created_ts": 1, "event_ts": 0, "trained_examples": 9,
                   "metrics": {"holdout_auc": 0.71, "holdout_fallback_auc": 0.64}}],
        versions_after_start=1, requests_sent=3, recommendations=3,
        recommendations_by_version={"model": 2, "fallback": 1}, hit_rate={"fallback": 1.0, "model": 0.5},
        hit_requests={"fallback": 1, "model": 2},
        same_requests=SameRequests(k=10, model_hits=[True, False], fallback_hits=[False, False]),
        version_bytes={"full": (1, 91_000_000), "delta": (2, 16_000_000)}, versions_unreadable=0,
        refusals={"below_fallback": 3, "worse_than_live": 0}, freshness_trained_s=[1.0], freshness_served_s=[2.0],
        clicks_total=4, trainer_caught_up=True, labeled_rate=1.0, trainer_rate=1.0, elapsed_s=1.0,
    )
    text = report.format()
    assert "guardrail:      3 refused (below_fallback)" in text
    assert "weights written: delta 2 versions, 16.0 MB (8.0 MB each); full 1 version, 91.0 MB" in text
    assert "same 2 measured requests" in text and "model 0.500" in text and "popularity fallback 0.000" in text
    assert "0.7100" in text and "0.6400" in text
    assert "the fallback answered itself" in text


def test_report_shows_the_ope_estimate_only_when_a_version_has_one() -> None:
    import dataclasses

    base = PipelineReport(
        events={"items": 5, "impressions": 10, "clicks": 4}, labeled_positives=4, labeled_negatives=6,
        labeled_late=0, labeled_duplicates=0, labels_match_reference=True, reference_positives=4,
        reference_negatives=6, labels_missing=0, labels_unexpected=0, dead_letters=0,
        versions=[{"version": 1, "kind": "full", "created_ts": 1, "event_ts": 0, "trained_examples": 9,
                   "metrics": {"holdout_auc": 0.71}}],
        versions_after_start=1, requests_sent=0, recommendations=0, recommendations_by_version={},
        hit_rate={}, hit_requests={}, same_requests=SameRequests(k=10, model_hits=[], fallback_hits=[]),
        version_bytes={}, versions_unreadable=0, refusals={}, freshness_trained_s=[], freshness_served_s=[],
        clicks_total=0, trainer_caught_up=True, labeled_rate=1.0, trainer_rate=1.0, elapsed_s=1.0,
    )
    assert "OPE" not in base.format()
    with_ope = dataclasses.replace(base, versions=[
        {**base.versions[0], "metrics": {"holdout_auc": 0.71, "ope_snips": 0.1234, "ope_snips_se": 0.0101}}])
    text = with_ope.format()
    assert "OPE top-1 (SNIPS ± se)" in text and "0.1234 ± 0.0101" in text


def test_fallback_breaks_ties_by_the_request_as_serving_does() -> None:
    catalog = [f"i{n:03d}" for n in range(100)]
    scorer = Scorer(Popularity(3600), fallback_version="fallback:popularity")
    sm = ServingModel(version="fallback:popularity", number=None, model=None, item_ids=tuple(catalog),
                      index=MappingProxyType({i: r for r, i in enumerate(catalog)}), item_vecs=None,
                      text_hashes=tuple("h" for _ in catalog))
    for rid in ("a", "b", "c"):
        served = scorer.score(sm, [Query(RecRequest(request_id=rid, user_id="u", k=2, ts=1), ())])[0]
        shown = {s.item_id for s in served.items}
        # before any click every item ties: the recomputed fallback hits exactly when serving's slate would
        assert fallback_hits([(10, 2, shown, rid)], [], catalog, half_life_s=3600, history_length=50) == [True]
        assert fallback_hits([(10, 2, set(catalog) - shown, rid)], [], catalog, half_life_s=3600,
                             history_length=50) == [False]
