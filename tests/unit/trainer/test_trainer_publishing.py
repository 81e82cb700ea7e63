"""The trainer's publishing rules without Kafka: the guardrail against the popularity fallback,
starting from another deployment's version (INIT_FROM), and delta versions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.errors import ConfigError
from contract.records import Labeled, ModelUpdate
from contract.settings import KafkaSettings, load
from infra.kafka import KafkaProducer
from tests.model_utils import perturb
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.checkpointer import Checkpointer
from trainer.configure import check_settings, learner_config_from, model_config_from
from trainer.dedupe import dedupe_key
from trainer.guardrail import Refusal, beats_fallback
from trainer.holdout import Holdout
from trainer.metrics import auc, paired_auc
from trainer.model import ModelConfig, RecModel, build_model
from trainer.popularity import Popularity
from trainer.publisher import Publisher
from trainer.service import TrainerService
from trainer.service_metrics import TrainerMetrics
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
    with caplog.at_level("INFO", logger="trainer.configure"):
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
    with caplog.at_level("INFO", logger="trainer.configure"):
        service._build_learner(_ckpt(settings))
    assert "wins over STREAMREC_TRAINER_INIT_FROM" in caplog.text
    assert service.model.config.embed_dim == 64


def test_the_posteriors_gauges_follow_the_step() -> None:
    metrics = TrainerMetrics()
    metrics.stepped(8, 0.1, {"loss": 0.5, "posterior_users": 3.0, "posterior_changes": 0.25, "item_bias_prior_std": 0.3}, {})
    sample = metrics.registry.get_sample_value
    assert sample("streamrec_trainer_posterior_users") == 3.0
    assert sample("streamrec_trainer_posterior_changes") == 0.25
    assert sample("streamrec_trainer_item_bias_prior_std") == 0.3


def test_torch_threads_sets_the_trainers_cpu_threads(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        TrainerService(_settings(tmp_path, torch_threads=1), KafkaSettings(), metrics=TrainerMetrics())._build_learner(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _ckpt(settings: TrainerSettings) -> Checkpoint:
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


# --------------------------------------------------------------------------- settings -> configs
def test_individual_model_and_learner_variables_override_the_json_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_TRAINER_MODEL_OPTIONS", '{"embed_dim": 32, "max_history": 5}')
    monkeypatch.setenv("STREAMREC_TRAINER_EMBED_DIM", "48")
    monkeypatch.setenv("STREAMREC_TRAINER_HISTORY_LENGTH", "7")
    monkeypatch.setenv("STREAMREC_TRAINER_LEARNER_OPTIONS", '{"lr_ids": 0.5, "lr_heads": 0.003}')
    monkeypatch.setenv("STREAMREC_TRAINER_LR_IDS", "0.15")
    monkeypatch.setenv("STREAMREC_TRAINER_UPDATES_PER_BATCH", "3")
    monkeypatch.setenv("STREAMREC_TRAINER_REPLAY_SIZE", "0")
    monkeypatch.setenv("STREAMREC_TRAINER_DISTILL_WEIGHT", "0.25")
    monkeypatch.setenv("STREAMREC_TRAINER_LR_TOWERS", "0.001")
    monkeypatch.setenv("STREAMREC_TRAINER_FREEZE_LAYERS", "1")
    s = load(TrainerSettings, weights_root=str(tmp_path), device="cpu")
    model = model_config_from(s, s.model_overrides())
    assert (model.embed_dim, model.max_history, model.freeze_layers) == (48, 7, 1)
    learner = learner_config_from(s)
    assert (learner.lr_ids, learner.lr_heads, learner.updates_per_batch) == (0.15, 0.003, 3)
    assert (learner.replay_size, learner.distill_weight, learner.lr_towers) == (0, 0.25, 0.001)
    assert learner.dedup_window == 0  # the feed dedupes, not the learner


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"STREAMREC_TRAINER_EMBED_DIM": "2"}, "STREAMREC_TRAINER_EMBED_DIM"),
        ({"STREAMREC_TRAINER_MODEL_OPTIONS": '{"embed_dim": 2}'}, "STREAMREC_TRAINER_MODEL_OPTIONS"),
        ({"STREAMREC_TRAINER_HISTORY_LENGTH": "-1"}, "STREAMREC_TRAINER_HISTORY_LENGTH"),
        ({"STREAMREC_TRAINER_LR_IDS": "-1"}, "STREAMREC_TRAINER_LR_IDS"),
        ({"STREAMREC_TRAINER_UPDATES_PER_BATCH": "0"}, "STREAMREC_TRAINER_UPDATES_PER_BATCH"),
        ({"STREAMREC_TRAINER_REPLAY_SIZE": "lots"}, "STREAMREC_TRAINER_REPLAY_SIZE"),
        ({"STREAMREC_TRAINER_LEARNER_OPTIONS": '{"lr_ids": -1}'}, "STREAMREC_TRAINER_LEARNER_OPTIONS"),
        ({"STREAMREC_TRAINER_LEARNER_OPTIONS": '{"dedup_window": 10}'}, "STREAMREC_TRAINER_LEARNER_OPTIONS"),
        ({"STREAMREC_TRAINER_LEARNER_OPTIONS": '{"nope": 1}'}, "STREAMREC_TRAINER_LEARNER_OPTIONS"),
    ],
)
def test_an_invalid_model_or_learner_value_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], setting: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        s = load(TrainerSettings, weights_root=str(tmp_path), device="cpu")
        check_settings(s)
    assert info.value.setting == setting


def test_the_idle_checkpoint_has_its_own_interval(tmp_path: Path) -> None:
    s = _settings(tmp_path, publish_every_s=1000.0, checkpoint_every_s=2.0, checkpoint_every_steps=3)
    cp = Checkpointer(s)
    t0 = cp.last
    assert cp.due(t0 + 1.0, {0: 5}, idle=True) is None
    assert cp.due(t0 + 2.0, {0: 5}, idle=False) is None  # something queued: the next step will cover it
    assert cp.due(t0 + 2.0, {0: 5}, idle=True) == "idle"  # not publish_every_s
    assert cp.due(t0 + 2.0, {}, idle=True) is None  # the offsets did not move
    cp.stepped()  # a step whose version the guardrail refused: no publish wrote a checkpoint
    assert cp.due(t0 + 2.0, {0: 9}, idle=True) == "idle"  # so idle time still saves its progress
    for _ in range(2):
        cp.stepped()
    assert cp.due(t0, {}, idle=False) == "3 steps"


# --------------------------------------------------------------------------- announcing
class _FlakyProducer:
    """A confluent-kafka producer stand-in whose flush leaves records undelivered while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.sent: list[tuple[str, bytes]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **_kw: object) -> None:
        self.sent.append((topic, key or b""))

    def poll(self, timeout: float = 0.0) -> int:
        return 0

    def flush(self, timeout: float = 0.0) -> int:
        return 1 if self.down else 0


def test_a_failed_announcement_is_counted_and_sent_again_at_the_next_attempt(tmp_path: Path) -> None:
    settings = _settings(tmp_path, publish_kind="full", keep_versions=0)
    store = WeightStore(settings.weights_root)
    metrics = TrainerMetrics()
    flaky = _FlakyProducer()
    publisher = Publisher(settings, store, KafkaProducer(flaky), "model-updates", metrics)
    publisher.restore(None)
    model = build_model(ModelConfig(**TINY))
    update = publisher.publish(model, metrics={}, trained_examples=1, source_offsets={})
    assert update is not None and update.version == 1 and store.versions() == [1]  # in the store anyway
    sample = metrics.registry.get_sample_value
    assert sample("streamrec_trainer_announce_failures_total") == 1
    assert sample("streamrec_trainer_unannounced_version") == 1
    assert publisher.pending == update and metrics.counts["announce_failures"] == 1
    publisher.retry_pending()  # still down: counted again, still pending
    assert sample("streamrec_trainer_announce_failures_total") == 2 and publisher.pending == update
    flaky.down = False
    publisher.retry_pending()
    assert publisher.pending is None and sample("streamrec_trainer_unannounced_version") == 0
    assert [t for t, _ in flaky.sent] == ["model-updates"] * 3


def test_a_store_failure_is_counted_by_a_stable_reason(tmp_path: Path) -> None:
    settings = _settings(tmp_path, publish_kind="full")
    store = WeightStore(settings.weights_root)
    metrics = TrainerMetrics()
    publisher = Publisher(settings, store, KafkaProducer(_FlakyProducer()), "model-updates", metrics)
    model = build_model(ModelConfig(**TINY))
    store.publish(model, version=1)
    store.publish(model, version=2)
    publisher.next_version = 1  # another writer took 1 and 2: the next free number is used
    update = publisher.publish(model, metrics={}, trained_examples=0, source_offsets={})
    assert update is not None and update.version == 3
    (Path(store.path) / "v000004").write_text("a file where the version directory goes")
    assert publisher.publish(model, metrics={}, trained_examples=0, source_offsets={}) is None
    sample = metrics.registry.get_sample_value
    failures = {r: sample("streamrec_trainer_publish_failures_total", {"reason": r})
                for r in ("exists", "io", "invalid")}
    assert sum(failures.values()) == 1, failures


# --------------------------------------------------------------------------- the guardrail's live cache
class _ConstLearner:
    """A learner stand-in for the guardrail: the live version is right, the candidate wrong (so every
    candidate is refused), and each call is recorded."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, examples: list[Labeled], model: object = None) -> tuple[list[float], list[int]]:
        self.calls.append(len(examples))
        live = model is not None
        return [0.9 if ex.label == live else 0.1 for ex in examples], list(range(len(examples)))


def _labeled(k: int) -> Labeled:
    return Labeled(example_id=f"imp{k}:i{k % 3}", impression_id=f"imp{k}", user_id="u1", item_id=f"i{k % 3}",
                   position=0, label=k % 2 == 0, history=[], impression_ts=k, label_ts=k, ts=k)  # fmt: skip


def test_the_live_versions_prediction_cache_is_bounded_by_the_held_back_window(tmp_path: Path) -> None:
    """Issue 12.9d: while candidates are refused, the cached live predictions must not grow forever."""
    settings = _settings(tmp_path, holdout_fraction=0.5, holdout_size=20, guardrail_min_examples=10)
    holdout = Holdout(settings)
    holdout.live_model, holdout.live_version = object(), 1  # type: ignore[assignment]
    learner = _ConstLearner()
    for batch in range(30):
        holdout.examples.extend(_labeled(batch * 10 + i) for i in range(10))  # as split() keeps them
        verdict = holdout.judge(learner)  # type: ignore[arg-type]
        assert not verdict.ok  # worse than the live version: refused
        assert len(holdout._live_probs) <= settings.holdout_size
    assert set(holdout._live_probs) == {dedupe_key(ex) for ex in holdout.examples}
    assert learner.calls[-1] == 10  # still scores only the examples new since the last attempt


# --------------------------------------------------------------------------- publish / checkpoint order
class _WatchedProducer:
    """A confluent-kafka producer stand-in that runs ``watch(topic, value)`` at each produce and at each
    flush (``watch(None, None)``); its flush leaves ``undelivered`` records behind (0: all acknowledged)."""

    def __init__(self, watch: object) -> None:
        self.watch, self.undelivered = watch, 0
        self.sent: list[tuple[str, bytes]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **_kw: object) -> None:
        self.watch(topic, value)  # type: ignore[operator]
        self.sent.append((topic, value or b""))

    def poll(self, timeout: float = 0.0) -> int:
        return 0

    def flush(self, timeout: float = 0.0) -> int:
        self.watch(None, None)  # type: ignore[operator]
        return self.undelivered


def _service(settings: TrainerSettings, producer: _WatchedProducer, ckpt: Checkpoint | None = None) -> TrainerService:
    service = TrainerService(settings, KafkaSettings(), metrics=TrainerMetrics())
    service._build_learner(ckpt)
    service.publisher = Publisher(settings, service.store, KafkaProducer(producer), "model-updates", service.metrics)
    service._resume(ckpt)
    return service


def test_a_version_is_announced_only_after_a_checkpoint_it_belongs_to(tmp_path: Path) -> None:
    """Issue 12.9a: announce-then-crash must not fork the lineage; the checkpoint comes first."""
    settings = _settings(tmp_path, publish_kind="full", keep_versions=0, holdout_fraction=0.0)
    seen: list[tuple[int, object, object]] = []

    def watch(topic: str | None, value: bytes | None) -> None:
        if topic == "model-updates":
            ckpt = load_checkpoint(settings.checkpoint_dir)
            st = ckpt.service_state if ckpt is not None else {}
            pending = st.get("pending_announcement")
            seen.append((ModelUpdate.from_json(value).version, st.get("live_version"),
                         ModelUpdate.from_json(pending).version if pending else None))  # fmt: skip

    producer = _WatchedProducer(watch)
    service = _service(settings, producer)
    producer.undelivered = 1  # the broker does not acknowledge: then the trainer is SIGKILLed
    service._steps_since_attempt = 1
    service._publish(time.monotonic())
    assert seen == [(1, 1, 1)]  # when announced, a checkpoint with version 1 live (and pending) existed
    assert service.publisher is not None and service.publisher.pending is not None

    # The restart resumes the lineage of version 1 and announces it first (as _start does).
    producer2 = _WatchedProducer(watch)
    restarted = _service(settings, producer2, load_checkpoint(settings.checkpoint_dir))
    assert restarted.holdout.live_version == 1 and restarted.publisher is not None
    assert restarted.publisher.next_version == 2
    restarted.publisher.retry_pending()
    assert [ModelUpdate.from_json(v).version for t, v in producer2.sent] == [1]
    assert restarted.publisher.pending is None and restarted.publisher.state()["pending_announcement"] is None


def test_dead_letters_are_flushed_before_a_checkpoint_moves_past_their_offsets(tmp_path: Path) -> None:
    """Issue 12.9c: the flush happens before the checkpoint is written; a failed one is counted."""
    settings = _settings(tmp_path, publish_kind="full", keep_versions=0)
    events: list[str] = []

    def watch(topic: str | None, _value: bytes | None) -> None:
        written = load_checkpoint(settings.checkpoint_dir) is not None
        events.append(f"{'flush' if topic is None else 'send'} (checkpoint {'written' if written else 'absent'})")

    service = _service(settings, _WatchedProducer(lambda *_: None))
    dead = _WatchedProducer(watch)
    service.source.dead_letters = KafkaProducer(dead)
    service.feed.offsets[0] = 8
    service.source.dead_letter_example(0, 7, _labeled(7), "item never came")
    dead.undelivered = 1  # not acknowledged within the flush
    service._checkpoint(reason="test")
    assert events == ["send (checkpoint absent)", "flush (checkpoint absent)"]
    ckpt = load_checkpoint(settings.checkpoint_dir)
    assert ckpt is not None and ckpt.offsets == {f"{service.labeled_topic}:0": 8}
    # still queued, not failed: librdkafka keeps retrying it; a failure would be counted at a later barrier
    assert service.metrics.registry.get_sample_value("streamrec_trainer_dead_letter_failures_total") == 0
    assert [t for t, _ in dead.sent] == [service.source.dead_topic]


def test_a_version_whose_checkpoint_failed_is_never_announced(tmp_path: Path) -> None:
    """No checkpoint descends from it: announcing it (even from the close's retry) would fork the lineage."""
    settings = _settings(tmp_path, publish_kind="full", keep_versions=0, holdout_fraction=0.0)
    producer = _WatchedProducer(lambda topic, value: None)
    service = _service(settings, producer)
    service._steps_since_attempt = 1

    def broken(*, reason: str) -> None:
        raise OSError("disk full")

    service._checkpoint = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        service._publish(time.monotonic())
    assert service.publisher is not None and service.publisher.pending is None
    service.publisher.retry_pending()  # what _close does
    assert not [v for t, v in producer.sent if t == "model-updates"]


def test_a_stop_asked_during_an_iteration_publishes_nothing_more(tmp_path: Path) -> None:
    settings = _settings(tmp_path, publish_kind="full", keep_versions=0, holdout_fraction=0.0)
    producer = _WatchedProducer(lambda topic, value: None)
    service = _service(settings, producer)
    service.source.fetch = lambda timeout, catalog: []  # type: ignore[method-assign]
    service._steps_since_attempt = settings.publish_every_steps  # a publish is due
    service.stop()  # SIGTERM arrives while the pass fetches
    service._iterate()
    assert not [v for t, v in producer.sent if t == "model-updates"]
    assert service.publisher is not None and service.publisher.next_version == 1


def test_a_restart_removes_versions_no_checkpoint_descends_from(tmp_path: Path) -> None:
    """Found by the chaos run: a trainer SIGKILLed between writing version N and its checkpoint left
    N in the store, and an agent starting up served it from there (a version never announced, off
    the lineage).  The restart removes it and numbers past it."""
    settings = _settings(tmp_path, publish_kind="full", keep_versions=0, holdout_fraction=0.0)
    producer = _WatchedProducer(lambda topic, value: None)
    service = _service(settings, producer)
    service._steps_since_attempt = 1
    service._publish(time.monotonic())  # version 1, checkpointed and announced
    assert service.publisher is not None
    orphan = service.publisher.publish(service.model, metrics={}, trained_examples=0,
                                       source_offsets={}, announce=False)  # then a SIGKILL
    assert orphan is not None and service.store.versions() == [1, 2]
    restarted = _service(settings, _WatchedProducer(lambda topic, value: None), load_checkpoint(settings.checkpoint_dir))
    assert restarted.store.versions() == [1]
    assert restarted.publisher is not None and restarted.publisher.next_version == 3
    assert restarted.metrics.counts["orphan_versions_removed"] == 1
