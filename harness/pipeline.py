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
  :func:`~harness.pipeline_figures.fallback_hits` replays ``user-history`` with the serving agent's
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

The run is here; :mod:`harness.live` reads the topics back and sends the
requests while it goes on, :mod:`harness.pipeline_figures` computes the
figures and :mod:`harness.pipeline_report` prints and plots them.
"""


from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.records import Click, Impression, Item, ModelUpdate, Recommendation
from contract.settings import KafkaSettings, load
from contract.topics import (
    CLICKS,
    DEAD_LETTERS,
    LABELED,
    MODEL_UPDATES,
    RECOMMENDATIONS,
    USER_HISTORY,
)
from harness.live import (
    ReplayTracker,
    Requester,
    TopicCollector,
    committed_offsets,
    high_watermarks,
    running,
    stopping,
)
from harness.pipeline_figures import (
    Reference,
    RunRecords,
    build_report,
    labeled_pair,
    refusals_in_log,
)
from harness.pipeline_report import DAY_MS, PipelineReport, plot_report
from infra.admin import ensure_topics
from infra.processes import Service, ServiceGroup, service_env
from serving.settings import ServingSettings
from streams.join import reference_join
from streams.join_settings import JoinSettings
from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig
from streams.replay.producer import ProduceResult, produce
from trainer.service_settings import TrainerSettings

log = logging.getLogger(__name__)

COLLECTED = (LABELED, MODEL_UPDATES, RECOMMENDATIONS, DEAD_LETTERS, CLICKS, USER_HISTORY)
"""The topics read back for the report."""


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
    join: Mapping[str, Any] = field(default_factory=dict)
    """Settings of the streams worker by field name (``idle_timeout_s=3`` is ``STREAMREC_JOIN_IDLE_TIMEOUT_S``)."""
    trainer: Mapping[str, Any] = field(default_factory=dict)
    """Settings of the trainer by field name (``STREAMREC_TRAINER_*``)."""
    serving: Mapping[str, Any] = field(default_factory=dict)
    """Settings of the scoring agent by field name (``STREAMREC_SERVING_*``)."""


@dataclass(frozen=True)
class Replay:
    """The replay of a run, and what it must give: the catalog and the batch reference join."""

    replay: MovieLensReplay
    catalog: list[str]
    reference: Reference
    """:func:`streams.join.reference_join` of the replay's impressions and clicks."""


def load_replay(cfg: PipelineConfig) -> Replay:
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
    join = load(JoinSettings, **cfg.join)
    reference = reference_join(impressions, clicks, window_ms=join.window_ms, history_length=join.history_length)
    return Replay(replay, list(catalog), reference)


def pipeline_services(settings: KafkaSettings, cfg: PipelineConfig) -> list[Service]:
    """The streams worker, the trainer and the scoring agent of a run, their state under ``cfg.out_dir``."""
    weights = cfg.out_dir / "weights"
    join = {"data_dir": cfg.out_dir / "join-state", **cfg.join}
    trainer = {"weights_root": weights, "checkpoint_dir": cfg.out_dir / "trainer", "metrics_port": 0, **cfg.trainer}
    serving = {"weights_root": weights, **cfg.serving}
    return [
        Service.of("join", service_env(settings, "join", **join), name="worker"),
        Service.of("trainer", service_env(settings, "trainer", **trainer)),
        Service.of("serving", service_env(settings, "serving", **serving)),
    ]


def run_pipeline(settings: KafkaSettings, cfg: PipelineConfig, *, progress: bool = True) -> PipelineReport:
    started = time.monotonic()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    replay = load_replay(cfg)
    services = pipeline_services(settings, cfg)
    trainer_group = services[1].env.get(
        "STREAMREC_TRAINER_GROUP_ID", TrainerSettings.model_fields["group_id"].default
    )
    topics = {spec.name: spec.real_name(settings) for spec in COLLECTED}
    tracker = ReplayTracker()
    requester = Requester(settings, tracker, rate=cfg.requests_per_s, k=cfg.request_k, seed=cfg.seed)
    group = ServiceGroup(services, log_dir=cfg.out_dir / "logs")
    with group, TopicCollector(settings, topics.values()) as collector, running(requester), stopping(tracker):
        produced = _replay(replay.replay, settings, cfg, tracker, group, progress=progress)
        log.info("replay done; waiting for the join to label everything")
        deadline = time.monotonic() + cfg.drain_timeout_s
        _wait_labeled(group, collector, topics["labeled"], replay.reference.pairs(), deadline)
        caught_up = _wait_trainer(settings, group, trainer_group, topics["labeled"], deadline)
        _wait_answers(group, collector, topics, requester)
    for what in (requester.error, collector.error):
        if what is not None:
            raise what

    trainer_log = cfg.out_dir / "logs" / "trainer.log"
    run = RunRecords(
        topics={name: collector.snapshot(real) for name, real in topics.items()},
        labeled_topic=topics["labeled"], reference=replay.reference, sent=requester.sent,
        produced=produced.counts, catalog=replay.catalog,
        refusals=refusals_in_log(trainer_log.read_text(errors="replace")) if trainer_log.exists() else {},
        caught_up=caught_up, elapsed_s=time.monotonic() - started,
    )  # fmt: skip
    report = build_report(run, weights=cfg.out_dir / "weights", serving=load(ServingSettings, **cfg.serving),
                          k=cfg.request_k, hit_horizon_ms=cfg.hit_horizon_ms)  # fmt: skip
    try:
        report.plot = plot_report(report, cfg.out_dir / "pipeline.png")
    except Exception:  # the numbers are the result; a plotting failure must not hide them
        log.exception("writing the plot failed")
    return report


def _replay(
    replay: MovieLensReplay, settings: KafkaSettings, cfg: PipelineConfig, tracker: ReplayTracker,
    group: ServiceGroup, *, progress: bool,
) -> ProduceResult:  # fmt: skip
    """Produce the replay in a thread while watching the services; what was produced."""
    result: dict[str, Any] = {}

    def replay_thread() -> None:
        try:
            result["produced"] = produce(tracker.wrap(replay.stream()), settings, speed=cfg.speed,
                                         total=len(replay), progress=progress)  # fmt: skip
        except BaseException as exc:
            result["error"] = exc
        finally:
            tracker.done.set()

    threading.Thread(target=replay_thread, name="replay", daemon=True).start()
    while not tracker.done.wait(1.0):
        group.check()
    if "error" in result:
        raise result["error"]
    return result["produced"]


def _wait_labeled(
    group: ServiceGroup, collector: TopicCollector, labeled: str, expected: set[tuple[str, int]], deadline: float
) -> None:
    """1. the join has emitted every expected example."""
    while time.monotonic() < deadline:
        group.check()
        if expected <= {labeled_pair(m) for m in collector.snapshot(labeled)}:
            return
        time.sleep(1.0)
    log.warning("the join did not label everything within the drain timeout")


def _wait_trainer(
    settings: KafkaSettings, group: ServiceGroup, trainer_group: str, labeled: str, deadline: float
) -> bool:
    """2. the trainer has consumed all of ``labeled``; True when it did before ``deadline``.

    Its committed offsets are written after each checkpoint. The newest version
    may not cover the very end, and there may be none: the guardrail may refuse
    candidates (a first one that does not beat the popularity fallback).
    """
    labeled_end = high_watermarks(settings, labeled)
    while time.monotonic() < deadline:
        group.check()
        done = committed_offsets(settings, trainer_group, labeled, labeled_end)
        if all(done.get(p, 0) >= end for p, end in labeled_end.items()):
            return True
        time.sleep(1.0)
    log.warning("the trainer had not caught up with `labeled` within the drain timeout")
    return False


SERVE_WAIT_S = 30.0
"""How long the run waits for the newest announced version to answer a request (the requester keeps going)."""


def _wait_answers(
    group: ServiceGroup, collector: TopicCollector, topics: Mapping[str, str], requester: Requester
) -> None:
    """3. the newest version has answered requests (the requester keeps going meanwhile); then the last ones."""
    # the newest announced version as it is when the loop looks: an announcement may still be on its
    # way (the trainer checkpoints before it announces); with none within the deadline, none is waited for
    serve_deadline = time.monotonic() + SERVE_WAIT_S
    while time.monotonic() < serve_deadline:
        group.check()
        ups = [ModelUpdate.from_json(m.value) for m in collector.snapshot(topics["model-updates"])]
        if ups:
            newest = str(max(u.version for u in ups))
            recs = collector.snapshot(topics["recommendations"])
            if any(Recommendation.from_json(m.value).model_version == newest for m in recs):
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
