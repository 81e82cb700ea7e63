"""The data-parallel trainer on a real broker: ``torchrun --nproc-per-node 2 -m trainer`` (gloo, CPU)
on a 4-partition ``labeled`` topic publishes a version serving loads; SIGKILL of one rank stops the
group; the restarted group trains every example exactly once, each on the rank owning its partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from contract.records import ModelUpdate
from contract.settings import PROJECT_ROOT, KafkaSettings
from contract.topics import ITEMS, LABELED, MODEL_UPDATES
from serving.loader import ModelLoader
from serving.metrics import ServingMetrics
from serving.settings import FALLBACK_VERSION
from serving.snapshot import ModelHolder, fallback_snapshot
from serving.state import CatalogState
from tests.integration.test_trainer_service import (
    TINY,
    _end_offsets,
    _examples,
    _ids,
    _items,
    _wait_for,
)
from tests.kafka_utils import consume, java_partition, produce
from trainer.checkpoint import load_checkpoint
from trainer.weights import WeightStore

pytestmark = pytest.mark.integration

WORLD = 2
FEWER_VERSIONS = {"publish_every_steps": 25, "publish_every_s": 3.0}
"""Fewer versions than test_trainer_service's (each costs a store write): the test is about the group."""


def _torchrun(kafka: KafkaSettings, tmp_path: Path, log_name: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "STREAMREC_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAMREC_TOPIC_PREFIX": kafka.topic_prefix,
        "STREAMREC_TRAINER_WEIGHTS_ROOT": str(tmp_path / "weights"),
        "STREAMREC_TRAINER_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "STREAMREC_TRAINER_TRAINED_IDS_LOG": str(tmp_path / "ids.log"),
        "STREAMREC_TRAINER_FREEZE_LAYERS": "1",
        "STREAMREC_TRAINER_PUBLISH_KIND": "delta",
        "STREAMREC_TRAINER_FULL_EVERY": "4",
        "STREAMREC_TRAINER_DDP_TIMEOUT_S": "30",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    })  # fmt: skip
    for key, value in {**TINY, **FEWER_VERSIONS}.items():
        env[f"STREAMREC_TRAINER_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    out = open(tmp_path / log_name, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
         "-m", "trainer"],
        cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among torchrun's children (from their environment)."""
    for task in Path(f"/proc/{launcher.pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
                return int(pid)
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _rank_ids(tmp_path: Path) -> list[list[tuple[str, str]]]:
    return [_ids(tmp_path / f"ids.log.rank{r}") for r in range(WORLD)]


def test_two_ranks_publish_survive_a_killed_rank_and_train_each_example_once(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    items = _items()
    produce(kafka_settings, ITEMS, items)
    first = _examples(0, 240)
    produce(kafka_settings, LABELED, first)
    ckpt_dir = tmp_path / "ckpt"

    proc = _torchrun(kafka_settings, tmp_path, "group-1.log")
    middle = _examples(240, 200)
    try:
        updates = consume(kafka_settings, MODEL_UPDATES, count=1, timeout=150)
        assert updates, (tmp_path / "group-1.log").read_text()[-3000:]
        update = updates[0]
        assert isinstance(update, ModelUpdate) and update.version == 1 and update.kind == "full"
        assert update.metrics["trainer_ranks"] == WORLD
        assert set(update.source_offsets) == set(_end_offsets(kafka_settings))  # every rank's partitions

        # keep examples coming while one rank is killed: the work after the last checkpoint is lost
        feeder = threading.Thread(
            target=lambda: [produce(kafka_settings, LABELED, middle[k : k + 30]) or time.sleep(0.1)
                            for k in range(0, len(middle), 30)], daemon=True)  # fmt: skip
        feeder.start()
        time.sleep(1.0)
        victim = _wait_for("rank 1's pid", lambda: _rank_pid(proc, 1), timeout=10)
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        try:
            proc.wait(timeout=90)  # the group stops: no rank hangs in a collective
        except subprocess.TimeoutExpired:
            pytest.fail("the group did not stop after rank 1 was killed:\n"
                        + (tmp_path / "group-1.log").read_text()[-3000:])
        stopped_in = time.monotonic() - started
        feeder.join(timeout=60)
    finally:
        _stop(proc)
    log1 = (tmp_path / "group-1.log").read_text()
    assert proc.returncode != 0
    assert "another rank died or did not answer" in log1 or "SIGTERM" in log1, log1[-3000:]
    assert stopped_in < 60, stopped_in
    killed_at = load_checkpoint(ckpt_dir)
    assert killed_at is not None and killed_at.service_state["world_size"] == WORLD
    assert killed_at.examples_trained > 0

    produce(kafka_settings, LABELED, first[:10])  # redeliveries of already trained examples
    second = _examples(440, 80)
    produce(kafka_settings, LABELED, second)
    expected = Counter(e.example_id for e in first + middle + second)

    proc = _torchrun(kafka_settings, tmp_path, "group-2.log")
    try:
        # serving's loader takes it: verified, rebuilt, the catalog's item vectors computed
        catalog = CatalogState()
        for item in items:
            catalog.upsert(item)
        holder = ModelHolder(fallback_snapshot(FALLBACK_VERSION, []))
        loader = ModelLoader(holder=holder, catalog=catalog, store=WeightStore(tmp_path / "weights"),
                             metrics=ServingMetrics(), model_name="streamrec", encode_batch=8,
                             fallback_version=FALLBACK_VERSION)
        live = loader.load_initial(update)
        assert live.version == "1" and live.item_vecs is not None and len(live.item_ids) == len(items)
        assert torch.isfinite(live.item_vecs).all()

        _wait_for("every example trained or held back by the restarted group",
                  lambda: sum(len(ids) for ids in _rank_ids(tmp_path)) >= len(expected), timeout=180, proc=proc)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on: the ranks checkpoint together and exit
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the group did not stop on SIGTERM")
    finally:
        _stop(proc)
    log2 = (tmp_path / "group-2.log").read_text()
    for r in range(WORLD):
        assert f"rank {r} resumed from checkpoint" in log2, log2[-3000:]
        assert f"[rank {r}] trainer.service: trainer stopped" in log2, log2[-3000:]

    final = load_checkpoint(ckpt_dir)
    assert final is not None and final.offsets == _end_offsets(kafka_settings)
    per_rank = _rank_ids(tmp_path)
    seen = [i for ids in per_rank for _, i in ids]
    assert Counter(seen) == expected  # nothing lost, nothing trained twice, across the ranks
    assert final.examples_trained == sum(1 for ids in per_rank for kind, _ in ids if kind == "T")
    by_id = {e.example_id: e for e in first + middle + second}
    for r, ids in enumerate(per_rank):  # each example on the rank that owns its partition (p % 2)
        assert ids and all(java_partition(by_id[i].kafka_key(), 4) % WORLD == r for _, i in ids)

    # A version checkpointed before its announcement was acknowledged is announced again by the
    # restarted group (the same record: serving skips it); a number never names two versions.
    announced = consume(kafka_settings, MODEL_UPDATES, count=100, timeout=5)
    versions = {u.version for u in announced}  # type: ignore[union-attr]
    assert versions and len({(u.version, u.sha256) for u in announced}) == len(versions)  # type: ignore[union-attr]
    newest = WeightStore(tmp_path / "weights").load(max(versions))
    assert newest.config.categories == ["comedy", "drama", "scifi"]
