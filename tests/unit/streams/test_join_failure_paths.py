"""The join core's failure paths: backfills behind the watermark, clocks far ahead, quiet
partitions, redos after a crash, and many clicks on one unknown impression (issue 12)."""

from __future__ import annotations

import pytest

from contract.records import Click, Impression
from streams.join import Example, JoinConfig, JoinCore, Rejected, reference_join
from tests.unit.streams.test_join import FakeClock, clk, drain, feed, imp, labels, make

HOUR = 3_600_000


def _persisted(core: JoinCore) -> dict:
    """The changelog as it stands: every key written so far, deletions applied."""
    state: dict = {}
    for k, v in core.drain_changes().items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    return state


# --- 1. old data into a partition whose watermark has moved on ------------------------------------


def test_backfill_behind_the_watermark_keeps_its_clicks_as_late_positives() -> None:
    core, _ = make(window_ms=1_000, closed_retention_ms=10_000)
    today = 100 * HOUR
    feed(core, [imp("t", today, ["x"]), clk("t", "x", today)])
    assert core.watermark == today
    # yesterday's logs: the impression closes on arrival, its click follows a moment later
    out = core.on_impression(imp("y", 1_000, ["a", "b"]))
    assert labels(out) == [("y:a", 0, False, 2_000), ("y:b", 0, False, 2_000)]
    out = core.on_click(clk("y", "a", 1_100))
    assert labels(out) == [("y:a", 1, True, 1_100)]
    assert not [o for o in out if isinstance(o, Rejected)] and core.early_clicks == 0
    assert core.counts["behind_watermark_impressions"] == 1
    assert core.counts["behind_watermark_clicks"] == 1


def test_a_backfilled_click_arriving_before_its_impression_waits_for_it() -> None:
    core, _ = make(window_ms=1_000, orphan_grace_ms=500)
    today = 100 * HOUR
    feed(core, [imp("t", today, ["x"]), clk("t", "x", today)])
    out = core.on_click(clk("y", "a", 1_100))  # the clicks topic was read first
    assert not [o for o in out if isinstance(o, Rejected)] and core.early_clicks == 1
    out = core.on_impression(imp("y", 1_000, ["a", "b"]))
    assert sorted(labels(out)) == [("y:a", 1, False, 1_100), ("y:b", 0, False, 2_000)]
    # it still becomes an orphan once the watermark moved on by the grace after its arrival
    core.on_click(clk("z", "a", 1_100))
    out = feed(core, [imp("t2", today + 600, ["x"]), clk("t2", "x", today + 600)])
    assert [o.click.impression_id for o in out if isinstance(o, Rejected)] == ["z"]


def test_a_closed_backfill_is_kept_for_the_retention_from_its_close() -> None:
    core, _ = make(window_ms=1_000, closed_retention_ms=10_000)
    today = 100 * HOUR
    feed(core, [imp("t", today, ["x"]), clk("t", "x", today)])
    core.on_impression(imp("y", 1_000, ["a"]))
    # the retention survives a restore (``until`` is persisted)
    core = JoinCore.restore(core.config, _persisted(core).items(), clock=core._clock)
    feed(core, [imp("t2", today + 9_000, ["x"]), clk("t2", "x", today + 9_000)])
    assert core.remembered_impressions == 3
    assert labels(core.on_click(clk("y", "a", 1_100))) == [("y:a", 1, True, 1_100)]
    feed(core, [imp("t3", today + 20_000, ["x"]), clk("t3", "x", today + 20_000)])
    assert "i/y" not in core.snapshot()  # forgotten once the watermark moved on by the retention


def test_closed_impressions_are_bounded_by_count() -> None:
    core, _ = make(window_ms=100, closed_retention_ms=HOUR, closed_max=3)
    for n in range(20):
        feed(core, [imp(f"i{n}", 1_000 * n, ["a"]), clk(f"i{n}", "a", 1_000 * n)])
    assert core.remembered_impressions <= 3 + core.open_impressions
    assert "i/i19" in core.snapshot() or core.open_impressions  # the newest are the ones kept
    assert "i/i0" not in core.snapshot()


@pytest.mark.parametrize("with_kafka_ts", [False, True])
def test_clicks_produced_after_their_impressions_label_as_the_reference(with_kafka_ts: bool) -> None:
    core, clock = make(window_ms=1_000, orphan_grace_ms=200)
    imps = [imp(f"i{n}", 1_000 + 300 * n, ["a", "b", "c"], user=f"u{n % 3}") for n in range(12)]
    clicks = []
    for n, i in enumerate(imps):
        clicks.append(clk(i.impression_id, "a", i.ts + 100 * (n % 4), user=i.user_id))
        if n % 3 == 0:
            clicks.append(clk(i.impression_id, "b", i.ts + 1_500, user=i.user_id))  # after the window
    clicks.sort(key=lambda c: c.ts)
    out: list = []
    for k, e in enumerate(imps + clicks):  # every impression first, into a fresh core
        kafka = 5_000_000 + 10 * k if with_kafka_ts else None
        out += core.on_impression(e, -1, kafka) if isinstance(e, Impression) else core.on_click(e, -1, kafka)
    out += drain(core, clock)
    ref = reference_join(imps, clicks, window_ms=1_000, history_length=50)
    assert {(o.example_id, o.label) for o in out if isinstance(o, Example)} == ref.pairs()
    assert not [o for o in out if isinstance(o, Rejected)]


# --- 2. a future event time inside the skew bound ----------------------------------------------------


def test_a_clock_ahead_cannot_drag_the_watermark_past_the_kafka_timestamps() -> None:
    core, clock = make(window_ms=60_000, idle_timeout_s=5.0)
    core.on_impression(imp("i", 1_000_000, ["a"]), 0, 1_000_000)
    core.on_impression(imp("bad", 1_000_000 + 20 * HOUR, ["z"]), 1, 1_000_050)  # 20 h ahead
    clock.advance(6)  # clicks never came: idle, the impressions' watermark rules
    assert labels(core.tick()) == []
    assert core.watermark <= 1_000_050 + 6_000 and core.open_impressions == 2
    out = core.on_click(clk("i", "a", 1_010_000), 0, 1_010_000)
    assert labels(out) == [("i:a", 1, False, 1_010_000)]  # not a fake negative plus a late positive


# --- 6. idle closing and redos -----------------------------------------------------------------------


def test_a_quiet_partition_keeps_the_attribution_window() -> None:
    core, clock = make(window_ms=30 * 60_000, allowed_lateness_ms=5_000, idle_timeout_s=10.0)
    feed(core, [imp("i", 1_000_000, ["a", "b"]), clk("i", "a", 1_000_000)])
    for _ in range(120):  # two minutes without a single event
        clock.advance(1)
        assert labels(core.tick()) == []
    assert core.open_impressions == 1
    assert labels(core.on_click(clk("i", "b", 1_100_000))) == [("i:b", 1, False, 1_100_000)]
    clock.advance(30 * 60 + 10)  # quiet for longer than the window: now it closes
    assert labels(core.tick()) == []  # both items were clicked: nothing negative is left
    assert core.open_impressions == 0


def _redo_scenario(clicks_quiet_only: bool) -> tuple[list, list]:
    """(events before the crash point, events after), as (event, kafka ts, wall seconds before)."""
    t0 = 1_000_000
    before = [(imp("w", t0 - 2_000, ["q"]), t0 - 2_000, 0.0), (clk("w", "q", t0 - 1_900), t0 - 1_900, 0.0)]
    after = [(imp("i", t0, ["a", "b"]), t0, 1.9)]
    if clicks_quiet_only:  # impressions keep flowing, clicks are quiet for 70 s
        after += [(imp(f"f{n}", t0 + 1_000 * n, ["c"]), t0 + 1_000 * n, 1.0) for n in range(1, 71)]
    else:  # nothing at all for 70 s
        after += [(imp("f", t0 + 70_000, ["c"]), t0 + 70_000, 70.0)]
    after += [(clk("i", "a", t0 + 30_000), t0 + 70_500, 0.5)]  # a delayed in-window click
    return before, after


@pytest.mark.parametrize("clicks_quiet_only", [False, True])
def test_a_redo_after_a_crash_emits_the_same_labels(clicks_quiet_only: bool) -> None:
    config = JoinConfig(window_ms=60_000, allowed_lateness_ms=0, idle_timeout_s=5.0, orphan_grace_ms=500)
    before, after = _redo_scenario(clicks_quiet_only)

    def run(core: JoinCore, clock: FakeClock, events: list, live: bool) -> list:
        out: list = []
        for event, kafka, wait in events:
            if live:  # the first run: the wall clock passes and the worker ticks every 0.5 s
                while wait > 0:
                    step = min(0.5, wait)
                    clock.advance(step)
                    wait -= step
                    out += core.tick()
            on = core.on_impression if isinstance(event, Impression) else core.on_click
            out += on(event, -1, kafka)
        return out

    clock = FakeClock()
    first = JoinCore(config, clock=clock)
    run(first, clock, before, live=True)
    crash_point = _persisted(first)  # the changelog when the worker dies: the redo starts here
    live = run(first, clock, after, live=True)
    clock = FakeClock()
    redo_core = JoinCore.restore(config, crash_point.items(), clock=clock)
    redo = run(redo_core, clock, after, live=False)  # the same inputs, re-read at once

    def key(outs: list) -> set:
        return {(o.example_id, o.label, o.late) for o in outs if isinstance(o, Example)}

    assert key(live) == key(redo)
    assert ("i:a", 0, False) in key(live) and ("i:a", 1, True) in key(live)  # the window did close


# --- 8. the early-click buffer ---------------------------------------------------------------------


def test_early_clicks_on_one_impression_cost_constant_work_each(monkeypatch) -> None:
    comparisons = 0
    original = Click.__eq__

    def counting_eq(self, other):  # noqa: ANN001, ANN202
        nonlocal comparisons
        comparisons += 1
        return original(self, other)

    monkeypatch.setattr(Click, "__eq__", counting_eq)
    core, _ = make(window_ms=HOUR, orphan_grace_ms=HOUR)
    n = 2_000
    for k in range(n):
        core.on_click(clk("x", "a", 1_000 + k))
    core.on_click(clk("x", "a", 1_000))  # a duplicate is found without scanning
    assert core.early_clicks == n and core.counts["duplicate_clicks"] == 1
    assert comparisons <= 2 * n  # a scan per click would be n * (n - 1) / 2
    out = core.on_impression(imp("x", 1_000, ["a"]))
    assert labels(out) == [("x:a", 1, False, 1_000)] and core.early_clicks == 0


def test_many_early_clicks_expire_as_orphans_oldest_first() -> None:
    core, _ = make(orphan_grace_ms=10, orphan_buffer_max=1_000)
    for k in range(1_500):  # the buffer overflows by 500: the oldest go first
        core.on_click(clk("x", "a", 1_000 + k))
    assert core.early_clicks == 1_000
    out = feed(core, [imp("other", 10_000, ["b"]), clk("other", "b", 10_000)])
    orphans = [o.click.ts for o in out if isinstance(o, Rejected)]
    assert orphans == list(range(1_500, 2_500)) and core.early_clicks == 0
