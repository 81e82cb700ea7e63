"""The join worker on a real broker, as subprocesses (``python -m streams.worker``).

Every test compares what lands on ``labeled`` with :func:`streams.join.reference_join`
computed from the same input at once.  Workers get a short idle timeout so the
windows still open at the end of the input close soon after it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contract.records import Click, DeadLetter, Impression, Labeled
from contract.settings import KafkaSettings
from contract.topics import CLICKS, DEAD_LETTERS, IMPRESSIONS, LABELED
from infra.kafka import MAX_RAW_BYTES
from streams.delivery import Delivery
from streams.join import ReferenceJoin, reference_join
from streams.metrics import JoinMetrics
from tests.kafka_utils import consume, produce_raw

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WINDOW_MS = 60_000
HISTORY = 10_000  # no truncation: histories compare exactly
JOIN_ENV = {
    "STREAMREC_JOIN_WINDOW_MS": str(WINDOW_MS),
    "STREAMREC_JOIN_ALLOWED_LATENESS_MS": "1000",
    "STREAMREC_JOIN_IDLE_TIMEOUT_S": "2",
    "STREAMREC_JOIN_HISTORY_LENGTH": str(HISTORY),
    "STREAMREC_JOIN_SESSION_TIMEOUT_S": "6",
    "STREAMREC_JOIN_BATCH_MAX": "500",
}


# --- workers as subprocesses -------------------------------------------------------------


class Worker:
    """One ``python -m streams.worker`` process; its output goes to a log file."""

    def __init__(self, settings: KafkaSettings, log: Path, env: dict[str, str]) -> None:
        self.log = log
        full = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        full.update(
            STREAMREC_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
            STREAMREC_TOPIC_PREFIX=settings.topic_prefix,
            STREAMREC_JOIN_DATA_DIR=str(log.parent / "faust-data"),
            **JOIN_ENV,
        )
        full.update(env)
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker", "--log-level", "info"],
            cwd=PROJECT_ROOT,
            env=full,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Until the log matches (or the process died / the timeout passed)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            found = regex.search(self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker log never showed {pattern!r}:\n{self.tail()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def start_worker(kafka_settings: KafkaSettings, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(**env: str) -> Worker:
        w = Worker(kafka_settings, tmp_path / f"worker-{len(workers)}.log", env)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (comments skipped)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# --- inputs and expectations ----------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens_events() -> tuple[list[Impression], list[Click]]:
    """The first 1,500 MovieLens ratings as impressions (slates of 10) and clicks."""
    from infra.assets import AssetError, movielens_path
    from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig

    try:
        path = movielens_path()
    except AssetError as exc:
        pytest.skip(f"MovieLens-100k not available: {exc}")
    replay = MovieLensReplay.from_path(path, MovieLensReplayConfig(limit=1_500))
    impressions: list[Impression] = []
    clicks: list[Click] = []
    for spec, record in replay.stream():
        if spec is IMPRESSIONS:
            impressions.append(record)  # type: ignore[arg-type]
        elif spec is CLICKS:
            clicks.append(record)  # type: ignore[arg-type]
    return impressions, clicks


def read_labeled(settings: KafkaSettings, ref: ReferenceJoin, timeout: float = 90.0) -> list[Labeled]:
    """Read ``labeled`` until every reference (example_id, label) is there, then whatever else is."""
    want = ref.pairs()
    got: list[Labeled] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = {(r.example_id, r.label) for r in got}
        if want <= have:
            break
        more = len(want - have)
        got = consume(settings, LABELED, count=len(got) + more, timeout=max(1.0, deadline - time.monotonic()))  # type: ignore[assignment]
    # anything beyond the expected records (duplicates, or wrong ones) is there by now
    return consume(settings, LABELED, count=len(got) + 1, timeout=3.0)  # type: ignore[return-value]


def assert_matches_reference(got: list[Labeled], ref: ReferenceJoin, *, exact_once: bool) -> None:
    pairs = Counter((r.example_id, r.label) for r in got)
    missing = ref.pairs() - set(pairs)
    extra = set(pairs) - ref.pairs()
    assert not missing, f"{len(missing)} reference examples never labeled, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} examples not in the reference, e.g. {sorted(extra)[:5]}"
    if exact_once:
        assert max(pairs.values()) == 1, f"duplicates: {[p for p, n in pairs.items() if n > 1][:5]}"
    by_pair = {(e.example_id, e.label): e for e in ref.examples}
    for r in got:
        expected = by_pair[(r.example_id, r.label)]
        assert (r.position, r.late, r.impression_ts, r.user_id) == (
            expected.position, expected.late, expected.impression_ts, expected.user_id,
        )
        if r.label == 0:  # negatives are decided once every earlier click arrived
            assert Counter(r.history) == Counter(expected.history), r.example_id


def reference(impressions: list[Impression], clicks: list[Click]) -> ReferenceJoin:
    return reference_join(impressions, clicks, window_ms=WINDOW_MS, history_length=HISTORY)


def produce_events(settings: KafkaSettings, impressions: list[Impression], clicks: list[Click]) -> None:
    """Both streams interleaved in event-time order, as live producers would send them."""
    from streams.replay.producer import produce as replay_produce

    events = sorted(
        [(IMPRESSIONS, i) for i in impressions] + [(CLICKS, c) for c in clicks],
        key=lambda e: (e[1].ts, e[0] is CLICKS),
    )
    result = replay_produce(events, settings, progress=False)
    assert result.failed == 0


# --- the tests --------------------------------------------------------------------------------


def test_movielens_slice_gets_exactly_the_reference_labels(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    impressions, clicks = movielens_events
    ref = reference(impressions, clicks)
    assert ref.positives() == {f"{c.impression_id}:{c.item_id}" for c in clicks}
    assert len(ref.negatives()) == 10 * len(impressions) - len(clicks)

    produce_events(kafka_settings, impressions, clicks)
    port = free_port()
    worker = start_worker(STREAMREC_JOIN_METRICS_PORT=str(port))
    got = read_labeled(kafka_settings, ref)
    assert_matches_reference(got, ref, exact_once=True)

    metrics = scrape(port)
    assert metrics['streamrec_join_labeled_total{label="positive"}'] == len(ref.positives())
    assert metrics['streamrec_join_labeled_total{label="negative"}'] == len(ref.negatives())
    assert metrics['streamrec_join_events_in_total{topic="impressions"}'] == len(impressions)
    assert sum(v for k, v in metrics.items() if k.startswith("streamrec_join_pending_impressions")) == 0
    assert worker.stop() == 0, worker.tail()


def test_worker_killed_mid_stream_loses_no_example(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    impressions, clicks = movielens_events
    ref = reference(impressions, clicks)
    produce_events(kafka_settings, impressions, clicks)

    first = start_worker(STREAMREC_JOIN_BATCH_MAX="50")  # small batches: many commits in flight
    early = consume(kafka_settings, LABELED, count=len(ref.examples) // 5, timeout=90)
    assert len(early) == len(ref.examples) // 5, first.tail()
    first.kill()
    so_far = {(r.example_id, r.label) for r in consume(kafka_settings, LABELED, count=len(ref.examples), timeout=2)}
    assert len(so_far) < len(ref.examples), "the worker finished before the kill: nothing was tested"

    second = start_worker()
    got = read_labeled(kafka_settings, ref, timeout=120)
    assert_matches_reference(got, ref, exact_once=False)
    assert second.stop() == 0, second.tail()
    # duplicates are only in-flight work re-done: each pair at most twice
    assert max(Counter((r.example_id, r.label) for r in got).values()) <= 2


def test_committed_offsets_ahead_of_the_state_are_not_trusted(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    """Faust may skip and acknowledge events around a rebalance, so the group's committed
    offsets can pass inputs the join never applied.  Simulate that: commit the group past
    half of every impressions partition and to the end of every clicks partition before
    the first worker starts.  The join's (empty) state, not those offsets, decides what
    is read: a hole revealed by the next event, and holes at the end of the input that no
    event reveals, are both re-read, and the labels are exactly the reference."""
    from confluent_kafka import Consumer, TopicPartition

    from streams.app import app_id
    from streams.join_settings import JoinSettings

    impressions, clicks = movielens_events
    impressions = impressions[:600]
    shown = {i.impression_id for i in impressions}
    clicks = [c for c in clicks if c.impression_id in shown]
    ref = reference(impressions, clicks)
    produce_events(kafka_settings, impressions, clicks)

    group = app_id(kafka_settings, JoinSettings())
    admin = Consumer(kafka_settings.confluent_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        ahead = []
        for topic, fraction in ((IMPRESSIONS.real_name(kafka_settings), 0.5), (CLICKS.real_name(kafka_settings), 1.0)):
            for p in range(kafka_settings.partitions):
                _low, high = admin.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ahead.append(TopicPartition(topic, p, int(high * fraction)))
        admin.commit(offsets=ahead, asynchronous=False)
    finally:
        admin.close()
    assert sum(tp.offset for tp in ahead) > 0

    port = free_port()
    worker = start_worker(STREAMREC_JOIN_METRICS_PORT=str(port))
    got = read_labeled(kafka_settings, ref)
    assert_matches_reference(got, ref, exact_once=True)
    assert scrape(port)["streamrec_join_input_gaps_total"] >= 1
    assert "re-reading from 0" in worker.text()
    assert worker.stop() == 0, worker.tail()


def test_two_workers_share_four_partitions_and_label_the_same(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    impressions, clicks = movielens_events
    ref = reference(impressions, clicks)
    ports = [free_port(), free_port()]
    workers = [start_worker(STREAMREC_JOIN_METRICS_PORT=str(p)) for p in ports]
    # wait until the group settled with partitions on both workers, then produce
    for w in workers:
        w.wait_for_log(r"partition \d: join state restored")
    produce_events(kafka_settings, impressions, clicks)

    got = read_labeled(kafka_settings, ref)
    assert_matches_reference(got, ref, exact_once=False)
    per_worker = [scrape(p)['streamrec_join_events_in_total{topic="impressions"}'] for p in ports]
    assert all(n > 0 for n in per_worker), f"one worker did all the work: {per_worker}"
    assert sum(per_worker) >= len(impressions)
    for w in workers:
        assert w.stop() == 0, w.tail()


def test_malformed_burst_goes_to_dead_letters_and_labeling_goes_on(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    impressions, clicks = movielens_events
    impressions = impressions[:300]
    shown = {i.impression_id for i in impressions}
    clicks = [c for c in clicks if c.impression_id in shown]
    first_imps, rest_imps = impressions[:150], impressions[150:]
    first_clicks = [c for c in clicks if c.ts <= first_imps[-1].ts]
    rest_clicks = clicks[len(first_clicks):]
    orphan = Click(impression_id="never-shown", user_id="42", item_id="1", ts=first_imps[-1].ts)
    ref = reference(impressions, clicks + [orphan])
    assert list(ref.orphans) == [orphan]
    imp_topic, click_topic = IMPRESSIONS.real_name(kafka_settings), CLICKS.real_name(kafka_settings)
    future_ms = int(time.time() * 1000) + 10 * 86_400_000
    bad = [
        (imp_topic, b"7", b"not json at all"),
        (imp_topic, b"7", b'{"schema_version": 1, "user_id": "7", "ts": 1}'),  # no impression_id/items
        (imp_topic, b"7", b'{"schema_version": 99, "impression_id": "x", "user_id": "7", "items": ["1"], "ts": 1}'),
        (imp_topic, b"8", Impression(impression_id="k", user_id="7", items=["1"], ts=1).to_json()),  # key != user
        (imp_topic, b"7", None),  # tombstone
        (click_topic, b"7", b"[1, 2, 3]"),
        (click_topic, b"7", b'{"schema_version": 1, "impression_id": "x", "user_id": "7", "item_id": "1", "ts": -5}'),
        (click_topic, None, b"\xff\xfe binary"),
        # valid, but from a clock ten days ahead: would close every window of its partition
        (imp_topic, b"7", Impression(impression_id="future", user_id="7", items=["1"], ts=future_ms).to_json()),
        (click_topic, b"7", Click(impression_id="future", user_id="7", item_id="1", ts=future_ms).to_json()),
    ] * 5

    # the burst sits in the middle of both input topics
    produce_events(kafka_settings, first_imps, first_clicks + [orphan])
    for topic in (imp_topic, click_topic):
        produce_raw(kafka_settings, topic, [(k, v) for t, k, v in bad if t == topic])
    produce_events(kafka_settings, rest_imps, rest_clicks)
    worker = start_worker()  # the default max_future_skew_ms refuses the future events (0 would fail this test)

    got = read_labeled(kafka_settings, ref)
    assert_matches_reference(got, ref, exact_once=True)
    dead = consume(kafka_settings, DEAD_LETTERS, count=len(bad) + 1, timeout=30)
    assert len(dead) == len(bad) + 1, worker.tail()
    malformed = [d for d in dead if isinstance(d, DeadLetter) and "orphan" not in d.error]
    assert Counter((d.source_topic, d.raw()) for d in malformed) == Counter((t, v or b"") for t, _k, v in bad)
    assert all(d.offset >= 0 and d.partition >= 0 and d.error for d in malformed)
    assert any("schema version" in d.error for d in malformed)
    assert any("co-partitioning" in d.error for d in malformed)
    assert sum("after the record's Kafka timestamp" in d.error for d in malformed) == 10
    [orphaned] = [d for d in dead if "orphan" in d.error]
    assert Click.from_json(orphaned.raw()) == orphan and orphaned.source_topic == click_topic
    assert "dead-letter " + imp_topic in worker.text()  # logged as topic[partition]@offset
    assert worker.proc.poll() is None  # still running
    assert worker.stop() == 0, worker.tail()


@pytest.mark.parametrize("variable", ["STREAMREC_PARTITIONS", "STREAMREC_JOIN_PARTITIONS"])
def test_partition_mismatch_stops_the_worker_naming_the_setting(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], variable: str
) -> None:
    """One setting for the topics and the worker; the old join-only name is a deprecated alias."""
    worker = start_worker(**{variable: "8"})
    assert worker.proc.wait(60) == 2
    assert "STREAMREC_PARTITIONS: is 8" in worker.text() and "4 partitions" in worker.text()
    if variable != "STREAMREC_PARTITIONS":
        assert f"{variable} is deprecated: use STREAMREC_PARTITIONS" in worker.text()


def test_an_output_too_large_to_deliver_is_dead_lettered_on_a_real_broker(kafka_settings: KafkaSettings) -> None:
    """The client refuses a record over message.max.bytes at once: the worker's delivery sends
    its (truncated) dead letter instead, counts it, and goes on."""
    metrics = JoinMetrics()
    labeled = LABELED.real_name(kafka_settings)
    delivery = Delivery(kafka_settings, DEAD_LETTERS.real_name(kafka_settings), metrics)
    huge = b"h" * 2_000_000
    normal = Labeled(example_id="i:a", impression_id="i", user_id="u", item_id="a", position=0, label=0,
                     impression_ts=1, label_ts=2, ts=2)  # fmt: skip
    try:
        delivery.send_all([(labeled, b"u", huge, -1), (labeled, b"u", normal.to_json(), -1)])
        assert asyncio.run(delivery.barrier("outputs")) == 1
    finally:
        delivery.close()
    [dead] = consume(kafka_settings, DEAD_LETTERS, count=1, timeout=30)
    assert isinstance(dead, DeadLetter) and dead.source_topic == labeled and dead.key == "u"
    assert len(dead.raw()) == MAX_RAW_BYTES and "too large" in dead.error and "2000000 bytes" in dead.error
    assert consume(kafka_settings, LABELED, count=1, timeout=30) == [normal]
    assert metrics.registry.get_sample_value("streamrec_join_dead_letters_total", {"reason": "too_large"}) == 1


def test_backfill_into_a_partition_that_has_seen_today_loses_no_click(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    """Old logs (1997) into a running worker whose partitions have seen today's events: each click
    is at worst a late positive (issue 12, item 1); nothing becomes an orphan."""
    impressions, clicks = movielens_events
    impressions = impressions[:200]
    shown = {i.impression_id for i in impressions}
    clicks = [c for c in clicks if c.impression_id in shown]
    now = int(time.time() * 1000)
    users = sorted({i.user_id for i in impressions})
    today = [Impression(impression_id=f"today-{u}", user_id=u, items=["1", "2"], ts=now - 60_000) for u in users]
    today_clicks = [Click(impression_id=f"today-{u}", user_id=u, item_id="1", ts=now - 59_000) for u in users]
    port = free_port()
    worker = start_worker(STREAMREC_JOIN_METRICS_PORT=str(port))
    produce_events(kafka_settings, today, today_clicks)
    today_ref = reference(today, today_clicks)
    read_labeled(kafka_settings, today_ref, timeout=60)
    # the backfill, as kcat would send it: every impression, then every click
    from streams.replay.producer import produce as replay_produce

    assert replay_produce([(IMPRESSIONS, i) for i in impressions], kafka_settings, progress=False).failed == 0
    assert replay_produce([(CLICKS, c) for c in clicks], kafka_settings, progress=False).failed == 0
    ref = reference(today + impressions, today_clicks + clicks)
    got = read_labeled(kafka_settings, ref)
    pairs = {(r.example_id, r.label) for r in got}
    assert ref.pairs() <= pairs
    clicked = {f"{c.impression_id}:{c.item_id}" for c in clicks}
    assert {e for e, label in pairs - ref.pairs()} <= clicked  # extras are fake negatives, corrected
    dead = consume(kafka_settings, DEAD_LETTERS, count=1, timeout=3.0)
    assert not dead, [d.error for d in dead]  # type: ignore[union-attr]
    metrics = scrape(port)
    assert metrics['streamrec_join_behind_watermark_total{kind="impressions"}'] == len(impressions)
    assert "behind the watermark" in worker.text()
    assert worker.stop() == 0, worker.tail()


def test_a_clock_ahead_and_a_quiet_partition_keep_the_attribution_window(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker]
) -> None:
    """An impression from a clock 23 h ahead (accepted: within the skew bound) does not close its
    partition (item 2), and on a quiet partition a click 8 s after its impression, long after both
    streams went idle, is a positive, not a fake negative plus a late one (item 6)."""
    window = 15_000
    # the lead is what a clock ahead may still move the watermark by: keep it below the window
    worker = start_worker(STREAMREC_JOIN_WINDOW_MS=str(window), STREAMREC_JOIN_WATERMARK_LEAD_MS="1000")
    worker.wait_for_log("partition", timeout=60)
    now = int(time.time() * 1000)
    ahead = Impression(impression_id="ahead", user_id="7", items=["1"], ts=now + 23 * 3_600_000)
    produce_events(kafka_settings, [ahead], [])
    time.sleep(4)  # clicks idle (2 s): only the impressions' watermark rules
    shown = Impression(impression_id="quiet", user_id="7", items=["1", "2"], ts=int(time.time() * 1000))
    produce_events(kafka_settings, [shown], [])
    time.sleep(8)  # both streams idle, four idle timeouts
    click = Click(impression_id="quiet", user_id="7", item_id="1", ts=shown.ts + 8_000)
    produce_events(kafka_settings, [], [click])
    got = consume(kafka_settings, LABELED, count=2, timeout=window / 1000 + 20)
    by_id = {(r.example_id, r.label): r for r in got}  # type: ignore[union-attr]
    assert set(by_id) == {("quiet:1", 1), ("quiet:2", 0)}, sorted(by_id)
    assert not by_id[("quiet:1", 1)].late
    assert worker.stop() == 0, worker.tail()


def test_propensities_and_model_version_reach_labeled_through_the_worker(
    kafka_settings: KafkaSettings, start_worker: Callable[..., Worker], movielens_events
) -> None:
    """The exploration loop's data path (issue 13, item 1): what serving logged on the impression
    arrives on every labeled example of it, on a real broker."""
    impressions, clicks = movielens_events
    impressions = impressions[:60]
    shown = {i.impression_id for i in impressions}
    clicks = [c for c in clicks if c.impression_id in shown]
    logged = [
        i.model_copy(update={
            "propensities": [round(1.0 / (k + 2), 6) for k in range(len(i.items))],
            "request_id": f"req-{i.impression_id}",
            "model_version": str(n % 3 + 1),
        })
        for n, i in enumerate(impressions)
    ]  # fmt: skip
    ref = reference(logged, clicks)
    produce_events(kafka_settings, logged, clicks)
    worker = start_worker()
    got = read_labeled(kafka_settings, ref)
    assert_matches_reference(got, ref, exact_once=True)
    by_id = {i.impression_id: i for i in logged}
    for r in got:
        imp = by_id[r.impression_id]
        assert r.position == imp.items.index(r.item_id)
        assert r.propensity == imp.propensities[r.position]  # type: ignore[index]
        assert r.model_version == imp.model_version
    assert worker.stop() == 0, worker.tail()
