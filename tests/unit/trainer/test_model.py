"""The model's parts, heads and losses, on the test-sized encoder (1-2 real layers, short texts)."""

from __future__ import annotations

import pytest
import torch

from contract.records import Item, Labeled
from trainer.batching import build_batch
from trainer.catalog import Catalog, text_hash
from trainer.losses import RecTrain
from trainer.model import (
    ModelConfig,
    ModelError,
    PrefixCache,
    TaskWeights,
    build_model,
    frozen_layer_count,
    user_bucket,
)

CATS = ["Action", "Comedy", "Drama"]
TEXTS = {
    "i1": ("Toy Story (1995)", ["Comedy"]),
    "i2": ("GoldenEye (1995)", ["Action"]),
    "i3": ("Four Rooms (1995) a somewhat longer title for padding", ["Comedy", "Drama"]),
    "i4": ("Copycat (1995)", []),
}


def tiny(**kw) -> ModelConfig:
    base = dict(encoder_layers=1, max_text_len=16, embed_dim=32, max_history=4, categories=CATS, value_head=True)
    base.update(kw)
    return ModelConfig(**base)


def catalog() -> Catalog:
    return Catalog(Item(item_id=k, text=t, categories=c, ts=1) for k, (t, c) in TEXTS.items())


def example(n: int, user: str, item: str, label: int, history: list[str], value: float | None = None) -> Labeled:
    return Labeled(
        example_id=f"imp{n}:{item}", impression_id=f"imp{n}", user_id=user, item_id=item, position=0,
        label=label, value=value, history=history, impression_ts=n, label_ts=n, ts=n,
    )


EXAMPLES = [
    example(1, "u1", "i1", 1, ["i2", "i3"], value=4.0),
    example(2, "u2", "i2", 0, []),
    example(3, "u1", "i3", 0, ["i2", "i3", "i1", "i4", "i2"]),
    example(4, "u3", "i4", 1, ["i1"]),
    example(5, "u3", "unknown-item", 1, ["i1"]),
    example(6, "u4", "i2", 0, ["i1", "ghost", "i3", "i4", "i2", "i1"]),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny())


def test_config_round_trips_through_json() -> None:
    cfg = tiny(lora_rank=4, freeze_layers=0, task_weights=TaskWeights(category=0.5))
    again = ModelConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
    assert ModelConfig(encoder="default").encoder is None
    with pytest.raises(ValueError):
        ModelConfig(categories=["a", "a"])


def test_shapes_of_towers_and_scores(model) -> None:
    items = model.encode_items([t for t, _ in TEXTS.values()], list(TEXTS), None, [c for _, c in TEXTS.values()])
    width = 32 + model.posterior_width + 1  # embed_dim + the per-user posterior's features + the bias column
    assert model.posterior_width == 8 + len(CATS)  # 8 text directions and the categories
    assert items.shape == (4, width) == (4, model.vector_width)
    torch.testing.assert_close(items[:, :32].norm(dim=-1), torch.ones(4))  # unit item directions
    hist = items[None].expand(3, 4, width)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    users = model.encode_users(hist, mask, ["u1", "u2", "u3"])
    assert users.shape == (3, width) and torch.isfinite(users).all()
    logits = model.click_logits(users, items[:3])
    assert logits.shape == (3,)
    matrix = model.score_matrix(users, items)
    assert matrix.shape == (3, 4)
    torch.testing.assert_close(matrix.diagonal(), logits)  # one scoring formula for training and serving
    assert model.category_logits(items).shape == (4, len(CATS))
    assert model.value(users, items[:3]).shape == (3,)


def test_mean_user_tower_and_empty_history() -> None:
    m = build_model(tiny(user_tower="mean", categories=[], value_head=False))
    users = m.encode_users(torch.zeros(2, 0, m.vector_width), torch.zeros(2, 0, dtype=torch.bool), ["a", "b"])
    assert users.shape == (2, m.vector_width) and torch.isfinite(users).all()
    torch.testing.assert_close(users[0], users[1])  # no history, no user embedding: the same prior
    with pytest.raises(ModelError):
        m.category_logits(users)
    with pytest.raises(ModelError):
        m.value(users, users)


def test_hashed_user_embedding_tells_users_apart() -> None:
    m = build_model(tiny(user_buckets=64))
    hist = torch.zeros(2, 0, 33)
    no = torch.zeros(2, 0, dtype=torch.bool)
    with torch.no_grad():
        # rows start at zero (a user's own taste is learned from their labels); once learned, they differ
        torch.testing.assert_close(*m.encode_users(hist, no, ["alice", "never-seen-before"]))
        m.user_tower.user_embedding.weight.normal_()
        m.user_id_bias.weight.normal_()
    users = m.encode_users(hist, no, ["alice", "never-seen-before"])
    assert not torch.allclose(users[0], users[1])
    assert user_bucket("alice", 64) == user_bucket("alice", 64)
    assert 0 <= user_bucket("x", 7) < 7


def test_history_longer_than_max_keeps_most_recent(model) -> None:
    vecs = torch.randn(1, 6, 33)
    full = torch.ones(1, 6, dtype=torch.bool)
    a = model.encode_users(vecs, full, ["u"])
    b = model.encode_users(vecs[:, 2:], full[:, 2:], ["u"])  # max_history=4: the last four
    torch.testing.assert_close(a, b)


def test_batch_encodes_unique_items_and_skips_unknown() -> None:
    batch, kept = build_batch(EXAMPLES, catalog(), max_history=4, categories=CATS)
    assert kept == [0, 1, 2, 3, 5]  # the example on an item missing from the catalog is left out
    assert sorted(batch.item_ids) == ["i1", "i2", "i3", "i4"]  # each unique item once
    assert batch.history.shape == (5, 4)  # five distinct (user, history) contexts
    assert batch.context.tolist() == [0, 1, 2, 3, 4] and batch.user_ids == ["u1", "u2", "u1", "u3", "u4"]
    # history keeps the 4 most recent, in order, valid entries first
    assert [batch.item_ids[i] for i in batch.history[2].tolist()] == ["i3", "i1", "i4", "i2"]
    # an item missing from the catalog is dropped before the most recent four are kept
    assert [batch.item_ids[i] for i in batch.history[4].tolist()] == ["i3", "i4", "i2", "i1"]
    assert batch.history_mask.sum(1).tolist() == [2, 0, 4, 1, 4]
    assert batch.value_mask.tolist() == [True, False, False, False, False]
    row = batch.item_ids.index("i3")
    assert batch.category_targets[row].tolist() == [0.0, 1.0, 1.0]
    assert batch.category_mask[batch.item_ids.index("i4")].item() is False


def test_examples_of_one_slate_share_one_context(model) -> None:
    slate = [example(9, "u1", item, label, ["i2", "i3"]) for item, label in (("i1", 1), ("i4", 0), ("i2", 0))]
    batch, _ = build_batch([*slate, EXAMPLES[1]], catalog(), max_history=4, categories=CATS)
    assert batch.context.tolist() == [0, 0, 0, 1] and batch.history.shape[0] == 2
    with torch.no_grad():
        out = model(batch)
        cats = [TEXTS[i][1] for i in batch.item_ids]
        items = model.encode_items(batch.texts, batch.item_ids, batch.text_hashes, cats)
        one = model.encode_users(items[batch.history[:1]], batch.history_mask[:1], ["u1"])
    torch.testing.assert_close(out.user_vecs[:3], one.expand(3, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.click_logits, model.click_logits(out.user_vecs, items[batch.candidate]))


def test_losses_of_every_head_and_gradients(model) -> None:
    batch, _ = build_batch(EXAMPLES, catalog(), max_history=4, categories=CATS)
    wrapper = RecTrain(model, distill_weight=0.5, distill_temperature=2.0)
    model.train()
    out = wrapper(batch, teacher_logits=torch.zeros(len(batch)))
    model.eval()
    assert set(out.losses) == {"click", "category", "value", "distill", "loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in out.losses.values())
    tw = model.config.task_weights
    expect = tw.click * out.losses["click"] + tw.category * out.losses["category"] + tw.value * out.losses["value"] + 0.5 * out.losses["distill"]
    assert out.loss.item() == pytest.approx(expect, rel=1e-5)
    # the click loss is the BCE of the click logits, the distillation target p=0.5 at T=2
    p = torch.sigmoid(out.output.click_logits.detach())
    bce = -(batch.labels * p.log() + (1 - batch.labels) * (1 - p).log()).mean()
    assert out.losses["click"] == pytest.approx(bce.item(), rel=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and "value_head" not in name:
            assert p.grad is not None, name
    model.zero_grad(set_to_none=True)


def test_example_weights_scale_the_click_loss(model) -> None:
    b1, _ = build_batch(EXAMPLES[:2], catalog(), max_history=4, categories=CATS)
    b2, _ = build_batch(EXAMPLES[:2], catalog(), max_history=4, categories=CATS, weights=[1.0, 3.0])
    w = RecTrain(model)
    with torch.no_grad():
        out = w(b1)
        per = torch.nn.functional.binary_cross_entropy_with_logits(out.output.click_logits, b1.labels, reduction="none")
        got = w(b2).losses["click"]
    assert got == pytest.approx(((per[0] + 3 * per[1]) / 4).item(), rel=1e-5)


def test_freeze_layers_and_lora_choose_trainable_parameters() -> None:
    frozen = build_model(tiny(encoder_layers=2, freeze_layers=1))
    names = set(frozen.trainable_state_dict())
    assert not any(n.startswith("item_tower.encoder.embeddings") or ".layer.0." in n for n in names)
    assert any(".layer.1." in n for n in names)
    assert all(not p.requires_grad for p in frozen.frozen_prefix_parameters())

    lora = build_model(tiny(encoder_layers=2, freeze_layers=1, lora_rank=2))
    enc = [n for n in lora.trainable_state_dict() if n.startswith("item_tower.encoder.")]
    assert enc and all("lora_" in n and ".layer.1." in n for n in enc)
    with pytest.raises(ModelError):
        build_model(tiny(freeze_layers=1, lora_rank=2))  # nothing left to adapt

    # negative: all but the top |N| layers, whatever the depth; the default freezes the whole encoder
    assert [frozen_layer_count(f, 6) for f in (-1, -2, 0, 5, 9)] == [5, 4, 0, 5, 6]
    assert frozen_layer_count(-1, 1) == 0
    assert build_model(tiny(encoder_layers=2)).item_tower.frozen == 2


def test_build_is_deterministic_and_trainable_state_restores_a_model() -> None:
    cfg = tiny(encoder_layers=2, freeze_layers=1, lora_rank=2)
    a, b = build_model(cfg), build_model(cfg)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    with torch.no_grad():
        for p in a.trainable_state_dict().values():
            p.add_(0.01 * torch.randn_like(p))
    fresh = build_model(cfg)
    missing, unexpected = fresh.load_state_dict(a.trainable_state_dict(), strict=False)
    assert not unexpected
    texts = [t for t, _ in TEXTS.values()]
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_items(texts), a.encode_items(texts))


def test_prefix_cache_matches_uncached_and_invalidates_on_text_change() -> None:
    m = build_model(tiny(encoder_layers=2, freeze_layers=1))
    texts = [t for t, _ in TEXTS.values()]
    ids = list(TEXTS)
    with torch.no_grad():
        plain = m.encode_items(texts, ids)
        cache = PrefixCache(capacity=3)
        m.attach_cache(cache)
        first = m.encode_items(texts, ids)
        again = m.encode_items(texts, ids)
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)
    assert len(cache) == 3  # bounded LRU
    assert cache.misses == 4 + 1 and cache.hits == 3  # second call: i1 was evicted
    assert "i2" not in cache  # least recently used when i1 came back
    state = cache.get("i4", text_hash(texts[3]))
    n_tokens = len(m.item_tower.tokenizer(texts[3])["input_ids"])
    assert state is not None and state.shape == (n_tokens, 384)  # after the frozen layer, per token

    with torch.no_grad():
        changed = m.encode_items(["a completely different text"], ["i4"])
        direct = build_model(tiny(encoder_layers=2, freeze_layers=1)).encode_items(["a completely different text"], ["i4"])
    assert cache.invalidations == 1
    torch.testing.assert_close(changed, direct, atol=1e-5, rtol=1e-5)


def test_fully_frozen_encoder_caches_pooled_vectors() -> None:
    m = build_model(tiny(freeze_layers=1))
    cache = PrefixCache()
    m.attach_cache(cache)
    with torch.no_grad():
        m.encode_items(["Toy Story"], ["i1"])
    entry = cache.get("i1", text_hash("Toy Story"))
    assert entry is not None and entry.shape == (384,)
    assert all(".encoder." not in n for n in m.trainable_state_dict())


def test_gradients_flow_through_unfrozen_layers_on_cached_prefix() -> None:
    m = build_model(tiny(encoder_layers=2, freeze_layers=1))
    m.attach_cache(PrefixCache())
    with torch.no_grad():
        m.encode_items(["Toy Story"], ["i1"])  # now cached
    m.train()
    m.encode_items(["Toy Story"], ["i1"]).sum().backward()
    layer1 = m.item_tower.layers[1].attention.self.query.weight
    assert layer1.grad is not None and layer1.grad.abs().sum() > 0
    assert m.item_tower.layers[0].attention.self.query.weight.grad is None


@pytest.mark.parametrize("kind", ["attention", "mean"])
def test_indexed_user_tower_equals_per_slot(kind) -> None:
    m = build_model(tiny(user_tower=kind, user_buckets=8))
    items = torch.randn(5, 33)
    history = torch.tensor([[0, 3, 4, 1, 2, 0], [2, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    users = ["a", "b", "c"]
    with torch.no_grad():
        per_slot = m.encode_users(items[history], mask, users)
        indexed = m.encode_users_indexed(items, history, mask, users)
    torch.testing.assert_close(indexed, per_slot, rtol=1e-5, atol=1e-5)
