"""Free-text queries (serving.query): the contract, and query scoring on a tiny catalog of three topics,
with no version (the pretrained encoder), with a version, with and without a user history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contract.errors import RecordError
from contract.records import MAX_QUERY, Item, RecRequest
from serving.query import QueryIndex, blend, item_document, version_space, zscore
from serving.scoring import Query, Scorer
from serving.settings import FALLBACK_VERSION, QUERY_FALLBACK_VERSION
from serving.snapshot import (
    ServingModel,
    encode_entries,
    fallback_snapshot,
    items_entries,
    model_snapshot,
)
from serving.state import CatalogState
from trainer.model import ModelConfig, RecModel, build_model
from trainer.popularity import Popularity

pytestmark = pytest.mark.usefixtures("one_thread")

PRETRAINED = ModelConfig(encoder_layers=1, max_text_len=16)
"""The no-version text space of these tests: the offline encoder cut to one layer (test-sized)."""
CONFIG = ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=32, max_history=8, freeze_layers=1)
"""A version with the whole (one-layer) encoder frozen: its text space is the pretrained one."""

TOPICS = {
    "Cooking": ["Pasta with tomato sauce", "Baking sourdough bread at home", "Grilled chicken with herbs"],
    "Astronomy": ["Telescopes and distant galaxies", "The planets of the solar system", "Black holes and dying stars"],
    "Football": ["The world cup final", "Premier league goals of the week", "A striker scores twice"],
}
ITEMS = [
    Item(item_id=f"{topic.lower()}{n}", text=text, categories=[topic], ts=1)
    for topic, texts in TOPICS.items()
    for n, text in enumerate(texts)
]
TOPIC_OF = {it.item_id: it.categories[0] for it in ITEMS}


def _request(rid: str, query: str | None, *, user: str = "new-user", k: int = 3, candidates: list[str] | None = None) -> RecRequest:
    return RecRequest(request_id=rid, user_id=user, k=k, query=query, candidates=candidates, ts=1)


class Counting:
    """``build`` for the pretrained space that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, config: ModelConfig) -> RecModel:
        self.calls += 1
        return build_model(config)


@pytest.fixture(scope="module")
def model() -> RecModel:
    return build_model(CONFIG)


@pytest.fixture()
def catalog() -> CatalogState:
    c = CatalogState()
    for it in ITEMS:
        c.upsert(it)
    return c


def _index(catalog: CatalogState, **kw) -> QueryIndex:  # noqa: ANN003
    kw.setdefault("build", Counting())
    return QueryIndex(catalog.lookup, generation=lambda: catalog.generation, pretrained=PRETRAINED, **kw)


def _scorer(index: QueryIndex | None, weight: float = 0.5) -> Scorer:
    return Scorer(Popularity(3600.0), fallback_version=FALLBACK_VERSION, query=index, query_weight=weight)


def _version(model: RecModel) -> ServingModel:
    entries = items_entries(ITEMS)
    return model_snapshot(1, model, entries, encode_entries(model, entries, batch=64))


def _topics(items) -> list[str]:  # noqa: ANN001 - ScoredItems or item ids
    return [TOPIC_OF[getattr(s, "item_id", s)] for s in items]


# --------------------------------------------------------------------------- the contract
def test_the_contract_takes_an_optional_bounded_query() -> None:
    r = RecRequest.from_json(b'{"request_id": "r", "user_id": "u", "k": 3, "ts": 1, "query": "sci-fi with robots"}')
    assert r.query == "sci-fi with robots"
    assert RecRequest.from_json(r.to_json()) == r
    plain = RecRequest(request_id="r", user_id="u", k=3, ts=1)
    assert plain.query is None and b"query" not in plain.to_json()  # absent stays absent
    assert RecRequest(request_id="r", user_id="u", k=3, ts=1, query="x" * MAX_QUERY).query == "x" * MAX_QUERY


@pytest.mark.parametrize(
    ("query", "reason"),
    [("", "at least 1 character"), ("  \n\t ", "non-whitespace"), ("x" * (MAX_QUERY + 1), "at most 1000"),
     (42, "valid string"), (["comedy"], "valid string")],
)
def test_malformed_and_oversized_queries_are_rejected_by_the_contract(query: object, reason: str) -> None:
    with pytest.raises(RecordError) as err:
        RecRequest.from_dict({"request_id": "r", "user_id": "u", "k": 3, "ts": 1, "query": query})
    assert (err.value.record_type, err.value.field) == ("RecRequest", "query")
    assert reason in err.value.reason


# --------------------------------------------------------------------------- the pieces
def test_documents_put_categories_first() -> None:
    assert item_document("Toy Story (1995)", ("Animation", "Comedy")) == "Animation, Comedy: Toy Story (1995)"
    assert item_document("Untitled", ()) == "Untitled"


def test_zscore_and_blend() -> None:
    assert np.allclose(zscore(np.array([1.0, 2.0, 3.0])), [-1.224744871, 0.0, 1.224744871])
    assert np.array_equal(zscore(np.array([5.0, 5.0])), [0.0, 0.0]) and zscore(np.array([7.0])).tolist() == [0.0]
    rel, mod = np.array([0.1, 0.5, 0.3]), np.array([-2.0, 1.0, 4.0])
    assert np.allclose(blend(rel, mod, 0.0), zscore(rel)) and np.allclose(blend(rel, mod, 1.0), zscore(mod))
    assert np.allclose(blend(rel, mod, 0.25), 0.75 * zscore(rel) + 0.25 * zscore(mod))


@pytest.mark.parametrize("freeze", [1, 0])
def test_a_version_encodes_queries_the_way_its_item_tower_encodes_texts(freeze: int) -> None:
    m = build_model(CONFIG.model_copy(update={"freeze_layers": freeze}))
    space = version_space(m, "version 1")
    texts = ["Black holes and dying stars", "Astronomy: Telescopes", "a much longer text " * 8]
    with torch.inference_mode():
        tower = m.item_tower.encode_pooled(texts).float().numpy()
    assert np.allclose(space.encode(texts), tower, atol=1e-5)
    # fully frozen: the pretrained space (documents shared with the no-version path); tuned: its own
    assert space.signature.startswith("pretrained|") == (freeze == 1)


# --------------------------------------------------------------------------- no version yet
def test_without_a_version_the_pretrained_encoder_ranks_the_asked_topic_first(catalog: CatalogState) -> None:
    index = _index(catalog)
    scorer = _scorer(index)
    sm = fallback_snapshot(FALLBACK_VERSION, items_entries(ITEMS))
    hist = ("cooking0", "cooking1")  # a history changes nothing without a model
    out = scorer.score(sm, [
        Query(_request("a", "astronomy: planets, galaxies and stars"), ()),
        Query(_request("f", "football matches and goals"), hist),
        Query(_request("p", None), ()),
    ])  # fmt: skip
    assert _topics(out[0].items) == ["Astronomy"] * 3
    assert _topics(out[1].items) == ["Football"] * 3
    assert [r.path for r in out] == ["query", "query", "fallback"]
    assert [r.model_version for r in out] == [QUERY_FALLBACK_VERSION, QUERY_FALLBACK_VERSION, FALLBACK_VERSION]
    scores = [s.score for s in out[0].items]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    # the encoder was built once, the catalog's documents encoded once, each query once
    out2 = scorer.score(sm, [Query(_request("a2", "astronomy: planets, galaxies and stars"), ())])
    assert [s.item_id for s in out2[0].items] == [s.item_id for s in out[0].items]
    assert (index._build.calls, index.pretrained_loads) == (1, 1)  # type: ignore[attr-defined]
    assert (index.documents_encoded, index.queries_encoded) == (len(ITEMS), 2)


def test_candidates_restrict_a_query_and_unknown_ones_rank_the_whole_catalog(catalog: CatalogState) -> None:
    scorer = _scorer(_index(catalog))
    sm = fallback_snapshot(FALLBACK_VERSION, items_entries(ITEMS))
    out = scorer.score(sm, [
        Query(_request("c", "cooking recipes", candidates=["football0", "cooking2", "astronomy1", "nope"]), ()),
        Query(_request("u", "cooking recipes", candidates=["nope"]), ()),
    ])  # fmt: skip
    assert out[0].items[0].item_id == "cooking2" and len(out[0].items) == 3 and out[0].unknown_candidates == 1
    assert _topics(out[1].items) == ["Cooking"] * 3 and out[1].path == "query" and out[1].unknown_candidates == 1


def test_a_changed_item_is_encoded_again_alone_and_the_query_cache_is_bounded(catalog: CatalogState) -> None:
    index = _index(catalog, cache_size=2)
    scorer = _scorer(index)
    sm = fallback_snapshot(FALLBACK_VERSION, items_entries(ITEMS))
    for n, q in enumerate(["planets", "goals", "bread"]):
        scorer.score(sm, [Query(_request(str(n), q), ())])
    assert index.cached_queries == 2 and index.documents_encoded == len(ITEMS)
    # football2 becomes a cooking item: only its document is encoded again, and it now answers "cooking"
    catalog.upsert(Item(item_id="football2", text="A striker scores twice", categories=["Cooking", "Recipes"], ts=2))
    scorer.score(sm, [Query(_request("x", "cooking"), ())])
    assert index.documents_encoded == len(ITEMS) + 1


def test_an_encoder_that_cannot_load_leaves_the_request_to_the_other_paths(catalog: CatalogState) -> None:
    def broken(config: ModelConfig) -> RecModel:
        broken.calls += 1  # type: ignore[attr-defined]
        raise OSError("no encoder here")

    broken.calls = 0  # type: ignore[attr-defined]
    scorer = _scorer(_index(catalog, build=broken))
    sm = fallback_snapshot(FALLBACK_VERSION, items_entries(ITEMS))
    for rid in ("a", "b"):
        out = scorer.score(sm, [Query(_request(rid, "planets"), ()), Query(_request(rid + "p", None), ())])
        assert [r.path for r in out] == ["fallback", "fallback"]  # answered, by popularity
    assert broken.calls == 1  # not retried at every batch


# --------------------------------------------------------------------------- with a version
def test_with_a_version_a_new_user_is_ranked_by_the_query_alone(catalog: CatalogState, model: RecModel) -> None:
    index = _index(catalog)
    scorer = _scorer(index)
    # first without a version, then with one whose encoder is the frozen pretrained one: no document re-encoded
    scorer.score(fallback_snapshot(FALLBACK_VERSION, items_entries(ITEMS)), [Query(_request("w", "stars"), ())])
    assert index.documents_encoded == len(ITEMS)
    out = scorer.score(_version(model), [Query(_request("f", "football matches and goals"), ())])
    assert _topics(out[0].items) == ["Football"] * 3
    assert (out[0].path, out[0].model_version) == ("query", "1")
    assert index.documents_encoded == len(ITEMS)


def test_with_history_the_query_is_blended_with_the_model(catalog: CatalogState, model: RecModel) -> None:
    sm = _version(model)
    hist = ("cooking0", "cooking1", "cooking2")
    k = len(ITEMS)
    q = "astronomy: planets, galaxies and stars"

    def ranked(weight: float, query: str | None) -> tuple[list[str], list[float], str]:
        r = _scorer(_index(catalog), weight).score(sm, [Query(_request("r", query, user="cook", k=k), hist)])[0]
        return [s.item_id for s in r.items], [s.score for s in r.items], r.path

    by_query, rel, path0 = ranked(0.0, q)
    by_model, logits, path_m = ranked(1.0, None)
    assert (path0, path_m) == ("query_model", "model")
    assert _topics(by_query[:3]) == ["Astronomy"] * 3  # w = 0: the query alone decides
    assert ranked(1.0, q)[0] == by_model  # w = 1: the model alone decides
    assert _topics(by_model[:3]) == ["Cooking"] * 3  # what this user clicked (the score starts as similarity)

    # w = 0.5: exactly (z(cosine) + z(model score)) / 2 over the candidates
    new_user, cos, path_new = (lambda r: ([s.item_id for s in r.items], [s.score for s in r.items], r.path))(
        _scorer(_index(catalog)).score(sm, [Query(_request("n", q, k=k), ())])[0]
    )
    assert path_new == "query" and new_user == by_query
    cos_of = dict(zip(new_user, cos, strict=True))
    logit_of = dict(zip(by_model, logits, strict=True))
    ids = sorted(cos_of)
    expected = dict(zip(ids, blend(np.array([cos_of[i] for i in ids]), np.array([logit_of[i] for i in ids]), 0.5), strict=True))
    got_ids, got, _ = ranked(0.5, q)
    assert np.allclose(got, [expected[i] for i in got_ids])
    assert got_ids == sorted(expected, key=lambda i: (-expected[i], i))


def test_the_agent_wires_the_query_index_and_its_settings(tmp_path) -> None:  # noqa: ANN001
    from contract.settings import KafkaSettings
    from serving.agent import ServingAgent
    from serving.settings import ServingSettings

    agent = ServingAgent(KafkaSettings(), ServingSettings(weights_root=str(tmp_path), query_model_weight=0.3,
                                                          query_cache_size=7))
    assert agent.scorer.query is agent.query_index and agent.scorer.query_weight == 0.3
    assert agent.query_index.cache_size == 7 and agent.query_index.pretrained_loads == 0  # lazy: nothing built yet
    agent.catalog.upsert(ITEMS[0])
    assert agent.query_index._lookup([ITEMS[0].item_id, "nope"])[0].text == ITEMS[0].text  # type: ignore[union-attr]
