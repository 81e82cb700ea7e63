"""The figures of the pipeline report, computed from the records one run read back.

:func:`build_report` turns what :mod:`harness.live` collected (every record
of ``labeled``, ``model-updates``, ``recommendations``, ``clicks``,
``user-history`` and ``dead-letters``, with partitions, offsets and Kafka
timestamps), the requests sent and the batch reference join into a
:class:`~harness.pipeline_report.PipelineReport`; what each figure means is
in :mod:`harness.pipeline`.  The pure parts are tested on their own:
:func:`fallback_hits` (the popularity fallback's top-k per request, rebuilt
with the serving agent's own code), :func:`version_sizes` (bytes per version
kind from the weight store) and :func:`refusals_in_log` (the guardrail's
refusals counted in the trainer's log).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from contract.records import Click, Labeled, ModelUpdate, Recommendation, UserHistory
from harness.live import Msg
from harness.pipeline_report import PipelineReport, SameRequests
from serving.scoring import appended_items, top_k
from serving.settings import ServingSettings
from trainer.guardrail import Refusal
from trainer.popularity import Popularity
from trainer.weights import WeightsError, WeightStore


class Reference(Protocol):
    """The batch reference join's result (:func:`streams.join.reference_join`)."""

    def pairs(self) -> set[tuple[str, int]]: ...
    def positives(self) -> set[str]: ...
    def negatives(self) -> set[str]: ...


@dataclass(frozen=True)
class RunRecords:
    """What one run produced, sent and read back: the input of :func:`build_report`."""

    topics: Mapping[str, list[Msg]]
    """Records read back, by DESIGN.md topic name (``labeled``, ``model-updates``, ...)."""
    labeled_topic: str
    """The real name of ``labeled`` (the keys of a version's ``source_offsets`` start with it)."""
    reference: Reference
    sent: Mapping[str, tuple[str, int]]
    """request_id -> (user_id, event time of the request)."""
    produced: Mapping[str, int]
    """Records the replay produced, by topic."""
    catalog: list[str]
    refusals: dict[str, int]
    caught_up: bool
    elapsed_s: float


def fallback_hits(
    requests: Iterable[tuple[int, int, set[str], str]],
    history: Iterable[tuple[int, UserHistory]],
    catalog: list[str],
    *,
    half_life_s: float,
    history_length: int,
) -> list[bool]:
    """Whether the popularity fallback's top-k would have hit, per request.

    ``requests``: (Kafka timestamp of the recommendation, k, items the user
    clicked later); ``history``: ``user-history`` records with their Kafka
    timestamps.  Popularity is rebuilt exactly as the serving agent builds it
    (:class:`serving.scoring.Popularity` fed by
    :func:`serving.scoring.appended_items`) from the records produced up to
    each recommendation, and the catalog ranked by :func:`serving.scoring.top_k`
    (ties broken as serving breaks them, by the request_id: each request's fourth field; "" =
    to the smaller item_id).  Answers in the order of ``requests``.
    """
    reqs = sorted(enumerate(requests), key=lambda e: e[1][0])
    hist = sorted(history, key=lambda h: h[0])
    pop = Popularity(half_life_s)
    users: dict[str, tuple[str, ...]] = {}
    out: dict[int, bool] = {}
    j = 0
    for idx, (wall, k, later, request_id) in reqs:
        while j < len(hist) and hist[j][0] <= wall:
            rec = hist[j][1]
            old = users.get(rec.user_id, ())
            pop.add(appended_items(old, rec.items, history_length), rec.ts)
            users[rec.user_id] = tuple(rec.items[-history_length:])
            j += 1
        ranked = top_k(pop.vector(catalog), catalog, k, request_id)
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


def _labeled(m: Msg) -> Labeled:
    return Labeled.from_json(m.value)


def _rec(m: Msg) -> Recommendation:
    return Recommendation.from_json(m.value)


def _kind(rec: Recommendation) -> str:
    return "fallback" if rec.model_version.startswith("fallback") else "model"


def labeled_pair(m: Msg) -> tuple[str, int]:
    """``(example_id, label)`` of a ``labeled`` record."""
    rec = _labeled(m)
    return rec.example_id, rec.label


def build_report(
    run: RunRecords, *, weights: Path, serving: ServingSettings, k: int, hit_horizon_ms: int
) -> PipelineReport:
    """Every figure of the report from the records of the run (see :mod:`harness.pipeline`)."""
    labeled = [(m, _labeled(m)) for m in run.topics["labeled"]]
    first: dict[str, tuple[Msg, Labeled]] = {}
    for m, rec in labeled:
        first.setdefault(rec.example_id, (m, rec))
    got_pairs = {(rec.example_id, rec.label) for _, rec in first.values()}
    expected = run.reference.pairs()
    updates = sorted((ModelUpdate.from_json(m.value) for m in run.topics["model-updates"]), key=lambda u: u.version)
    recs = [(m, _rec(m)) for m in run.topics["recommendations"]]
    by_version: dict[str, int] = defaultdict(int)
    for _, r in recs:
        by_version[_kind(r)] += 1
    clicks = [(m, Click.from_json(m.value)) for m in run.topics["clicks"]]
    hit_rate, hit_requests, same = _hit_rates(run, recs, clicks, serving=serving, k=k, horizon_ms=hit_horizon_ms)
    fresh_trained, fresh_served, clicks_total = _freshness(run.labeled_topic, first, clicks, updates, recs)
    labeled_rate, trainer_rate = _rates(run.topics["labeled"], updates)
    sizes, unreadable = version_sizes(WeightStore(weights), [u.version for u in updates])
    start_ms = min((m.timestamp_ms for m, _ in clicks), default=0)
    return PipelineReport(
        events=dict(run.produced),
        labeled_positives=sum(1 for _, r in first.values() if r.label == 1),
        labeled_negatives=sum(1 for _, r in first.values() if r.label == 0),
        labeled_late=sum(1 for _, r in first.values() if r.late),
        labeled_duplicates=len(labeled) - len(first),
        labels_match_reference=got_pairs == expected,
        reference_positives=len(run.reference.positives()),
        reference_negatives=len(run.reference.negatives()),
        labels_missing=len(expected - got_pairs),
        labels_unexpected=len(got_pairs - expected),
        dead_letters=len(run.topics["dead-letters"]),
        versions=_versions(run.labeled_topic, labeled, updates),
        versions_after_start=sum(1 for u in updates if u.created_ts >= start_ms),
        requests_sent=len(run.sent),
        recommendations=len(recs),
        recommendations_by_version=dict(by_version),
        hit_rate=hit_rate,
        hit_requests=hit_requests,
        same_requests=same,
        version_bytes=sizes,
        versions_unreadable=unreadable,
        refusals=run.refusals,
        freshness_trained_s=fresh_trained,
        freshness_served_s=fresh_served,
        clicks_total=clicks_total,
        trainer_caught_up=run.caught_up,
        labeled_rate=labeled_rate,
        trainer_rate=trainer_rate,
        elapsed_s=run.elapsed_s,
    )


def _versions(
    labeled_topic: str, labeled: list[tuple[Msg, Labeled]], updates: list[ModelUpdate]
) -> list[dict[str, object]]:
    """Each version with the newest labeled event time it had consumed (its place on the event-time axis)."""
    by_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for m, rec in labeled:
        by_partition[m.partition].append((m.offset, rec.label_ts))
    for lst in by_partition.values():
        lst.sort()
    versions: list[dict[str, object]] = []
    for u in updates:
        ev = 0
        for p, lst in by_partition.items():
            end = u.source_offsets.get(f"{labeled_topic}:{p}", 0)
            upto = [ts for off, ts in lst if off < end]
            if upto:
                ev = max(ev, max(upto))
        versions.append({"version": u.version, "kind": u.kind, "created_ts": u.created_ts, "event_ts": ev,
                         "trained_examples": u.trained_examples, "metrics": dict(u.metrics)})
    return versions


def _hit_rates(
    run: RunRecords,
    recs: list[tuple[Msg, Recommendation]],
    clicks: list[tuple[Msg, Click]],
    *,
    serving: ServingSettings,
    k: int,
    horizon_ms: int,
) -> tuple[dict[str, float], dict[str, int], SameRequests]:
    """Hit rates by path, the measured requests by path, and model vs fallback on the same requests.

    A hit: a click by the same user on a recommended item, produced after the
    recommendation (wall clock: the scorer cannot have seen it) and within the
    horizon of the request's event time.
    """
    clicks_by_user: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for m, c in clicks:
        clicks_by_user[c.user_id].append((c.ts, c.item_id, m.timestamp_ms))
    hits: dict[str, int] = defaultdict(int)
    counted: dict[str, int] = defaultdict(int)
    by_model: list[tuple[int, int, set[str], str]] = []
    model_hits: list[bool] = []
    for rm, r in recs:
        if r.request_id not in run.sent:
            continue
        user, t0 = run.sent[r.request_id]
        later = {
            item for ts, item, wall in clicks_by_user.get(user, ())
            if wall > rm.timestamp_ms and ts <= t0 + horizon_ms
        }
        if not later:
            continue
        kind = _kind(r)
        hit = any(i.item_id in later for i in r.items)
        for path in (kind, "all"):
            counted[path] += 1
            hits[path] += hit
        if kind == "model":
            by_model.append((rm.timestamp_ms, len(r.items), later, r.request_id))
            model_hits.append(hit)
    history = [(m.timestamp_ms, UserHistory.from_json(m.value)) for m in run.topics["user-history"] if m.value]
    same = SameRequests(
        k=k, model_hits=model_hits,
        fallback_hits=fallback_hits(by_model, history, run.catalog, half_life_s=serving.popularity_half_life_s,
                                    history_length=serving.history_length),
    )  # fmt: skip
    return {p: hits[p] / counted[p] for p in counted}, dict(counted), same


def _freshness(
    labeled_topic: str,
    first: Mapping[str, tuple[Msg, Labeled]],
    clicks: list[tuple[Msg, Click]],
    updates: list[ModelUpdate],
    recs: list[tuple[Msg, Recommendation]],
) -> tuple[list[float], list[float], int]:
    """Per click: produced → first version covering its positive → first recommendation by it (seconds)."""
    first_served: dict[str, int] = {}
    for m, r in recs:
        if _kind(r) == "model":
            first_served[r.model_version] = min(first_served.get(r.model_version, m.timestamp_ms), m.timestamp_ms)
    click_wall: dict[str, int] = {}
    for m, c in clicks:
        click_wall.setdefault(f"{c.impression_id}:{c.item_id}", m.timestamp_ms)
    fresh_trained: list[float] = []
    fresh_served: list[float] = []
    for eid, (m, rec) in first.items():
        if rec.label != 1 or eid not in click_wall:
            continue
        key = f"{labeled_topic}:{m.partition}"
        v = next((u for u in updates if u.source_offsets.get(key, 0) > m.offset), None)
        if v is None:
            continue
        fresh_trained.append(max(0.0, (v.created_ts - click_wall[eid]) / 1000))
        served = first_served.get(str(v.version))
        if served is not None:
            fresh_served.append(max(0.0, (served - click_wall[eid]) / 1000))
    return fresh_trained, fresh_served, len(click_wall)


def _rates(labeled: list[Msg], updates: list[ModelUpdate]) -> tuple[float, float]:
    """Labeled/s the join emitted (first to last), and labeled/s the trainer consumed (first to last version)."""
    label_times = [m.timestamp_ms for m in labeled]
    labeled_rate = (
        len(label_times) / ((max(label_times) - min(label_times)) / 1000)
        if len(label_times) > 1 and max(label_times) > min(label_times) else 0.0
    )
    consumed = [sum(u.source_offsets.values()) for u in updates]
    span_s = (updates[-1].created_ts - updates[0].created_ts) / 1000 if len(updates) > 1 else 0.0
    trainer_rate = (consumed[-1] - consumed[0]) / span_s if span_s > 0 else 0.0
    return labeled_rate, trainer_rate
