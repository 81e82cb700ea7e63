"""The pipeline report: its figures, their printed form, the plot.

:class:`PipelineReport` holds what :func:`harness.pipeline_figures.build_report`
computed from the records of one run (see :mod:`harness.pipeline` for what each
figure means); :meth:`PipelineReport.format` prints it and
:func:`plot_report` draws the prequential metrics over event time and the
freshness CDFs.  :class:`SameRequests` is the model against the popularity
fallback on the same measured requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DAY_MS = 86_400_000


@dataclass(frozen=True)
class SameRequests:
    """Hit rates of the model and of the fallback on the same measured requests."""

    k: int
    model_hits: list[bool]
    fallback_hits: list[bool]

    @property
    def n(self) -> int:
        return len(self.model_hits)

    def rates(self) -> dict[str, float]:
        """model / fallback hit rates, their standard errors, and the paired difference's."""
        n = self.n
        if n == 0:
            return {}
        m = np.asarray(self.model_hits, dtype=np.float64)
        f = np.asarray(self.fallback_hits, dtype=np.float64)
        d = m - f
        return {
            "model": float(m.mean()), "model_se": float(math.sqrt(m.mean() * (1 - m.mean()) / n)),
            "fallback": float(f.mean()), "fallback_se": float(math.sqrt(f.mean() * (1 - f.mean()) / n)),
            "diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        }

    def format(self) -> list[str]:
        if not self.n:
            return ["  hit rate@k: no measured request was answered by a trained version"]
        r = self.rates()
        return [
            f"  hit rate@{self.k} on the same {self.n:,} measured requests answered by trained versions "
            "(the fallback's top-k recomputed per request from the clicks serving had seen):",
            f"    model {r['model']:.3f} ± {r['model_se']:.3f}, popularity fallback {r['fallback']:.3f} ± "
            f"{r['fallback_se']:.3f}; model − fallback {r['diff']:+.3f} ± {r['diff_se']:.3f} (paired se)",
        ]


@dataclass
class PipelineReport:
    events: dict[str, int]
    labeled_positives: int
    labeled_negatives: int
    labeled_late: int
    labeled_duplicates: int
    labels_match_reference: bool
    reference_positives: int
    reference_negatives: int
    labels_missing: int
    labels_unexpected: int
    dead_letters: int
    versions: list[dict[str, Any]]
    versions_after_start: int
    requests_sent: int
    recommendations: int
    recommendations_by_version: dict[str, int]
    hit_rate: dict[str, float]
    hit_requests: dict[str, int]
    same_requests: SameRequests
    """Measured requests answered by trained versions, scored the fallback's way too."""
    version_bytes: dict[str, tuple[int, int]]
    """kind -> (versions, bytes of weights) of the announced versions whose manifest was readable."""
    versions_unreadable: int
    refusals: dict[str, int]
    """Guardrail refusals by reason (from the trainer's log)."""
    freshness_trained_s: list[float]
    freshness_served_s: list[float]
    clicks_total: int
    trainer_caught_up: bool
    labeled_rate: float
    """Labeled examples per second the join emitted, first to last (wall clock)."""
    trainer_rate: float
    """Labeled examples per second the trainer consumed, first to last published version."""
    elapsed_s: float
    plot: Path | None = None

    def percentiles(self, values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))

    def format(self) -> str:
        lines = [*self._input_lines(), *self._version_lines(), *self._serving_lines()]
        if self.plot:
            lines.append(f"plot:           {self.plot}")
        lines.append(f"elapsed:        {self.elapsed_s:.0f} s")
        return "\n".join(lines)

    def _input_lines(self) -> list[str]:
        """Events in, labels against the reference, dead letters."""
        return [
            "== streamrec pipeline report ==",
            f"events in:      {self.events.get('items', 0):,} items, {self.events.get('impressions', 0):,} "
            f"impressions, {self.events.get('clicks', 0):,} clicks",
            f"labeled:        {self.labeled_positives:,} positives, {self.labeled_negatives:,} negatives "
            f"({self.labeled_late:,} late, {self.labeled_duplicates:,} redelivered duplicates)",
            f"  vs reference: {'exact match' if self.labels_match_reference else 'MISMATCH'} "
            f"({self.reference_positives:,} + {self.reference_negatives:,} expected; "
            f"{self.labels_missing} missing, {self.labels_unexpected} unexpected)",
            f"dead letters:   {self.dead_letters:,}",
        ]

    def _version_lines(self) -> list[str]:
        """Versions published, the guardrail's refusals, bytes written, prequential metrics."""
        last = self.versions[-1] if self.versions else {}
        lines = [
            f"versions:       {len(self.versions)} published"
            + (f", last v{last['version']} after {last['trained_examples']:,} trained examples" if last else "")
            + ("" if self.trainer_caught_up else " (trainer had NOT caught up with `labeled` at the end)"),
            "guardrail:      " + (", ".join(f"{n} refused ({r})" for r, n in self.refusals.items() if n)
                                  or "no candidate refused"),
        ]
        if not self.versions:
            lines.append("                no version was published: every candidate was refused, so the "
                         "popularity fallback served throughout")
        if self.version_bytes or self.versions_unreadable:
            parts = [f"{kind} {n} version{'s' if n != 1 else ''}, {b / 1e6:,.1f} MB "
                     f"({b / 1e6 / max(n, 1):,.1f} MB each)"
                     for kind, (n, b) in sorted(self.version_bytes.items())]
            lines.append("weights written: " + "; ".join(parts)
                         + (f" ({self.versions_unreadable} manifests unreadable)" if self.versions_unreadable else ""))
        if self.versions:
            lines.append("prequential metrics (as published, over event time):")
            # with STREAMREC_TRAINER_OPE_GATE on or report: the SNIPS click rate of the version's top-1
            ope = any("ope_snips" in v["metrics"] for v in self.versions)
            lines.append(f"  {'version':>7} {'kind':>5} {'event time':>19} {'examples':>9} {'AUC(win)':>9} "
                         f"{'logloss(win)':>12} {'AUC(all)':>9} {'logloss(all)':>12} "
                         f"{'AUC(held)':>9} {'fallback(held)':>14}" + (f" {'OPE top-1 (SNIPS ± se)':>22}" if ope else ""))
            step = max(1, len(self.versions) // 12)
            shown = self.versions[::step] + ([] if (len(self.versions) - 1) % step == 0 else self.versions[-1:])
            lines.extend(_version_row(v) + (_ope_cell(v["metrics"]) if ope else "") for v in shown)
        return lines

    def _serving_lines(self) -> list[str]:
        """Recommendations, hit rates, throughput, freshness."""
        fr_t = self.percentiles(self.freshness_trained_s)
        fr_s = self.percentiles(self.freshness_served_s)
        lines = [
            f"recommendations: {self.recommendations:,} for {self.requests_sent:,} requests; "
            f"{self.recommendations_by_version.get('fallback', 0):,} by the popularity fallback, "
            f"{self.recommendations_by_version.get('model', 0):,} by trained versions",
            *self.same_requests.format(),
        ]
        if self.hit_requests.get("fallback"):
            n = self.hit_requests["fallback"]
            p = self.hit_rate["fallback"]
            lines.append(
                f"  hit rate@k of the requests the fallback answered itself (no version live yet): "
                f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f} over {n:,} measured requests"
            )
        lines += [
            f"throughput:     the join emitted {self.labeled_rate:,.0f} labeled/s; the trainer consumed "
            f"{self.trainer_rate:,.0f}/s (a trainer slower than the join builds a backlog, and the "
            "backlog is the freshness)",
            f"freshness:      click → first version trained on it: p50 {fr_t[0]:.1f} s, p99 {fr_t[1]:.1f} s "
            f"({len(self.freshness_trained_s):,} of {self.clicks_total:,} clicks)",
            f"                click → first recommendation by that version: p50 {fr_s[0]:.1f} s, "
            f"p99 {fr_s[1]:.1f} s ({len(self.freshness_served_s):,} clicks)",
        ]
        return lines


def _version_row(v: dict[str, Any]) -> str:
    m = v["metrics"]
    return (
        f"  {v['version']:>7} {v['kind']:>5} {_fmt_ts(v['event_ts']):>19} {v['trained_examples']:>9,} "
        f"{_f(m.get('prequential_window_auc')):>9} "
        f"{_f(m.get('prequential_window_log_loss')):>12} "
        f"{_f(m.get('prequential_cumulative_auc')):>9} "
        f"{_f(m.get('prequential_cumulative_log_loss')):>12} "
        f"{_f(m.get('holdout_auc')):>9} "
        f"{_f(m.get('holdout_fallback_auc')):>14}"
    )


def _ope_cell(m: dict[str, Any]) -> str:
    v, se = m.get("ope_snips"), m.get("ope_snips_se")
    return f" {_f(v) + (f' ± {se:.4f}' if se is not None and np.isfinite(se) else ''):>22}"


def _f(x: Any) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _fmt_ts(ms: int | None) -> str:
    return "—" if not ms else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def plot_report(report: PipelineReport, path: Path) -> Path:
    """Prequential AUC and log loss over event time, and the freshness CDFs, in one PNG."""
    import matplotlib  # lazy: matplotlib takes a second to import, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    vs = [v for v in report.versions if v["event_ts"]]
    days = [(v["event_ts"] - vs[0]["event_ts"]) / DAY_MS for v in vs] if vs else []
    for key, label in (("prequential_window_auc", "AUC (sliding window)"),
                       ("prequential_cumulative_auc", "AUC (cumulative)")):
        axes[0].plot(days, [v["metrics"].get(key, np.nan) for v in vs], marker=".", label=label)
    axes[0].set(title="prequential AUC over event time", xlabel="event time (days)", ylabel="AUC")
    axes[0].legend()
    for key, label in (("prequential_window_log_loss", "log loss (sliding window)"),
                       ("prequential_cumulative_log_loss", "log loss (cumulative)")):
        axes[1].plot(days, [v["metrics"].get(key, np.nan) for v in vs], marker=".", label=label)
    axes[1].set(title="prequential log loss over event time", xlabel="event time (days)", ylabel="log loss")
    axes[1].legend()
    for values, label in ((report.freshness_trained_s, "click → version trained on it"),
                          (report.freshness_served_s, "click → first recommendation by it")):
        if values:
            xs = np.sort(values)
            axes[2].plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    axes[2].set(title="freshness (CDF over clicks)", xlabel="seconds", ylabel="fraction of clicks")
    if report.freshness_trained_s or report.freshness_served_s:  # no curve, no legend (matplotlib warns)
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
