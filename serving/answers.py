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
delivery error (the broker unreachable for longer than ``message.timeout.ms``,
an ACL refusal, ...) is logged and counted (``produce_errors_total``) and the
record is **sent again** after ``retry_backoff_s``; its request is *not* done
meanwhile, so the ledger holds that partition's committable offset at it (no
later offset is committed past an unanswered request).  The same holds for the
dead letter of a request.  The retries end when the record is delivered, when
the request's partition is no longer owned (revoked or lost: the next owner
answers it again, since its offset was never committed), or when the agent
stops (:meth:`Outbox.close`: the offset stays uncommitted and the request is
answered after the restart).  So a request is answered at least once, or its
offset is not committed: the at-least-once of DESIGN §6.

:class:`ScoreLoop` takes everything queued (up to ``max_batch``: a micro-batch
is whatever arrived while the previous one was scored, so a lone request
waits for nobody), reads the live snapshot once, scores the batch with
:class:`~serving.scoring.Scorer` and hands the answers to the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from contract.records import DeadLetter, Recommendation
from infra.kafka import Barrier, KafkaProducer, dead_letter, dead_letter_of
from serving.metrics import ServingMetrics
from serving.refresh import PosteriorRefresh
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
        self,
        producer: KafkaProducer,
        *,
        topics: ServingTopics,
        ledger: OffsetLedger,
        metrics: ServingMetrics,
        retry_backoff_s: float = 1.0,
    ) -> None:
        self.producer = producer
        self.topics = topics
        self.ledger = ledger
        self.metrics = metrics
        self.retry_backoff_s = retry_backoff_s
        self._too_large: deque[tuple[Pending, str]] = deque()  # answers the broker refused as too large
        self._retries: list[tuple[float, int, int, Callable[[], None]]] = []  # (due, partition, offset, resend)
        self._retry_lock = threading.Lock()
        self.retried = 0

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
                self._retry(p.partition, p.offset, lambda: self.answer(p, rec))
                return
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
        self.metrics.dead_letters.labels(reason=reason).inc()
        self._send_dead_letter(dl, (p.partition, p.offset))

    def dead_letter_input(self, msg: Any, error: BaseException | str, reason: str, *, tracked: bool) -> None:
        """Dead-letter a consumed message; ``tracked`` for a ``rec-requests`` one (drives the ledger)."""
        dl = dead_letter_of(msg, error, ts=now_ms())
        self.metrics.dead_letters.labels(reason=reason).inc()
        self._send_dead_letter(dl, (msg.partition(), msg.offset()) if tracked else None)

    def _send_dead_letter(self, dl: DeadLetter, tracked: tuple[int, int] | None) -> None:
        """Send ``dl``; a ``tracked`` one (a request's partition and offset) is retried until delivered."""
        topic = self.topics.dead

        def failed(err: object) -> None:
            log.error("could not deliver a dead letter of %s[%d]@%d: %s", dl.source_topic, dl.partition, dl.offset, err)
            self.metrics.produce_errors.inc()
            if tracked is not None:
                self._retry(*tracked, lambda: self._send_dead_letter(dl, tracked))

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failed(err)
            elif tracked is not None:
                self.ledger.done(*tracked)

        failure = self.producer.send(topic, dl.to_json(), dl.kafka_key(), on_delivery=delivered)
        if failure is not None:  # a dead letter is small (raw value truncated): should not happen
            failed(failure.error)

    def _retry(self, partition: int, offset: int, resend: Callable[[], None]) -> None:
        """Send again after the backoff (by a later poll or flush, never inside a delivery report)."""
        with self._retry_lock:
            self._retries.append((time.monotonic() + self.retry_backoff_s, partition, offset, resend))

    def _resend_due(self) -> None:
        now = time.monotonic()
        with self._retry_lock:
            due = [r for r in self._retries if r[0] <= now]
            self._retries = [r for r in self._retries if r[0] > now]
        for _due, partition, offset, resend in due:
            if self.ledger.pending(partition, offset):  # not revoked, lost or answered meanwhile
                self.retried += 1
                resend()

    @property
    def retrying(self) -> int:
        """Records waiting to be sent again (their requests are not done)."""
        with self._retry_lock:
            return len(self._retries)

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
            if (not left and not self._too_large and not self.retrying) or time.monotonic() >= deadline:
                break
            if not left and not self._too_large:  # only retries wait for their backoff
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
        if left or self.retrying:
            log.warning("closing: %d record(s) not acknowledged and %d awaiting a retry after %.0f s "
                        "(their requests stay uncommitted)", left, self.retrying, timeout)  # fmt: skip

    def _after_reports(self) -> None:
        self.producer.take_failures()  # each was handled by its delivery report or at send
        self._resend_due()
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
        refresh: PosteriorRefresh | None = None,
    ) -> None:
        self.refresh = refresh
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
            if self.refresh is not None:  # the scorer thread is the only one that touches the live model
                self.refresh.apply(self.holder.current)
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
