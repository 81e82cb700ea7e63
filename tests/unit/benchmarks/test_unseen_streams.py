"""benchmarks/unseen_streams.py at a tiny size: each setting's run, its row and the JSON line."""

from __future__ import annotations

import json

import pytest

from benchmarks.unseen_streams import main, summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def _result(default: float, baselines: dict[str, tuple[str, float]]) -> dict:
    return {
        "strategies": {"default": {"auc": default, "auc_se": 0.01}, "static": {"auc": 0.6}},
        "baselines": {
            n: {"kind": kind, "auc": auc, "auc_diff": auc - default, "auc_diff_se": 0.002}
            for n, (kind, auc) in baselines.items()
        },
    }


def test_the_best_cheap_baseline_is_compared_and_references_are_not_baselines() -> None:
    row = summarize("x", _result(0.70, {"item-ctr": ("baseline", 0.55), "user-cat-ctr": ("baseline", 0.66),
                                        "oracle": ("reference", 0.72)}))  # fmt: skip
    assert row["best_baseline"] == "user-cat-ctr"  # the oracle scores higher but is a reference
    assert row["margin"] == pytest.approx(0.04)  # default minus the baseline
    assert row["references"] == {"oracle": 0.72}


def test_a_tiny_setting_runs_end_to_end(capsys) -> None:
    assert main(["--only", "syn-u50", "--extra", "--events 240 --batch-size 64"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = res["rows"]
    assert row["setting"] == "syn-u50"
    assert 0.0 <= row["default"] <= 1.0 and row["best_baseline"] in {"item-ctr", "user-cat-ctr", "mf-16", "river-lr"}
    with pytest.raises(SystemExit):
        main(["--only", "nope"])
