"""Freshness: seconds from a labeled example being produced to the first version trained on it.

    python benchmarks/freshness.py [--local] [--rate 20] [--duration 60] [--set batch_size=64 ...]

Runs the real trainer (``python -m trainer`` as a subprocess, its settings
from the environment and ``--set``, defaults otherwise) against the broker at
``$STREAMREC_BOOTSTRAP_SERVERS`` or, with ``--local``, a local jar broker it
starts and removes.  The catalog is MovieLens-100k (1,682 movies: title and
genres); labeled examples are produced at a steady ``--rate`` for
``--duration`` seconds after a warm-up, by simulated users who click their
favourite genres more often.

An example counts as *fresh* in a version when that version's
``source_offsets`` (the next offset per partition it trained up to) passes
the example's offset; its freshness is the time the version's announcement
reached a ``model-updates`` consumer minus the time the example was
produced.  Examples the trainer holds back for its guardrail (never trained)
are left out.  Warm-up examples (model load, first steps) are left out too.
The last line printed is JSON::

    {"examples": ..., "versions": ..., "p50_s": ..., "p99_s": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition

from contract.records import Item, Labeled, ModelUpdate
from contract.settings import KafkaSettings, load
from contract.topics import ALL_TOPICS, ITEMS, LABELED, MODEL_UPDATES
from infra.admin import delete_topics, ensure_topics
from infra.broker import LocalBroker
from infra.kafka import KafkaProducer
from infra.processes import Service, service_env
from trainer.service import held_back
from trainer.service_settings import TrainerSettings

log = logging.getLogger("freshness")


def movielens_items() -> list[Item]:
    from streams.replay.movielens import load as load_movielens

    data = load_movielens()
    return [m.to_item(ts=1) for m in data.movies]


class ExampleMaker:
    """Users with two favourite genres click them far more often (0.6 vs 0.05); history kept.

    Each user starts with a few favourite-genre items in their history, as if
    they had clicked them before, so the user tower has something to read.
    """

    def __init__(self, items: list[Item], *, users: int = 100, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.items = items
        genres = sorted({c for it in items for c in it.categories}) or ["any"]
        self.favourite: dict[str, set[str]] = {}
        self.history: dict[str, list[str]] = {}
        for u in range(users):
            fav = set(self.rng.sample(genres, k=min(2, len(genres))))
            liked = [it.item_id for it in items if fav & set(it.categories)] or [items[0].item_id]
            self.favourite[f"u{u}"] = fav
            self.history[f"u{u}"] = self.rng.sample(liked, k=min(5, len(liked)))
        self.n = 0

    def next(self) -> Labeled:
        self.n += 1
        user = f"u{self.rng.randrange(len(self.favourite))}"
        item = self.rng.choice(self.items)
        liked = bool(self.favourite[user] & set(item.categories))
        label = int(self.rng.random() < (0.6 if liked else 0.05))
        now = int(time.time() * 1000)
        imp = f"bench-{self.n}"
        ex = Labeled(
            example_id=f"{imp}:{item.item_id}", impression_id=imp, user_id=user, item_id=item.item_id,
            position=self.rng.randrange(10), label=label, history=self.history[user][-20:],
            impression_ts=now, label_ts=now, ts=now,
        )  # fmt: skip
        if label:
            self.history[user].append(item.item_id)
        return ex


def _trainer_env(kafka: KafkaSettings, workdir: Path, overrides: dict[str, str]) -> dict[str, str]:
    settings = {"weights_root": workdir / "weights", "checkpoint_dir": workdir / "ckpt", "metrics_port": 0}
    return service_env(kafka, "trainer", **{**settings, **overrides})


def _effective_settings(env: dict[str, str]) -> TrainerSettings:
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return load(TrainerSettings)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(kafka: KafkaSettings, *, rate: float, duration: float, warmup: float, overrides: dict[str, str],
        settle_timeout: float) -> dict[str, Any]:
    ensure_topics(kafka, ALL_TOPICS)
    items = movielens_items()
    maker = ExampleMaker(items)
    producer = KafkaProducer.create(kafka, "bench-freshness", **{"linger.ms": 5})
    for it in items:
        producer.send(ITEMS.real_name(kafka), it.to_json(), it.kafka_key())
    if not (catalog := producer.barrier(60)).ok:
        raise RuntimeError(f"could not produce the catalog: {catalog.describe()}")

    updates = Consumer(kafka.confluent_config(**{"group.id": f"fresh-{uuid.uuid4().hex[:8]}",
                                                "enable.auto.commit": False}))  # fmt: skip
    updates_topic = MODEL_UPDATES.real_name(kafka)
    updates.assign([TopicPartition(updates_topic, p, OFFSET_END)
                    for p in updates.list_topics(updates_topic, timeout=10).topics[updates_topic].partitions])

    workdir = Path(tempfile.mkdtemp(prefix="streamrec-freshness-"))
    env = _trainer_env(kafka, workdir, overrides)
    settings = _effective_settings(env)
    trainer = Service.of("trainer", env)
    trainer.start(workdir)
    trainer_log = workdir / "trainer.log"
    proc = trainer.proc
    assert proc is not None
    print(f"trainer pid {proc.pid}, log {trainer_log}")

    produced: dict[tuple[int, int], tuple[float, str, bool]] = {}  # (partition, offset) -> (t, id, warm-up)
    pending: dict[str, tuple[float, str, bool]] = {}
    lock = threading.Lock()
    errors: list[str] = []
    stop = threading.Event()
    labeled = LABELED.real_name(kafka)

    def produce_loop() -> None:
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if elapsed >= warmup + duration:
                break
            due = int(elapsed * rate) + 1
            while n < due:
                ex = maker.next()
                info = (time.time(), ex.example_id, elapsed < warmup)
                with lock:
                    pending[ex.example_id] = info
                failure = producer.send(labeled, ex.to_json(), ex.kafka_key(),
                                        on_delivery=lambda err, msg, k=ex.example_id: _deliver(err, msg, k))
                if failure is not None:
                    errors.append(str(failure))
                n += 1
            producer.poll(0)
            stop.wait(max(0.0, (n / rate) - (time.monotonic() - start)))
        producer.barrier(60)

    def _deliver(err: KafkaError | None, msg: Any, key: str) -> None:
        if err is not None:
            errors.append(str(err))
            return
        with lock:
            info = pending.pop(key, None)
            if info is not None:
                produced[(msg.partition(), msg.offset())] = info

    versions: list[dict[str, Any]] = []
    fresh: dict[tuple[int, int], float] = {}
    producer_thread = threading.Thread(target=produce_loop, name="producer", daemon=True)
    started = time.time()
    producer_thread.start()
    try:
        deadline = time.monotonic() + warmup + duration + settle_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the trainer exited with {proc.returncode}; see {trainer_log}")
            for msg in updates.consume(num_messages=100, timeout=0.5):
                if msg.error() is not None:
                    continue
                t_recv = time.time()
                upd = ModelUpdate.from_json(msg.value())
                offsets = {int(k.rsplit(":", 1)[1]): v for k, v in upd.source_offsets.items()}
                with lock:
                    newly = [po for po in produced if po not in fresh and po[1] < offsets.get(po[0], -1)]
                    for po in newly:
                        fresh[po] = t_recv - produced[po][0]
                versions.append({"version": upd.version, "kind": upd.kind, "t": round(t_recv - started, 2),
                                 "new_examples": len(newly), "trained_examples": upd.trained_examples})
                print(f"  v{upd.version} ({upd.kind}) at +{t_recv - started:6.1f}s: {len(newly):4d} new examples, "
                      f"{upd.trained_examples} trained in all")
            if not producer_thread.is_alive():
                with lock:
                    if produced and all(po in fresh for po in produced):
                        break
    finally:
        stop.set()
        producer_thread.join(timeout=60)
        trainer.stop(120)
        updates.close()
        for sub in ("weights", "ckpt"):  # hundreds of MB; the log stays for reading
            shutil.rmtree(workdir / sub, ignore_errors=True)

    measured = [
        fresh[po] for po, (_t, ex_id, warm) in produced.items()
        if not warm and po in fresh and not held_back(ex_id, settings.holdout_fraction, settings.seed)
    ]
    total = sum(1 for (_t, _i, warm) in produced.values() if not warm)
    lat = np.array(measured) if measured else np.array([np.nan])
    return {
        "rate": rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "examples": total,
        "measured": len(measured),
        "never_published": sum(1 for po, v in produced.items() if not v[2] and po not in fresh),
        "versions": len(versions),
        "p50_s": round(float(np.percentile(lat, 50)), 2),
        "p90_s": round(float(np.percentile(lat, 90)), 2),
        "p99_s": round(float(np.percentile(lat, 99)), 2),
        "max_s": round(float(lat.max()), 2),
        "mean_s": round(float(lat.mean()), 2),
        "delivery_errors": len(errors),
        "guardrail_rejections": trainer_log.read_text(errors="replace").count("guardrail refused"),
        "settings": {k: getattr(settings, k) for k in (
            "batch_size", "max_batch_wait_s", "publish_every_steps", "publish_every_s", "publish_kind",
            "holdout_fraction", "device", "encoder_layers", "freeze_layers", "lora_rank")},
        "trainer_log": str(trainer_log),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Freshness of the trainer: produce-to-published seconds.")
    parser.add_argument("--rate", type=float, default=20.0, help="labeled examples per second (default 20)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds (default 60)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds left out at the start (default 20)")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the last versions")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer setting (STREAMREC_TRAINER_KEY), e.g. --set encoder_layers=2")
    parser.add_argument("--local", action="store_true", help="start a local jar broker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    broker: LocalBroker | None = None
    try:
        kafka = load(KafkaSettings)
        if args.local:
            broker = LocalBroker(partitions=kafka.partitions).start()
            kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        kafka = kafka.model_copy(update={"topic_prefix": f"fresh-{uuid.uuid4().hex[:8]}-"})
        print(f"broker {kafka.bootstrap_servers}, topics {kafka.topic_prefix}*; {args.rate}/s for "
              f"{args.warmup:.0f}+{args.duration:.0f}s")
        try:
            result = run(kafka, rate=args.rate, duration=args.duration, warmup=args.warmup,
                         overrides=overrides, settle_timeout=args.settle)
        finally:
            if broker is None:
                delete_topics(kafka, ALL_TOPICS)
    finally:
        if broker is not None:
            broker.close()
    print(f"freshness over {result['measured']} examples, {result['versions']} versions: "
          f"p50 {result['p50_s']} s, p90 {result['p90_s']} s, p99 {result['p99_s']} s, max {result['max_s']} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
