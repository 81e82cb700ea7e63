"""The whole pipeline on one machine, measured: used by ``make demo`` and the end-to-end test.

:func:`run_pipeline` starts the three services as processes (streams worker,
trainer, scoring agent), replays MovieLens-100k into ``items``,
``impressions`` and ``clicks``, sends recommendation requests for users who
are active in the replay while it runs, waits until the join has labeled
everything and the trainer has published a version that covers it, stops
the services, reads every output topic back, and returns a
:class:`PipelineReport`. Every figure in the report is computed from the
records of that run:

* labels: ``labeled`` read back and compared with the batch reference join;
* learning: the prequential metrics each published version carries, placed
  on the event-time axis by the newest example it had trained on;
* hit rate: a recommendation for user *u* requested at event time *T* is a
  hit when *u* clicks one of its items in a click produced after the
  recommendation (so the scorer cannot have seen it) with event time at most
  ``T + horizon``; requests whose user makes no such click are not counted;
* model vs fallback on the same requests: every measured request that a
  trained version answered is also answered the fallback's way, offline:
  :func:`fallback_hits` replays ``user-history`` with the serving agent's
  own code (:func:`serving.scoring.appended_items` into a
  :class:`serving.scoring.Popularity`, its half-life and history length) up
  to the recommendation's Kafka timestamp, ranks the catalog with
  :func:`serving.scoring.top_k`, and scores that top-k against the same
  later clicks; the report gives both hit rates on those requests and the
  standard error of their paired difference;
* bytes written per version kind: the manifests of the announced versions
  in the run's weight store (the demo keeps every version);
* guardrail refusals, by reason: counted in the trainer's log;
* freshness, per click: click produced → first published version whose
  trained-up-to offsets include the click's positive example → first
  recommendation scored by that version (Kafka message timestamps and the
  version's ``created_ts``: all wall clock, one machine).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from contract.records import (
    Click,
    Impression,
    Item,
    Labeled,
    ModelUpdate,
    Recommendation,
    RecRequest,
    UserHistory,
)
from contract.settings import KafkaSettings, load
from contract.topics import (
    CLICKS,
    DEAD_LETTERS,
    LABELED,
    MODEL_UPDATES,
    REC_REQUESTS,
    RECOMMENDATIONS,
    USER_HISTORY,
)
from infra.admin import ensure_topics
from infra.processes import Service, ServiceGroup
from serving.scoring import appended_items, top_k
from serving.settings import ServingSettings
from streams.join import reference_join
from streams.join_settings import JoinSettings
from streams.replay import ReplayEvent
from trainer.guardrail import Refusal
from trainer.popularity import Popularity
from trainer.service_settings import TrainerSettings
from trainer.weights import WeightsError, WeightStore

log = logging.getLogger(__name__)

DAY_MS = 86_400_000


@dataclass(frozen=True)
class PipelineConfig:
    """One run. Service settings not named here come from the environment (``STREAMREC_*``)."""

    out_dir: Path
    limit: int | None = None
    """Replay only the first N ratings (None: all 100,000)."""
    slate_size: int = 10
    seed: int = 0
    speed: float | None = None
    """Event-time speed-up of the replay (None: as fast as the broker takes it)."""
    requests_per_s: float = 20.0
    request_k: int = 10
    hit_horizon_ms: int = 7 * DAY_MS
    drain_timeout_s: float = 180.0
    """After the replay: longest wait for the labels and for a version covering them."""
    join_env: Mapping[str, str] = field(default_factory=dict)
    trainer_env: Mapping[str, str] = field(default_factory=dict)
    serving_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class PipelineReport:
    events: dict[str, int]
    labeled_positives: int
    labeled_negatives: int
    labeled_late: int
    labeled_duplicates: int
    labels_match_reference: bool
    reference_positives: int
    reference_negatives: int
    labels_missing: int
    labels_unexpected: int
    dead_letters: int
    versions: list[dict[str, Any]]
    versions_after_start: int
    requests_sent: int
    recommendations: int
    recommendations_by_version: dict[str, int]
    hit_rate: dict[str, float]
    hit_requests: dict[str, int]
    same_requests: SameRequests
    """Measured requests answered by trained versions, scored the fallback's way too."""
    version_bytes: dict[str, tuple[int, int]]
    """kind -> (versions, bytes of weights) of the announced versions whose manifest was readable."""
    versions_unreadable: int
    refusals: dict[str, int]
    """Guardrail refusals by reason (from the trainer's log)."""
    freshness_trained_s: list[float]
    freshness_served_s: list[float]
    clicks_total: int
    trainer_caught_up: bool
    labeled_rate: float
    """Labeled examples per second the join emitted, first to last (wall clock)."""
    trainer_rate: float
    """Labeled examples per second the trainer consumed, first to last published version."""
    elapsed_s: float
    plot: Path | None = None

    def percentiles(self, values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))

    def format(self) -> str:
        fr_t = self.percentiles(self.freshness_trained_s)
        fr_s = self.percentiles(self.freshness_served_s)
        last = self.versions[-1] if self.versions else {}
        lines = [
            "== streamrec pipeline report ==",
            f"events in:      {self.events.get('items', 0):,} items, {self.events.get('impressions', 0):,} "
            f"impressions, {self.events.get('clicks', 0):,} clicks",
            f"labeled:        {self.labeled_positives:,} positives, {self.labeled_negatives:,} negatives "
            f"({self.labeled_late:,} late, {self.labeled_duplicates:,} redelivered duplicates)",
            f"  vs reference: {'exact match' if self.labels_match_reference else 'MISMATCH'} "
            f"({self.reference_positives:,} + {self.reference_negatives:,} expected; "
            f"{self.labels_missing} missing, {self.labels_unexpected} unexpected)",
            f"dead letters:   {self.dead_letters:,}",
            f"versions:       {len(self.versions)} published"
            + (f", last v{last['version']} after {last['trained_examples']:,} trained examples" if last else "")
            + ("" if self.trainer_caught_up else " (trainer had NOT caught up with `labeled` at the end)"),
            "guardrail:      " + (", ".join(f"{n} refused ({r})" for r, n in self.refusals.items() if n)
                                  or "no candidate refused"),
        ]
        if not self.versions:
            lines.append("                no version was published: every candidate was refused, so the "
                         "popularity fallback served throughout")
        if self.version_bytes or self.versions_unreadable:
            parts = [f"{kind} {n} version{'s' if n != 1 else ''}, {b / 1e6:,.1f} MB "
                     f"({b / 1e6 / max(n, 1):,.1f} MB each)"
                     for kind, (n, b) in sorted(self.version_bytes.items())]
            lines.append("weights written: " + "; ".join(parts)
                         + (f" ({self.versions_unreadable} manifests unreadable)" if self.versions_unreadable else ""))
        if self.versions:
            lines.append("prequential metrics (as published, over event time):")
            lines.append(f"  {'version':>7} {'kind':>5} {'event time':>19} {'examples':>9} {'AUC(win)':>9} "
                         f"{'logloss(win)':>12} {'AUC(all)':>9} {'logloss(all)':>12} "
                         f"{'AUC(held)':>9} {'fallback(held)':>14}")
            step = max(1, len(self.versions) // 12)
            shown = self.versions[::step] + ([] if (len(self.versions) - 1) % step == 0 else self.versions[-1:])
            for v in shown:
                lines.append(
                    f"  {v['version']:>7} {v['kind']:>5} {_fmt_ts(v['event_ts']):>19} {v['trained_examples']:>9,} "
                    f"{_f(v['metrics'].get('prequential_window_auc')):>9} "
                    f"{_f(v['metrics'].get('prequential_window_log_loss')):>12} "
                    f"{_f(v['metrics'].get('prequential_cumulative_auc')):>9} "
                    f"{_f(v['metrics'].get('prequential_cumulative_log_loss')):>12} "
                    f"{_f(v['metrics'].get('holdout_auc')):>9} "
                    f"{_f(v['metrics'].get('holdout_fallback_auc')):>14}"
                )
        lines.append(
            f"recommendations: {self.recommendations:,} for {self.requests_sent:,} requests; "
            f"{self.recommendations_by_version.get('fallback', 0):,} by the popularity fallback, "
            f"{self.recommendations_by_version.get('model', 0):,} by trained versions"
        )
        lines.extend(self.same_requests.format())
        if self.hit_requests.get("fallback"):
            n = self.hit_requests["fallback"]
            p = self.hit_rate["fallback"]
            lines.append(
                f"  hit rate@k of the requests the fallback answered itself (no version live yet): "
                f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f} over {n:,} measured requests"
            )
        lines.append(
            f"throughput:     the join emitted {self.labeled_rate:,.0f} labeled/s; the trainer consumed "
            f"{self.trainer_rate:,.0f}/s (a trainer slower than the join builds a backlog, and the "
            "backlog is the freshness)"
        )
        lines.append(
            f"freshness:      click → first version trained on it: p50 {fr_t[0]:.1f} s, p99 {fr_t[1]:.1f} s "
            f"({len(self.freshness_trained_s):,} of {self.clicks_total:,} clicks)"
        )
        lines.append(
            f"                click → first recommendation by that version: p50 {fr_s[0]:.1f} s, "
            f"p99 {fr_s[1]:.1f} s ({len(self.freshness_served_s):,} clicks)"
        )
        if self.plot:
            lines.append(f"plot:           {self.plot}")
        lines.append(f"elapsed:        {self.elapsed_s:.0f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class SameRequests:
    """Hit rates of the model and of the fallback on the same measured requests."""

    k: int
    model_hits: list[bool]
    fallback_hits: list[bool]

    @property
    def n(self) -> int:
        return len(self.model_hits)

    def rates(self) -> dict[str, float]:
        """model / fallback hit rates, their standard errors, and the paired difference's."""
        n = self.n
        if n == 0:
            return {}
        m = np.asarray(self.model_hits, dtype=np.float64)
        f = np.asarray(self.fallback_hits, dtype=np.float64)
        d = m - f
        return {
            "model": float(m.mean()), "model_se": float(math.sqrt(m.mean() * (1 - m.mean()) / n)),
            "fallback": float(f.mean()), "fallback_se": float(math.sqrt(f.mean() * (1 - f.mean()) / n)),
            "diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        }

    def format(self) -> list[str]:
        if not self.n:
            return ["  hit rate@k: no measured request was answered by a trained version"]
        r = self.rates()
        return [
            f"  hit rate@{self.k} on the same {self.n:,} measured requests answered by trained versions "
            "(the fallback's top-k recomputed per request from the clicks serving had seen):",
            f"    model {r['model']:.3f} ± {r['model_se']:.3f}, popularity fallback {r['fallback']:.3f} ± "
            f"{r['fallback_se']:.3f}; model − fallback {r['diff']:+.3f} ± {r['diff_se']:.3f} (paired se)",
        ]


def fallback_hits(
    requests: Iterable[tuple[int, int, set[str]]],
    history: Iterable[tuple[int, UserHistory]],
    catalog: list[str],
    *,
    half_life_s: float,
    history_len: int,
) -> list[bool]:
    """Whether the popularity fallback's top-k would have hit, per request.

    ``requests``: (Kafka timestamp of the recommendation, k, items the user
    clicked later); ``history``: ``user-history`` records with their Kafka
    timestamps.  Popularity is rebuilt exactly as the serving agent builds it
    (:class:`serving.scoring.Popularity` fed by
    :func:`serving.scoring.appended_items`) from the records produced up to
    each recommendation, and the catalog ranked by :func:`serving.scoring.top_k`
    (ties to the smaller item_id).  Answers in the order of ``requests``.
    """
    reqs = sorted(enumerate(requests), key=lambda e: e[1][0])
    hist = sorted(history, key=lambda h: h[0])
    pop = Popularity(half_life_s)
    users: dict[str, tuple[str, ...]] = {}
    out: dict[int, bool] = {}
    j = 0
    for idx, (wall, k, later) in reqs:
        while j < len(hist) and hist[j][0] <= wall:
            rec = hist[j][1]
            old = users.get(rec.user_id, ())
            pop.add(appended_items(old, rec.items, history_len), rec.ts)
            users[rec.user_id] = tuple(rec.items[-history_len:])
            j += 1
        ranked = top_k(pop.vector(catalog), catalog, k)
        out[idx] = any(catalog[i] in later for i in ranked)
    return [out[i] for i in range(len(out))]


def version_sizes(store: WeightStore, versions: Iterable[int]) -> tuple[dict[str, tuple[int, int]], int]:
    """kind -> (count, bytes) over the manifests of some versions, and how many could not be read."""
    sizes: dict[str, tuple[int, int]] = {}
    missing = 0
    for v in versions:
        try:
            man = store.manifest(v)
        except (WeightsError, OSError):
            missing += 1
            continue
        n, b = sizes.get(man.kind, (0, 0))
        sizes[man.kind] = (n + 1, b + man.size)
    return sizes, missing


_REFUSAL_LINE = re.compile(r"guardrail refused the candidate .*?\(reason=([a-z_]+)\)")


def refusals_in_log(text: str) -> dict[str, int]:
    """Guardrail refusals by reason, counted in a trainer log."""
    counts = {r.value: 0 for r in Refusal}
    for m in _REFUSAL_LINE.finditer(text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def _f(x: Any) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _fmt_ts(ms: int | None) -> str:
    return "—" if not ms else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


# --- reading topics back -------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes


class TopicCollector:
    """Reads whole topics (all partitions, from the beginning) in a background thread."""

    def __init__(self, settings: KafkaSettings, topics: Iterable[str]) -> None:
        self.topics = list(topics)
        self.messages: dict[str, list[Msg]] = {t: [] for t in self.topics}
        self._settings = settings
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> TopicCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def snapshot(self, topic: str) -> list[Msg]:
        with self._lock:
            return list(self.messages[topic])

    def _run(self) -> None:
        consumer = Consumer(self._settings.confluent_config(**{
            "group.id": f"pipeline-report-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }))
        try:
            md = consumer.list_topics(timeout=30)
            consumer.assign([
                TopicPartition(t, p, OFFSET_BEGINNING) for t in self.topics for p in md.topics[t].partitions
            ])
            while not self._stop.is_set():
                batch = consumer.consume(num_messages=5000, timeout=0.2)
                with self._lock:
                    for m in batch:
                        if m.error() is None:
                            self.messages[m.topic()].append(
                                Msg(m.partition(), m.offset(), m.timestamp()[1], m.value() or b"")
                            )
        except BaseException as exc:  # surfaced by the caller
            self.error = exc
            log.exception("topic collector failed")
        finally:
            consumer.close()


def high_watermarks(settings: KafkaSettings, topic: str) -> dict[int, int]:
    consumer = Consumer(settings.confluent_config(**{"group.id": f"hw-{uuid.uuid4().hex}"}))
    try:
        md = consumer.list_topics(topic, timeout=30)
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in md.topics[topic].partitions
        }
    finally:
        consumer.close()


def committed_offsets(settings: KafkaSettings, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    """The offsets ``group`` has committed on ``topic`` (without joining the group)."""
    consumer = Consumer(settings.confluent_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


# --- requests while the replay runs ----------------------------------------------------------


class ReplayTracker:
    """Follows the replay as it is produced: the current event time and the recently active users."""

    def __init__(self, recent: int = 500) -> None:
        self.event_ts = 0
        self.users: deque[str] = deque(maxlen=recent)
        self.done = threading.Event()
        self.stop = threading.Event()

    def wrap(self, events: Iterable[ReplayEvent]) -> Iterator[ReplayEvent]:
        for spec, rec in events:
            if self.stop.is_set():  # the run is being torn down: end the stream early
                return
            if isinstance(rec, Impression):
                self.event_ts = rec.ts
                self.users.append(rec.user_id)
            yield spec, rec


@contextmanager
def _stopping(tracker: ReplayTracker) -> Iterator[ReplayTracker]:
    try:
        yield tracker
    finally:
        tracker.stop.set()


@contextmanager
def _running(requester: Requester) -> Iterator[Requester]:
    requester.start()
    try:
        yield requester
    finally:
        requester.stop()


class Requester(threading.Thread):
    """Sends ``rec-requests`` for active users at a steady rate, stamped with the replay's event time."""

    def __init__(self, settings: KafkaSettings, tracker: ReplayTracker, *, rate: float, k: int, seed: int) -> None:
        super().__init__(name="requester", daemon=True)
        self.settings, self.tracker, self.rate, self.k = settings, tracker, rate, k
        self.rng = random.Random(seed)
        self.sent: dict[str, tuple[str, int]] = {}  # request_id -> (user_id, event ts)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=30)

    def run(self) -> None:
        producer = Producer(self.settings.producer_config(**{"linger.ms": 5}))
        topic = REC_REQUESTS.real_name(self.settings)
        n = 0
        try:
            while not self.stop_event.wait(1.0 / self.rate):
                if not self.tracker.users:
                    continue
                user = self.rng.choice(self.tracker.users)
                n += 1
                req = RecRequest(request_id=f"req-{n}", user_id=user, k=self.k, ts=self.tracker.event_ts)
                producer.produce(topic, key=req.kafka_key(), value=req.to_json())
                self.sent[req.request_id] = (user, req.ts)
                producer.poll(0)
        except BaseException as exc:
            self.error = exc
            log.exception("requester failed")
        finally:
            producer.flush(30)


# --- the run -----------------------------------------------------------------------------------


def service_env(settings: KafkaSettings, cfg: PipelineConfig) -> dict[str, str]:
    """The environment of every service: this one's, plus where the broker and topics are."""
    env = dict(os.environ)
    env.update({
        "STREAMREC_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "STREAMREC_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMREC_PARTITIONS": str(settings.partitions),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def run_pipeline(settings: KafkaSettings, cfg: PipelineConfig, *, progress: bool = True) -> PipelineReport:
    from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig
    from streams.replay.producer import produce

    started = time.monotonic()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    replay = MovieLensReplay.from_path(
        None, MovieLensReplayConfig(limit=cfg.limit, seed=cfg.seed, slate_size=cfg.slate_size)
    )
    impressions: list[Impression] = []
    clicks: list[Click] = []
    catalog: dict[str, None] = {}
    for _, rec in replay.stream():
        if isinstance(rec, Impression):
            impressions.append(rec)
        elif isinstance(rec, Click):
            clicks.append(rec)
        elif isinstance(rec, Item):
            catalog[rec.item_id] = None
    join = load(JoinSettings, **{k.removeprefix("STREAMREC_JOIN_").lower(): v for k, v in cfg.join_env.items()})
    reference = reference_join(impressions, clicks, window_ms=join.window_ms, history_length=join.history_length)
    expected = reference.pairs()

    services = [
        Service("worker", "streams.worker", {
            "STREAMREC_JOIN_DATA_DIR": str(cfg.out_dir / "join-state"), **cfg.join_env,
        }),
        Service("trainer", "trainer", {
            "STREAMREC_TRAINER_WEIGHTS_ROOT": str(cfg.out_dir / "weights"),
            "STREAMREC_TRAINER_CHECKPOINT_DIR": str(cfg.out_dir / "trainer"),
            "STREAMREC_TRAINER_METRICS_PORT": "0",
            **cfg.trainer_env,
        }),
        Service("serving", "serving", {
            "STREAMREC_SERVING_WEIGHTS_ROOT": str(cfg.out_dir / "weights"),
            **cfg.serving_env,
        }),
    ]
    topics = {spec.name: spec.real_name(settings) for spec in (
        LABELED, MODEL_UPDATES, RECOMMENDATIONS, DEAD_LETTERS, CLICKS, USER_HISTORY)}
    tracker = ReplayTracker()
    requester = Requester(settings, tracker, rate=cfg.requests_per_s, k=cfg.request_k, seed=cfg.seed)
    group = ServiceGroup(services, log_dir=cfg.out_dir / "logs", env=service_env(settings, cfg))
    result: dict[str, Any] = {}
    with group, TopicCollector(settings, topics.values()) as collector, _running(requester), _stopping(tracker):

        def replay_thread() -> None:
            try:
                result["produced"] = produce(tracker.wrap(replay.stream()), settings, speed=cfg.speed,
                                             total=len(replay), progress=progress)
            except BaseException as exc:
                result["error"] = exc
            finally:
                tracker.done.set()

        t = threading.Thread(target=replay_thread, name="replay", daemon=True)
        t.start()
        while not tracker.done.wait(1.0):
            group.check()
        if "error" in result:
            raise result["error"]
        log.info("replay done; waiting for the join to label everything")

        # 1. the join has emitted every expected example
        deadline = time.monotonic() + cfg.drain_timeout_s
        while time.monotonic() < deadline:
            group.check()
            got = {_pair(m) for m in collector.snapshot(topics["labeled"])}
            if expected <= got:
                break
            time.sleep(1.0)
        else:
            log.warning("the join did not label everything within %.0f s", cfg.drain_timeout_s)

        # 2. the trainer has consumed all of `labeled` (its committed offsets, written after each
        #    checkpoint). The newest version may not cover the very end, and there may be none: the
        #    guardrail may refuse candidates (a first one that does not beat the popularity fallback).
        labeled_end = high_watermarks(settings, topics["labeled"])
        trainer_group = cfg.trainer_env.get(
            "STREAMREC_TRAINER_GROUP_ID",
            os.environ.get("STREAMREC_TRAINER_GROUP_ID", TrainerSettings.model_fields["group_id"].default),
        )
        caught_up = False
        while time.monotonic() < deadline:
            group.check()
            done = committed_offsets(settings, trainer_group, topics["labeled"], labeled_end)
            if all(done.get(p, 0) >= end for p, end in labeled_end.items()):
                caught_up = True
                break
            time.sleep(1.0)
        else:
            log.warning("the trainer had not caught up with `labeled` within the drain timeout")

        # 3. the newest version has answered requests (the requester keeps going meanwhile)
        ups = [ModelUpdate.from_json(m.value) for m in collector.snapshot(topics["model-updates"])]
        if ups:
            newest = str(ups[-1].version)
            serve_deadline = time.monotonic() + 30
            while time.monotonic() < serve_deadline:
                group.check()
                if any(_rec(m).model_version == newest for m in collector.snapshot(topics["recommendations"])):
                    break
                time.sleep(0.5)
        requester.stop()
        # let the last requests be answered before the services stop
        answered_deadline = time.monotonic() + 30
        while time.monotonic() < answered_deadline:
            if len(collector.snapshot(topics["recommendations"])) >= len(requester.sent):
                break
            time.sleep(0.5)
        group.check()
    for what in (requester.error, collector.error):
        if what is not None:
            raise what

    trainer_log = cfg.out_dir / "logs" / "trainer.log"
    report = _report(
        cfg, collector, topics, reference, requester.sent,
        result["produced"].counts, caught_up, time.monotonic() - started,
        catalog=list(catalog),
        refusals=refusals_in_log(trainer_log.read_text(errors="replace")) if trainer_log.exists() else {},
    )
    try:
        report.plot = plot_report(report, cfg.out_dir / "pipeline.png")
    except Exception:  # the numbers are the result; a plotting failure must not hide them
        log.exception("writing the plot failed")
    return report


def _serving_settings(cfg: PipelineConfig) -> ServingSettings:
    """The scoring agent's settings in this run (the environment plus the run's serving_env)."""
    prefix = "STREAMREC_SERVING_"
    return load(ServingSettings, **{k.removeprefix(prefix).lower(): v for k, v in cfg.serving_env.items()})


def _pair(m: Msg) -> tuple[str, int]:
    rec = Labeled.from_json(m.value)
    return rec.example_id, rec.label


def _rec(m: Msg) -> Recommendation:
    return Recommendation.from_json(m.value)


def _report(
    cfg: PipelineConfig,
    collector: TopicCollector,
    topics: Mapping[str, str],
    reference: Any,
    sent: Mapping[str, tuple[str, int]],
    produced: Mapping[str, int],
    caught_up: bool,
    elapsed: float,
    *,
    catalog: list[str],
    refusals: dict[str, int],
) -> PipelineReport:
    labeled_msgs = collector.snapshot(topics["labeled"])
    labeled = [(m, Labeled.from_json(m.value)) for m in labeled_msgs]
    first: dict[str, tuple[Msg, Labeled]] = {}
    for m, rec in labeled:
        first.setdefault(rec.example_id, (m, rec))
    got_pairs = {(rec.example_id, rec.label) for _, rec in first.values()}
    expected = reference.pairs()

    updates = [ModelUpdate.from_json(m.value) for m in collector.snapshot(topics["model-updates"])]
    updates.sort(key=lambda u: u.version)
    # the newest labeled event time each version had consumed, to place its metrics on the event-time axis
    by_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for m, rec in labeled:
        by_partition[m.partition].append((m.offset, rec.label_ts))
    for lst in by_partition.values():
        lst.sort()
    versions = []
    for u in updates:
        ev = 0
        for p, lst in by_partition.items():
            end = u.source_offsets.get(f"{topics['labeled']}:{p}", 0)
            upto = [ts for off, ts in lst if off < end]
            if upto:
                ev = max(ev, max(upto))
        versions.append({"version": u.version, "kind": u.kind, "created_ts": u.created_ts, "event_ts": ev,
                         "trained_examples": u.trained_examples, "metrics": dict(u.metrics)})

    recs = [(m, _rec(m)) for m in collector.snapshot(topics["recommendations"])]
    by_version: dict[str, int] = defaultdict(int)
    first_served: dict[str, int] = {}
    for m, r in recs:
        kind = "fallback" if r.model_version.startswith("fallback") else "model"
        by_version[kind] += 1
        if kind == "model":
            first_served[r.model_version] = min(first_served.get(r.model_version, m.timestamp_ms), m.timestamp_ms)

    # hit rate: a click by the same user on a recommended item, produced after the recommendation
    # (wall clock: the scorer cannot have seen it) and within the horizon of the request's event time
    click_msgs = collector.snapshot(topics["clicks"])
    clicks_by_user: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for m in click_msgs:
        c = Click.from_json(m.value)
        clicks_by_user[c.user_id].append((c.ts, c.item_id, m.timestamp_ms))
    hits: dict[str, int] = defaultdict(int)
    counted: dict[str, int] = defaultdict(int)
    by_model: list[tuple[int, int, set[str]]] = []
    model_hits: list[bool] = []
    for rm, r in recs:
        if r.request_id not in sent:
            continue
        user, t0 = sent[r.request_id]
        later = {
            item for ts, item, wall in clicks_by_user.get(user, ())
            if wall > rm.timestamp_ms and ts <= t0 + cfg.hit_horizon_ms
        }
        if not later:
            continue
        kind = "fallback" if r.model_version.startswith("fallback") else "model"
        hit = any(i.item_id in later for i in r.items)
        for path in (kind, "all"):
            counted[path] += 1
            hits[path] += hit
        if kind == "model":
            by_model.append((rm.timestamp_ms, len(r.items), later))
            model_hits.append(hit)
    serving = _serving_settings(cfg)
    history = [(m.timestamp_ms, UserHistory.from_json(m.value)) for m in collector.snapshot(topics["user-history"])
               if m.value]
    same = SameRequests(
        k=cfg.request_k, model_hits=model_hits,
        fallback_hits=fallback_hits(by_model, history, catalog, half_life_s=serving.popularity_half_life_s,
                                    history_len=serving.history_len),
    )
    sizes, unreadable = version_sizes(WeightStore(cfg.out_dir / "weights"), [u.version for u in updates])

    # freshness: click produced -> first version covering its positive -> first recommendation by it
    click_wall: dict[str, int] = {}
    for m in click_msgs:
        c = Click.from_json(m.value)
        click_wall.setdefault(f"{c.impression_id}:{c.item_id}", m.timestamp_ms)
    fresh_trained: list[float] = []
    fresh_served: list[float] = []
    for eid, (m, rec) in first.items():
        if rec.label != 1 or eid not in click_wall:
            continue
        key = f"{topics['labeled']}:{m.partition}"
        v = next((u for u in updates if u.source_offsets.get(key, 0) > m.offset), None)
        if v is None:
            continue
        fresh_trained.append(max(0.0, (v.created_ts - click_wall[eid]) / 1000))
        served = first_served.get(str(v.version))
        if served is not None:
            fresh_served.append(max(0.0, (served - click_wall[eid]) / 1000))

    start_ms = min((m.timestamp_ms for m in click_msgs), default=0)
    label_times = [m.timestamp_ms for m in labeled_msgs]
    labeled_rate = (
        len(label_times) / ((max(label_times) - min(label_times)) / 1000)
        if len(label_times) > 1 and max(label_times) > min(label_times) else 0.0
    )
    consumed = [sum(u.source_offsets.values()) for u in updates]
    span_s = (updates[-1].created_ts - updates[0].created_ts) / 1000 if len(updates) > 1 else 0.0
    trainer_rate = (consumed[-1] - consumed[0]) / span_s if span_s > 0 else 0.0
    return PipelineReport(
        events=dict(produced),
        labeled_positives=sum(1 for _, r in first.values() if r.label == 1),
        labeled_negatives=sum(1 for _, r in first.values() if r.label == 0),
        labeled_late=sum(1 for _, r in first.values() if r.late),
        labeled_duplicates=len(labeled) - len(first),
        labels_match_reference=got_pairs == expected,
        reference_positives=len(reference.positives()),
        reference_negatives=len(reference.negatives()),
        labels_missing=len(expected - got_pairs),
        labels_unexpected=len(got_pairs - expected),
        dead_letters=len(collector.snapshot(topics["dead-letters"])),
        versions=versions,
        versions_after_start=sum(1 for u in updates if u.created_ts >= start_ms),
        requests_sent=len(sent),
        recommendations=len(recs),
        recommendations_by_version=dict(by_version),
        hit_rate={p: hits[p] / counted[p] for p in counted},
        hit_requests=dict(counted),
        same_requests=same,
        version_bytes=sizes,
        versions_unreadable=unreadable,
        refusals=refusals,
        freshness_trained_s=fresh_trained,
        freshness_served_s=fresh_served,
        clicks_total=len(click_wall),
        trainer_caught_up=caught_up,
        labeled_rate=labeled_rate,
        trainer_rate=trainer_rate,
        elapsed_s=elapsed,
    )


def plot_report(report: PipelineReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    vs = [v for v in report.versions if v["event_ts"]]
    days = [(v["event_ts"] - vs[0]["event_ts"]) / DAY_MS for v in vs] if vs else []
    for key, label in (("prequential_window_auc", "AUC (sliding window)"),
                       ("prequential_cumulative_auc", "AUC (cumulative)")):
        axes[0].plot(days, [v["metrics"].get(key, np.nan) for v in vs], marker=".", label=label)
    axes[0].set(title="prequential AUC over event time", xlabel="event time (days)", ylabel="AUC")
    axes[0].legend()
    for key, label in (("prequential_window_log_loss", "log loss (sliding window)"),
                       ("prequential_cumulative_log_loss", "log loss (cumulative)")):
        axes[1].plot(days, [v["metrics"].get(key, np.nan) for v in vs], marker=".", label=label)
    axes[1].set(title="prequential log loss over event time", xlabel="event time (days)", ylabel="log loss")
    axes[1].legend()
    for values, label in ((report.freshness_trained_s, "click → version trained on it"),
                          (report.freshness_served_s, "click → first recommendation by it")):
        if values:
            xs = np.sort(values)
            axes[2].plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    axes[2].set(title="freshness (CDF over clicks)", xlabel="seconds", ylabel="fraction of clicks")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
