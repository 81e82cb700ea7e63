"""The agent's own per-user posterior (serving/refresh.py): learned from labeled examples, served at once."""

from __future__ import annotations

import pytest
import torch

from contract.records import Item, Labeled, RecRequest, example_id
from serving.metrics import ServingMetrics
from serving.refresh import Arrived, PosteriorRefresh
from serving.scoring import Query, Scorer
from serving.settings import FALLBACK_VERSION
from serving.snapshot import encode_entries, fallback_snapshot, items_entries, model_snapshot
from trainer.learner_config import LearnerConfig
from trainer.model import ModelConfig, RecModel, build_model
from trainer.popularity import Popularity
from trainer.posterior import PosteriorExamples, UserPosterior

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [
    Item(item_id="s1", text="rockets and astronauts", categories=["space"], ts=1),
    Item(item_id="s2", text="a starship crosses the galaxy", categories=["space"], ts=1),
    Item(item_id="s3", text="the moon landing", categories=["space"], ts=1),
    Item(item_id="f1", text="a cooking show about pasta", categories=["food"], ts=1),
    Item(item_id="f2", text="french recipes for beginners", categories=["food"], ts=1),
    Item(item_id="f3", text="street food of bangkok", categories=["food"], ts=1),
]
# The posterior's features are the two category shares (no text directions: no catalog basis here).
CONFIG = ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=16, max_history=8, freeze_layers=1,
                     categories=["space", "food"], user_buckets=64, item_buckets=64, user_posterior_dims=0)


def snapshot(model: RecModel, number: int = 1, trained_up_to: int | None = None):
    """Version ``number`` of ``model``; it has learned the examples below offset ``trained_up_to``."""
    entries = items_entries(ITEMS)
    vecs = encode_entries(model, entries, batch=8)
    return model_snapshot(number, model, entries, vecs, None if trained_up_to is None else {"labeled:0": trained_up_to})


def arrived(examples: list[Labeled], start: int = 0) -> list[Arrived]:
    """The examples as the follower hands them over: partition 0, consecutive offsets from ``start``."""
    return [Arrived(0, start + j, ex) for j, ex in enumerate(examples)]


def labeled(user: str, imp: str, item: str, label: int, *, late: bool = False, history: list[str] | None = None) -> Labeled:
    return Labeled(example_id=example_id(imp, item), impression_id=imp, user_id=user, item_id=item, position=0,
                   label=label, history=history or [], impression_ts=1, label_ts=2, late=late, ts=3)  # type: ignore[arg-type]


def space_fan(user: str = "fan") -> list[Labeled]:
    """Three slates: the space items clicked, the food items not."""
    return [labeled(user, f"{user}-i{n}", i.item_id, int(i.categories == ["space"])) for n in range(3) for i in ITEMS]


def scores(sm, user: str) -> dict[str, float]:
    scorer = Scorer(Popularity(3600.0), fallback_version=FALLBACK_VERSION)
    req = RecRequest(request_id="r", user_id=user, k=len(ITEMS), ts=1)
    (out,) = scorer.score(sm, [Query(req, ("s1",))])
    return {s.item_id: s.score for s in out.items}


def margin(s: dict[str, float]) -> float:
    """Mean score of the space items minus the food items'."""
    return (sum(v for k, v in s.items() if k[0] == "s") - sum(v for k, v in s.items() if k[0] == "f")) / 3


def test_a_users_labels_move_their_scores_at_once_and_no_one_elses() -> None:
    model = build_model(CONFIG).eval()
    sm = snapshot(model)
    metrics = ServingMetrics()
    refresh = PosteriorRefresh(metrics, every_s=0.0)
    before_fan, before_other = margin(scores(sm, "fan")), scores(sm, "other")
    refresh.offer(arrived(space_fan() + [labeled("fan", "x", "ghost", 1)]))
    assert refresh.apply(sm) == 19
    assert margin(scores(sm, "fan")) > before_fan + 0.5  # the space items rose against the food items
    assert scores(sm, "other") == pytest.approx(before_other)  # another user's row is untouched
    assert metrics.value("posterior_examples_total") == 19
    assert metrics.value("posterior_skipped_total", {"reason": "unknown_item"}) == 1
    assert metrics.value("posterior_users") == 1


def test_the_update_is_the_trainers_bayes_rule_on_the_live_versions_offsets() -> None:
    model = build_model(CONFIG).eval()
    sm = snapshot(model)
    refresh = PosteriorRefresh(ServingMetrics(), every_s=0.0)
    examples = space_fan()
    refresh.offer(arrived(examples))
    # the same examples by hand: offset = the version's logit without its posterior term (zero here)
    with torch.no_grad():
        vecs = sm.item_vecs[torch.tensor([sm.index[e.item_id] for e in examples])]
        users = model.encode_users(sm.item_vecs[:0].new_zeros((len(examples), 8, sm.item_vecs.shape[1])),
                                   torch.zeros((len(examples), 8), dtype=torch.bool), [e.user_id for e in examples])
        offsets = model.click_logits(users, vecs)
        z = model.posterior_features(vecs)
    c = LearnerConfig()
    ref = UserPosterior(torch.zeros_like(model.user_posterior_mean), prior_std=c.posterior_prior_std,
                        forgetting=c.posterior_forgetting, newton_steps=c.posterior_newton_steps,
                        refit_every=c.posterior_refit_every, change_hazard=c.posterior_change_hazard)
    n = len(examples)
    ref.update(PosteriorExamples(model.user_rows([e.user_id for e in examples], torch.device("cpu")), z, offsets,
                                 torch.tensor([float(e.label) for e in examples]), torch.zeros(n, dtype=torch.bool),
                                 torch.ones(n), torch.zeros(n, dtype=torch.long), torch.zeros(n)))
    refresh.apply(sm)
    row = int(model.user_rows(["fan"], torch.device("cpu"))[0])
    assert model.user_posterior_mean[row].tolist() == pytest.approx(ref.mean[row].tolist(), abs=1e-5)
    assert float(ref.mean[row, 0]) > float(ref.mean[row, 1])  # likes space more than food


def test_examples_wait_for_the_first_version_and_each_version_gets_what_it_has_not_learned() -> None:
    metrics = ServingMetrics()
    refresh = PosteriorRefresh(metrics, every_s=3600.0)
    assert refresh.apply(fallback_snapshot(FALLBACK_VERSION, items_entries(ITEMS))) == 0
    a, b = space_fan("a"), space_fan("b")
    refresh.offer(arrived(a))
    assert refresh.waiting == 18  # no model yet: nothing to learn with
    v1_model = build_model(CONFIG).eval()
    v1 = snapshot(v1_model, 1, trained_up_to=0)
    assert refresh.apply(v1) == 18  # a new snapshot is refreshed at once, whatever every_s says
    refresh.offer(arrived(b, start=18))
    assert refresh.apply(v1) == 0 and refresh.waiting == 18  # not due yet
    assert refresh.apply(v1, force=True) == 18
    row_a, row_b = (int(r) for r in v1_model.user_rows(["a", "b"], torch.device("cpu")))
    learned_a = refresh.posterior.mean[row_a].clone()

    # Version 2 has learned user a's examples (offsets 0-17) but not b's: it keeps its own mean of a,
    # and b's examples are learned again on top of its means.
    v2_model = build_model(CONFIG).eval()
    with torch.no_grad():
        v2_model.user_posterior_mean[row_a] = torch.tensor([0.7, -0.7])  # what the trainer learned of a
    v2 = snapshot(v2_model, 2, trained_up_to=18)
    before_b = margin(scores(v2, "b"))
    refresh.apply(v2)
    assert v2_model.user_posterior_mean[row_a].tolist() == pytest.approx([0.7, -0.7])  # the version's own
    assert not torch.allclose(v2_model.user_posterior_mean[row_a], learned_a)
    assert margin(scores(v2, "b")) > before_b + 0.5  # b's newer examples, on the version's means
    assert len(refresh.newer) == 18

    # Version 3 has learned everything: the agent serves its means, and nothing is newer.
    v3_model = build_model(CONFIG).eval()
    refresh.apply(snapshot(v3_model, 3, trained_up_to=36))
    assert len(refresh.newer) == 0
    assert torch.equal(v3_model.user_posterior_mean, build_model(CONFIG).user_posterior_mean)


def test_a_late_positive_corrects_its_negative_and_the_inbox_is_bounded() -> None:
    model = build_model(CONFIG).eval()
    sm = snapshot(model)
    refresh = PosteriorRefresh(ServingMetrics(), every_s=0.0)
    refresh.offer(arrived([labeled("u", "i1", "f1", 0)]))
    refresh.apply(sm)
    row = int(model.user_rows(["u"], torch.device("cpu"))[0])
    after_negative = float(model.user_posterior_mean[row, 1])
    refresh.offer(arrived([labeled("u", "i1", "f1", 1, late=True)], start=1))
    refresh.apply(sm)
    assert float(model.user_posterior_mean[row, 1]) > after_negative  # the click counts, the negative is undone
    metrics = ServingMetrics()
    small = PosteriorRefresh(metrics, pending=5, every_s=0.0)
    small.offer(arrived(space_fan()))
    assert small.waiting == 5
    assert metrics.value("posterior_skipped_total", {"reason": "pending_full"}) == 13
    small.apply(snapshot(build_model(CONFIG).eval()))  # no version ever covers them: at most 5 stay newer
    small.offer(arrived(space_fan("other")[:5], start=5))
    small.apply(snapshot(build_model(CONFIG).eval()))
    assert len(small.newer) == 5
