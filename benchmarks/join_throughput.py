"""Join throughput: input events per second through one worker, end to end.

    python benchmarks/join_throughput.py [--impressions 100000] [--slate 10] [--click-rate 0.5] [--local]

Produces ``--impressions`` impressions (slates of ``--slate`` items) and about
``click-rate`` clicks per impression to fresh topics, then starts one worker
(``python -m streams.worker``, a subprocess) on that backlog and reads
``labeled`` until every example is there.  At the end of the input, a few
far-future impressions and clicks (for users spread over every partition)
push every watermark past the last window, so no window waits for the idle
timeout; their own labels are not counted.

``input_eps`` = input events / seconds from the first labeled record read to
the last one; it is printed next to the raw consume rate of the broker
(``benchmarks/broker_throughput.measure``, same run) as a ratio, and next to
the *Faust floor*: the rate at which a Faust agent with the worker's consumer
settings merely takes the same input in batches and drops it (a subprocess,
same run), i.e. what Faust's per-message path costs before any join work.
``worker_cpu_s`` is the CPU the worker used while joining: on a machine
shared with other jobs, ``input_events_per_worker_cpu_s`` is the figure that
does not depend on the load.  Uses the
broker at ``$STREAMREC_BOOTSTRAP_SERVERS`` or, with ``--local``, a
:class:`~infra.broker.LocalBroker` it starts itself.  The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from contract.errors import ConfigError
from contract.records import Click, Impression
from contract.settings import KafkaSettings, load
from contract.topics import CLICKS, DEAD_LETTERS, IMPRESSIONS, LABELED, USER_HISTORY
from infra.admin import AdminError, delete_topics, ensure_topics
from infra.broker import BrokerError, LocalBroker
from infra.processes import SERVICE_MODULES, free_ports, kafka_env, service_env

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker_throughput import BenchmarkError, measure, produce_timed  # noqa: E402

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOPICS = (IMPRESSIONS, CLICKS, LABELED, USER_HISTORY, DEAD_LETTERS)
T0 = 1_700_000_000_000
STEP_MS = 10  # event time between impressions
CLICK_DELAY_MS = 2_000
WINDOW_MS = 30_000
FLUSH_USERS = 64  # far-future events for this many users: every partition gets some


def make_events(
    impressions: int, *, slate: int, click_rate: float, users: int, items: int, seed: int = 0
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], int]:
    """Encoded (key, value) impressions and clicks in event-time order, and the labels expected."""
    rng = random.Random(seed)
    imps: list[tuple[bytes, bytes]] = []
    clicks: list[tuple[bytes, bytes]] = []
    for i in range(impressions):
        user = f"u{rng.randrange(users)}"
        ts = T0 + i * STEP_MS
        shown = [f"m{j}" for j in rng.sample(range(items), slate)]
        imp = Impression(impression_id=f"imp-{i}", user_id=user, items=shown, ts=ts)
        imps.append((imp.kafka_key(), imp.to_json()))
        if rng.random() < click_rate:
            c = Click(impression_id=imp.impression_id, user_id=user, item_id=rng.choice(shown),
                      ts=ts + CLICK_DELAY_MS, value=float(rng.randint(1, 5)))
            clicks.append((c.kafka_key(), c.to_json()))
    expected = impressions * slate
    far = T0 + impressions * STEP_MS + 10 * WINDOW_MS
    for u in range(FLUSH_USERS):
        imp = Impression(impression_id=f"flush-{u}", user_id=f"flush-{u}", items=["x"], ts=far)
        c = Click(impression_id=f"flush-{u}", user_id=f"flush-{u}", item_id="x", ts=far)
        imps.append((imp.kafka_key(), imp.to_json()))
        clicks.append((c.kafka_key(), c.to_json()))
    return imps, clicks, expected


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(proc: subprocess.Popen, profiled: bool) -> int:
    """The worker's pid: ``proc`` itself, or under ``--profile`` the child py-spy started."""
    if not profiled:
        return proc.pid
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    return int(children[0]) if children else proc.pid


WORKER_COUNTERS = {
    "streamrec_join_events_in_total": "worker_events_applied",
    "streamrec_join_replayed_skipped_total": "worker_replayed_skipped",
    "streamrec_join_stale_skipped_total": "worker_stale_skipped",
    "streamrec_join_deferred_total": "worker_deferred",
    "streamrec_join_input_gaps_total": "worker_input_gaps",
}


def worker_counters(port: int) -> dict[str, int]:
    """The worker's own counts of what it applied and what it skipped (its /metrics endpoint).

    Events skipped (redelivered, fetched before a re-read, handed over while
    rebalancing) are read and decoded again: they explain a run that needed
    more worker CPU than another for the same input.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    got = dict.fromkeys(WORKER_COUNTERS.values(), 0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WORKER_COUNTERS:
                got[WORKER_COUNTERS[sample.name]] += int(sample.value)
    return got


def read_labeled(
    settings: KafkaSettings, expected: int, proc: subprocess.Popen, timeout: float, *, profiled: bool = False
) -> tuple[float, float, int, float | None]:
    """Read ``labeled`` until ``expected`` non-flush examples.

    Returns the first and last read times, the duplicates, and the worker's CPU
    seconds between the first and the last read.
    """
    topic = LABELED.real_name(settings)
    consumer = Consumer(settings.confluent_config(**{
        "group.id": f"bench-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 20,
        "logger": logging.getLogger(f"{__name__}.librdkafka"),
    }))  # fmt: skip
    seen: set[bytes] = set()
    total = 0
    first = last = 0.0
    cpu_first: float | None = None
    pid = proc.pid
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        deadline = time.monotonic() + timeout
        while len(seen) < expected:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"read {len(seen)} of {expected} labeled examples in {timeout:.0f} s")
            if proc.poll() is not None:
                raise BenchmarkError(f"the worker exited with {proc.returncode}")
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                if msg.error() is not None:
                    raise BenchmarkError(f"consuming {topic}: {msg.error()}")
                value = msg.value()
                if not first:
                    first = time.perf_counter()
                    pid = worker_pid(proc, profiled)
                    cpu_first = cpu_seconds(pid)
                if b'"flush-' in value[:64]:
                    continue
                total += 1
                # example_id is the first field of the JSON after schema_version and ts
                seen.add(value[: value.index(b'","impression_id"')])
            last = time.perf_counter()
        cpu_last = cpu_seconds(pid)
    finally:
        consumer.close()
    cpu = cpu_last - cpu_first if cpu_first is not None and cpu_last is not None else None
    return first, last, total - len(seen), cpu


def faust_floor(settings: KafkaSettings, n: int, partitions: int, batch: int) -> None:
    """Child mode: consume ``n`` events of the input topics with a do-nothing Faust agent.

    Prints one JSON line (events/s from the first batch to the last, CPU seconds) and exits.
    """
    import asyncio

    import faust

    app = faust.App(
        f"{settings.topic_prefix}faust-floor",
        broker=settings.faust_broker(),
        store="memory://",
        autodiscover=False,
        datadir=tempfile.mkdtemp(prefix="faust-floor-"),
        topic_partitions=partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=batch,
        stream_buffer_maxsize=max(4_096, 2 * batch),
        web_enabled=False,
    )
    inputs = app.topic(
        IMPRESSIONS.real_name(settings), CLICKS.real_name(settings),
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    )  # fmt: skip
    seen = {"n": 0, "t0": 0.0, "cpu0": 0.0}

    async def drop(stream: Any) -> None:
        async for events in stream.take_events(batch, within=0.05):
            if not seen["n"]:
                seen["t0"], seen["cpu0"] = time.perf_counter(), time.process_time()
            seen["n"] += len(events)
            if seen["n"] >= n:
                wall, cpu = time.perf_counter() - seen["t0"], time.process_time() - seen["cpu0"]
                print(json.dumps({"floor_eps": round(n / wall), "floor_events_per_cpu_s": round(n / cpu)}), flush=True)
                os._exit(0)
            await asyncio.sleep(0)

    app.agent(inputs, name="drop")(drop)
    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


def run_faust_floor(settings: KafkaSettings, n: int, partitions: int, batch: int) -> dict[str, Any]:
    env = {**os.environ, **kafka_env(settings)}
    cmd = [sys.executable, __file__, "--floor-child", settings.topic_prefix, str(n), str(partitions), str(batch)]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    # the Faust worker redirects stdout into its log: find the JSON line wherever it went
    found = re.findall(r'\{"floor_eps".*?\}', out.stdout + out.stderr)
    if not found:
        raise BenchmarkError(f"the Faust floor run failed: {out.stderr[-2000:]}")
    return json.loads(found[-1])


def run(settings: KafkaSettings, args: argparse.Namespace) -> dict[str, Any]:
    update: dict[str, Any] = {"topic_prefix": f"bench-{uuid.uuid4().hex[:8]}-"}
    if args.partitions:  # STREAMREC_PARTITIONS for the worker too (kafka_env)
        update["partitions"] = args.partitions
    bench = settings.model_copy(update=update)
    ensure_topics(bench, TOPICS, partitions=args.partitions)
    try:
        imps, clicks, expected = make_events(
            args.impressions, slate=args.slate, click_rate=args.click_rate, users=args.users, items=args.items
        )
        n_in = len(imps) + len(clicks)
        produce_s = produce_timed(bench, IMPRESSIONS.real_name(bench), imps)
        produce_s += produce_timed(bench, CLICKS.real_name(bench), clicks)
        with tempfile.TemporaryDirectory(prefix="join-bench-") as tmp:
            (metrics_port,) = free_ports(1)
            env = service_env(
                bench, "join", inherit=False, window_ms=WINDOW_MS,
                allowed_lateness_ms=1000, data_dir=tmp, batch_max=args.batch, metrics_port=metrics_port,
            )  # fmt: skip
            cmd = [sys.executable, "-m", SERVICE_MODULES["join"], "--log-level", args.worker_log_level]
            if args.profile:
                if not Path(sys.executable).with_name("py-spy").exists():
                    raise BenchmarkError("--profile needs py-spy in the venv: pip install py-spy")
                cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "100", "--nonblocking", "--threads", "-o", args.profile, "--format", "raw", "--", *cmd]
            with open(Path(tmp) / "worker.log", "wb") as out:
                started = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                try:
                    first, last, dupes, cpu = read_labeled(
                        bench, expected, proc, timeout=args.timeout, profiled=bool(args.profile)
                    )
                    counters = worker_counters(metrics_port)
                finally:
                    # py-spy writes its profile on SIGINT (and stops the worker)
                    proc.send_signal(signal.SIGINT if args.profile else signal.SIGTERM)
                    proc.wait(60)
            if dupes:
                log.warning("%d duplicate labeled records", dupes)
            # holes in the delivered offsets that the worker re-read (streams/offsets.py)
            worker_log = (Path(tmp) / "worker.log").read_text(errors="replace")
            holes = worker_log.count("re-reading from")
            if args.worker_log:
                Path(args.worker_log).write_text(worker_log)
        floor = run_faust_floor(bench, n_in, args.partitions or bench.partitions, args.batch)
        join_s = last - first
        result: dict[str, Any] = {
            "impressions": args.impressions,
            "clicks": len(clicks) - FLUSH_USERS,
            "input_events": n_in,
            "labeled": expected,
            "slate": args.slate,
            "partitions": args.partitions or bench.partitions,
            "produce_s": round(produce_s, 2),
            "worker_startup_s": round(first - started, 2),
            "join_s": round(join_s, 3),
            "input_eps": round(n_in / join_s),
            "labeled_rps": round(expected / join_s),
            # CPU the worker used while joining: load-independent on a shared machine
            "worker_cpu_s": round(cpu, 2) if cpu is not None else None,
            "input_events_per_worker_cpu_s": round(n_in / cpu) if cpu else None,
            "load_avg_1m": round(os.getloadavg()[0], 2),
            **floor,
            "ratio_to_faust_floor": round(n_in / join_s / floor["floor_eps"], 3),
            "input_holes_reread": holes,
            **counters,
        }
    finally:
        try:
            delete_topics(bench, TOPICS)
        except AdminError as exc:
            log.warning("could not delete the benchmark topics: %s", exc)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Impression-click join throughput of one worker.")
    parser.add_argument("--impressions", type=int, default=100_000)
    parser.add_argument("--slate", type=int, default=10, help="items per impression (labels per impression)")
    parser.add_argument("--click-rate", type=float, default=0.5, help="clicks per impression")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=1_682)
    parser.add_argument("--batch", type=int, default=2_000, help="STREAMREC_JOIN_BATCH_MAX")
    parser.add_argument("--partitions", type=int, default=None, help="default: $STREAMREC_PARTITIONS (4)")
    parser.add_argument("--raw-n", type=int, default=200_000, help="records for the raw broker rate")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--profile", metavar="FILE", help="run the worker under py-spy, write folded stacks (py-spy raw)")
    parser.add_argument("--worker-log", metavar="FILE", help="copy the worker's log there at the end")
    parser.add_argument("--worker-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--local", action="store_true", help="start a local jar broker")
    parser.add_argument("--floor-child", nargs=4, metavar=("PREFIX", "N", "PARTITIONS", "BATCH"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.floor_child:
        prefix, n, partitions, batch = args.floor_child
        floor_settings = load(KafkaSettings).model_copy(update={"topic_prefix": prefix})
        faust_floor(floor_settings, int(n), int(partitions), int(batch))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(f"{__name__}.librdkafka").setLevel(logging.ERROR)
    broker: LocalBroker | None = None
    try:
        settings = load(KafkaSettings)
        if args.local:
            broker = LocalBroker(partitions=args.partitions or settings.partitions).start()
            settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap})
        print(f"broker {settings.bootstrap_servers}: {args.impressions:,} impressions, slate {args.slate}")
        result = run(settings, args)
        raw = measure(settings, args.raw_n, partitions=args.partitions)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, AdminError, BenchmarkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.close()
    result["raw_consume_rps"] = raw["consume_rps"]
    result["raw_produce_rps"] = raw["produce_rps"]
    result["ratio_to_raw_consume"] = round(result["input_eps"] / raw["consume_rps"], 3)
    print(f"join:    {result['input_eps']:>10,} input events/s  ({result['labeled_rps']:,} labeled/s, "
          f"{result['input_events']:,} events in {result['join_s']} s)")
    if result["input_events_per_worker_cpu_s"]:
        print(f"cpu:     {result['input_events_per_worker_cpu_s']:>10,} input events per worker CPU-second "
              f"({result['worker_cpu_s']} s CPU, load average {result['load_avg_1m']})")
    print(f"floor:   {result['floor_eps']:>10,} events/s through a do-nothing Faust agent "
          f"({result['floor_events_per_cpu_s']:,} per CPU-second); join/floor = {result['ratio_to_faust_floor']}")
    print(f"holes:   {result['input_holes_reread']:>10,} holes in the delivered offsets re-read by the worker")
    print(f"worker:  {result['worker_events_applied']:>10,} events applied; skipped and read again: "
          f"{result['worker_replayed_skipped']:,} redelivered, {result['worker_stale_skipped']:,} fetched before "
          f"a re-read, {result['worker_deferred']:,} handed over while rebalancing")
    print(f"raw:     {raw['consume_rps']:>10,} records/s consumed (broker_throughput, same run)")
    print(f"ratio:   {result['ratio_to_raw_consume']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
