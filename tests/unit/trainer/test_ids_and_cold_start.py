"""What the id and category parts add, and what the text part keeps: tiny sizes, no Kafka."""

from __future__ import annotations

import pytest
import torch

from contract.records import Item, Labeled
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.model import ModelConfig, build_model, item_bucket

# Ten films with similar titles: the text alone cannot tell the popular one apart.
ITEMS = [Item(item_id=f"m{k}", text=f"Film number {k} (1995)", categories=["Drama"], ts=1) for k in range(10)]
NEW_SPACE = Item(item_id="new-space", text="Galaxy rocket astronaut orbit", categories=[], ts=2)
NEW_COOKING = Item(item_id="new-cooking", text="Garlic pasta recipe in the oven", categories=[], ts=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw) -> ModelConfig:
    base = dict(encoder_layers=1, freeze_layers=1, max_text_len=16, embed_dim=16, max_history=4,
                item_buckets=256, user_buckets=64, categories=["Drama"])
    base.update(kw)
    return ModelConfig(**base)


def slate(n: int, user: str, clicked: str | None, history: list[str]) -> list[Labeled]:
    """User ``user`` is shown all ten films; ``clicked`` (if any) is the one clicked."""
    return [
        Labeled(
            example_id=f"imp{n}:{it.item_id}", impression_id=f"imp{n}", user_id=user, item_id=it.item_id,
            position=p, label=int(it.item_id == clicked), history=history, impression_ts=n, label_ts=n, ts=n,
        )
        for p, it in enumerate(ITEMS)
    ]


@pytest.mark.parametrize("stds", [(0.03, 0.1, 0.3, 1.0, 3.0), ()], ids=["bias-posterior", "bias-adagrad"])
def test_an_id_embedding_learns_a_popular_item_within_a_few_steps(stds: tuple[float, ...]) -> None:
    catalog = Catalog(ITEMS)
    learner = ContinualLearner(
        build_model(config()), LearnerConfig(device="cpu", replay_size=0, item_bias_prior_stds=stds), catalog
    )
    # every user clicks m3, whoever they are: popularity that no title carries
    batches = [[ex for u in range(8) for ex in slate(10 * s + u, f"u{s}-{u}", "m3", [])] for s in range(5)]
    first = None
    for b in batches:
        learner.step(b)
        if first is None:
            first = learner.last_scored
    probs, kept = learner.predict(slate(999, "someone-new", None, []))
    scores = dict(zip([ITEMS[i].item_id for i in kept], probs.tolist(), strict=True))
    assert max(scores, key=scores.get) == "m3"
    others = max(v for k, v in scores.items() if k != "m3")
    assert scores["m3"] > 2 * others  # learned in five steps, for a user it has never seen
    _, p0 = first
    assert p0.max() - p0.min() < 0.1  # before any update the popular item did not stand out
    bias = learner.model.item_id_bias.weight
    held = {id(p) for opt in learner.optimizers for g in opt.param_groups for p in g["params"]}
    published = learner.model.trainable_state_dict()["item_id_bias.weight"]
    assert torch.equal(published, bias) and (id(bias) in held) == (not stds)  # the posterior's: no optimizer
    if stds:
        assert learner.item_bias.prior_stds[learner.item_bias.chosen] >= 1.0  # popularity: a wide prior


def test_without_ids_the_same_model_scores_from_text_alone() -> None:
    model = build_model(config())
    texts = [it.text for it in ITEMS]
    ids = [it.item_id for it in ITEMS]
    with torch.no_grad():
        model.item_embedding.weight.normal_()  # as if trained: the id part is large
        model.item_id_bias.weight.normal_()
        with_ids = model.encode_items(texts, ids)
        text_only = model.encode_items(texts)
        again = model.encode_items(texts)
    assert not torch.allclose(with_ids, text_only)
    torch.testing.assert_close(text_only, again)
    # the text part is what an unseen id also gets, up to its (untrained) hash row
    fresh = build_model(config())
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_items(texts), text_only, rtol=1e-4, atol=1e-4)
    assert item_bucket("m1", 256) == item_bucket("m1", 256)  # stable: no new row for an unseen id


def test_a_brand_new_item_is_scored_from_its_text() -> None:
    """A user who clicked space titles: a never-clicked new space title beats a new cooking title."""
    space = [Item(item_id=f"s{k}", text=t, categories=[], ts=1) for k, t in enumerate(
        ["Galaxy telescope and comet", "Planet orbit, lunar eclipse", "Rocket to mars", "Nebula and supernova"])]
    catalog = Catalog([*space, *ITEMS, NEW_SPACE, NEW_COOKING])
    model = build_model(config())
    learner = ContinualLearner(model, LearnerConfig(device="cpu"), catalog)
    history = [s.item_id for s in space]
    probe = [
        Labeled(example_id=f"p:{i}", impression_id="p", user_id="fan", item_id=i, position=n, label=0,
                history=history, impression_ts=5, label_ts=5, ts=5)
        for n, i in enumerate(["new-space", "new-cooking"])
    ]
    probs, kept = learner.predict(probe)
    assert kept == [0, 1] and probs[0] > probs[1]
    assert bool(model.item_tower.centred)  # the first use centred the text vectors on the catalog


def test_centring_moves_the_mean_text_vector_to_zero() -> None:
    model = build_model(config(item_buckets=0))
    texts = [it.text for it in ITEMS] + [NEW_SPACE.text, NEW_COOKING.text]
    with torch.no_grad():
        before = model.item_tower(texts).mean(0).norm()
        model.center_text(texts)
        after = model.item_tower(texts).mean(0).norm()
    assert bool(model.item_tower.centred)
    assert after < 1e-4 < before


def test_a_user_without_history_has_no_taste_and_sends_no_huge_gradient() -> None:
    """Normalising a (near) zero vector sends 1/|x| gradients into the clipping norm (1e11 seen)."""
    model = build_model(config())
    items = model.encode_items([it.text for it in ITEMS[:3]], [it.item_id for it in ITEMS[:3]])
    users = model.encode_users(items[None].expand(2, 3, -1), torch.tensor([[True] * 3, [False] * 3]), ["a", "b"])
    assert users[1, :-1].abs().max() == 0  # no history, no learned user row yet: no direction
    model.click_logits(users, items[:2]).sum().backward()
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(torch.stack(norms)).all() and max(norms) < 1e3


def test_without_item_id_rows_the_posteriors_still_learn() -> None:
    """No item buckets: no item biases to fit, and the per-user posterior's step still runs."""
    learner = ContinualLearner(build_model(config(item_buckets=0)), LearnerConfig(device="cpu", replay_size=0), Catalog(ITEMS))
    assert learner.item_bias is None and learner.user_posterior is not None
    for s in range(2):
        learner.step([ex for u in range(4) for ex in slate(10 * s + u, f"u{u}", "m3", ["m1"])])
    assert learner.user_posterior.updates == 2
