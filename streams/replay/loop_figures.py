"""The closed loop's figures: click rate against the optimal policy's per window, recovery after
the interest shift, paired differences between arms, and their printed tables and JSON line.

Pure functions of the :class:`~streams.replay.simulate.Outcome` list of a run (no Kafka).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FALLBACK_PREFIX = "fallback:"
"""How a fallback answer's model_version starts."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request, what it was shown and what the user did."""

    index: int
    request_id: str
    user_id: str
    ts: int
    model_version: str
    items: tuple[str, ...]
    propensities: tuple[float, ...] | None
    clicked: tuple[int, ...]
    """Positions clicked."""
    expected: float
    """Expected clicks of the slate shown (truth times position factor)."""
    optimal: float
    latency_s: float
    """Wall time from the request sent to its answer read."""

    @property
    def trained(self) -> bool:
        """Answered by a trained version (not a fallback)."""
        return not self.model_version.startswith(FALLBACK_PREFIX)

    @property
    def clicks(self) -> int:
        return len(self.clicked)




def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


@dataclass(frozen=True)
class WindowRow:
    start: int
    end: int
    """Requests ``start`` .. ``end - 1``."""
    realised: int
    expected: float
    optimal: float
    trained: int
    """Requests answered by a trained version."""
    versions: tuple[str, ...]
    phase: str
    """``before``, ``after`` or ``shift`` (the window holds the shift)."""

    @property
    def ratio(self) -> float:
        """Realised click rate / optimal."""
        return ratio(self.realised, self.optimal)

    @property
    def expected_ratio(self) -> float:
        return ratio(self.expected, self.optimal)


def window_rows(outcomes: Sequence[Outcome], size: int, shift_index: int | None) -> list[WindowRow]:
    rows = []
    for start in range(0, len(outcomes), size):
        part = outcomes[start : start + size]
        end = start + len(part)
        if shift_index is None or end <= shift_index:
            phase = "before"
        elif start >= shift_index:
            phase = "after"
        else:
            phase = "shift"
        rows.append(WindowRow(
            start, end, sum(o.clicks for o in part), float(sum(o.expected for o in part)),
            float(sum(o.optimal for o in part)), sum(o.trained for o in part),
            tuple(sorted({o.model_version for o in part}, key=_version_key)), phase,
        ))  # fmt: skip
    return rows


def _version_key(v: str) -> tuple[int, str]:
    return (0, v) if v.startswith(FALLBACK_PREFIX) else (1, f"{int(v):012d}" if v.isdigit() else v)


def trailing_ratio(values: np.ndarray, optimal: np.ndarray, size: int) -> np.ndarray:
    """``sum(values[n-size+1 .. n]) / sum(optimal[...])`` for every ``n`` (NaN while ``n < size - 1``)."""
    out = np.full(len(values), np.nan)
    if len(values) < size:
        return out
    cv, co = np.cumsum(np.r_[0.0, values]), np.cumsum(np.r_[0.0, optimal])
    num, den = cv[size:] - cv[:-size], co[size:] - co[:-size]
    out[size - 1 :] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _part(realised: np.ndarray, expected: np.ndarray, optimal: np.ndarray) -> dict[str, Any]:
    return {
        "requests": len(realised),
        "ratio": ratio(float(realised.sum()), float(optimal.sum())),
        "expected_ratio": ratio(float(expected.sum()), float(optimal.sum())),
        "clicks_per_request": float(realised.mean()) if len(realised) else float("nan"),
        "optimal_per_request": float(optimal.mean()) if len(optimal) else float("nan"),
    }


def first_trained(outcomes: Sequence[Outcome]) -> int | None:
    """Position of the first outcome answered by a trained version (None: only fallbacks)."""
    return next((n for n, o in enumerate(outcomes) if o.trained), None)


def summarize(
    outcomes: Sequence[Outcome], *, shift_index: int | None, window: int, recover_to: float
) -> dict[str, Any]:
    """The figures of one run (see the module doc); NaN/None where a part is empty."""
    realised = np.array([o.clicks for o in outcomes], dtype=np.float64)
    expected = np.array([o.expected for o in outcomes])
    optimal = np.array([o.optimal for o in outcomes])
    n = len(outcomes)
    s = shift_index if shift_index is not None else n
    trained = sum(o.trained for o in outcomes)
    first = first_trained(outcomes)
    out: dict[str, Any] = {
        "requests": n,
        "overall": _part(realised, expected, optimal),
        "before": _part(realised[:s], expected[:s], optimal[:s]),
        "before_last_window": _part(
            realised[max(0, s - window) : s],
            expected[max(0, s - window) : s],
            optimal[max(0, s - window) : s],
        ),  # fmt: skip
        "after": None,
        "after_last_window": None,
        "lowest_window_after": None,
        "recovery_requests": None,
        "recovery_requests_expected": None,
        "shift_index": shift_index,
        "window": window,
        "recover_to": recover_to,
        "cumulative": {
            "clicks": int(realised.sum()),
            "expected": float(expected.sum()),
            "optimal": float(optimal.sum()),
            "regret": float(optimal.sum() - realised.sum()),
        },
        "first_trained_request": outcomes[first].index if first is not None else None,
        "trained_share": trained / n if n else float("nan"),
        "versions_served": sorted({o.model_version for o in outcomes}, key=_version_key),
        "median_latency_s": float(np.median([o.latency_s for o in outcomes]))
        if n
        else float("nan"),
    }
    if shift_index is not None and shift_index < n:
        out["after"] = _part(realised[s:], expected[s:], optimal[s:])
        out["after_last_window"] = _part(realised[-window:], expected[-window:], optimal[-window:])
        for key, values in (
            ("recovery_requests", realised),
            ("recovery_requests_expected", expected),
        ):
            r = trailing_ratio(values, optimal, window)
            ends = np.arange(n)
            ok = (ends - window + 1 >= s) & (r >= recover_to)
            out[key] = int(ends[ok][0] - s + 1) if ok.any() else None
        r = trailing_ratio(realised, optimal, window)
        after = r[s + window - 1 :] if s + window - 1 < n else np.array([])
        out["lowest_window_after"] = (
            float(np.nanmin(after)) if len(after) and np.isfinite(after).any() else None
        )
    return out


def paired_difference(
    a: Sequence[Outcome], b: Sequence[Outcome], start: int = 0
) -> dict[str, float]:
    """Clicks of ``a`` minus those of ``b`` on the same requests (from ``start``), and its standard error.

    The same request has the same user, time and (common) random numbers in both runs.
    """
    da = np.array([o.clicks for o in a[start:]], dtype=np.float64)
    db = np.array([o.clicks for o in b[start:]], dtype=np.float64)
    m = min(len(da), len(db))
    d = da[:m] - db[:m]
    if m < 2:
        return {"requests": m, "difference": float(d.sum()), "se": float("nan")}
    return {"requests": m, "difference": float(d.sum()), "se": float(d.std(ddof=1) * math.sqrt(m))}


# --------------------------------------------------------------------------- printing
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_windows(rows_by_arm: Mapping[str, Sequence[WindowRow]]) -> str:
    """One line per window: optimal clicks per request, then realised (expected) / optimal per arm."""
    arms = list(rows_by_arm)
    first = rows_by_arm[arms[0]]
    head = f"{'requests':>13} {'opt/req':>7}  " + "  ".join(f"{a[:15]:>15}" for a in arms)
    lines = [head]
    for i, row in enumerate(first):
        cells = []
        for a in arms:
            rows = rows_by_arm[a]
            if i < len(rows):
                cells.append(f"{_fmt(rows[i].ratio)} ({_fmt(rows[i].expected_ratio)})".rjust(15))
            else:
                cells.append(f"{'–':>15}")
        mark = " <- shift" if row.phase == "shift" else ""
        opt = row.optimal / max(row.end - row.start, 1)
        lines.append(f"{row.start:>6}-{row.end - 1:<6} {opt:>7.2f}  " + "  ".join(cells) + mark)
    return "\n".join(lines)


def format_window_details(rows: Sequence[WindowRow]) -> str:
    """One arm's windows with the counts behind the ratios."""
    lines = [f"{'requests':>13} {'clicks':>7} {'expected':>9} {'optimal':>9} {'ratio':>6} {'exp.ratio':>9} "
             f"{'trained':>7}  versions"]  # fmt: skip
    for r in rows:
        vs = list(r.versions)
        shown_vs = ", ".join(vs if len(vs) <= 4 else [*vs[:2], "...", vs[-1]])
        mark = "  <- shift" if r.phase == "shift" else ""
        lines.append(f"{r.start:>6}-{r.end - 1:<6} {r.realised:>7} {r.expected:>9.1f} {r.optimal:>9.1f} "
                     f"{_fmt(r.ratio):>6} {_fmt(r.expected_ratio):>9} {r.trained:>7}  {shown_vs}{mark}")  # fmt: skip
    return "\n".join(lines)


def format_summary(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Per arm: click rate / optimal before and after the shift, recovery, cumulative reward."""
    any_s = next(iter(summaries.values()))
    w, to = any_s["window"], any_s["recover_to"]
    head = (f"{'arm':<22} {'before':>7} {'bef.last':>8} {'after':>7} {'aft.last':>8} {'lowest':>7} "
            f"{'recover':>8} {'clicks':>7} {'optimal':>8} {'regret':>7} {'trained':>7}")  # fmt: skip
    lines = [
        f"click rate / optimal (realised clicks over the optimal policy's expected clicks); "
        f"'last' = the last {w} requests of the phase, 'lowest' = the worst trailing {w} after the shift,",
        f"'recover' = requests after the shift until a trailing {w} is back at {to:.0%} of optimal "
        "(by realised clicks; – = not within the run)",
        head,
    ]
    for arm, s in summaries.items():
        after = s["after"] or {}
        aft_last = s["after_last_window"] or {}
        rec = s["recovery_requests"]
        c = s["cumulative"]
        lines.append(
            f"{arm[:22]:<22} {_fmt(s['before']['ratio']):>7} {_fmt(s['before_last_window']['ratio']):>8} "
            f"{_fmt(after.get('ratio')):>7} {_fmt(aft_last.get('ratio')):>8} {_fmt(s['lowest_window_after']):>7} "
            f"{(str(rec) if rec is not None else '–'):>8} {c['clicks']:>7,} {c['optimal']:>8,.0f} "
            f"{c['regret']:>7,.0f} {_fmt(s['trained_share'], '.0%'):>7}"
        )
    return "\n".join(lines)


def json_line(obj: Any) -> str:
    """One line of JSON, NaN and infinities as null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), sort_keys=False)


