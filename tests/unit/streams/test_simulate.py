"""The closed loop's world and figures, without Kafka (streams.replay.simulate)."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import ConfigError
from contract.records import Recommendation, ScoredItem
from streams.replay.loop_figures import (
    Outcome,
    format_summary,
    format_window_details,
    format_windows,
    paired_difference,
    summarize,
    trailing_ratio,
    window_rows,
)
from streams.replay.simulate import LoopConfig, LoopWorld, request_ids, shared_namespace, shown

SMALL = LoopConfig(users=20, items=40, new_items=10, requests=200, k=5, window=50, seed=3)


def _answer(
    world: LoopWorld, e: int, rows: list[int], version: str = "1", prop: float | None = None
) -> Recommendation:
    items = [ScoredItem(item_id=world.item_ids[r], score=0.0, propensity=prop) for r in rows]
    return Recommendation(
        request_id=f"r{e}", user_id=world.request_user[e], items=items, model_version=version, ts=0
    )


def test_the_optimal_is_the_true_top_k_of_the_items_arrived() -> None:
    world = LoopWorld(SMALL)
    opt = world.optimal()
    for e in (0, 77, 199):
        n = world.arrived(int(world.request_ts[e]))
        p = np.array([world.world.probability(world.request_user[e], world.item_ids[i], int(world.request_ts[e]))
                      for i in range(n)])  # fmt: skip
        assert opt[e] == pytest.approx(np.sort(p)[::-1][: SMALL.k].sum())
        best = list(np.argsort(-p)[: SMALL.k])
        outcome, _, _ = shown(world, e, _answer(world, e, best), 0.0)
        assert outcome.expected == pytest.approx(opt[e])
    assert world.initial_items == SMALL.items
    assert world.shift_index is not None and world.request_ts[world.shift_index] >= world.shift_ts


def test_shown_builds_the_impression_and_draws_the_same_clicks_every_time() -> None:
    world = LoopWorld(SMALL)
    rec = _answer(world, 5, [0, 1, 2, 3, 4], version="7", prop=0.5)
    a, imp, clicks = shown(world, 5, rec, 0.1)
    b, _, clicks2 = shown(world, 5, rec, 0.2)
    assert a.clicked == b.clicked and [c.to_json() for c in clicks] == [
        c.to_json() for c in clicks2
    ]
    assert imp is not None
    assert imp.request_id == imp.impression_id == "r5" and imp.model_version == "7"
    assert imp.propensities == [0.5] * 5 and imp.ts == int(world.request_ts[5])
    assert all(c.ts > imp.ts and c.item_id in imp.items for c in clicks)
    # greedy answers carry no propensity: none is invented
    _, imp2, _ = shown(world, 5, _answer(world, 5, [0, 1, 2, 3, 4]), 0.0)
    assert imp2 is not None and imp2.propensities is None


def test_position_bias_lowers_the_lower_positions() -> None:
    cfg = LoopConfig(users=20, items=40, new_items=0, requests=10, k=5, position_bias=0.5)
    world = LoopWorld(cfg)
    out, imp, _ = shown(world, 0, _answer(world, 0, [0, 1, 2, 3, 4]), 0.0)
    truth = world.truth(0)[:5]
    assert out.expected == pytest.approx(float((truth * 0.5 ** np.arange(5)).sum()))
    assert imp is not None and imp.context is not None
    assert imp.context["p_click"][4] == pytest.approx(truth[4] / 16, abs=1e-6)


def _outcome(i: int, clicks: int, optimal: float = 10.0, version: str = "1") -> Outcome:
    return Outcome(
        i, f"r{i}", "u", i, version, (), None, tuple(range(clicks)), float(clicks), optimal, 0.0
    )


def test_summary_recovery_and_windows() -> None:
    # 100 requests at 9/10 of optimal, the shift at 100, then 30 at 3/10, then back at 9/10
    outs = [_outcome(i, 9, version="fallback:popularity" if i < 10 else "1") for i in range(100)]
    outs += [_outcome(100 + i, 3) for i in range(30)] + [_outcome(130 + i, 9) for i in range(70)]
    s = summarize(outs, shift_index=100, window=20, recover_to=0.85)
    assert s["before"]["ratio"] == pytest.approx(0.9)
    assert s["before_last_window"]["ratio"] == pytest.approx(0.9)
    assert s["lowest_window_after"] == pytest.approx(0.3)
    # the first trailing 20 at >= 0.85 holds at most one bad request (19 x 9 + 3 = 174 of 200; two: 0.84):
    # it ends at request 148, the 49th after the shift
    assert s["recovery_requests"] == 49
    assert s["first_trained_request"] == 10 and s["trained_share"] == pytest.approx(0.95)
    assert s["cumulative"]["clicks"] == 9 * 170 + 3 * 30
    rows = window_rows(outs, 50, 100)
    assert [r.phase for r in rows] == ["before", "before", "after", "after"]
    assert rows[2].ratio == pytest.approx((30 * 3 + 20 * 9) / 500)
    assert np.isnan(trailing_ratio(np.ones(3), np.ones(3), 5)).all()
    # the printed tables: one line per window, each arm's realised (expected) ratio
    table = format_windows({"arm a": rows, "arm b": rows})
    assert "arm a" in table and f"{rows[2].ratio:.3f} ({rows[2].expected_ratio:.3f})" in table
    assert len(format_window_details(rows).splitlines()) >= len(rows)
    assert "arm a" in format_summary({"arm a": s})


def test_paired_difference() -> None:
    a = [_outcome(i, 5) for i in range(10)]
    b = [_outcome(i, 4 if i % 2 else 5) for i in range(10)]
    d = paired_difference(a, b)
    assert d["difference"] == 5 and d["se"] > 0
    assert paired_difference(a, b, start=5)["requests"] == 5


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="position_bias"):
        LoopConfig(position_bias=0.0)
    with pytest.raises(ConfigError, match="k"):
        LoopConfig(items=5, k=10)


def test_request_ids_are_shared_by_the_arms_of_a_seed() -> None:
    # serving's tie-break and exploration draw from the request id: common random numbers need the same ids
    cfg = LoopConfig(requests=50, seed=3)
    ids = request_ids(cfg, shared_namespace(cfg))
    assert ids == request_ids(LoopConfig(requests=50, seed=3), shared_namespace(LoopConfig(seed=3)))
    assert len(set(ids)) == 50
    assert set(ids).isdisjoint(request_ids(cfg, shared_namespace(LoopConfig(seed=4))))
