"""Off-policy evaluation: a ranking policy's click rate estimated from logged exploration traffic.

The logged data
---------------
One row per (impression, shown item), as ``labeled`` carries it: the impression, the item's
``position`` in the slate, its ``propensity`` and the click (``label``).  Write the logged slate
of impression *i* as ``a_i0, a_i1, ...`` (position order), its context (user, history, request)
as ``x_i``, and the click on slot *j* as ``y_ij``.  The propensity is one of two things
(:attr:`Logged.mode`):

``"conditional"`` (what serving's exploration writes, ``Impression.propensities``)
    ``p_ij = pi0(a_ij at j | x_i, a_i0 .. a_i,j-1)``, the probability that the logging policy
    chose the item at its position *given the items above it*.  The product over positions
    ``0..j`` is the probability of the slate's prefix.
``"marginal"``
    ``p_ij = pi0(a_ij at j | x_i)``, the probability that the logging policy showed the item at
    that position at all (e.g. ``1/M`` for a uniform slate over ``M`` candidates).

At position 0 the two are the same number.

The target policy and the estimand
----------------------------------
A target policy ``pi`` fills positions ``0..K-1`` (top-1: ``K = 1``; a top-k slate: ``K = k``;
rows at positions ``>= K`` are not evaluated).  The estimand is its **click rate per slot**::

    V(pi) = E_x [ (1/K) sum_{j<K} P(click at slot j | x, pi's items at positions 0..j) ]

under the context distribution and the click behaviour that produced the log (for ``K = 1``:
the probability that the user clicks ``pi``'s top item shown at position 0; ``K * V`` is the
expected clicks per top-K slate).  For each row the caller gives ``pi``'s probability of the
*logged* event (:attr:`Target.prob`): in marginal mode ``pi(a_ij at j | x_i)``, in conditional
mode ``pi(a_ij at j | x_i, a_i0 .. a_i,j-1)``; for a deterministic ranking both are
``1[pi's j-th item == a_ij]`` (:func:`deterministic`).

The importance weight of a row is

* marginal: ``w_ij = pi(a_ij at j | x_i) / p_ij``.  Unbiased when the click on a slot depends
  only on the context, the item and the position, not on the other items of the slate (the
  item-position model of IIPS, Li et al. 2018);
* conditional: ``w_ij = prod_{l<=j} pi(a_il | x_i, a_i<l) / p_il``, the prefix's ratio (RIPS,
  McInerney et al. 2020): unbiased when the click on slot *j* depends on the items at positions
  ``<= j`` (a cascade), with no independence assumption; it needs every position ``0..j`` of the
  impression in the log, and for a deterministic ``pi`` a row counts only where the whole logged
  prefix is ``pi``'s.

Both need *support*: ``p > 0`` wherever ``pi`` puts mass (a target item the logger could not
show is invisible to IPS, which then underestimates; SNIPS and DR are less exposed).

The estimators (``n`` evaluated rows, ``n_j`` at position *j*)
----------------------------------------------------------------
* :func:`ips`:   ``V = (1/n) sum w y``.
* :func:`snips`: self-normalised per position, ``V = sum_j (n_j/n) sum_{pos=j} w y / sum_{pos=j} w``
  (consistent, slightly biased, bounded by the clicks' range; undefined (NaN) when a position has
  no row with ``w > 0``).
* :func:`dr`:    doubly robust with a reward model ``q``: ``V = (1/n) sum [w_prev * dm + w (y - q)]``,
  ``dm`` = the model's expected click of ``pi`` at the row's slot, ``q`` = its prediction for the
  logged item, ``w_prev`` = the weight of the prefix above (1 in marginal mode and at position 0):
  the cascade DR of Kiyohara et al. 2022, the usual DR in marginal mode.

``clip`` (optional) caps every weight at ``clip`` (``min(w, clip)``): less variance, a downward
bias for IPS/DR wherever a weight is cut.  With ``n`` and ``n_j`` fixed by the log (rows sampled
independently of the clicks, e.g. the trainer's hash-based hold-back), each estimand stays
``V(pi)`` for rows subsampled that way.

Confidence intervals
--------------------
Rows of one impression share a context and (conditional mode) a prefix, so every interval
treats the **impression** as the independent unit.  ``normal``: the estimate ± ``z`` standard
errors, from the per-row influence terms (``w y - V`` for IPS, the DR term ``- V`` for DR,
``w (y - V_j) / mean_j(w)`` for SNIPS, the delta method) summed per impression, with the
``G/(G-1)`` small-sample factor for ``G`` impressions.  ``bootstrap``: the percentile interval
of the estimator over impressions resampled with replacement.  :func:`paired` gives the same for
the difference of two target policies on the same log (the guardrail's test).

The module is pure numpy: the benchmark (``benchmarks/ope_coverage.py``) and the trainer's
guardrail (:mod:`trainer.holdout`) build the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

import numpy as np

from contract.records import Labeled

Mode = Literal["conditional", "marginal"]
Kind = Literal["ips", "snips", "dr"]
KINDS: tuple[Kind, ...] = ("ips", "snips", "dr")


class OPEError(ValueError):
    """Logged data or a target that cannot be evaluated as given."""


@dataclass(frozen=True)
class Logged:
    """The logged rows, one per (impression, shown item); all arrays have one entry per row."""

    impression: np.ndarray
    """Any labels (ids or ints) grouping the rows by impression."""
    position: np.ndarray
    """The row's slot in its slate (0 = top)."""
    propensity: np.ndarray
    """The logging policy's probability of the row, in (0, 1] (see :attr:`mode`)."""
    click: np.ndarray
    """The observed reward, 0/1 for a click."""
    mode: Mode = "conditional"
    _group: np.ndarray = field(init=False, repr=False, compare=False)
    _order: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pos = np.asarray(self.position)
        n = len(pos)
        arrays = {"impression": np.asarray(self.impression), "position": pos,
                  "propensity": np.asarray(self.propensity, dtype=np.float64),
                  "click": np.asarray(self.click, dtype=np.float64)}
        for name, a in arrays.items():
            if a.ndim != 1 or len(a) != n:
                raise OPEError(f"{name} must be 1-d with one entry per row ({n}), got shape {a.shape}")
            object.__setattr__(self, name, a)
        if self.mode not in ("conditional", "marginal"):
            raise OPEError(f"mode must be 'conditional' or 'marginal', got {self.mode!r}")
        p = self.propensity
        if n and not (np.all(p > 0) and np.all(p <= 1)):
            raise OPEError("propensities must lie in (0, 1]")
        if n and (not np.all(np.isfinite(self.click)) or not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0):
            raise OPEError("clicks must be finite and positions non-negative integers")
        _, group = np.unique(self.impression, return_inverse=True)
        object.__setattr__(self, "_group", group.reshape(-1))
        order = np.lexsort((pos, self._group))  # by impression, then position
        if self.mode == "conditional" and n:
            g, p_sorted = self._group[order], pos[order]
            first = np.r_[True, g[1:] != g[:-1]]
            # each impression's rows must be positions 0, 1, 2, ... (a prefix needs every slot above)
            rank = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
            if np.any(p_sorted != rank):
                raise OPEError("conditional propensities need each impression's positions 0..j without "
                               "gaps or repeats (drop incomplete slates, or use the rows at position 0)")
        object.__setattr__(self, "_order", order)

    def __len__(self) -> int:
        return len(self.position)

    @property
    def impressions(self) -> int:
        return int(self._group.max()) + 1 if len(self) else 0

    def top(self, k: int) -> Logged:
        """The rows at positions ``< k`` (what a top-k policy is evaluated on)."""
        keep = self.position < k
        return Logged(self.impression[keep], self.position[keep], self.propensity[keep],
                      self.click[keep], self.mode)

    def subset(self, keep: np.ndarray) -> Logged:
        keep = np.asarray(keep)
        return Logged(self.impression[keep], self.position[keep], self.propensity[keep],
                      self.click[keep], self.mode)


@dataclass(frozen=True)
class Target:
    """What the target policy says of each logged row (aligned with :class:`Logged`'s rows)."""

    prob: np.ndarray
    """``pi``'s probability of the logged event of the row (module doc), in [0, 1]."""
    q: np.ndarray | None = None
    """DR: the reward model's click probability of the logged item at its slot."""
    dm: np.ndarray | None = None
    """DR: the reward model's expected click of ``pi``'s choice at the row's slot
    (``sum_a pi(a | x [, logged prefix]) q(x, a)``; for a deterministic ``pi``, ``q`` of its item)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prob", np.asarray(self.prob, dtype=np.float64))
        for name in ("q", "dm"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, np.asarray(v, dtype=np.float64))

    def subset(self, keep: np.ndarray) -> Target:
        return Target(self.prob[keep], None if self.q is None else self.q[keep],
                      None if self.dm is None else self.dm[keep])


@dataclass(frozen=True)
class Estimate:
    """One estimate with its interval (``lower``/``upper`` at ``level``)."""

    kind: str
    value: float
    se: float
    lower: float
    upper: float
    level: float
    rows: int
    impressions: int
    matched: int
    """Rows with a positive weight (the data the estimate really rests on)."""
    ess: float
    """Effective sample size of the weights, ``(sum w)^2 / sum w^2`` (0 when none is positive)."""

    def metrics(self, prefix: str) -> dict[str, float]:
        """The finite figures as manifest metrics named ``<prefix>``, ``<prefix>_se``, ..."""
        out = {prefix: self.value, f"{prefix}_se": self.se, f"{prefix}_lower": self.lower,
               f"{prefix}_upper": self.upper, f"{prefix}_matched": float(self.matched)}
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def deterministic(logged_items: Sequence[str] | np.ndarray, chosen: Sequence[str | None] | np.ndarray,
                  q_logged: Sequence[float] | np.ndarray | None = None,
                  q_chosen: Sequence[float] | np.ndarray | None = None) -> Target:
    """The :class:`Target` of a deterministic ranking: ``chosen[r]`` is ``pi``'s item at row r's
    position for row r's context (None = ``pi`` shows nothing there), ``q_*`` the reward model's
    click probability of the logged and of the chosen item (DR only)."""
    logged_items = np.asarray(logged_items, dtype=object)
    chosen = np.asarray(chosen, dtype=object)
    if logged_items.shape != chosen.shape:
        raise OPEError(f"{len(logged_items)} logged items but {len(chosen)} choices")
    prob = np.fromiter((c is not None and c == a for a, c in zip(logged_items, chosen, strict=True)),
                       dtype=np.float64, count=len(chosen))
    return Target(prob, None if q_logged is None else np.asarray(q_logged, dtype=np.float64),
                  None if q_chosen is None else np.asarray(q_chosen, dtype=np.float64))


def from_labeled(examples: Iterable[Labeled], *, k: int = 1, mode: Mode = "conditional") -> tuple[Logged, list[Labeled]]:
    """The logged rows of ``examples`` at positions ``< k`` that carry a propensity, and those examples.

    Late positives (``late=true``) are left out: the slot's in-window outcome is its negative, and
    a slot must count once.  A repeated (impression, position) keeps its first row."""
    rows: list[Labeled] = []
    seen: set[tuple[str, int]] = set()
    for ex in examples:
        if ex.propensity is None or ex.late or ex.position >= k:
            continue
        key = (ex.impression_id, ex.position)
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    logged = Logged(np.array([ex.impression_id for ex in rows], dtype=object),
                    np.array([ex.position for ex in rows], dtype=np.int64),
                    np.array([ex.propensity for ex in rows], dtype=np.float64),
                    np.array([ex.label for ex in rows], dtype=np.float64), mode)
    return logged, rows


# --- weights and per-row terms ---------------------------------------------------------------
def weights(logged: Logged, target: Target, clip: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(w, w_prev) per row: the importance weight of the row and of the prefix above it (module doc)."""
    if target.prob.shape != logged.propensity.shape:
        raise OPEError(f"target has {len(target.prob)} rows, the log {len(logged)}")
    if np.any(target.prob < 0) or np.any(target.prob > 1) or not np.all(np.isfinite(target.prob)):
        raise OPEError("target probabilities must lie in [0, 1]")
    ratio = target.prob / logged.propensity
    if logged.mode == "marginal":
        w, w_prev = ratio, np.ones_like(ratio)
    else:
        o = logged._order
        g = logged._group[o]
        r = ratio[o]
        start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, dtype=int)
        first = np.repeat(start, np.diff(np.r_[start, len(g)]))  # each row's group start
        # a cumulative product per impression: sums of logs of the positive ratios, zeros counted apart
        zero = r == 0
        logs = np.log(np.where(zero, 1.0, r))
        cs, cz = np.cumsum(logs), np.cumsum(zero)
        base_s = np.where(first > 0, cs[first - 1], 0.0)
        base_z = np.where(first > 0, cz[first - 1], 0)
        w_sorted = np.where(cz - base_z > 0, 0.0, np.exp(cs - base_s))
        prev_sorted = np.ones_like(w_sorted)
        if len(g):
            prev_sorted[1:] = w_sorted[:-1]
            prev_sorted[start] = 1.0
        w, w_prev = np.empty_like(r), np.empty_like(r)
        w[o], w_prev[o] = w_sorted, prev_sorted
    if clip is not None and clip > 0:
        w, w_prev = np.minimum(w, clip), np.minimum(w_prev, clip)
    return w, w_prev


@dataclass(frozen=True)
class _Terms:
    """Per-row pieces of one estimator, enough for its value, influence terms and the bootstrap."""

    kind: Kind
    num: np.ndarray
    """Per row: ``w y`` (IPS, SNIPS) or the DR term."""
    den: np.ndarray
    """Per row: ``w`` (SNIPS) or 1 (IPS, DR)."""
    w: np.ndarray


def _terms(kind: Kind, logged: Logged, target: Target, clip: float | None) -> _Terms:
    w, w_prev = weights(logged, target, clip)
    y = logged.click
    if kind == "ips":
        return _Terms(kind, w * y, np.ones_like(w), w)
    if kind == "snips":
        return _Terms(kind, w * y, w, w)
    if kind == "dr":
        if target.q is None or target.dm is None:
            raise OPEError("dr needs the reward model's q (logged item) and dm (the target's choice)")
        if target.q.shape != y.shape or target.dm.shape != y.shape:
            raise OPEError("q and dm need one entry per row")
        return _Terms(kind, w_prev * target.dm + w * (y - target.q), np.ones_like(w), w)
    raise OPEError(f"unknown estimator {kind!r}; one of {', '.join(KINDS)}")


def _value_and_influence(t: _Terms, position: np.ndarray) -> tuple[float, np.ndarray]:
    """The estimate and the per-row influence terms ``psi`` (``V_hat - V ~ mean(psi)``)."""
    n = len(t.num)
    if n == 0:
        return math.nan, np.zeros(0)
    if t.kind != "snips":
        v = float(t.num.mean())
        return v, t.num - v
    value = 0.0
    psi = np.empty(n)
    for j in np.unique(position):
        at = position == j
        wsum = float(t.den[at].sum())
        if wsum <= 0:
            return math.nan, np.full(n, math.nan)
        v_j = float(t.num[at].sum()) / wsum
        value += at.sum() / n * v_j
        psi[at] = (t.num[at] - v_j * t.den[at]) / (wsum / at.sum())
    return value, psi


def _clustered_se(psi: np.ndarray, group: np.ndarray, groups: int) -> float:
    n = len(psi)
    if n == 0 or groups < 2 or not np.all(np.isfinite(psi)):
        return math.nan
    per = np.bincount(group, weights=psi, minlength=groups)
    return float(math.sqrt(groups / (groups - 1) * float((per**2).sum())) / n)


def _by_impression(t: _Terms, logged: Logged) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per impression and position: sums of num, den and row counts ([G, P] each), and the positions."""
    positions, pcol = np.unique(logged.position, return_inverse=True)
    g, p = logged.impressions, len(positions)
    flat = logged._group * p + pcol.reshape(-1)
    def agg(x: np.ndarray) -> np.ndarray:
        return np.bincount(flat, weights=x, minlength=g * p).reshape(g, p)
    return agg(t.num), agg(t.den), agg(np.ones(len(t.num))), positions


def _bootstrap(terms: Sequence[_Terms], signs: Sequence[float], logged: Logged, samples: int,
               seed: int) -> np.ndarray:
    """Bootstrap replicates (over impressions) of ``sum sign * estimate`` of the given terms."""
    g = logged.impressions
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(samples, g)) + (np.arange(samples) * g)[:, None]
    counts = np.bincount(draws.ravel(), minlength=samples * g).reshape(samples, g).astype(np.float64)  # [B, G]
    out = np.zeros(samples)
    for t, sign in zip(terms, signs, strict=True):
        num, den, cnt, _ = _by_impression(t, logged)
        bnum, bden, bcnt = counts @ num, counts @ den, counts @ cnt  # [B, P]
        n = bcnt.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if t.kind == "snips":
                per_pos = np.where(bden > 0, bnum / np.where(bden > 0, bden, 1.0), np.nan)
                est = (bcnt / n[:, None] * per_pos).sum(axis=1)
            else:
                est = bnum.sum(axis=1) / n
        out += sign * est
    return out


def _interval(value: float, se: float, level: float, reps: np.ndarray | None) -> tuple[float, float]:
    if reps is not None:
        reps = reps[np.isfinite(reps)]
        if len(reps) == 0:
            return math.nan, math.nan
        a = (1 - level) / 2
        lo, hi = np.quantile(reps, [a, 1 - a])
        return float(lo), float(hi)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return value - z * se, value + z * se


def _ess(w: np.ndarray) -> float:
    s2 = float((w**2).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def estimate(kind: Kind, logged: Logged, target: Target, *, clip: float | None = None,
             level: float = 0.95, bootstrap: int = 0, seed: int = 0) -> Estimate:
    """``kind``'s estimate of ``V(pi)`` (module doc) with a normal interval, or a percentile one
    over ``bootstrap`` impression resamples when ``bootstrap > 0`` (``se`` stays the normal one)."""
    if not 0 < level < 1:
        raise OPEError(f"level must be in (0, 1), got {level}")
    t = _terms(kind, logged, target, clip)
    value, psi = _value_and_influence(t, logged.position)
    se = _clustered_se(psi, logged._group, logged.impressions)
    reps = _bootstrap([t], [1.0], logged, bootstrap, seed) if bootstrap > 0 and len(logged) else None
    lo, hi = _interval(value, se, level, reps)
    return Estimate(kind, value, se, lo, hi, level, len(logged), logged.impressions,
                    int((t.w > 0).sum()), _ess(t.w))


def ips(logged: Logged, target: Target, **kw: object) -> Estimate:
    """Inverse propensity scoring (see :func:`estimate`)."""
    return estimate("ips", logged, target, **kw)  # type: ignore[arg-type]


def snips(logged: Logged, target: Target, **kw: object) -> Estimate:
    """Self-normalised IPS, per position (see :func:`estimate`)."""
    return estimate("snips", logged, target, **kw)  # type: ignore[arg-type]


def dr(logged: Logged, target: Target, **kw: object) -> Estimate:
    """Doubly robust (cascade DR in conditional mode; see :func:`estimate`)."""
    return estimate("dr", logged, target, **kw)  # type: ignore[arg-type]


def paired(kind: Kind, logged: Logged, a: Target, b: Target, *, clip: float | None = None,
           level: float = 0.95, bootstrap: int = 0, seed: int = 0) -> tuple[Estimate, Estimate, Estimate]:
    """Estimates of ``V(a)``, ``V(b)`` and of ``V(a) - V(b)`` on the same log; the difference's
    standard error uses the paired per-impression influence terms (one log, two policies)."""
    ta, tb = _terms(kind, logged, a, clip), _terms(kind, logged, b, clip)
    va, psi_a = _value_and_influence(ta, logged.position)
    vb, psi_b = _value_and_influence(tb, logged.position)
    g = logged.impressions
    out = []
    for t, v, psi in ((ta, va, psi_a), (tb, vb, psi_b)):
        se = _clustered_se(psi, logged._group, g)
        reps = _bootstrap([t], [1.0], logged, bootstrap, seed) if bootstrap > 0 and len(logged) else None
        lo, hi = _interval(v, se, level, reps)
        out.append(Estimate(kind, v, se, lo, hi, level, len(logged), g, int((t.w > 0).sum()), _ess(t.w)))
    diff = va - vb
    se = _clustered_se(psi_a - psi_b, logged._group, g)
    reps = _bootstrap([ta, tb], [1.0, -1.0], logged, bootstrap, seed) if bootstrap > 0 and len(logged) else None
    lo, hi = _interval(diff, se, level, reps)
    matched = int(((ta.w > 0) | (tb.w > 0)).sum())
    out.append(Estimate(f"{kind}_diff", diff, se, lo, hi, level, len(logged), g, matched, math.nan))
    return out[0], out[1], out[2]
