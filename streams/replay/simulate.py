"""A closed loop: simulated users ask the scoring agent, are shown its slate, and click by a known truth.

``python -m streams.replay simulate`` (one run against the services the environment
names) and ``make loop`` (:mod:`harness.loop`: four arms, each a pipeline of its own)
both drive :func:`run_closed_loop`.

The world is the synthetic one (:class:`~streams.replay.synthetic.SyntheticStream`,
built with ``events = requests``): its users, items, item texts and categories, its
interest shift (a ``shift_fraction`` of the users re-draw their interests at event
time ``shift_ts``) and its new items (``new_items`` items arriving at uniformly random
event times).  The world's impression schedule becomes the request schedule: request
*e* is for user ``impression_user[e]`` at event time ``impression_ts[e]`` (the
simulation clock); the world's own random slates are not used.

One request, in order:

1. every item whose arrival time has come is produced to ``items`` (the initial
   catalog before the first request: :func:`produce_catalog`);
2. a ``rec-requests`` record (``k`` items, no candidates: the whole catalog) with the
   simulation clock as ``ts``;
3. its answer is read from ``recommendations`` (matched by ``request_id``); the user
   is shown the items in the recommended order, and an ``impressions`` record is
   produced: the items, the propensities the agent recorded (when it recorded one
   per item), ``request_id``, ``model_version``, ``ts`` = the request's event time,
   and ``context = {"synthetic": true, "p_click": [...]}`` (the answer key, never a
   feature);
4. each shown item at position *j* is clicked with probability
   ``p(u, i, ts) * position_bias ** j`` (``position_bias`` 1 = no position effect),
   and each click goes to ``clicks`` a uniform ``click_delay_ms`` later in event time.

The draws use common random numbers: the uniform that decides whether item *i* is
clicked at request *e* depends on ``(seed, e, i)`` only, so two runs (arms) that show
the same item to the same request draw the same click.

Impressions are produced in request order (an answer that overtakes an earlier one
waits), so the impressions' event time never goes back.  Up to ``in_flight`` requests
are outstanding; ``rate`` paces them in wall-clock requests per second.

What is measured, per request: the realised clicks, the expected clicks of the slate
shown (from the truth: no sampling noise) and the **optimal** expected clicks, those of
the true top-``k`` among the items that have arrived, best first (under a decreasing
position factor that order is optimal).  :func:`window_rows` and :func:`summarize` turn
them into click rate / optimal per window of ``window`` requests, before and after the
shift, the requests needed after the shift until a trailing window is back at
``recover_to`` of optimal, and cumulative reward and regret.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from contract.errors import ConfigError, RecordError, StreamrecError
from contract.records import Click, Impression, Item, Recommendation, RecRequest
from contract.settings import KafkaSettings
from contract.topics import CLICKS, IMPRESSIONS, ITEMS, REC_REQUESTS, RECOMMENDATIONS
from infra.kafka import KafkaProducer
from streams.replay.loop_figures import (
    Outcome,
    WindowRow,
    ratio,
    summarize,
    window_rows,
)
from streams.replay.synthetic import SyntheticConfig, SyntheticStream

log = logging.getLogger(__name__)

CLIENT_ID = "streamrec-closed-loop"
"""``model_version`` of an answer by a fallback (popularity, query) rather than a trained version."""


class LoopError(StreamrecError):
    """The closed loop cannot go on: an answer did not come, or a record was not delivered."""


@dataclass(frozen=True)
class LoopConfig:
    """One closed-loop run: the world, the users' behaviour, the pacing and the report."""

    users: int = 200
    items: int = 300
    """Items in the catalog at the start."""
    new_items: int = 100
    """Items that arrive during the run (at uniformly random event times)."""
    requests: int = 3_000
    topics: int = 8
    k: int = 10
    """Items per recommendation (the slate)."""
    shift_at: float | None = 0.5
    """Fraction of the requests after which interests shift; None = no shift."""
    shift_fraction: float = 0.5
    """Fraction of the users whose interests are re-drawn at the shift."""
    mean_gap_ms: float = 1_000.0
    """Mean event time between two requests (the simulation clock)."""
    position_bias: float = 1.0
    """Click probability at position j is p * position_bias ** j (1 = no position effect)."""
    rate: float | None = 25.0
    """Requests per wall-clock second (None: as fast as they are answered, ``in_flight`` at a time)."""
    in_flight: int = 16
    """Requests sent but not yet shown at most."""
    window: int = 250
    """Requests per report window (and of the trailing window of the recovery)."""
    recover_to: float = 0.85
    """Recovery: a trailing window after the shift whose click rate is at least this share of optimal."""
    answer_timeout_s: float = 120.0
    """Longest wait for one answer before the run fails."""
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, setting: str, reason: str) -> None:
            if not ok:
                raise ConfigError(setting, f"{reason}, got {getattr(self, setting)!r}")

        need(self.requests >= 1, "requests", "must be >= 1")
        need(1 <= self.k <= self.items, "k", f"must be in 1..items ({self.items})")
        need(0.0 < self.position_bias <= 1.0, "position_bias", "must be in (0, 1]")
        need(self.rate is None or self.rate > 0, "rate", "must be > 0 or None")
        need(self.in_flight >= 1, "in_flight", "must be >= 1")
        need(self.window >= 1, "window", "must be >= 1")
        need(0.0 < self.recover_to <= 1.0, "recover_to", "must be in (0, 1]")
        need(self.answer_timeout_s > 0, "answer_timeout_s", "must be > 0")

    def world_config(self) -> SyntheticConfig:
        return SyntheticConfig(
            users=self.users, items=self.items, new_items=self.new_items, events=self.requests,
            topics=self.topics, slate_size=self.k, shift_at=self.shift_at,
            shift_fraction=self.shift_fraction, mean_gap_ms=self.mean_gap_ms, seed=self.seed,
        )  # fmt: skip


# --------------------------------------------------------------------------- the world
class LoopWorld:
    """The synthetic world of a run, its request schedule and its ground truth (no Kafka)."""

    def __init__(self, cfg: LoopConfig) -> None:
        self.cfg = cfg
        self.world = w = SyntheticStream(cfg.world_config())
        self.item_ids: list[str] = w.item_ids
        self.item_index = {i: j for j, i in enumerate(self.item_ids)}
        self.arrival_ts = w.item_arrival_ts  # sorted: the initial catalog first, then the arrivals
        self.request_ts = w.impression_ts
        self.request_user = [w.user_ids[u] for u in w.impression_user]
        self.shift_ts = w.shift_ts
        self.shift_index: int | None = (
            None
            if w.shift_ts is None
            else int(np.searchsorted(self.request_ts, w.shift_ts, side="left"))
        )
        self.position_factor = cfg.position_bias ** np.arange(cfg.k)
        self._optimal: np.ndarray | None = None

    @property
    def initial_items(self) -> int:
        """Items in the catalog when the first request is sent."""
        first = int(self.request_ts[0])
        return int(np.searchsorted(self.arrival_ts, first, side="right"))

    def item(self, j: int) -> Item:
        w = self.world
        return Item(item_id=w.item_ids[j], text=w.item_texts[j], categories=w.item_categories[j],
                    ts=int(self.arrival_ts[j]))  # fmt: skip

    def arrived(self, ts: int) -> int:
        """Items arrived by event time ``ts`` (the first ``arrived(ts)`` of :attr:`item_ids`)."""
        return int(np.searchsorted(self.arrival_ts, ts, side="right"))

    def truth(self, e: int) -> np.ndarray:
        """True click probabilities of request ``e``'s user at its event time, for every item."""
        return self.world.click_probabilities(self.request_user[e], int(self.request_ts[e]))

    def optimal(self) -> np.ndarray:
        """Per request: the expected clicks of the true top-k among the items arrived by then."""
        if self._optimal is None:
            k = self.cfg.k
            out = np.empty(self.cfg.requests)
            for e in range(self.cfg.requests):
                p = self.truth(e)[: self.arrived(int(self.request_ts[e]))]
                top = np.sort(p)[::-1][:k]
                out[e] = float((top * self.position_factor[: len(top)]).sum())
            self._optimal = out
        return self._optimal

    def draws(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(uniform, click delay ms) per item for request ``e``: common random numbers across runs."""
        rng = np.random.default_rng([self.cfg.seed, 0x51AB, e])
        lo, hi = self.world.config.click_delay_ms
        n = len(self.item_ids)
        return rng.random(n), rng.integers(lo, hi + 1, size=n)


def shown(world: LoopWorld, e: int, rec: Recommendation, latency_s: float) -> tuple[Outcome, Impression | None,
                                                                                     list[Click]]:  # fmt: skip
    """The user's reaction to the answer of request ``e``: the outcome, the impression, the clicks."""
    user, ts = world.request_user[e], int(world.request_ts[e])
    truth = world.truth(e)
    uniform, delay = world.draws(e)
    items = [s.item_id for s in rec.items]
    rows = [
        world.item_index.get(i) for i in items
    ]  # an item of another catalog has no truth: never clicked
    p = (
        np.array([0.0 if r is None else float(truth[r]) for r in rows])
        * world.position_factor[: len(items)]
    )
    clicked = tuple(j for j, r in enumerate(rows) if r is not None and uniform[r] < p[j])
    props = [s.propensity for s in rec.items]
    propensities = (
        tuple(float(x) for x in props) if items and all(x is not None for x in props) else None
    )  # type: ignore[arg-type]
    outcome = Outcome(
        index=e, request_id=rec.request_id, user_id=user, ts=ts, model_version=rec.model_version,
        items=tuple(items), propensities=propensities, clicked=clicked, expected=float(p.sum()),
        optimal=float(world.optimal()[e]), latency_s=latency_s,
    )  # fmt: skip
    if not items:
        return outcome, None, []
    impression = Impression(
        impression_id=rec.request_id, user_id=user, items=items, ts=ts,
        context={"synthetic": True, "p_click": [round(float(x), 6) for x in p]},
        propensities=list(propensities) if propensities is not None else None,
        request_id=rec.request_id, model_version=rec.model_version,
    )  # fmt: skip
    clicks = [
        Click(
            impression_id=rec.request_id,
            user_id=user,
            item_id=items[j],
            ts=ts + int(delay[rows[j]]),
        )  # type: ignore[index]
        for j in clicked
    ]
    return outcome, impression, clicks


# --------------------------------------------------------------------------- the loop on Kafka
@dataclass
class LoopRun:
    """What one closed-loop run did: an outcome per request, in request order."""

    config: LoopConfig
    outcomes: list[Outcome]
    shift_index: int | None
    elapsed_s: float
    tag: str
    produced: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return summarize(self.outcomes, shift_index=self.shift_index, window=self.config.window,
                         recover_to=self.config.recover_to)  # fmt: skip

    def windows(self) -> list[WindowRow]:
        return window_rows(self.outcomes, self.config.window, self.shift_index)


def produce_catalog(settings: KafkaSettings, world: LoopWorld, *, timeout: float = 60.0) -> int:
    """Produce the initial catalog (the items arrived by the first request) and wait for the acks."""
    producer = KafkaProducer.create(settings, f"{CLIENT_ID}-catalog")
    topic = ITEMS.real_name(settings)
    n = world.initial_items
    for j in range(n):
        item = world.item(j)
        producer.send(topic, item.to_json(), item.kafka_key())
        producer.poll(0)
    result = producer.barrier(timeout)
    if not result.ok:
        raise LoopError(f"producing the catalog failed: {result.describe()}")
    return n


def _end_offsets(consumer: Consumer, topic: str) -> list[TopicPartition]:
    md = consumer.list_topics(topic, timeout=30)
    if topic not in md.topics or md.topics[topic].error is not None:
        raise LoopError(f"topic {topic!r} does not exist")
    return [
        TopicPartition(
            topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
        )
        for p in md.topics[topic].partitions
    ]


def request_ids(cfg: LoopConfig, namespace: str) -> list[str]:
    """The request ids of a run: ``<namespace>-<index>``.

    Serving breaks top-k ties and draws its exploration from the request id
    (``serving.scoring.tie_key``, ``ExplorePolicy.rng``). Arms that share a
    namespace (``harness.loop`` gives each seed one, and each arm topics of its
    own) meet the same serving draws for the same request, as they meet the
    same user draws: common random numbers.  Runs on the same topics need
    namespaces of their own (the join would take a repeated id for a
    redelivered impression).
    """
    return [f"{namespace}-{e:06d}" for e in range(cfg.requests)]


def shared_namespace(cfg: LoopConfig) -> str:
    """The request-id namespace that the arms of one seed share (each arm on topics of its own)."""
    return f"loop-s{cfg.seed}"


def run_closed_loop(
    settings: KafkaSettings,
    cfg: LoopConfig,
    *,
    world: LoopWorld | None = None,
    catalog_done: bool = False,
    on_tick: Callable[[], None] | None = None,
    tag: str | None = None,
    id_namespace: str | None = None,
) -> LoopRun:
    """Run the loop of the module doc against the services on ``settings``' topics.

    ``catalog_done``: the initial catalog was produced already (:func:`produce_catalog`).
    ``id_namespace``: of the request ids (:func:`request_ids`); default ``loop-<tag>``, unique per run.
    ``on_tick`` is called about every 50 ms (e.g. to check on the services); what it
    raises ends the run.
    """
    world = world or LoopWorld(cfg)
    world.optimal()  # computed up front: the loop should not pause on it
    tag = tag or uuid.uuid4().hex[:8]
    n = cfg.requests
    producer = KafkaProducer.create(settings, CLIENT_ID, **{"linger.ms": 1})
    consumer = Consumer(settings.confluent_config(**{
        "group.id": f"{CLIENT_ID}-{tag}", "enable.auto.commit": False, "enable.partition.eof": False,
    }))  # fmt: skip
    topics = {
        spec.name: spec.real_name(settings) for spec in (ITEMS, REC_REQUESTS, IMPRESSIONS, CLICKS)
    }
    counts = dict.fromkeys(topics, 0)

    def send(name: str, rec: Any) -> None:
        failure = producer.send(topics[name], rec.to_json(), rec.kafka_key())
        if failure is not None:
            raise LoopError(f"a {name} record was rejected: {failure}")
        counts[name] += 1

    started = time.monotonic()
    outcomes: list[Outcome] = []
    try:
        consumer.assign(_end_offsets(consumer, RECOMMENDATIONS.real_name(settings)))
        items_sent = world.initial_items if catalog_done else 0
        sent_at: dict[int, float] = {}
        answers: dict[int, Recommendation] = {}
        ids = request_ids(cfg, id_namespace or f"loop-{tag}")
        index = {rid: e for e, rid in enumerate(ids)}
        next_send = next_show = 0
        t0 = time.monotonic()
        last_tick = 0.0
        while next_show < n:
            now = time.monotonic()
            while (next_send < n and next_send - next_show < cfg.in_flight
                   and (cfg.rate is None or now >= t0 + next_send / cfg.rate)):  # fmt: skip
                ts = int(world.request_ts[next_send])
                for j in range(items_sent, world.arrived(ts)):  # new items, on schedule
                    send("items", world.item(j))
                items_sent = max(items_sent, world.arrived(ts))
                req = RecRequest(
                    request_id=ids[next_send], user_id=world.request_user[next_send], k=cfg.k, ts=ts
                )
                send("rec-requests", req)
                sent_at[next_send] = time.monotonic()
                next_send += 1
            producer.poll(0)
            for m in consumer.consume(num_messages=500, timeout=0.02):
                if m.error() is not None:
                    continue
                try:
                    rec = Recommendation.from_json(m.value())
                except RecordError as exc:
                    log.warning("ignoring an undecodable recommendation: %s", exc)
                    continue
                e = index.get(rec.request_id)
                if (
                    e is not None and e >= next_show and e not in answers
                ):  # redeliveries are ignored
                    answers[e] = rec
            while next_show in answers:
                e = next_show
                outcome, impression, clicks = shown(
                    world, e, answers.pop(e), time.monotonic() - sent_at.pop(e)
                )
                if impression is not None:
                    send("impressions", impression)
                for click in clicks:
                    send("clicks", click)
                outcomes.append(outcome)
                next_show += 1
                if next_show % cfg.window == 0:
                    last = outcomes[-cfg.window :]
                    log.info("%d/%d requests shown: last %d at %.3f of optimal (%s)", next_show, n, cfg.window,
                             ratio(sum(o.clicks for o in last), sum(o.optimal for o in last)),
                             ", ".join(sorted({o.model_version for o in last})))  # fmt: skip
            if (
                next_show < n
                and next_show in sent_at
                and time.monotonic() - sent_at[next_show] > cfg.answer_timeout_s
            ):
                raise LoopError(f"no recommendation for request {ids[next_show]} within {cfg.answer_timeout_s:.0f} s "
                                f"(is a scoring agent serving {topics['rec-requests']}?)")  # fmt: skip
            if on_tick is not None and time.monotonic() - last_tick >= 0.05:
                last_tick = time.monotonic()
                on_tick()
        result = producer.barrier(60.0)
        if not result.ok:
            raise LoopError(f"records of the loop were not delivered: {result.describe()}")
    finally:
        consumer.close()
        producer.close(10.0)
    return LoopRun(cfg, outcomes, world.shift_index, time.monotonic() - started, tag, counts)


def config_dict(cfg: LoopConfig) -> dict[str, Any]:
    return asdict(cfg)
