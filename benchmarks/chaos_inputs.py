"""What the chaos run (:mod:`benchmarks.chaos`) throws at the pipeline besides SIGKILLs: bad input, forged versions.

* :func:`burst` builds the burst of bad (and valid but odd) input records for
  the input topics: garbage bytes, wrong JSON types, huge slates and texts,
  unicode and ``:`` in ids, far-future and negative timestamps, records of
  ~900 KB that grow past ``message.max.bytes`` once the join escapes them,
  keys that are not the user id.  Every record says what must become of it
  (:class:`Expect`); :func:`join_input` says whether the join must take an
  impression or click (the contract, the key, the event time against the
  Kafka timestamp: the same checks as :func:`streams.decode.decode_input`),
  so the batch reference is computed over exactly the valid inputs.
* :func:`send_raw` produces them with a raw confluent-kafka producer (no
  contract, no error policy: murmur2 partitioner only, as any client must)
  and records the partition and offset of each, so that the dead letters can
  be matched to their inputs.
* :func:`forge_versions` writes three forged versions from a real published
  one and returns their announcements: an unsigned copy and a wrongly signed
  copy inside the weight store, and a correctly signed copy outside it (a
  holder of the key without write access to the store).  Serving must refuse
  all three.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from contract.errors import RecordError
from contract.records import Click, Impression, Item, ModelUpdate, RecRequest
from contract.settings import KafkaSettings
from streams.join import check_event_time
from trainer.weight_manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    Manifest,
    sign,
    update_of,
    version_dir,
)
from trainer.weights import WeightStore

FAR_FUTURE_MS = 4_102_444_800_000
"""2100-01-01: far past any Kafka timestamp plus the join's allowed skew."""
MAX_TS = 2**53
"""The largest ``ts`` the contract accepts."""
BIG_BYTES = 900_000
"""Size of the ~900 KB records: under the broker's message.max.bytes (1 MiB), over it once escaped."""
CJK_ID_CHARS = 290
"""Characters of each id of the oversized slate: 3 bytes in UTF-8, 6 once escaped as \\uXXXX."""
OVERSIZED_SLATE = 1000
FORGED_AHEAD = 100_000
"""Forged versions are numbered this far past the store's newest one: newer than anything live, and out
of reach of the trainer's own numbering (the one outside the store at half of it)."""


class Expect(StrEnum):
    """What must become of an injected record."""

    LABEL = "label"
    """A valid impression or click: the join labels it like the batch reference."""
    DEAD_LETTER = "dead-letter"
    """Invalid (or an orphan / contradicting click): at least one dead letter names its partition and offset."""
    NO_EFFECT = "no-effect"
    """Valid and harmless (a catalog item, a duplicate, a tombstone of an unknown item): no dead letter."""
    ANSWER = "answer"
    """A valid request: answered exactly once."""
    ANSWER_OR_DEAD_LETTER = "answer-or-dead-letter"
    """A valid request whose answer may be too large to deliver: answered once, or dead-lettered."""


@dataclass
class Injected:
    """One injected record and where it landed."""

    kind: str
    topic: str
    """Logical topic (DESIGN.md name)."""
    key: bytes | None
    value: bytes | None
    expect: Expect
    timestamp_ms: int = 0
    partition: int = -1
    offset: int = -1
    error: str | None = None
    """The produce error, when the record did not land."""

    @property
    def landed(self) -> bool:
        return self.offset >= 0


def _j(doc: Any) -> bytes:
    """JSON as a client would write it: UTF-8, non-ASCII kept (so the join's ASCII escaping grows it)."""
    return json.dumps(doc, ensure_ascii=False).encode()


def catalog_items(ts: int) -> list[Item]:
    """The odd items the valid odd impressions show (unicode and ':' in ids, a text at the length cap)
    and the oversized slate's items, so that no example waits for its item in the trainer."""
    items = [
        Item(item_id="chaos🙂:ユニコード/é", text="Chaos unicode item (2026)", categories=["Drama"], ts=ts),
        Item(item_id="chaos:item:1", text="Chaos colon item", categories=["Comedy"], ts=ts),
        Item(item_id="chaos-huge-text", text=('"\\\u0001é' * 5000)[:20_000], categories=[], ts=ts),
        Item(item_id="chaos-future-item", text="An item stamped far in the future", ts=MAX_TS),
    ]
    items += [Item(item_id=oversized_item(i), text=f"oversized chaos item {i}", ts=ts) for i in range(OVERSIZED_SLATE)]
    return items


def oversized_item(i: int) -> str:
    return "巨" * (CJK_ID_CHARS - 4) + f"{i:04d}"


def burst(
    rng: random.Random,
    *,
    event_ts: int,
    movies: Sequence[str],
    last_impression: Impression | None,
    kafka_ts_ms: int,
) -> list[Injected]:
    """The burst of odd input, stamped just after ``event_ts`` (the newest event time produced so far).

    Valid impressions are stamped ``event_ts + 1 s`` and their clicks ``+ 2 s``: within the join's
    allowed lateness of the replay around them, so that they neither move a watermark nor arrive
    behind one (their labels must then equal the reference's).
    """
    t_imp, t_clk = event_ts + 1_000, event_ts + 2_000
    out: list[Injected] = []

    def add(kind: str, topic: str, key: bytes | str | None, value: bytes | None, expect: Expect) -> None:
        k = key.encode() if isinstance(key, str) else key
        out.append(Injected(kind, topic, k, value, expect, timestamp_ms=kafka_ts_ms))

    def rec(kind: str, r: Any, expect: Expect, *, key: bytes | str | None = None) -> None:
        add(kind, r.TOPIC, r.kafka_key() if key is None else key, r.to_json(), expect)

    # --- items (trainer and serving) ---------------------------------------------------------
    for it in catalog_items(event_ts):
        rec("item-odd", it, Expect.NO_EFFECT)
    add("item-text-too-long", "items", "chaos-long", _j({"schema_version": 1, "item_id": "chaos-long",
                                                         "text": "x" * 20_001, "ts": event_ts}), Expect.DEAD_LETTER)
    add("item-negative-ts", "items", "chaos-neg", _j({"schema_version": 1, "item_id": "chaos-neg",
                                                      "text": "negative", "ts": -1}), Expect.DEAD_LETTER)
    add("item-wrong-types", "items", "chaos-types", _j({"schema_version": 1, "item_id": "chaos-types",
                                                        "text": 5, "categories": "Drama", "ts": "1"}), Expect.DEAD_LETTER)
    add("item-garbage", "items", "chaos-garbage", rng.randbytes(300), Expect.DEAD_LETTER)
    add("item-tombstone-unknown", "items", "chaos-never-existed", None, Expect.NO_EFFECT)

    # --- impressions and their clicks (the join) ----------------------------------------------
    sample = list(rng.sample(list(movies), 5))
    odd = [
        ("imp-unicode-user", "用户🙂 é\u200f", "chaos-imp-unicode", [*sample, "chaos🙂:ユニコード/é"], "chaos🙂:ユニコード/é"),
        ("imp-colon-user", "chaos:user:1", "chaos-imp-colon", ["chaos:item:1", *sample[:3]], "chaos:item:1"),
        ("imp-huge-slate", "chaos-huge-slate-user", "chaos-imp-huge", rng.sample(list(movies), min(1000, len(movies))),
         None),
        ("imp-oversized", "chaos-oversized-user", "chaos-imp-oversized",
         [oversized_item(i) for i in range(OVERSIZED_SLATE)], oversized_item(0)),
    ]  # fmt: skip
    for n, (kind, user, iid, items, clicked) in enumerate(odd):
        imp = {"schema_version": 1, "impression_id": iid, "user_id": user, "items": items, "ts": t_imp + n}
        add(kind, "impressions", user, _j(imp), Expect.LABEL)
        target = clicked or items[len(items) // 2]
        click = {"schema_version": 1, "impression_id": iid, "user_id": user, "item_id": target,
                 "ts": t_clk + n, "value": 5.0}  # fmt: skip
        add(f"click-of-{kind}", "clicks", user, _j(click), Expect.LABEL)
        if n == 0:
            add("click-duplicate", "clicks", user, _j(click), Expect.NO_EFFECT)
            add("click-not-in-slate", "clicks", user, _j({**click, "item_id": "chaos-not-shown"}), Expect.DEAD_LETTER)
            add("click-other-user", "clicks", "chaos-intruder",
                _j({**click, "user_id": "chaos-intruder"}), Expect.DEAD_LETTER)  # fmt: skip
    if last_impression is not None:  # a repeated impression id changes nothing, even with another slate
        dup = last_impression.model_copy(update={"items": list(reversed(last_impression.items))})
        rec("imp-duplicate-id", dup, Expect.NO_EFFECT)
    base = {"schema_version": 1, "impression_id": "chaos-bad", "user_id": "chaos-bad-user",
            "items": sample[:2], "ts": t_imp}  # fmt: skip
    bad_imps: list[tuple[str, dict[str, Any]]] = [
        ("imp-slate-too-big", {"items": rng.sample(list(movies), min(1001, len(movies)))}),
        ("imp-colon-in-impression-id", {"impression_id": "chaos:bad"}),
        ("imp-far-future-ts", {"ts": FAR_FUTURE_MS}),
        ("imp-max-ts", {"ts": MAX_TS}),
        ("imp-negative-ts", {"ts": -5}),
        ("imp-wrong-types", {"items": "1,2,3", "ts": str(t_imp)}),
        ("imp-unsupported-schema", {"schema_version": 99}),
        ("imp-bad-propensity", {"propensities": [2.0, 0.5]}),
        ("imp-repeated-item", {"items": [sample[0], sample[0]]}),
        ("imp-id-too-long", {"user_id": "u" * 513}),
        ("imp-float-ts", {"ts": float(t_imp)}),
    ]
    for kind, patch in bad_imps:
        doc = {**base, **patch}
        add(kind, "impressions", str(doc["user_id"]), _j(doc), Expect.DEAD_LETTER)
    add("imp-key-not-user", "impressions", "someone-else", _j(base), Expect.DEAD_LETTER)
    add("imp-no-key", "impressions", None, _j(base), Expect.DEAD_LETTER)
    add("imp-garbage", "impressions", "chaos-bad-user", rng.randbytes(200), Expect.DEAD_LETTER)
    add("imp-not-utf8", "impressions", "chaos-bad-user", b"\xff\xfe" + _j(base), Expect.DEAD_LETTER)
    add("imp-empty", "impressions", "chaos-bad-user", b"", Expect.DEAD_LETTER)
    add("imp-tombstone", "impressions", "chaos-bad-user", None, Expect.DEAD_LETTER)
    add("imp-json-array", "impressions", "chaos-bad-user", b"[]", Expect.DEAD_LETTER)
    add("imp-json-null", "impressions", "chaos-bad-user", b"null", Expect.DEAD_LETTER)
    add("imp-900kb-escapes", "impressions", "chaos-bad-user", _escaped_junk(), Expect.DEAD_LETTER)

    cbase = {"schema_version": 1, "impression_id": "chaos-imp-unicode", "user_id": "用户🙂 é\u200f",
             "item_id": "chaos🙂:ユニコード/é", "ts": t_clk}  # fmt: skip
    add("click-orphan", "clicks", "chaos-orphan-user",
        _j({**cbase, "impression_id": "chaos-never-shown", "user_id": "chaos-orphan-user"}), Expect.DEAD_LETTER)
    bad_clicks: list[tuple[str, dict[str, Any]]] = [
        ("click-far-future-ts", {"ts": FAR_FUTURE_MS}),
        ("click-negative-ts", {"ts": -1}),
        ("click-value-string", {"value": "4.0"}),
        ("click-colon-in-impression-id", {"impression_id": "chaos:imp"}),
        ("click-missing-item", {"item_id": None}),
    ]
    for kind, patch in bad_clicks:
        doc = {**cbase, **patch}
        add(kind, "clicks", str(cbase["user_id"]), _j({k: v for k, v in doc.items() if v is not None}),
            Expect.DEAD_LETTER)  # fmt: skip
    add("click-value-nan", "clicks", str(cbase["user_id"]),
        json.dumps({**cbase, "value": float("nan")}).encode(), Expect.DEAD_LETTER)  # fmt: skip
    add("click-garbage", "clicks", "chaos-bad-user", rng.randbytes(64), Expect.DEAD_LETTER)
    add("click-900kb-binary", "clicks", "chaos-bad-user", rng.randbytes(BIG_BYTES), Expect.DEAD_LETTER)

    # --- requests (serving) --------------------------------------------------------------------
    rbase = {"schema_version": 1, "user_id": "用户🙂 é\u200f", "k": 5, "ts": event_ts}
    add("req-unicode-user", "rec-requests", rbase["user_id"],
        _j({**rbase, "request_id": "chaos:req:🙂"}), Expect.ANSWER)  # fmt: skip
    add("req-colon-candidates", "rec-requests", "chaos:user:1",
        _j({**rbase, "request_id": "chaos-req-colon", "user_id": "chaos:user:1", "k": 3,
            "candidates": ["chaos:item:1", *sample, "unknown:item"]}), Expect.ANSWER)  # fmt: skip
    huge = [f"候補{i:05d}" for i in range(60_000)] + sample
    add("req-900kb-candidates", "rec-requests", "chaos-huge-slate-user",
        _j({**rbase, "request_id": "chaos-req-huge", "user_id": "chaos-huge-slate-user", "candidates": huge}),
        Expect.ANSWER)  # fmt: skip
    add("req-max-ts", "rec-requests", rbase["user_id"],
        _j({**rbase, "request_id": "chaos-req-future", "ts": MAX_TS}), Expect.ANSWER)  # fmt: skip
    add("req-k-10000", "rec-requests", "chaos-oversized-user",
        _j({**rbase, "request_id": "chaos-req-k-max", "user_id": "chaos-oversized-user", "k": 10_000}),
        Expect.ANSWER_OR_DEAD_LETTER)  # fmt: skip
    bad_reqs: list[tuple[str, dict[str, Any]]] = [
        ("req-k-zero", {"k": 0}),
        ("req-k-string", {"k": "5"}),
        ("req-repeated-candidates", {"candidates": [sample[0], sample[0]]}),
        ("req-negative-ts", {"ts": -3}),
        ("req-no-id", {}),
    ]
    for n, (kind, patch) in enumerate(bad_reqs):
        doc = {**rbase, "request_id": f"chaos-bad-req-{n}", **patch}
        if kind == "req-no-id":
            doc.pop("request_id")
        add(kind, "rec-requests", str(rbase["user_id"]), _j(doc), Expect.DEAD_LETTER)
    add("req-garbage", "rec-requests", "chaos-bad-user", rng.randbytes(100), Expect.DEAD_LETTER)
    add("req-900kb-escapes", "rec-requests", "chaos-bad-user", _escaped_junk(), Expect.DEAD_LETTER)

    # --- the trainer's input and serving's state topic -------------------------------------------
    add("labeled-garbage", "labeled", "chaos-bad-user", rng.randbytes(80), Expect.DEAD_LETTER)
    add("labeled-wrong-label", "labeled", "chaos-bad-user",
        _j({"schema_version": 1, "example_id": "chaos-x:1", "impression_id": "chaos-x", "user_id": "chaos-bad-user",
            "item_id": "1", "position": 0, "label": 2, "impression_ts": 1, "label_ts": 1, "ts": 1}),
        Expect.DEAD_LETTER)  # fmt: skip
    add("labeled-example-id-mismatch", "labeled", "chaos-bad-user",
        _j({"schema_version": 1, "example_id": "chaos-x:2", "impression_id": "chaos-x", "user_id": "chaos-bad-user",
            "item_id": "1", "position": 0, "label": 1, "impression_ts": 1, "label_ts": 1, "ts": 1}),
        Expect.DEAD_LETTER)  # fmt: skip
    add("update-garbage", "model-updates", "streamrec", rng.randbytes(120), Expect.DEAD_LETTER)
    add("update-wrong-types", "model-updates", "streamrec",
        _j({"schema_version": 1, "model": "streamrec", "version": "5", "uri": 7, "sha256": "abc",
            "kind": "full", "trained_examples": -1, "ts": 1}), Expect.DEAD_LETTER)  # fmt: skip
    return out


def _escaped_junk() -> bytes:
    """A ~900 KB JSON object that is not a record: NUL characters escaped as \\u0000 (6 bytes each)."""
    n = (BIG_BYTES - 40) // 6
    return b'{"schema_version": 1, "junk": "' + b"\\u0000" * n + b'"}'


def join_input(inj: Injected, max_future_skew_ms: int) -> Impression | Click | None:
    """The impression or click the join must take from ``inj`` once it has landed (the checks of
    :func:`streams.decode.decode_input`), or None when it must dead-letter it (or it is no join input).

    Such a record moves its stream's watermark, unlike every other injected record: it must be
    stamped close to the replay's event time and sent while the replay holds still."""
    if not inj.landed:
        return None
    return join_event(inj, max_future_skew_ms)


def join_event(inj: Injected, max_future_skew_ms: int) -> Impression | Click | None:
    """:func:`join_input` before it is sent."""
    record_type = {"impressions": Impression, "clicks": Click}.get(inj.topic)
    if record_type is None:
        return None
    try:
        record = record_type.from_json(inj.value)
        if inj.key != record.user_id.encode():
            return None
        check_event_time(record_type.__name__, record.ts, inj.timestamp_ms, max_future_skew_ms)
    except (RecordError, UnicodeError):
        return None
    return record


def valid_request(inj: Injected) -> RecRequest | None:
    if inj.topic != "rec-requests" or not inj.landed:
        return None
    try:
        return RecRequest.from_json(inj.value)
    except RecordError:
        return None


def send_raw(settings: KafkaSettings, records: Iterable[Injected], *, timeout: float = 60.0) -> list[Injected]:
    """Produce ``records`` with a raw confluent-kafka producer; fill in partition, offset or error."""
    producer = Producer(settings.confluent_config(**{
        "partitioner": "murmur2_random", "client.id": "chaos-raw", "linger.ms": 5,
        "message.max.bytes": 1_000_000, "logger": logging.getLogger("chaos.raw.librdkafka"),
    }))  # fmt: skip
    sent = list(records)

    def report(inj: Injected) -> Any:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                inj.error = str(err)
            else:
                inj.partition, inj.offset = msg.partition(), msg.offset()

        return on_delivery

    for inj in sent:
        topic = settings.topic(inj.topic)
        while True:
            try:
                producer.produce(topic, value=inj.value, key=inj.key, timestamp=inj.timestamp_ms,
                                 on_delivery=report(inj))  # fmt: skip
                break
            except BufferError:
                producer.poll(0.1)
            except Exception as exc:  # refused by the client (too large, ...): recorded, not raised
                inj.error = f"{type(exc).__name__}: {exc}"
                break
        producer.poll(0)
    left = producer.flush(timeout)
    if left:
        for inj in sent:
            if not inj.landed and inj.error is None:
                inj.error = f"not acknowledged within {timeout:.0f} s"
    return sent


# --- forged versions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forged:
    kind: str
    version: int
    uri: str
    update: ModelUpdate


def forge_versions(
    weights_root: Path, foreign_root: Path, signing_key: bytes, *, model_name: str = "streamrec"
) -> list[Forged]:
    """Three forged versions made from the newest real full version (none when there is no full version).

    Version numbers: past the store's newest directory, so each looks newer than anything live
    (the in-store ones make the trainer number its next versions past them, as any directory there
    does); the outside one is numbered below the in-store ones, so the trainer never reaches it.
    """
    store = WeightStore(str(weights_root))
    fulls = []
    for v in store.versions():
        try:
            if store.manifest(v).kind == "full":
                fulls.append(v)
        except Exception:  # a half-written or pruned version: not a source
            continue
    if not fulls:
        return []
    src = max(fulls)
    src_dir = weights_root / version_dir(src)
    data = (src_dir / MANIFEST_FILE).read_bytes()
    man = Manifest.from_json(data, f"version {src}")
    top = store.next_version() - 1
    now = int(time.time() * 1000)
    plan = [
        ("unsigned-in-store", top + FORGED_AHEAD, weights_root, None),
        ("wrongly-signed-in-store", top + FORGED_AHEAD + 1, weights_root, b"not-the-signing-key"),
        ("signed-outside-store", top + FORGED_AHEAD // 2, foreign_root, signing_key),
    ]
    out = []
    for kind, version, root, key in plan:
        vdir = root / version_dir(version)
        vdir.mkdir(parents=True, exist_ok=False)
        shutil.copyfile(src_dir / WEIGHTS_FILE, vdir / WEIGHTS_FILE)
        forged = dataclasses.replace(man, version=version, created_ts=now).to_json()
        if key is not None:
            (vdir / SIGNATURE_FILE).write_bytes(sign(key, forged))
        (vdir / MANIFEST_FILE).write_bytes(forged)
        uri = (vdir / MANIFEST_FILE).resolve().as_uri()
        update = update_of(Manifest.from_json(forged, kind), uri)
        out.append(Forged(kind, version, uri, update.model_copy(update={"model": model_name, "ts": now})))
    return out
