"""The join's failure paths (issue 12): backfills behind the watermark, clocks ahead, quiet live
partitions, and the early-click buffer under a flood.  Pure core, no broker."""

from __future__ import annotations

import random

from contract.records import Click, Impression
from streams.join import Example, JoinConfig, JoinCore, Rejected, reference_join

HOUR = 3_600_000
WINDOW = 30 * 60_000
NOW_MS = 1_790_000_000_000  # the wall clock of these tests (December 2026)


class Clocks:
    """A monotonic clock and a wall clock that advance together."""

    def __init__(self, wall_ms: int = NOW_MS) -> None:
        self.mono = 1000.0
        self.wall_s = wall_ms / 1000

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_s += seconds


def make(**kw) -> tuple[JoinCore, Clocks]:
    clocks = Clocks()
    cfg = dict(window_ms=WINDOW, allowed_lateness_ms=5_000, idle_timeout_s=10.0, positives_at_close=False)
    cfg.update(kw)
    return JoinCore(JoinConfig(**cfg), clock=lambda: clocks.mono, wall=lambda: clocks.wall_s), clocks


def imp(iid: str, ts: int, items: list[str], user: str = "u1") -> Impression:
    return Impression(impression_id=iid, user_id=user, items=items, ts=ts)


def clk(iid: str, item: str, ts: int, user: str = "u1") -> Click:
    return Click(impression_id=iid, user_id=user, item_id=item, ts=ts)


def examples(outs: list) -> set[tuple[str, int, bool]]:
    return {(o.example_id, o.label, o.late) for o in outs if isinstance(o, Example)}


def orphans(outs: list) -> list[Rejected]:
    return [o for o in outs if isinstance(o, Rejected) and o.orphan]


# --- item 1: old data into a partition whose watermark has moved on ---------------------------
def test_backfill_behind_the_watermark_keeps_every_click_as_a_late_positive() -> None:
    core, _ = make()
    out = core.on_impression(imp("today", NOW_MS, ["x"], user="live"))
    out += core.on_click(clk("today", "x", NOW_MS + 1_000, user="live"))
    assert core.watermark > NOW_MS - HOUR
    old = NOW_MS - 3 * 365 * 24 * HOUR  # three years back
    backfill = []
    for i in range(50):
        backfill.append(imp(f"b{i}", old + i * 1000, ["a", "b", "c"]))
        backfill.append(clk(f"b{i}", "b", old + i * 1000 + 500))
    out = []
    for e in backfill:
        out += core.on_impression(e) if isinstance(e, Impression) else core.on_click(e)
    assert not orphans(out), [o.reason for o in orphans(out)]
    got = examples(out)
    for i in range(50):
        assert (f"b{i}:b", 1, True) in got  # late: its negative went out when it arrived
        assert (f"b{i}:a", 0, False) in got and (f"b{i}:c", 0, False) in got
    assert core.counts["behind_impressions"] == 50
    assert core.counts["behind_clicks"] == 50


def test_backfill_clicks_arriving_before_their_impressions_still_join() -> None:
    core, _ = make()
    core.on_impression(imp("today", NOW_MS, ["x"], user="live"))
    core.on_click(clk("today", "x", NOW_MS, user="live"))
    old = NOW_MS - 400 * 24 * HOUR
    out = core.on_click(clk("b", "a", old + 10))  # past its grace on arrival: held, not an orphan
    assert not orphans(out)
    assert core.counts["behind_early_clicks"] == 1
    out = core.on_impression(imp("b", old, ["a", "z"]))
    # matched before the impression closes: a positive (not even late); "z" is its negative
    assert examples(out) == {("b:a", 1, False), ("b:z", 0, False)}
    assert not orphans(out)


def test_held_backfill_impressions_are_bounded_by_arrivals() -> None:
    core, _ = make(late_hold_events=10)
    core.on_impression(imp("today", NOW_MS, ["x"], user="live"))
    core.on_click(clk("today", "x", NOW_MS, user="live"))
    old = NOW_MS - 10 * 24 * HOUR
    for i in range(100):
        core.on_impression(imp(f"b{i}", old + i, ["a"]))
    assert core.remembered_impressions <= 1 + 11
    out = core.on_click(clk("b0", "a", old + 1))  # long forgotten: an orphan, not a crash
    out += core.on_click(clk("b99", "a", old + 100))  # recent: a late positive
    assert ("b99:a", 1, True) in examples(out)


def test_held_early_click_is_an_orphan_once_its_hold_is_over() -> None:
    core, _ = make(late_hold_events=5)
    core.on_impression(imp("today", NOW_MS, ["x"], user="live"))
    core.on_click(clk("today", "x", NOW_MS, user="live"))
    old = NOW_MS - 10 * 24 * HOUR
    out = core.on_click(clk("never", "a", old))
    for i in range(6):
        out += core.on_impression(imp(f"t{i}", NOW_MS + i, ["x"], user="live"))
    assert [o.click.impression_id for o in orphans(out)] == ["never"]


def test_clicks_produced_after_their_impressions_into_a_fresh_core_label_exactly() -> None:
    rng = random.Random(3)
    imps, clicks = [], []
    for i in range(300):
        ts = NOW_MS - 5 * HOUR + i * 20_000
        items = [f"m{rng.randrange(40)}" for _ in range(4)]
        items = list(dict.fromkeys(items))
        imps.append(imp(f"i{i}", ts, items, user=f"u{i % 7}"))
        if rng.random() < 0.5:
            clicks.append(clk(f"i{i}", items[0], ts + rng.randrange(WINDOW + 60_000), user=f"u{i % 7}"))
    clicks.sort(key=lambda c: c.ts)
    core, clocks = make()
    out = []
    for e in imps:  # every impression first, then every click (a backfill of today)
        out += core.on_impression(e)
    for c in clicks:
        out += core.on_click(c)
    clocks.advance(11)
    out += core.tick()
    assert not orphans(out)
    ref = reference_join(imps, clicks, window_ms=WINDOW)
    assert {(o.example_id, o.label) for o in out if isinstance(o, Example)} == {
        (r.example_id, r.label) for r in ref.examples
    }


def test_held_state_survives_a_restore() -> None:
    core, _ = make()
    core.on_impression(imp("today", NOW_MS, ["x"], user="live"))
    core.on_click(clk("today", "x", NOW_MS, user="live"))
    old = NOW_MS - 10 * 24 * HOUR
    core.on_impression(imp("b", old, ["a", "c"]))
    core.on_click(clk("early", "a", old))
    core.drain_changes()
    state = list(core.snapshot().items())
    clocks = Clocks()
    again = JoinCore.restore(core.config, state, clock=lambda: clocks.mono, wall=lambda: clocks.wall_s)
    out = again.on_click(clk("b", "a", old + 5))
    assert ("b:a", 1, True) in examples(out)
    out = again.on_impression(imp("early", old - 10, ["a"]))
    assert {(e, lab) for e, lab, _late in examples(out)} == {("early:a", 1)} and not orphans(out)


# --- item 2: one clock ahead ---------------------------------------------------------------------
def test_an_event_from_a_clock_hours_ahead_does_not_close_its_partition() -> None:
    core, clocks = make()
    core.on_impression(imp("ahead", NOW_MS + 23 * HOUR, ["a"]))
    assert core.watermark <= NOW_MS + core.config.watermark_lead_ms
    clocks.advance(12)  # the clicks stream idles: the impressions' watermark rules
    out = core.tick()
    out += core.on_impression(imp("now", NOW_MS + 12_000, ["a", "b"], user="u2"))
    assert not examples(out)  # not closed on arrival
    out = core.on_click(clk("now", "b", NOW_MS + 60_000, user="u2"))
    assert examples(out) == {("now:b", 1, False)}


# --- item 6: the window on a quiet live partition -------------------------------------------------
def test_quiet_live_partition_keeps_its_attribution_window() -> None:
    core, clocks = make()
    core.on_impression(imp("q", NOW_MS, ["a", "b"]))
    for _ in range(30):  # five quiet minutes, ticking
        clocks.advance(10)
        assert not examples(core.tick())
    out = core.on_click(clk("q", "a", NOW_MS + 300_000))
    assert examples(out) == {("q:a", 1, False)}  # a positive, not a fake negative + a late one
    clocks.advance(25 * 60 + 10)  # the window (and the lateness) has passed by the wall clock
    out = core.tick()
    assert examples(out) == {("q:b", 0, False)}


def test_finished_replay_of_the_past_closes_at_once_when_idle() -> None:
    core, clocks = make()
    old = NOW_MS - 200 * 24 * HOUR
    core.on_impression(imp("r", old, ["a", "b"]))
    core.on_click(clk("r", "a", old + 1000))
    core.on_click(clk("gone", "a", old + 2000))
    clocks.advance(11)
    out = core.tick()
    assert examples(out) == {("r:b", 0, False)}
    assert [o.click.impression_id for o in orphans(out)] == ["gone"]


# --- item 8: the early-click buffer --------------------------------------------------------------
def test_a_flood_of_early_clicks_on_one_impression_is_bounded() -> None:
    core, _ = make(early_per_impression_max=100)
    out = []
    for i in range(5_000):
        out += core.on_click(clk("flood", f"i{i}", NOW_MS + i))
    out += core.on_click(clk("flood", "i0", NOW_MS))  # a repeat: dropped, counted
    assert core.early_clicks == 100
    assert len(orphans(out)) == 4_900
    assert core.counts["duplicate_clicks"] == 1
    assert "EARLY_PER_IMPRESSION_MAX" in orphans(out)[0].reason
    out = core.on_impression(imp("flood", NOW_MS, [f"i{i}" for i in range(50)]))
    assert len([o for o in out if isinstance(o, Example) and o.label]) == 50
    assert core.early_clicks == 0


def test_expiring_many_early_clicks_of_one_impression() -> None:
    core, clocks = make(orphan_grace_ms=1_000, early_per_impression_max=10_000)
    out = []
    for i in range(3_000):
        out += core.on_click(clk("gone", f"i{i}", NOW_MS + i))
    out += core.on_impression(imp("other", NOW_MS + 10 * 60_000, ["x"], user="u9"))
    out += core.on_click(clk("other", "x", NOW_MS + 10 * 60_000, user="u9"))
    assert len(orphans(out)) == 3_000 and core.early_clicks == 0


def test_join_config_rejects_impossible_new_values() -> None:
    import pytest

    from contract.errors import ConfigError

    for name in ("watermark_lead_ms", "late_hold_events"):
        with pytest.raises(ConfigError, match=name):
            JoinConfig(**{name: -1})
    with pytest.raises(ConfigError, match="early_per_impression_max"):
        JoinConfig(early_per_impression_max=0)


def test_clicks_of_a_lagging_producer_whose_stream_idled_are_late_positives_not_orphans() -> None:
    """Found by the chaos run: a clicks stream quiet past the idle timeout lets the impressions'
    watermark close and pass the retention of every window; its clicks, arriving next, must still
    find their (closed) impressions, remembered by arrival."""
    core, clocks = make()
    old = NOW_MS - 30 * 24 * HOUR  # a replay at high speed: hours of event time per second
    for i in range(20):
        core.on_impression(imp(f"i{i}", old + i * HOUR, ["a", "b"]))
    clocks.advance(11)  # the clicks producer lags: its stream idles, the impressions' watermark rules
    out = core.tick()
    out += core.on_impression(imp("later", old + 40 * HOUR, ["a"]))
    assert core.watermark > old + 21 * HOUR
    for i in range(20):
        out += core.on_click(clk(f"i{i}", "a", old + i * HOUR + 60_000))
    assert not orphans(out)
    assert {(f"i{i}:a", 1, True) for i in range(20)} <= examples(out)


def test_an_idle_clicks_stream_of_a_fast_replay_holds_the_windows_it_has_not_caught_up_with() -> None:
    """Found by the chaos run: a clicks producer lagging a 20,000x replay by a few seconds went idle
    on one partition, and the impressions' watermark closed every window its clicks had not reached
    (fake negatives, then late positives).  An idle stream advances at the wall-clock rate."""
    core, clocks = make()
    old = NOW_MS - 30 * 24 * HOUR
    core.on_impression(imp("i0", old, ["a", "b"]))
    core.on_click(clk("i0", "a", old + 1000))  # the clicks stream has been seen
    for i in range(1, 40):  # the replay runs on: hours of event time a second
        clocks.advance(0.5)
        core.on_impression(imp(f"i{i}", old + i * HOUR, ["a", "b"]))
    out = core.tick()
    assert not examples(out) and core.open_impressions == 40  # nothing closed while clicks lag
    out = []
    for i in range(1, 40):  # the lagging clicks arrive
        out += core.on_click(clk(f"i{i}", "a", old + i * HOUR + 60_000))
    assert {(f"i{i}:a", 1, False) for i in range(1, 40)} <= examples(out)
    assert not {e for e in examples(out) if e[1] == 0 and e[0].endswith(":a")}


def test_a_quiet_live_clicks_stream_still_lets_live_impressions_close() -> None:
    core, clocks = make(window_ms=60_000)
    core.on_impression(imp("i0", NOW_MS, ["a", "b"]))
    core.on_click(clk("i0", "a", NOW_MS + 1000))
    out = []
    for s in range(1, 90):  # live traffic: event time moves with the wall clock
        clocks.advance(1)
        out += core.on_impression(imp(f"i{s}", NOW_MS + s * 1000, ["x"], user="u2"))
    assert ("i0:b", 0, False) in examples(out)  # closed about 65 s after it, clicks idle or not
