"""Serving's per-user posterior: each user's taste refreshed from ``labeled`` within a second.

A published version holds each user's posterior mean as of the labels it was
trained on (:mod:`trainer.posterior`); between the click and the first version
trained on it pass the join's window, the trainer's batch, the guardrail and
the publish (seconds to tens of seconds).  In a closed loop that delay is most
of the regret after a change of taste: a user who switched topics is shown the
old topic until the next version.  So the agent adds to the live version's
per-user means what the labels the version has not learned yet say, by the
same Bayes rule and the same code (:class:`trainer.posterior.UserPosterior`:
forgetting, change points, Laplace steps, the empirical-Bayes prior), with the
live version's logit without its posterior term as the offset (the per-user
random effect of GLMix, Zhang et al. 2016, refreshed nearline).  Everything
else the version learned (the towers, the id rows, the biases) is served as
published.

Which labels a version has learned is its ``source_offsets`` (the next offset
of each ``labeled`` partition it trained up to; a partition it has none of, it
learned nothing of).  :class:`PosteriorRefresh` keeps two posteriors: ``base``,
every example below the live version's cut, which gives each user's precision
(the version publishes only the means), and ``live``: ``base`` with the
version's means, plus the examples after the cut.  A new version moves the cut,
and ``live`` is rebuilt on its means.  So what is served is the version's own
belief, moved by the labels it has not seen; once a version covers them the
agent serves exactly its means again.

Two halves, so that the model is only touched by the scorer thread:

* :class:`LabeledFollower` (its own thread): reads every ``labeled`` partition
  by assignment, from ``replay`` records before the end at start-up (with
  forgetting, a user's posterior depends on their recent labels only), then
  follows; decodes, drops redeliveries (:class:`trainer.dedupe.DedupeWindow`)
  and hands the examples to :meth:`PosteriorRefresh.offer`.  A record that does
  not decode is logged and counted, not dead-lettered (the trainer, the
  topic's consumer of record, dead-letters it).
* :class:`PosteriorRefresh` (the scorer thread, before a micro-batch, at most
  every ``every_s`` and at once for a new version): learns what arrived, in
  chunks of ``chunk`` examples (at most ``budget`` per call, so that a start-up
  replay does not hold the requests up), and writes the refreshed means into
  the live model's buffer.  Examples that arrive before any version is live
  wait (up to ``pending`` of them).  An example whose item is not in the
  catalog is skipped and counted.

The posterior's settings are :class:`trainer.learner_config.LearnerConfig`'s
defaults (the trainer's unless it was started with other posterior settings:
set them alike).  The guardrail judged the version with its own means; what the
agent adds is only the per-user term of newer labels, by the trainer's rule.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from confluent_kafka import Consumer, KafkaError, TopicPartition
from torch import Tensor

from contract.errors import RecordError, StreamrecError
from contract.records import Labeled
from contract.settings import KafkaSettings
from contract.topics import LABELED
from serving.metrics import ServingMetrics
from trainer.dedupe import DedupeWindow
from trainer.learner_config import LearnerConfig
from trainer.posterior import PosteriorExamples, UserPosterior

if TYPE_CHECKING:
    from serving.snapshot import ServingModel
    from trainer.model import RecModel

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")


class RefreshError(StreamrecError):
    """The labeled follower cannot go on (a fatal Kafka error)."""


class Arrived(NamedTuple):
    """A labeled example as the follower read it: where it sits in ``labeled``, and the example."""

    partition: int
    offset: int
    example: Labeled


class PosteriorRefresh:
    """The agent's per-user posterior (see the module doc); call :meth:`apply` from the scorer thread only.

    Two posteriors, so that what is served is always the live version's own belief plus the labels
    it has not learned: ``base`` has learned every example up to the live version's cut
    (``ServingModel.source_offsets``) and holds that version's means; ``live`` is ``base`` plus the
    examples after the cut (:attr:`newer`), and its means are the ones served.  A new version moves
    the cut: the examples it covers go into ``base`` (for their precision), ``base`` takes the new
    version's means, and ``live`` is rebuilt from it and the examples still newer.
    """

    def __init__(
        self,
        metrics: ServingMetrics,
        *,
        topic: str = LABELED.name,
        config: LearnerConfig | None = None,
        every_s: float = 0.5,
        chunk: int = 1024,
        budget: int = 8192,
        pending: int = 200_000,
        history_length: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.topic = topic
        self.config = config or LearnerConfig()
        self.every_s = every_s
        self.chunk = chunk
        self.budget = budget
        self.history_length = history_length
        self._clock = clock
        self._inbox: deque[Arrived] = deque(maxlen=pending)
        self._lock = threading.Lock()
        self._last = -float("inf")
        self.base: UserPosterior | None = None
        self.live: UserPosterior | None = None
        self.newer: deque[Arrived] = deque()
        """Examples learned by ``live`` that the live version has not learned, oldest first (at most
        ``pending``: past that the oldest count as learned by the version)."""
        self._pending = pending
        self._written_to: RecModel | None = None
        self._cut: dict[int, int] = {}
        """The live version's cut: partition of ``topic`` -> the next offset it has not learned."""
        self.learned = 0
        """Examples learned so far (by either posterior)."""

    @property
    def posterior(self) -> UserPosterior | None:
        """The posterior whose means are served."""
        return self.live

    # --- the follower's side ------------------------------------------------------------
    def offer(self, examples: Sequence[Arrived]) -> None:
        """Queue examples to learn (any thread); past ``pending`` waiting, the oldest are dropped."""
        with self._lock:
            dropped = max(0, len(self._inbox) + len(examples) - (self._inbox.maxlen or 0))
            self._inbox.extend(examples)
        if dropped:
            self.metrics.posterior_skipped.labels(reason="pending_full").inc(dropped)

    @property
    def waiting(self) -> int:
        return len(self._inbox)

    # --- the scorer's side --------------------------------------------------------------
    def apply(self, sm: ServingModel, *, force: bool = False) -> int:
        """Learn what arrived (at most every ``every_s``, unless ``force`` or a new version) and put the
        refreshed means in ``sm``'s model; returns the number of examples learned.  Nothing happens
        without a model."""
        model = sm.model
        if model is None or sm.item_vecs is None or model.user_posterior_mean is None:
            return 0
        now = self._clock()
        fresh_model = model is not self._written_to
        due = force or now - self._last >= self.every_s or len(self._inbox) > self.budget
        if not fresh_model and not due:
            return 0
        self._last = now
        started = time.perf_counter()
        with self._lock:  # at most ``budget`` per call: a start-up replay does not hold requests up
            todo = [self._inbox.popleft() for _ in range(min(len(self._inbox), self.budget))]
        touched: list[Tensor] = []
        learned = len(todo)
        if fresh_model:
            self.newer.extend(todo)
            self._rebase(sm)
        else:  # what the live version already learned (a replay at start-up) is the base's
            covered, todo = self._split(todo)
            self._learn(self.base, sm, covered, [])  # type: ignore[arg-type]
            self._learn(self.live, sm, todo, touched)  # type: ignore[arg-type]
            self.newer.extend(todo)
        if len(self.newer) > self._pending:  # a version that never comes: fold the oldest into base
            old = [self.newer.popleft() for _ in range(len(self.newer) - self._pending)]
            self._learn(self.base, sm, old, [])  # type: ignore[arg-type]
        post = self.live
        if fresh_model:  # a new snapshot: every user learned so far, once
            rows = torch.tensor(sorted(post.rows), dtype=torch.long)
            self._written_to = model
        else:
            rows = torch.unique(torch.cat(touched)) if touched else None
        if rows is not None and rows.numel():
            buf = model.user_posterior_mean
            buf[rows.to(buf.device)] = post.mean[rows].to(buf.device, buf.dtype)
        if learned:
            self.learned += learned
            self.metrics.posterior_examples.inc(learned)
        self.metrics.posterior_users.set(len(post.rows))
        self.metrics.posterior_seconds.observe(time.perf_counter() - started)
        return learned

    def _rebase(self, sm: ServingModel) -> None:
        """A new live version: move the cut to its ``source_offsets`` and rebuild ``live`` on its means."""
        model = sm.model
        assert model is not None and model.user_posterior_mean is not None
        mean = model.user_posterior_mean.detach().float().cpu()
        if self.base is None or self.base.mean.shape != mean.shape:
            self.base = self._new_posterior(mean)
        self._cut = {int(k.rpartition(":")[2]): v for k, v in sm.source_offsets.items()
                     if k.rpartition(":")[0] == self.topic}  # fmt: skip
        covered, still = self._split(self.newer)
        self._learn(self.base, sm, covered, [])  # their precision; the means are the version's
        self.base.mean.copy_(mean)
        self.live = copy.deepcopy(self.base)
        self._learn(self.live, sm, still, [])
        self.newer = deque(still)
        log.info("per-user posterior on version %s: %d examples newer than the version re-learned on its means, "
                 "%d users", sm.version, len(still), len(self.live.rows))  # fmt: skip

    def _split(self, arrived: Iterable[Arrived]) -> tuple[list[Arrived], list[Arrived]]:
        """``(covered, newer)``: what the live version has learned (offset below its cut; a partition
        the version has no offset of, it learned none of) and what it has not, in order."""
        covered: list[Arrived] = []
        newer: list[Arrived] = []
        for a in arrived:
            (covered if a.offset < self._cut.get(a.partition, 0) else newer).append(a)
        return covered, newer

    def _new_posterior(self, mean: Tensor) -> UserPosterior:
        c = self.config
        log.info("per-user posterior refreshed from labeled: %d features, prior std %g, forgetting %g",
                 mean.shape[1], c.posterior_prior_std, c.posterior_forgetting)
        return UserPosterior(
            mean.clone(), prior_std=c.posterior_prior_std, forgetting=c.posterior_forgetting,
            newton_steps=c.posterior_newton_steps, refit_every=c.posterior_refit_every,
            change_hazard=c.posterior_change_hazard, full_prior=c.posterior_full_prior,
        )  # fmt: skip

    def _learn(self, post: UserPosterior, sm: ServingModel, arrived: Sequence[Arrived], touched: list[Tensor]) -> int:
        n = 0
        for i in range(0, len(arrived), self.chunk):
            n += self._update(post, sm, [a.example for a in arrived[i : i + self.chunk]], touched)
        return n

    @torch.no_grad()
    def _update(self, post: UserPosterior, sm: ServingModel, examples: list[Labeled], touched: list[Tensor]) -> int:
        """One posterior update from ``examples`` under ``sm`` (those whose item is unknown are skipped)."""
        model, vecs, index = sm.model, sm.item_vecs, sm.index
        assert model is not None and vecs is not None
        known = [ex for ex in examples if ex.item_id in index]
        if len(known) < len(examples):
            self.metrics.posterior_skipped.labels(reason="unknown_item").inc(len(examples) - len(known))
        if not known:
            return 0
        idx, mask = sm.history_matrix([ex.history for ex in known], model.config.max_history or self.history_length)
        dev = vecs.device
        user_ids = [ex.user_id for ex in known]
        users = model.encode_users(vecs[torch.from_numpy(idx).to(dev)], torch.from_numpy(mask).to(dev), user_ids)
        items = vecs[torch.tensor([index[ex.item_id] for ex in known], dtype=torch.long, device=dev)]
        logits = model.click_logits(users, items).float()
        z = model.posterior_features(items).float()
        own = model.posterior_features(users).float()  # the model's posterior term, taken out again
        rows = model.user_rows(user_ids, dev)
        n = len(known)
        zeros = torch.zeros(n, device=dev)
        batch = PosteriorExamples(
            rows=rows, features=z, offsets=logits - (own * z).sum(1),
            labels=torch.tensor([float(ex.label) for ex in known], device=dev),
            late=torch.tensor([ex.late for ex in known], dtype=torch.bool, device=dev),
            weights=torch.ones(n, device=dev), item_rows=torch.zeros(n, dtype=torch.long, device=dev),
            item_offsets=zeros,
        ).cpu()  # fmt: skip
        post.update(batch)
        touched.append(batch.rows)
        return n


class LabeledFollower:
    """Reads ``labeled`` (every partition, by assignment) into a :class:`PosteriorRefresh` (see the module doc)."""

    def __init__(
        self, kafka: KafkaSettings, refresh: PosteriorRefresh, metrics: ServingMetrics, *,
        group_id: str, replay: int, dedupe: int = 100_000,
    ) -> None:  # fmt: skip
        self.kafka = kafka
        self.refresh = refresh
        self.metrics = metrics
        self.topic = LABELED.real_name(kafka)
        self.group_id = group_id
        self.replay = replay
        self.dedupe = DedupeWindow(dedupe)
        self.read = 0

    def run(self, stop: threading.Event) -> None:
        """Follow ``labeled`` until ``stop`` (a missing topic is waited for: the join creates it)."""
        consumer = Consumer(self.kafka.confluent_config(**{
            "group.id": f"{self.group_id}-labeled",  # never joins or commits: assignment only
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            "logger": _rdkafka_log,
        }))  # fmt: skip
        try:
            if not self._assign(consumer, stop):
                return
            while not stop.is_set():
                msgs = consumer.consume(num_messages=2000, timeout=0.2)
                batch: list[Arrived] = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise RefreshError(f"fatal Kafka error on {self.topic}: {err}")
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("Kafka error on %s: %s", self.topic, err)
                        continue
                    try:
                        ex = Labeled.from_json(msg.value())
                    except RecordError as exc:
                        log.warning("invalid record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
                        self.metrics.posterior_skipped.labels(reason="invalid_record").inc()
                        continue
                    if not self.dedupe.first_time(ex):
                        self.metrics.posterior_skipped.labels(reason="duplicate").inc()
                        continue
                    batch.append(Arrived(msg.partition(), msg.offset(), ex))
                self.read += len(msgs)
                if batch:
                    self.refresh.offer(batch)
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer, stop: threading.Event) -> bool:
        """Assign every partition, ``replay`` records before its end; False when stopped first."""
        while not stop.is_set():
            meta = consumer.list_topics(self.topic, timeout=10.0).topics.get(self.topic)
            if meta is not None and meta.error is None and meta.partitions:
                break
            stop.wait(1.0)
        else:
            return False
        parts = []
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10.0)
            parts.append(TopicPartition(self.topic, p, max(low, high - self.replay)))
        consumer.assign(parts)
        log.info("per-user posterior: following %s (%d partitions, up to %d records back each)",
                 self.topic, len(parts), self.replay)
        return True
