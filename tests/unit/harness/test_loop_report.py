"""make loop's paired comparisons (harness/loop.py): all requests, after the shift, and both trained."""

from __future__ import annotations

from types import SimpleNamespace

from harness.loop import comparisons, format_comparisons
from streams.replay.loop_figures import FALLBACK_PREFIX, Outcome


def _arm(name: str, clicks: list[int], first_trained: int | None) -> SimpleNamespace:
    outcomes = [
        Outcome(index=i, request_id=f"r{i}", user_id="u", ts=i, items=("a", "b"), propensities=None,
                model_version="3" if first_trained is not None and i >= first_trained else f"{FALLBACK_PREFIX}popularity",
                clicked=tuple(range(c)), expected=float(c), optimal=2.0, latency_s=0.0)
        for i, c in enumerate(clicks)
    ]  # fmt: skip
    return SimpleNamespace(arm=SimpleNamespace(name=name), run=SimpleNamespace(outcomes=outcomes, shift_index=4))


def test_both_trained_starts_where_the_later_arm_got_its_first_version() -> None:
    explore = _arm("explore", [0, 0, 0, 1, 2, 2, 1, 2], first_trained=2)
    greedy = _arm("greedy", [0, 0, 0, 2, 2, 1, 1, 1], first_trained=3)
    popularity = _arm("popularity", [0] * 8, first_trained=None)
    comp = comparisons([explore, greedy, popularity])  # type: ignore[list-item]
    eg = comp["explore - greedy"]
    assert eg["all"]["difference"] == 1 and eg["after_shift"]["difference"] == 2
    # from request 3 (greedy's first trained one): 1+2+2+1+2 - (2+2+1+1+1) = 1
    assert eg["both_trained"]["from_request"] == 3 and eg["both_trained"]["requests"] == 5
    assert eg["both_trained"]["difference"] == 1
    assert comp["explore - popularity"]["both_trained"] is None  # popularity never trains
    text = format_comparisons(comp)
    assert "both trained (from request 3)" in text and text.count("both trained") == 1
