"""Metrics against brute-force definitions, and the prequential state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.metrics import (
    PrequentialMetrics,
    auc,
    binary_metrics,
    calibration,
    expected_calibration_error,
    finite,
    log_loss,
    precision_recall_f1,
)


def brute_force_auc(y, s) -> float:
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 8)), min_size=2, max_size=60))
def test_auc_equals_pairwise_count_with_ties(pairs) -> None:
    y = [a for a, _ in pairs]
    s = [b / 8 for _, b in pairs]  # few distinct scores: many ties
    if len(set(y)) < 2:
        assert math.isnan(auc(y, s))
    else:
        assert auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)


def test_auc_known_values() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_log_loss_calibration_and_prf() -> None:
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    expect = -(np.log(0.9) + np.log(0.8) + np.log(0.6) + np.log(0.6)) / 4
    assert log_loss(y, p) == pytest.approx(expect)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, finite
    assert calibration(y, p) == pytest.approx(2.1 / 2)
    prec, rec, f1 = precision_recall_f1(y, p)  # predicted positive: 0.9, 0.6 -> both right
    assert (prec, rec, f1) == (1.0, 1.0, 1.0)
    prec, rec, f1 = precision_recall_f1([1, 1, 0, 0], [0.9, 0.1, 0.7, 0.2])
    assert (prec, rec) == (0.5, 0.5) and f1 == pytest.approx(0.5)
    # ECE: bins [0.2,0.3) y=0, [0.4,0.5) y=0, [0.6,0.7) y=1, [0.9,1] y=1 -> (0.2+0.4+0.4+0.1)/4
    assert expected_calibration_error(y, p) == pytest.approx((0.2 + 0.4 + 0.4 + 0.1) / 4)


def test_undefined_metrics_are_left_out() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert "auc" not in m and "calibration" not in m and "recall" not in m
    assert m["log_loss"] > 0 and m["n"] == 3


def test_prequential_window_and_cumulative() -> None:
    rng = np.random.default_rng(0)
    pm = PrequentialMetrics(window=100)
    ys, ps = [], []
    for _ in range(7):
        p = rng.uniform(0, 1, 37)
        y = (rng.uniform(0, 1, 37) < p).astype(float)
        pm.update(y, p)
        ys.append(y)
        ps.append(p)
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    snap = pm.snapshot()
    assert snap["examples"] == len(y_all)
    wy, wp = pm.window_arrays()
    np.testing.assert_array_equal(wy, y_all[-100:])
    np.testing.assert_allclose(wp, p_all[-100:])
    assert snap["window_auc"] == pytest.approx(auc(y_all[-100:], p_all[-100:]))
    assert snap["window_log_loss"] == pytest.approx(log_loss(y_all[-100:], p_all[-100:]))
    assert snap["cumulative_log_loss"] == pytest.approx(log_loss(y_all, p_all))
    assert snap["cumulative_auc"] == pytest.approx(auc(y_all, p_all), abs=2e-3)  # histogram
    assert snap["cumulative_calibration"] == pytest.approx(calibration(y_all, p_all))
    assert snap["cumulative_ece"] == pytest.approx(expected_calibration_error(y_all, p_all))
    prec, rec, f1 = precision_recall_f1(y_all, p_all)
    assert (snap["cumulative_precision"], snap["cumulative_recall"], snap["cumulative_f1"]) == pytest.approx((prec, rec, f1))


def test_prequential_state_round_trip(tmp_path) -> None:
    pm = PrequentialMetrics(window=50)
    rng = np.random.default_rng(1)
    pm.update(rng.integers(0, 2, 80), rng.uniform(0, 1, 80))
    path = tmp_path / "m.pt"
    torch.save(pm.state_dict(), path)
    other = PrequentialMetrics(window=7)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.snapshot() == pm.snapshot()
    more_y, more_p = rng.integers(0, 2, 30), rng.uniform(0, 1, 30)
    pm.update(more_y, more_p)
    other.update(more_y, more_p)
    assert other.snapshot() == pm.snapshot()


def test_finite_is_true_for_finite_numbers_of_any_kind_only() -> None:
    for v in (0, 1.5, True, np.float32(0.25), np.int64(3), torch.tensor(0.5)):
        assert finite(v), v
    for v in (None, "1.0", b"1", math.nan, math.inf, -math.inf, np.float32("nan"), torch.tensor([1.0, 2.0]), [1]):
        assert not finite(v), v
