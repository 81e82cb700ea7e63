"""The local jar broker and the topic admin, on real brokers."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from contract.records import Impression
from contract.settings import PROJECT_ROOT, KafkaSettings
from contract.topics import ALL_TOPICS, IMPRESSIONS, ITEMS
from infra.admin import delete_topics, describe_topics, ensure_topics
from infra.broker import STATUS_STOPPED, BrokerStartError, LocalBroker, PortInUseError, kafka_dir
from infra.processes import free_ports
from tests.kafka_utils import consume, produce

pytestmark = pytest.mark.integration


def test_ensure_topics_is_idempotent(kafka_bootstrap: str) -> None:
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"adm-{uuid.uuid4().hex[:8]}-")
    names = [spec.real_name(settings) for spec in ALL_TOPICS]
    try:
        assert ensure_topics(settings) == names
        assert ensure_topics(settings) == []

        info = describe_topics(settings, names)
        assert set(info) == set(names)
        for spec in ALL_TOPICS:
            ti = info[spec.real_name(settings)]
            assert ti.partitions == settings.partitions
            assert ti.config["cleanup.policy"] == ("compact" if spec.compacted else "delete")
        assert {s.name for s in ALL_TOPICS if s.compacted} == {"items", "user-history", "model-updates"}
    finally:
        assert sorted(delete_topics(settings)) == sorted(names)
    assert delete_topics(settings) == []


def test_existing_topic_with_other_partition_count_is_reported(
    kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="infra.admin"):
        assert ensure_topics(kafka_settings, [ITEMS], partitions=kafka_settings.partitions + 2) == []
    assert any(
        ITEMS.real_name(kafka_settings) in r.getMessage() and "partitions" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_taken_port_fails_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(port)
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use"):
            broker.start()
        assert broker.pid is None


def test_broker_keeps_its_data_across_stop_and_start(tmp_path: Path) -> None:
    broker = LocalBroker(home=tmp_path / "broker")
    try:
        broker.start()
        cluster_id = _cluster_id(broker.data_dir)
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix="keep-")
        ensure_topics(settings, [IMPRESSIONS])
        sent = [
            Impression(impression_id=f"imp-{n}", user_id=f"u{n % 7}", items=["i1", "i2"], ts=1_000 + n)
            for n in range(200)
        ]
        produce(settings, IMPRESSIONS, sent)
        port = broker.port
        broker.stop()
        assert not broker.last_stop_forced, "the broker needed SIGKILL instead of stopping on SIGTERM"
        assert broker.pid is None

        broker.start()
        assert broker.port == port
        assert _cluster_id(broker.data_dir) == cluster_id, "the data dir was formatted again"
        got = consume(settings, IMPRESSIONS, count=len(sent), timeout=60)
        assert sorted(got, key=lambda r: r.ts) == sent
    finally:
        broker.close()
    assert (tmp_path / "broker" / "data").is_dir(), "a broker on a given home must keep it"


def test_java_dying_at_start_reports_the_server_log(tmp_path: Path) -> None:
    home = tmp_path / "broker"
    data = home / "data"
    data.mkdir(parents=True)
    # Storage formatted for another node: the broker refuses to start on it.
    (data / "meta.properties").write_text(
        "version=1\ncluster.id=2eD4tnwoRPW5XMo3SjCtpA\nnode.id=7\n"
        "directory.id=fH1YHfeZQfCSAc-HdO6GOg\n"
    )
    broker = LocalBroker(home=home, startup_timeout=60)
    with pytest.raises(BrokerStartError, match=r"exited with code .*last lines of .*server\.log") as err:
        broker.start()
    assert "node" in str(err.value).split("last lines of", 1)[1].lower()
    assert broker.pid is None


def test_cli_up_status_down() -> None:
    port = free_ports(1)[0]
    home = kafka_dir() / f"run-{port}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infra.broker", *args], cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    try:
        up = cli("up", "--port", str(port))
        assert up.returncode == 0, up.stderr
        assert f"127.0.0.1:{port}" in up.stdout and "start time" in up.stdout

        again = cli("up", "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stdout

        status = cli("status", "--port", str(port))
        assert status.returncode == 0 and f"running: 127.0.0.1:{port}" in status.stdout

        settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="cli-")
        assert ensure_topics(settings, [ITEMS]) == ["cli-items"]

        down = cli("down", "--port", str(port))
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr

        status = cli("status", "--port", str(port))
        assert status.returncode == STATUS_STOPPED and "stopped" in status.stdout
    finally:
        cli("down", "--port", str(port))
        _remove(home)


def _cluster_id(data_dir: Path) -> str:
    for line in (data_dir / "meta.properties").read_text().splitlines():
        if line.startswith("cluster.id="):
            return line.split("=", 1)[1]
    raise AssertionError(f"no cluster.id in {data_dir / 'meta.properties'}")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
