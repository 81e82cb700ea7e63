"""MovieLens-100k → items, impressions, clicks; and producing a stream through a fake client.

The conversion is checked against the raw files read independently here, so a
bug shared by the parser and the converter cannot hide.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaError

from contract.errors import ConfigError, StreamrecError
from contract.records import Click, Item
from contract.settings import KafkaSettings
from contract.topics import CLICKS, IMPRESSIONS, ITEMS
from streams.replay import cli
from streams.replay.movielens import (
    MovieLensError,
    MovieLensReplay,
    MovieLensReplayConfig,
    load,
)
from streams.replay.producer import ProduceError, produce

K = 10


@pytest.fixture(scope="module")
def ml_dir() -> Path:
    from infra.assets import AssetError, movielens_path

    try:
        return movielens_path()
    except AssetError as exc:  # no network and no cache: nothing to convert
        pytest.skip(f"MovieLens-100k not available: {exc}")


@pytest.fixture(scope="module")
def raw(ml_dir: Path) -> dict:
    """The raw files read with csv, independently of the module under test."""
    with open(ml_dir / "ml-100k.inter", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    rated: dict[str, set[str]] = {}
    for user, item, _rating, _ts in rows:
        rated.setdefault(user, set()).add(item)
    with open(ml_dir / "ml-100k.item", encoding="utf-8") as f:
        items = [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
    return {
        "ratings": len(rows),
        "likes": sum(float(r[2]) >= 4 for r in rows),
        "rated": rated,
        "items": items,
        "ts": {(u, i): int(t) * 1000 for u, i, _r, t in rows},
        "rating": {(u, i): float(r) for u, i, r, _t in rows},
    }


@pytest.fixture(scope="module")
def data(ml_dir: Path):
    return load(ml_dir)


@pytest.fixture(scope="module")
def full(data) -> tuple[MovieLensReplay, list]:
    replay = MovieLensReplay(data, MovieLensReplayConfig(slate_size=K, seed=0))
    return replay, list(replay.stream())


def _of(stream: list, spec) -> list:
    return [r for s, r in stream if s is spec]


# --- the full conversion -------------------------------------------------------------------


def test_counts_match_the_raw_files(full, raw) -> None:
    replay, stream = full
    by_topic = Counter(spec.name for spec, _ in stream)
    assert by_topic == {"items": 1682, "impressions": 100_000, "clicks": raw["likes"]}
    assert raw["ratings"] == 100_000
    assert replay.counts() == dict(by_topic)
    assert len(replay) == len(stream)


def test_items_come_first_with_title_year_and_genres(full, raw) -> None:
    replay, stream = full
    items = [r for _, r in stream[:1682]]
    assert all(isinstance(r, Item) for r in items)
    assert [i.item_id for i in items] == raw["items"]
    assert items[0].text == "Toy Story (1995)"
    assert items[0].categories == ["Animation", "Children's", "Comedy"]
    by_id = {i.item_id: i for i in items}
    assert (
        by_id["267"].text == "unknown movie" and by_id["267"].categories == []
    )  # title/year missing
    assert (
        by_id["1412"].text.endswith("(1995)") and "V" not in by_id["1412"].text.split()
    )  # year "V"
    assert {i.ts for i in items} == {min(raw["ts"].values())}


def test_one_impression_per_rating_with_a_valid_slate(full, raw) -> None:
    _, stream = full
    impressions = _of(stream, IMPRESSIONS)
    assert len({i.impression_id for i in impressions}) == len(impressions)
    positions = Counter()
    seen_pairs = set()
    for imp in impressions:
        _, user, item = imp.impression_id.split("-")
        assert imp.user_id == user
        assert imp.ts == raw["ts"][(user, item)]
        seen_pairs.add((user, item))
        assert len(imp.items) == K == len(set(imp.items))
        positions[imp.items.index(item)] += 1
        others = set(imp.items) - {item}
        assert not others & raw["rated"][user], imp.impression_id
    assert seen_pairs == set(raw["ts"])
    # the rated item's position is uniform: position does not give the label away
    assert set(positions) == set(range(K))
    assert all(0.09 < n / len(impressions) < 0.11 for n in positions.values()), positions


def test_one_click_per_good_rating_after_its_impression(full, raw) -> None:
    _, stream = full
    shown_at: dict[str, tuple[int, int]] = {}
    clicks = 0
    for n, (spec, rec) in enumerate(stream):
        if spec is IMPRESSIONS:
            shown_at[rec.impression_id] = (n, rec.ts)
        elif spec is CLICKS:
            clicks += 1
            assert isinstance(rec, Click)
            index, ts = shown_at[rec.impression_id]  # KeyError = click before its impression
            assert index < n and rec.ts == ts + 5_000
            assert rec.item_id == rec.impression_id.split("-")[2]
            assert rec.value == raw["rating"][(rec.user_id, rec.item_id)] >= 4
    assert clicks == raw["likes"]


def test_event_time_never_decreases(full) -> None:
    _, stream = full
    ts = np.array([r.ts for _, r in stream])
    assert (np.diff(ts) >= 0).all()


def test_every_record_satisfies_the_contract(full) -> None:
    _, stream = full
    assert all(isinstance(rec, spec.record) for spec, rec in stream)  # built with validation
    for spec, rec in stream[::7]:  # and its JSON reads back as the same record
        assert spec.record.from_json(rec.to_json()) == rec


# --- reproducibility and subsets -----------------------------------------------------------


def test_same_seed_same_stream_other_seed_other_slates(data, full) -> None:
    replay, stream = full
    again = MovieLensReplay(data, MovieLensReplayConfig(slate_size=K, seed=0, limit=5000))
    got = list(again.stream())
    assert [r.to_json() for _, r in got] == [r.to_json() for _, r in stream[: len(got)]]
    assert np.array_equal(again._slates, replay._slates)  # every slate, not just the first 5000
    other = MovieLensReplay(data, MovieLensReplayConfig(slate_size=K, seed=1, limit=1000))
    first = _of(stream, IMPRESSIONS)[:1000]
    mine = _of(list(other.stream()), IMPRESSIONS)
    assert [i.impression_id for i in mine] == [i.impression_id for i in first]
    assert sum(a.items != b.items for a, b in zip(mine, first, strict=True)) > 990


def test_limit_and_users_select_a_subsequence_of_the_full_replay(data, full, raw) -> None:
    _, stream = full
    impressions = _of(stream, IMPRESSIONS)
    limited = MovieLensReplay(data, MovieLensReplayConfig(limit=500))
    got = list(limited.stream())
    assert _of(got, IMPRESSIONS) == impressions[:500]
    assert limited.counts()["impressions"] == 500
    assert limited.counts()["clicks"] == len(_of(got, CLICKS))
    some = MovieLensReplay(data, MovieLensReplayConfig(users=frozenset({"1", "943"})))
    got = _of(list(some.stream()), IMPRESSIONS)
    assert got == [i for i in impressions if i.user_id in {"1", "943"}]
    assert len(got) == len(raw["rated"]["1"]) + len(raw["rated"]["943"])


def test_settings_change_the_stream_as_documented(data) -> None:
    replay = MovieLensReplay(
        data,
        MovieLensReplayConfig(slate_size=3, click_delay_ms=0, min_rating_for_click=5, limit=2000),
    )
    stream = list(replay.stream())
    assert all(len(i.items) == 3 for i in _of(stream, IMPRESSIONS))
    clicks = _of(stream, CLICKS)
    assert clicks and all(c.value == 5.0 for c in clicks)
    order = {r.impression_id: n for n, (s, r) in enumerate(stream) if s is IMPRESSIONS}
    assert all(order[c.impression_id] < n for n, (s, c) in enumerate(stream) if s is CLICKS)


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({"slate_size": 0}, "slate_size"),
        ({"click_delay_ms": -1}, "click_delay_ms"),
        ({"limit": -5}, "limit"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings_are_config_errors(config: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        MovieLensReplayConfig(**config)
    assert err.value.setting == setting


def test_a_slate_larger_than_any_user_can_fill_is_refused(data) -> None:
    with pytest.raises(ConfigError, match="unrated items"):
        MovieLensReplay(data, MovieLensReplayConfig(slate_size=1000))


# --- parsing edge cases on small files -----------------------------------------------------


def _write(folder: Path, items: str, inter: str) -> Path:
    (folder / "ml-100k.item").write_text(items, encoding="utf-8")
    (folder / "ml-100k.inter").write_text(inter, encoding="utf-8")
    return folder


ITEMS_FILE = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tunkonwn\tunkonwn\tunknown\n"
    "3\tSome Sequel (1995)\tV\tDrama\n"
    "4\tMisérables, Les\t1995\tDrama War\n"
)


def test_small_files_parse_with_columns_in_any_order(tmp_path: Path) -> None:
    inter = "timestamp:float\tuser_id:token\titem_id:token\trating:float\n20\tu\t1\t5\n10\tu\t4\t3\n10\tv\t1\t4\n"
    data = load(_write(tmp_path, ITEMS_FILE, inter))
    replay = MovieLensReplay(data, MovieLensReplayConfig(slate_size=2, click_delay_ms=1))
    stream = list(replay.stream())
    texts = {r.item_id: r.text for s, r in stream if s is ITEMS}
    assert texts == {
        "1": "Toy Story (1995)",
        "2": "unknown movie",
        "3": "Some Sequel (1995)",
        "4": "Misérables, Les (1995)",
    }
    events = [(s.name, r.impression_id, r.ts) for s, r in stream if s is not ITEMS]
    # ties at ts=10 keep the file order; a click follows 1 ms after its impression
    assert events == [
        ("impressions", "ml-u-4", 10_000),
        ("impressions", "ml-v-1", 10_000),
        ("clicks", "ml-v-1", 10_001),
        ("impressions", "ml-u-1", 20_000),
        ("clicks", "ml-u-1", 20_001),
    ]
    slate_u1 = next(r for s, r in stream if s is IMPRESSIONS and r.impression_id == "ml-u-1")
    assert set(slate_u1.items) - {"1"} <= {"2", "3"}  # never "4", which u also rated


@pytest.mark.parametrize(
    ("items", "inter", "match"),
    [
        (ITEMS_FILE, "user_id:token\titem_id:token\trating:float\nu\t1\t5\n", "timestamp"),
        (
            ITEMS_FILE,
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\t9\t5\t1\n",
            "not in the catalog",
        ),
        (
            ITEMS_FILE,
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\t1\t5\t1\nu\t1\t4\t2\n",
            "twice",
        ),
        (
            ITEMS_FILE,
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\t1\tgood\t1\n",
            "not a number",
        ),
        (
            ITEMS_FILE + "1\tDup\t1990\tDrama\n",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n",
            "duplicate",
        ),
    ],
)
def test_malformed_files_raise_a_clear_error(
    tmp_path: Path, items: str, inter: str, match: str
) -> None:
    with pytest.raises(MovieLensError, match=match):
        load(_write(tmp_path, items, inter))


def test_missing_files_say_how_to_fetch_them(tmp_path: Path) -> None:
    with pytest.raises(MovieLensError, match="infra.assets"):
        load(tmp_path)


# --- producing through a fake client -----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeMessage:
    def __init__(self, topic: str, key: bytes, value: bytes) -> None:
        self._topic, self._key, self._value = topic, key, value

    def topic(self) -> str:
        return self._topic


class FakeProducer:
    """Queues messages; ``poll``/``flush`` acknowledge them (all but the last ``lose``);
    ``poll(t)`` advances the fake clock by t."""

    def __init__(
        self, clock: FakeClock, *, fail_topic: str | None = None, full_times: int = 0, lose: int = 0
    ) -> None:
        self.clock, self.fail_topic, self.full_times, self.lose = (
            clock,
            fail_topic,
            full_times,
            lose,
        )
        self.queue: list = []
        self.sent: list[tuple[float, str, bytes, bytes]] = []
        self.flushes = 0

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery) -> None:
        if self.full_times:
            self.full_times -= 1
            raise BufferError("queue full")
        self.queue.append((FakeMessage(topic, key, value), on_delivery))
        self.sent.append((self.clock.now, topic, key, value))

    def _deliver(self, keep: int = 0) -> int:
        ready, self.queue = (
            self.queue[: len(self.queue) - keep],
            self.queue[len(self.queue) - keep :],
        )
        for msg, cb in ready:
            cb(KafkaError(KafkaError._MSG_TIMED_OUT, "broker said no") if msg.topic() == self.fail_topic else None, msg)
        return len(ready)

    def poll(self, timeout: float) -> int:
        self.clock.now += timeout
        return self._deliver(keep=self.lose)

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        self._deliver(keep=self.lose)
        return len(self.queue)


SETTINGS = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="p-")


@pytest.fixture(scope="module")
def tiny(data) -> list:
    return list(MovieLensReplay(data, MovieLensReplayConfig(limit=50)).stream())


def test_produce_sends_every_record_with_key_and_json(tiny) -> None:
    stream = tiny
    fake = FakeProducer(clock := FakeClock())
    result = produce(stream, SETTINGS, producer=fake, clock=clock, progress=False)
    assert result.counts == dict(Counter(s.name for s, _ in stream))
    assert result.failed == 0 and result.produced == len(stream) == result.delivered
    assert fake.flushes == 1
    assert [(t, k, v) for _, t, k, v in fake.sent] == [
        (f"p-{s.name}", r.kafka_key(), r.to_json()) for s, r in stream
    ]
    assert all(
        k == r.user_id.encode()
        for (_, t, k, _v), (s, r) in zip(fake.sent, stream, strict=True)
        if s is not ITEMS
    )


def test_produce_paces_by_event_time(tiny) -> None:
    stream = tiny
    fake = FakeProducer(clock := FakeClock())
    produce(stream, SETTINGS, speed=1000.0, producer=fake, clock=clock, progress=False)
    t0 = stream[0][1].ts
    for (sent_at, *_), (_, rec) in zip(fake.sent, stream, strict=True):
        due = (rec.ts - t0) / 1000 / 1000.0
        assert due <= sent_at < due + 1e-6


def test_produce_without_speed_never_waits(tiny) -> None:
    fake = FakeProducer(clock := FakeClock())
    produce(tiny, SETTINGS, speed=None, producer=fake, clock=clock, progress=False)
    assert {sent_at for sent_at, *_ in fake.sent} == {0.0}


def test_a_full_queue_is_drained_and_retried(tiny) -> None:
    stream = tiny
    fake = FakeProducer(clock := FakeClock(), full_times=3)
    result = produce(stream, SETTINGS, producer=fake, clock=clock, progress=False)
    assert result.delivered == len(stream) == len(fake.sent)


def test_failed_deliveries_raise_with_the_counts(tiny) -> None:
    stream = tiny
    fake = FakeProducer(clock := FakeClock(), fail_topic="p-clicks")
    with pytest.raises(ProduceError, match="broker said no") as err:
        produce(stream, SETTINGS, producer=fake, clock=clock, progress=False)
    assert isinstance(err.value, StreamrecError)
    n_clicks = sum(s is CLICKS for s, _ in stream)
    assert err.value.result.failed == n_clicks > 0
    assert err.value.result.counts["clicks"] == 0
    assert err.value.result.counts["impressions"] == 50


def test_records_left_after_the_flush_count_as_failed() -> None:
    fake = FakeProducer(clock := FakeClock(), lose=2)
    with pytest.raises(ProduceError, match="unacknowledged") as err:
        produce(
            [
                (ITEMS, Item(item_id="a", text="a", ts=0)),
                (ITEMS, Item(item_id="b", text="b", ts=0)),
            ],
            SETTINGS,
            producer=fake,
            clock=clock,
            progress=False,
        )
    assert err.value.result.failed == 2


# --- the command line, without a broker --------------------------------------------------------


def test_cli_dry_run_prints_the_counts(ml_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            ["movielens", "--dry-run", "--limit", "500", "--data-dir", str(ml_dir), "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "items" in out and "1,682" in out and " 500" in out


def test_cli_invalid_setting_exits_2(
    ml_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["movielens", "--dry-run", "--slate-size", "0", "--data-dir", str(ml_dir)]) == 2
    assert "slate_size" in capsys.readouterr().err
    monkeypatch.setenv("STREAMREC_BOOTSTRAP_SERVERS", "no-port")
    assert cli.main(["movielens", "--limit", "5", "--data-dir", str(ml_dir)]) == 2
    assert "STREAMREC_BOOTSTRAP_SERVERS" in capsys.readouterr().err
