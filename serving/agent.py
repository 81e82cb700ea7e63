"""The scoring agent: a thin shell that wires serving's pieces together and runs their threads.

The pieces, each in its own module and tested on its own:

* state (:mod:`serving.state`): the catalog, user histories and popularity,
  the request queue, the offset ledger;
* snapshots (:mod:`serving.snapshot`) and the **loader** thread
  (:mod:`serving.loader`) that loads announced versions and computes item
  vectors in the background, then swaps one reference;
* scoring (:mod:`serving.scoring`), and the **scorer** thread with the one
  producer of answers and dead letters (:mod:`serving.answers`);
* the Kafka consumers (:mod:`serving.consumers`): the **state** thread
  (``items``, ``user-history``, ``model-updates`` read to their end at
  start-up, then tailed) and the **requests** thread (the ``rec-requests``
  group member);
* the **labeled** thread (:mod:`serving.refresh`): follows ``labeled`` into the
  agent's own per-user posterior, which the scorer thread refreshes (at most
  every ``posterior_refresh_s``) and serves in place of the version's per-user
  means (``posterior_refresh``, off by default).

Threads (all daemons; :meth:`ServingAgent.stop` ends them in order): state,
labeled, loader, scorer, requests.  A thread that fails stops the agent
(:attr:`ServingAgent.error`).  Offsets of ``rec-requests`` are committed only
once the answer (or dead letter) of that request and of every earlier one in
its partition is acknowledged (at-least-once; ``request_id`` identifies
duplicates).

Malformed inputs: a request that does not decode, and a request whose answer
is too large to deliver, go to ``dead-letters`` with the reason; a malformed
state record is logged, counted and dead-lettered while tailing.  Unknown
candidate ids are skipped and counted; a request with none known gets the
popularity fallback over the whole catalog.  The agent keeps running in
every case.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from contract.errors import ConfigError
from contract.settings import KafkaSettings
from contract.topics import LABELED
from infra.kafka import KafkaProducer
from serving.answers import Outbox, ScoreLoop
from serving.consumers import AgentError, RequestLoop, StateReader
from serving.loader import ModelLoader
from serving.metrics import ServingMetrics
from serving.query import QueryIndex
from serving.refresh import LabeledFollower, PosteriorRefresh
from serving.scoring import ExplorePolicy, Scorer
from serving.settings import FALLBACK_VERSION, ServingSettings, check_runtime
from serving.snapshot import ModelHolder, fallback_snapshot
from serving.state import (
    CatalogState,
    OffsetLedger,
    RequestQueue,
    ServingTopics,
    StateRecords,
    UserState,
)
from trainer.model_config import ModelConfig
from trainer.popularity import Popularity
from trainer.weights import WeightStore

log = logging.getLogger(__name__)

__all__ = ["AgentError", "ServingAgent"]


class ServingAgent:
    """Scores rec-requests with the live model and hot-swaps versions (see the module doc).

    ``start()`` rebuilds the state, loads the newest valid version and joins
    the group, returning once requests are being consumed; ``stop()`` drains
    the queue, flushes, commits and closes.  Everything runs in background
    threads, so a test can run an agent in-process.  ``producer_config``:
    librdkafka overrides of the answers' producer (e.g. ``message.max.bytes``).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ServingSettings,
        *,
        metrics: ServingMetrics | None = None,
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.kafka = kafka
        self.settings = s = settings
        self.device = check_runtime(settings)
        self.metrics = metrics or ServingMetrics()
        self.topics = ServingTopics.of(kafka)
        self.store = WeightStore(s.weights_root, signing_key=s.signing_key)
        self.catalog = CatalogState()
        self.popularity = Popularity(s.popularity_half_life_s)
        self.users = UserState(s.history_length, self.popularity)
        self.holder = ModelHolder(fallback_snapshot(FALLBACK_VERSION, []))
        self.loader = ModelLoader(
            holder=self.holder, catalog=self.catalog, store=self.store, metrics=self.metrics,
            model_name=s.model_name, device=self.device, encode_batch=s.encode_batch,
            prefix_cache_items=s.prefix_cache_items, nice=s.loader_nice, fallback_version=FALLBACK_VERSION,
            warm_config=ModelConfig() if s.warm_start else None,
        )  # fmt: skip
        self.query_index = QueryIndex(
            self.catalog.lookup, generation=lambda: self.catalog.generation, cache_size=s.query_cache_size,
            device=self.device,
        )  # fmt: skip
        self.scorer = Scorer(
            self.popularity, fallback_version=FALLBACK_VERSION, history_length=s.history_length,
            trending=s.trending_items, blend=s.cold_start_blend, refresh_s=s.popularity_refresh_s,
            policy=ExplorePolicy(kind=s.explore, epsilon=s.explore_epsilon, temperature=s.explore_temperature,
                                 pool=s.explore_pool, seed=s.explore_seed),
            query=self.query_index, query_weight=s.query_model_weight,
        )  # fmt: skip
        self.refresh = (
            PosteriorRefresh(self.metrics, topic=LABELED.real_name(kafka), every_s=s.posterior_refresh_s,
                             history_length=s.history_length)
            if s.posterior_refresh else None
        )
        self.ledger = OffsetLedger()
        self.queue = RequestQueue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._producer_config = {"linger.ms": s.linger_ms, **(producer_config or {})}
        self._outbox: Outbox | None = None
        self._requests: RequestLoop | None = None
        self._threads: list[threading.Thread] = []
        self._torch_threads: int | None = None

    # --- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> ServingAgent:
        """Rebuild state, load a model, start the threads; return once the group assigned partitions."""
        started = time.monotonic()
        s = self.settings
        if s.metrics_port:
            try:
                self.metrics.serve(s.metrics_port)
            except OSError as exc:
                raise ConfigError("STREAMREC_SERVING_METRICS_PORT", f"cannot listen on {s.metrics_port}: {exc}") from None
        if s.torch_threads:
            self._torch_threads = torch.get_num_threads()  # restored by stop()
            torch.set_num_threads(s.torch_threads)
        producer = KafkaProducer.create(self.kafka, f"{s.group_id}-answers", **self._producer_config)
        self._outbox = outbox = Outbox(producer, topics=self.topics, ledger=self.ledger, metrics=self.metrics)
        state = StateReader(
            self.kafka, s, records=StateRecords(self.topics, self.catalog, self.users), outbox=outbox,
            announce=self.loader.announce,
        )  # fmt: skip
        try:
            self.loader.load_initial(state.rebuild(self._stop))
        except BaseException:
            state.close()
            self.stop()
            raise
        self.loader.start()
        scoring = ScoreLoop(
            queue=self.queue, holder=self.holder, users=self.users, scorer=self.scorer, outbox=outbox,
            metrics=self.metrics, max_batch=s.max_batch, refresh=self.refresh,
        )  # fmt: skip
        self._requests = requests = RequestLoop(
            self.kafka, s, topic=self.topics.requests, queue=self.queue, ledger=self.ledger, outbox=outbox,
            metrics=self.metrics, on_assigned=self.ready.set,
        )  # fmt: skip
        self._spawn("serving-state", lambda: state.tail(self._stop))
        if self.refresh is not None:
            follower = LabeledFollower(self.kafka, self.refresh, self.metrics, group_id=s.group_id,
                                       replay=s.posterior_replay)  # fmt: skip
            self._spawn("serving-labeled", lambda: follower.run(self._stop))
        scorer = self._spawn("serving-scorer", scoring.run)
        self._spawn("serving-requests", lambda: requests.run(self._stop, drain=lambda: self._drain(scorer)))
        left = (timeout or s.startup_timeout_s) - (time.monotonic() - started)
        if not self.ready.wait(max(left, 1.0)):
            self.stop()
            raise AgentError(f"not assigned to the {self.topics.requests} group within the start-up timeout")
        if self.error is not None:
            self.stop()
            raise AgentError(f"agent failed while starting: {self.error}") from self.error
        log.info(
            "serving %s: %d items, %d users, model %s; ready in %.1f s",
            self.topics.requests, len(self.catalog), len(self.users), self.holder.current.version,
            time.monotonic() - started,
        )  # fmt: skip
        return self

    def _drain(self, scorer: threading.Thread) -> None:
        """The requests thread ends: the scorer answers what was queued, then everything is acknowledged."""
        self.queue.close()
        scorer.join(60.0)
        if self._outbox is not None:
            self._outbox.close(30.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued requests, flush, commit, close.  Idempotent."""
        self._stop.set()
        self.queue.wake()
        for t in reversed(self._threads):
            t.join(timeout)
        self._threads.clear()
        self.loader.stop(timeout)
        if self._outbox is not None:
            self._outbox.close(timeout)
            self._outbox = None
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the agent stops (True) or ``timeout`` passes (False)."""
        return self._stop.wait(timeout)

    def _spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a dead thread must stop the agent, not hang it
                log.exception("%s thread failed; stopping the agent", name)
                self.error = exc
                self._stop.set()
                self.ready.set()

        t = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(t)
        t.start()
        return t

    # --- introspection (tests, benchmarks) ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        sm = self.holder.current
        return {
            "model_version": sm.version,
            "items": len(sm),
            "catalog": len(self.catalog),
            "users": len(self.users),
            "queued": len(self.queue),
            "assigned": sorted(self._requests.assigned) if self._requests is not None else [],
            "refused": list(self.loader.refused),
        }
