"""benchmarks/loop_ceiling.py at a tiny size: every policy answers every request, the figures are make loop's."""

from __future__ import annotations

import json

import pytest

from benchmarks.loop_ceiling import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_arm_runs_the_loop_and_the_json_line_has_its_phases(capsys) -> None:
    argv = ["--seeds", "1", "--requests", "60", "--window", "20", "--users", "10", "--items", "30", "--new-items", "5",
            "--k", "3", "--learn-every", "20", "--refresh-every", "5", "--serve-from", "10",
            "--arms", "oracle,oracle-text,learner+eps,learner+ts,learner+refresh,item-ctr,random"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res["arms"]) == {"oracle", "oracle-text", "learner+eps", "learner+ts", "learner+refresh", "item-ctr", "random"}
    for arm in res["arms"].values():
        for phase in ("before", "before_last_window", "after", "after_last_window"):
            assert 0.0 <= arm[phase]["mean"] <= 1.5  # realised clicks / optimal expected clicks
    assert "<- shift" in out  # the windows table marks the shift
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--arms", "nope"])


def test_labels_in_flight_for_longer_than_the_run_teach_the_learner_nothing(capsys) -> None:
    base = ["--seeds", "1", "--requests", "40", "--window", "20", "--users", "8", "--items", "20", "--new-items", "0",
            "--k", "3", "--arms", "learner"]

    def figures(*extra: str) -> dict:
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arms"]["learner"]

    never = figures("--learn-every", "1000")  # never learns
    assert figures("--learn-every", "10", "--lag", "1000") == never  # learns, but no label arrives in time
    assert figures("--learn-every", "10", "--lag", "1000", "--positive-lag", "0") != never  # the positives do
    figures("--learn-every", "10", "--lag", "5", "--positive-lag", "1", "--holdout", "0.1", "--teacher")
    for bad in (["--lag", "-1"], ["--positive-lag", "-1"], ["--holdout", "1"]):
        with pytest.raises(SystemExit):
            main([*base, *bad])
