"""The pure join core: windows, watermarks, lateness, duplicates, orphans, idleness, history, state."""

from __future__ import annotations

import json

import pytest

from contract.errors import ConfigError, RecordError
from contract.records import Click, Impression, Labeled
from streams.join import (
    NO_WATERMARK,
    Example,
    HistoryUpdate,
    JoinConfig,
    JoinCore,
    Rejected,
    check_event_time,
    reference_join,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def imp(iid: str, ts: int, items: list[str], user: str = "u1") -> Impression:
    return Impression(impression_id=iid, user_id=user, items=items, ts=ts)


def clk(iid: str, item: str, ts: int, user: str = "u1", value: float | None = None) -> Click:
    return Click(impression_id=iid, user_id=user, item_id=item, ts=ts, value=value)


def labels(outs: list) -> list[tuple[str, int, bool, int]]:
    return [(o.example_id, o.label, o.late, o.label_ts) for o in outs if isinstance(o, Example)]


def make(clock: FakeClock | None = None, **kw) -> tuple[JoinCore, FakeClock]:
    """A core that emits positives when their click comes (``positives_at_close=False``): most tests
    here pin that timing; the default, positives with their impression's negatives, has its own."""
    clock = clock or FakeClock()
    cfg = dict(window_ms=1_000, allowed_lateness_ms=0, idle_timeout_s=10.0, orphan_grace_ms=500,
               positives_at_close=False)
    cfg.update(kw)
    return JoinCore(JoinConfig(**cfg), clock=clock), clock


def feed(core: JoinCore, events: list) -> list:
    out: list = []
    for e in events:
        out += core.on_impression(e) if isinstance(e, Impression) else core.on_click(e)
    return out


def drain(core: JoinCore, clock: FakeClock) -> list:
    """End of stream: both streams idle, every window closes."""
    clock.advance(core.config.idle_timeout_s + 1)
    return core.tick()


# --- window boundaries --------------------------------------------------------------------


def test_click_exactly_at_window_end_is_an_on_time_positive() -> None:
    core, _ = make()
    out = feed(core, [imp("i", 10_000, ["a", "b"]), clk("i", "a", 11_000)])
    assert labels(out) == [("i:a", 1, False, 11_000)]


def test_click_one_ms_after_window_end_is_a_negative_then_a_late_positive() -> None:
    core, clock = make()
    out = feed(core, [imp("i", 10_000, ["a", "b"]), clk("i", "a", 11_001)])
    assert labels(out) == []  # nothing decided yet: an in-window click could still come
    out = drain(core, clock)
    assert labels(out) == [
        ("i:a", 0, False, 11_000),
        ("i:b", 0, False, 11_000),
        ("i:a", 1, True, 11_001),
    ]


def test_window_closes_when_the_watermark_passes_its_end_to_the_ms() -> None:
    core, _ = make()
    feed(core, [imp("i", 10_000, ["a"])])
    # watermark = min(impressions 11_000, clicks 11_000) = window end: still open
    out = feed(core, [imp("j", 11_000, ["x"]), clk("j", "x", 11_000)])
    assert core.watermark == 11_000
    assert [lab for lab in labels(out) if lab[0] == "i:a"] == []
    assert core.open_impressions == 2  # i and j
    # one ms further on both streams: closed, label_ts = window end
    out = feed(core, [imp("k", 11_001, ["y"]), clk("k", "y", 11_001)])
    assert core.watermark == 11_001
    assert ("i:a", 0, False, 11_000) in labels(out)


def test_click_before_the_impression_time_counts_in_the_window() -> None:
    core, _ = make()
    out = feed(core, [imp("i", 10_000, ["a"]), clk("i", "a", 9_999)])
    assert labels(out) == [("i:a", 1, False, 9_999)]


def test_positive_is_immediate_and_carries_position_and_value() -> None:
    core, _ = make()
    out = feed(core, [imp("i", 10_000, ["a", "b", "c"]), clk("i", "c", 10_500, value=4.0)])
    [ex] = [o for o in out if isinstance(o, Example)]
    assert (ex.position, ex.value, ex.impression_ts, ex.ts) == (2, 4.0, 10_000, 10_500)
    Labeled.from_json(ex.to_json())  # satisfies the record contract


def test_positives_at_close_come_with_their_impressions_negatives() -> None:
    core, clock = make(positives_at_close=True)
    out = feed(core, [imp("i", 10_000, ["a", "b", "c"]), clk("i", "c", 10_500, value=4.0)])
    # the click goes into the user's history at once (serving's histories stay fresh) ...
    assert labels(out) == [] and [o.items for o in out if isinstance(o, HistoryUpdate)] == [["c"]]
    assert core.on_click(clk("i", "c", 10_600)) == []  # a repeat of a held positive changes nothing
    # ... and the positive is emitted when the window closes, after the negatives, as it would have
    # been on its click (label_ts = the click's ts, its value and position, not late)
    out = feed(core, [imp("j", 12_000, ["z", "y"]), clk("j", "z", 12_050)])  # both streams past 11,000
    assert labels(out) == [("i:a", 0, False, 11_000), ("i:b", 0, False, 11_000), ("i:c", 1, False, 10_500)]
    [ex] = [o for o in out if isinstance(o, Example) and o.label]
    assert (ex.position, ex.value, ex.history) == (2, 4.0, [])
    Labeled.from_json(ex.to_json())
    # a click after the close is still a late positive, emitted when it comes
    assert labels(feed(core, [clk("i", "b", 10_900)])) == [("i:b", 1, True, 10_900)]
    assert labels(drain(core, clock)) == [("j:y", 0, False, 13_000), ("j:z", 1, False, 12_050)]


def test_a_held_positive_survives_a_restart_and_both_timings_give_the_same_examples() -> None:
    events = [imp("i1", 1_000, ["a", "b"]), clk("i1", "a", 1_200), imp("i2", 1_400, ["c"], user="u2"),
              clk("i2", "c", 2_300, user="u2"), imp("i3", 3_000, ["d"]), clk("i3", "d", 3_100)]
    on_click, clock = make()
    reference = sorted(labels(feed(on_click, events) + drain(on_click, clock)))
    core, clock = make(positives_at_close=True)
    before = feed(core, events[:2])
    assert labels(before) == []
    restored = JoinCore.restore(core.config, core.snapshot().items(), clock=clock)
    assert restored.snapshot() == core.snapshot()
    after = feed(restored, events[2:]) + drain(restored, clock)
    assert sorted(labels(before + after)) == reference


# --- watermarks and lateness --------------------------------------------------------------


def test_lagging_click_stream_holds_the_watermark_back() -> None:
    core, _ = make(allowed_lateness_ms=100)
    # impressions run far ahead; clicks lag: no window may close on impressions alone
    out = feed(core, [imp("i", 10_000, ["a", "b"])] + [imp(f"x{t}", t, ["z"]) for t in range(20_000, 30_000, 1000)])
    assert labels(out) == [] and core.watermark == NO_WATERMARK
    out = feed(core, [clk("i", "a", 10_400)])
    assert labels(out) == [("i:a", 1, False, 10_400)]
    assert core.watermark == 10_300


def test_out_of_order_within_lateness_equals_sorted_input() -> None:
    events = [  # sorted by event time
        imp("i1", 1_000, ["a", "b"]),
        imp("i2", 1_500, ["a", "c"], user="u2"),
        clk("i1", "b", 1_700),
        clk("i1", "a", 2_000),  # exactly at i1's window end
        clk("i2", "c", 2_600, user="u2"),  # after i2's window end (2_500)
        imp("i3", 3_000, ["d"]),
        clk("i3", "d", 3_100),
        imp("i4", 6_000, ["e"]),
        clk("i4", "e", 6_000),
    ]
    # each stream at most 600 ms behind its newest event; clicks before their impressions
    shuffled = [events[i] for i in (3, 1, 2, 0, 4, 5, 7, 6, 8)]

    def run(evts: list) -> list:
        core, clock = make(allowed_lateness_ms=600)
        return labels(feed(core, evts) + drain(core, clock))

    sorted_out, shuffled_out = run(events), run(shuffled)
    assert sorted(sorted_out) == sorted(shuffled_out)
    ref = reference_join([e for e in events if isinstance(e, Impression)],
                         [e for e in events if isinstance(e, Click)], window_ms=1_000)
    assert {(e, lab) for e, lab, _late, _ts in sorted_out} == ref.pairs()
    assert ("i2:c", 1, True, 2_600) in sorted_out


def test_duplicates_of_either_type_change_nothing() -> None:
    base = [imp("i", 1_000, ["a", "b"]), clk("i", "a", 1_200)]
    core, clock = make()
    once = labels(feed(core, base) + drain(core, clock))
    core, clock = make()
    twice = labels(feed(core, [base[0], base[0], base[1], base[1], base[0]]) + drain(core, clock))
    assert once == twice == [("i:a", 1, False, 1_200), ("i:b", 0, False, 2_000)]
    assert core.counts == {"duplicate_impressions": 2, "duplicate_clicks": 1}
    # a click repeated after the window closed is still a duplicate
    assert labels(core.on_click(base[1])) == []


def test_late_click_after_the_negative_is_a_late_positive_once() -> None:
    core, clock = make()
    out = feed(core, [imp("i", 1_000, ["a", "b"])]) + drain(core, clock)
    assert labels(out) == [("i:a", 0, False, 2_000), ("i:b", 0, False, 2_000)]
    late = clk("i", "b", 1_500)  # in the window, but arrives after it closed
    assert labels(core.on_click(late)) == [("i:b", 1, True, 1_500)]
    assert labels(core.on_click(late)) == []


def test_in_window_click_overtaking_a_later_one_wins() -> None:
    core, clock = make(allowed_lateness_ms=1_000)
    out = feed(core, [imp("i", 1_000, ["a"]), clk("i", "a", 2_500), clk("i", "a", 1_900)])
    assert labels(out) == [("i:a", 1, False, 1_900)]
    # the history holds the example once, at the earlier click
    out = feed(core, [imp("j", 3_000, ["b"])]) + drain(core, clock)
    assert labels(out) == [("j:b", 0, False, 4_000)]  # no negative, no late positive for i:a
    assert [o.history for o in out if isinstance(o, Example)] == [["a"]]


def test_repeated_click_moves_the_history_entry_to_the_earliest() -> None:
    core, clock = make(allowed_lateness_ms=1_000)
    out = feed(core, [imp("i", 1_000, ["a"]), clk("i", "a", 1_900), clk("i", "a", 1_200),
                      imp("j", 1_500, ["b"])]) + drain(core, clock)
    assert [o.history for o in out if isinstance(o, Example) and o.example_id == "j:b"] == [["a"]]


# --- early clicks ---------------------------------------------------------------------------


def test_early_click_then_its_impression_within_grace_is_a_positive() -> None:
    core, _ = make(allowed_lateness_ms=1_000, orphan_grace_ms=500)
    out = feed(core, [clk("i", "a", 1_100)])
    assert out == [] and core.early_clicks == 1
    out = feed(core, [imp("i", 1_000, ["a", "b"])])
    assert labels(out) == [("i:a", 1, False, 1_100)]
    assert core.early_clicks == 0


def test_early_click_past_grace_becomes_an_orphan() -> None:
    core, _ = make(orphan_grace_ms=500)
    c = clk("gone", "a", 1_000)
    feed(core, [c])
    out = feed(core, [imp("x", 1_500, ["z"]), clk("x", "z", 1_500)])  # watermark 1_500 = expiry
    assert [o for o in out if isinstance(o, Rejected)] == []
    out = feed(core, [imp("y", 1_501, ["z"]), clk("y", "z", 1_501)])
    [rej] = [o for o in out if isinstance(o, Rejected)]
    assert rej.orphan and rej.click == c and "grace" in rej.reason
    # its impression arriving afterwards labels the item negative
    out = feed(core, [imp("gone", 1_600, ["a"])]) + drain(core, core._clock)  # type: ignore[arg-type]
    assert ("gone:a", 0, False, 2_600) in labels(out)


def test_full_early_buffer_rejects_the_oldest() -> None:
    core, _ = make(orphan_buffer_max=2)
    out = feed(core, [clk("p", "a", 1_000), clk("q", "a", 1_001), clk("r", "a", 1_002)])
    [rej] = out
    assert isinstance(rej, Rejected) and rej.click.impression_id == "p" and "full" in rej.reason
    assert core.early_clicks == 2


def test_click_contradicting_its_impression_is_rejected() -> None:
    core, _ = make()
    out = feed(core, [imp("i", 1_000, ["a"]), clk("i", "zzz", 1_100), clk("i", "a", 1_100, user="u2")])
    rejected = [o for o in out if isinstance(o, Rejected)]
    assert [r.orphan for r in rejected] == [False, False]
    assert "not in the slate" in rejected[0].reason and "differs" in rejected[1].reason
    assert labels(out) == []


# --- idleness -----------------------------------------------------------------------------------


def test_idle_click_stream_stops_holding_the_watermark() -> None:
    core, clock = make(allowed_lateness_ms=0, idle_timeout_s=5.0)
    feed(core, [imp("i", 1_000, ["a"]), imp("j", 5_000, ["b"])])
    assert core.tick() == [] and core.watermark == NO_WATERMARK
    clock.advance(4.9)
    feed(core, [imp("k", 6_000, ["c"])])  # impressions stay active, clicks never came
    assert core.watermark == NO_WATERMARK
    clock.advance(0.2)
    out = core.tick()  # clicks idle for 5.1 s: watermark = impressions' 6_000
    assert core.watermark == 6_000
    assert labels(out) == [("i:a", 0, False, 2_000)]
    assert core.open_impressions == 2


def test_both_streams_idle_close_every_window() -> None:
    core, clock = make(idle_timeout_s=5.0, window_ms=60_000)
    feed(core, [imp("i", 1_000, ["a"]), clk("i", "a", 1_001), clk("nope", "a", 1_001)])
    clock.advance(4.0)
    assert core.tick() == []
    clock.advance(1.0)
    out = core.tick()
    assert labels(out) == [] and core.open_impressions == 0  # a's positive was already out
    [rej] = [o for o in out if isinstance(o, Rejected)]
    assert rej.orphan and "idle" in rej.reason
    # traffic resumes: a click arriving now for the closed window is a late positive
    feed(core, [imp("j", 2_000, ["b", "c"])])
    assert labels(core.on_click(clk("j", "b", 2_100))) == [("j:b", 1, False, 2_100)]


def test_impression_closed_by_idleness_is_remembered_for_its_retention() -> None:
    core, clock = make(idle_timeout_s=5.0, window_ms=1_000, closed_retention_ms=10_000)
    feed(core, [imp("i", 1_000, ["a", "b"])])
    clock.advance(5)
    assert labels(core.tick()) == [("i:a", 0, False, 2_000), ("i:b", 0, False, 2_000)]
    feed(core, [imp("j", 5_000, ["c"]), clk("j", "c", 5_000)])  # the watermark passes i's window end
    assert core.remembered_impressions == 2
    assert labels(core.on_click(clk("i", "b", 1_500))) == [("i:b", 1, True, 1_500)]


def test_touch_after_a_pause_keeps_windows_open() -> None:
    core, clock = make(idle_timeout_s=5.0)
    feed(core, [imp("i", 1_000, ["a"]), clk("i", "a", 1_000), imp("j", 1_500, ["b"])])
    clock.advance(60)  # e.g. a rebalance paused consumption
    core.touch()
    assert core.tick() == [] and core.open_impressions == 2
    clock.advance(60)
    core.touch(impressions=False, clicks=True)  # clicks wait in the consumer: not idle
    assert core.tick() == [] and core.watermark == 1_000


# --- history ---------------------------------------------------------------------------------------


def test_history_is_point_in_time() -> None:
    core, clock = make(window_ms=10_000, allowed_lateness_ms=1_000)
    out = feed(core, [
        imp("i1", 1_000, ["a", "b"]),
        clk("i1", "a", 1_100),
        imp("i2", 2_000, ["c", "d"]),
        clk("i1", "b", 2_500),  # after i2 was shown: must not appear in i2's history
        clk("i2", "c", 3_000),
    ]) + drain(core, clock)
    by_id = {o.example_id: o for o in out if isinstance(o, Example)}
    assert by_id["i1:a"].history == [] and by_id["i1:b"].history == []
    assert by_id["i2:c"].history == ["a"]
    assert by_id["i2:d"].history == ["a"]
    assert core.history("u1") == ["a", "b", "c"]
    updates = [o for o in out if isinstance(o, HistoryUpdate)]
    assert [u.items for u in updates] == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert updates[-1].ts == 3_000


def test_history_excludes_clicks_arriving_out_of_order_after_the_impression() -> None:
    core, clock = make(window_ms=10_000, allowed_lateness_ms=5_000)
    # click at 1_500 (before i2 at 2_000) arrives after i2: negatives at close still see it
    out = feed(core, [imp("i1", 1_000, ["a"]), imp("i2", 2_000, ["x"]), clk("i1", "a", 1_500)])
    out += drain(core, clock)
    by_id = {o.example_id: o for o in out if isinstance(o, Example)}
    assert by_id["i2:x"].history == ["a"]


def test_history_is_capped() -> None:
    core, clock = make(history_length=3, window_ms=100, closed_retention_ms=0)
    events = []
    for n in range(20):
        events += [imp(f"i{n}", 1_000 * n, [f"m{n}"]), clk(f"i{n}", f"m{n}", 1_000 * n + 1)]
    out = feed(core, events) + drain(core, clock)
    last = [o for o in out if isinstance(o, Example) and o.example_id == "i19:m19"]
    assert last[0].history == ["m16", "m17", "m18"]
    assert core.history("u1") == ["m17", "m18", "m19"]
    assert core._histories.size("u1") <= core.config.history_cap


# --- bounded memory and state ----------------------------------------------------------------------


def test_closed_impressions_are_forgotten_after_retention() -> None:
    core, _ = make(window_ms=100, closed_retention_ms=1_000, late_hold_events=10)
    for n in range(50):
        t = 1_000 * n
        feed(core, [imp(f"i{n}", t, ["a"], user=f"u{n}"), clk(f"i{n}", "a", t, user=f"u{n}")])
    # past their event-time retention *and* the last 10 arrivals (5 impressions and their clicks)
    assert core.remembered_impressions <= 3 + 5
    assert "i40" not in core.snapshot() and "i/i40" not in core.snapshot() and "i/i49" in core.snapshot()
    # a click for a forgotten impression is an orphan; a replayed one is joined afresh
    assert core.on_click(clk("i0", "a", 49_000, user="u0")) == []
    assert core.early_clicks == 1


def test_restore_from_state_continues_identically() -> None:
    events = [
        imp("i1", 1_000, ["a", "b"]),
        clk("i1", "a", 1_200),
        clk("early", "q", 1_300),
        imp("i2", 1_400, ["c"], user="u2"),
        clk("i2", "c", 2_600, user="u2"),
        imp("i3", 3_000, ["d", "e"]),
        imp("early", 1_350, ["q"]),
        clk("i3", "e", 3_500),
        imp("i4", 9_000, ["f"]),
        clk("i4", "f", 9_000),
    ]
    core, clock = make(allowed_lateness_ms=500)
    straight = labels(feed(core, events) + drain(core, clock))

    core, clock = make(allowed_lateness_ms=500)
    before = feed(core, events[:5])
    persisted: dict = {}
    for k, v in core.drain_changes().items():
        if v is None:
            persisted.pop(k, None)
        else:
            persisted[k] = v
    assert persisted == {k: v for k, v in core.snapshot().items() if v is not None}
    restored = JoinCore.restore(core.config, persisted.items(), clock=clock)
    assert restored.snapshot() == core.snapshot()
    after = feed(restored, events[5:]) + drain(restored, clock)
    assert labels(before + after) == straight


def test_state_records_which_inputs_it_holds() -> None:
    core, _ = make()
    core.on_impression(imp("i", 1_000, ["a"]), offset=7)
    core.on_click(clk("i", "a", 1_100), offset=3)
    core.skip("clicks", 4)  # a malformed click at offset 4
    # the next offsets to apply, which the worker checks every delivered offset against
    assert (core.next_offset("impressions"), core.next_offset("clicks")) == (8, 5)
    core.on_click(clk("i", "a", 1_200), offset=2)  # an offset below: the next one stays
    assert core.next_offset("clicks") == 5
    restored = JoinCore.restore(core.config, core.snapshot().items())
    assert (restored.next_offset("impressions"), restored.next_offset("clicks")) == (8, 5)
    assert JoinCore(core.config).next_offset("impressions") == 0


def test_restore_drops_early_clicks_whose_match_was_not_persisted() -> None:
    core, _ = make()
    core.on_click(clk("i", "a", 1_100))
    early_state = core.snapshot()["o/i"]
    core.on_impression(imp("i", 1_000, ["a"]))
    state = core.snapshot()
    state["o/i"] = early_state  # the crash lost the deletion written after "w"
    restored = JoinCore.restore(core.config, state.items())
    assert restored.early_clicks == 0
    assert restored.drain_changes()["o/i"] is None  # and the deletion is written again


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError, match="window_ms"):
        JoinConfig(window_ms=0)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        JoinConfig(idle_timeout_s=0)


def test_reference_join_labels() -> None:
    ref = reference_join(
        [imp("i", 1_000, ["a", "b", "c"]), imp("i", 1_000, ["zz"])],
        [clk("i", "a", 1_500), clk("i", "a", 1_400), clk("i", "b", 5_000),
         clk("i", "x", 1_100), clk("nope", "a", 1_100)],
        window_ms=1_000,
    )
    got = sorted((e.example_id, e.label, e.late, e.label_ts) for e in ref.examples)
    assert got == [
        ("i:a", 1, False, 1_400),
        ("i:b", 0, False, 2_000),
        ("i:b", 1, True, 5_000),
        ("i:c", 0, False, 2_000),
    ]
    assert [c.impression_id for c in ref.orphans] == ["nope"]
    assert [c.item_id for c in ref.invalid] == ["x"]


def test_join_settings_from_environment_name_the_bad_setting(monkeypatch) -> None:
    from contract.settings import load
    from streams.join_settings import JoinSettings

    monkeypatch.setenv("STREAMREC_JOIN_WINDOW_MS", "2500")
    monkeypatch.setenv("STREAMREC_JOIN_IDLE_TIMEOUT_S", "0.5")
    s = load(JoinSettings)
    assert s.join_config() == JoinConfig(window_ms=2_500, idle_timeout_s=0.5)
    assert s.tick_interval_s() == 0.125
    monkeypatch.setenv("STREAMREC_JOIN_ALLOWED_LATENESS_MS", "-1")
    with pytest.raises(ConfigError, match="STREAMREC_JOIN_ALLOWED_LATENESS_MS"):
        load(JoinSettings)
    monkeypatch.delenv("STREAMREC_JOIN_ALLOWED_LATENESS_MS")
    with pytest.raises(ConfigError, match="STREAMREC_JOIN_METRICS_PORT"):
        load(JoinSettings, metrics_port=9000, web_port=9000)


def test_changes_encode_to_the_json_of_their_values() -> None:
    core, clock = make(allowed_lateness_ms=5_000)
    feed(core, [
        imp("i", 1_000, ["a", 'b"q\\', "é"]), clk("i", "a", 1_100, value=2.5), clk("i", "é", 9_000),
        clk("early", "x", 1_200), imp("j", 1_300, ["z"], user='u"2'),
    ])
    snapshot = core.snapshot()
    encoded = core.drain_changes_json()
    assert set(encoded) == set(snapshot)
    assert {k: json.loads(v) for k, v in encoded.items()} == snapshot
    drain(core, clock)
    encoded = core.drain_changes_json()
    assert {k: json.loads(v) for k, v in encoded.items() if v is not None} == {
        k: v for k, v in core.snapshot().items() if k in encoded
    }


# --------------------------------------------------------------------------- event time vs the Kafka timestamp
def test_an_event_far_after_its_kafka_timestamp_is_refused_naming_the_setting() -> None:
    day = 86_400_000
    check_event_time("Impression", 5 * day, 4 * day, day)  # exactly the allowed skew: fine
    check_event_time("Impression", 1_000, 4 * day, day)  # the past (a replay): fine
    with pytest.raises(RecordError, match="STREAMREC_JOIN_MAX_FUTURE_SKEW_MS") as err:
        check_event_time("Click", 5 * day + 1, 4 * day, day)
    assert err.value.record_type == "Click" and err.value.field == "ts"
    assert f"is {day + 1} ms after" in str(err.value)
    check_event_time("Click", 100 * day, 4 * day, 0)  # 0: no check
    check_event_time("Click", 100 * day, None, day)  # no Kafka timestamp: not checked
    check_event_time("Click", 100 * day, -1, day)  # librdkafka's "no timestamp"
