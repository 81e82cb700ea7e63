"""The figures of a chaos run (:mod:`benchmarks.chaos`), computed from what the run read back.

Pure functions over the records of the output topics (as :class:`harness.live.Msg`), the batch
reference join, the trainer's trained-ids log and the services' logs; nothing here talks to Kafka.

* :func:`label_figures`: ``labeled`` against the reference over the valid inputs. *missing* and
  *unexpected* count ``(example_id, label)`` pairs; *flipped* counts example ids present on both
  sides whose set of labels differs (e.g. the reference's positive came out as a negative plus a
  late positive: its click arrived after its window had closed); *re-emitted* counts records that
  repeat an ``(example_id, label, late)`` already emitted.
* :func:`trained_figures`: examples trained more than once in the lineage the trainer ended on
  (its trained-ids log, which a restart rolls back to its checkpoint), and those trained in work a
  SIGKILL threw away (the rolled-back tails, redone by the resumed lineage).
* :func:`request_figures`, :func:`dead_letter_reasons`, :func:`injected_accounting`,
  :func:`version_figures`: answers per request, dead letters by source and reason, what became of
  each injected record, and which versions answered (forged ones must not).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.chaos_inputs import Expect, Injected
from contract.errors import RecordError
from contract.records import DeadLetter, Labeled, ModelUpdate, Recommendation, RecRequest
from harness.live import Msg
from streams.join import ReferenceJoin

# --- labels -----------------------------------------------------------------------------------------


@dataclass
class LabelFigures:
    expected_pairs: int = 0
    got_pairs: int = 0
    records: int = 0
    undecodable: int = 0
    missing: int = 0
    """Reference ``(example_id, label)`` pairs never emitted."""
    unexpected: int = 0
    """Emitted pairs the reference does not have."""
    flipped: int = 0
    """Example ids on both sides whose label sets differ."""
    missing_examples: int = 0
    """Reference example ids never emitted at all."""
    unexpected_examples: int = 0
    """Emitted example ids the reference does not know."""
    reemitted: int = 0
    late: int = 0
    patterns: Counter[str] = field(default_factory=Counter)
    """``ref {labels} -> got {labels}`` per differing example id (``1L``: a late positive)."""
    by_impression_kind: Counter[str] = field(default_factory=Counter)
    """Differing example ids by the kind of impression (``movielens`` or the injected kind)."""
    samples: list[str] = field(default_factory=list)
    wrong_at: list[tuple[str, int]] = field(default_factory=list)
    """(example_id, Kafka timestamp of its first wrong record) per flipped or unexpected example."""
    wrong_partitions: Counter[int] = field(default_factory=Counter)
    """``labeled`` partition of each example's first wrong record."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected_pairs": self.expected_pairs, "got_pairs": self.got_pairs, "records": self.records,
            "missing": self.missing, "unexpected": self.unexpected, "flipped": self.flipped,
            "missing_examples": self.missing_examples, "unexpected_examples": self.unexpected_examples,
            "reemitted": self.reemitted, "late": self.late, "undecodable": self.undecodable,
            "patterns": dict(self.patterns.most_common()), "by_impression": dict(self.by_impression_kind),
            "wrong_by_partition": {str(p): n for p, n in sorted(self.wrong_partitions.items())},
        }  # fmt: skip


def _labels(pairs: Iterable[tuple[int, bool]]) -> str:
    return "{" + ",".join(sorted(f"{lab}{'L' if late else ''}" for lab, late in set(pairs))) + "}"


def label_figures(
    labeled: Sequence[Msg], reference: ReferenceJoin, impression_kinds: Mapping[str, str], samples: int = 8
) -> LabelFigures:
    """``labeled`` against the reference; ``impression_kinds``: injected impression id -> its kind."""
    fig = LabelFigures()
    got: dict[str, list[tuple[int, bool, int, int]]] = defaultdict(list)  # eid -> (label, late, kafka ts, partition)
    seen: set[tuple[str, int, bool]] = set()
    for m in labeled:
        try:
            rec = Labeled.from_json(m.value)
        except RecordError:
            fig.undecodable += 1
            continue
        fig.records += 1
        key = (rec.example_id, rec.label, rec.late)
        if key in seen:
            fig.reemitted += 1
            continue
        seen.add(key)
        fig.late += rec.late
        got[rec.example_id].append((rec.label, rec.late, m.timestamp_ms, m.partition))
    ref: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    imp_of: dict[str, str] = {}
    for e in reference.examples:
        ref[e.example_id].append((e.label, e.late))
        imp_of[e.example_id] = e.impression_id
    ref_pairs = {(eid, lab) for eid, ls in ref.items() for lab, _ in ls}
    got_pairs = {(eid, lab) for eid, ls in got.items() for lab, *_ in ls}
    fig.expected_pairs, fig.got_pairs = len(ref_pairs), len(got_pairs)
    fig.missing = len(ref_pairs - got_pairs)
    fig.unexpected = len(got_pairs - ref_pairs)
    fig.missing_examples = len(ref.keys() - got.keys())
    fig.unexpected_examples = len(got.keys() - ref.keys())
    for eid in sorted(ref.keys() | got.keys()):
        r = {lab for lab, _ in ref.get(eid, [])}
        g = {lab for lab, *_ in got.get(eid, [])}
        if r == g:
            continue
        if r and g:
            fig.flipped += 1
        got_labels = _labels((lab, late) for lab, late, *_ in got.get(eid, []))
        pattern = f"ref {_labels(ref.get(eid, [])) if r else '{}'} -> got {got_labels if g else '{}'}"
        fig.patterns[pattern] += 1
        iid = imp_of.get(eid) or eid.partition(":")[0]
        fig.by_impression_kind[impression_kinds.get(iid, "movielens")] += 1
        wrong = sorted((ts, p) for lab, _, ts, p in got.get(eid, []) if lab not in r)
        if wrong:
            fig.wrong_at.append((eid, wrong[0][0]))
            fig.wrong_partitions[wrong[0][1]] += 1
        if len(fig.samples) < samples:
            fig.samples.append(f"{eid[:80]}: {pattern}")
    return fig


# --- training -------------------------------------------------------------------------------------------


@dataclass
class TrainedFigures:
    lineage_lines: int = 0
    trained: int = 0
    held_back: int = 0
    more_than_once: int = 0
    """Extra trainings (T or H lines beyond one per emitted ``example_id#late`` key) in the final lineage."""
    examples_more_than_once: int = 0
    rolled_back: int = 0
    """Examples trained in work a SIGKILL threw away (rolled back with the checkpoint, then redone)."""
    rollbacks: list[int] = field(default_factory=list)
    """Examples rolled back at each restart of the trainer."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_ROLLBACK = re.compile(rb"trained-ids log: rolling back (\d+) bytes")


def parse_ids(data: bytes) -> list[tuple[str, str]]:
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        kind, _, eid = line.partition(" ")
        if eid:
            out.append((kind, eid))
    return out


def trained_figures(
    lineage: bytes, labeled: Sequence[Msg], kills: Sequence[tuple[bytes, bytes]]
) -> TrainedFigures:
    """``lineage``: the trained-ids log at the end; ``kills``: per restart of the trainer, the log as it
    was when the trainer died and the trainer's own log written by the restart (which says how many
    bytes it rolled back)."""
    fig = TrainedFigures()
    keys: dict[str, set[bool]] = defaultdict(set)
    for m in labeled:
        try:
            rec = Labeled.from_json(m.value)
        except RecordError:
            continue
        keys[rec.example_id].add(rec.late)
    counts: Counter[str] = Counter()
    for kind, eid in parse_ids(lineage):
        fig.lineage_lines += 1
        counts[eid] += 1
        if kind == "T":
            fig.trained += 1
        else:
            fig.held_back += 1
    for eid, n in counts.items():
        extra = n - max(1, len(keys.get(eid, ())))
        if extra > 0:
            fig.more_than_once += extra
            fig.examples_more_than_once += 1
    for at_death, restart_log in kills:
        m = _ROLLBACK.search(restart_log)
        n = int(m.group(1)) if m else 0
        tail = at_death[len(at_death) - n:] if n else b""
        rolled = sum(1 for kind, _ in parse_ids(tail) if kind == "T")
        fig.rollbacks.append(rolled)
        fig.rolled_back += rolled
    return fig


# --- requests -------------------------------------------------------------------------------------------


@dataclass
class RequestFigures:
    sent: int = 0
    answered_once: int = 0
    answered_0: int = 0
    answered_more: int = 0
    extra_answers: int = 0
    dead_lettered: int = 0
    """Valid requests dead-lettered instead of answered (e.g. an answer too large to deliver)."""
    unknown_answers: int = 0
    undecodable: int = 0
    unanswered_samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "unanswered_samples"}


def request_figures(
    recs: Sequence[Msg], sent: Iterable[str], dead_lettered: Iterable[str] = ()
) -> RequestFigures:
    fig = RequestFigures()
    answers: Counter[str] = Counter()
    for m in recs:
        try:
            answers[Recommendation.from_json(m.value).request_id] += 1
        except RecordError:
            fig.undecodable += 1
    wanted = set(sent)
    dead = set(dead_lettered) & wanted
    fig.sent = len(wanted)
    fig.dead_lettered = len(dead)
    for rid in sorted(wanted):
        n = answers.get(rid, 0)
        if n == 0 and rid not in dead:
            fig.answered_0 += 1
            if len(fig.unanswered_samples) < 5:
                fig.unanswered_samples.append(rid)
        elif n == 1:
            fig.answered_once += 1
        elif n > 1:
            fig.answered_more += 1
            fig.extra_answers += n - 1
    fig.unknown_answers = sum(n for rid, n in answers.items() if rid not in wanted)
    return fig


# --- dead letters --------------------------------------------------------------------------------------


def decode_dead_letters(msgs: Sequence[Msg]) -> tuple[list[DeadLetter], int]:
    out, bad = [], 0
    for m in msgs:
        try:
            out.append(DeadLetter.from_json(m.value))
        except RecordError:
            bad += 1
    return out, bad


_QUOTED = re.compile(r"b?'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_of(error: str) -> str:
    """A dead letter's error without its particulars (quoted values, numbers), to count by reason."""
    text = error.split(" [raw value truncated")[0]
    if text.startswith("orphan click"):
        return text.split(":")[0]
    text = _NUMBER.sub("N", _QUOTED.sub("…", text))
    return text if len(text) <= 100 else text[:99] + "…"


def logical_topic(real: str, prefix: str) -> str:
    name = real.removeprefix(prefix)
    return "join-state-changelog" if name.endswith("-changelog") else name


def dead_letter_reasons(dls: Iterable[DeadLetter], prefix: str) -> Counter[str]:
    return Counter(f"{logical_topic(d.source_topic, prefix)}: {reason_of(d.error)}" for d in dls)


@dataclass
class InjectedFigures:
    injected: int = 0
    not_landed: list[str] = field(default_factory=list)
    must_dead_letter: int = 0
    dead_lettered: int = 0
    dead_letters_per_record: Counter[int] = field(default_factory=Counter)
    not_dead_lettered: list[str] = field(default_factory=list)
    valid_but_dead_lettered: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "injected": self.injected, "not_landed": self.not_landed, "must_dead_letter": self.must_dead_letter,
            "dead_lettered": self.dead_lettered, "not_dead_lettered": self.not_dead_lettered,
            "valid_but_dead_lettered": self.valid_but_dead_lettered,
        }  # fmt: skip


def injected_accounting(injected: Sequence[Injected], dls: Iterable[DeadLetter], prefix: str) -> InjectedFigures:
    """What became of each injected record: the dead letters that name its topic, partition and offset."""
    fig = InjectedFigures(injected=len(injected))
    per: Counter[tuple[str, int, int]] = Counter(
        (logical_topic(d.source_topic, prefix), d.partition, d.offset) for d in dls
    )
    for inj in injected:
        if not inj.landed:
            fig.not_landed.append(f"{inj.kind} ({inj.error})")
            continue
        n = per.get((inj.topic, inj.partition, inj.offset), 0)
        if inj.expect is Expect.DEAD_LETTER:
            fig.must_dead_letter += 1
            fig.dead_letters_per_record[n] += 1
            if n:
                fig.dead_lettered += 1
            else:
                fig.not_dead_lettered.append(inj.kind)
        elif n and inj.expect is not Expect.ANSWER_OR_DEAD_LETTER:
            fig.valid_but_dead_lettered.append(inj.kind)
    return fig


def dead_lettered_requests(injected: Sequence[Injected], dls: Iterable[DeadLetter], prefix: str) -> set[str]:
    """Request ids of injected valid requests that serving dead-lettered."""
    where = {(logical_topic(d.source_topic, prefix), d.partition, d.offset) for d in dls}
    out = set()
    for inj in injected:
        if inj.topic == "rec-requests" and (inj.topic, inj.partition, inj.offset) in where:
            try:
                out.add(RecRequest.from_json(inj.value).request_id)
            except RecordError:
                continue
    return out


# --- versions --------------------------------------------------------------------------------------------


@dataclass
class VersionFigures:
    announced_real: int = 0
    announced_forged: int = 0
    undecodable_announcements: int = 0
    newest_real: int | None = None
    offset_regressions: int = 0
    """Real versions whose trained-up-to offset of some partition is below an older real version's."""
    served_by: Counter[str] = field(default_factory=Counter)
    forged_served: int = 0
    unknown_served: int = 0
    refusals: dict[int, list[str]] = field(default_factory=dict)
    """Forged version -> the reasons serving logged when it refused it (one per attempt)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "announced_real": self.announced_real, "announced_forged": self.announced_forged,
            "newest_real": self.newest_real, "offset_regressions": self.offset_regressions,
            "forged_served": self.forged_served, "unknown_served": self.unknown_served,
            "served_by": dict(self.served_by), "forged_refusals": {str(k): v for k, v in self.refusals.items()},
            "undecodable_announcements": self.undecodable_announcements,
        }  # fmt: skip


_REFUSED = re.compile(r"refused model version (\d+) \(([a-z_]+)\)")
_SKIPPED = re.compile(r"skipping version (\d+): ")
""":meth:`trainer.weights.WeightStore.latest_valid` in an agent's start-up, when no announced version loaded."""


def version_figures(
    updates: Sequence[Msg], recs: Sequence[Msg], forged: Iterable[int], serving_log: str, fallback: str
) -> VersionFigures:
    fig = VersionFigures()
    forged_set = set(forged)
    real: dict[int, ModelUpdate] = {}
    for m in updates:
        try:
            u = ModelUpdate.from_json(m.value)
        except RecordError:
            fig.undecodable_announcements += 1
            continue
        if u.version in forged_set:
            fig.announced_forged += 1
        else:
            real.setdefault(u.version, u)
    fig.announced_real = len(real)
    fig.newest_real = max(real, default=None)
    high: dict[str, int] = {}
    for v in sorted(real):
        offsets = real[v].source_offsets
        if any(offsets.get(p, 0) < o for p, o in high.items()):
            fig.offset_regressions += 1
        for p, o in offsets.items():
            high[p] = max(high.get(p, 0), o)
    real_names = {str(v) for v in real}
    forged_names = {str(v) for v in forged_set}
    for m in recs:
        try:
            version = Recommendation.from_json(m.value).model_version
        except RecordError:
            continue
        if version == fallback:
            fig.served_by["fallback"] += 1
        elif version in real_names:
            fig.served_by["real version"] += 1
        elif version in forged_names:
            fig.forged_served += 1
            fig.served_by[f"FORGED {version}"] += 1
        else:
            fig.unknown_served += 1
            fig.served_by[f"unknown {version}"] += 1
    for match in _REFUSED.finditer(serving_log):
        v = int(match.group(1))
        if v in forged_set:
            fig.refusals.setdefault(v, []).append(match.group(2))
    for match in _SKIPPED.finditer(serving_log):
        v = int(match.group(1))
        if v in forged_set:
            fig.refusals.setdefault(v, []).append("skipped by the start-up store scan")
    for v in forged_set:
        fig.refusals.setdefault(v, [])
    return fig


def longest_gap(msgs: Sequence[Msg], start_ms: int, end_ms: int) -> tuple[float, float]:
    """The longest stretch (s) between ``start_ms`` and ``end_ms`` without a record, and when it began
    (s after ``start_ms``)."""
    times = sorted(m.timestamp_ms for m in msgs if start_ms <= m.timestamp_ms <= end_ms)
    best, at, prev = 0.0, 0.0, start_ms
    for t in [*times, end_ms]:
        if (t - prev) / 1000 > best:
            best, at = (t - prev) / 1000, (prev - start_ms) / 1000
        prev = t
    return best, at


# --- timing ----------------------------------------------------------------------------------------------


def by_run_time(times_ms: Iterable[int], start_ms: int, bucket_s: int = 10) -> dict[str, int]:
    """How many of ``times_ms`` (wall ms) fall in each ``bucket_s`` of the run (``"50-60": n``)."""
    out: Counter[int] = Counter(max(0, (t - start_ms) // 1000 // bucket_s) for t in times_ms)
    return {f"{b * bucket_s}-{(b + 1) * bucket_s}": out[b] for b in sorted(out)}
