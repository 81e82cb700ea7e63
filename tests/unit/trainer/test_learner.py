"""The continual learner: prequential order, checkpoint/restart, forgetting tools, drift recovery."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from contract.records import Labeled
from harness.replays import _split, labeled_examples
from streams.replay.synthetic import SyntheticConfig, SyntheticStream
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig, LearnerError, iter_batches
from trainer.metrics import auc
from trainer.model import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world() -> tuple[Catalog, list[Labeled], SyntheticStream]:
    stream = SyntheticStream(
        SyntheticConfig(users=30, items=60, new_items=0, events=1200, topics=4, slate_size=5,
                        shift_at=0.5, shift_fraction=1.0, seed=1)
    )
    items, imps, clicks = _split(stream.stream())
    examples = labeled_examples(imps, clicks, window_ms=3_600_000, history_length=20)
    return Catalog(items), examples, stream


def tiny_model(catalog: Catalog, **kw) -> ModelConfig:
    base = dict(encoder_layers=1, freeze_layers=1, max_text_len=24, embed_dim=32, max_history=8,
                categories=catalog.category_names())
    base.update(kw)
    return ModelConfig(**base)


def test_step_scores_before_it_learns(world) -> None:
    catalog, examples, _ = world
    learner = ContinualLearner(build_model(tiny_model(catalog)), LearnerConfig(device="cpu"), catalog)
    batch = examples[:100]
    before = learner.evaluate(batch)  # the model as it is before the step
    stats = learner.step(batch)
    snap = learner.metrics.snapshot()
    assert snap["cumulative_log_loss"] == pytest.approx(before["log_loss"], rel=1e-4)
    assert snap["window_auc"] == pytest.approx(before["auc"], rel=1e-4)
    assert stats["batch_log_loss"] == pytest.approx(before["log_loss"], rel=1e-4)
    after = learner.evaluate(batch)
    assert after["log_loss"] < before["log_loss"]  # and then it learned
    assert learner.examples_trained == 100 and learner.steps == 1
    assert learner.metrics.snapshot() == snap  # evaluate changes nothing


def test_duplicates_and_unknown_items_are_not_trained(world) -> None:
    catalog, examples, _ = world
    learner = ContinualLearner(build_model(tiny_model(catalog)), LearnerConfig(device="cpu"), catalog)
    learner.step(examples[:50])
    again = learner.step(examples[:50])
    assert again["duplicates"] == 50 and again["examples"] == 0
    assert learner.examples_trained == 50
    ghost = examples[60].model_copy(update={"item_id": "not-in-catalog", "example_id": examples[60].impression_id + ":not-in-catalog"})
    stats = learner.step([ghost, examples[61]])
    assert stats["skipped"] == 1 and stats["examples"] == 1
    late = examples[62].model_copy(update={"label": 1, "late": True})
    stats = learner.step([late])  # a late positive corrects its negative: trained, not scored
    assert stats["examples"] == 1 and learner.metrics.count == 51


def test_checkpoint_restart_gives_identical_parameters_and_next_step(world, tmp_path) -> None:
    catalog, examples, _ = world
    cfg = tiny_model(catalog, encoder_layers=2, freeze_layers=1, user_buckets=16, value_head=True)
    lcfg = LearnerConfig(device="cpu", replay_size=64, replay_ratio=0.5, negative_sampling_rate=0.5)
    a = ContinualLearner(build_model(cfg), lcfg, catalog)
    batches = list(iter_batches(examples[:400], 80))
    for b in batches[:3]:
        a.step(b)
    a.set_teacher({k: v.clone() for k, v in a.model.trainable_state_dict().items()})
    a.step(batches[3])
    path = tmp_path / "ckpt.pt"
    torch.save(a.state_dict(), path)

    b = ContinualLearner(build_model(cfg), lcfg, catalog)
    b.load_state_dict(torch.load(path, weights_only=True))
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert b.examples_trained == a.examples_trained and b.metrics.snapshot() == a.metrics.snapshot()
    assert b.replay.items() == a.replay.items()

    sa, sb = a.step(batches[4]), b.step(batches[4])
    for key in ("loss", "click", "distill", "trained", "replayed", "batch_auc"):
        assert sa[key] == pytest.approx(sb[key], rel=1e-5, abs=1e-7), key
    for (na, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=na)


def test_checkpoint_of_another_model_is_refused(world) -> None:
    catalog, _, _ = world
    a = ContinualLearner(build_model(tiny_model(catalog)), LearnerConfig(device="cpu"), catalog)
    b = ContinualLearner(build_model(tiny_model(catalog, embed_dim=16)), LearnerConfig(device="cpu"), catalog)
    with pytest.raises(LearnerError, match="embed_dim"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(LearnerError):
        a.set_teacher(b.model.trainable_state_dict())


def test_distillation_pulls_towards_the_teacher(world) -> None:
    catalog, examples, _ = world
    cfg = tiny_model(catalog)
    teacher = build_model(cfg)
    with torch.no_grad():
        teacher.click_head.bias.fill_(3.0)  # a teacher that predicts clicks everywhere
    # the item biases by gradient too: fitted in closed form, they would take the labels' side
    # against the teacher (distillation holds back what gradients learn, not the posteriors)
    lcfg = LearnerConfig(device="cpu", distill_weight=5.0, replay_size=0, item_bias_prior_stds=())
    learner = ContinualLearner(build_model(cfg), lcfg, catalog)
    learner.set_teacher(teacher.trainable_state_dict())
    plain = ContinualLearner(build_model(cfg), lcfg.model_copy(update={"distill_weight": 0.0}), catalog)
    for b in iter_batches(examples[:600], 100):
        s = learner.step(b)
        assert "distill" in s
        plain.step(b)
    p_distilled, _ = learner.predict(examples[600:800])
    p_plain, _ = plain.predict(examples[600:800])
    assert p_distilled.mean() > p_plain.mean() + 0.05


def test_negative_downsampling_keeps_probabilities_calibrated(world) -> None:
    catalog, examples, _ = world
    # labels with no signal, click rate 0.2: a calibrated model predicts 0.2 on average
    rng = np.random.default_rng(0)
    noise = [e.model_copy(update={"label": int(rng.uniform() < 0.2)}) for e in examples[:4300]]
    held = noise[4000:]
    lcfg = LearnerConfig(device="cpu", replay_size=0, lr_heads=1e-2, lr_towers=1e-2)
    sampled = ContinualLearner(
        build_model(tiny_model(catalog)), lcfg.model_copy(update={"negative_sampling_rate": 0.25}), catalog
    )
    # the same downsampling without the correction: negatives dropped before the learner sees them
    uncorrected = ContinualLearner(build_model(tiny_model(catalog)), lcfg, catalog)
    trained, means_sampled, means_uncorrected = 0, [], []
    for n, b in enumerate(iter_batches(noise[:4000], 100)):
        trained += sampled.step(b)["trained"]
        uncorrected.step([e for e in b if e.label == 1 or rng.uniform() < 0.25])
        if n >= 20 and n % 2:  # average over the second half: single snapshots fluctuate
            means_sampled.append(sampled.predict(held)[0].mean())
            means_uncorrected.append(uncorrected.predict(held)[0].mean())
    labels = np.array([e.label for e in noise[:4000]])
    expected = labels.sum() + 0.25 * (1 - labels).sum()
    assert abs(trained - expected) < 0.1 * expected  # about a quarter of the negatives
    assert sampled.metrics.count == 4000  # but every example is scored
    # uncorrected, the mean goes to 0.2 / (0.2 + 0.25 * 0.8) = 0.5
    assert np.mean(means_uncorrected) > 0.4
    assert np.mean(means_sampled) == pytest.approx(0.2, abs=0.07)


def test_continual_learner_recovers_after_drift_and_static_does_not(world) -> None:
    catalog, examples, stream = world
    # users known by a hashed embedding only (no history): adapting needs learning
    cfg = tiny_model(catalog, max_history=0, user_buckets=256)
    lcfg = LearnerConfig(device="cpu", lr_towers=1e-2, lr_heads=1e-2)
    shift = stream.shift_ts
    pre = [e for e in examples if e.impression_ts < shift]
    post = [e for e in examples if e.impression_ts >= shift]
    continual = ContinualLearner(build_model(cfg), lcfg, catalog)
    static = ContinualLearner(build_model(cfg), lcfg, catalog)
    for b in iter_batches(pre, 50):
        continual.step(b)
        static.step(b)
    before = continual.evaluate(pre[-1000:])["auc"]
    assert before > 0.75  # it learned the world before the shift

    continual.set_teacher({k: v.clone() for k, v in continual.model.trainable_state_dict().items()})
    ys, pc, ps = [], [], []
    for b in iter_batches(post, 50):
        p_static, _ = static.predict(b)  # frozen after the first part
        continual.step(b)
        ys.append(np.array([e.label for e in b]))
        pc.append(continual.last_scored[1])
        ps.append(p_static)
    y, c, s = np.concatenate(ys), np.concatenate(pc), np.concatenate(ps)
    first, last = slice(0, 500), slice(len(y) - 1000, len(y))
    assert auc(y[first], c[first]) < before - 0.05  # the shift hurt both
    assert auc(y[last], c[last]) > 0.72  # the continual learner recovered within the stream
    assert auc(y[last], s[last]) < 0.62  # the static model did not


def test_the_history_cosines_weight_starts_at_history_scale_and_learns_at_lr_scale(world) -> None:
    catalog, examples, _ = world
    moved = {}
    for lr in (0.0, 1e-3, 0.1):
        model = build_model(tiny_model(catalog, history_scale=4.0))
        assert float(model.click_head.scale().detach()) == pytest.approx(4.0)
        learner = ContinualLearner(model, LearnerConfig(device="cpu", lr_scale=lr), catalog)
        assert [p for g in learner.optimizer.param_groups if g["name"].startswith("scale") for p in g["params"]] == [
            model.click_head.log_scale
        ]
        for batch in iter_batches(examples[:300], 100):
            learner.step(batch)
        moved[lr] = abs(float(model.click_head.scale().detach()) - 4.0)
    assert moved[0.0] == 0.0 and 0.0 < moved[1e-3] < moved[0.1]


def test_the_position_term_takes_what_the_position_explains_out_of_the_relevance(world) -> None:
    """Clicks that only the position drives (favoured items mostly on top, as an old policy would put
    them; some exploration moves every item) are learned as position by the train-time position term,
    and as relevance of the favoured items without it."""
    catalog, examples, _ = world
    rng = np.random.default_rng(0)
    items = sorted({e.item_id for e in examples})
    favoured = set(items[::2])
    logged = []
    for e in examples[:900]:
        top = rng.random() < (0.8 if e.item_id in favoured else 0.1)
        pos = 0 if top else 1 + int(rng.integers(4))
        logged.append(e.model_copy(update={"position": pos, "label": int(rng.random() < (0.6 if pos == 0 else 0.05))}))
    gaps, bias = {}, None
    for slots in (0, 5):
        model = build_model(tiny_model(catalog, position_slots=slots))
        learner = ContinualLearner(model, LearnerConfig(device="cpu", dedup_window=0, replay_size=0), catalog)
        for _ in range(4):
            for batch in iter_batches(logged, 100):
                learner.step(batch)
        probs, kept = learner.predict(examples[900:1100])
        fav = np.array([examples[900 + i].item_id in favoured for i in kept])
        logits = np.log(probs / (1.0 - probs))  # (with the term, scores sit at the top position's level)
        gaps[slots] = float(logits[fav].mean() - logits[~fav].mean())
        if slots:
            # a score is the click probability at the top of the slate (0.6 there, ~0.3 over all)
            assert 0.45 < float(probs.mean()) < 0.75
            bias = model.position_bias.weight.detach().numpy()[:, 0]
            assert any(p is model.position_bias.weight for g in learner.id_optimizer.param_groups for p in g["params"])
        else:
            assert model.position_bias is None
    assert gaps[0] > 1.0  # without it the favoured items look relevant (logit gap)
    assert abs(gaps[5]) < 0.5 * gaps[0]  # 0.49 against 1.53 when written
    assert bias[0] > bias[1] + 1.0  # position 0 carries the clicks


def test_the_per_user_posterior_is_fitted_scored_and_checkpointed(world) -> None:
    catalog, examples, _ = world
    model = build_model(tiny_model(catalog))
    learner = ContinualLearner(model, LearnerConfig(device="cpu", posterior_change_hazard=0.01), catalog)
    assert learner.user_posterior is not None and model.posterior_width > 0
    for batch in iter_batches(examples[:400], 100):
        stats = learner.step(batch)
    assert learner.user_posterior.updates == 4
    # the step reports what the trainer exports as gauges
    assert stats["posterior_users"] == len(learner.user_posterior.rows) > 0
    assert stats["posterior_changes"] == learner.user_posterior.changes > 0
    assert stats["item_bias_prior_std"] in learner.config.item_bias_prior_stds
    assert model.user_posterior_mean.abs().sum() > 0  # users seen have weights
    assert model.posterior_basis.abs().sum() > 0  # the text directions were set when the text was centred
    probe = examples[400:500]
    with_posterior, _ = learner.predict(probe)
    saved = model.user_posterior_mean.clone()
    model.user_posterior_mean.zero_()
    without, _ = learner.predict(probe)
    assert not np.allclose(with_posterior, without)  # the score reads the posterior
    model.user_posterior_mean.copy_(saved)
    again = ContinualLearner(build_model(tiny_model(catalog)), LearnerConfig(device="cpu", posterior_change_hazard=0.01), catalog)
    again.load_state_dict(copy.deepcopy(learner.state_dict()))  # (as from a file: nothing shared)
    assert again.user_posterior.changes == learner.user_posterior.changes
    torch.testing.assert_close(again.model.user_posterior_mean, model.user_posterior_mean)
    torch.testing.assert_close(again.user_posterior.precision, learner.user_posterior.precision)
    learner.step(examples[500:600])
    again.step(examples[500:600])
    torch.testing.assert_close(again.model.user_posterior_mean, model.user_posterior_mean)


def test_a_checkpoint_of_adagrad_item_biases_does_not_resume_a_posterior_learner(world) -> None:
    catalog, examples, _ = world
    adagrad = ContinualLearner(
        build_model(tiny_model(catalog)), LearnerConfig(device="cpu", item_bias_prior_stds=()), catalog
    )
    adagrad.step(examples[:50])
    posterior = ContinualLearner(build_model(tiny_model(catalog)), LearnerConfig(device="cpu"), catalog)
    with pytest.raises(LearnerError, match="item_bias_prior_stds"):
        posterior.load_state_dict(adagrad.state_dict())
