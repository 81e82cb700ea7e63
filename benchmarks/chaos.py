"""Chaos run: the whole pipeline on a MovieLens slice while its parts are killed and fed garbage.

    python benchmarks/chaos.py [--limit 10000] [--seed 0] [--local | --no-local] [--replay-s 180]

Starts a local broker on free ports (``--local``, the default; ``--no-local`` uses
``$STREAMREC_BOOTSTRAP_SERVERS``, skips the broker restart and leaves the run's topics there), creates
the topics under a per-run prefix, and starts the join worker, the trainer and the scoring agent as processes, as
``make demo`` does (:func:`harness.pipeline.pipeline_services`), each with its own app and group
ids, state under one temporary folder, and a signing key shared by the trainer and serving.
It replays the first ``--limit`` MovieLens ratings (:mod:`streams.replay`) paced so that the
replay takes about ``--replay-s`` seconds, sends recommendation requests for active users
(:class:`harness.live.Requester`), and on a schedule drawn from ``--seed``:

* SIGKILLs the join worker, the trainer and the scoring agent ``--kills`` times each and starts
  each again a few seconds later; a kill waits until its service is working (the worker has
  recovered its state, the trainer has written a checkpoint since it started, the agent answers)
  and ``--min-uptime-s`` more, so that each kill tests a resume rather than a start-up;
* restarts the broker once (controlled stop, then start on the same data directory and port);
* from a point on, sends every click through a *lagging clicks producer*: a second producer that
  sends each click a few seconds of wall clock (hours of event time at the replay's speed-up)
  after the replay would have.  The lag stays below the join's idle timeout: a clicks stream
  silent for longer stops holding the watermark back by design (DESIGN.md §3.1);
* pauses the replay for a moment and injects a burst of bad and odd input into the input topics
  with a raw confluent-kafka producer (:func:`benchmarks.chaos_inputs.burst`);
* once the trainer has published a full version, writes three forged copies of it and announces
  them on ``model-updates``: unsigned and wrongly signed inside the weight store, and correctly
  signed outside it (:func:`benchmarks.chaos_inputs.forge_versions`).

A service that exits without being killed by the schedule is a *crash*: counted, its log tail
kept, and started again.  After the replay the run waits for the join to label every valid input
(or to stop making progress), for the trainer to consume all of ``labeled`` and for every request
to be answered, stops the services (SIGTERM), and prints (:mod:`benchmarks.chaos_figures`):

* labels vs the batch reference join over the valid inputs (MovieLens plus the valid injected
  records): missing and unexpected ``(example_id, label)`` pairs, example ids whose label set
  flipped, and which chaos action preceded each wrong label;
* examples trained more than once in the trainer's final lineage (its trained-ids log, which a
  restart rolls back to the checkpoint), and those trained in work a SIGKILL threw away;
* requests answered 0 times and more than once; dead letters by source and reason; whether each
  injected bad record was dead-lettered; forged versions served (must be 0) and why serving refused
  them; crashes; wall time.

The last line is JSON with all of these.  Logs, weights, checkpoints and the trained-ids log stay
in the run's folder (printed) for inspection.  Figures depend on the machine: the schedule is in
seconds of wall clock, and a slow machine sees fewer events between two actions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.chaos_figures import (  # noqa: E402
    by_run_time,
    dead_letter_reasons,
    dead_lettered_requests,
    decode_dead_letters,
    injected_accounting,
    label_figures,
    longest_gap,
    request_figures,
    trained_figures,
    version_figures,
)
from benchmarks.chaos_inputs import (  # noqa: E402
    Expect,
    Forged,
    Injected,
    burst,
    forge_versions,
    join_event,
    join_input,
    send_raw,
    valid_request,
)
from contract.errors import StreamrecError  # noqa: E402
from contract.records import Click, Impression, Item, Labeled, ModelUpdate  # noqa: E402
from contract.settings import KafkaSettings, default_cache_dir, load  # noqa: E402
from contract.topics import CLICKS, DEAD_LETTERS, LABELED, MODEL_UPDATES, RECOMMENDATIONS  # noqa: E402
from harness.live import (  # noqa: E402
    ReplayTracker,
    Requester,
    TopicCollector,
    committed_offsets,
    high_watermarks,
)
from harness.pipeline import PipelineConfig, pipeline_services  # noqa: E402
from infra.admin import ensure_topics  # noqa: E402
from infra.broker import LIBRDKAFKA_LOGGER, BrokerError, LocalBroker  # noqa: E402
from infra.kafka import KafkaProducer  # noqa: E402
from infra.processes import Service, ServiceGroup, log_tail  # noqa: E402
from serving.settings import FALLBACK_VERSION  # noqa: E402
from streams.join import reference_join  # noqa: E402
from streams.join_settings import JoinSettings  # noqa: E402
from streams.replay import ReplayEvent  # noqa: E402
from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig  # noqa: E402
from streams.replay.producer import produce  # noqa: E402
from trainer.weights import WeightStore  # noqa: E402

log = logging.getLogger("chaos")

SERVICES = ("worker", "trainer", "serving")
READY_MARKERS = {"worker": b"Worker ready", "trainer": b"checkpoint (", "serving": b"ready in"}
"""The log line that says a service is working: the worker has recovered its state (Faust), the trainer
has written a checkpoint since its start, the agent has started answering.  A kill waits for it (and
``--min-uptime-s`` more), so that it tests a resume rather than a start-up: a trainer killed before
its first checkpoint only starts over."""
NOT_READY_KILL_S = 120.0
"""A service that has not logged its ready line this long after its start is killed anyway."""
CRASH_RESTART_S = 2.0
MAX_CRASH_RESTARTS = 5
"""A service that crashes more often than this is left down (the run goes on and says so)."""
STALL_S = 60.0
"""The drain stops waiting for labels when none arrived for this long."""


# --- the schedule ------------------------------------------------------------------------------------


@dataclass
class Action:
    at_s: float
    """Seconds after the replay started."""
    what: str
    """kill, broker, burst, lag or forge."""
    target: str = ""
    param: float = 0.0
    """kill: seconds until the restart; lag: the lag in seconds."""
    postponed: bool = False


def spread(rng: random.Random, n: int, lo: float, hi: float, min_gap: float) -> list[float]:
    """``n`` sorted uniform draws in [lo, hi], redrawn until no two are closer than ``min_gap``."""
    for _ in range(1000):
        times = sorted(rng.uniform(lo, hi) for _ in range(n))
        if all(b - a >= min_gap for a, b in zip(times, times[1:], strict=False)):
            return times
    step = (hi - lo) / max(n, 1)
    return [lo + step * (i + rng.random() * 0.5) for i in range(n)]


def make_schedule(rng: random.Random, replay_s: float, kills: int) -> list[Action]:
    """The run's chaos, in seconds after the replay started (``replay_s``: its expected length)."""
    r = replay_s
    acts = []
    for name in SERVICES:
        for t in spread(rng, kills, 0.08 * r, 0.95 * r, min_gap=0.15 * r):
            acts.append(Action(t, "kill", name, rng.uniform(0.5, 5.0)))
    acts.append(Action(rng.uniform(0.35, 0.75) * r, "broker"))
    acts.append(Action(rng.uniform(0.10, 0.30) * r, "burst"))  # before the lag: its clicks must not overtake it
    acts.append(Action(rng.uniform(0.40, 0.60) * r, "lag", param=rng.uniform(3.0, 8.0)))
    acts.append(Action(rng.uniform(0.30, 0.90) * r, "forge"))
    return sorted(acts, key=lambda a: a.at_s)


# --- the replay with a lagging clicks producer ------------------------------------------------------


class ChaosReplay:
    """The replay's events, with a pause (for the burst) and, once ``lag_s`` is set, clicks diverted."""

    def __init__(self, events: list[ReplayEvent]) -> None:
        self.events = events
        self.pause_requested = threading.Event()
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.lag_s: float | None = None
        self.queue: deque[tuple[float, Click]] = deque()
        self.lagged = 0
        self.yielded = 0
        self.max_ts = 0
        self.last_impression: Impression | None = None
        self.done = threading.Event()

    def stream(self) -> Iterator[ReplayEvent]:
        for spec, rec in self.events:
            if self.pause_requested.is_set():
                self.paused.set()
                self.resume.wait()
                self.paused.clear()
            if self.lag_s is not None and spec is CLICKS and isinstance(rec, Click):
                self.queue.append((time.monotonic() + self.lag_s, rec))
                self.lagged += 1
                continue
            self.yielded += 1
            self.max_ts = max(self.max_ts, rec.ts)
            if isinstance(rec, Impression):
                self.last_impression = rec
            yield spec, rec

    @contextlib.contextmanager
    def paused_replay(self, timeout: float = 10.0) -> Iterator[bool]:
        """Hold the replay between two events; yields whether it is held (False: it had ended, or did
        not reach its next event within ``timeout``)."""
        self.resume.clear()
        self.pause_requested.set()
        held = False
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self.done.is_set():
                if self.paused.wait(0.1):
                    held = True
                    break
            yield held
        finally:
            self.pause_requested.clear()
            self.resume.set()  # also releases a replay that paused just after the timeout


class LaggingClicks(threading.Thread):
    """The second clicks producer: sends each diverted click when its lag has passed."""

    def __init__(self, settings: KafkaSettings, replay: ChaosReplay) -> None:
        super().__init__(name="lagging-clicks", daemon=True)
        self.settings, self.replay = settings, replay
        self.stop_event = threading.Event()
        self.sent = self.acked = 0
        self.failed: list[str] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            producer = KafkaProducer.create(self.settings, "chaos-lagging-clicks")
            topic = CLICKS.real_name(self.settings)

            def delivered(err: Any, _msg: Any) -> None:
                if err is None:
                    self.acked += 1
                elif len(self.failed) < 5:
                    self.failed.append(str(err))

            q = self.replay.queue
            while not self.stop_event.is_set():
                if q:
                    due, click = q[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        producer.poll(min(wait, 0.05))
                        continue
                    q.popleft()
                    failure = producer.send(topic, click.to_json(), click.kafka_key(), on_delivery=delivered)
                    if failure is not None:
                        self.failed.append(str(failure))
                    self.sent += 1
                    producer.poll(0)
                elif self.replay.done.is_set():
                    break
                else:
                    producer.poll(0.05)
            left = producer.barrier(120).undelivered
            if left:
                self.failed.append(f"{left} lagged click(s) unacknowledged after 120 s")
        except BaseException as exc:
            self.error = exc
            log.exception("the lagging clicks producer failed")
        finally:
            self.finished.set()


# --- the services under the schedule -------------------------------------------------------------------


@dataclass
class Crash:
    service: str
    at_s: float
    returncode: int | None
    tail: str


@dataclass
class Supervisor:
    """Kills, restarts and watches the services; tells a crash from a kill of the schedule."""

    services: dict[str, Service]
    log_dir: Path
    ids_log: Path
    t0: float
    timeline: list[tuple[int, str]]
    started: dict[str, float] = field(default_factory=dict)
    ready_at: dict[str, float | None] = field(default_factory=dict)
    log_offset: dict[str, int] = field(default_factory=dict)
    scan_pos: dict[str, int] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)
    given_up: set[str] = field(default_factory=set)
    trainer_deaths: list[tuple[bytes, int]] = field(default_factory=list)
    """Per death of the trainer: its trained-ids log then, and where its log file stood at the restart."""

    def __post_init__(self) -> None:
        now = time.monotonic()
        self.started = dict.fromkeys(self.services, now)
        self.ready_at = dict.fromkeys(self.services)
        self.log_offset = dict.fromkeys(self.services, 0)

    def note(self, what: str) -> None:
        self.timeline.append((int(time.time() * 1000), what))

    def up_for(self, name: str) -> tuple[float, float | None] | None:
        """(seconds since the start, seconds since its ready line or None), or None when it is down."""
        svc = self.services[name]
        if name in self.pending or not svc.alive():
            return None
        now = time.monotonic()
        self._scan_ready(name)
        ready = self.ready_at[name]
        return now - self.started[name], None if ready is None else now - ready

    def _scan_ready(self, name: str) -> None:
        """Look for the ready line in what the service logged since the last look."""
        svc = self.services[name]
        if self.ready_at[name] is not None or svc.log_path is None or not svc.log_path.exists():
            return
        marker = READY_MARKERS[name]
        with open(svc.log_path, "rb") as f:
            f.seek(max(self.log_offset[name], self.scan_pos.get(name, 0) - len(marker)))
            chunk = f.read()
            self.scan_pos[name] = f.tell()
        if marker in chunk:
            self.ready_at[name] = time.monotonic()
            log.info("%s is ready %.1f s after its start", name, self.ready_at[name] - self.started[name])

    def kill(self, name: str, restart_after_s: float) -> None:
        svc = self.services[name]
        svc.kill()
        self.kills[name] += 1
        self.note(f"SIGKILL {name}")
        self._died(name)
        self.pending[name] = time.monotonic() + restart_after_s
        log.info("SIGKILLed %s (kill %d); restart in %.1f s", name, self.kills[name], restart_after_s)

    def _died(self, name: str) -> None:
        if name == "trainer":
            ids = self.ids_log.read_bytes() if self.ids_log.exists() else b""
            self.trainer_deaths.append((ids, -1))

    def _start(self, name: str) -> None:
        svc = self.services[name]
        size = svc.log_path.stat().st_size if svc.log_path and svc.log_path.exists() else 0
        if name == "trainer" and self.trainer_deaths and self.trainer_deaths[-1][1] < 0:
            self.trainer_deaths[-1] = (self.trainer_deaths[-1][0], size)
        svc.start(self.log_dir)
        self.started[name] = time.monotonic()
        self.ready_at[name] = None
        self.log_offset[name] = self.scan_pos[name] = size
        self.pending.pop(name, None)
        self.note(f"restart {name}")

    def poll(self) -> None:
        now = time.monotonic()
        for name, svc in self.services.items():
            if name in self.pending:
                if now >= self.pending[name]:
                    self._start(name)
                continue
            if name in self.given_up or svc.proc is None:
                continue
            if svc.alive():
                self._scan_ready(name)
                continue
            tail = log_tail(svc.log_path, 12) if svc.log_path else ""
            crash = Crash(name, now - self.t0, svc.proc.returncode, tail)
            self.crashes.append(crash)
            self.note(f"CRASH {name}")
            self._died(name)
            log.error("CRASH: %s exited with code %s without being killed; last lines of its log:\n%s",
                      name, svc.proc.returncode, tail)  # fmt: skip
            if sum(c.service == name for c in self.crashes) > MAX_CRASH_RESTARTS:
                log.error("%s crashed more than %d times: left down", name, MAX_CRASH_RESTARTS)
                self.given_up.add(name)
            else:
                self.pending[name] = now + CRASH_RESTART_S

    def all_up(self) -> bool:
        return not self.pending and all(s.alive() for n, s in self.services.items() if n not in self.given_up)

    def down(self) -> list[str]:
        return [n for n, s in self.services.items() if n in self.pending or not s.alive()]


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class RunState:
    burst_rng: random.Random
    min_uptime_s: float
    injected: list[Injected] = field(default_factory=list)
    forged: list[Forged] = field(default_factory=list)
    forged_sent: list[Injected] = field(default_factory=list)
    broker_down_s: float | None = None
    broker_note: str = ""
    burst_at_s: float | None = None
    burst_thread: threading.Thread | None = None
    burst_error: BaseException | None = None
    lag_at_s: float | None = None
    lag_s: float | None = None
    forge_at_s: float | None = None
    forge_note: str = ""
    caught_up: dict[str, bool] = field(default_factory=dict)
    final_rc: dict[str, int | None] = field(default_factory=dict)
    clean_stop: dict[str, bool] = field(default_factory=dict)


@contextlib.contextmanager
def broker_for(local: bool) -> Iterator[tuple[LocalBroker | None, str]]:
    if not local:
        bootstrap = os.environ.get("STREAMREC_BOOTSTRAP_SERVERS", "").strip()
        if not bootstrap:
            raise StreamrecError("--no-local needs $STREAMREC_BOOTSTRAP_SERVERS")
        yield None, bootstrap
        return
    broker = LocalBroker(port=0, partitions=4)
    broker.start()
    try:
        yield broker, broker.bootstrap
    finally:
        broker.close()


def git_state() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha} + uncommitted changes in {len(dirty)} file(s)" if dirty else sha


class Labels:
    """``labeled`` decoded as it arrives: the (example_id, label) pairs seen so far."""

    def __init__(self) -> None:
        self.pairs: set[tuple[str, int]] = set()
        self.seen = 0
        self.last_change = time.monotonic()

    def update(self, msgs: list[Any]) -> None:
        for m in msgs[self.seen:]:
            with contextlib.suppress(Exception):
                rec = Labeled.from_json(m.value)
                self.pairs.add((rec.example_id, rec.label))
        if len(msgs) > self.seen:
            self.last_change = time.monotonic()
        self.seen = len(msgs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    rng = random.Random(args.seed)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-s{args.seed}"
    prefix = f"chaos-{run_id}-"
    root = default_cache_dir() / "chaos"
    root.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=root))
    out_dir.mkdir(parents=True, exist_ok=True)
    git = git_state()

    replay = MovieLensReplay.from_path(None, MovieLensReplayConfig(limit=args.limit, seed=args.seed,
                                                                  slate_size=args.slate_size))  # fmt: skip
    events = list(replay.stream())
    impressions = [r for _, r in events if isinstance(r, Impression)]
    clicks = [r for _, r in events if isinstance(r, Click)]
    movies = [r.item_id for _, r in events if isinstance(r, Item)]
    span_ms = max(r.ts for _, r in events) - min(r.ts for _, r in events)
    speed = args.speed or max(span_ms / 1000 / args.replay_s, 1.0)
    replay_s = span_ms / 1000 / speed
    schedule = make_schedule(rng, replay_s, args.kills)

    signing_key = f"chaos-{run_id}-key"
    trainer_group = f"{prefix}trainer"
    encoder = {"encoder_layers": args.encoder_layers} if args.encoder_layers else {}
    cfg = PipelineConfig(
        out_dir=out_dir, limit=args.limit, slate_size=args.slate_size, seed=args.seed, speed=speed,
        join={"app_id": f"chaos-{run_id}"},
        trainer={"group_id": trainer_group, "signing_key": signing_key,
                 "trained_ids_log": out_dir / "trained-ids.log", **encoder},
        serving={"group_id": f"{prefix}serving", "signing_key": signing_key},
    )  # fmt: skip
    join_settings = load(JoinSettings, **cfg.join)
    state = RunState(burst_rng=random.Random(rng.random()), min_uptime_s=args.min_uptime_s)
    timeline: list[tuple[int, str]] = []

    print(f"chaos run {run_id}: git {git}; state, logs and weights in {out_dir}")
    print(f"input: {args.limit:,} ratings -> {len(movies):,} items, {len(impressions):,} impressions, "
          f"{len(clicks):,} clicks at {speed:,.0f}x event time (replay ~{replay_s:.0f} s)")  # fmt: skip
    for a in schedule:
        print(f"  schedule t={a.at_s:6.1f} s  {a.what} {a.target}"
              + (f" (restart after {a.param:.1f} s)" if a.what == "kill" else "")
              + (f" (lag {a.param:.1f} s)" if a.what == "lag" else ""))  # fmt: skip
    sys.stdout.flush()

    with broker_for(args.local) as (broker, bootstrap):
        settings = load(KafkaSettings, bootstrap_servers=bootstrap, topic_prefix=prefix)
        ensure_topics(settings)
        topics = {spec.name: spec.real_name(settings) for spec in (LABELED, RECOMMENDATIONS, MODEL_UPDATES,
                                                                   DEAD_LETTERS)}  # fmt: skip
        services = pipeline_services(settings, cfg)
        tracker = ReplayTracker()
        requester = Requester(settings, tracker, rate=args.requests_per_s, k=10, seed=args.seed)
        chaos = ChaosReplay(events)
        lagger = LaggingClicks(settings, chaos)
        collector = TopicCollector(settings, topics.values())
        group = ServiceGroup(services, log_dir=out_dir / "logs")
        with contextlib.ExitStack() as stack:
            stack.enter_context(collector)
            stack.callback(time.sleep, 3.0)  # after the services stop: their last records reach the collector
            stack.enter_context(group)
            stack.callback(tracker.stop.set)
            stack.callback(lagger.stop_event.set)
            stack.callback(requester.stop)
            sup = Supervisor({s.name: s for s in services}, out_dir / "logs", out_dir / "trained-ids.log",
                             time.monotonic(), timeline)  # fmt: skip
            requester.start()
            replay_error: list[BaseException] = []

            def replay_thread() -> None:
                try:
                    produce(tracker.wrap(chaos.stream()), settings, speed=speed, total=len(events), progress=False)
                except BaseException as exc:
                    replay_error.append(exc)
                    log.exception("the replay failed")
                finally:
                    chaos.done.set()
                    tracker.done.set()

            t0 = time.monotonic()
            sup.t0 = t0
            timeline.append((int(time.time() * 1000), "replay start"))
            threading.Thread(target=replay_thread, name="replay", daemon=True).start()
            lagger.start()
            labels = Labels()
            _chaos_loop(args, schedule, sup, chaos, broker, settings, collector, topics, labels, state,
                        movies=movies, out_dir=out_dir, signing_key=signing_key, t0=t0,
                        skew_ms=join_settings.max_future_skew_ms)  # fmt: skip
            if replay_error:
                raise replay_error[0]
            timeline.append((int(time.time() * 1000), "replay and lag done"))
            _drain(args, sup, settings, collector, topics, labels, state, requester, chaos, impressions, clicks,
                   trainer_group=trainer_group, join_settings=join_settings, t0=t0)  # fmt: skip
            requester.stop()
            for s in reversed(services):  # as the group stops them: the agent, the trainer, the worker
                state.clean_stop[s.name] = s.stop(30.0)
                state.final_rc[s.name] = s.proc.returncode if s.proc is not None else None
        for what in (requester.error, collector.error, lagger.error):
            if what is not None:
                raise what
        wall_s = time.monotonic() - started
        return _figures(args, state, sup, collector, topics, prefix, chaos, lagger, impressions, clicks,
                        join_settings, requester, out_dir, timeline, speed=speed, replay_s=replay_s,
                        wall_s=wall_s, git=git, run_id=run_id)  # fmt: skip


def _chaos_loop(
    args: argparse.Namespace, schedule: list[Action], sup: Supervisor, chaos: ChaosReplay,
    broker: LocalBroker | None, settings: KafkaSettings, collector: TopicCollector, topics: dict[str, str],
    labels: Labels, state: RunState, *, movies: list[str], out_dir: Path, signing_key: str, t0: float,
    skew_ms: int,
) -> None:  # fmt: skip
    """Carry out the schedule while the replay runs; return once it is done and the lag has drained."""
    pending = deque(schedule)
    next_progress = 0.0
    forge_deadline: float | None = None
    while True:
        now = time.monotonic() - t0
        while pending and pending[0].at_s <= now:
            act = pending.popleft()
            later = _act(act, now, sup, chaos, broker, settings, state, movies=movies, out_dir=out_dir,
                         signing_key=signing_key, skew_ms=skew_ms)  # fmt: skip
            if later is not None:
                act.at_s = later
                pending = deque(sorted([*pending, act], key=lambda a: a.at_s))
        sup.poll()
        if now >= next_progress:
            _progress(now, sup, chaos, collector, topics, labels)
            next_progress = now + 15.0
        if state.burst_error is not None:
            raise state.burst_error
        burst_busy = state.burst_thread is not None and state.burst_thread.is_alive()
        replay_over = chaos.done.is_set() and not chaos.queue and not burst_busy
        if replay_over and all(a.what == "forge" for a in pending):
            if not pending:
                return
            forge_deadline = forge_deadline or time.monotonic() + args.drain_timeout
            if time.monotonic() > forge_deadline:
                state.forge_note = "no full version was published to forge from"
                log.warning("forging skipped: %s", state.forge_note)
                return
        time.sleep(0.2)


def _act(
    act: Action, now: float, sup: Supervisor, chaos: ChaosReplay, broker: LocalBroker | None,
    settings: KafkaSettings, state: RunState, *, movies: list[str], out_dir: Path, signing_key: str, skew_ms: int,
) -> float | None:  # fmt: skip
    """Do one action; a time to do it again instead when it cannot be done now."""
    if act.what == "kill":
        up = sup.up_for(act.target)
        if up is None:
            if not act.postponed:
                log.info("kill of %s postponed: it is down", act.target)
            act.postponed = True
            return now + 2.0
        since_start, since_ready = up
        if (since_ready is None or since_ready < state.min_uptime_s) and since_start < NOT_READY_KILL_S:
            wait = 2.0 if since_ready is None else state.min_uptime_s - since_ready
            if not act.postponed:
                log.info("kill of %s postponed (%s)", act.target,
                         "not ready yet" if since_ready is None else f"ready for {since_ready:.0f} s")  # fmt: skip
            act.postponed = True
            return now + max(wait, 1.0)
        if since_ready is None:
            log.warning("%s has not logged that it is ready %.0f s after its start: killing it anyway",
                        act.target, since_start)  # fmt: skip
        sup.kill(act.target, act.param)
    elif act.what == "broker":
        if broker is None:
            state.broker_note = "skipped (--no-local: not this run's broker)"
            log.info("broker restart %s", state.broker_note)
            return None
        log.info("restarting the broker (controlled stop, then start on the same data and port)")
        sup.note("broker stop")
        down = time.monotonic()
        broker.stop()
        sup.poll()
        broker.start()
        state.broker_down_s = time.monotonic() - down
        sup.note("broker up")
        log.info("broker back on %s after %.1f s down", broker.bootstrap, state.broker_down_s)
    elif act.what == "burst":
        if state.burst_thread is None:
            state.burst_at_s = now
            sup.note("bad-input burst")
            state.burst_thread = threading.Thread(target=_burst, args=(state, chaos, settings, movies, skew_ms),
                                                  name="burst", daemon=True)  # fmt: skip
            state.burst_thread.start()
    elif act.what == "lag":
        chaos.lag_s = act.param
        state.lag_at_s, state.lag_s = now, act.param
        sup.note("lagging clicks from here")
        log.info("clicks from now on through the lagging producer, %.1f s behind", act.param)
    elif act.what == "forge":
        forged = forge_versions(out_dir / "weights", out_dir / "foreign-store", signing_key.encode())
        if not forged:
            return now + 5.0
        state.forged = forged
        state.forge_at_s = now
        sup.note("forged announcements")
        state.forged_sent = send_raw(settings, [
            Injected(f.kind, "model-updates", f.update.kafka_key(), f.update.to_json(), Expect.NO_EFFECT,
                     timestamp_ms=int(time.time() * 1000))
            for f in forged
        ])  # fmt: skip
        log.info("forged versions announced: %s", ", ".join(f"v{f.version} ({f.kind})" for f in forged))
    return None


def _burst(state: RunState, chaos: ChaosReplay, settings: KafkaSettings, movies: list[str], skew_ms: int) -> None:
    """The bad-input burst (in its own thread).  First what moves no watermark (the catalog, invalid
    records, requests, the trainer's and serving's inputs); then, with the replay held still for a
    moment, the valid impressions and clicks, stamped just after the newest event time produced."""
    try:
        rng_state = state.burst_rng.getstate()
        first = burst(state.burst_rng, event_ts=chaos.max_ts, movies=movies, last_impression=chaos.last_impression,
                      kafka_ts_ms=int(time.time() * 1000))  # fmt: skip
        sent = send_raw(settings, [r for r in first if join_event(r, skew_ms) is None])
        began = time.monotonic()
        with chaos.paused_replay() as held:
            time.sleep(0.3)  # the replay's last records leave its producer (linger 20 ms)
            state.burst_rng.setstate(rng_state)  # the same records, stamped after what the replay has produced
            again = burst(state.burst_rng, event_ts=chaos.max_ts, movies=movies,
                          last_impression=chaos.last_impression, kafka_ts_ms=int(time.time() * 1000))  # fmt: skip
            sent += send_raw(settings, [r for r in again if join_event(r, skew_ms) is not None])
        held_s = time.monotonic() - began
        state.injected = sent
        log.info("bad-input burst: %d records (%d landed); the replay held still %.1f s for the %d valid join "
                 "events%s", len(sent), sum(i.landed for i in sent), held_s,
                 sum(join_event(r, skew_ms) is not None for r in sent), "" if held else " (it had ended)")  # fmt: skip
    except BaseException as exc:
        state.burst_error = exc
        log.exception("the bad-input burst failed")


def _progress(
    now: float, sup: Supervisor, chaos: ChaosReplay, collector: TopicCollector, topics: dict[str, str],
    labels: Labels,
) -> None:  # fmt: skip
    labels.update(collector.snapshot(topics["labeled"]))
    versions = set()
    for m in collector.snapshot(topics["model-updates"]):
        with contextlib.suppress(Exception):
            versions.add(ModelUpdate.from_json(m.value).version)
    done = chaos.yielded + chaos.lagged
    log.info("t=%4.0f s  replay %3.0f%% (lagged clicks queued %d)  labeled %s records  versions announced %d%s  "
             "recommendations %d  dead letters %d  down: %s",
             now, 100 * done / max(len(chaos.events), 1), len(chaos.queue), f"{labels.seen:,}", len(versions),
             f" (newest v{max(versions)})" if versions else "", len(collector.snapshot(topics["recommendations"])),
             len(collector.snapshot(topics["dead-letters"])), ", ".join(sup.down()) or "none")  # fmt: skip


def _expected(
    state: RunState, impressions: list[Impression], clicks: list[Click], join_settings: JoinSettings
) -> tuple[list[Impression], list[Click]]:
    imps, clks = list(impressions), list(clicks)
    for inj in state.injected:
        rec = join_input(inj, join_settings.max_future_skew_ms)
        if isinstance(rec, Impression):
            imps.append(rec)
        elif isinstance(rec, Click):
            clks.append(rec)
    return imps, clks


def _drain(
    args: argparse.Namespace, sup: Supervisor, settings: KafkaSettings, collector: TopicCollector,
    topics: dict[str, str], labels: Labels, state: RunState, requester: Requester, chaos: ChaosReplay,
    impressions: list[Impression], clicks: list[Click], *, trainer_group: str, join_settings: JoinSettings,
    t0: float,
) -> None:  # fmt: skip
    """Wait for every service to be up, the labels, the trainer, the answers (each bounded)."""
    deadline = time.monotonic() + 60
    while not sup.all_up() and time.monotonic() < deadline:
        sup.poll()
        time.sleep(0.2)
    imps, clks = _expected(state, impressions, clicks, join_settings)
    expected = reference_join(imps, clks, window_ms=join_settings.window_ms,
                              history_length=join_settings.history_length).pairs()  # fmt: skip
    log.info("replay done; waiting for the join to label %s expected pairs", f"{len(expected):,}")
    deadline = time.monotonic() + args.drain_timeout
    state.caught_up["labels"] = False
    next_progress = time.monotonic() + 15
    while time.monotonic() < deadline:
        sup.poll()
        labels.update(collector.snapshot(topics["labeled"]))
        if expected <= labels.pairs:
            state.caught_up["labels"] = True
            break
        if time.monotonic() - labels.last_change > STALL_S:
            log.warning("no labeled record for %.0f s: %s expected pairs still missing; not waiting longer",
                        STALL_S, f"{len(expected - labels.pairs):,}")  # fmt: skip
            break
        if time.monotonic() >= next_progress:
            _progress(time.monotonic() - t0, sup, chaos, collector, topics, labels)
            next_progress = time.monotonic() + 15
        time.sleep(1.0)
    log.info("waiting for the trainer to consume all of labeled")
    state.caught_up["trainer"] = False
    ends = high_watermarks(settings, topics["labeled"])
    while time.monotonic() < deadline:
        sup.poll()
        done = committed_offsets(settings, trainer_group, topics["labeled"], ends)
        if all(done.get(p, 0) >= end for p, end in ends.items()):
            state.caught_up["trainer"] = True
            break
        time.sleep(1.0)
    requester.stop()
    sup.note("requests stopped")
    wanted = set(requester.sent) | {r.request_id for i in state.injected if (r := valid_request(i))}
    log.info("waiting for the answers to %d requests", len(wanted))
    state.caught_up["answers"] = False
    answers_deadline = time.monotonic() + 60
    while time.monotonic() < answers_deadline:
        sup.poll()
        got = set()
        for m in collector.snapshot(topics["recommendations"]):
            with contextlib.suppress(Exception):
                got.add(json.loads(m.value)["request_id"])
        if wanted <= got:
            state.caught_up["answers"] = True
            break
        time.sleep(1.0)
    sup.poll()


def _figures(
    args: argparse.Namespace, state: RunState, sup: Supervisor, collector: TopicCollector, topics: dict[str, str],
    prefix: str, chaos: ChaosReplay, lagger: LaggingClicks, impressions: list[Impression], clicks: list[Click],
    join_settings: JoinSettings, requester: Requester, out_dir: Path, timeline: list[tuple[int, str]], *,
    speed: float, replay_s: float, wall_s: float, git: str, run_id: str,
) -> dict[str, Any]:  # fmt: skip
    labeled = collector.snapshot(topics["labeled"])
    recs = collector.snapshot(topics["recommendations"])
    dls, dl_bad = decode_dead_letters(collector.snapshot(topics["dead-letters"]))
    imps, clks = _expected(state, impressions, clicks, join_settings)
    reference = reference_join(imps, clks, window_ms=join_settings.window_ms,
                               history_length=join_settings.history_length)  # fmt: skip
    kinds = {}
    for inj in state.injected:
        rec = join_input(inj, join_settings.max_future_skew_ms)
        if isinstance(rec, Impression):
            kinds[rec.impression_id] = inj.kind
    lf = label_figures(labeled, reference, kinds)
    start_ms = next((ms for ms, what in timeline if what == "replay start"), 0)
    requests_end = next((ms for ms, what in timeline if what == "requests stopped"), int(time.time() * 1000))
    gap_s, gap_at = longest_gap(recs, start_ms, requests_end)
    wrong_when = by_run_time((ts for _, ts in lf.wrong_at), start_ms)
    events = [f"{(ms - start_ms) / 1000:.0f} {what}" for ms, what in timeline if what != "replay start"]

    ids_path = out_dir / "trained-ids.log"
    trainer_log = (out_dir / "logs" / "trainer.log").read_bytes() if (out_dir / "logs" / "trainer.log").exists() else b""
    starts = [off for _, off in sup.trainer_deaths]
    kills = []
    for i, (at_death, off) in enumerate(sup.trainer_deaths):
        if off < 0:
            continue
        end = next((o for o in starts[i + 1:] if o >= 0), len(trainer_log))
        kills.append((at_death, trainer_log[off:end]))
    tf = trained_figures(ids_path.read_bytes() if ids_path.exists() else b"", labeled, kills)

    injected_requests = {r.request_id for i in state.injected if (r := valid_request(i))}
    dead_reqs = dead_lettered_requests(state.injected, dls, prefix)
    rf = request_figures(recs, set(requester.sent) | injected_requests, dead_reqs)
    reasons = dead_letter_reasons(dls, prefix)
    inj = injected_accounting(state.injected, dls, prefix)
    serving_log = (out_dir / "logs" / "serving.log").read_text(errors="replace") \
        if (out_dir / "logs" / "serving.log").exists() else ""  # fmt: skip
    vf = version_figures(collector.snapshot(topics["model-updates"]), recs, [f.version for f in state.forged],
                         serving_log, FALLBACK_VERSION)  # fmt: skip
    try:
        store_versions = WeightStore(str(out_dir / "weights")).versions()
    except Exception:  # the figures must print even when the store cannot be listed
        store_versions = []

    lines = [f"== streamrec chaos run {run_id} (seed {args.seed}) ==", f"git: {git}; folder {out_dir}"]
    lines.append(
        f"input: {args.limit:,} ratings, {len(impressions):,} impressions, {len(clicks):,} clicks at {speed:,.0f}x "
        f"(replay ~{replay_s:.0f} s); lagging clicks producer "
        + (f"from t={state.lag_at_s:.0f} s, {state.lag_s:.1f} s behind ({state.lag_s * speed / 3600:,.1f} h of event "
           f"time): {chaos.lagged:,} clicks, {lagger.acked:,} acknowledged" if state.lag_at_s is not None else "not started")
    )  # fmt: skip
    crash_count = Counter(c.service for c in sup.crashes)
    lines.append(
        "chaos: SIGKILL " + ", ".join(f"{n} {sup.kills[n]}x" for n in SERVICES)
        + "; broker restart " + (f"1x ({state.broker_down_s:.1f} s down)" if state.broker_down_s is not None
                                 else state.broker_note or "not done")
        + f"; bad-input burst {len(state.injected)} records"
        + (f" at t={state.burst_at_s:.0f} s" if state.burst_at_s is not None else "")
        + f"; forged versions {len(state.forged)}" + (f" at t={state.forge_at_s:.0f} s" if state.forge_at_s else "")
        + (f" ({state.forge_note})" if state.forge_note else "")
    )  # fmt: skip
    lines.append(
        f"labels vs the reference over the valid inputs ({lf.expected_pairs:,} pairs expected, {lf.got_pairs:,} "
        f"emitted in {lf.records:,} records): missing {lf.missing:,}, unexpected {lf.unexpected:,}, flipped "
        f"{lf.flipped:,} example ids (re-emitted duplicates {lf.reemitted:,}, late positives {lf.late:,}, "
        f"undecodable {lf.undecodable})"
    )  # fmt: skip
    for pattern, n in lf.patterns.most_common(8):
        lines.append(f"    {n:>7,}  {pattern}")
    if lf.by_impression_kind:
        lines.append("    by impression: " + ", ".join(f"{k} {n:,}" for k, n in lf.by_impression_kind.most_common()))
    if wrong_when:
        lines.append("    wrong labels by when they were emitted (s of the run): "
                     + ", ".join(f"{k}: {n:,}" for k, n in wrong_when.items()))
    if lf.wrong_partitions:
        lines.append("    wrong labels by labeled partition: "
                     + ", ".join(f"{p}: {n:,}" for p, n in sorted(lf.wrong_partitions.items())))
    lines.append("    timeline (s of the run): " + ", ".join(events))
    for s in lf.samples[:5]:
        lines.append(f"    e.g. {s}")
    lines.append(
        f"training: {tf.trained:,} examples trained and {tf.held_back:,} held back in the final lineage; trained more "
        f"than once there: {tf.more_than_once:,} ({tf.examples_more_than_once:,} example ids); trained in work a kill "
        f"rolled back (redone): {tf.rolled_back:,} (per trainer restart: {tf.rollbacks}); real versions announced "
        f"{vf.announced_real} (newest v{vf.newest_real}), {len(store_versions)} in the store; version offset "
        f"regressions {vf.offset_regressions}"
    )  # fmt: skip
    lines.append(
        f"requests: {rf.sent:,} valid sent; answered 0 times {rf.answered_0:,}, once {rf.answered_once:,}, more than "
        f"once {rf.answered_more:,} ({rf.extra_answers:,} extra answers); dead-lettered instead {rf.dead_lettered}; "
        f"answers to unknown ids {rf.unknown_answers}"
        + (f"; e.g. unanswered {rf.unanswered_samples}" if rf.unanswered_samples else "")
    )  # fmt: skip
    lines.append(f"dead letters: {len(dls):,} ({dl_bad} undecodable)")
    for reason, n in reasons.most_common(25):
        lines.append(f"    {n:>6,}  {reason}")
    if len(reasons) > 25:
        lines.append(f"    ... {len(reasons) - 25} more reasons (JSON)")
    lines.append(
        f"injected: {inj.injected} records ({len(inj.not_landed)} refused by the client or broker"
        + (f": {inj.not_landed}" if inj.not_landed else "")
        + f"); {inj.must_dead_letter} must be dead-lettered: {inj.dead_lettered} were"
        + (f", not: {inj.not_dead_lettered}" if inj.not_dead_lettered else "")
        + (f"; valid but dead-lettered: {inj.valid_but_dead_lettered}" if inj.valid_but_dead_lettered else "")
    )  # fmt: skip
    lines.append(
        f"forged versions: {len(state.forged)} announced ({', '.join(f'v{f.version} {f.kind}' for f in state.forged)}); "
        f"FORGED SERVED: {vf.forged_served} recommendations (unknown versions served: {vf.unknown_served}); "
        "serving refused them: " + "; ".join(
            f"v{v} " + (", ".join(f"{k} x{n}" for k, n in Counter(r).items()) if r else "never attempted")
            for v, r in sorted(vf.refusals.items()))
    )  # fmt: skip
    lines.append("answers by: " + ", ".join(f"{k} {n:,}" for k, n in vf.served_by.most_common())
                 + f"; longest stretch without an answer while requests were sent: {gap_s:.0f} s (from t={gap_at:.0f} s)")
    lines.append(f"crashes: {len(sup.crashes)}" + (" (" + ", ".join(f"{k} {n}" for k, n in crash_count.items()) + ")"
                                                  if sup.crashes else ""))  # fmt: skip
    for c in sup.crashes[:6]:
        last = [ln for ln in c.tail.splitlines() if ln.strip()][-3:]
        lines.append(f"    {c.service} at t={c.at_s:.0f} s, exit {c.returncode}: " + " | ".join(x[:200] for x in last))
    lines.append("final stop (SIGTERM): " + ", ".join(
        f"{n} exit {state.final_rc.get(n)}{'' if state.clean_stop.get(n, True) else ' (killed after the timeout)'}"
        for n in SERVICES))  # fmt: skip
    lines.append("caught up: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in state.caught_up.items()))
    lines.append(f"wall time: {wall_s:.0f} s")
    print()
    print("\n".join(lines))
    return {
        "run": run_id, "seed": args.seed, "limit": args.limit, "speed": round(speed, 1), "git": git,
        "labels": lf.as_dict(), "wrong_labels_by_run_s": wrong_when, "timeline": events,
        "trained_more_than_once": tf.more_than_once, "trained_in_rolled_back_work": tf.rolled_back,
        "training": tf.as_dict(),
        "requests": rf.as_dict(),
        "dead_letters": {"total": len(dls), "undecodable": dl_bad, "by_reason": dict(reasons.most_common())},
        "injected": inj.as_dict(),
        "versions": vf.as_dict(), "forged_served": vf.forged_served, "longest_answer_gap_s": round(gap_s, 1),
        "kills": dict(sup.kills), "broker_restarts": int(state.broker_down_s is not None),
        "broker_down_s": None if state.broker_down_s is None else round(state.broker_down_s, 1),
        "lagged_clicks": chaos.lagged, "lag_s": state.lag_s,
        "crashes": len(sup.crashes), "crashes_by_service": dict(crash_count),
        "final_exit_codes": state.final_rc, "caught_up": state.caught_up,
        "wall_s": round(wall_s, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/chaos.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=10_000, help="MovieLens ratings replayed (default 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schedule, the burst, the slates, the requests")
    parser.add_argument("--local", action=argparse.BooleanOptionalAction, default=True,
                        help="start a local broker (default); --no-local uses $STREAMREC_BOOTSTRAP_SERVERS")
    parser.add_argument("--replay-s", type=float, default=180.0, help="wall seconds the replay should take (sets the speed)")
    parser.add_argument("--speed", type=float, default=None, help="event-time speed-up (overrides --replay-s)")
    parser.add_argument("--slate-size", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of each service (default 3)")
    parser.add_argument("--min-uptime-s", type=float, default=15.0,
                        help="a kill waits until its service has been working this long (default 15)")
    parser.add_argument("--requests-per-s", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="after the replay, longest wait for the labels and the trainer (s)")
    parser.add_argument("--encoder-layers", type=int, default=None,
                        help="keep only the first N encoder layers (default: the whole offline encoder)")
    parser.add_argument("--out", default=None, help="the run's folder (default: a new one under <cache>/chaos)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in (LIBRDKAFKA_LOGGER, "infra.kafka.librdkafka", "chaos.raw.librdkafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        result = run(args)
    except (StreamrecError, BrokerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: services and broker stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
