"""Answers: the scorer thread's loop, and the one producer every answer and dead letter goes through.

:class:`Outbox` produces through :class:`infra.kafka.KafkaProducer`.  A
*tracked* record (a recommendation, or the dead letter of a request) marks its
request done in the :class:`~serving.state.OffsetLedger` once its delivery
report arrives, so an offset is committed only after the broker has the
answer (at-least-once).  A recommendation that cannot be delivered because it
is too large (a huge ``k``: rejected by the client at once, or by the broker
in its delivery report) does not stop the agent: the request is
dead-lettered with the reason (``dead_letters_total{reason="answer_too_large"}``)
and its offset is done once that dead letter is delivered.  Any other
delivery error is logged and counted (``produce_errors_total``) and the
request is done (as before: the answer is lost, the agent goes on).

:class:`ScoreLoop` takes everything queued (up to ``max_batch``: a micro-batch
is whatever arrived while the previous one was scored, so a lone request
waits for nobody), reads the live snapshot once, scores the batch with
:class:`~serving.scoring.Scorer` and hands the answers to the outbox.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from confluent_kafka import KafkaError

from contract.records import DeadLetter, Recommendation
from infra.kafka import Barrier, DeliveryCallback, KafkaProducer, dead_letter, dead_letter_of
from serving.metrics import ServingMetrics
from serving.scoring import Query, Scored, Scorer
from serving.snapshot import ModelHolder
from serving.state import OffsetLedger, Pending, RequestQueue, ServingTopics, UserState

log = logging.getLogger(__name__)

_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, getattr(KafkaError, "_MSG_SIZE_TOO_LARGE", -999)}


def now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """Recommendations and dead letters, produced with the project's error policy (module doc)."""

    def __init__(
        self, producer: KafkaProducer, *, topics: ServingTopics, ledger: OffsetLedger, metrics: ServingMetrics
    ) -> None:
        self.producer = producer
        self.topics = topics
        self.ledger = ledger
        self.metrics = metrics
        self._too_large: deque[tuple[Pending, str]] = deque()  # answers the broker refused as too large

    # --- answers -------------------------------------------------------------------------------
    def answer(self, p: Pending, rec: Recommendation) -> bool:
        """Produce the recommendation of ``p``; False when it was refused at once (then dead-lettered).

        The offset of ``p`` is done once the recommendation, or its dead letter, is delivered.
        """
        topic = self.topics.recommendations

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None and err.code() in _TOO_LARGE:
                self._too_large.append((p, str(err)))  # dead-lettered by the next poll, not in here
                return
            if err is not None:
                self._failed(topic, p, err)
            self.ledger.done(p.partition, p.offset)

        failure = self.producer.send(topic, rec.to_json(), rec.kafka_key(), on_delivery=delivered)
        if failure is None:
            return True
        self._undeliverable(p, failure.error, too_large=failure.too_large)
        return False

    def _undeliverable(self, p: Pending, error: str, *, too_large: bool) -> None:
        reason = "answer_too_large" if too_large else "answer_rejected"
        log.warning("dead-lettering request %s (%s[%d]@%d): its recommendation cannot be delivered: %s",
                    p.request.request_id, self.topics.requests, p.partition, p.offset, error)  # fmt: skip
        self.dead_letter_request(p, f"recommendation not deliverable: {error}", reason)

    # --- dead letters ----------------------------------------------------------------------------
    def dead_letter_request(self, p: Pending, error: str, reason: str) -> None:
        """Dead-letter a decoded request (tracked: its offset is done once the letter is delivered)."""
        dl = dead_letter(
            source_topic=self.topics.requests, partition=p.partition, offset=p.offset,
            key=p.request.kafka_key(), value=p.request.to_json(), error=error, ts=now_ms(),
        )  # fmt: skip
        self._send_dead_letter(dl, reason, self._tracking(p.partition, p.offset))

    def dead_letter_input(self, msg: Any, error: BaseException | str, reason: str, *, tracked: bool) -> None:
        """Dead-letter a consumed message; ``tracked`` for a ``rec-requests`` one (drives the ledger)."""
        dl = dead_letter_of(msg, error, ts=now_ms())
        self._send_dead_letter(dl, reason, self._tracking(msg.partition(), msg.offset()) if tracked else None)

    def _send_dead_letter(self, dl: DeadLetter, reason: str, tracking: DeliveryCallback | None) -> None:
        self.metrics.dead_letters.labels(reason=reason).inc()
        topic = self.topics.dead

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                log.error("could not deliver a dead letter of %s[%d]@%d: %s", dl.source_topic, dl.partition, dl.offset, err)
                self.metrics.produce_errors.inc()
            if tracking is not None:
                tracking(None, msg)

        failure = self.producer.send(topic, dl.to_json(), dl.kafka_key(), on_delivery=delivered)
        if failure is not None:  # a dead letter is small (raw value truncated): should not happen
            self.metrics.produce_errors.inc()
            if tracking is not None:
                tracking(None, None)

    def _tracking(self, partition: int, offset: int) -> DeliveryCallback:
        def done(_err: KafkaError | None, _msg: Any) -> None:
            self.ledger.done(partition, offset)

        return done

    def _failed(self, topic: str, p: Pending, err: KafkaError) -> None:
        log.error("could not deliver to %s (input %d@%d): %s", topic, p.partition, p.offset, err)
        self.metrics.produce_errors.inc()

    # --- delivery reports ------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports, then dead-letter the answers they refused as too large."""
        self.producer.poll(timeout)
        self._after_reports()

    def flush(self, timeout: float) -> Barrier:
        """Wait (up to ``timeout``) until everything queued is acknowledged; dead-letter refused answers."""
        barrier = self.producer.barrier(timeout)
        self._after_reports()
        return barrier

    def close(self, timeout: float) -> None:
        """Flush until nothing is queued and no refused answer is left to dead-letter (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.flush(max(deadline - time.monotonic(), 0.0)).undelivered
            if (not left and not self._too_large) or time.monotonic() >= deadline:
                break
        if left:
            log.warning("closing: %d record(s) not acknowledged within %.0f s", left, timeout)

    def _after_reports(self) -> None:
        self.producer.take_failures()  # each was handled by its delivery report or at send
        while True:
            try:  # the scorer and a rebalance callback may both serve reports
                p, error = self._too_large.popleft()
            except IndexError:
                return
            self._undeliverable(p, error, too_large=True)


class ScoreLoop:
    """The scorer thread: micro-batches from the queue, scored by one snapshot, answered via the outbox."""

    def __init__(
        self,
        *,
        queue: RequestQueue,
        holder: ModelHolder,
        users: UserState,
        scorer: Scorer,
        outbox: Outbox,
        metrics: ServingMetrics,
        max_batch: int,
    ) -> None:
        self.queue = queue
        self.holder = holder
        self.users = users
        self.scorer = scorer
        self.outbox = outbox
        self.metrics = metrics
        self.max_batch = max_batch

    def run(self) -> None:
        """Score until the queue is closed and empty."""
        while True:
            batch = self.queue.take(self.max_batch)
            self.outbox.poll(0)
            if not batch:
                if self.queue.closed:
                    return
                continue
            self.score(batch)

    def score(self, batch: list[Pending]) -> None:
        sm = self.holder.current  # one read: the whole batch is scored by this snapshot
        m = self.metrics
        m.batch_size.observe(len(batch))
        queries = [Query(p.request, self.users.history(p.request.user_id)) for p in batch]
        try:
            results: list[Scored] = self.scorer.score(sm, queries)
        except Exception as exc:  # a scoring bug must not lose requests silently
            log.exception("scoring a batch of %d failed under model %s", len(batch), sm.version)
            for p in batch:
                self.outbox.dead_letter_request(p, f"scoring failed under model {sm.version}: {exc}", "scoring_failed")
            return
        ts = now_ms()
        for p, r in zip(batch, results, strict=True):
            rec = Recommendation(
                request_id=r.request.request_id, user_id=r.request.user_id,
                items=r.items, model_version=r.model_version, ts=ts,
            )  # fmt: skip
            if self.outbox.answer(p, rec):
                m.requests.labels(path=r.path).inc()
            if r.unknown_candidates:
                m.unknown_candidates.inc(r.unknown_candidates)
        done = time.perf_counter()
        for p in batch:
            m.latency.observe(done - p.arrived)
        self.outbox.poll(0)
