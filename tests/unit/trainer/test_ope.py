"""trainer.ope: hand-computed values on a tiny log, Open Bandit Pipeline as the reference on
random logs (when it is installed: the dev extra), and interval coverage over seeded trials."""

from __future__ import annotations

import math

import numpy as np
import pytest

from contract.records import Labeled, example_id
from trainer import ope
from trainer.ope import Logged, OPEError, Target

# --- a tiny log, by hand ------------------------------------------------------------------------
# impression A: a (p .5, click), b (p .5);  B: c (p .25), a (p .5, click);  C: a (p .5), c (p 1, click)
IMP = np.array(["A", "A", "B", "B", "C", "C"], dtype=object)
POS = np.array([0, 1, 0, 1, 0, 1])
ITEM = np.array(["a", "b", "c", "a", "a", "c"], dtype=object)
PROP = np.array([0.5, 0.5, 0.25, 0.5, 0.5, 1.0])
CLICK = np.array([1, 0, 0, 1, 0, 1])
Q = {"a": 0.4, "b": 0.1, "c": 0.2}  # a reward model, the same for every context


def tiny(mode: ope.Mode = "conditional") -> Logged:
    return Logged(IMP, POS, PROP, CLICK, mode)


def ranking_target(logged_items: np.ndarray, positions: np.ndarray, ranking: list[str]) -> Target:
    chosen = [ranking[j] if j < len(ranking) else None for j in positions]
    return ope.deterministic(logged_items, chosen, [Q[i] for i in logged_items],
                             [Q[c] if c else 0.0 for c in chosen])


def test_top1_by_hand() -> None:
    log = tiny().top(1)  # rows A:a (w 2, click), B:c (w 0), C:a (w 2, no click)
    keep = POS == 0
    target = ranking_target(ITEM[keep], POS[keep], ["a"])
    est = ope.ips(log, target)
    assert est.value == pytest.approx(2 / 3)
    # psi = (4/3, -2/3, -2/3), one impression each: se = sqrt(3/2 * 24/9) / 3 = 2/3
    assert est.se == pytest.approx(2 / 3)
    assert (est.lower, est.upper) == pytest.approx((2 / 3 - 1.959964 * 2 / 3, 2 / 3 + 1.959964 * 2 / 3), abs=1e-5)
    assert (est.rows, est.impressions, est.matched) == (3, 3, 2)
    assert est.ess == pytest.approx(2.0)
    sn = ope.snips(log, target)
    assert sn.value == pytest.approx(0.5)  # 2 / (2 + 0 + 2)
    # psi = w (y - .5) / mean(w) = (.75, 0, -.75): se = sqrt(3/2 * 1.125) / 3
    assert sn.se == pytest.approx(math.sqrt(1.5 * 1.125) / 3)
    d = ope.dr(log, target)
    # (0.4 + 2 * 0.6) + (0.4 + 0) + (0.4 + 2 * -0.4), over 3
    assert d.value == pytest.approx((1.6 + 0.4 - 0.4) / 3)
    clipped = ope.ips(log, target, clip=1.5)
    assert clipped.value == pytest.approx(1.5 / 3)


def test_top2_cascade_and_marginal_by_hand() -> None:
    target = ranking_target(ITEM, POS, ["a", "c"])
    # conditional: A (a ok: 2; b != c: 0), B (c != a: 0, 0), C (a: 2; c ok, 1/1: 2) -> (2 + 2) / 6
    w, w_prev = ope.weights(tiny("conditional"), target)
    assert list(w) == [2, 0, 0, 0, 2, 2] and list(w_prev) == [1, 2, 1, 0, 1, 2]
    assert ope.ips(tiny("conditional"), target).value == pytest.approx(4 / 6)
    # marginal: the same numbers read as marginals; B's slot 1 is a, not c: (2 + 1) / 6
    w, w_prev = ope.weights(tiny("marginal"), target)
    assert list(w) == [2, 0, 0, 0, 2, 1] and list(w_prev) == [1] * 6
    assert ope.ips(tiny("marginal"), target).value == pytest.approx(3 / 6)
    # SNIPS per position: position 0: 2/4; position 1 (cascade): 2/2
    assert ope.snips(tiny("conditional"), target).value == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    # cascade DR: w_prev * dm + w (y - q), rows in order
    terms = [0.4 + 2 * 0.6, 2 * 0.2 + 0, 0.4 + 0, 0 * 0.2 + 0, 0.4 + 2 * -0.4, 2 * 0.2 + 2 * (1 - 0.2)]
    assert ope.dr(tiny("conditional"), target).value == pytest.approx(sum(terms) / 6)
    # the rows' order does not matter
    perm = np.array([5, 2, 0, 3, 1, 4])
    shuffled = Logged(IMP[perm], POS[perm], PROP[perm], CLICK[perm])
    assert ope.dr(shuffled, target.subset(perm)).value == pytest.approx(sum(terms) / 6)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(OPEError, match="propensities"):
        Logged(IMP, POS, np.where(PROP == 1.0, 0.0, PROP), CLICK)
    with pytest.raises(OPEError, match="positions 0..j"):
        Logged(IMP[1:], POS[1:], PROP[1:], CLICK[1:])  # A has slot 1 without slot 0
    Logged(IMP[1:], POS[1:], PROP[1:], CLICK[1:], "marginal")  # fine for marginal propensities
    with pytest.raises(OPEError, match="dr needs"):
        ope.dr(tiny(), Target(np.ones(6)))
    with pytest.raises(OPEError, match=r"\[0, 1\]"):
        ope.ips(tiny(), Target(np.full(6, 2.0)))
    assert math.isnan(ope.snips(tiny().top(1), Target(np.zeros(3))).value)  # no weight at all


def test_from_labeled_keeps_logged_rows_once_and_skips_late() -> None:
    def lab(imp: str, item: str, pos: int, label: int, p: float | None, late: bool = False) -> Labeled:
        return Labeled(example_id=example_id(imp, item), impression_id=imp, user_id="u", item_id=item,
                       position=pos, label=label, impression_ts=1, label_ts=2, ts=2, late=late, propensity=p)

    exs = [lab("i1", "a", 0, 0, 0.5), lab("i1", "a", 0, 1, 0.5, late=True), lab("i1", "b", 1, 0, 0.5),
           lab("i2", "c", 0, 1, None), lab("i3", "d", 0, 1, 0.2), lab("i3", "d", 0, 1, 0.2)]
    logged, rows = ope.from_labeled(exs, k=1)
    assert [r.impression_id for r in rows] == ["i1", "i3"]
    assert list(logged.click) == [0, 1] and list(logged.propensity) == [0.5, 0.2]
    logged2, rows2 = ope.from_labeled(exs, k=2)
    assert len(rows2) == 3 and logged2.impressions == 2


def test_paired_difference_of_a_policy_with_itself_is_zero() -> None:
    log = tiny()
    t = ranking_target(ITEM, POS, ["a", "c"])
    a, b, diff = ope.paired("snips", log, t, t)
    assert a.value == b.value and diff.value == 0.0 and diff.se == 0.0


# --- random logs: Open Bandit Pipeline as the reference ----------------------------------------------
def _pl_slate(scores: np.ndarray, k: int, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    remaining = list(range(len(scores)))
    chosen, props = [], []
    for _ in range(k):
        p = np.exp(scores[remaining] - scores[remaining].max())
        p /= p.sum()
        j = int(rng.choice(len(remaining), p=p))
        chosen.append(remaining.pop(j))
        props.append(float(p[j]))
    return chosen, props


def _pl_conditional(scores: np.ndarray, slate: list[int]) -> list[float]:
    remaining = list(range(len(scores)))
    out = []
    for a in slate:
        p = np.exp(scores[remaining] - scores[remaining].max())
        p /= p.sum()
        out.append(float(p[remaining.index(a)]))
        remaining.remove(a)
    return out


def random_log(n: int = 200, m: int = 6, k: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Plackett-Luce logging and target policies over m candidates per impression (slates of k)."""
    rng = np.random.default_rng(seed)
    q_true = rng.uniform(0.05, 0.6, size=(n, m))
    log_scores = rng.normal(size=(n, m))
    tgt_scores = 2.0 * np.log(q_true) + rng.normal(scale=0.5, size=(n, m))
    rows: dict[str, list] = {k_: [] for k_ in ("imp", "pos", "item", "p", "y", "pt")}
    for i in range(n):
        slate, props = _pl_slate(log_scores[i], k, rng)
        pt = _pl_conditional(tgt_scores[i], slate)
        for j, (a, p) in enumerate(zip(slate, props, strict=True)):
            rows["imp"].append(i)
            rows["pos"].append(j)
            rows["item"].append(a)
            rows["p"].append(p)
            rows["y"].append(float(rng.random() < q_true[i, a]))
            rows["pt"].append(pt[j])
    return {k_: np.asarray(v) for k_, v in rows.items()} | {"q_true": q_true, "n": n, "m": m, "k": k}


def test_matches_obp_top1() -> None:
    """Top-1 (position 0): IPS, SNIPS and DR against obp's IPW, SNIPW and DR on the same rounds."""
    obp = pytest.importorskip("obp.ope")
    rng = np.random.default_rng(1)
    n, m = 300, 5
    action = rng.integers(0, m, size=n)
    pscore = rng.uniform(0.1, 0.9, size=n)
    reward = (rng.random(n) < 0.3).astype(float)
    dist = rng.dirichlet(np.ones(m), size=n)
    q_hat = rng.uniform(0, 1, size=(n, m))
    action_dist = dist[:, :, None]
    log = Logged(np.arange(n), np.zeros(n, dtype=int), pscore, reward)
    target = Target(dist[np.arange(n), action], q_hat[np.arange(n), action], (dist * q_hat).sum(axis=1))
    kw = {"reward": reward, "action": action, "pscore": pscore, "action_dist": action_dist,
          "position": np.zeros(n, dtype=int)}
    assert ope.ips(log, target).value == pytest.approx(obp.InverseProbabilityWeighting().estimate_policy_value(**kw))
    assert ope.snips(log, target).value == pytest.approx(
        obp.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**kw))
    assert ope.dr(log, target).value == pytest.approx(
        obp.DoublyRobust().estimate_policy_value(**kw, estimated_rewards_by_reg_model=q_hat[:, :, None]))


def test_matches_obp_marginal_slates() -> None:
    """Marginal mode over positions: obp's IPW/DR with positions (rounds = rows), SNIPW per
    position, and obp's independent IPS for slates (IIPS, expected clicks per slate = K * V)."""
    obp = pytest.importorskip("obp.ope")
    rng = np.random.default_rng(2)
    n_imp, m, k = 150, 8, 3
    rows = n_imp * k
    imp = np.repeat(np.arange(n_imp), k)
    pos = np.tile(np.arange(k), n_imp)
    action = np.concatenate([rng.choice(m, size=k, replace=False) for _ in range(n_imp)])
    pscore = np.full(rows, 1.0 / m)  # a uniform slate: each item at each position with 1/m
    reward = (rng.random(rows) < 0.25).astype(float)
    dist = rng.dirichlet(np.ones(m), size=(n_imp, k))  # pi(a at j | x)
    action_dist = np.repeat(dist.transpose(0, 2, 1), k, axis=0)  # [rows, m, k]
    q_hat = rng.uniform(0, 1, size=(rows, m, k))
    r = np.arange(rows)
    log = Logged(imp, pos, pscore, reward, "marginal")
    target = Target(action_dist[r, action, pos], q_hat[r, action, pos],
                    (action_dist[r, :, pos] * q_hat[r, :, pos]).sum(axis=1))
    kw = {"reward": reward, "action": action, "pscore": pscore, "action_dist": action_dist, "position": pos}
    assert ope.ips(log, target).value == pytest.approx(obp.InverseProbabilityWeighting().estimate_policy_value(**kw))
    assert ope.dr(log, target).value == pytest.approx(
        obp.DoublyRobust().estimate_policy_value(**kw, estimated_rewards_by_reg_model=q_hat))
    per_pos = [obp.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(
        **{key: v[pos == j] for key, v in kw.items()}) for j in range(k)]
    assert ope.snips(log, target).value == pytest.approx(np.mean(per_pos))
    iips = obp.SlateIndependentIPS(len_list=k).estimate_policy_value(
        slate_id=imp, reward=reward, position=pos, pscore_item_position=pscore,
        evaluation_policy_pscore_item_position=target.prob)
    assert k * ope.ips(log, target).value == pytest.approx(iips)


def test_matches_obp_cascade() -> None:
    """Conditional (serving's) propensities: obp's reward-interaction IPS (RIPS) on cumulative ones."""
    obp = pytest.importorskip("obp.ope")
    d = random_log(n=200, m=6, k=3, seed=3)
    log = Logged(d["imp"], d["pos"], d["p"], d["y"])
    target = Target(d["pt"])
    cum = np.exp(np.log(d["p"]).reshape(-1, 3).cumsum(axis=1)).reshape(-1)
    cum_t = np.exp(np.log(d["pt"]).reshape(-1, 3).cumsum(axis=1)).reshape(-1)
    rips = obp.SlateRewardInteractionIPS(len_list=3).estimate_policy_value(
        slate_id=d["imp"], reward=d["y"], position=d["pos"], pscore_cascade=cum,
        evaluation_policy_pscore_cascade=cum_t)
    assert 3 * ope.ips(log, target).value == pytest.approx(rips)
    w, _ = ope.weights(log, target)
    assert w == pytest.approx(cum_t / cum)


# --- coverage over seeded trials ------------------------------------------------------------------
def _coverage_trial(seed: int, n: int = 400, m: int = 4) -> tuple[float, dict[str, ope.Estimate]]:
    """Uniform top-1 logging over m candidates, a greedy target on noisy truths; (truth, estimates)."""
    rng = np.random.default_rng(seed)
    q_true = rng.uniform(0.05, 0.5, size=(n, m))
    shown = rng.integers(0, m, size=n)
    y = (rng.random(n) < q_true[np.arange(n), shown]).astype(float)
    pick = np.argmax(q_true + rng.normal(scale=0.1, size=(n, m)), axis=1)
    truth = float(q_true[np.arange(n), pick].mean())  # the policy's click rate on these contexts
    q_hat = np.clip(q_true + rng.normal(scale=0.1, size=(n, m)), 0, 1)  # an imperfect reward model
    log = Logged(np.arange(n), np.zeros(n, dtype=int), np.full(n, 1.0 / m), y)
    target = ope.deterministic(shown, pick, q_hat[np.arange(n), shown], q_hat[np.arange(n), pick])
    return truth, {kind: ope.estimate(kind, log, target) for kind in ope.KINDS}


def test_normal_intervals_cover_the_truth() -> None:
    trials = 120
    hits = dict.fromkeys(ope.KINDS, 0)
    for s in range(trials):
        truth, est = _coverage_trial(s)
        for kind, e in est.items():
            hits[kind] += e.lower <= truth <= e.upper
    for kind, h in hits.items():
        assert h / trials >= 0.88, f"{kind}: {h}/{trials} intervals cover the truth"


def test_bootstrap_intervals_cover_the_truth_and_agree_with_normal() -> None:
    trials, hits = 40, 0
    for s in range(trials):
        rng = np.random.default_rng(1000 + s)
        n, m = 300, 4
        q_true = rng.uniform(0.05, 0.5, size=(n, m))
        shown = rng.integers(0, m, size=n)
        y = (rng.random(n) < q_true[np.arange(n), shown]).astype(float)
        pick = q_true.argmax(axis=1)
        log = Logged(np.arange(n), np.zeros(n, dtype=int), np.full(n, 1.0 / m), y)
        target = ope.deterministic(shown, pick)
        b = ope.snips(log, target, bootstrap=300, seed=s)
        nrm = ope.snips(log, target)
        assert b.value == nrm.value and b.upper - b.lower == pytest.approx(nrm.upper - nrm.lower, rel=0.35)
        hits += b.lower <= float(q_true[np.arange(n), pick].mean()) <= b.upper
    assert hits / trials >= 0.85


def test_paired_difference_detects_a_worse_policy() -> None:
    rng = np.random.default_rng(7)
    n, m = 3000, 4
    q_true = rng.uniform(0.05, 0.5, size=(n, m))
    shown = rng.integers(0, m, size=n)
    y = (rng.random(n) < q_true[np.arange(n), shown]).astype(float)
    log = Logged(np.arange(n), np.zeros(n, dtype=int), np.full(n, 1.0 / m), y)
    good = ope.deterministic(shown, q_true.argmax(axis=1))
    bad = ope.deterministic(shown, q_true.argmin(axis=1))
    a, b, diff = ope.paired("snips", log, good, bad)
    assert diff.value == pytest.approx(a.value - b.value)
    assert diff.lower > 0  # the best-item policy beats the worst-item one, with confidence
    _, _, diff_boot = ope.paired("snips", log, good, bad, bootstrap=200)
    assert diff_boot.lower > 0
