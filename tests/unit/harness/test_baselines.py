"""Baselines of the offline evaluation, the AUC standard errors, and their rows in the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from contract.records import Item, Labeled, example_id
from harness import evaluate as ev
from harness.baselines import (
    GaussianOracle,
    ItemCTR,
    KnownGenerator,
    LearnableOracle,
    LogisticMF,
    RiverLR,
    UserCategoryCTR,
    bootstrap_auc,
    hanley_mcneil_se,
    make_baseline,
    river_version,
)
from trainer.metrics import auc, delong_se

T0 = 1_700_000_000_000


def _items(n: int, cats: dict[int, list[str]] | None = None) -> list[Item]:
    cats = cats or {}
    return [Item(item_id=f"i{k}", text=f"item {k}", categories=cats.get(k, []), ts=T0) for k in range(n)]


def _ex(n: int, user: str, item: str, label: int, *, late: bool = False) -> Labeled:
    imp = f"imp{n}"
    return Labeled(
        example_id=example_id(imp, item), impression_id=imp, user_id=user, item_id=item, position=0,
        label=label, impression_ts=T0 + n, label_ts=T0 + n, ts=T0 + n, late=late,
    )


def _feed(model, batches) -> None:  # noqa: ANN001
    for batch in batches:
        model.predict(batch)
        model.learn(batch)


def test_item_ctr_ranks_a_popular_item_above_an_unpopular_one() -> None:
    rng = np.random.default_rng(0)
    model = ItemCTR(_items(3))
    n = 0
    batches = []
    for _ in range(5):
        batch = []
        for _ in range(40):
            batch.append(_ex(n, f"u{n % 7}", "i0", int(rng.random() < 0.6)))
            batch.append(_ex(n + 1, f"u{n % 7}", "i1", int(rng.random() < 0.05)))
            n += 2
        batches.append(batch)
    _feed(model, batches)
    p = model.predict([_ex(10_000, "u1", "i0", 0), _ex(10_001, "u1", "i1", 0), _ex(10_002, "u1", "i2", 0)])
    assert p[0] > p[2] > p[1]  # the unseen item sits at the global rate, between the two
    assert 0.4 < p[0] < 0.8 and p[1] < 0.15


def test_count_baselines_turn_a_late_positive_into_a_click_not_a_second_show() -> None:
    model = ItemCTR(_items(1), strength=1e-9)
    model.learn([_ex(0, "u", "i0", 0), _ex(1, "u", "i0", 0)])
    model.learn([_ex(0, "u", "i0", 1, late=True)])
    assert model.predict([_ex(2, "u", "i0", 0)])[0] == pytest.approx(0.5)


def test_user_category_ctr_learns_the_users_category_and_follows_a_change() -> None:
    items = _items(4, {0: ["a"], 1: ["a"], 2: ["b"], 3: ["b"]})
    model = UserCategoryCTR(items, half_life=20)
    likes = {"u0": "a", "u1": "b"}
    cat = {"i0": "a", "i1": "a", "i2": "b", "i3": "b"}

    def batch(start: int, likes: dict[str, str]) -> list[Labeled]:
        return [
            _ex(start + 10 * k + j, u, f"i{j}", int(cat[f"i{j}"] == likes[u]))
            for k, u in enumerate(["u0", "u1"] * 5)
            for j in range(4)
        ]

    _feed(model, [batch(100 * b, likes) for b in range(4)])
    p = model.predict([_ex(9000, "u0", "i1", 0), _ex(9001, "u0", "i3", 0), _ex(9002, "u1", "i3", 0)])
    assert p[0] > 0.8 and p[1] < 0.2 and p[2] > 0.8
    _feed(model, [batch(1000 + 100 * b, {"u0": "b", "u1": "b"}) for b in range(6)])  # u0 now likes b
    p = model.predict([_ex(9003, "u0", "i1", 0), _ex(9004, "u0", "i3", 0)])
    assert p[1] > p[0]


def test_mf_learns_a_user_item_preference() -> None:
    """Two user groups with opposite tastes on the same items: only an interaction model separates them."""
    items = _items(20)
    model = LogisticMF(items, k=16, seed=0)
    rng = np.random.default_rng(1)

    def likes(u: int, i: int) -> bool:
        return (u % 2 == 0) == (i < 10)

    n = 0
    for _ in range(60):
        batch = []
        for _ in range(128):
            u, i = int(rng.integers(20)), int(rng.integers(20))
            batch.append(_ex(n, f"u{u}", f"i{i}", int(rng.random() < (0.8 if likes(u, i) else 0.1))))
            n += 1
        model.predict(batch)
        model.learn(batch)
    test = [_ex(10**6 + 20 * u + i, f"u{u}", f"i{i}", int(likes(u, i))) for u in range(20) for i in range(20)]
    p = model.predict(test)
    assert auc([e.label for e in test], p) > 0.95


@pytest.mark.skipif(river_version() is None, reason="river is not installed")
def test_river_lr_learns_item_popularity() -> None:
    model = RiverLR(_items(2, {0: ["x"], 1: ["y"]}))
    rng = np.random.default_rng(2)
    _feed(model, [[_ex(100 * b + k, f"u{k % 5}", f"i{k % 2}", int(rng.random() < (0.7 if k % 2 == 0 else 0.05))) for k in range(100)] for b in range(20)])
    p = model.predict([_ex(10**6, "u1", "i0", 0), _ex(10**6 + 1, "u1", "i1", 0)])
    assert p[0] > p[1] + 0.2


# --------------------------------------------------------------------------- standard errors
def _exponential_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Negatives ~ Exp(1), positives ~ Exp(1/3): AUC = 3/4, and Hanley-McNeil is exact for this law."""
    rng = np.random.default_rng(seed)
    s = np.r_[rng.exponential(3.0, n), rng.exponential(1.0, n)]
    y = np.r_[np.ones(n), np.zeros(n)]
    return y, s


def test_delong_se_agrees_with_hanley_mcneil_and_with_the_spread_over_samples() -> None:
    y, s = _exponential_scores(2000, 0)
    a = auc(y, s)
    assert a == pytest.approx(0.75, abs=0.02)
    se = delong_se(y, s)
    assert se == pytest.approx(hanley_mcneil_se(a, 2000, 2000), rel=0.1)
    spread = np.std([auc(*_exponential_scores(2000, seed)) for seed in range(1, 41)], ddof=1)
    assert se == pytest.approx(spread, rel=0.35)


def test_se_shrinks_with_n() -> None:
    small = delong_se(*_exponential_scores(500, 3))
    large = delong_se(*_exponential_scores(8000, 3))
    assert large == pytest.approx(small / 4, rel=0.25)  # 1 / sqrt(n)
    yb, sb = _exponential_scores(500, 3)
    yl, sl = _exponential_scores(8000, 3)
    b_small = np.std(bootstrap_auc(yb, sb, np.arange(len(yb)), resamples=200), ddof=1)
    b_large = np.std(bootstrap_auc(yl, sl, np.arange(len(yl)), resamples=200), ddof=1)
    assert b_large < b_small / 2.5


def test_bootstrap_matches_delong_on_independent_examples_and_is_wider_on_clustered_ones() -> None:
    y, s = _exponential_scores(1500, 4)
    reps = bootstrap_auc(y, s, np.arange(len(y)), resamples=300, seed=0)
    assert np.mean(reps) == pytest.approx(auc(y, s), abs=0.01)
    assert np.std(reps, ddof=1) == pytest.approx(delong_se(y, s), rel=0.2)
    # every example duplicated in its cluster: the same AUC, but half the independent information
    y2, s2, c2 = np.r_[y, y], np.r_[s, s], np.r_[np.arange(len(y)), np.arange(len(y))]
    reps2 = bootstrap_auc(y2, s2, c2, resamples=300, seed=0)
    assert np.std(reps2, ddof=1) == pytest.approx(np.std(reps, ddof=1), rel=0.2)
    assert delong_se(y2, s2) < 0.8 * np.std(reps2, ddof=1)  # DeLong believes it has twice the data


def test_bootstrap_handles_ties_like_the_auc() -> None:
    y = np.array([1, 0, 1, 0, 1, 0, 0, 1])
    s = np.array([0.5, 0.5, 0.9, 0.1, 0.5, 0.3, 0.5, 0.7])
    reps = bootstrap_auc(y, s, np.arange(8), resamples=2000, seed=1)
    assert np.nanmean(reps) == pytest.approx(auc(y, s), abs=0.03)
    assert math.isnan(bootstrap_auc(np.ones(3), np.arange(3.0), np.arange(3), resamples=2)[0])


# --------------------------------------------------------------------------- the oracle on a synthetic stream
@pytest.fixture(scope="module")
def small_synthetic() -> tuple[ev.Replay, list[Labeled], list[Labeled], list[int]]:
    replay = ev.load_synthetic(events=600, seed=5, history_length=5, users=20)
    bounds = ev._period_bounds(replay.examples, 2)
    stream, held = ev._holdout(replay.examples, bounds[0], 0.1)
    return replay, stream, held, bounds


def test_learnable_oracle_beats_chance_and_stays_below_the_truth(small_synthetic) -> None:
    replay, stream, held, bounds = small_synthetic
    r = ev.run_baseline("oracle", replay, stream, held, bounds, ev.EvalSettings(batch_size=100))
    a = auc(r.labels, r.probs)
    best = replay.truth([stream[k] for k in r.index])
    assert 0.6 < a < best + 0.02
    assert r.kind == "reference" and r.trained_examples == len(stream)


def test_oracle_is_prequential_a_batch_is_scored_before_it_is_learned(small_synthetic) -> None:
    replay, stream, _, _ = small_synthetic
    oracle = LearnableOracle(replay.generator)
    batch = stream[:50]
    before = oracle.predict(batch)
    assert np.array_equal(oracle.predict(batch), before)  # predicting learns nothing
    oracle.learn(batch)
    assert not np.array_equal(oracle.predict(batch), before)


def test_weaker_oracles_know_the_text_counts_or_only_the_category(small_synthetic) -> None:
    replay, stream, _, _ = small_synthetic
    gen = replay.generator
    text = gen.knowing("text").item_topics
    for i in gen.item_topics:
        assert text[i].sum() == pytest.approx(1.0) and np.all(text[i] * 12 == np.round(text[i] * 12))  # 12 words
    agree = np.mean([np.argmax(text[i]) == np.argmax(phi) for i, phi in gen.item_topics.items()])
    assert agree > 0.8  # the words mostly come from the dominant topic
    cat = gen.knowing("category").item_topics
    assert all(cat[i].sum() == 1.0 and cat[i][np.argmax(phi)] == 1.0 for i, phi in gen.item_topics.items())
    with pytest.raises(ValueError, match="text topic shares"):
        KnownGenerator(gen.item_topics, gen.sharpness, gen.bias, gen.user_concentration).knowing("text")
    # knowing only the category, two items of one category score the same for a user, before and after learning
    oracle = make_baseline("oracle-category", replay.items, gen)
    assert oracle.name == "oracle-category"
    oracle.learn(stream[:200])
    by_cat: dict[int, list[str]] = {}
    for i, phi in gen.item_topics.items():
        by_cat.setdefault(int(np.argmax(phi)), []).append(i)
    a, b = next(v for v in by_cat.values() if len(v) >= 2)[:2]
    probe = [stream[0].model_copy(update={"item_id": a}), stream[0].model_copy(update={"item_id": b})]
    p = oracle.predict(probe)
    assert p[0] == pytest.approx(p[1])
    r = ev.run_baseline("oracle-text", replay, stream, [], ev._period_bounds(stream, 2), ev.EvalSettings(batch_size=100))
    assert r.kind == "reference" and auc(r.labels, r.probs) > 0.55


def test_gaussian_oracle_starts_at_the_priors_moments_and_takes_a_laplace_step(small_synthetic) -> None:
    replay, stream, held, bounds = small_synthetic
    gen = replay.generator
    oracle = make_baseline("oracle-gauss", replay.items, gen)
    assert isinstance(oracle, GaussianOracle) and oracle.name == "oracle-gauss"
    k = len(next(iter(gen.item_topics.values())))
    np.testing.assert_allclose(oracle.prior_mean, np.full(k, gen.sharpness / k))
    # one example, one Newton step from the prior, by hand (no change point)
    one = GaussianOracle(gen.knowing("text"), hazard=0.0, newton_steps=1)
    ex = stream[0].model_copy(update={"label": 1})
    z = gen.knowing("text").item_topics[ex.item_id]
    p0 = 1.0 / (1.0 + np.exp(-(z @ one.prior_mean + gen.bias)))
    hess = one.prior_precision + p0 * (1 - p0) * np.outer(z, z)
    before = one.predict([ex])
    one.learn([ex])
    np.testing.assert_allclose(one.mean[0], one.prior_mean + np.linalg.solve(hess, z * (1 - p0)), rtol=1e-8)
    assert one.predict([ex])[0] > before[0]  # a click raises the item's score
    r = ev.run_baseline("oracle-gauss", replay, stream, held, bounds, ev.EvalSettings(batch_size=100))
    assert r.kind == "reference" and auc(r.labels, r.probs) > 0.6


def test_baselines_score_the_same_examples_as_the_learner_would(small_synthetic) -> None:
    replay, stream, held, bounds = small_synthetic
    settings = ev.EvalSettings(batch_size=100)
    rows = [ev.run_baseline(n, replay, stream, held, bounds, settings) for n in ("item-ctr", "user-cat-ctr", "mf-16")]
    non_late = [k for k, e in enumerate(stream) if not e.late]
    for r in rows:
        assert r.index.tolist() == non_late
        assert r.batch.tolist() == [k // 100 for k in non_late]
        assert ((r.probs > 0) & (r.probs < 1)).all()
    summary = ev.summarize(replay, rows, bounds, stream)
    for name in ("item-ctr", "user-cat-ctr", "mf-16"):
        s = summary["baselines"][name]
        assert 0 < s["auc_se"] < 0.1 and 0 < s["auc_se_delong"] < 0.1
        assert len(s["auc_per_period"]) == 2


def test_cli_prints_baselines_with_ses_and_recovery(tmp_path, capsys) -> None:
    js = tmp_path / "summary.json"
    rc = ev.main([
        "--dataset", "synthetic", "--events", "300", "--users", "20", "--periods", "2", "--batch-size", "100",
        "--strategies", "", "--baselines", "item-ctr,oracle", "--out", str(tmp_path / "p.png"), "--json", str(js),
    ])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("-- baselines", "item-ctr", "-- references", "oracle", "best", "SE", "bootstrap", "recovery"):
        assert word in text
    summary = json.loads(js.read_text())
    assert set(summary["baselines"]) == {"item-ctr", "oracle"}
    assert summary["baselines"]["oracle"]["kind"] == "reference"
    assert "recovery_batches" in summary["baselines"]["item-ctr"]
    assert summary["baselines"]["item-ctr"]["auc_se"] > 0
    assert summary["diff_to"] == "item-ctr"  # no 'default' row: differences to the first row
    oracle = summary["baselines"]["oracle"]
    assert oracle["auc_diff"] == pytest.approx(oracle["auc"] - summary["baselines"]["item-ctr"]["auc"])
    assert 0 < oracle["auc_diff_se"] < 0.2


def test_cli_rejects_unknown_baselines_and_the_oracle_off_synthetic() -> None:
    with pytest.raises(SystemExit):
        ev.main(["--dataset", "synthetic", "--events", "50", "--strategies", "", "--baselines", "nope"])
    replay = ev.Replay(name="x", items=[], examples=[])
    with pytest.raises(ValueError, match="synthetic"):
        ev.baseline_names("oracle", replay)
    with pytest.raises(ValueError, match="synthetic"):
        ev.baseline_names("oracle-text", replay)
    assert not {"oracle", "oracle-text", "oracle-category"} & set(ev.baseline_names("all", replay))
    assert ev.baseline_names("none", replay) == []


@pytest.mark.parametrize(("limit", "expected"), [(0, None), (20_000, 20_000)])
def test_movielens_limit_zero_means_all_ratings(monkeypatch, limit, expected) -> None:
    import infra.assets
    from streams.replay import movielens

    seen = {}

    class Stop(Exception):
        pass

    def from_path(path, config):  # noqa: ANN001, ANN202
        seen["limit"] = config.limit
        raise Stop

    monkeypatch.setattr(infra.assets, "movielens_path", lambda: "unused")
    monkeypatch.setattr(movielens.MovieLensReplay, "from_path", staticmethod(from_path))
    with pytest.raises(Stop):
        ev.load_movielens(limit=limit, slate_size=5, seed=0, history_length=5)
    assert seen["limit"] == expected


def test_forgetting_is_also_measured_on_the_users_whose_interests_did_not_shift() -> None:
    """The held-out examples of a shifted user describe interests that are no longer true; the stable
    users' examples are where forgetting means losing what still holds."""
    replay = ev.load_synthetic(events=600, seed=5, history_length=5, users=20, shift_fraction=0.5)
    assert replay.stable_users is not None and len(replay.stable_users) == 10
    bounds = ev._period_bounds(replay.examples, 2)
    stream, held = ev._holdout(replay.examples, bounds[0], 0.1)
    stable = ev._stable_held(replay, held)
    assert stable and all(e.user_id in replay.stable_users for e in stable) and len(stable) < len(held)
    settings = ev.EvalSettings(batch_size=100)
    r = ev.run_baseline("user-cat-ctr", replay, stream, held, bounds, settings)
    assert 0 < r.early_auc_after_first_stable < 1 and 0 < r.early_auc_end_stable < 1
    summary = ev.summarize(replay, [r], bounds, stream)
    row = summary["baselines"]["user-cat-ctr"]
    assert row["forgetting_stable"] == pytest.approx(r.early_auc_after_first_stable - r.early_auc_end_stable)
    assert "stable P1" in ev.format_table(summary)
    # nobody shifts: the stable users' slice is the whole slice
    still = ev.load_synthetic(events=600, seed=5, history_length=5, users=20, shift_fraction=0.0)
    same = ev.run_baseline("user-cat-ctr", still, stream, held, bounds, settings)
    assert same.early_auc_end_stable == same.early_auc_end and same.early_auc_after_first_stable == same.early_auc_after_first
    # everybody shifts (the evaluation's default): no stable slice, and the table has no such columns
    everyone = ev.load_synthetic(events=600, seed=5, history_length=5, users=20, shift_fraction=1.0)
    assert everyone.stable_users == frozenset() and ev._stable_held(everyone, held) == []
    r = ev.run_baseline("user-cat-ctr", everyone, stream, held, bounds, settings)
    assert math.isnan(r.early_auc_end_stable)
    assert "stable P1" not in ev.format_table(ev.summarize(everyone, [r], bounds, stream))
