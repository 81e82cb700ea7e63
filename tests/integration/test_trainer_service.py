"""The trainer service on a real broker: labeled examples in, loadable versions out, exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from contract.records import DeadLetter, Item, Labeled, ModelUpdate
from contract.settings import PROJECT_ROOT, KafkaSettings
from contract.topics import DEAD_LETTERS, ITEMS, LABELED, MODEL_UPDATES
from tests.kafka_utils import consume, produce, produce_raw
from trainer.checkpoint import load_checkpoint
from trainer.dedupe import dedupe_key
from trainer.service import TrainerService, offsets_key
from trainer.service_settings import TrainerSettings
from trainer.weights import WeightStore

pytestmark = pytest.mark.integration

CATEGORIES = ["comedy", "drama", "scifi"]
N_ITEMS = 18
T = TypeVar("T")

# Tiny model and short intervals: the whole service, quickly.
TINY: dict[str, Any] = {
    "encoder_layers": 1,
    "max_text_len": 16,
    "model_options": {"embed_dim": 32},
    "device": "cpu",
    "batch_size": 16,
    "max_batch_wait_s": 0.3,
    "publish_every_steps": 10,
    "publish_every_s": 2.0,
    "checkpoint_every_steps": 4,
    "holdout_fraction": 0.1,
    "guardrail_min_examples": 4,
    "guardrail_margin": 0.5,
    "guardrail_fallback_z": 0.0,  # a handful of held-back examples: beating the fallback at all suffices
    "missing_item_wait_s": 1.0,
    "metrics_port": 0,
    "log_every_s": 2.0,
    "learner_options": {"replay_size": 200},
}


def _items() -> list[Item]:
    return [
        Item(item_id=f"i{n}", text=f"a {CATEGORIES[n % 3]} film, number {n}", categories=[CATEGORIES[n % 3]], ts=1)
        for n in range(N_ITEMS)
    ]


def _examples(start: int, n: int, seed: int = 0) -> list[Labeled]:
    """Users like one category each: clicks follow it (a signal the model can learn)."""
    rng = random.Random(seed * 100_003 + start)
    out = []
    for k in range(start, start + n):
        user = k % 24
        item = rng.randrange(N_ITEMS)
        liked = item % 3 == user % 3
        imp = f"imp{k}"
        out.append(Labeled(
            example_id=f"{imp}:i{item}", impression_id=imp, user_id=f"u{user}", item_id=f"i{item}",
            position=k % 5, label=int(rng.random() < (0.7 if liked else 0.1)),
            history=[f"i{(user % 3) + 3 * j}" for j in range(3)],
            impression_ts=1_000 + k, label_ts=2_000 + k, ts=2_000 + k,
        ))  # fmt: skip
    return out


def _wait_for(what: str, cond: Callable[[], T], timeout: float, proc: subprocess.Popen | None = None) -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the trainer exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _end_offsets(kafka: KafkaSettings) -> dict[str, int]:
    topic = LABELED.real_name(kafka)
    consumer = Consumer(kafka.confluent_config(**{"group.id": "offsets-probe"}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            offsets_key(topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
    finally:
        consumer.close()


def _ids(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines()]  # type: ignore[misc]


def _scores(model: Any, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        items = model.encode_items(texts)
        hist = items[torch.tensor([[0, 3], [1, 4]])]
        users = model.encode_users(hist, torch.ones(2, 2, dtype=torch.bool), ["u0", "u1"])
        return model.score_matrix(users, items)


def test_labeled_examples_become_a_loadable_version(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    items = _items()
    examples = _examples(0, 150)
    produce(kafka_settings, ITEMS, items)
    produce(kafka_settings, LABELED, examples)
    produce(kafka_settings, LABELED, examples[:6])  # redelivered: must not be trained twice
    ghost = _examples(150, 1)[0].model_copy(update={"item_id": "ghost", "example_id": "imp150:ghost"})
    produce(kafka_settings, LABELED, [ghost])  # its item never arrives
    produce_raw(kafka_settings, LABELED.real_name(kafka_settings), [
        (b"u1", b"{not json"),
        (b"u2", b'{"schema_version": 1, "user_id": "u2", "ts": 5}'),
    ])  # fmt: skip

    with socket.socket() as sock:  # a free port for the metrics endpoint
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = TrainerSettings(
        weights_root=str(tmp_path / "weights"), checkpoint_dir=tmp_path / "ckpt",
        trained_ids_log=tmp_path / "ids.log", **{**TINY, "metrics_port": port},
    )  # fmt: skip
    service = TrainerService(settings, kafka_settings)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    thread = threading.Thread(target=run, name="trainer", daemon=True)
    thread.start()
    try:
        update = consume(kafka_settings, MODEL_UPDATES, count=1, timeout=120)
        assert update and not errors, errors
        first = update[0]
        assert isinstance(first, ModelUpdate)
        assert (first.model, first.version, first.kind) == ("streamrec", 1, "full")
        assert first.trained_examples > 0
        # it beat the popularity fallback on the held-back examples (both AUCs are in the manifest)
        assert first.metrics["holdout_auc"] > first.metrics["holdout_fallback_auc"]
        assert set(first.source_offsets) <= set(_end_offsets(kafka_settings))

        model = WeightStore(settings.weights_root).load(first)
        assert model.config.categories == CATEGORIES  # the category vocabulary came from the catalog
        scores = _scores(model, [it.text for it in items])
        assert scores.shape == (2, N_ITEMS) and torch.isfinite(scores).all()

        ends = _end_offsets(kafka_settings)
        _wait_for("every labeled record to be consumed",
                  lambda: service.progress()["offsets"] == ends or errors, timeout=120)
        dead = consume(kafka_settings, DEAD_LETTERS, count=3, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            exposition = resp.read().decode()
    finally:
        service.stop()
        thread.join(timeout=60)
    assert not errors, errors
    assert not thread.is_alive()

    assert all(isinstance(d, DeadLetter) and d.source_topic == LABELED.real_name(kafka_settings) for d in dead)
    reasons = sorted(d.error for d in dead)  # type: ignore[union-attr]
    assert any("not valid JSON" in r for r in reasons), reasons
    assert any("Labeled.example_id: Field required" in r for r in reasons), reasons
    assert any("item ghost not in the catalog" in r for r in reasons), reasons
    assert {d.raw() for d in dead} >= {b"{not json"}  # type: ignore[union-attr]

    # Every valid example exactly once (trained, or held back for the guardrail); none twice.
    seen = _ids(tmp_path / "ids.log")
    assert Counter(i for _, i in seen) == Counter(e.example_id for e in examples)
    held = [i for kind, i in seen if kind == "H"]
    assert 0 < len(held) < 40
    progress = service.progress()
    assert progress["duplicates"] == 6 and progress["dead"] == 3
    sample = service.metrics.registry.get_sample_value
    assert sample("streamrec_trainer_duplicates_dropped_total") == 6
    assert sample("streamrec_trainer_dead_letters_total", {"topic": LABELED.real_name(kafka_settings)}) == 3
    assert sample("streamrec_trainer_examples_trained_total") == len(seen) - len(held)
    assert sample("streamrec_trainer_versions_published_total", {"kind": "full"}) >= 1
    assert "streamrec_trainer_steps_total" in exposition and "streamrec_trainer_last_step_loss" in exposition
    assert 'streamrec_trainer_guardrail_rejections_total{reason="below_fallback"}' in exposition
    assert sample("streamrec_trainer_published_bytes_total", {"kind": "full"}) > 0

    ckpt = load_checkpoint(settings.checkpoint_dir)  # written at shutdown
    assert ckpt is not None
    assert ckpt.offsets == ends
    assert ckpt.examples_trained == len(seen) - len(held)
    assert set(ckpt.recent_example_ids) >= {dedupe_key(e) for e in examples}

    # the group's committed offsets follow the checkpoint (for lag monitoring)
    topic = LABELED.real_name(kafka_settings)
    probe = Consumer(kafka_settings.confluent_config(**{"group.id": settings.group_id}))
    try:
        committed = probe.committed([TopicPartition(topic, int(k.rsplit(":", 1)[1])) for k in ends], timeout=10)
    finally:
        probe.close()
    assert {offsets_key(topic, tp.partition): tp.offset for tp in committed} == ends


def _start_trainer(kafka: KafkaSettings, tmp_path: Path, log_name: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "STREAMREC_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAMREC_TOPIC_PREFIX": kafka.topic_prefix,
        "STREAMREC_TRAINER_WEIGHTS_ROOT": str(tmp_path / "weights"),
        "STREAMREC_TRAINER_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "STREAMREC_TRAINER_TRAINED_IDS_LOG": str(tmp_path / "ids.log"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })  # fmt: skip
    for key, value in TINY.items():
        env[f"STREAMREC_TRAINER_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    # Frozen encoder (prefix cache) and delta versions: fast steps, small publishes.
    env["STREAMREC_TRAINER_FREEZE_LAYERS"] = "1"
    env["STREAMREC_TRAINER_PUBLISH_KIND"] = "delta"
    env["STREAMREC_TRAINER_FULL_EVERY"] = "4"
    out = open(tmp_path / log_name, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "trainer"], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
    )


def test_killed_trainer_resumes_without_losing_or_repeating(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    produce(kafka_settings, ITEMS, _items())
    first = _examples(0, 300)
    produce(kafka_settings, LABELED, first)
    ckpt_dir, ids_log = tmp_path / "ckpt", tmp_path / "ids.log"

    proc = _start_trainer(kafka_settings, tmp_path, "trainer-1.log")
    try:
        # Kill it once a checkpoint covers some examples but not all of them.
        before = _wait_for(
            "a checkpoint mid-stream",
            lambda: (c := load_checkpoint(ckpt_dir)) is not None and c.examples_trained > 0 and c,
            timeout=120, proc=proc,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = load_checkpoint(ckpt_dir)
    assert killed_at is not None and killed_at.examples_trained >= before.examples_trained
    assert sum(killed_at.offsets.values()) < len(first), "the first trainer finished before the kill"

    produce(kafka_settings, LABELED, first[:10])  # redeliveries of already trained examples
    second = _examples(300, 150)
    produce(kafka_settings, LABELED, second)  # last in every partition: once trained, all is consumed
    expected = Counter(e.example_id for e in first + second)

    proc = _start_trainer(kafka_settings, tmp_path, "trainer-2.log")
    try:
        _wait_for("every example trained or held back",
                  lambda: len(_ids(ids_log)) >= len(expected), timeout=180, proc=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # checkpoint, then exit 0
        code = proc.wait(timeout=60)
    log2 = (tmp_path / "trainer-2.log").read_text()
    assert code == 0, log2[-3000:]
    assert "resumed from checkpoint" in log2 and "received SIGTERM" in log2

    final = load_checkpoint(ckpt_dir)
    assert final is not None
    assert final.offsets == _end_offsets(kafka_settings)
    seen = _ids(ids_log)
    assert Counter(i for _, i in seen) == expected  # nothing lost, nothing repeated
    assert final.examples_trained == sum(1 for kind, _ in seen if kind == "T")

    updates = consume(kafka_settings, MODEL_UPDATES, count=100, timeout=5)
    versions = [u.version for u in updates]  # type: ignore[union-attr]
    assert versions and len(set(versions)) == len(versions)  # never a version number twice
    assert {u.kind for u in updates} == {"full", "delta"}  # type: ignore[union-attr]
    newest = max(updates, key=lambda u: u.version)  # type: ignore[union-attr]
    model = WeightStore(tmp_path / "weights").load(newest)  # type: ignore[arg-type]
    assert torch.isfinite(_scores(model, [it.text for it in _items()])).all()
