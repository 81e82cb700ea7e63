"""Scaling of every stage, 1 → 2 workers, measured in one run on one broker.

    python benchmarks/scaling.py --local [--quick] [--stages join,trainer,serving] [--workers 1,2]

For each stage and each worker count, on topics of its own (prefix
``scale-<run>-<stage><n>-``, 4 partitions, its own consumer group), the input
is produced first and the services are started on that backlog as processes
(:class:`infra.processes.Service`, the environment from
:func:`infra.processes.service_env`):

- **join**: ``--join-impressions`` impressions (slates of 10) and their clicks
  (``join_throughput.make_events``); *n* ``python -m streams.worker``
  processes with the same app id share the partitions.  Events = input events
  joined (impressions + clicks: the workers' ``streamrec_join_events_in_total``
  less ``streamrec_join_replayed_skipped_total``, the redelivered ones it
  skips; events fetched before a re-read are not in it either).
- **trainer**: ``--trainer-examples`` labeled examples on the MovieLens
  catalog (``freshness.ExampleMaker``, 1,000 users);
  ``torchrun --standalone --nproc-per-node n -m trainer`` (gloo on the CPU,
  ``--trainer-threads`` torch threads per rank, a 1-layer frozen encoder,
  ``--trainer-batch`` examples per rank and step, no publishing, no
  checkpoints and no hold-out while measured).  Events = examples trained
  (the ``T`` lines of every rank's trained-ids log).
- **serving**: ``--serving-requests`` recommendation requests (k = 10, 100
  candidates, ``serving_latency.Client``) for MovieLens users; *n*
  ``python -m serving`` agents in one group, a 1-layer version published
  before they start (an agent that refuses it stops the run: it would measure
  the fallback), at most ``--serving-queue`` requests queued per agent.
  Events = requests answered (the agents' ``streamrec_serving_requests_total``,
  counted once the version is swapped in).

Each configuration is measured over a fixed amount of input (``--measure``,
a fraction of it) after a warm-up: the clock starts at the first poll at which
``--warmup`` of the input is done *and* every worker (rank, agent) has done
some, i.e. after start-up and the consumer group's rebalances; it stops once
the fixed amount more is done, and the services are stopped.  Reported per
configuration: events/s, the ratio to 1 worker, the CPU seconds per event of
the services' processes (user + system, with their children: torchrun's
ranks; psutil when installed, else ``/proc/<pid>/stat``), the broker's CPU
seconds per event (``--local`` only), each worker's share, and the 1-minute
load average over the window.  On a machine with few cores the ratio is
bounded by the cores that the broker, this client and the services share;
CPU seconds per event is the figure that carries over to bigger machines.

Uses the broker at ``$STREAMREC_BOOTSTRAP_SERVERS`` or, with ``--local``, a
:class:`~infra.broker.LocalBroker` it starts and removes.  Logs stay in
``<cache>/scaling/<run>/``.  The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from broker_throughput import BenchmarkError, produce_timed  # noqa: E402
from join_throughput import TOPICS as JOIN_TOPICS  # noqa: E402
from join_throughput import WINDOW_MS, cpu_seconds, make_events  # noqa: E402
from serving_latency import BenchmarkError as ServingBenchmarkError  # noqa: E402
from serving_latency import Client, movielens, produce_records, scrape  # noqa: E402

from contract.errors import ConfigError  # noqa: E402
from contract.records import Labeled  # noqa: E402
from contract.settings import KafkaSettings, default_cache_dir, load  # noqa: E402
from contract.topics import (  # noqa: E402
    ALL_TOPICS,
    CLICKS,
    IMPRESSIONS,
    ITEMS,
    LABELED,
    MODEL_UPDATES,
    USER_HISTORY,
    TopicSpec,
)
from infra.admin import AdminError, delete_topics, ensure_topics  # noqa: E402
from infra.broker import BrokerError, LocalBroker  # noqa: E402
from infra.processes import Service, ServiceGroup, alive, free_ports, service_env  # noqa: E402
from streams.restore import STATE_TABLE  # noqa: E402

try:
    import psutil
except ImportError:  # the /proc fallback below
    psutil = None

log = logging.getLogger("scaling")

STAGES = ("join", "trainer", "serving")
UNITS = {"join": "input events (impressions + clicks) joined", "trainer": "examples trained",
         "serving": "requests answered"}  # fmt: skip
JOIN_APP_ID = "scale-join"
FULL = {"join_impressions": 120_000, "trainer_examples": 300_000, "serving_requests": 160_000}
QUICK = {"join_impressions": 20_000, "trainer_examples": 50_000, "serving_requests": 50_000}
TRAINER_SETTINGS: dict[str, Any] = {
    "encoder_layers": 1,  # a small model: the question is how the group scales, not the encoder's cost
    "max_text_len": 32,
    "device": "cpu",
    "holdout_fraction": 0.0,  # every example is trained: the T lines count them all
    "publish_every_steps": 1_000_000,  # no version, no checkpoint while measured
    "publish_every_s": 86_400.0,
    "checkpoint_every_steps": 1_000_000,
    "checkpoint_every_s": 86_400.0,
    "metrics_port": 0,
    "ddp_timeout_s": 120.0,
}
SERVING_MODEL = {"encoder_layers": 1}


# --------------------------------------------------------------------------- CPU of process trees
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_snapshot(roots: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds so far of every process in the trees of ``roots``, by pid."""
    out: dict[int, float] = {}
    for root in roots:
        if psutil is not None:
            try:
                top = psutil.Process(root)
                procs = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    out[p.pid] = t.user + t.system
            continue
        todo = [root]
        while todo:
            pid = todo.pop()
            if (c := cpu_seconds(pid)) is not None:
                out[pid] = c
            todo += _children(pid)
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots (a process started in between counts from 0)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


# --------------------------------------------------------------------------- the measured window
Probe = Callable[[], tuple[list[int], dict[str, float]]]
"""Events done so far per worker, and counters of the services (summed) to report per window."""


@dataclass
class Window:
    """What one configuration is measured by."""

    stage: str
    workers: int
    probe: Probe
    services: list[Service]
    total: int  # events in the input
    broker_pid: int | None


def measure(w: Window, *, warmup: float, amount: float, timeout: float, poll: float = 0.25) -> dict[str, Any]:
    """Wait for the warm-up, then time ``amount`` x total events; CPU and load over the same window."""
    need_warm, need = int(w.total * warmup), int(w.total * amount)
    label = f"{w.stage} x{w.workers}"
    started = time.monotonic()
    deadline = started + timeout
    start: dict[str, Any] | None = None
    loads: list[float] = []
    while True:
        for s in w.services:
            s.check()
        counts, counters = w.probe()
        now, n = time.perf_counter(), sum(counts)
        if start is None:
            if n + need > w.total:  # the input runs out before every worker took part
                raise BenchmarkError(
                    f"{label}: {n:,} of {w.total:,} events done before the clock could start (per worker "
                    f"{counts}: each must have done some); give it more input"
                )
            if n >= need_warm and all(c > 0 for c in counts):
                pids = [s.proc.pid for s in w.services if s.proc is not None]
                start = {"t": now, "n": n, "counts": counts, "counters": counters, "cpu": cpu_snapshot(pids),
                         "pids": pids, "broker": cpu_snapshot([w.broker_pid]) if w.broker_pid else {},
                         "since_start_s": time.monotonic() - started}  # fmt: skip
        else:
            loads.append(os.getloadavg()[0])
            if n >= start["n"] + need:
                cpu = cpu_between(start["cpu"], cpu_snapshot(start["pids"]))
                broker = cpu_between(start["broker"], cpu_snapshot([w.broker_pid])) if w.broker_pid else None
                events, seconds = n - start["n"], now - start["t"]
                share = [c - c0 for c, c0 in zip(counts, start["counts"], strict=True)]
                return {
                    "stage": w.stage, "workers": w.workers, "events": events, "seconds": round(seconds, 2),
                    "events_per_s": round(events / seconds, 1),
                    "cpu_s": round(cpu, 2), "cpu_s_per_event": cpu / events,
                    "broker_cpu_s_per_event": broker / events if broker is not None else None,
                    "share": [round(x / events, 3) for x in share],
                    "load_avg_1m": round(statistics.fmean(loads), 2), "warmup_events": start["n"],
                    "start_to_window_s": round(start["since_start_s"], 1), "input_events": w.total,
                    "counters": {k: round(v - start["counters"].get(k, 0.0)) for k, v in counters.items()},
                }  # fmt: skip
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{label}: {n:,} of {w.total:,} events after {timeout:.0f} s (per worker {counts})")
        time.sleep(poll)


def scrape_all(ports: Sequence[int], count: Callable[[dict[str, float]], float],
               counters: dict[str, str]) -> tuple[list[int], dict[str, float]]:
    """Each service's /metrics: its count of events, and the named counters (by sample prefix) summed."""
    counts, summed = [], dict.fromkeys(counters, 0.0)
    for port in ports:
        try:
            m = scrape(port)
        except OSError:  # not serving /metrics yet
            counts.append(0)
            continue
        counts.append(int(count(m)))
        for name, prefix in counters.items():
            summed[name] += sum(v for k, v in m.items() if k.startswith(prefix))
    return counts, summed


def _sum(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix))


JOIN_COUNTERS = {
    "replayed_skipped": "streamrec_join_replayed_skipped_total",  # read again after a move; not counted
    "stale_skipped": "streamrec_join_stale_skipped_total",
    "deferred": "streamrec_join_deferred_total",
    "input_gaps": "streamrec_join_input_gaps_total",
    "batches": "streamrec_join_batch_seconds_count",
}
SERVING_COUNTERS = {"batches": "streamrec_serving_batch_size_count", "dead_letters": "streamrec_serving_dead_letters"}


def join_applied(m: dict[str, float]) -> float:
    """Input events joined: events_in counts the redelivered ones it skips too."""
    return _sum(m, "streamrec_join_events_in_total") - _sum(m, "streamrec_join_replayed_skipped_total")


def serving_answered(m: dict[str, float]) -> float:
    """Requests answered; an agent that refused the version (and answers by the fallback) stops the run."""
    if refused := {k: v for k, v in m.items() if k.startswith("streamrec_serving_refused_versions_total") and v}:
        raise BenchmarkError(f"an agent refused the published version, so it would measure the fallback: {refused}")
    return _sum(m, "streamrec_serving_requests_total") if _sum(m, "streamrec_serving_swaps_total") else 0.0


def run_window(kafka: KafkaSettings, specs: Sequence[TopicSpec], services: list[Service], window: Window,
               args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start the services, measure, stop them (and what they started), delete the topics."""
    children: list[int] = []
    try:
        with ServiceGroup(services, log_dir=log_dir, stop_timeout=60):
            try:
                result = measure(window, warmup=args.warmup, amount=args.measure, timeout=args.timeout)
            finally:
                roots = [s.proc.pid for s in services if s.proc is not None]
                children = [pid for pid in cpu_snapshot(roots) if pid not in roots]  # torchrun's ranks
                print(f"  stopping {len(services)} {window.stage} process(es)", flush=True)
        for pid in children:  # a rank its launcher left behind when it was killed after the stop timeout
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    finally:
        try:
            delete_topics(kafka, specs)
        except AdminError as exc:
            log.warning("could not delete the topics of %s: %s", kafka.topic_prefix, exc)
    return result


# --------------------------------------------------------------------------- the stages
class Run:
    def __init__(self, kafka: KafkaSettings, args: argparse.Namespace, work: Path, broker_pid: int | None) -> None:
        self.kafka, self.args, self.work, self.broker_pid = kafka, args, work, broker_pid
        self.run_id = uuid.uuid4().hex[:6]
        self._movielens: tuple[list[Any], list[Any]] | None = None

    def prefixed(self, stage: str, n: int) -> KafkaSettings:
        return self.kafka.model_copy(update={"topic_prefix": f"scale-{self.run_id}-{stage}{n}-"})

    def catalog(self) -> tuple[list[Any], list[Any]]:
        if self._movielens is None:
            self._movielens = movielens(ts=int(time.time() * 1000) - 60_000)
        return self._movielens

    # --- join ---------------------------------------------------------------------------------
    def join(self, counts: Sequence[int]) -> list[dict[str, Any]]:
        a = self.args
        imps, clicks, _labels = make_events(a.join_impressions, slate=10, click_rate=0.5, users=10_000, items=1_682)
        total = len(imps) + len(clicks)
        out = []
        for n in counts:
            kafka = self.prefixed("join", n)
            changelog = TopicSpec(f"{JOIN_APP_ID}-{STATE_TABLE}-changelog", Labeled)
            ensure_topics(kafka, JOIN_TOPICS, partitions=a.partitions)
            produce_timed(kafka, IMPRESSIONS.real_name(kafka), imps)
            produce_timed(kafka, CLICKS.real_name(kafka), clicks)
            ports = free_ports(n)
            services = [
                Service.of("join", service_env(
                    kafka, "join", inherit=False, window_ms=WINDOW_MS,
                    allowed_lateness_ms=1000, data_dir=self.work / f"join{n}-{i}", metrics_port=port,
                    app_id=JOIN_APP_ID,
                ), "--log-level", "warning", name=f"join{n}-{i}")
                for i, port in enumerate(ports)
            ]  # fmt: skip
            probe = functools.partial(scrape_all, ports, join_applied, JOIN_COUNTERS)
            window = Window("join", n, probe, services, total, self.broker_pid)
            print(f"join x{n}: {total:,} input events pre-filled on {kafka.topic_prefix}*", flush=True)
            out.append(run_window(kafka, [*JOIN_TOPICS, changelog], services, window, a, self.work / "logs"))
            self._done(out[-1])
            for i in range(n):
                shutil.rmtree(self.work / f"join{n}-{i}", ignore_errors=True)
        return out

    # --- trainer --------------------------------------------------------------------------------
    def trainer(self, counts: Sequence[int]) -> list[dict[str, Any]]:
        from freshness import ExampleMaker  # lazy: imports the trainer (torch)

        a = self.args
        items, _histories = self.catalog()
        maker = ExampleMaker(items, users=1_000, seed=0)
        examples = [(ex.kafka_key(), ex.to_json()) for ex in (maker.next() for _ in range(a.trainer_examples))]
        out = []
        for n in counts:
            kafka = self.prefixed("trainer", n)
            ensure_topics(kafka, ALL_TOPICS, partitions=a.partitions)
            produce_records(kafka, ITEMS, items)
            produce_timed(kafka, LABELED.real_name(kafka), examples)
            home = self.work / f"trainer{n}"
            env = service_env(
                kafka, "trainer", inherit=False, weights_root=home / "weights", checkpoint_dir=home / "ckpt",
                trained_ids_log=home / "ids.log", group_id=f"scale-{self.run_id}-trainer{n}",
                batch_size=a.trainer_batch, **TRAINER_SETTINGS,
            )  # fmt: skip
            env["OMP_NUM_THREADS"] = str(a.trainer_threads)  # torchrun sets 1 for n > 1 otherwise
            service = Service(f"trainer{n}", "torch.distributed.run", env,
                              ("--standalone", f"--nproc-per-node={n}", "-m", "trainer"))  # fmt: skip
            logs = [home / "ids.log"] if n == 1 else [home / f"ids.log.rank{r}" for r in range(n)]
            ids = TrainedIds(logs)
            window = Window("trainer", n, lambda ids=ids: (ids.counts(), {}), [service], len(examples),
                            self.broker_pid)  # fmt: skip
            print(f"trainer x{n}: {len(examples):,} labeled examples pre-filled on {kafka.topic_prefix}*", flush=True)
            out.append(run_window(kafka, ALL_TOPICS, [service], window, a, self.work / "logs"))
            self._done(out[-1])
            shutil.rmtree(home, ignore_errors=True)
        return out

    # --- serving --------------------------------------------------------------------------------
    def serving(self, counts: Sequence[int]) -> list[dict[str, Any]]:
        from trainer.model import ModelConfig, build_model  # lazy: torch
        from trainer.weights import WeightStore

        a = self.args
        items, histories = self.catalog()
        store = WeightStore(self.work / "serving-weights")
        update = store.publish(build_model(ModelConfig(**SERVING_MODEL)), version=1)
        requests: list[tuple[str, bytes, bytes]] = []  # made once: the same requests for every count
        out = []
        for n in counts:
            kafka = self.prefixed("serving", n)
            ensure_topics(kafka, ALL_TOPICS, partitions=a.partitions)
            produce_records(kafka, ITEMS, items)
            produce_records(kafka, USER_HISTORY, histories)
            produce_records(kafka, MODEL_UPDATES, [update])
            client = Client(kafka, [i.item_id for i in items], [h.user_id for h in histories], seed=0)
            try:
                requests = requests or [client.make(f"r{i}", candidates=100) for i in range(a.serving_requests)]
                for request in requests:
                    client.send(*request)
                if not (sent := client.producer.barrier(120)).ok:
                    raise BenchmarkError(f"could not produce the requests: {sent.describe()}")
            finally:
                client.close()
            ports = free_ports(n)
            services = [
                Service.of("serving", service_env(
                    kafka, "serving", inherit=False, weights_root=self.work / "serving-weights",
                    group_id=f"scale-{self.run_id}-serving{n}", metrics_port=port, max_queued=a.serving_queue,
                ), "--log-level", "INFO", name=f"serving{n}-{i}")
                for i, port in enumerate(ports)
            ]  # fmt: skip
            probe = functools.partial(scrape_all, ports, serving_answered, SERVING_COUNTERS)
            window = Window("serving", n, probe, services, a.serving_requests, self.broker_pid)
            print(f"serving x{n}: {a.serving_requests:,} requests pre-filled on {kafka.topic_prefix}*", flush=True)
            out.append(run_window(kafka, ALL_TOPICS, services, window, a, self.work / "logs"))
            self._done(out[-1])
        shutil.rmtree(self.work / "serving-weights", ignore_errors=True)
        return out

    @staticmethod
    def _done(r: dict[str, Any]) -> None:
        print(f"  {r['events']:,} events in {r['seconds']} s after {r['warmup_events']:,} warm-up events "
              f"({r['start_to_window_s']} s from start): {r['events_per_s']:,.0f}/s, "
              f"{r['cpu_s_per_event']:.3g} CPU s/event, load {r['load_avg_1m']}"
              + (f"; in the window: {r['counters']}" if r["counters"] else ""), flush=True)


class TrainedIds:
    """Lines ``T <example_id>`` of each rank's trained-ids log, read as the files grow."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.pos = [0] * len(paths)
        self.n = [0] * len(paths)
        self.rest = [b""] * len(paths)

    def counts(self) -> list[int]:
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.pos[i])
                    chunk = f.read()
            except OSError:
                continue
            self.pos[i] += len(chunk)
            lines = (self.rest[i] + chunk).split(b"\n")
            self.rest[i] = lines.pop()  # a line still being written
            self.n[i] += sum(1 for line in lines if line.startswith(b"T "))
        return list(self.n)


# --------------------------------------------------------------------------- the table
def print_table(rows: list[dict[str, Any]]) -> None:
    base = {r["stage"]: r["events_per_s"] for r in rows if r["workers"] == 1}
    print(f"\n{'stage':<9}{'workers':>8}{'events/s':>11}{'ratio':>7}{'CPU s/event':>13}{'broker s/ev':>13}"
          f"{'share':>13}{'load 1m':>9}{'events':>9}{'s':>7}")  # fmt: skip
    for r in rows:
        ratio = r["events_per_s"] / base[r["stage"]] if r["stage"] in base else None
        r["ratio_to_1"] = round(ratio, 2) if ratio is not None else None
        broker = f"{r['broker_cpu_s_per_event']:.2e}" if r["broker_cpu_s_per_event"] is not None else "-"
        share = "/".join(f"{100 * s:.0f}" for s in r["share"])
        print(f"{r['stage']:<9}{r['workers']:>8}{r['events_per_s']:>11,.0f}"
              f"{(f'{ratio:.2f}' if ratio is not None else '-'):>7}{r['cpu_s_per_event']:>13.2e}{broker:>13}"
              f"{share:>13}{r['load_avg_1m']:>9.2f}{r['events']:>9,}{r['seconds']:>7.1f}")  # fmt: skip
    print("events: " + "; ".join(f"{s}: {u}" for s, u in UNITS.items() if any(r["stage"] == s for r in rows)))
    print(f"note: {os.cpu_count()} cores here, shared by the broker, this client, the services and other jobs: "
          f"the ratio to 1 worker is bounded by the cores, not by the design; CPU s/event (the services' own "
          f"processes) is the figure that transfers to bigger machines (share: each worker's part of the window)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local", action="store_true", help="start a local jar broker")
    p.add_argument("--quick", action="store_true", help="less input per configuration (about 2 minutes)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--workers", default="1,2", help="worker counts to run (1,2; the ratio is to the 1-worker row)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (4)")
    p.add_argument("--join-impressions", type=int, default=None,
                   help=f"impressions of the join input ({FULL['join_impressions']:,}; quick {QUICK['join_impressions']:,})")
    p.add_argument("--trainer-examples", type=int, default=None,
                   help=f"labeled examples ({FULL['trainer_examples']:,}; quick {QUICK['trainer_examples']:,})")
    p.add_argument("--serving-requests", type=int, default=None,
                   help=f"requests ({FULL['serving_requests']:,}; quick {QUICK['serving_requests']:,})")
    p.add_argument("--serving-queue", type=int, default=2_048,
                   help="STREAMREC_SERVING_MAX_QUEUED (2,048): on a backlog the first agent of a group would "
                   "queue up to the default 20,000 requests, and a revoked partition's queued requests are "
                   "answered before it moves")
    p.add_argument("--trainer-batch", type=int, default=1024, help="examples per rank and step (1,024)")
    p.add_argument("--trainer-threads", type=int, default=1, help="torch threads per rank (1)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the input done before the clock starts")
    p.add_argument("--measure", type=float, default=0.4, help="fraction of the input timed after the warm-up")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait per configuration (s)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stages {sorted(unknown)}")
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > args.partitions:
        p.error(f"--workers: between 1 and the partitions ({args.partitions})")
    if args.warmup < 0 or args.measure <= 0 or args.warmup + args.measure >= 1:
        p.error("--warmup and --measure: fractions of the input with warmup + measure < 1")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("broker_throughput.librdkafka").setLevel(logging.ERROR)

    began = time.monotonic()
    work = default_cache_dir() / "scaling" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    broker: LocalBroker | None = None
    rows: list[dict[str, Any]] = []
    stage_wall: dict[str, float] = {}
    try:
        kafka = load(KafkaSettings)
        if args.local:
            broker = LocalBroker(partitions=args.partitions).start()
            kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        kafka = kafka.model_copy(update={"partitions": args.partitions})  # STREAMREC_PARTITIONS of the services
        print(f"broker {kafka.bootstrap_servers}; stages {', '.join(stages)}; workers {counts}; "
              f"{os.cpu_count()} cores; CPU times from {'psutil' if psutil else '/proc'}; logs {work / 'logs'}",
              flush=True)  # fmt: skip
        run = Run(kafka, args, work, broker.pid if broker is not None else None)
        for stage in stages:
            t0 = time.monotonic()
            rows += getattr(run, stage)(counts)
            stage_wall[stage] = round(time.monotonic() - t0, 1)
            print(f"{stage}: {stage_wall[stage]:.0f} s", flush=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, AdminError, BenchmarkError, ServingBenchmarkError) as exc:
        print(f"error: {exc}; logs in {work / 'logs'}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.close()
    print_table(rows)
    summary = {
        "benchmark": "scaling", "cores": os.cpu_count(), "quick": args.quick, "partitions": args.partitions,
        "cpu_times": "psutil" if psutil else "/proc", "wall_s": round(time.monotonic() - began, 1),
        "stage_wall_s": stage_wall,
        "inputs": {k: getattr(args, k) for k in FULL}, "trainer_batch": args.trainer_batch,
        "trainer_threads": args.trainer_threads, "results": rows,
    }  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
