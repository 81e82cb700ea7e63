"""Scoring agent: throughput at saturation, end-to-end latency at fixed rates, hot-swap time.

    python benchmarks/serving_latency.py [--local] [--rate 500] [--seconds 10] [--saturation 20000]

The agent runs as its own process (``python -m serving``, as in production)
against the broker at ``$STREAMREC_BOOTSTRAP_SERVERS`` or, with ``--local``,
a :class:`~infra.broker.LocalBroker` started for the run.  Topics get a fresh
``bench-<uuid8>-`` prefix and are deleted at the end.

Setup: the MovieLens-100k catalog (1,682 items, text ``"title (year)"``), the
last 20 rated items of each of its 943 users as ``user-history``, and a model
(default :class:`~trainer.model.ModelConfig`: all-MiniLM-L6-v2, 6 layers,
with ``--freeze-layers`` frozen) published as version 1.  Requests ask for
k=10, from a known user (90 %) or a new one (10 %).

Phases:

* **saturation** — ``--saturation`` requests produced as fast as the client
  can (a backlog the agent drains); requests/s = answered / (last answer −
  first send).  With 100 random candidates, and with the whole catalog.
* **latency** — requests at a fixed ``--rate`` for ``--seconds``; latency is
  request produced (client clock before ``produce``) → recommendation
  consumed (client clock on arrival); p50/p99/max.  The client produces with
  ``linger.ms=1``.
* **swap** — at the same rate, a full version 2 and then a delta version 3
  (trainable parameters only, on version 2) are published and announced;
  reports the agent's swap time (``swap_seconds`` from its /metrics:
  fetch + verify + build + item vectors), announce → first answer by the new
  version, failed/lost requests and dead letters during the phase.

Everything shares this machine's cores (broker, agent, client).  The last
line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contract.records import Item, RecRequest, UserHistory
from contract.settings import KafkaSettings, default_cache_dir, load
from contract.topics import (
    ALL_TOPICS,
    DEAD_LETTERS,
    ITEMS,
    MODEL_UPDATES,
    REC_REQUESTS,
    RECOMMENDATIONS,
    USER_HISTORY,
)
from infra.admin import delete_topics, ensure_topics
from infra.broker import LocalBroker
from infra.kafka import KafkaProducer
from infra.processes import Service, free_ports, service_env

log = logging.getLogger("benchmarks.serving_latency")
ROOT = Path(__file__).resolve().parents[1]


class BenchmarkError(RuntimeError):
    pass


# --------------------------------------------------------------------------- data
def movielens(ts: int) -> tuple[list[Item], list[UserHistory]]:
    from streams.replay.movielens import load as load_movielens

    data = load_movielens()
    items = [m.to_item(ts) for m in data.movies]
    order = np.argsort(data.timestamps_ms, kind="stable")
    per_user: dict[str, list[str]] = {}
    for row in order.tolist():
        per_user.setdefault(str(data.user_ids[row]), []).append(data.movies[int(data.item_index[row])].item_id)
    histories = [UserHistory(user_id=u, items=h[-20:], ts=ts) for u, h in per_user.items()]
    return items, histories


def produce_records(kafka: KafkaSettings, spec: Any, records: list[Any]) -> None:
    producer = KafkaProducer.create(kafka, "bench-serving-setup")
    topic = spec.real_name(kafka)
    for r in records:
        producer.send(topic, r.to_json(), r.kafka_key())
    if not (result := producer.barrier(60)).ok:
        raise BenchmarkError(f"could not deliver to {topic}: {result.describe()}")


def topic_size(kafka: KafkaSettings, spec: Any) -> int:
    """Records in a topic (sum of end - start offsets)."""
    topic = spec.real_name(kafka)
    c = Consumer(kafka.confluent_config(**{"group.id": f"bench-{uuid.uuid4().hex[:8]}"}))
    try:
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        total = 0
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            total += hi - lo
        return total
    finally:
        c.close()


# --------------------------------------------------------------------------- client
class Client:
    """Produces requests (recording send times) and consumes recommendations (recording arrivals)."""

    def __init__(self, kafka: KafkaSettings, items: list[str], users: list[str], seed: int = 0) -> None:
        self.kafka = kafka
        self.items = items
        self.users = users
        self.rng = random.Random(seed)
        self.producer = KafkaProducer.create(kafka, "bench-serving-client", **{"linger.ms": 1})
        self.topic = REC_REQUESTS.real_name(kafka)
        self.sent: dict[str, float] = {}
        self.got: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        topic = RECOMMENDATIONS.real_name(self.kafka)
        c = Consumer(self.kafka.confluent_config(**{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "fetch.wait.max.ms": 5}))
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        try:
            while not self._stop.is_set():
                # poll() returns on the first message; consume(timeout=0) then drains what is there.
                # (consume(n, timeout) would wait for n messages or the whole timeout.)
                first = c.poll(0.05)
                now = time.perf_counter()
                if first is None:
                    continue
                msgs = [first, *c.consume(num_messages=1000, timeout=0)]
                with self._arrived:
                    for m in msgs:
                        if m.error() is None:
                            doc = json.loads(m.value())
                            self.got[doc["request_id"]] = (now, doc["model_version"])
                    self._arrived.notify_all()
        finally:
            c.close()

    def make(self, rid: str, *, candidates: int) -> tuple[str, bytes, bytes]:
        """One encoded request (made before any clock starts)."""
        user = self.rng.choice(self.users) if self.rng.random() < 0.9 else f"new-{rid}"
        cands = self.rng.sample(self.items, candidates) if candidates else None
        rec = RecRequest(request_id=rid, user_id=user, k=10, candidates=cands, ts=int(time.time() * 1000))
        return rid, rec.kafka_key(), rec.to_json()

    def request(self, rid: str, *, candidates: int) -> None:
        self.send(*self.make(rid, candidates=candidates))

    def send(self, rid: str, key: bytes, value: bytes) -> None:
        self.sent[rid] = time.perf_counter()
        if (failure := self.producer.send(self.topic, value, key)) is not None:
            raise BenchmarkError(f"request {rid} was rejected: {failure}")
        self.producer.poll(0)

    def wait(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._arrived:
            return self._arrived.wait_for(
                lambda: all(r in self.got for r in ids) or time.monotonic() > deadline, timeout=timeout
            ) and all(r in self.got for r in ids)

    def close(self) -> None:
        self.producer.close(30)
        self._stop.set()
        self._thread.join(10)


def paced(client: Client, prefix: str, *, rate: float, seconds: float, candidates: int) -> list[str]:
    """Send ``rate`` requests/s for ``seconds`` (made beforehand; sent on schedule)."""
    requests = [client.make(f"{prefix}-{i}", candidates=candidates) for i in range(int(rate * seconds))]
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        due = t0 + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(due - now, 0.001))
        client.send(*req)
    client.producer.barrier(10)
    return [rid for rid, _, _ in requests]


def latency_stats(client: Client, ids: list[str]) -> dict[str, Any]:
    lat = np.array([(client.got[r][0] - client.sent[r]) * 1000 for r in ids if r in client.got])
    lost = sum(1 for r in ids if r not in client.got)
    if not len(lat):
        return {"n": len(ids), "lost": lost}
    return {
        "n": len(ids), "lost": lost,
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
    }


# --------------------------------------------------------------------------- the agent process
def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[s.name + (f"{{{label}}}" if label else "")] = s.value
    return out


@contextmanager
def agent_process(
    kafka: KafkaSettings, weights: Path, metrics_port: int, work: Path, extra_env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """The scoring agent as its own process, its log in ``work/agent.log``."""
    env = service_env(kafka, "serving", weights_root=weights, group_id=f"bench-serving-{uuid.uuid4().hex[:8]}",
                      metrics_port=metrics_port)  # fmt: skip
    env.update(extra_env)
    agent = Service.of("serving", env, "--log-level", "INFO", name="agent")
    agent.start(work)
    assert agent.proc is not None
    try:
        yield agent.proc
    finally:
        agent.stop(60)


def agent_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The agent's own view of a phase: mean in-agent latency (arrival -> produce) and batch size."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    n = delta("streamrec_serving_latency_seconds_count")
    b = delta("streamrec_serving_batch_size_count")
    return {
        "agent_mean_ms": round(1000 * delta("streamrec_serving_latency_seconds_sum") / n, 2) if n else 0.0,
        "agent_mean_batch": round(delta("streamrec_serving_batch_size_sum") / b, 1) if b else 0.0,
    }


def wait_swaps(port: int, count: int, timeout: float, proc: subprocess.Popen[bytes]) -> dict[str, float]:
    """Poll the agent's /metrics until ``count`` swaps happened (the benchmark's only wait loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"the agent exited with {proc.returncode}")
        try:
            m = scrape(port)
            if m.get("streamrec_serving_swaps_total", 0) >= count:
                return m
            if any(k.startswith("streamrec_serving_refused_versions_total") and v for k, v in m.items()):
                raise BenchmarkError(f"the agent refused a version: {m}")
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchmarkError(f"the agent did not reach {count} swaps within {timeout:.0f} s")


# --------------------------------------------------------------------------- the run
def run(kafka: KafkaSettings, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    # lazy: torch and the model code load in seconds; --help and argument errors answer at once
    from trainer.model import ModelConfig, build_model
    from trainer.weights import WeightStore

    items, histories = movielens(ts=int(time.time() * 1000) - 60_000)
    produce_records(kafka, ITEMS, items)
    produce_records(kafka, USER_HISTORY, histories)
    overrides: dict[str, Any] = {"freeze_layers": args.freeze_layers}
    if args.encoder_layers:
        overrides["encoder_layers"] = args.encoder_layers
    config = ModelConfig(**overrides)
    model = build_model(config)
    store = WeightStore(work / "weights")
    produce_records(kafka, MODEL_UPDATES, [store.publish(model, version=1)])
    port = free_ports(1)[0]
    result: dict[str, Any] = {
        "catalog_items": len(items), "users": len(histories), "encoder_layers": len(model.item_tower.layers),
        "freeze_layers": config.freeze_layers, "embed_dim": config.embed_dim,
    }
    client = Client(kafka, [i.item_id for i in items], [h.user_id for h in histories])
    started = time.monotonic()
    extra_env = dict(kv.split("=", 1) for kv in args.agent_env)
    result["agent_env"] = extra_env
    with agent_process(kafka, work / "weights", port, work, extra_env) as proc:
        m = wait_swaps(port, 1, 600, proc)
        result["start_to_ready_s"] = round(time.monotonic() - started, 1)
        result["initial_load_s"] = round(m["streamrec_serving_swap_seconds_sum"], 2)
        warm_up(client)
        print(f"agent ready in {result['start_to_ready_s']} s (initial version loaded in {result['initial_load_s']} s)")
        for name, cands, n in (("saturation_100", 100, args.saturation), ("saturation_catalog", 0, args.saturation // 2)):
            result[name] = saturation(client, port, name, candidates=cands, n=n)
        for name, cands in (("latency_100", 100), ("latency_catalog", 0)):
            result[name] = latency(client, port, name, rate=args.rate, seconds=args.seconds, candidates=cands)
        if args.skip_swap:
            client.close()
            return result
        v2 = build_model(config)
        v2.load_state_dict(model.state_dict())
        swap = Swap(kafka, store, v2, port, proc)
        result["swap"] = swap.measure(client, rate=args.rate, seconds=args.swap_seconds,
                                      initial_load_s=result["initial_load_s"])  # fmt: skip
    client.close()
    for line in (work / "agent.log").read_text(errors="replace").splitlines():
        if "swapped in" in line or "refused" in line:
            print("agent:", line.split(": ", 1)[-1])
    return result


def warm_up(client: Client, n: int = 200) -> None:
    warm = [f"warm-{i}" for i in range(n)]
    for r in warm:
        client.request(r, candidates=100)
    client.producer.barrier(10)
    if not client.wait(warm, 120):
        raise BenchmarkError("the agent did not answer the warm-up requests")


def saturation(client: Client, port: int, name: str, *, candidates: int, n: int) -> dict[str, Any]:
    """``n`` requests produced as fast as the client can; requests/s = answered / (last answer - first send)."""
    before = scrape(port)
    requests = [client.make(f"{name}-{i}", candidates=candidates) for i in range(n)]
    ids = [rid for rid, _, _ in requests]
    t0 = time.perf_counter()
    for req in requests:
        client.send(*req)
    client.producer.barrier(30)
    if not client.wait(ids, 300):
        raise BenchmarkError(f"{name}: {sum(r not in client.got for r in ids)} requests unanswered")
    last = max(client.got[r][0] for r in ids)
    after = scrape(port)
    batches = after["streamrec_serving_batch_size_count"] - before["streamrec_serving_batch_size_count"]
    batch_sum = after["streamrec_serving_batch_size_sum"] - before["streamrec_serving_batch_size_sum"]
    out = {
        "requests": n, "rps": round(n / (last - t0)),
        "produce_s": round(client.sent[ids[-1]] - t0, 2),
        "mean_batch": round(batch_sum / max(batches, 1), 1),
    }
    print(f"{name}: {out['rps']:,} requests/s ({n:,} requests, mean batch {out['mean_batch']})")
    return out


def latency(client: Client, port: int, name: str, *, rate: float, seconds: float, candidates: int) -> dict[str, Any]:
    """Requests at a fixed rate: client-side latency percentiles and the agent's own view."""
    before = scrape(port)
    ids = paced(client, name, rate=rate, seconds=seconds, candidates=candidates)
    client.wait(ids, 30)
    after = scrape(port)
    out = {"rate": rate, **latency_stats(client, ids), **agent_side(before, after)}
    print(f"{name} @ {rate}/s: p50 {out.get('p50_ms')} ms, p99 {out.get('p99_ms')} ms, lost {out['lost']}")
    return out


class Swap:
    """A full version 2, then a delta version 3 on it, published while requests stream in at the rate."""

    def __init__(self, kafka: KafkaSettings, store: Any, v2: Any, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.kafka, self.store, self.v2, self.port, self.proc = kafka, store, v2, port, proc
        self.announced: dict[int, float] = {}
        self.swap_sum: dict[int, float] = {}
        self.failure: list[BaseException] = []

    def _nudge(self) -> None:
        import torch  # lazy, as the model code in run(): seconds of start-up that --help does not need

        with torch.no_grad():
            for p in self.v2.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 1e-3)

    def _publish(self) -> None:  # runs beside the paced requests, like a trainer would
        try:
            time.sleep(1.0)
            for version, kind, base in ((2, "full", None), (3, "delta", 2)):
                self._nudge()
                update = self.store.publish(self.v2, version=version, kind=kind, base_version=base)
                produce_records(self.kafka, MODEL_UPDATES, [update])
                self.announced[version] = time.perf_counter()
                swaps = wait_swaps(self.port, version, 300, self.proc)
                self.swap_sum[version] = swaps["streamrec_serving_swap_seconds_sum"]
        except BaseException as exc:
            self.failure.append(exc)

    def measure(self, client: Client, *, rate: float, seconds: float, initial_load_s: float) -> dict[str, Any]:
        swapper = threading.Thread(target=self._publish, daemon=True)
        swapper.start()
        ids = paced(client, "swap", rate=rate, seconds=seconds, candidates=100)
        swapper.join(300)
        if self.failure or 3 not in self.swap_sum:
            raise BenchmarkError(f"the swaps did not complete during the swap phase: {self.failure}")
        client.wait(ids, 60)
        first_by = {
            v: min((client.got[r][0] for r in ids if r in client.got and client.got[r][1] == str(v)), default=None)
            for v in (2, 3)
        }
        stats = latency_stats(client, ids)
        dead = topic_size(self.kafka, DEAD_LETTERS)
        out = {
            "rate": rate, **stats, "dead_letters": dead,
            "full_swap_s": round(self.swap_sum[2] - initial_load_s, 2),
            "delta_swap_s": round(self.swap_sum[3] - self.swap_sum[2], 2),
            "announce_to_first_answer_s": {
                str(v): round(first_by[v] - self.announced[v], 2) if first_by[v] else None for v in (2, 3)
            },
            "versions_seen": sorted({client.got[r][1] for r in ids if r in client.got}),
        }
        print(f"swap: full {out['full_swap_s']} s, delta {out['delta_swap_s']} s; "
              f"{stats['lost']} lost, {dead} dead letters; p99 during the swap phase {stats.get('p99_ms')} ms")
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true", help="start a local jar broker")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s of the latency phases (500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency phase (10 s)")
    parser.add_argument("--swap-seconds", type=float, default=30.0,
                        help="length of the swap phase; should cover both swaps (30 s)")
    parser.add_argument("--saturation", type=int, default=20_000, help="requests of the saturation phase (20,000)")
    parser.add_argument("--freeze-layers", type=int, default=4, help="frozen encoder layers of the model (4)")
    parser.add_argument("--encoder-layers", type=int, default=0, help="keep only N encoder layers (0 = all 6)")
    parser.add_argument("--skip-swap", action="store_true", help="leave out the swap phase")
    parser.add_argument("--agent-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the agent, e.g. STREAMREC_SERVING_TORCH_THREADS=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    broker: LocalBroker | None = None
    work = Path(tempfile.mkdtemp(prefix="bench-serving-", dir=default_cache_dir()))
    kafka = load(KafkaSettings).model_copy(update={"topic_prefix": f"bench-{uuid.uuid4().hex[:8]}-"})
    try:
        if args.local:
            broker = LocalBroker(partitions=kafka.partitions).start()
            kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        ensure_topics(kafka, ALL_TOPICS)
        try:
            result = run(kafka, args, work)
        except BenchmarkError as exc:
            print(f"error: {exc}; agent log: {work / 'agent.log'}", file=sys.stderr)
            return 1
        finally:
            try:
                delete_topics(kafka, ALL_TOPICS)
            except Exception as exc:  # best effort
                log.warning("could not delete the benchmark topics: %s", exc)
    finally:
        if broker is not None:
            broker.close()
    shutil.rmtree(work, ignore_errors=True)
    result["cores"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
