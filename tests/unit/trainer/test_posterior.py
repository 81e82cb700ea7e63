"""The per-user posterior (trainer/posterior.py): the Newton step by hand, late positives, forgetting,
empirical Bayes, checkpoints, and a learner that takes a user's taste from a few labels."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.posterior import ItemBiasPosterior, PosteriorExamples, UserPosterior


def _posterior(k: int = 2, buckets: int = 8, **kw: object) -> UserPosterior:
    opts = {"prior_std": 1.0, "forgetting": 1.0, "newton_steps": 1} | kw
    return UserPosterior(torch.zeros(buckets, k), **opts)  # type: ignore[arg-type]


def _examples(rows, z, y, *, late=None, offsets=None) -> PosteriorExamples:  # noqa: ANN001
    n = len(rows)
    return PosteriorExamples(
        rows=torch.tensor(rows),
        features=torch.tensor(z, dtype=torch.float32),
        offsets=torch.zeros(n) if offsets is None else torch.tensor(offsets, dtype=torch.float32),
        labels=torch.tensor(y, dtype=torch.float32),
        late=torch.zeros(n, dtype=torch.bool) if late is None else torch.tensor(late),
        weights=torch.ones(n),
        item_rows=torch.zeros(n, dtype=torch.long),
        item_offsets=torch.zeros(n),
    )


def test_one_newton_step_by_hand() -> None:
    post = _posterior()
    post.update(_examples([3], [[1.0, 0.0]], [1]))
    # p = sigmoid(0) = 0.5; gradient 0.5 z; precision I + 0.25 z z': the mean is 0.5 / 1.25 = 0.4
    torch.testing.assert_close(post.mean[3], torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(post.precision[0], torch.tensor([[1.25, 0.0], [0.0, 1.0]]))
    assert post.mean[[0, 1, 2, 4]].abs().sum() == 0  # other users untouched


def test_a_late_positive_corrects_the_label_without_counting_it_twice() -> None:
    post = _posterior()
    post.update(_examples([1], [[1.0, 0.0]], [0]))
    prec = post.precision[0].clone()
    mean = post.mean[1].clone()
    post.update(_examples([1], [[1.0, 0.0]], [1], late=[True]))
    torch.testing.assert_close(post.precision[0], prec)  # no new curvature: the same observation
    # the log-likelihood ratio of the two labels has gradient z: the mean moves by precision^-1 z
    torch.testing.assert_close(post.mean[1], mean + torch.linalg.solve(prec, torch.tensor([1.0, 0.0])))


def test_forgetting_decays_the_evidence_towards_the_prior() -> None:
    post = _posterior(forgetting=0.5)
    post.update(_examples([0], [[1.0, 0.0]], [1]))
    first = post.precision[0, 0, 0].item()  # 1 + 0.25
    post.update(_examples([0], [[0.0, 1.0]], [1]))
    # before the second example the first one's curvature is halved: 1 + 0.5 * 0.25
    assert post.precision[0, 0, 0].item() == pytest.approx(1.0 + 0.5 * (first - 1.0))


def test_a_user_who_clicks_one_category_learns_it_within_a_few_batches() -> None:
    post = _posterior(newton_steps=2)
    for _ in range(5):
        post.update(_examples([2, 2, 2, 2], [[1, 0], [0, 1], [1, 0], [0, 1]], [1, 0, 1, 0], offsets=[-2.0] * 4))
    w = post.mean[2]
    assert w[0] > 1.0 and w[1] < 0.0


def test_empirical_bayes_refits_the_prior_and_keeps_each_users_evidence() -> None:
    post = _posterior(prior_std=0.1)
    for u in range(4):
        for _ in range(3):
            post.update(_examples([u] * 4, [[1.0, 0.0]] * 4, [u % 2] * 4))
    evidence = post.precision - post.prior_matrix
    post.refit_prior()
    assert (1.0 / post.prior_precision[0]) > 0.1**2  # the users' weights on feature 0 spread wider than the prior
    torch.testing.assert_close(post.precision - post.prior_matrix, evidence)


def test_a_full_prior_learns_that_two_weights_go_together() -> None:
    """Users who like feature 0 like feature 1 and the others like neither: the full prior's
    refit keeps that correlation, so a new user's clicks on feature 0 alone raise its weight
    on feature 1; the diagonal prior learns nothing about feature 1 from them."""
    def run(full: bool) -> UserPosterior:
        post = _posterior(buckets=16, prior_std=0.3, full_prior=full, newton_steps=2)
        for u in range(12):
            for _ in range(4):
                post.update(_examples([u] * 4, [[1.0, 0.0], [0.0, 1.0]] * 2, [u % 2] * 4))
        post.refit_prior()
        post.update(_examples([15] * 4, [[1.0, 0.0]] * 4, [1] * 4))
        return post

    full, diagonal = run(True), run(False)
    assert full.prior_matrix[0, 1] < 0.0  # a positive correlation of the two weights
    assert full.mean[15, 1] > 0.1
    assert abs(float(diagonal.mean[15, 1])) < 1e-6


def test_a_change_of_taste_restarts_the_posterior_and_a_steady_taste_does_not() -> None:
    def run(hazard: float) -> tuple[UserPosterior, float]:
        post = _posterior(newton_steps=2, change_hazard=hazard)
        likes_first = _examples([0] * 4, [[1, 0], [0, 1]] * 2, [1, 0] * 2, offsets=[-1.0] * 4)
        for _ in range(20):
            post.update(likes_first)
        steady = post.changes
        likes_second = _examples([0] * 4, [[1, 0], [0, 1]] * 2, [0, 1] * 2, offsets=[-1.0] * 4)
        for _ in range(3):
            post.update(likes_second)
        return post, steady

    forgets, steady = run(0.01)
    keeps, _ = run(0.0)
    assert steady < 0.5  # twenty batches of one taste: no restart
    assert forgets.changes > steady + 0.5  # the switch is detected
    # three batches after the switch, the restarted posterior has followed it; the other still lags
    assert forgets.mean[0, 1] > forgets.mean[0, 0]
    assert keeps.mean[0, 1] < keeps.mean[0, 0]


def test_the_change_hazard_is_per_update_whatever_the_users_examples_in_it() -> None:
    # a batch the posterior and the prior predict equally well (zero features): r is the prior's
    # hazard, for one example as for 64; per example, 64 would have given 1 - 0.99^64 = 0.47
    for n in (1, 64):
        post = _posterior(change_hazard=0.01)
        post.update(_examples([0] * n, [[0.0, 0.0]] * n, [1, 0] * (n // 2) or [1]))
        assert post.changes == pytest.approx(0.01, rel=1e-3)
    # late positives alone are no new visit: no change point at all
    post = _posterior(change_hazard=0.01)
    post.update(_examples([0], [[1.0, 0.0]], [1], late=[True]))
    assert post.changes < 1e-9


def test_a_thompson_draw_has_the_posteriors_mean_and_covariance() -> None:
    post = _posterior(prior_std=0.5)
    post.update(_examples([3, 3, 3], [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], [1, 0, 1]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([post.sample(3, generator=gen) for _ in range(20_000)])
    torch.testing.assert_close(draws.mean(0), post.mean[3], atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), torch.linalg.inv(post.precision[0]), atol=0.005, rtol=0)
    # a user not seen yet: the prior's spread around its (zero) mean; scale 0 is the mean itself
    new = torch.stack([post.sample(5, generator=gen) for _ in range(20_000)])
    torch.testing.assert_close(new.std(0), torch.tensor([0.5, 0.5]), atol=0.01, rtol=0)
    torch.testing.assert_close(post.sample(3, scale=0.0), post.mean[3])


def test_state_round_trips() -> None:
    post = _posterior(refit_every=1)
    post.update(_examples([5, 6], [[1.0, 0.5], [0.2, 1.0]], [1, 0]))
    again = _posterior(refit_every=1)
    again.mean.copy_(post.mean)
    again.load_state_dict(post.state_dict())
    post.update(_examples([6], [[1.0, 1.0]], [1]))
    again.update(_examples([6], [[1.0, 1.0]], [1]))
    torch.testing.assert_close(again.mean, post.mean)
    torch.testing.assert_close(again.precision, post.precision)
    with pytest.raises(ValueError):
        _posterior(k=3).load_state_dict(post.state_dict())


def test_examples_concatenate_in_order() -> None:
    a = _examples([1], [[1.0, 0.0]], [1])
    both = PosteriorExamples.concat([a, PosteriorExamples.empty(2), _examples([2], [[0.0, 1.0]], [0])])
    assert both.rows.tolist() == [1, 2] and both.features.shape == (2, 2)


# --------------------------------------------------------------------------- the item biases' posterior
def _item_examples(items, y, *, offsets=None, late=None) -> PosteriorExamples:  # noqa: ANN001
    n = len(items)
    base = _examples([0] * n, [[0.0]] * n, y, late=late)
    off = torch.zeros(n) if offsets is None else torch.as_tensor(offsets, dtype=torch.float32)
    return base._replace(item_rows=torch.tensor(items), item_offsets=off)


def test_an_item_bias_newton_step_by_hand_written_into_the_model() -> None:
    bias = torch.zeros(6, 1)
    post = ItemBiasPosterior(bias, prior_stds=[1.0, 0.5], newton_steps=1)
    post.update(_item_examples([2], [1]))
    # p = 0.5: mean 0.5 / (1/s^2 + 0.25): 0.4 under std 1, 0.5 / 4.25 under std 0.5
    torch.testing.assert_close(torch.stack([g.mean[2, 0] for g in post.grid]), torch.tensor([0.4, 0.5 / 4.25]))
    torch.testing.assert_close(torch.stack([g.precision[0, 0, 0] for g in post.grid]), torch.tensor([1.25, 4.25]))
    # both priors predicted the label at p = 0.5: a tie goes to the first
    assert post.chosen == 0 and bias[2, 0] == pytest.approx(0.4) and bias[[0, 1, 3, 4, 5]].abs().sum() == 0
    post.update(_item_examples([2], [0], late=[True]))  # a late positive: gradient 1, no curvature
    assert post.grid[0].precision[0, 0, 0] == pytest.approx(1.25)


@pytest.mark.parametrize("spread, chosen", [(0.0, 0.03), (2.0, 3.0)])
def test_the_evidence_picks_the_prior_that_fits_how_much_items_differ(spread: float, chosen: float) -> None:
    """Items that differ (popularity) need a wide prior; items that do not, a narrow one: the
    prequential evidence of each prior tells them apart on the labels alone."""
    gen = torch.Generator().manual_seed(0)
    true = spread * torch.randn(40, generator=gen)
    bias = torch.zeros(40, 1)
    post = ItemBiasPosterior(bias, prior_stds=[0.03, 0.3, 3.0])
    for _ in range(40):
        items = torch.randint(0, 40, (200,), generator=gen)
        y = torch.bernoulli(torch.sigmoid(-2.0 + true[items]), generator=gen)
        post.update(_item_examples(items.tolist(), y.tolist(), offsets=[-2.0] * 200))
    assert post.prior_stds[post.chosen] == chosen
    if spread:
        assert torch.corrcoef(torch.stack([bias[:, 0], true]))[0, 1] > 0.9


def test_item_bias_forgetting_decays_precision_towards_the_prior() -> None:
    post = ItemBiasPosterior(torch.zeros(3, 1), prior_stds=[1.0], forgetting=0.5, newton_steps=1)
    post.update(_item_examples([1, 1], [0, 0]))
    one = post.grid[0]
    first, m = float(one.precision[0, 0, 0]), float(one.mean[1, 0])
    assert first == pytest.approx(1.5)  # the prior's 1 + 2 x 0.25
    post.update(_item_examples([1, 1], [0, 0]))
    # two shown examples: f = 0.5^2 of the old precision, 0.75 of the prior's, then the curvature at m
    q = 1.0 / (1.0 + math.exp(-m))
    assert float(one.precision[0, 0, 0]) == pytest.approx(0.25 * first + 0.75 + 2 * q * (1 - q), rel=1e-5)


def test_item_bias_checkpoint_round_trip_and_refuses_another_grid() -> None:
    bias = torch.zeros(5, 1)
    post = ItemBiasPosterior(bias, prior_stds=[0.1, 1.0])
    post.update(_item_examples([0, 1, 1, 3], [1, 0, 1, 0]))
    again_bias = torch.zeros(5, 1)
    again = ItemBiasPosterior(again_bias, prior_stds=[0.1, 1.0])
    again.load_state_dict(post.state_dict())
    for a, b in zip(again.grid, post.grid, strict=True):
        torch.testing.assert_close(a.mean, b.mean)
        torch.testing.assert_close(a.precision, b.precision)
    torch.testing.assert_close(again_bias, bias)
    assert again.chosen == post.chosen and again.updates == 1
    with pytest.raises(ValueError, match="does not fit"):
        ItemBiasPosterior(torch.zeros(5, 1), prior_stds=[0.1]).load_state_dict(post.state_dict())
