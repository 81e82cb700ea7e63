"""The trainer's publishing rules without Kafka: the guardrail against the popularity fallback,
starting from another deployment's version (INIT_FROM), and delta versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.errors import ConfigError
from contract.settings import KafkaSettings
from tests.model_utils import perturb
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.guardrail import Refusal, beats_fallback
from trainer.metrics import auc, paired_auc
from trainer.model import ModelConfig, RecModel, build_model
from trainer.popularity import Popularity
from trainer.service import TrainerMetrics, TrainerService
from trainer.service_settings import TrainerSettings
from trainer.weights import (
    WeightsError,
    WeightStore,
    changed_tensors,
    config_mismatch,
    cpu_state,
    locate_version,
    state_bytes,
)

TINY = {"encoder_layers": 1, "max_text_len": 16, "embed_dim": 32, "categories": ["a", "b"]}




def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


# --------------------------------------------------------------------------- the fallback guardrail
def _holdout(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a popularity-like fallback score that carries some signal (ties included)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(float)
    fallback = np.round(np.clip(0.3 * y + rng.random(n), 0, 1), 1)  # coarse: many ties
    return y, fallback


def test_guardrail_refuses_a_version_worse_than_the_fallback_and_accepts_a_better_one() -> None:
    y, fallback = _holdout()
    rng = np.random.default_rng(1)
    worse = rng.random(len(y)) + 0.05 * y  # barely any signal
    better = rng.random(len(y)) + 1.5 * y  # strong signal
    ok, reason, why, metrics = beats_fallback(y, worse, fallback, z=1.64)
    assert not ok and reason is Refusal.BELOW_FALLBACK and "not >" in why
    assert metrics["holdout_auc"] < metrics["holdout_fallback_auc"]
    ok, reason, why, metrics = beats_fallback(y, better, fallback, z=1.64)
    assert ok and reason is None
    assert metrics["holdout_auc"] > metrics["holdout_fallback_auc"] + 1.64 * metrics["holdout_fallback_auc_diff_se"]


def test_guardrail_needs_evidence_not_just_a_higher_auc() -> None:
    rng = np.random.default_rng(1)  # 60 held-back examples, ~15 positives: a noisy comparison
    y = (rng.random(60) < 0.25).astype(float)
    fallback = np.round(np.clip(0.3 * y + rng.random(60), 0, 1), 1)
    slightly = 0.4 * y + rng.random(60)
    auc_c, auc_f, se = paired_auc(y, slightly, fallback)
    assert auc_c > auc_f and auc_c <= auc_f + 1.64 * se  # higher, but within the noise
    assert not beats_fallback(y, slightly, fallback, z=1.64)[0]
    assert beats_fallback(y, slightly, fallback, z=0.0)[0]  # z = 0: any improvement


def test_guardrail_undefined_auc_is_a_refusal_of_its_own() -> None:
    ok, reason, _why, _m = beats_fallback([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], z=1.64)
    assert not ok and reason is Refusal.METRIC_UNDEFINED


def test_paired_auc_matches_the_auc_and_a_bootstrap() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.25).astype(float)
    a, b = y + rng.normal(size=400), np.round(0.5 * y + rng.normal(size=400))
    auc_a, auc_b, se = paired_auc(y, a, b)
    assert auc_a == pytest.approx(auc(y, a)) and auc_b == pytest.approx(auc(y, b))
    diffs = []
    for _ in range(500):
        i = rng.integers(0, 400, 400)
        diffs.append(auc(y[i], a[i]) - auc(y[i], b[i]))
    assert se == pytest.approx(float(np.std(diffs)), rel=0.25)


def test_popularity_state_round_trips() -> None:
    pop = Popularity(3600)
    pop.add(["x", "y"], 1_000)
    pop.add(["x"], 3_601_000)
    again = Popularity.from_state(json.loads(json.dumps(pop.state())), 3600)
    assert list(again.vector(["x", "y", "z"])) == list(pop.vector(["x", "y", "z"]))
    assert again.clicks == 3
    again.add(["y"], 3_601_000)
    pop.add(["y"], 3_601_000)
    assert list(again.vector(["x", "y"])) == list(pop.vector(["x", "y"]))
    assert len(Popularity.from_state(pop.state(), 60)) == 0  # another half-life: start over


# --------------------------------------------------------------------------- INIT_FROM
@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RecModel]:
    """Another deployment's store: a full version 1 and a delta version 2 on it."""
    root = tmp_path_factory.mktemp("other") / "weights"
    store = WeightStore(root)
    model = build_model(ModelConfig(**TINY, seed=7))
    perturb(model, 1)
    store.publish(model, version=1, model_name="other")
    base = cpu_state(model)
    perturb(model, 2)
    store.publish(model, version=2, kind="delta", base_version=1, model_name="other",
                  tensors=changed_tensors(model.state_dict(), base))
    return root, model


def _settings(tmp_path: Path, **kw: object) -> TrainerSettings:
    fields = {"weights_root": str(tmp_path / "mine"), "checkpoint_dir": tmp_path / "ckpt", "device": "cpu",
              "encoder_layers": 1, "max_text_len": 16, "model_options": {"embed_dim": 32}, "metrics_port": 0}
    fields.update(kw)
    return TrainerSettings(**fields)


def test_locate_version_takes_a_directory_or_its_manifest(source: tuple[Path, RecModel]) -> None:
    root, _ = source
    for ref in (str(root / "v000002"), str(root / "v000002") + "/", str(root / "v000002" / "manifest.json"),
                f"file://{root}/v000002"):
        store, version = locate_version(ref)
        assert version == 2 and Path(store.path) == root.resolve()
    with pytest.raises(WeightsError, match="not a version directory"):
        locate_version(str(root))
    with pytest.raises(WeightsError, match="no published version 9"):
        locate_version(str(root / "v000009"))


def test_a_fresh_trainer_starts_from_another_deployments_version(
    source: tuple[Path, RecModel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, published = source
    service = TrainerService(_settings(tmp_path, init_from=str(root / "v000002")), KafkaSettings(),
                             metrics=TrainerMetrics())
    with caplog.at_level("INFO", logger="trainer.service"):
        service._build_learner(None)
    _assert_same(service.model, published)  # the delta chain 1 -> 2, resolved
    assert service.model.config.categories == ["a", "b"]  # the source's vocabulary
    assert service.model.config.seed == 0  # this deployment's own config otherwise
    assert "initialised the model from version 2" in caplog.text
    assert service.store.versions() == []  # its own store is untouched: its first version is full


def test_init_from_refuses_another_model_config_naming_the_setting(
    source: tuple[Path, RecModel], tmp_path: Path
) -> None:
    root, _ = source
    with pytest.raises(ConfigError, match="STREAMREC_TRAINER_INIT_FROM.*embed_dim: published 32, configured 64"):
        TrainerService(_settings(tmp_path, init_from=str(root / "v000001"), model_options={"embed_dim": 64}),
                       KafkaSettings(), metrics=TrainerMetrics())
    with pytest.raises(ConfigError, match="STREAMREC_TRAINER_INIT_FROM.*not a version directory"):
        TrainerService(_settings(tmp_path, init_from=str(root)), KafkaSettings(), metrics=TrainerMetrics())
    assert config_mismatch({**TINY, "seed": 1}, {**TINY, "seed": 2}) == []  # the seed is not the model


def test_a_checkpoint_wins_over_init_from(
    source: tuple[Path, RecModel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, published = source
    settings = _settings(tmp_path, init_from=str(root / "v000001"), model_options={"embed_dim": 64})
    cfg = ModelConfig(**{**TINY, "embed_dim": 64, "categories": []}).model_dump(mode="json")
    save_checkpoint(settings.checkpoint_dir, Checkpoint(
        learner_state={}, offsets={}, examples_trained=0, recent_example_ids=[], model_config=cfg,
    ))
    # no config check against the source: the checkpoint's model is what resumes
    service = TrainerService(settings, KafkaSettings(), metrics=TrainerMetrics())
    with caplog.at_level("INFO", logger="trainer.service"):
        service._build_learner(_ckpt(settings))
    assert "wins over STREAMREC_TRAINER_INIT_FROM" in caplog.text
    assert service.model.config.embed_dim == 64


def _ckpt(settings: TrainerSettings) -> Checkpoint:
    from trainer.checkpoint import load_checkpoint

    ckpt = load_checkpoint(settings.checkpoint_dir)
    assert ckpt is not None
    return ckpt


# --------------------------------------------------------------------------- deltas
def test_deltas_by_default_hold_what_changed_buffers_included(tmp_path: Path) -> None:
    assert TrainerSettings().publish_kind == "delta"
    cfg = ModelConfig(**TINY, freeze_layers=1)  # the (one-layer) encoder frozen, as in production
    model = build_model(cfg)
    model.register_buffer("running_centre", torch.zeros(4))  # a buffer that training moves
    store = WeightStore(tmp_path)
    store.publish(model, version=1)
    base = cpu_state(model)
    perturb(model, 3)
    with torch.no_grad():
        model.running_centre.add_(1.0)
    delta = changed_tensors(model.state_dict(), base)
    assert "running_centre" in delta
    assert set(delta) >= set(model.trainable_state_dict())
    assert 2 * state_bytes(delta) < state_bytes(model.state_dict())  # frozen encoder layers left out
    store.publish(model, version=2, kind="delta", base_version=1, tensors=delta)
    rebuilt = build_model(cfg)
    rebuilt.register_buffer("running_centre", torch.zeros(4))
    store.load_into(rebuilt, 2)
    _assert_same(rebuilt, model)
