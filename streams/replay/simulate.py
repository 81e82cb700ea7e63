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

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from contract.errors import ConfigError, RecordError, StreamrecError
from contract.records import Click, Impression, Item, Recommendation, RecRequest
from contract.settings import KafkaSettings
from contract.topics import CLICKS, IMPRESSIONS, ITEMS, REC_REQUESTS, RECOMMENDATIONS
from infra.kafka import KafkaProducer
from streams.replay.synthetic import SyntheticConfig, SyntheticStream

log = logging.getLogger(__name__)

CLIENT_ID = "streamrec-closed-loop"
FALLBACK_PREFIX = "fallback:"
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


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request, what it was shown and what the user did."""

    index: int
    request_id: str
    user_id: str
    ts: int
    model_version: str
    items: tuple[str, ...]
    propensities: tuple[float, ...] | None
    clicked: tuple[int, ...]
    """Positions clicked."""
    expected: float
    """Expected clicks of the slate shown (truth times position factor)."""
    optimal: float
    latency_s: float
    """Wall time from the request sent to its answer read."""

    @property
    def trained(self) -> bool:
        """Answered by a trained version (not a fallback)."""
        return not self.model_version.startswith(FALLBACK_PREFIX)

    @property
    def clicks(self) -> int:
        return len(self.clicked)


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


def run_closed_loop(
    settings: KafkaSettings,
    cfg: LoopConfig,
    *,
    world: LoopWorld | None = None,
    catalog_done: bool = False,
    on_tick: Callable[[], None] | None = None,
    tag: str | None = None,
) -> LoopRun:
    """Run the loop of the module doc against the services on ``settings``' topics.

    ``catalog_done``: the initial catalog was produced already (:func:`produce_catalog`).
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
        ids = [f"loop-{tag}-{e:06d}" for e in range(n)]
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
                             _ratio(sum(o.clicks for o in last), sum(o.optimal for o in last)),
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


# --------------------------------------------------------------------------- the figures
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


@dataclass(frozen=True)
class WindowRow:
    start: int
    end: int
    """Requests ``start`` .. ``end - 1``."""
    realised: int
    expected: float
    optimal: float
    trained: int
    """Requests answered by a trained version."""
    versions: tuple[str, ...]
    phase: str
    """``before``, ``after`` or ``shift`` (the window holds the shift)."""

    @property
    def ratio(self) -> float:
        """Realised click rate / optimal."""
        return _ratio(self.realised, self.optimal)

    @property
    def expected_ratio(self) -> float:
        return _ratio(self.expected, self.optimal)


def window_rows(outcomes: Sequence[Outcome], size: int, shift_index: int | None) -> list[WindowRow]:
    rows = []
    for start in range(0, len(outcomes), size):
        part = outcomes[start : start + size]
        end = start + len(part)
        if shift_index is None or end <= shift_index:
            phase = "before"
        elif start >= shift_index:
            phase = "after"
        else:
            phase = "shift"
        rows.append(WindowRow(
            start, end, sum(o.clicks for o in part), float(sum(o.expected for o in part)),
            float(sum(o.optimal for o in part)), sum(o.trained for o in part),
            tuple(sorted({o.model_version for o in part}, key=_version_key)), phase,
        ))  # fmt: skip
    return rows


def _version_key(v: str) -> tuple[int, str]:
    return (0, v) if v.startswith(FALLBACK_PREFIX) else (1, f"{int(v):012d}" if v.isdigit() else v)


def trailing_ratio(values: np.ndarray, optimal: np.ndarray, size: int) -> np.ndarray:
    """``sum(values[n-size+1 .. n]) / sum(optimal[...])`` for every ``n`` (NaN while ``n < size - 1``)."""
    out = np.full(len(values), np.nan)
    if len(values) < size:
        return out
    cv, co = np.cumsum(np.r_[0.0, values]), np.cumsum(np.r_[0.0, optimal])
    num, den = cv[size:] - cv[:-size], co[size:] - co[:-size]
    out[size - 1 :] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _part(realised: np.ndarray, expected: np.ndarray, optimal: np.ndarray) -> dict[str, Any]:
    return {
        "requests": len(realised),
        "ratio": _ratio(float(realised.sum()), float(optimal.sum())),
        "expected_ratio": _ratio(float(expected.sum()), float(optimal.sum())),
        "clicks_per_request": float(realised.mean()) if len(realised) else float("nan"),
        "optimal_per_request": float(optimal.mean()) if len(optimal) else float("nan"),
    }


def summarize(
    outcomes: Sequence[Outcome], *, shift_index: int | None, window: int, recover_to: float
) -> dict[str, Any]:
    """The figures of one run (see the module doc); NaN/None where a part is empty."""
    realised = np.array([o.clicks for o in outcomes], dtype=np.float64)
    expected = np.array([o.expected for o in outcomes])
    optimal = np.array([o.optimal for o in outcomes])
    n = len(outcomes)
    s = shift_index if shift_index is not None else n
    trained = [o.index for o in outcomes if o.trained]
    out: dict[str, Any] = {
        "requests": n,
        "overall": _part(realised, expected, optimal),
        "before": _part(realised[:s], expected[:s], optimal[:s]),
        "before_last_window": _part(
            realised[max(0, s - window) : s],
            expected[max(0, s - window) : s],
            optimal[max(0, s - window) : s],
        ),  # fmt: skip
        "after": None,
        "after_last_window": None,
        "lowest_window_after": None,
        "recovery_requests": None,
        "recovery_requests_expected": None,
        "shift_index": shift_index,
        "window": window,
        "recover_to": recover_to,
        "cumulative": {
            "clicks": int(realised.sum()),
            "expected": float(expected.sum()),
            "optimal": float(optimal.sum()),
            "regret": float(optimal.sum() - realised.sum()),
        },
        "first_trained_request": trained[0] if trained else None,
        "trained_share": len(trained) / n if n else float("nan"),
        "versions_served": sorted({o.model_version for o in outcomes}, key=_version_key),
        "median_latency_s": float(np.median([o.latency_s for o in outcomes]))
        if n
        else float("nan"),
    }
    if shift_index is not None and shift_index < n:
        out["after"] = _part(realised[s:], expected[s:], optimal[s:])
        out["after_last_window"] = _part(realised[-window:], expected[-window:], optimal[-window:])
        for key, values in (
            ("recovery_requests", realised),
            ("recovery_requests_expected", expected),
        ):
            r = trailing_ratio(values, optimal, window)
            ends = np.arange(n)
            ok = (ends - window + 1 >= s) & (r >= recover_to)
            out[key] = int(ends[ok][0] - s + 1) if ok.any() else None
        r = trailing_ratio(realised, optimal, window)
        after = r[s + window - 1 :] if s + window - 1 < n else np.array([])
        out["lowest_window_after"] = (
            float(np.nanmin(after)) if len(after) and np.isfinite(after).any() else None
        )
    return out


def paired_difference(
    a: Sequence[Outcome], b: Sequence[Outcome], start: int = 0
) -> dict[str, float]:
    """Clicks of ``a`` minus those of ``b`` on the same requests (from ``start``), and its standard error.

    The same request has the same user, time and (common) random numbers in both runs.
    """
    da = np.array([o.clicks for o in a[start:]], dtype=np.float64)
    db = np.array([o.clicks for o in b[start:]], dtype=np.float64)
    m = min(len(da), len(db))
    d = da[:m] - db[:m]
    if m < 2:
        return {"requests": m, "difference": float(d.sum()), "se": float("nan")}
    return {"requests": m, "difference": float(d.sum()), "se": float(d.std(ddof=1) * math.sqrt(m))}


# --------------------------------------------------------------------------- printing
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_windows(rows_by_arm: Mapping[str, Sequence[WindowRow]]) -> str:
    """One line per window: optimal clicks per request, then realised (expected) / optimal per arm."""
    arms = list(rows_by_arm)
    first = rows_by_arm[arms[0]]
    head = f"{'requests':>13} {'opt/req':>7}  " + "  ".join(f"{a[:15]:>15}" for a in arms)
    lines = [head]
    for i, row in enumerate(first):
        cells = []
        for a in arms:
            rows = rows_by_arm[a]
            if i < len(rows):
                cells.append(f"{_fmt(rows[i].ratio)} ({_fmt(rows[i].expected_ratio)})".rjust(15))
            else:
                cells.append(f"{'–':>15}")
        mark = " <- shift" if row.phase == "shift" else ""
        opt = row.optimal / max(row.end - row.start, 1)
        lines.append(f"{row.start:>6}-{row.end - 1:<6} {opt:>7.2f}  " + "  ".join(cells) + mark)
    return "\n".join(lines)


def format_window_details(rows: Sequence[WindowRow]) -> str:
    """One arm's windows with the counts behind the ratios."""
    lines = [f"{'requests':>13} {'clicks':>7} {'expected':>9} {'optimal':>9} {'ratio':>6} {'exp.ratio':>9} "
             f"{'trained':>7}  versions"]  # fmt: skip
    for r in rows:
        vs = list(r.versions)
        shown_vs = ", ".join(vs if len(vs) <= 4 else [*vs[:2], "...", vs[-1]])
        mark = "  <- shift" if r.phase == "shift" else ""
        lines.append(f"{r.start:>6}-{r.end - 1:<6} {r.realised:>7} {r.expected:>9.1f} {r.optimal:>9.1f} "
                     f"{_fmt(r.ratio):>6} {_fmt(r.expected_ratio):>9} {r.trained:>7}  {shown_vs}{mark}")  # fmt: skip
    return "\n".join(lines)


def format_summary(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Per arm: click rate / optimal before and after the shift, recovery, cumulative reward."""
    any_s = next(iter(summaries.values()))
    w, to = any_s["window"], any_s["recover_to"]
    head = (f"{'arm':<22} {'before':>7} {'bef.last':>8} {'after':>7} {'aft.last':>8} {'lowest':>7} "
            f"{'recover':>8} {'clicks':>7} {'optimal':>8} {'regret':>7} {'trained':>7}")  # fmt: skip
    lines = [
        f"click rate / optimal (realised clicks over the optimal policy's expected clicks); "
        f"'last' = the last {w} requests of the phase, 'lowest' = the worst trailing {w} after the shift,",
        f"'recover' = requests after the shift until a trailing {w} is back at {to:.0%} of optimal "
        "(by realised clicks; – = not within the run)",
        head,
    ]
    for arm, s in summaries.items():
        after = s["after"] or {}
        aft_last = s["after_last_window"] or {}
        rec = s["recovery_requests"]
        c = s["cumulative"]
        lines.append(
            f"{arm[:22]:<22} {_fmt(s['before']['ratio']):>7} {_fmt(s['before_last_window']['ratio']):>8} "
            f"{_fmt(after.get('ratio')):>7} {_fmt(aft_last.get('ratio')):>8} {_fmt(s['lowest_window_after']):>7} "
            f"{(str(rec) if rec is not None else '–'):>8} {c['clicks']:>7,} {c['optimal']:>8,.0f} "
            f"{c['regret']:>7,.0f} {_fmt(s['trained_share'], '.0%'):>7}"
        )
    return "\n".join(lines)


def json_line(obj: Any) -> str:
    """One line of JSON, NaN and infinities as null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), sort_keys=False)


def config_dict(cfg: LoopConfig) -> dict[str, Any]:
    return asdict(cfg)
