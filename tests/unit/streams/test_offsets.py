"""The input contiguity guard (streams.offsets): holes are re-read, stale events dropped."""

from __future__ import annotations

import pytest

from streams.offsets import GapGuard, Verdict

P = ("impressions", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(guard: GapGuard, offsets: list[int], expected: int) -> list[tuple[int, Verdict]]:
    """Deliver offsets like the worker: the state's expected offset moves on each applied one."""
    out = []
    for offset in offsets:
        verdict = guard.check(P, offset, expected)
        if verdict is Verdict.APPLY:
            expected = offset + 1
        out.append((offset, verdict))
    return out


def test_contiguous_offsets_are_applied_and_redelivered_ones_skipped() -> None:
    guard = GapGuard()
    assert feed(guard, [0, 1, 2], expected=0) == [(0, Verdict.APPLY), (1, Verdict.APPLY), (2, Verdict.APPLY)]
    assert feed(guard, [3, 4], expected=5) == [(3, Verdict.REPLAYED), (4, Verdict.REPLAYED)]
    assert not guard.pending(P)


def test_a_hole_seeks_back_drops_stale_events_and_applies_the_reread() -> None:
    guard = GapGuard()
    # state expects 105; Faust skipped 105..123 and delivers 124, 125 (stale), then the re-read
    got = feed(guard, [124, 125, 126, 105, 106], expected=105)
    assert got == [
        (124, Verdict.SEEK),
        (125, Verdict.STALE),
        (126, Verdict.STALE),
        (105, Verdict.APPLY),
        (106, Verdict.APPLY),
    ]
    assert not guard.pending(P)


def test_a_real_hole_is_accepted_once_two_rereads_start_at_the_same_offset() -> None:
    # offsets 5..6 do not exist (transaction markers): every re-read starts at 7
    guard = GapGuard()
    assert feed(guard, [7, 8, 7, 8, 7, 8], expected=5) == [
        (7, Verdict.SEEK),  # the hole
        (8, Verdict.STALE),
        (7, Verdict.SEEK),  # the re-read starts above 5: confirm with one more seek
        (8, Verdict.STALE),
        (7, Verdict.APPLY),  # the same start again: the hole is real
        (8, Verdict.APPLY),
    ]


def test_an_event_fetched_before_the_seek_is_not_taken_for_a_real_hole() -> None:
    # an end hole: the state expects 10, the consumer had fetched up to 29; Faust skipped
    # 10..14 and 15.. were still on their way when the worker sought back to 10
    guard = GapGuard()
    guard.expect(P, 10, delivered_up_to=29)
    assert feed(guard, [15, 16, 10, 11], expected=10) == [
        (15, Verdict.SEEK),  # above 10: maybe a real hole, maybe stale: seek again
        (16, Verdict.STALE),
        (10, Verdict.APPLY),  # the re-read
        (11, Verdict.APPLY),
    ]


def test_reread_that_starts_below_the_state_offset_skips_what_the_state_holds() -> None:
    guard = GapGuard()
    assert guard.check(P, 50, 40) is Verdict.SEEK
    assert guard.check(P, 38, 40) is Verdict.REPLAYED  # the re-read started, below the state
    assert guard.check(P, 40, 40) is Verdict.APPLY


def test_lost_seek_is_repeated_until_the_reread_arrives() -> None:
    clock = Clock()
    guard = GapGuard(reseek_after_s=1.0, clock=clock)
    assert guard.check(P, 20, 10) is Verdict.SEEK
    assert guard.due() == ([], [])  # not yet
    # the consumer dropped the re-read (its read offset moved on): only later offsets come
    assert guard.check(P, 21, 10) is Verdict.STALE
    clock.now = 1.5
    assert guard.due() == ([(P, 10)], [])
    assert guard.due() == ([], [])  # the clock restarted with the new seek
    assert guard.check(P, 22, 10) is Verdict.STALE  # still fetched before the second seek
    assert guard.check(P, 10, 10) is Verdict.APPLY
    clock.now = 5.0
    assert guard.due() == ([], [])


def test_end_hole_is_given_up_after_its_seeks_bring_nothing() -> None:
    clock = Clock()
    guard = GapGuard(reseek_after_s=1.0, clock=clock)
    guard.expect(P, 10, delivered_up_to=11, seeks=2)  # the caller sought once already
    assert guard.pending(P)
    clock.now = 1.0
    assert guard.due() == ([(P, 10)], [])
    clock.now = 2.0
    assert guard.due() == ([], [P])
    assert not guard.pending(P)


def test_end_hole_reread_applies() -> None:
    guard = GapGuard()
    guard.expect(P, 10, delivered_up_to=11)
    assert guard.check(P, 10, 10) is Verdict.APPLY
    assert not guard.pending(P)


def test_partitions_are_independent_and_forgotten_on_revocation() -> None:
    guard = GapGuard()
    other = ("clicks", 0)
    assert guard.check(P, 9, 5) is Verdict.SEEK
    assert guard.check(other, 0, 0) is Verdict.APPLY
    assert guard.check(other, 1, 1) is Verdict.APPLY
    assert len(guard) == 1
    guard.forget([P])
    assert not guard.pending(P) and len(guard) == 0
    assert guard.check(P, 9, 5) is Verdict.SEEK  # a fresh check


def test_reseek_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reseek_after_s"):
        GapGuard(reseek_after_s=0)
