"""Property: for any stream and any arrival order within the allowed lateness, the join core
emits exactly what the batch reference computes from the whole stream at once."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from contract.records import Click, Impression, Labeled, UserHistory
from streams.join import Example, HistoryUpdate, JoinConfig, JoinCore, Rejected, reference_join

WINDOW, LATENESS, GRACE, RETENTION, HISTORY = 1_000, 300, 200, 2_000, 3
CONFIG = JoinConfig(
    window_ms=WINDOW,
    allowed_lateness_ms=LATENESS,
    idle_timeout_s=10.0,
    orphan_grace_ms=GRACE,
    closed_retention_ms=RETENTION,
    history_length=HISTORY,
)
USERS = ("u0", "u1", "u2")
POOL = tuple(f"m{i}" for i in range(6))


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scenario:
    impressions: list[Impression]  # the stream, without duplicates
    clicks: list[Click]
    arrivals: list[Impression | Click]  # arrival order, duplicates included


def _arrival_order(draw, events: list) -> list:
    """Each event arrives at most LATENESS behind the newest event of its stream."""
    delay = st.one_of(st.sampled_from((0, LATENESS)), st.integers(0, LATENESS))  # edges are common
    jitter = draw(st.lists(delay, min_size=len(events), max_size=len(events)))
    keyed = sorted(range(len(events)), key=lambda i: (events[i].ts + jitter[i], i))
    return [events[i] for i in keyed]


# a coarse grid makes equal timestamps and exact window/lateness/grace boundaries common
_times = st.one_of(st.integers(10, 70).map(lambda t: 100 * t), st.integers(1_000, 7_000))


@st.composite
def scenarios(draw) -> Scenario:
    impressions = []
    for k in range(draw(st.integers(1, 10))):
        impressions.append(
            Impression(
                impression_id=f"i{k}",
                user_id=draw(st.sampled_from(USERS)),
                items=draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True)),
                ts=draw(_times),
            )
        )
    clicks = []
    for imp in impressions:
        for item in imp.items:
            for _ in range(draw(st.integers(0, 2))):
                # in the window (end inclusive), on its edges, after it (up to window +
                # retention), or a little before the impression (clock skew, up to the grace)
                delta = draw(st.one_of(
                    st.sampled_from((0, WINDOW, WINDOW + 1, -GRACE)),
                    st.integers(-GRACE, WINDOW),
                    st.integers(WINDOW, WINDOW + RETENTION),
                ))
                clicks.append(Click(impression_id=imp.impression_id, user_id=imp.user_id, item_id=item,
                                    ts=imp.ts + delta, value=draw(st.none() | st.floats(0, 5))))
    for j in range(draw(st.integers(0, 2))):  # orphans: their impression never comes
        clicks.append(Click(impression_id=f"ghost{j}", user_id="u0", item_id="m0", ts=draw(_times)))
    for imp in draw(st.lists(st.sampled_from(impressions), max_size=2)):  # invalid clicks
        other_user = draw(st.booleans())
        clicks.append(Click(
            impression_id=imp.impression_id,
            user_id="intruder" if other_user else imp.user_id,
            item_id=imp.items[0] if other_user else "not-shown",
            ts=imp.ts + draw(st.integers(0, WINDOW)),
        ))
    dup_imps = draw(st.lists(st.sampled_from(impressions), max_size=3))
    dup_clicks = draw(st.lists(st.sampled_from(clicks), max_size=3)) if clicks else []
    imp_arrivals = _arrival_order(draw, impressions + dup_imps)
    click_arrivals = _arrival_order(draw, clicks + dup_clicks)
    # any interleaving of the two streams (clicks may run ahead of their impressions)
    picks = draw(st.lists(st.booleans(), min_size=len(imp_arrivals) + len(click_arrivals),
                          max_size=len(imp_arrivals) + len(click_arrivals)))
    arrivals: list[Impression | Click] = []
    a, b = iter(imp_arrivals), iter(click_arrivals)
    left_a, left_b = len(imp_arrivals), len(click_arrivals)
    for pick in picks:
        if (pick and left_a) or not left_b:
            arrivals.append(next(a))
            left_a -= 1
        else:
            arrivals.append(next(b))
            left_b -= 1
    return Scenario(impressions, clicks, arrivals)


def _run(arrivals: list, core: JoinCore, clock: FakeClock) -> list:
    out: list = []
    for e in arrivals:
        out += core.on_impression(e) if isinstance(e, Impression) else core.on_click(e)
    clock.now += CONFIG.idle_timeout_s + 1  # end of stream: both streams idle
    out += core.tick()
    return out


def _click_key(c: Click) -> tuple:
    return (c.impression_id, c.user_id, c.item_id, c.ts, c.value)


@settings(max_examples=250, deadline=None)
@given(scenarios())
def test_stream_join_equals_batch_reference(sc: Scenario) -> None:
    clock = FakeClock()
    out = _run(sc.arrivals, JoinCore(CONFIG, clock=clock), clock)
    ref = reference_join(sc.impressions, sc.clicks, window_ms=WINDOW, history_length=HISTORY)
    emitted = [o for o in out if isinstance(o, Example)]

    # exactly the reference labels, each (example_id, label) once, same late flags
    counts = Counter((e.example_id, e.label) for e in emitted)
    assert set(counts) == ref.pairs()
    assert max(counts.values(), default=1) == 1
    assert {(e.example_id, e.label, e.late) for e in emitted} == {
        (e.example_id, e.label, e.late) for e in ref.examples
    }
    # a late positive always follows its negative
    seen_negative = set()
    for e in emitted:
        if e.label == 0:
            seen_negative.add(e.example_id)
        elif e.late:
            assert e.example_id in seen_negative

    rejected = [o for o in out if isinstance(o, Rejected)]
    assert {_click_key(r.click) for r in rejected if r.orphan} == {_click_key(c) for c in ref.orphans}
    assert {_click_key(r.click) for r in rejected if not r.orphan} == {_click_key(c) for c in ref.invalid}

    # history: never a click at or after the impression, never the impression's own click
    accepted: dict[str, set[tuple[str, int, str]]] = {}
    for e in ref.examples:
        if e.label == 1:
            accepted.setdefault(e.user_id, set()).add((e.item_id, e.label_ts, e.impression_id))
    for e in emitted:
        allowed = {item for item, ts, iid in accepted.get(e.user_id, ()) if iid != e.impression_id}
        assert set(e.history) <= allowed
        assert len(e.history) <= HISTORY
    # negatives are decided after every earlier click arrived: their history is exact
    # (when the user's click times are distinct, so that "most recent" is well defined)
    ref_neg = {e.example_id: e.history for e in ref.examples if e.label == 0}
    for e in emitted:
        ts_of_user = [c.ts for c in sc.clicks if c.user_id == e.user_id]
        if e.label == 0 and len(set(ts_of_user)) == len(ts_of_user):
            assert e.history == ref_neg[e.example_id]


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.data())
def test_restoring_persisted_state_mid_stream_changes_nothing(sc: Scenario, data) -> None:
    clock = FakeClock()
    straight = _run(sc.arrivals, JoinCore(CONFIG, clock=clock), clock)

    cut = data.draw(st.integers(0, len(sc.arrivals)))
    clock = FakeClock()
    core = JoinCore(CONFIG, clock=clock)
    out: list = []
    persisted: dict = {}
    for n, e in enumerate(sc.arrivals[:cut]):
        out += core.on_impression(e) if isinstance(e, Impression) else core.on_click(e)
        if n % 3 == 0:  # persist in batches, as the worker does
            for k, v in core.drain_changes().items():
                persisted.pop(k, None) if v is None else persisted.__setitem__(k, v)
    for k, v in core.drain_changes().items():
        persisted.pop(k, None) if v is None else persisted.__setitem__(k, v)
    restored = JoinCore.restore(CONFIG, persisted.items(), clock=clock)
    out += _run(sc.arrivals[cut:], restored, clock)

    def key(o):
        if isinstance(o, Example):
            return ("L", o.example_id, o.label, o.late, o.label_ts, tuple(o.history))
        if isinstance(o, Rejected):
            return ("R", _click_key(o.click), o.reason)
        return ("H", o.user_id, tuple(o.items), o.ts)

    assert Counter(map(key, out)) == Counter(map(key, straight))


_ids = st.text(min_size=1, max_size=12)  # any unicode: quotes, backslashes, control characters
_impression_ids = _ids.filter(lambda s: ":" not in s)  # the contract: an impression id has no ':'


@settings(max_examples=200, deadline=None)
@given(
    _impression_ids, _ids, _ids, st.integers(0, 999), st.sampled_from((0, 1)),
    st.none() | st.floats(allow_nan=False, allow_infinity=False),
    st.lists(_ids, max_size=5), st.integers(0, 2**53), st.integers(0, 2**53), st.booleans(),
)  # fmt: skip
def test_examples_encode_to_exactly_their_record(iid, user, item, pos, label, value, hist, t0, t1, late) -> None:
    ex = Example(iid, user, item, pos, label, value, hist, t0, t1, late)
    record = ex.to_record()
    assert Labeled.from_json(ex.to_json()) == record
    assert json.loads(ex.to_json()) == record.to_dict()
    update = HistoryUpdate(user, hist, t1)
    assert UserHistory.from_json(update.to_json()) == update.to_record()
