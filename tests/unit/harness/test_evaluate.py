"""Offline evaluation: the replay -> labeled conversion, and the CLI end to end at toy size."""

from __future__ import annotations

import argparse
import json

import pytest

from harness.evaluate import main
from harness.replays import _split, labeled_examples
from streams.join import reference_join
from streams.replay.synthetic import SyntheticConfig, SyntheticStream

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_offline_examples_are_the_reference_joins_in_event_time_order() -> None:
    world = SyntheticStream(SyntheticConfig(users=10, items=20, new_items=5, events=200, seed=3))
    items, imps, clicks = _split(world.stream())
    ref = labeled_examples(imps, clicks, window_ms=4_000, history_length=5)
    local = [e.to_record() for e in reference_join(imps, clicks, window_ms=4_000, history_length=5).examples]
    assert {(e.example_id, e.label, e.late) for e in ref} == {(e.example_id, e.label, e.late) for e in local}
    by_id = {(e.example_id, e.late): e.history for e in local}
    assert all(by_id[(e.example_id, e.late)] == e.history for e in ref)
    assert any(e.late for e in ref)  # the 4 s window makes some clicks late
    ts = [e.impression_ts for e in ref]
    assert ts == sorted(ts)  # event-time order


def test_cli_compares_strategies_and_writes_plot_and_json(tmp_path, capsys) -> None:
    out, js = tmp_path / "auc.png", tmp_path / "summary.json"
    rc = main([
        "--dataset", "synthetic", "--events", "120", "--periods", "2", "--batch-size", "100",
        "--encoder-layers", "1", "--freeze-layers", "1", "--max-text-len", "16", "--embed-dim", "16",
        "--publish-every", "2", "--out", str(out), "--json", str(js),
    ])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("static", "naive", "default", "retrain", "best", "forgetting", "log loss"):
        assert word in text
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(js.read_text())
    assert set(summary["strategies"]) == {"static", "naive", "default", "retrain"}
    for s in summary["strategies"].values():
        assert len(s["auc_per_period"]) == 2 and 0.0 <= s["auc"] <= 1.0
    static = summary["strategies"]["static"]
    assert static["forgetting"] == 0.0  # a frozen model forgets nothing
    assert 0.5 < summary["best_auc"] <= 1.0


def test_cli_help() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_cli_sets_any_model_and_learner_field(tmp_path) -> None:
    from harness.evaluate import field_overrides

    parser = argparse.ArgumentParser()
    assert field_overrides(parser, ["history_scale=3", "user_tower=attention", "center_text=false"]) == {
        "history_scale": 3, "user_tower": "attention", "center_text": False,
    }
    with pytest.raises(SystemExit):
        field_overrides(parser, ["no-equals-sign"])
    js = tmp_path / "summary.json"
    rc = main([
        "--dataset", "synthetic", "--events", "120", "--periods", "2", "--batch-size", "100", "--strategies", "default",
        "--baselines", "none", "--encoder-layers", "1", "--max-text-len", "16", "--embed-dim", "16",
        "--model-set", "history_scale=2.5", "--learner-set", "updates_per_batch=1",
        "--out", str(tmp_path / "auc.png"), "--json", str(js),
    ])
    assert rc == 0
    default = json.loads(js.read_text())["strategies"]["default"]
    # one step per batch: fresh examples plus at most half as many replayed (two steps would be >= 2x)
    assert default["trained_examples"] <= default["example_updates"] <= 1.5 * default["trained_examples"] + 1


def test_retrain_cadence_and_epochs_scale_its_compute(tmp_path) -> None:
    def updates(*extra: str) -> dict:
        js = tmp_path / "summary.json"
        rc = main([
            "--dataset", "synthetic", "--events", "120", "--periods", "2", "--batch-size", "50", "--strategies", "retrain",
            "--baselines", "none", "--encoder-layers", "1", "--max-text-len", "16", "--embed-dim", "16",
            "--learner-set", "updates_per_batch=1", "--out", str(tmp_path / "auc.png"), "--json", str(js), *extra,
        ])
        assert rc == 0
        return json.loads(js.read_text())["strategies"]["retrain"]

    at_periods = updates()
    every, twice = updates("--retrain-every", "2"), updates("--retrain-every", "2", "--retrain-epochs", "2")
    # retraining every 2 batches from scratch costs more than once at the period's end
    assert every["example_updates"] > at_periods["example_updates"]
    # a second pass doubles each retrain's updates; the continual start before the first retrain is the same
    first = 2 * every["example_updates"] - twice["example_updates"]
    assert 0 < first < every["example_updates"]
    with pytest.raises(SystemExit):
        main(["--retrain-epochs", "0"])
