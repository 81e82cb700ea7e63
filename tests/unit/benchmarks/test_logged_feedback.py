"""benchmarks/logged_feedback.py at a tiny size: the old policy's log, the value of a slate, the table."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmarks.logged_feedback import ARMS, Log, main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--seeds", "1", "--requests", "120", "--eval-requests", "4", "--users", "20", "--items", "40", "--k", "4",
        "--batch-size", "128"]


def _args(**kw) -> argparse.Namespace:
    base = dict(users=20, items=40, requests=120, eval_requests=4, k=4, position_bias=0.5, epsilon=0.2,
                logging_noise=1.0, max_history=20)
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_log_carries_serving_propensities_positions_and_the_position_effect() -> None:
    log = Log(0, _args())
    assert len(log.examples) == 120 * 4
    assert [e.position for e in log.examples[:4]] == [0, 1, 2, 3]
    props = np.array([e.propensity for e in log.examples])
    # epsilon-greedy per position over the whole catalog: the old policy's pick or a uniform one
    assert set(np.round(props, 6)) <= {round(0.8 + 0.2 / (40 - j), 6) for j in range(4)} | {round(0.2 / (40 - j), 6) for j in range(4)}
    w = log.world
    e = log.eval[0]
    best = np.argsort(-w.truth(e))[:4]
    assert log.value(e, best) == pytest.approx(1.0)  # the true top-k is the optimum
    assert log.value(e, best[::-1]) < 1.0  # the same items, the best one lowest: the position effect costs
    # a user's history holds only the items clicked before the impression
    clicked = {}
    for ex in log.examples:
        assert set(ex.history) <= clicked.get(ex.user_id, set())
        if ex.label:
            clicked.setdefault(ex.user_id, set()).add(ex.item_id)


def test_cli_prints_every_arm_beside_the_old_policy_and_random(capsys) -> None:
    assert main([*TINY, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res["rows"]) == {*ARMS, "old policy", "random"}
    for name in ARMS:
        assert 0.0 <= res["rows"][name]["value"] <= 1.0
        if name != "plain":
            assert "minus_plain" in res["rows"][name]
    with pytest.raises(SystemExit):
        main([*TINY, "--epsilon", "0"])
