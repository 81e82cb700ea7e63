"""Click-prediction metrics, and their prequential (test-then-train) state.

Plain functions compute one metric on arrays of labels and probabilities;
:class:`PrequentialMetrics` keeps them over a sliding window of the most
recent examples (exact) and cumulatively since the start (AUC and the
calibration error from a fine histogram of the predicted probability, the
others from running sums), with a state dict for checkpoints.

A metric that is undefined (AUC with one class only, nothing seen yet) is
left out of a snapshot rather than reported as NaN: snapshots travel in JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

EPS = 1e-7


def _arrays(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > a random negative), ties count one half.

    Computed from average ranks (Mann-Whitney U) in O(n log n); NaN with one class only.
    """
    y, s = _arrays(labels, scores)
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # average rank (1-based) of each group of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [y.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def finite(v: Any) -> bool:
    """Whether ``v`` is a finite number: a Python, numpy or 0-d torch number (False for None,
    strings, NaN, inf).  The one such test of the trainer (guardrail, manifests, logs)."""
    if v is None or isinstance(v, (str, bytes)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a torch tensor of several values
        return False


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sx)) + 1]
    ends = np.r_[starts[1:], len(x)]
    out = np.empty(len(x))
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def _delong_parts(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's placement values: per positive, the share of negatives below it; per
    negative, the share of positives above it (ties count one half)."""
    m, n = int(y.sum()), int((~y).sum())
    pos, neg = s[y], s[~y]
    tz = midranks(np.r_[pos, neg])
    v10 = (tz[:m] - midranks(pos)) / n
    v01 = 1.0 - (tz[m:] - midranks(neg)) / m
    return float(v10.mean()), v10, v01


def delong_se(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """DeLong's standard error of the AUC (examples independent); NaN with fewer than two of a class."""
    y = np.asarray(labels) > 0.5
    if int(y.sum()) < 2 or int((~y).sum()) < 2:
        return math.nan
    _, v10, v01 = _delong_parts(y, np.asarray(scores, dtype=np.float64))
    return float(math.sqrt(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size))


def paired_auc(labels: Sequence[float] | np.ndarray, a: Sequence[float] | np.ndarray,
               b: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """(AUC of ``a``, AUC of ``b``, standard error of AUC(a) - AUC(b)) on the same examples.

    DeLong's variance of correlated AUCs (the fast midrank form of Sun & Xu,
    2014); ties count one half, as in the AUC itself.  NaNs when either class
    has fewer than two examples.
    """
    y = np.asarray(labels, dtype=np.float64) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return math.nan, math.nan, math.nan
    auc_a, v10a, v01a = _delong_parts(y, np.asarray(a, dtype=np.float64))
    auc_b, v10b, v01b = _delong_parts(y, np.asarray(b, dtype=np.float64))
    sx, sy = np.cov(np.vstack([v10a, v10b])), np.cov(np.vstack([v01a, v01b]))
    var = (sx[0, 0] + sx[1, 1] - 2 * sx[0, 1]) / m + (sy[0, 0] + sy[1, 1] - 2 * sy[0, 1]) / n
    return auc_a, auc_b, float(math.sqrt(max(var, 0.0)))


def paired_log_loss_se(labels: Sequence[float] | np.ndarray, cand: Sequence[float] | np.ndarray,
                       live: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean of per-example log-loss differences (candidate - live)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size < 2:
        return 0.0
    pc = np.clip(np.asarray(cand, dtype=np.float64), EPS, 1 - EPS)
    pl = np.clip(np.asarray(live, dtype=np.float64), EPS, 1 - EPS)
    d = -(y * np.log(pc) + (1 - y) * np.log1p(-pc)) + (y * np.log(pl) + (1 - y) * np.log1p(-pl))
    return float(d.std(ddof=1) / math.sqrt(y.size))


def log_loss(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [1e-7, 1 - 1e-7]."""
    y, p = _arrays(labels, probs)
    if y.size == 0:
        return math.nan
    p = np.clip(p, EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def precision_recall_f1(
    labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> tuple[float, float, float]:
    """Of the predictions ``p >= threshold``; NaN where a denominator is zero."""
    y, p = _arrays(labels, probs)
    pred = p >= threshold
    pos = y > 0.5
    tp = float((pred & pos).sum())
    fp = float((pred & ~pos).sum())
    fn = float((~pred & pos).sum())
    return _prf(tp, fp, fn)


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan  # = harmonic mean of P and R
    return precision, recall, f1


def calibration(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> float:
    """Sum of predicted probabilities / number of positives (1 = calibrated on average)."""
    y, p = _arrays(labels, probs)
    return float(p.sum() / y.sum()) if y.sum() > 0 else math.nan


def expected_calibration_error(
    labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, bins: int = 10
) -> float:
    """Sum over equal-width probability bins of |mean p - click rate| weighted by the bin's share."""
    y, p = _arrays(labels, probs)
    if y.size == 0:
        return math.nan
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    return float(np.abs(sum_p - sum_y).sum() / y.size)


def binary_metrics(
    labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Every metric of this module on one set; undefined ones are left out."""
    y, p = _arrays(labels, probs)
    prec, rec, f1 = precision_recall_f1(y, p, threshold)
    out = {
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "calibration": calibration(y, p),
        "ece": expected_calibration_error(y, p),
        "ctr": float(y.mean()) if y.size else math.nan,
        "mean_p": float(p.mean()) if p.size else math.nan,
        "n": float(y.size),
    }
    return {k: v for k, v in out.items() if not math.isnan(v)}


def _auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin positive and negative counts (pairs inside one bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    wins = (pos * neg_below).sum() + 0.5 * (pos * neg).sum()
    return float(wins / (n_pos * n_neg))


class PrequentialMetrics:
    """Test-then-train metrics: a sliding window of the last ``window`` examples, and cumulative.

    ``update(labels, probs)`` must be called with the predictions made
    *before* the model learns from those examples.  The cumulative AUC and
    calibration error use a histogram of ``bins`` equal-width buckets on the
    logit scale (AUC error well under 1e-3 at the default 4096 bins).
    """

    LOGIT_RANGE = 16.0

    def __init__(self, window: int = 10_000, *, threshold: float = 0.5, bins: int = 4096) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.threshold = threshold
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self._y = np.zeros(self.window, dtype=np.float32)
        self._p = np.zeros(self.window, dtype=np.float64)
        self._next = 0
        self._filled = 0
        self.count = 0
        self._hist_pos = np.zeros(self.bins, dtype=np.int64)
        self._hist_neg = np.zeros(self.bins, dtype=np.int64)
        self._ece_n = np.zeros(10, dtype=np.int64)
        self._ece_p = np.zeros(10, dtype=np.float64)
        self._ece_y = np.zeros(10, dtype=np.float64)
        self._sum_logloss = 0.0
        self._sum_p = 0.0
        self._sum_y = 0.0
        self._tp = self._fp = self._fn = 0

    def _bin(self, p: np.ndarray) -> np.ndarray:
        p = np.clip(p, EPS, 1 - EPS)
        logit = np.log(p) - np.log1p(-p)
        frac = (logit + self.LOGIT_RANGE) / (2 * self.LOGIT_RANGE)
        return np.clip((frac * self.bins).astype(np.int64), 0, self.bins - 1)

    def update(self, labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> None:
        y, p = _arrays(labels, probs)
        if y.size == 0:
            return
        pos = y > 0.5
        b = self._bin(p)
        self._hist_pos += np.bincount(b[pos], minlength=self.bins)
        self._hist_neg += np.bincount(b[~pos], minlength=self.bins)
        e = np.clip((p * 10).astype(np.int64), 0, 9)
        self._ece_n += np.bincount(e, minlength=10)
        self._ece_p += np.bincount(e, weights=p, minlength=10)
        self._ece_y += np.bincount(e, weights=y, minlength=10)
        pc = np.clip(p, EPS, 1 - EPS)
        self._sum_logloss += float(-(y * np.log(pc) + (1 - y) * np.log1p(-pc)).sum())
        self._sum_p += float(p.sum())
        self._sum_y += float(y.sum())
        pred = p >= self.threshold
        self._tp += int((pred & pos).sum())
        self._fp += int((pred & ~pos).sum())
        self._fn += int((~pred & pos).sum())
        self.count += y.size
        # ring buffer of the last `window` examples
        if y.size >= self.window:
            y, p = y[-self.window :], p[-self.window :]
        n = y.size
        first = min(n, self.window - self._next)
        self._y[self._next : self._next + first] = y[:first]
        self._p[self._next : self._next + first] = p[:first]
        if n > first:
            self._y[: n - first] = y[first:]
            self._p[: n - first] = p[first:]
        self._next = (self._next + n) % self.window
        self._filled = min(self.window, self._filled + n)

    def window_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and probabilities of the window, oldest first."""
        if self._filled < self.window:
            return self._y[: self._filled].copy(), self._p[: self._filled].copy()
        idx = (np.arange(self.window) + self._next) % self.window
        return self._y[idx], self._p[idx]

    def cumulative(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {}
        prec, rec, f1 = _prf(self._tp, self._fp, self._fn)
        out = {
            "auc": _auc_from_histograms(self._hist_pos, self._hist_neg),
            "log_loss": self._sum_logloss / n,
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "calibration": self._sum_p / self._sum_y if self._sum_y > 0 else math.nan,
            "ece": float(np.abs(self._ece_p - self._ece_y).sum() / n),
            "ctr": self._sum_y / n,
            "mean_p": self._sum_p / n,
            "n": float(n),
        }
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def snapshot(self) -> dict[str, float]:
        """``window_<metric>`` and ``cumulative_<metric>`` for every defined metric, plus ``examples``."""
        y, p = self.window_arrays()
        out = {f"window_{k}": v for k, v in binary_metrics(y, p, self.threshold).items()}
        out.update({f"cumulative_{k}": v for k, v in self.cumulative().items()})
        out["examples"] = float(self.count)
        return out

    # --- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only (loads with ``torch.load(weights_only=True)``)."""
        y, p = self.window_arrays()
        return {
            "window": self.window,
            "threshold": self.threshold,
            "bins": self.bins,
            "window_y": torch.from_numpy(y.copy()),
            "window_p": torch.from_numpy(p.copy()),
            "count": self.count,
            "hist_pos": torch.from_numpy(self._hist_pos.copy()),
            "hist_neg": torch.from_numpy(self._hist_neg.copy()),
            "ece_n": torch.from_numpy(self._ece_n.copy()),
            "ece_p": torch.from_numpy(self._ece_p.copy()),
            "ece_y": torch.from_numpy(self._ece_y.copy()),
            "sums": [self._sum_logloss, self._sum_p, self._sum_y],
            "confusion": [self._tp, self._fp, self._fn],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.threshold = float(state["threshold"])
        self.bins = int(state["bins"])
        self.reset()
        y = state["window_y"].numpy().astype(np.float32)
        p = state["window_p"].numpy().astype(np.float64)
        n = y.size
        self._y[:n], self._p[:n] = y, p
        self._filled = n
        self._next = n % self.window
        self.count = int(state["count"])
        self._hist_pos = state["hist_pos"].numpy().astype(np.int64).copy()
        self._hist_neg = state["hist_neg"].numpy().astype(np.int64).copy()
        self._ece_n = state["ece_n"].numpy().astype(np.int64).copy()
        self._ece_p = state["ece_p"].numpy().astype(np.float64).copy()
        self._ece_y = state["ece_y"].numpy().astype(np.float64).copy()
        self._sum_logloss, self._sum_p, self._sum_y = (float(x) for x in state["sums"])
        self._tp, self._fp, self._fn = (int(x) for x in state["confusion"])
