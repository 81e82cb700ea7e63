"""The join worker's parts without a broker: delivery (too large records), the state table, decoding, settings."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException

from contract.errors import ConfigError, RecordError
from contract.records import Click, DeadLetter, Impression
from contract.settings import KafkaSettings
from infra.kafka import MAX_RAW_BYTES, KafkaProducer
from streams.decode import decode_input
from streams.delivery import Delivery, JoinWorkerError
from streams.join import JoinConfig, JoinCore
from streams.join_settings import JoinSettings, load_worker_settings
from streams.metrics import JoinMetrics
from streams.restore import changelog_records, drop_partition, restore_core, state_key
from streams.worker import main as worker_main
from tests.kafka_utils import FakeMessage

SETTINGS = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="p-")


class FakeClient:
    """Rejects values over ``limit`` at once (as librdkafka's message.max.bytes); at the flush,
    the broker refuses values over ``broker_limit`` (but dead letters, unless ``dead_limit``)
    and fails every record of ``fail_topic``."""

    def __init__(
        self, limit: int = 1000, broker_limit: int = 10**9, fail_topic: str | None = None, dead_limit: bool = False
    ) -> None:
        self.limit, self.broker_limit, self.fail_topic, self.dead_limit = limit, broker_limit, fail_topic, dead_limit
        self.queue: list = []
        self.delivered: list[tuple[str, bytes | None, bytes | None, int]] = []

    def produce(self, topic, value=None, key=None, partition=-1, on_delivery=None) -> None:  # noqa: ANN001
        if len(value or b"") > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Message size too large"))
        self.queue.append((FakeMessage(topic, key, value, partition), on_delivery))

    def poll(self, timeout: float = 0.0) -> int:
        return 0

    def flush(self, timeout: float = 0.0) -> int:
        queue, self.queue = self.queue, []
        for msg, cb in queue:
            err = None
            limited = self.dead_limit or msg.topic() != "p-dead-letters"
            if limited and len(msg.value() or b"") > self.broker_limit:
                err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
            elif msg.topic() == self.fail_topic:
                err = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")
            if err is None:
                self.delivered.append((msg.topic(), msg.key(), msg.value(), msg.partition()))
            if cb is not None and err is not None:
                cb(err, msg)
        return 0


def delivery(client: FakeClient) -> tuple[Delivery, JoinMetrics]:
    metrics = JoinMetrics()
    return Delivery(SETTINGS, "p-dead-letters", metrics, producer=KafkaProducer(client)), metrics


def too_large_count(metrics: JoinMetrics) -> float:
    return metrics.registry.get_sample_value("streamrec_join_dead_letters_total", {"reason": "too_large"})


def test_a_record_rejected_as_too_large_is_dead_lettered_and_counted() -> None:
    client = FakeClient(limit=MAX_RAW_BYTES * 3)
    d, metrics = delivery(client)
    huge = b'{"history":"' + b"x" * (MAX_RAW_BYTES * 4) + b'"}'
    d.send_all([("p-labeled", b"u1", b"small", -1), ("p-labeled", b"u1", huge, -1)])
    assert asyncio.run(d.barrier("outputs")) == 1
    assert too_large_count(metrics) == 1
    topics = [t for t, *_ in client.delivered]
    assert topics == ["p-labeled", "p-dead-letters"]
    dead = DeadLetter.from_json(client.delivered[1][2])
    assert dead.source_topic == "p-labeled" and dead.offset == -1 and dead.key == "u1"
    assert "too large" in dead.error and "sha256" in dead.error
    assert dead.raw() == huge[:MAX_RAW_BYTES]
    assert asyncio.run(d.barrier("outputs")) == 0  # nothing left over for the next barrier


def test_a_record_the_broker_refuses_as_too_large_is_dead_lettered_too() -> None:
    client = FakeClient(broker_limit=100)
    d, metrics = delivery(client)
    d.send_all([("p-join-state-changelog", b"3/h/u1", b"y" * 500, 3), ("p-user-history", b"u2", b"ok", -1)])
    assert asyncio.run(d.barrier("join state")) == 1
    dead = DeadLetter.from_json(client.delivered[-1][2])
    assert (dead.source_topic, dead.partition, dead.key) == ("p-join-state-changelog", 3, "3/h/u1")
    assert dead.raw() == b"y" * 500 and "join state" in dead.error
    assert too_large_count(metrics) == 1


def test_any_other_delivery_failure_stops_the_worker() -> None:
    d, _metrics = delivery(FakeClient(fail_topic="p-labeled"))
    d.send_all([("p-labeled", b"u1", b"v", -1)])
    with pytest.raises(JoinWorkerError, match="could not deliver the outputs: p-labeled"):
        asyncio.run(d.barrier("outputs"))


def test_the_state_table_is_written_in_a_crash_safe_order_and_restored() -> None:
    config = JoinConfig(window_ms=1_000)
    core = JoinCore(config)
    core.on_impression(Impression(impression_id="i", user_id="u", items=["a", "b"], ts=1_000), offset=0)
    core.on_click(Click(impression_id="i", user_id="u", item_id="a", ts=1_100), offset=0)
    store: dict = {state_key(2, "o/gone"): b"[]"}
    changes = core.drain_changes_json()
    changes["o/gone"] = None  # a deletion
    records = changelog_records(store, "changelog", 2, changes)
    keys = [k.decode() for _t, k, _v, _p in records]
    assert keys[-2:] == ["2/w", "2/o/gone"] and {"2/i/i", "2/h/u"} <= set(keys[:-2])
    assert all(t == "changelog" and p == 2 for t, _k, _v, p in records)
    assert state_key(2, "o/gone") not in store
    store[b"1/w"] = json.loads(store[b"2/w"])  # another partition, decoded as recovery stores it
    restored = restore_core(store, 2, config)
    assert restored.snapshot() == core.snapshot() and restored.next_offset("clicks") == 1
    drop_partition(store, 2)
    assert list(store) == [b"1/w"]


def test_decoding_refuses_a_wrong_key_and_a_clock_far_ahead() -> None:
    value = Click(impression_id="i", user_id="u", item_id="a", ts=10 * 86_400_000).to_json()
    ok = SimpleNamespace(key=b"u", value=value, timestamp=10 * 86_400.0)
    assert decode_input(ok, Click, 86_400_000).item_id == "a"
    with pytest.raises(RecordError, match="co-partitioning"):
        decode_input(SimpleNamespace(key=b"v", value=value, timestamp=None), Click, 0)
    with pytest.raises(RecordError, match="STREAMREC_JOIN_MAX_FUTURE_SKEW_MS"):
        decode_input(SimpleNamespace(key=b"u", value=value, timestamp=86_400.0), Click, 86_400_000)


def test_partitions_are_one_setting_and_the_old_name_is_a_deprecated_alias(monkeypatch, caplog) -> None:
    monkeypatch.delenv("STREAMREC_PARTITIONS", raising=False)
    monkeypatch.delenv("STREAMREC_JOIN_PARTITIONS", raising=False)
    assert "partitions" not in JoinSettings.model_fields
    monkeypatch.setenv("STREAMREC_PARTITIONS", "6")
    assert load_worker_settings()[0].partitions == 6
    monkeypatch.setenv("STREAMREC_JOIN_PARTITIONS", "6")  # agrees: accepted, with a warning
    assert load_worker_settings()[0].partitions == 6
    assert "STREAMREC_JOIN_PARTITIONS is deprecated: use STREAMREC_PARTITIONS" in caplog.text
    monkeypatch.delenv("STREAMREC_PARTITIONS")
    monkeypatch.setenv("STREAMREC_JOIN_PARTITIONS", "8")  # alone: read as the new name
    assert load_worker_settings()[0].partitions == 8
    monkeypatch.setenv("STREAMREC_PARTITIONS", "4")  # contradicts it: refused, naming both
    with pytest.raises(ConfigError, match="STREAMREC_JOIN_PARTITIONS.*STREAMREC_PARTITIONS says '4'"):
        load_worker_settings()


def test_worker_cli_takes_log_level_and_reports_bad_settings(monkeypatch, capsys) -> None:
    monkeypatch.setenv("STREAMREC_JOIN_WINDOW_MS", "0")
    assert worker_main(["--log-level", "warning"]) == 2
    assert "STREAMREC_JOIN_WINDOW_MS" in capsys.readouterr().err
    assert worker_main(["--loglevel", "warning"]) == 2  # the old spelling still works
    with pytest.raises(SystemExit):
        worker_main(["--help"])
    assert "--log-level" in capsys.readouterr().out


def test_a_dead_letter_that_cannot_be_delivered_stops_the_worker() -> None:
    d, metrics = delivery(FakeClient(broker_limit=100, dead_limit=True))
    d.send_all([("p-labeled", b"u1", b"z" * 500, -1)])
    with pytest.raises(JoinWorkerError, match="dead letters of too large outputs"):
        asyncio.run(d.barrier("outputs"))
    assert too_large_count(metrics) == 0
