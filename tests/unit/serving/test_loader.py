"""Serving snapshots: item-vector upkeep, verified loading and swapping, model-path scoring."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.records import Item, RecRequest
from serving.loader import ModelLoader, refusal_reason
from serving.metrics import ServingMetrics
from serving.scoring import Query, Scorer, top_k
from serving.settings import FALLBACK_VERSION
from serving.snapshot import (
    ModelHolder,
    apply_item_changes,
    encode_entries,
    fallback_snapshot,
    items_entries,
    model_snapshot,
)
from serving.state import CatalogState
from trainer.model import ModelConfig, RecModel, build_model
from trainer.popularity import Popularity
from trainer.weights import WeightsError, WeightsReason, WeightStore

TEXTS = {
    "m1": "space rockets and astronauts",
    "m2": "a quiet cooking show about pasta",
    "m3": "galaxy war with starships",
    "m4": "romantic comedy in paris",
    "m5": "documentary about deep sea fish",
}
CONFIG = ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=32, max_history=8, freeze_layers=1)


@pytest.fixture(scope="module")
def model() -> RecModel:
    return build_model(CONFIG)


def _items(texts: dict[str, str]) -> list[Item]:
    return [Item(item_id=i, text=t, ts=1) for i, t in texts.items()]


def _perturbed(model: RecModel, amount: float) -> RecModel:
    other = build_model(CONFIG)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.item_tower.proj.weight.add_(amount)
        other.click_head.bias.add_(amount)
    return other


def test_item_changes_append_reencode_and_drop(model: RecModel) -> None:
    entries = items_entries(_items(TEXTS))
    sm = model_snapshot(1, model, entries, encode_entries(model, entries, batch=2))
    changed = items_entries(_items({"m2": "a loud cooking show", "m9": "brand new space opera"}))
    changes = {**dict(changed), "m4": None, "m1": dict(entries)["m1"]}  # m1 unchanged
    new = apply_item_changes(sm, changes, lambda es: encode_entries(model, es, batch=8))
    assert new is not None and new.version == "1" and new.model is model
    assert new.item_ids == ("m1", "m2", "m3", "m5", "m9")
    assert dict(new.index) == {i: r for r, i in enumerate(new.item_ids)}
    expect = encode_entries(model, [(i, dict(entries + changed)[i]) for i in new.item_ids if i not in ("m2", "m9")]
                            + changed, batch=8)
    order = ["m1", "m3", "m5", "m2", "m9"]
    for i in new.item_ids:
        torch.testing.assert_close(new.item_vecs[new.index[i]], expect[order.index(i)], rtol=1e-4, atol=1e-5)
    assert apply_item_changes(new, {"m1": dict(entries)["m1"]}, None) is None  # nothing changed
    fb = apply_item_changes(fallback_snapshot(FALLBACK_VERSION, entries), {"m9": dict(changed)["m9"]}, None)
    assert fb is not None and fb.item_ids[-1] == "m9" and fb.item_vecs is None


def _loader(
    tmp_path: Path, catalog: CatalogState, signing_key: str | None = None
) -> tuple[ModelLoader, ModelHolder, ServingMetrics, WeightStore]:
    store = WeightStore(tmp_path / "weights", signing_key=signing_key)
    holder = ModelHolder(fallback_snapshot(FALLBACK_VERSION, []))
    metrics = ServingMetrics()
    loader = ModelLoader(
        holder=holder, catalog=catalog, store=store, metrics=metrics, model_name="streamrec",
        encode_batch=4, fallback_version=FALLBACK_VERSION,
    )
    return loader, holder, metrics, store


def test_loader_swaps_good_versions_and_refuses_bad_ones(
    model: RecModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = CatalogState()
    for item in _items(TEXTS):
        catalog.upsert(item)
    loader, holder, metrics, store = _loader(tmp_path, catalog)
    assert loader.load_initial(None).version == FALLBACK_VERSION  # nothing published yet
    assert holder.current.item_ids == tuple(TEXTS)

    v1 = store.publish(model, version=1)
    assert loader._try_swap(v1)
    sm1 = holder.current
    assert sm1.version == "1" and sm1.number == 1
    torch.testing.assert_close(sm1.item_vecs, encode_entries(model, items_entries(_items(TEXTS)), batch=8))

    # A wrong sha256 in the announcement, and a truncated weights file: both refused, v1 keeps serving.
    bad = store.publish(_perturbed(model, 0.1), version=2)
    wrong = bad.model_copy(update={"sha256": "0" * 64})
    trunc = store.publish(_perturbed(model, 0.2), version=3)
    wfile = tmp_path / "weights" / "v000003" / "weights.safetensors"
    wfile.write_bytes(wfile.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="serving.loader"):
        assert not loader._try_swap(wrong)
        assert not loader._try_swap(trunc)
    assert holder.current is sm1
    assert loader.refused == [(2, "checksum"), (3, "truncated")]
    assert metrics.value("refused_versions_total", {"reason": "checksum"}) == 1
    assert metrics.value("refused_versions_total", {"reason": "truncated"}) == 1
    assert "refused model version 3 (truncated)" in caplog.text

    # A delta on v1 swaps in and equals the model it was published from (serving side).
    newer = _perturbed(model, 0.05)
    v4 = store.publish(newer, version=4, kind="delta", base_version=1)
    assert loader._try_swap(v4)
    sm4 = holder.current
    assert sm4.version == "4"
    torch.testing.assert_close(sm4.item_vecs, encode_entries(newer, items_entries(_items(TEXTS)), batch=8))
    assert not loader._try_swap(v1)  # not newer: skipped, not refused
    assert metrics.value("swaps_total") == 2 and metrics.value("model_version") == 4

    # A new catalog item gets its vector from the live model, without a swap of the version.
    catalog.upsert(Item(item_id="m9", text="brand new space opera", ts=2))
    assert loader.refresh_items() == 1
    assert holder.current.version == "4" and holder.current.item_ids[-1] == "m9"


def test_delta_chains_as_the_trainer_writes_them_serve_the_trainers_model(model: RecModel, tmp_path: Path) -> None:
    """Deltas of what changed since the base (buffers included), in turn: each swaps in as published."""
    from trainer.weights import changed_tensors, cpu_state

    catalog = CatalogState()
    for item in _items(TEXTS):
        catalog.upsert(item)
    loader, holder, _metrics, store = _loader(tmp_path, catalog)
    trained = _perturbed(model, 0.0)
    store.publish(trained, version=1)
    base = cpu_state(trained)
    for version in (2, 3, 4):
        with torch.no_grad():
            trained.item_tower.proj.weight.add_(0.01 * version)
            trained.click_head.bias.add_(0.1)
            for _name, buf in trained.named_buffers():  # e.g. the text centre: not a parameter
                if buf.is_floating_point():
                    buf.add_(0.001)
                    break
        delta = changed_tensors(trained.state_dict(), base)
        update = store.publish(trained, version=version, kind="delta", base_version=1, tensors=delta)
        assert loader._try_swap(update)
        live = holder.current.model
        assert live is not None and holder.current.number == version
        own = trained.state_dict()
        for name, tensor in live.state_dict().items():
            assert torch.equal(tensor, own[name]), (version, name)
        torch.testing.assert_close(holder.current.item_vecs,
                                   encode_entries(trained, items_entries(_items(TEXTS)), batch=8))


def test_start_up_takes_the_newest_valid_version_from_the_store(model: RecModel, tmp_path: Path) -> None:
    catalog = CatalogState()
    catalog.upsert(Item(item_id="a", text="some text", ts=1))
    loader, holder, _, store = _loader(tmp_path, catalog)
    store.publish(model, version=1)
    broken = store.publish(_perturbed(model, 0.1), version=2)
    wfile = tmp_path / "weights" / "v000002" / "weights.safetensors"
    data = bytearray(wfile.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    wfile.write_bytes(bytes(data))
    assert loader.load_initial(broken).version == "1"  # announced v2 is corrupt: v1 from the store
    assert loader.refused == [(2, "checksum")]


def test_forged_unsigned_and_wrongly_signed_versions_are_refused_and_never_served(
    model: RecModel, tmp_path: Path
) -> None:
    catalog = CatalogState()
    for item in _items(TEXTS):
        catalog.upsert(item)
    loader, holder, metrics, store = _loader(tmp_path, catalog, signing_key="shared")
    assert loader._try_swap(store.publish(model, version=1))
    sm1 = holder.current
    # A valid, signed version published outside the configured store and announced there.
    forged = WeightStore(tmp_path / "elsewhere", signing_key="shared").publish(_perturbed(model, 0.3), version=2)
    assert not loader._try_swap(forged)
    # The same bytes copied next to the store, announced by a record naming the copy.
    (tmp_path / "weights-copy").symlink_to(tmp_path / "elsewhere")
    copied = forged.model_copy(update={"uri": forged.uri.replace("/elsewhere/", "/weights-copy/")})
    assert not loader._try_swap(copied)
    # Inside the store, but unsigned, or signed with another key.
    unsigned = WeightStore(tmp_path / "weights").publish(_perturbed(model, 0.1), version=3)
    wrong = WeightStore(tmp_path / "weights", signing_key="guess").publish(_perturbed(model, 0.2), version=4)
    assert not loader._try_swap(unsigned)
    assert not loader._try_swap(wrong)
    assert holder.current is sm1 and metrics.value("model_version") == 1
    assert loader.refused == [(2, "foreign"), (2, "foreign"), (3, "signature"), (4, "signature")]
    assert metrics.value("refused_versions_total", {"reason": "foreign"}) == 2
    assert metrics.value("refused_versions_total", {"reason": "signature"}) == 2
    # start-up: the announced v4 is refused and the store's newest version that verifies is v1
    restarted, holder2, _, _ = _loader(tmp_path, catalog, signing_key="shared")
    assert restarted.load_initial(wrong).version == "1"
    assert holder2.current.number == 1


def test_refusal_reasons() -> None:
    assert refusal_reason(WeightsError("version 2: sha256 mismatch: ...", WeightsReason.CHECKSUM)) == "checksum"
    assert refusal_reason(WeightsError("version 2: weights do not fit the model", WeightsReason.MISMATCH)) == "mismatch"
    # the label is the code, not the wording: rewording an error does not change a metric
    assert refusal_reason(WeightsError("anything at all", WeightsReason.CHECKSUM)) == "checksum"
    assert refusal_reason(RuntimeError("boom")) == "error"


@pytest.mark.parametrize("full_cells", [0, 4_000_000], ids=["candidate-union", "whole-catalog-product"])
def test_model_path_scores_equal_the_model_brute_force(
    model: RecModel, full_cells: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.scoring._FULL_SCORING_CELLS", full_cells)
    entries = items_entries(_items(TEXTS))
    sm = model_snapshot(1, model, entries, encode_entries(model, entries, batch=8))
    pop = Popularity(3600)
    pop.add(["m2"], ts=1)
    scorer = Scorer(pop, fallback_version=FALLBACK_VERSION, refresh_s=0)
    # three history items: with two, the mean direction is equally near both (an exact tie, in floats)
    history = ("m1", "zzz-unknown", "m3", "m4")
    queries = [
        Query(RecRequest(request_id="a", user_id="u1", k=10, ts=1), history),
        Query(RecRequest(request_id="b", user_id="u1", k=2, candidates=["m5", "m4", "nope", "m2"], ts=1), history),
        Query(RecRequest(request_id="c", user_id="new", k=2, ts=1), ()),
    ]
    out = scorer.score(sm, queries)

    with torch.inference_mode():
        hist = sm.item_vecs[torch.tensor([[0, 2, 3]])]
        user = model.encode_users(hist, torch.tensor([[True, True, True]]), ["u1"])
        full = model.score_matrix(user, sm.item_vecs)[0].numpy()
    ids = list(sm.item_ids)
    assert [s.item_id for s in out[0].items] == [ids[i] for i in top_k(full, ids, 10)]
    assert [s.score for s in out[0].items] == pytest.approx(sorted(full.tolist(), reverse=True), rel=1e-5)
    assert out[0].path == "model" and out[0].model_version == "1"

    cand = ["m5", "m4", "m2"]
    cand_scores = np.array([full[sm.index[c]] for c in cand])
    assert [s.item_id for s in out[1].items] == [cand[i] for i in top_k(cand_scores, cand, 2)]
    assert out[1].unknown_candidates == 1

    assert out[2].path == "cold" and out[2].model_version == "1"
    assert out[2].items[0].item_id == "m2"  # the only clicked item leads for a new user


def test_settings_that_cannot_work_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from contract.errors import ConfigError
    from contract.settings import load
    from serving.settings import ServingSettings, serving_device

    monkeypatch.setenv("STREAMREC_SERVING_EXPLORE", "epsilon")
    monkeypatch.setenv("STREAMREC_SERVING_EXPLORE_EPSILON", "0")
    with pytest.raises(ConfigError, match="STREAMREC_SERVING_EXPLORE_EPSILON"):
        load(ServingSettings)
    monkeypatch.setenv("STREAMREC_SERVING_EXPLORE", "off")
    monkeypatch.setenv("STREAMREC_SERVING_MAX_BATCH", "0")
    with pytest.raises(ConfigError, match="STREAMREC_SERVING_MAX_BATCH"):
        load(ServingSettings)
    with pytest.raises(ConfigError, match="STREAMREC_SERVING_DEVICE"):
        serving_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="STREAMREC_SERVING_DEVICE.*CUDA is not available"):
            serving_device("cuda")
    assert serving_device("auto").type in ("cpu", "cuda")


def test_head_only_versions_reuse_item_vectors_and_nan_versions_are_refused(model: RecModel, tmp_path: Path) -> None:
    catalog = CatalogState()
    for item in _items(TEXTS):
        catalog.upsert(item)
    loader, holder, metrics, store = _loader(tmp_path, catalog)
    assert loader._try_swap(store.publish(model, version=1))
    encoded = metrics.value("items_encoded_total")

    head_only = build_model(CONFIG)
    head_only.load_state_dict(model.state_dict())
    with torch.no_grad():
        head_only.click_head.bias.add_(1.0)
    assert loader._try_swap(store.publish(head_only, version=2, kind="delta", base_version=1))
    assert holder.current.version == "2" and holder.current.model is not model
    assert holder.current.item_vecs is not None
    assert metrics.value("items_encoded_total") == encoded  # vectors reused, not recomputed

    broken = build_model(CONFIG)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.click_head.bias.fill_(float("nan"))
    assert not loader._try_swap(store.publish(broken, version=3, kind="delta", base_version=1))
    assert loader.refused == [(3, "non_finite")] and holder.current.version == "2"


def test_warm_start_caches_the_catalogs_encoder_states_and_the_first_version_reuses_them(
    model: RecModel, tmp_path: Path
) -> None:
    catalog = CatalogState()
    for item in _items(TEXTS):
        catalog.upsert(item)
    loader, holder, _, store = _loader(tmp_path, catalog)
    loader._prefix_cache_items = 100
    loader.load_initial(None)
    assert loader.warm_up(CONFIG)  # the default config of the agent, here the test's
    cache = loader._prefix_cache
    assert cache is not None and len(cache) == len(TEXTS) and holder.current.model is None  # still the fallback
    misses = cache.misses
    assert loader._try_swap(store.publish(model, version=1))
    assert cache.misses == misses and cache.hits >= len(TEXTS)  # the frozen layers did not run again
    # and the vectors are the version's own, as without the warm start
    torch.testing.assert_close(holder.current.item_vecs, encode_entries(model, items_entries(_items(TEXTS)), batch=8))
    # a config that cannot build is logged, not raised
    assert not loader.warm_up(CONFIG.model_copy(update={"encoder": str(tmp_path / "no-such-encoder")}))
