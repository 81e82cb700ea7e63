"""The publish guardrail's rules: pure functions of held-back labels and predictions.

A candidate with no live version must beat the popularity fallback
(:func:`beats_fallback`); with one, it must be no worse than it
(:func:`guardrail_passes`) and, with the OPE gate on, no worse by the off-policy
estimate of its click rate on logged exploration traffic (:func:`ope_passes`).  A refusal's reason is a :class:`Refusal`, a
fixed set that labels the rejection counter.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from trainer.metrics import finite as _finite
from trainer.metrics import paired_auc


class Refusal(StrEnum):
    """Why the guardrail refused a candidate: the ``reason`` label of
    ``streamrec_trainer_guardrail_rejections_total`` (a fixed set, never an error message)."""

    BELOW_FALLBACK = "below_fallback"
    """No live version, and the candidate does not beat the popularity fallback (see :func:`beats_fallback`)."""
    WORSE_THAN_LIVE = "worse_than_live"
    """Worse than the live version on the held-back examples (see :func:`guardrail_passes`)."""
    METRIC_UNDEFINED = "metric_undefined"
    """The compared metric is undefined on the held-back examples (e.g. AUC with one class only)."""
    NON_FINITE = "non_finite"
    """The candidate has NaN/inf parameters."""
    WORSE_BY_OPE = "worse_by_ope"
    """With ``ope_gate=on``: the off-policy estimate of its click rate on logged exploration
    examples is below the live version's (see :func:`ope_passes`)."""


def guardrail_passes(
    candidate: dict[str, float],
    live: dict[str, float],
    *,
    metric: str,
    margin: float,
    z: float = 0.0,
    loss_diff_se: float = 0.0,
) -> tuple[bool, Refusal | None, str]:
    """Compare candidate and live metrics on the same held-back examples; (passes, refusal, explanation).

    ``log_loss`` is lower-is-better: the candidate passes unless it is worse
    by more than ``margin + z * loss_diff_se``, where ``loss_diff_se`` is the
    standard error of the mean per-example log-loss difference (a paired
    test: a candidate is refused only on evidence, not on the noise of a few
    dozen examples).  ``auc`` is higher-is-better, compared with ``margin``
    alone; an AUC that is undefined (one class only) falls back to log loss.
    """
    if metric == "auc" and not (_finite(candidate.get("auc")) and _finite(live.get("auc"))):
        metric = "log_loss"
    c, v = candidate.get(metric), live.get(metric)
    if not (_finite(c) and _finite(v)):
        return False, Refusal.METRIC_UNDEFINED, f"{metric} undefined (candidate {c}, live {v})"
    assert c is not None and v is not None
    if metric == "log_loss":
        slack = margin + z * loss_diff_se
        ok, rel, bound = c <= v + slack, "<=", v + slack
        why = f"margin {margin} + {z} x se {loss_diff_se:.4f}"
    else:
        ok, rel, bound = c >= v - margin, ">=", v - margin
        why = f"margin {margin}"
    why = f"{metric} candidate {c:.4f} {'' if ok else 'not '}{rel} {bound:.4f} (live {v:.4f}, {why})"
    return ok, None if ok else Refusal.WORSE_THAN_LIVE, why


def beats_fallback(labels: Any, candidate: Any, fallback: Any, *, z: float) -> tuple[bool, Refusal | None, str, dict[str, float]]:
    """Whether a candidate may replace the popularity fallback: (passes, refusal, explanation, metrics).

    The rule: on the same held-back examples, the candidate's AUC must exceed
    the fallback's by more than ``z`` standard errors of the paired AUC
    difference (:func:`paired_auc`), i.e. ``auc_c - auc_f > z * se``.  With
    ``z = 1.64`` that is a one-sided test at about 5%: the burden of proof is
    on the candidate (against a *live* version it is the other way round, see
    :func:`guardrail_passes`).  AUC, not log loss, because the fallback ranks
    items but gives no probabilities; popularity ties (items never clicked)
    count one half.  Undefined AUCs (one class only) refuse with
    :attr:`Refusal.METRIC_UNDEFINED`.
    """
    auc_c, auc_f, se = paired_auc(labels, candidate, fallback)
    metrics = {"holdout_auc": auc_c, "holdout_fallback_auc": auc_f, "holdout_fallback_auc_diff_se": se}
    metrics = {k: v for k, v in metrics.items() if _finite(v)}
    if not (_finite(auc_c) and _finite(auc_f) and _finite(se)):
        return False, Refusal.METRIC_UNDEFINED, "AUC undefined on the held-back examples (too few of a class)", metrics
    bound = auc_f + z * se
    ok = auc_c > bound
    why = (f"auc candidate {auc_c:.4f} {'>' if ok else 'not >'} {bound:.4f} "
           f"(popularity fallback {auc_f:.4f} + {z} x se {se:.4f})")
    return ok, None if ok else Refusal.BELOW_FALLBACK, why, metrics


def ope_passes(diff: float, diff_se: float, *, estimator: str, margin: float, z: float,
               examples: int, min_examples: int) -> tuple[bool, Refusal | None, str]:
    """The OPE gate: (passes, refusal, explanation) from the off-policy estimate of
    ``V(candidate) - V(live)`` (click rate of each one's top-1 policy, :mod:`trainer.ope`) and its
    paired standard error.

    The candidate is refused only on evidence: when ``diff < -(margin + z * diff_se)``, i.e. it is
    worse by more than the margin at a one-sided ``z``.  Fewer than ``min_examples`` logged
    examples, or an undefined estimate (no logged row where either policy agrees with the log),
    pass: OPE that cannot see a difference does not block a version.
    """
    if examples < min_examples:
        return True, None, f"{estimator}: {examples} logged examples, fewer than {min_examples}: not judged"
    if not (_finite(diff) and _finite(diff_se)):
        return True, None, f"{estimator}: difference undefined on {examples} logged examples: not judged"
    bound = -(margin + z * diff_se)
    ok = diff >= bound
    why = (f"{estimator} click rate candidate - live {diff:+.4f} {'>=' if ok else 'not >='} {bound:+.4f} "
           f"(margin {margin} + {z} x se {diff_se:.4f}, {examples} logged examples)")
    return ok, None if ok else Refusal.WORSE_BY_OPE, why
