"""The reservoir keeps a uniform sample of the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.replay_buffer import ReservoirBuffer


def test_reservoir_is_uniform_over_the_stream() -> None:
    n, k, trials = 60, 12, 3000
    counts = np.zeros(n)
    for t in range(trials):
        buf: ReservoirBuffer[int] = ReservoirBuffer(k, seed=t)
        buf.extend(range(n))
        assert len(buf) == k and len(set(buf.items())) == k
        counts[buf.items()] += 1
    expected = trials * k / n  # every element is kept with probability k/n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # chi-square with n-1 = 59 degrees of freedom: the 99.9% quantile is about 98.3
    assert chi2 < 98.3, chi2
    # and no drift towards early or late elements
    first, last = counts[: n // 2].sum(), counts[n // 2 :].sum()
    assert abs(first - last) / (first + last) < 0.03


def test_sample_is_distinct_residents_and_capacity_zero_is_off() -> None:
    buf: ReservoirBuffer[int] = ReservoirBuffer(5, seed=0)
    buf.extend(range(3))
    assert sorted(buf.sample(10)) == [0, 1, 2]
    buf.extend(range(3, 100))
    s = buf.sample(4)
    assert len(set(s)) == 4 and set(s) <= set(buf.items())
    off: ReservoirBuffer[int] = ReservoirBuffer(0)
    off.extend(range(10))
    assert len(off) == 0 and off.sample(3) == [] and off.seen == 10
    with pytest.raises(ValueError):
        ReservoirBuffer(-1)


def test_state_round_trip_continues_identically(tmp_path) -> None:
    a: ReservoirBuffer[str] = ReservoirBuffer(8, seed=3)
    a.extend(str(i) for i in range(40))
    path = tmp_path / "r.pt"
    torch.save(a.state_dict(), path)
    b: ReservoirBuffer[str] = ReservoirBuffer(1, seed=99)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert b.items() == a.items() and b.seen == a.seen
    for buf in (a, b):
        buf.extend(str(i) for i in range(40, 90))
    assert b.items() == a.items()
    assert b.sample(3) == a.sample(3)


def test_keyed_reservoir_replaces_a_resident_correction_in_place() -> None:
    buf: ReservoirBuffer[tuple[str, int]] = ReservoirBuffer(50, seed=0, key=lambda x: x[0])
    buf.extend((f"e{i}", 0) for i in range(200))
    resident = buf.items()[7][0]
    seen = buf.seen
    buf.add((resident, 1))  # the positive of a resident fake negative
    assert (resident, 1) in buf.items() and (resident, 0) not in buf.items()
    assert len(buf) == 50 and buf.seen == seen and buf.replaced == 1
    state = buf.state_dict()
    again: ReservoirBuffer[tuple[str, int]] = ReservoirBuffer(50, seed=1, key=lambda x: x[0])
    again.load_state_dict({**state, "items": [tuple(x) for x in state["items"]]})
    again.add((resident, 2))
    assert (resident, 2) in again.items() and len(again) == 50
    keys = [k for k, _ in buf.items()]
    assert len(keys) == len(set(keys))
