"""What the weight store trusts: only its own root, capped reads, bounded configs, signed manifests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from contract.records import ModelUpdate
from contract.settings import load
from serving.settings import ServingSettings
from trainer.model import ModelConfig, RecModel, build_model
from trainer.service_settings import TrainerSettings
from trainer.weight_manifest import read_manifest
from trainer.weights import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    WeightsError,
    WeightsReason,
    WeightStore,
    version_dir,
)

R = WeightsReason
CONFIG = ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=16, user_buckets=8, item_buckets=8)


@pytest.fixture(scope="module")
def model() -> RecModel:
    return build_model(CONFIG)


def _reason(exc: pytest.ExceptionInfo[WeightsError]) -> WeightsReason:
    return exc.value.reason


def _rewrite_manifest(store: WeightStore, version: int, **changes: object) -> ModelUpdate:
    path = Path(store.path) / version_dir(version) / MANIFEST_FILE
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ModelConfig.model_fields:
            doc["model_config"][key] = value
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))
    return store.update(version)


# --------------------------------------------------------------------------- confinement
def test_a_record_naming_a_version_outside_the_store_is_refused(tmp_path: Path, model: RecModel) -> None:
    store = WeightStore(tmp_path / "store")
    store.publish(model, version=1)
    forged = WeightStore(tmp_path / "elsewhere").publish(model, version=2)  # valid, sha256 right
    with pytest.raises(WeightsError) as exc:
        store.load(forged)
    assert _reason(exc) is R.FOREIGN
    # the same version copied out of the store and announced there is refused too
    shutil.copytree(tmp_path / "store" / "v000001", tmp_path / "copy" / "v000001")
    copied = _with_uri(store.update(1), (tmp_path / "copy" / "v000001" / MANIFEST_FILE).as_uri())
    with pytest.raises(WeightsError) as exc:
        store.load(copied)
    assert _reason(exc) is R.FOREIGN
    store.load(store.update(1))  # its own announcement still loads


def _with_uri(update: ModelUpdate, uri: str) -> ModelUpdate:
    doc = json.loads(update.to_json())
    doc["uri"] = uri
    return ModelUpdate.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "uri",
    [
        "memory://store/v000001/manifest.json",
        "simplecache::file://{root}/v000001/manifest.json",
        "http://127.0.0.1:9/v000001/manifest.json",
        "file://{root}/v000002/../v000001/manifest.json",
        "file://{root}/v000002/manifest.json",  # another version's manifest than the one announced
        "file:///dev/zero",
    ],
)
def test_other_schemes_dot_dots_and_other_paths_are_refused(tmp_path: Path, model: RecModel, uri: str) -> None:
    store = WeightStore(tmp_path / "store")
    store.publish(model, version=1)
    store.publish(model, version=2)
    forged = _with_uri(store.update(1), uri.format(root=store.path))
    with pytest.raises(WeightsError) as exc:
        store.load(forged)
    assert _reason(exc) is R.FOREIGN


def test_symlinks_out_of_the_store_are_refused(tmp_path: Path, model: RecModel) -> None:
    store = WeightStore(tmp_path / "store")
    store.publish(model, version=1)
    outside = WeightStore(tmp_path / "outside")
    outside.publish(model, version=2)
    os.symlink(tmp_path / "outside" / "v000002", tmp_path / "store" / "v000002")  # a whole version dir
    with pytest.raises(WeightsError) as exc:
        store.load(_with_uri(outside.update(2), store.manifest_uri(2)))
    assert _reason(exc) is R.FOREIGN
    with pytest.raises(WeightsError) as exc:
        store.verify(2)
    assert _reason(exc) is R.FOREIGN
    # only the weights file linked out
    (tmp_path / "store" / "v000001" / WEIGHTS_FILE).unlink()
    os.symlink(tmp_path / "outside" / "v000002" / WEIGHTS_FILE, tmp_path / "store" / "v000001" / WEIGHTS_FILE)
    with pytest.raises(WeightsError) as exc:
        store.load(1)
    assert _reason(exc) is R.FOREIGN


# --------------------------------------------------------------------------- size caps
def test_manifests_and_weights_are_read_with_a_cap(tmp_path: Path, model: RecModel) -> None:
    with pytest.raises(WeightsError) as exc:  # /dev/zero never ends: refused after 1 MiB
        read_manifest(LocalFileSystem(), "/dev/zero", "version 1")
    assert _reason(exc) is R.SIZE
    store = WeightStore(tmp_path / "store")
    store.publish(model, version=1)
    path = Path(store.path) / "v000001" / MANIFEST_FILE
    doc = json.loads(path.read_text())
    doc["padding"] = "x" * (2 << 20)
    path.write_text(json.dumps(doc))
    with pytest.raises(WeightsError) as exc:
        store.load(1)
    assert _reason(exc) is R.SIZE

    store.publish(model, version=2)
    size = store.manifest(2).size
    small = WeightStore(tmp_path / "store", max_weights_bytes=size - 1)
    with pytest.raises(WeightsError) as exc:
        small.load(2)
    assert _reason(exc) is R.SIZE
    WeightStore(tmp_path / "store", max_weights_bytes=size).load(2)
    huge = _rewrite_manifest(store, 2, size=1 << 40)  # a manifest claiming 1 TiB is refused unread
    with pytest.raises(WeightsError) as exc:
        store.load(huge)
    assert _reason(exc) is R.SIZE


# --------------------------------------------------------------------------- config bounds
@pytest.mark.parametrize(
    "field",
    [
        {"embed_dim": 1 << 20},
        {"user_buckets": 1 << 30},
        {"item_buckets": 1 << 30},
        {"max_history": 1 << 20},
        {"max_text_len": 1 << 20},
        {"encoder_layers": 10_000},
        {"attention_heads": 10_000},
        {"lora_rank": 1 << 20},
        {"encode_chunk": 1 << 30},
        {"categories": [f"c{i}" for i in range(20_000)]},
        {"user_buckets": 1 << 22, "item_buckets": 1 << 22, "embed_dim": 4096},
    ],
)
def test_every_field_that_sizes_memory_is_bounded(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ModelConfig(**field)


def test_generous_real_configs_still_validate() -> None:
    ModelConfig(embed_dim=256, user_buckets=1 << 20, item_buckets=1 << 20, max_history=200,
                categories=[f"c{i}" for i in range(500)], encoder_layers=12, lora_rank=16)


def test_a_manifest_config_out_of_bounds_is_refused_before_its_weights_are_read(
    tmp_path: Path, model: RecModel
) -> None:
    store = WeightStore(tmp_path / "store")
    store.publish(model, version=1)
    update = _rewrite_manifest(store, 1, embed_dim=1 << 24, user_buckets=1 << 30)
    (Path(store.path) / "v000001" / WEIGHTS_FILE).unlink()  # would be MISSING if it were read first
    with pytest.raises(WeightsError) as exc:
        store.load(update)
    assert _reason(exc) is R.CONFIG


@pytest.mark.parametrize("encoder", ["bert-base-uncased", "org/some-model", "https://example.com/m", "{outside}"])
def test_an_announced_encoder_must_be_the_offline_default_or_a_local_folder_in_a_trusted_root(
    tmp_path: Path, model: RecModel, encoder: str
) -> None:
    (tmp_path / "outside").mkdir()
    store = WeightStore(tmp_path / "store")
    store.publish(model, version=1)
    update = _rewrite_manifest(store, 1, encoder=encoder.format(outside=tmp_path / "outside"))
    with pytest.raises(WeightsError) as exc:
        store.load(update)
    assert _reason(exc) is R.FOREIGN


# --------------------------------------------------------------------------- signatures
def test_signed_versions_load_and_unsigned_or_wrongly_signed_ones_are_refused(
    tmp_path: Path, model: RecModel
) -> None:
    root = tmp_path / "store"
    writer = WeightStore(root, signing_key="s3cret")
    signed = writer.publish(model, version=1)
    assert (root / "v000001" / SIGNATURE_FILE).is_file()
    assert isinstance(WeightStore(root, signing_key="s3cret").load(signed), RecModel)
    WeightStore(root).load(signed)  # a reader without a key does not check

    with pytest.raises(WeightsError) as exc:
        WeightStore(root, signing_key="other").load(signed)
    assert _reason(exc) is R.SIGNATURE

    unsigned = WeightStore(root).publish(model, version=2)
    assert not (root / "v000002" / SIGNATURE_FILE).exists()
    with pytest.raises(WeightsError) as exc:
        WeightStore(root, signing_key="s3cret").load(unsigned)
    assert _reason(exc) is R.SIGNATURE

    tampered = _rewrite_manifest(WeightStore(root), 1, trained_examples=999)  # signature of the old bytes
    with pytest.raises(WeightsError) as exc:
        WeightStore(root, signing_key="s3cret").load(tampered)
    assert _reason(exc) is R.SIGNATURE
    reader = WeightStore(root, signing_key="s3cret")
    assert reader.latest_valid() is None  # neither the tampered nor the unsigned one verifies


def test_a_signed_delta_on_an_unsigned_base_is_refused(tmp_path: Path, model: RecModel) -> None:
    root = tmp_path / "store"
    WeightStore(root).publish(model, version=1)
    (root / "v000001" / SIGNATURE_FILE).write_text("0" * 64)
    delta = WeightStore(root, signing_key="k").publish  # the writer cannot even read its base
    with pytest.raises(WeightsError) as exc:
        delta(model, version=2, kind="delta", base_version=1)
    assert _reason(exc) is R.SIGNATURE


def test_signing_keys_come_from_secret_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_TRAINER_SIGNING_KEY", "writer-key")
    monkeypatch.setenv("STREAMREC_SERVING_SIGNING_KEY", "reader-key")
    trainer, serving = load(TrainerSettings), load(ServingSettings)
    assert trainer.signing_key is not None and trainer.signing_key.get_secret_value() == "writer-key"
    assert serving.signing_key is not None and serving.signing_key.get_secret_value() == "reader-key"
    assert "writer-key" not in repr(trainer) and "reader-key" not in repr(serving)
    monkeypatch.delenv("STREAMREC_TRAINER_SIGNING_KEY")
    assert load(TrainerSettings).signing_key is None
