"""The versioned weight store: round trips, refusal of corrupt versions, deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contract.records import ModelUpdate
from tests.model_utils import perturb
from trainer.model import ModelConfig, RecModel, build_model
from trainer.weights import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    WeightsError,
    WeightsReason,
    WeightStore,
    version_dir,
)

TEXTS = ["a quiet drama about a lighthouse", "space opera with robots", "a cooking show", "jazz documentary"]


def _config(**kw: object) -> ModelConfig:
    base = {"encoder_layers": 1, "max_text_len": 16, "embed_dim": 32, "categories": ["drama", "scifi"],
            "value_head": True, "user_buckets": 8}
    base.update(kw)
    return ModelConfig(**base)




def _scores(model: RecModel) -> torch.Tensor:
    with torch.no_grad():
        items = model.encode_items(TEXTS)
        hist = items[torch.tensor([[0, 1], [2, 0]])]
        mask = torch.tensor([[True, True], [True, False]])
        users = model.encode_users(hist, mask, ["u1", "u2"])
        return model.score_matrix(users, items)


def _assert_same(a: RecModel, b: RecModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def trained() -> RecModel:
    model = build_model(_config())
    perturb(model, 1)
    return model


def test_full_version_rebuilds_the_same_model(tmp_path: Path, trained: RecModel) -> None:
    store = WeightStore(tmp_path / "w")
    update = store.publish(
        trained, version=1, metrics={"auc": 0.71, "bad": float("nan")}, trained_examples=640,
        source_offsets={"labeled:0": 120, "labeled:1": 98}, model_name="m1",
    )
    assert isinstance(update, ModelUpdate)
    assert (update.model, update.version, update.kind, update.base_version) == ("m1", 1, "full", None)
    assert update.trained_examples == 640 and update.source_offsets == {"labeled:0": 120, "labeled:1": 98}
    assert update.metrics == {"auc": 0.71}  # non-finite metrics are left out (JSON has no NaN)
    assert update.uri.startswith("file://") and update.uri.endswith(f"v000001/{MANIFEST_FILE}")
    assert ModelUpdate.from_json(update.to_json()) == update  # what goes on model-updates

    manifest = json.loads((tmp_path / "w" / "v000001" / MANIFEST_FILE).read_text())
    assert manifest["model_config"] == trained.config.model_dump(mode="json")
    assert manifest["sha256"] == update.sha256 and manifest["kind"] == "full"
    assert manifest["format_version"] == 1 and manifest["created_ts"] == update.created_ts

    loaded = store.load(update)
    assert not loaded.training
    _assert_same(trained, loaded)
    assert torch.equal(_scores(trained), _scores(loaded))
    # by version number too, and through another store object on the same root
    _assert_same(trained, WeightStore(str(tmp_path / "w")).load(1))
    assert store.versions() == [1] and store.latest_valid() == update


def test_flipped_byte_is_refused(tmp_path: Path, trained: RecModel) -> None:
    store = WeightStore(tmp_path)
    first = store.publish(trained, version=1)
    second = store.publish(trained, version=2)
    path = tmp_path / version_dir(2) / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        store.load(second)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        store.verify(2)
    assert store.latest_valid() == first  # the newest version that verifies


def test_truncated_or_missing_file_is_refused(tmp_path: Path, trained: RecModel) -> None:
    store = WeightStore(tmp_path)
    update = store.publish(trained, version=1)
    path = tmp_path / version_dir(1) / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated"):
        store.load(update)
    path.unlink()
    with pytest.raises(WeightsError, match="missing"):
        store.load(1)
    assert store.latest_valid() is None


def test_announcement_must_match_the_manifest(tmp_path: Path, trained: RecModel) -> None:
    store = WeightStore(tmp_path)
    update = store.publish(trained, version=1)
    forged = update.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(WeightsError, match="announced sha256"):
        store.load(forged)


def test_version_without_manifest_does_not_exist(tmp_path: Path, trained: RecModel) -> None:
    store = WeightStore(tmp_path)
    store.publish(trained, version=1)
    (tmp_path / version_dir(2)).mkdir()
    (tmp_path / version_dir(2) / WEIGHTS_FILE).write_bytes(b"half a file")  # a crash mid-publish
    assert store.versions() == [1]
    assert store.next_version() == 3  # never reuses a half-written number
    with pytest.raises(WeightsError, match="already exists"):
        store.publish(trained, version=1)
    assert not list(tmp_path.rglob("*.tmp*"))  # no temp files left behind
    store.publish(trained, version=3)
    store.prune(5)  # keeps every version, but clears the abandoned publish
    assert store.versions() == [1, 3] and not (tmp_path / version_dir(2)).exists()


def test_delta_on_its_base_equals_the_full_snapshot(tmp_path: Path) -> None:
    model = build_model(_config(lora_rank=2, freeze_layers=0))
    perturb(model, 2)
    store = WeightStore(tmp_path)
    store.publish(model, version=1)
    perturb(model, 3)  # more training: only trainable params (LoRA, towers, heads) move
    delta = store.publish(model, version=2, kind="delta", base_version=1)
    full = store.publish(model, version=3)
    assert (delta.kind, delta.base_version) == ("delta", 1)
    manifest = store.manifest(2)
    assert manifest.tensors == len(model.trainable_state_dict()) < len(model.state_dict())
    assert manifest.size < store.manifest(3).size / 2

    from_delta, from_full = store.load(delta), store.load(full)
    _assert_same(from_delta, from_full)
    _assert_same(from_delta, model)
    assert torch.equal(_scores(from_delta), _scores(from_full))

    # a delta whose base is corrupt does not verify either
    base = tmp_path / version_dir(1) / WEIGHTS_FILE
    base.write_bytes(base.read_bytes()[:-1])
    with pytest.raises(WeightsError, match="version 1"):
        store.load(delta)
    assert store.latest_valid() == full


def test_delta_needs_a_published_base_of_the_same_config(tmp_path: Path, trained: RecModel) -> None:
    store = WeightStore(tmp_path)
    with pytest.raises(WeightsError, match="not published"):
        store.publish(trained, version=2, kind="delta", base_version=1)
    store.publish(build_model(_config(embed_dim=16)), version=1)
    with pytest.raises(WeightsError, match="config differs"):
        store.publish(trained, version=2, kind="delta", base_version=1)


def test_fsspec_memory_store_and_prune(trained: RecModel) -> None:
    store = WeightStore("memory://streamrec-test-weights")
    try:
        store.publish(trained, version=1)
        store.publish(trained, version=2, kind="delta", base_version=1)
        store.publish(trained, version=3)
        last = store.publish(trained, version=4, kind="delta", base_version=3)
        assert last.uri == "memory:///streamrec-test-weights/v000004/manifest.json"
        _assert_same(store.load(last), trained)
        assert store.prune(1) == [1, 2]  # version 3 stays: version 4 needs it
        assert store.versions() == [3, 4]
        _assert_same(WeightStore("memory://streamrec-test-weights").load(4), trained)
    finally:
        store.fs.rm(store.path, recursive=True)


def test_every_refusal_carries_a_stable_reason_code(tmp_path: Path, trained: RecModel) -> None:
    """A metric label or a retry decision reads ``exc.reason``, never the wording of the message."""
    store = WeightStore(tmp_path)
    update = store.publish(trained, version=1)
    path = tmp_path / version_dir(1) / WEIGHTS_FILE
    good = path.read_bytes()

    def reason(call) -> WeightsReason:
        with pytest.raises(WeightsError) as info:
            call()
        return info.value.reason

    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert reason(lambda: store.load(1)) is WeightsReason.CHECKSUM
    path.write_bytes(good[:1000])
    assert reason(lambda: store.load(1)) is WeightsReason.TRUNCATED
    path.write_bytes(good + b"extra")
    assert reason(lambda: store.load(1)) is WeightsReason.SIZE
    path.unlink()
    assert reason(lambda: store.load(1)) is WeightsReason.MISSING
    path.write_bytes(good)
    assert reason(lambda: store.load(update.model_copy(update={"sha256": "0" * 64}))) is WeightsReason.CHECKSUM
    assert reason(lambda: store.publish(trained, version=1)) is WeightsReason.EXISTS
    assert reason(lambda: store.manifest(7)) is WeightsReason.MISSING
    other = build_model(_config(embed_dim=16))
    assert reason(lambda: store.load_into(other, 1)) is WeightsReason.MISMATCH
    assert reason(lambda: store.publish(other, version=2, kind="delta", base_version=1)) is WeightsReason.CONFIG
    assert reason(lambda: store.prune(0)) is WeightsReason.INVALID
    assert WeightsError("anything").reason is WeightsReason.INVALID  # the default
