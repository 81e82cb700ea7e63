"""The offline evaluation's report: per-row AUC and log loss by period, standard errors,
forgetting, recovery after a shift (a JSON-able summary), the printed table and the PNG plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from contract.records import Labeled
from harness.baselines import bootstrap_auc, river_version
from harness.replays import Replay
from trainer.metrics import auc, delong_se, log_loss


@dataclass
class StrategyResult:
    name: str
    ts: np.ndarray  # impression ts of each scored example
    labels: np.ndarray
    probs: np.ndarray
    early_auc_after_first: float
    early_auc_end: float
    seconds: float
    trained_examples: int
    example_updates: int = 0
    """Compute: examples (fresh and replayed) x the optimizer steps on them (0 for counters)."""
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Position in the stream of each scored example."""
    batch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Batch number of each scored example."""
    kind: str = "strategy"
    """'strategy' (the learner), 'baseline' or 'reference' (the learnable oracle)."""
    early_auc_after_first_stable: float = math.nan
    """The same as ``early_auc_after_first`` on the held-out examples of the replay's stable users
    (NaN where the replay names none)."""
    early_auc_end_stable: float = math.nan


SE_RESAMPLES = 200
SE_SEED = 0
RECOVERY_WINDOW = 5
"""Batches in the sliding window of the recovery figure."""
RECOVERY_SHARE = 0.9
"""Recovered: window AUC >= this share of the learnable oracle's on the same examples."""


def _metric(y: np.ndarray, p: np.ndarray, fn: Callable) -> float:  # noqa: ANN001
    if y.size == 0 or (fn is auc and len(np.unique(y)) < 2):
        return math.nan
    return float(fn(y, p))


def _recovery(r: StrategyResult, ref: StrategyResult, shift_ts: int) -> tuple[int | None, int | None, int]:
    """Batches after the shift until ``r``'s window AUC reaches the share of ``ref``'s (None: never).

    The window holds the scored post-shift examples of the last
    :data:`RECOVERY_WINDOW` batches; both rows are compared on the examples
    they both scored.  Two criteria: the AUC itself (``AUC_r >= share *
    AUC_ref``) and the lift over chance (``AUC_r - 0.5 >= share * (AUC_ref -
    0.5)``, the stricter one: right after a shift the oracle is near chance
    too, so that the plain ratio is met by rows that learn nothing).  Returns
    (batches by AUC, batches by lift, post-shift batches).
    """
    post_ref = ref.ts >= shift_ts
    if not post_ref.any():
        return None, None, 0
    b0, b_end = int(ref.batch[post_ref].min()), int(ref.batch[post_ref].max())
    order = np.argsort(ref.index)
    ref_idx, ref_p = ref.index[order], ref.probs[order]
    post = r.ts >= shift_ts
    by_auc = by_lift = None
    for b in range(b0, b_end + 1):
        m = post & (r.batch >= max(b0, b - RECOVERY_WINDOW + 1)) & (r.batch <= b)
        pos = np.searchsorted(ref_idx, r.index[m])
        ok = (pos < len(ref_idx)) & (ref_idx[np.minimum(pos, len(ref_idx) - 1)] == r.index[m])
        y = r.labels[m][ok]
        a_r = _metric(y, r.probs[m][ok], auc)
        a_ref = _metric(y, ref_p[pos[ok]], auc)
        if not (a_r == a_r and a_ref == a_ref):
            continue
        if by_auc is None and a_r >= RECOVERY_SHARE * a_ref:
            by_auc = b - b0 + 1
        if by_lift is None and a_ref > 0.5 and a_r - 0.5 >= RECOVERY_SHARE * (a_ref - 0.5):
            by_lift = b - b0 + 1
        if by_auc is not None and by_lift is not None:
            break
    return by_auc, by_lift, b_end - b0 + 1


def summarize(
    replay: Replay,
    results: Sequence[StrategyResult],
    bounds: Sequence[int],
    stream: Sequence[Labeled] | None = None,
) -> dict:
    """Per-row (strategies, then baselines), per-period AUC and log loss, overall, SEs, forgetting (JSON-able).

    The SE of each overall AUC is the standard deviation of
    :data:`SE_RESAMPLES` bootstrap resamples of whole impressions (seed
    :data:`SE_SEED`, the same resamples for every row) when ``stream`` is
    given; DeLong's SE (examples independent) is kept beside it.  With the
    same resamples for every row, the difference of each row's AUC to the
    ``default`` strategy's (else the first row's) gets a paired bootstrap SE.
    """
    edges = [-(2**62), *bounds]
    out: dict = {"dataset": replay.name, "periods": len(bounds), "strategies": {}, "baselines": {}}
    clusters = n_clusters = None
    if stream is not None:
        imp: dict[str, int] = {}
        clusters = np.fromiter((imp.setdefault(e.impression_id, len(imp)) for e in stream), dtype=np.int64, count=len(stream))
        n_clusters = len(imp)
        out["se_method"] = f"bootstrap over impressions ({SE_RESAMPLES} resamples, seed {SE_SEED})"
    else:
        out["se_method"] = "DeLong"
    refs = sorted((r for r in results if r.kind == "reference"), key=lambda r: r.name != "oracle")
    ref = refs[0] if refs else None  # the full oracle when it ran, else the first weaker one
    if replay.shift_ts is not None and ref is not None:
        out["recovery"] = {
            "reference": ref.name, "window_batches": RECOVERY_WINDOW, "share": RECOVERY_SHARE, "shift_ts": replay.shift_ts,
        }
    replicates: dict[str, np.ndarray] = {}
    for r in results:
        per_auc, per_ll = [], []
        for k in range(len(bounds)):
            m = (r.ts >= edges[k]) & (r.ts < edges[k + 1])
            per_auc.append(_metric(r.labels[m], r.probs[m], auc))
            per_ll.append(_metric(r.labels[m], r.probs[m], log_loss))
        se_delong = delong_se(r.labels, r.probs) if r.labels.size else math.nan
        se = se_delong
        if clusters is not None and r.index.size and (r.index >= 0).all():
            reps = bootstrap_auc(
                r.labels, r.probs, clusters[r.index], n_clusters=n_clusters, resamples=SE_RESAMPLES, seed=SE_SEED
            )
            se = float(np.nanstd(reps, ddof=1)) if np.isfinite(reps).sum() > 1 else math.nan
            replicates[r.name] = reps
        row = {
            "kind": r.kind,
            "auc_per_period": per_auc,
            "log_loss_per_period": per_ll,
            "auc": _metric(r.labels, r.probs, auc),
            "auc_se": se,
            "auc_se_delong": se_delong,
            "log_loss": _metric(r.labels, r.probs, log_loss),
            "scored_examples": int(r.labels.size),
            "early_auc_after_first_period": r.early_auc_after_first,
            "early_auc_end": r.early_auc_end,
            "forgetting": r.early_auc_after_first - r.early_auc_end,
            "early_auc_after_first_period_stable": r.early_auc_after_first_stable,
            "early_auc_end_stable": r.early_auc_end_stable,
            "forgetting_stable": r.early_auc_after_first_stable - r.early_auc_end_stable,
            "seconds": r.seconds,
            "trained_examples": r.trained_examples,
            "example_updates": r.example_updates,
        }
        if "recovery" in out and ref is not None and r is not ref:
            row["recovery_batches"], row["recovery_batches_lift"], out["recovery"]["post_shift_batches"] = _recovery(
                r, ref, replay.shift_ts
            )
        out["strategies" if r.kind == "strategy" else "baselines"][r.name] = row
    names = [r.name for r in results]
    base = "default" if "default" in names else (names[0] if names else None)
    if base is not None and base in replicates:
        out["diff_to"] = base
        base_row = {**out["strategies"], **out["baselines"]}[base]
        for group in ("strategies", "baselines"):
            for name, row in out[group].items():
                d = replicates.get(name, np.full(1, np.nan)) - replicates[base]
                row["auc_diff"] = row["auc"] - base_row["auc"]
                row["auc_diff_se"] = float(np.nanstd(d, ddof=1)) if name != base and np.isfinite(d).sum() > 1 else math.nan
    if any(r.name == "river-lr" for r in results):
        out["river_version"] = river_version()
    if replay.truth is not None and results:
        ex_ts = np.array([e.impression_ts for e in replay.examples])
        best = []
        for k in range(len(bounds)):
            sel = [e for e, t in zip(replay.examples, ex_ts, strict=True) if edges[k] <= t < edges[k + 1]]
            best.append(float(replay.truth(sel)) if sel else math.nan)
        out["best_auc_per_period"] = best
        out["best_auc"] = float(replay.truth(replay.examples))
    return out


_NOTES = {
    "item-ctr": "item click rate so far (beta-smoothed)",
    "user-cat-ctr": "user x category click rate (decayed)",
    "mf-16": "online logistic MF, k=16",
    "river-lr": "River LogisticRegression, one-hot user/item/genre",
    "oracle": "learnable: knows phi_i, sharpness, bias; learns theta_u",
    "oracle-text": "the same, phi_i counted from the item's words",
    "oracle-category": "the same, phi_i = one-hot of the item's category",
    "oracle-gauss": "as oracle-text, with a Gaussian prior of theta_u",
}


def format_table(summary: dict) -> str:
    periods = summary["periods"]
    strategies, baselines = summary["strategies"], summary.get("baselines", {})
    w = max([14, *(len(n) + 2 for n in (*strategies, *baselines))])
    learned = {k: v for k, v in baselines.items() if v.get("kind") != "reference"}
    refs = {k: v for k, v in baselines.items() if v.get("kind") == "reference"}

    def fmt(x: float | None, width: int = 8) -> str:
        return f"{x:{width}.3f}" if x is not None and x == x else f"{'-':>{width}}"

    cols = "".join(f"{'P' + str(k + 1):>8}" for k in range(periods))
    lines = [f"dataset: {summary['dataset']}", "", "prequential AUC per period"]
    base = summary.get("diff_to")
    diff_head = f"{'- ' + base:>17}" if base else ""
    lines.append(f"{'row':<{w}}" + cols + f"{'overall':>9}{'SE':>8}{diff_head}{'trained':>10}{'updates':>10}{'seconds':>9}")

    def diff(s: dict) -> str:
        if not base:
            return ""
        d, se = s.get("auc_diff"), s.get("auc_diff_se")
        if d is None or d != d or se is None or se != se:
            return f"{'':>17}"
        return f"{f'{d:+.3f} +- {se:.4f}':>17}"

    def auc_row(name: str, s: dict) -> str:
        return (
            f"{name:<{w}}" + "".join(fmt(a) for a in s["auc_per_period"]) + " " + fmt(s["auc"]) + fmt(s.get("auc_se"))
            + diff(s) + f"{s['trained_examples']:>10d}{s.get('example_updates', 0) or '-':>10}{s['seconds']:>9.1f}"
        )

    def section(title: str, rows: dict, fn: Callable[[str, dict], str], notes: bool = True) -> None:
        if rows:
            lines.append(f"-- {title}")
            for name, s in rows.items():
                note = f"   ({_NOTES[name]})" if notes and name in _NOTES else ""
                lines.append(fn(name, s) + note)

    section("strategies", strategies, auc_row)
    section("baselines", learned, auc_row)
    if refs or "best_auc" in summary:
        section("references", refs, auc_row)
        if "best_auc" in summary:
            if not refs:
                lines.append("-- references")
            lines.append(
                f"{'best':<{w}}" + "".join(fmt(a) for a in summary["best_auc_per_period"]) + " " + fmt(summary["best_auc"])
                + "   (true probabilities)"
            )
    footer = [f"SE of the overall AUC: {summary.get('se_method', 'DeLong')}"]
    if base:
        footer.append(f"'- {base}': overall AUC minus {base}'s, +- the paired bootstrap SE of the difference (same resamples)")
    if "river_version" in summary:
        footer.append(f"river-lr ran River {summary['river_version']}")
    strategies = summary["strategies"]
    cont, full = strategies.get("default", {}), strategies.get("retrain", {})
    if cont.get("example_updates") and full.get("example_updates"):
        footer.append(
            f"compute ('updates': examples, replayed ones included, x optimizer steps on them): default "
            f"{cont['example_updates']:,}, retrain {full['example_updates']:,} "
            f"(default = {cont['example_updates'] / full['example_updates']:.2f} x retrain)"
        )
        if "retrain_schedule" in summary:
            footer.append(f"retrain: {summary['retrain_schedule']}")
    lines += footer

    def ll_row(name: str, s: dict) -> str:
        return f"{name:<{w}}" + "".join(fmt(a) for a in s["log_loss_per_period"]) + " " + fmt(s["log_loss"])

    lines += ["", "prequential log loss per period", f"{'row':<{w}}" + cols + f"{'overall':>9}"]
    section("strategies", strategies, ll_row, notes=False)
    section("baselines", learned, ll_row, notes=False)
    section("references", refs, ll_row, notes=False)

    stable = any(
        isinstance(v := s.get("early_auc_end_stable"), float) and not math.isnan(v)
        for rows in (strategies, learned, refs) for s in rows.values()
    )  # fmt: skip (None, from a JSON summary, or NaN: the stream names no stable users)

    def forget_row(name: str, s: dict) -> str:
        row = (
            f"{name:<{w}}{fmt(s['early_auc_after_first_period']):>10}{fmt(s['early_auc_end']):>10}"
            f"{fmt(s['forgetting']):>10}"
        )
        if stable:
            row += "".join(f"{fmt(s.get(k)):>10}" for k in ("early_auc_after_first_period_stable", "early_auc_end_stable", "forgetting_stable"))
        return row + f"{s['trained_examples']:>10d}{s['seconds']:>10.1f}"

    lines += [
        "",
        "forgetting: AUC on the early held-out slice"
        + ("; 'stable': on its examples of the users whose interests did not shift (their labels stay true)" if stable else ""),
        f"{'row':<{w}}{'after P1':>10}{'at end':>10}{'drop':>10}"
        + (f"{'stable P1':>10}{'at end':>10}{'drop':>10}" if stable else "")
        + f"{'trained':>10}{'seconds':>10}",
    ]
    section("strategies", strategies, forget_row, notes=False)
    section("baselines", learned, forget_row, notes=False)
    section("references", refs, forget_row, notes=False)

    rec = summary.get("recovery")
    if rec:
        lines += [
            "",
            f"recovery after the interest shift: batches (of {rec.get('post_shift_batches', '-')} after it) until "
            f"the AUC over the last {rec['window_batches']} batches reaches {rec['share']:.2f} x the "
            f"{rec['reference']}'s on the same examples; 'lift': the same for AUC - 0.5",
            f"{'row':<{w}}{'AUC':>10}{'lift':>10}",
        ]

        def n(b: int | None) -> str:
            return str(b) if b is not None else "never"

        for title, rows in (("strategies", strategies), ("baselines", learned)):
            if rows:
                lines.append(f"-- {title}")
                for name, s in rows.items():
                    lines.append(f"{name:<{w}}{n(s.get('recovery_batches')):>10}{n(s.get('recovery_batches_lift')):>10}")
    return "\n".join(lines)


def plot(replay: Replay, results: Sequence[StrategyResult], bounds: Sequence[int], out: Path, bins: int = 30) -> Path:
    """AUC over event time (equal-count bins of the stream), one line per row (baselines dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts_all = np.array([e.impression_ts for e in replay.examples])
    edges = np.unique(np.quantile(ts_all, np.linspace(0, 1, bins + 1)).astype(np.int64))
    edges[-1] += 1
    mids = [datetime.fromtimestamp((a + b) / 2000, tz=UTC) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(10, 5))
    for r in results:
        ys = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            m = (r.ts >= a) & (r.ts < b)
            ys.append(_metric(r.labels[m], r.probs[m], auc))
        style = {"strategy": "-", "baseline": "--", "reference": "-."}[r.kind]
        ax.plot(mids, ys, marker="." if r.kind == "strategy" else None, ls=style, lw=1.5 if r.kind == "strategy" else 1.0, label=r.name)
    if replay.truth is not None:
        best = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            sel = [e for e, t in zip(replay.examples, ts_all, strict=True) if a <= t < b]
            best.append(replay.truth(sel) if sel else math.nan)
        ax.plot(mids, best, "k:", lw=2, label="best (truth)")
    for b in bounds[:-1]:
        ax.axvline(datetime.fromtimestamp(b / 1000, tz=UTC), color="grey", lw=0.5, ls=":")
    if replay.shift_ts is not None:
        ax.axvline(datetime.fromtimestamp(replay.shift_ts / 1000, tz=UTC), color="red", lw=1, label="drift")
    ax.set_xlabel("event time")
    ax.set_ylabel("prequential AUC")
    ax.set_title(f"{replay.name}: AUC over event time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.autofmt_xdate()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
