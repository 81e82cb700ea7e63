"""Trainer checkpoints: a restart resumes with identical parameters, optimizer, offsets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from contract.records import Item, Labeled
from trainer.catalog import Catalog
from trainer.checkpoint import (
    CHECKPOINT_FILE,
    PREVIOUS_FILE,
    Checkpoint,
    CheckpointError,
    CorruptCheckpointError,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from trainer.dedupe import DedupeWindow, dedupe_key
from trainer.feed import Feed
from trainer.guardrail import Refusal, guardrail_passes
from trainer.holdout import held_back
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.metrics import paired_log_loss_se
from trainer.model import ModelConfig, build_model

CATEGORIES = ["drama", "scifi", "comedy"]


def _catalog() -> Catalog:
    return Catalog(
        Item(item_id=f"i{n}", text=f"{CATEGORIES[n % 3]} film number {n}", categories=[CATEGORIES[n % 3]], ts=1)
        for n in range(12)
    )


def _examples(n: int, seed: int) -> list[Labeled]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        item = f"i{rng.randrange(12)}"
        imp = f"s{seed}-imp{k}"
        out.append(Labeled(
            example_id=f"{imp}:{item}", impression_id=imp, user_id=f"u{rng.randrange(5)}",
            item_id=item, position=k % 4, label=rng.random() < 0.3,
            history=[f"i{rng.randrange(12)}" for _ in range(3)],
            impression_ts=1000 + k, label_ts=2000 + k, ts=2000 + k,
        ))  # fmt: skip
    return out


def _learner(config: ModelConfig) -> ContinualLearner:
    return ContinualLearner(
        build_model(config), LearnerConfig(device="cpu", replay_size=50, distill_weight=0.5), _catalog()
    )


def _config(**kw: object) -> ModelConfig:
    fields: dict[str, object] = {"encoder_layers": 1, "max_text_len": 16, "embed_dim": 32, "categories": CATEGORIES}
    fields.update(kw)
    return ModelConfig(**fields)


def _checkpoint(learner: ContinualLearner, offsets: dict[str, int], dedupe: DedupeWindow) -> Checkpoint:
    return Checkpoint(
        learner_state=learner.state_dict(),
        offsets=offsets,
        examples_trained=learner.examples_trained,
        recent_example_ids=dedupe.state(),
        model_config=learner.model.config.model_dump(mode="json"),
        settings={"batch_size": 16},
        service_state={"live_version": 3, "holdout": [e.to_dict() for e in _examples(2, 9)]},
    )


def test_restart_from_checkpoint_is_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    learner = _learner(_config())
    for k in range(3):
        learner.step(_examples(16, k))
    learner.set_teacher(learner.model.trainable_state_dict())  # as after a publish
    learner.step(_examples(16, 3))
    offsets = {"labeled:0": 31, "labeled:1": 17, "labeled:3": 0}
    dedupe = DedupeWindow(100, (e.example_id for e in _examples(64, 0)))
    save_checkpoint(tmp_path, _checkpoint(learner, offsets, dedupe))

    restored = _learner(_config())
    ckpt = load_checkpoint(tmp_path, expected_model_config=_config().model_dump(mode="json"))
    assert ckpt is not None
    restored.load_state_dict(ckpt.learner_state)
    assert ckpt.offsets == offsets
    assert ckpt.examples_trained == learner.examples_trained == 64
    assert ckpt.recent_example_ids == dedupe.state()
    assert ckpt.service_state["live_version"] == 3 and len(ckpt.service_state["holdout"]) == 2
    assert ckpt.created_ts > 0

    def same_params() -> None:
        a, b = learner.model.state_dict(), restored.model.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k

    same_params()
    assert restored.metrics.snapshot() == learner.metrics.snapshot()
    # The next step (replay sampling, optimizer moments, distillation, RNG) matches exactly.
    batch = _examples(16, 4)
    out_a, out_b = learner.step(batch), restored.step(batch)
    assert out_a["loss"] == out_b["loss"]
    same_params()


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    learner = _learner(_config())
    save_checkpoint(tmp_path, _checkpoint(learner, {}, DedupeWindow(10)))
    other = _config(embed_dim=16).model_dump(mode="json")
    with pytest.raises(CheckpointError, match=r"embed_dim: checkpoint has 32, configured 16"):
        load_checkpoint(tmp_path, expected_model_config=other)


def test_write_is_atomic_and_bad_files_are_refused(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    learner = _learner(_config())
    save_checkpoint(tmp_path, _checkpoint(learner, {"labeled:0": 5}, DedupeWindow(10)))
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    broken = _checkpoint(learner, {"labeled:0": 9}, DedupeWindow(10))
    broken.service_state["oops"] = lambda: None  # cannot be pickled: the write fails midway
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path, broken)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temp file left
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.offsets == {"labeled:0": 5}

    (tmp_path / f".{CHECKPOINT_FILE}.abc.tmp").write_bytes(b"a write a crash interrupted")
    assert remove_stale_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]

    (tmp_path / CHECKPOINT_FILE).write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    """Issue 12.9e: a truncated checkpoint.pt must not stop the trainer when the one before is intact."""
    learner = _learner(_config())
    save_checkpoint(tmp_path, _checkpoint(learner, {"labeled:0": 5}, DedupeWindow(10)))
    save_checkpoint(tmp_path, _checkpoint(learner, {"labeled:0": 9}, DedupeWindow(10)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, PREVIOUS_FILE])
    newest = (tmp_path / CHECKPOINT_FILE).read_bytes()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.offsets == {"labeled:0": 9}

    (tmp_path / CHECKPOINT_FILE).write_bytes(newest[: len(newest) // 2])  # truncated
    ckpt = load_checkpoint(tmp_path, expected_model_config=_config().model_dump(mode="json"))
    assert ckpt is not None and ckpt.offsets == {"labeled:0": 5}

    (tmp_path / CHECKPOINT_FILE).unlink()  # a crash between the rename and the write
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.offsets == {"labeled:0": 5}

    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    (tmp_path / PREVIOUS_FILE).write_bytes(newest[:100])
    with pytest.raises(CorruptCheckpointError, match="corrupt"):  # both bad: refused, never silently fresh
        load_checkpoint(tmp_path)
    other = _config(embed_dim=16).model_dump(mode="json")
    save_checkpoint(tmp_path, _checkpoint(learner, {"labeled:0": 11}, DedupeWindow(10)))
    with pytest.raises(CheckpointError, match="embed_dim"):  # another model is refused, not skipped
        load_checkpoint(tmp_path, expected_model_config=other)


def test_dedupe_window_and_hold_back() -> None:
    w = DedupeWindow(3, ["a", "b"])
    w.add("c")
    w.add("a")  # already there: no change of order
    w.add("d")  # evicts the oldest
    assert w.state() == ["b", "c", "d"] and "a" not in w and "d" in w
    assert DedupeWindow(3, w.state()).state() == w.state()  # survives a checkpoint round trip

    neg = _examples(1, 0)[0].model_copy(update={"label": 0, "late": False})
    late = neg.model_copy(update={"label": 1, "late": True})
    assert dedupe_key(neg) != dedupe_key(late)  # a late positive corrects its negative: not a duplicate

    ids = [f"imp{k}:i{k % 7}" for k in range(4000)]
    share = sum(held_back(i, 0.1) for i in ids) / len(ids)
    assert 0.08 < share < 0.12
    assert [held_back(i, 0.1) for i in ids] == [held_back(i, 0.1) for i in ids]  # stable
    assert not any(held_back(i, 0.0) for i in ids)


def test_the_positive_wins_over_its_example_ids_negative() -> None:
    neg = _examples(1, 0)[0].model_copy(update={"label": 0, "late": False})
    redo = neg.model_copy(update={"label": 1})  # a redo whose idle close went out before the state
    w = DedupeWindow(10)
    assert w.first_time(neg) and w.first_time(redo)  # the positive corrects the fake negative
    assert not w.first_time(redo) and not w.first_time(neg)  # redeliveries of either
    w = DedupeWindow(10)
    assert w.first_time(redo) and not w.first_time(neg)  # a negative after its positive is dropped
    old = DedupeWindow(10, [neg.example_id + "#late"])  # a checkpoint of the previous key format
    assert not old.first_time(redo)


def test_guardrail_comparison() -> None:
    live = {"log_loss": 0.50, "auc": 0.70}
    assert guardrail_passes({"log_loss": 0.505, "auc": 0.69}, live, metric="log_loss", margin=0.01)[0]
    assert not guardrail_passes({"log_loss": 0.52, "auc": 0.75}, live, metric="log_loss", margin=0.01)[0]
    assert guardrail_passes({"log_loss": 0.9, "auc": 0.695}, live, metric="auc", margin=0.01)[0]
    assert not guardrail_passes({"log_loss": 0.4, "auc": 0.6}, live, metric="auc", margin=0.01)[0]
    # AUC undefined (one class only in the held-back set): falls back to log loss
    assert guardrail_passes({"log_loss": 0.4}, {"log_loss": 0.5}, metric="auc", margin=0.0)[0]
    # noise-aware: 0.03 worse is within 1.64 standard errors of 0.02, not of 0.005
    assert guardrail_passes({"log_loss": 0.53}, live, metric="log_loss", margin=0.0, z=1.64, loss_diff_se=0.02)[0]
    assert not guardrail_passes({"log_loss": 0.53}, live, metric="log_loss", margin=0.0, z=1.64,
                                loss_diff_se=0.005)[0]
    # the refusal's reason comes with the verdict (a fixed label, not parsed from the explanation)
    assert guardrail_passes({"log_loss": 0.52}, live, metric="log_loss", margin=0.01)[1] is Refusal.WORSE_THAN_LIVE
    assert guardrail_passes({}, live, metric="log_loss", margin=0.01)[1] is Refusal.METRIC_UNDEFINED
    assert guardrail_passes({"log_loss": 0.4}, live, metric="log_loss", margin=0.01)[1] is None


def test_paired_standard_error() -> None:
    labels = [1, 0, 0, 1, 0, 0, 0, 1]
    same = [0.7, 0.2, 0.1, 0.6, 0.3, 0.2, 0.1, 0.8]
    assert paired_log_loss_se(labels, same, same) == 0.0  # identical models: no noise at all
    noisy = [0.6, 0.3, 0.05, 0.7, 0.2, 0.3, 0.15, 0.7]
    se = paired_log_loss_se(labels, noisy, same)
    assert 0.0 < se < 0.2


# --------------------------------------------------------------------------- the feed
def _feed(catalog: Catalog, expired: list, **kw: object) -> Feed:
    fields: dict[str, object] = {"batch_size": 8, "max_batch_wait_s": 1.0, "missing_item_wait_s": 5.0,
                                 "dedupe_window": 100}
    fields.update(kw)
    return Feed(catalog, on_expired=lambda p, o, ex, why: expired.append((p, o, ex.example_id, why)), **fields)


def test_feed_drops_redeliveries_and_moves_offsets_only_once_trained() -> None:
    catalog, expired = _catalog(), []
    feed = _feed(catalog, expired, batch_size=10)
    examples = _examples(6, 1)
    for off, ex in enumerate(examples):
        feed.add(0, off, ex, now=0.0)
    feed.add(0, 6, None, now=0.0)  # malformed, already dead-lettered: only advances the offset
    feed.add(1, 0, examples[0], now=0.0)  # a redelivery on another partition
    assert not feed.due(0.5) and feed.due(1.0)  # the oldest has waited max_batch_wait_s
    taken = feed.take(1.0)
    assert [e.example_id for e in taken.examples] == [e.example_id for e in examples]
    assert taken.duplicates == 1 and taken.consumed == 8
    assert feed.offsets == {}  # nothing trained yet
    feed.advance(taken.advanced)
    assert feed.offsets == {0: 7, 1: 1}
    late = examples[0].model_copy(update={"label": 1, "late": True})
    feed.add(1, 1, late, now=2.0)  # a late positive corrects its negative: not a duplicate
    assert feed.take(3.0).examples == [late]
    again = Feed(catalog, batch_size=8, max_batch_wait_s=1.0, missing_item_wait_s=5.0, dedupe_window=100,
                 on_expired=lambda *a: None)
    again.resume({0: 7}, feed.dedupe.state())  # a restart: the window comes back with the checkpoint
    again.add(0, 7, examples[1], now=0.0)
    assert again.take(2.0).duplicates == 1 and not expired


def test_feed_waits_for_a_missing_item_then_dead_letters_it_while_others_go_on() -> None:
    catalog, expired = _catalog(), []
    feed = _feed(catalog, expired, batch_size=2)
    ghost = _examples(1, 2)[0].model_copy(update={"item_id": "later", "example_id": "x:later"})
    behind, other = _examples(2, 3)
    feed.add(0, 10, ghost, now=0.0)
    feed.add(0, 11, behind, now=0.0)
    feed.add(1, 0, other, now=0.0)
    taken = feed.take(1.0)  # partition 0 waits at the ghost; partition 1 goes on
    assert taken.examples == [other] and taken.advanced == {1: 1}
    catalog.upsert(Item(item_id="later", text="it came", categories=[], ts=2))
    assert [e.example_id for e in feed.take(2.0).examples] == ["x:later", behind.example_id]
    catalog.remove("later")
    feed.add(0, 12, ghost.model_copy(update={"example_id": "y:later"}), now=3.0)
    assert feed.take(3.0).examples == [] and not expired  # the wait starts
    taken = feed.take(8.0)  # missing_item_wait_s later: dead-lettered, the partition moves on
    assert expired == [(0, 12, "y:later", "item later not in the catalog after 5s")]
    assert taken.advanced == {0: 13} and feed.queued() == 0


def test_a_slate_of_missing_items_waits_once_not_once_per_item() -> None:
    """Found in the chaos review: after one expiry the next missing item waited a full period again."""
    catalog, expired = _catalog(), []
    feed = _feed(catalog, expired, batch_size=8)
    base = _examples(1, 5)[0]
    for n in range(4):
        feed.add(0, n, base.model_copy(update={"item_id": f"gone{n}", "example_id": f"s:gone{n}"}), now=0.0)
    late = base.model_copy(update={"item_id": "gone9", "example_id": "s:gone9"})
    feed.add(0, 4, late, now=4.0)  # queued later: waits its own period
    assert feed.take(1.0).examples == []  # the wait starts
    taken = feed.take(6.5)
    assert [e[1] for e in expired] == [0, 1, 2, 3] and taken.advanced == {0: 4}
    feed.take(8.0)
    assert len(expired) == 4
    feed.take(9.5)
    assert [e[1] for e in expired] == [0, 1, 2, 3, 4]


def test_feed_backpressure_pauses_full_partitions_and_resumes_below_half() -> None:
    feed = _feed(_catalog(), [])
    for off, ex in enumerate(_examples(4, 4)):
        feed.add(3, off, ex, now=0.0)
    assert feed.backpressure(4) == ([3], []) and feed.backpressure(4) == ([], [])
    feed.take(0.0)
    assert feed.backpressure(4) == ([], [3])
    assert feed.poll_timeout(0.0) == 0.2 and feed.queued() == 0
