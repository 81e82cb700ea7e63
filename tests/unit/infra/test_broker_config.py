"""The broker launcher and admin CLI without a running broker: config, ports, jars, errors."""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path

import pytest
from pydantic import SecretStr

from contract.settings import KafkaSettings
from infra import admin
from infra.broker import (
    STATUS_STOPPED,
    LocalBroker,
    ToolNotFoundError,
    cli,
    fetch_jars,
    jars,
    jars_present,
    libs_dir,
    local,
    new_cluster_id,
    running_pid,
)
from infra.processes import Service, env_value, free_ports, log_tail, port_in_use, service_env
from tests.kafka_utils import java_partition, murmur2


def test_server_properties_describe_one_kraft_node_on_loopback(tmp_path: Path) -> None:
    b = LocalBroker(19092, controller_port=19093, home=tmp_path, partitions=6,
                    properties={"log.retention.hours": "1"})  # fmt: skip
    props = b.server_properties()
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == str(tmp_path.resolve() / "data")
    assert props["num.partitions"] == "6"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["log.retention.hours"] == "1"
    assert b.bootstrap == "127.0.0.1:19092"


def test_fixed_port_broker_lives_in_its_run_folder(tmp_path: Path) -> None:
    b = LocalBroker(19092, cache_dir=tmp_path)
    assert b.home == tmp_path / "kafka" / "run-19092"
    assert b.pid is None and not b.is_running()


def test_cluster_id_is_kafka_uuid_format() -> None:
    for _ in range(200):
        cid = new_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_free_ports_are_distinct_and_free() -> None:
    a, b = free_ports(2)
    assert a != b
    assert not port_in_use(a) and not port_in_use(b)


def test_port_in_use_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)


def test_jars_are_complete_only_with_their_manifest(tmp_path: Path) -> None:
    libs = libs_dir(tmp_path)
    libs.mkdir(parents=True)
    assert not jars_present(tmp_path)
    (libs / "kafka_2.13-3.9.1.jar").write_bytes(b"PK")
    assert not jars_present(tmp_path), "jars without a manifest are an interrupted fetch"
    (libs / ".complete").write_text(jars._manifest_header() + "\nkafka_2.13-3.9.1.jar\nmissing.jar\n")
    assert not jars_present(tmp_path)
    (libs / "missing.jar").write_bytes(b"PK")
    assert jars_present(tmp_path)
    assert fetch_jars(tmp_path) == libs  # present: no Maven run


def test_missing_java_and_mvn_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(ToolNotFoundError, match="`java` was not found"):
        LocalBroker(home=tmp_path / "b").start()
    with pytest.raises(ToolNotFoundError, match="`mvn` was not found"):
        fetch_jars(tmp_path)


def test_a_pid_file_of_another_process_is_not_a_broker(tmp_path: Path) -> None:
    (tmp_path / "broker.pid").write_text(f"{os.getpid()}\n")  # alive, but not kafka.Kafka
    assert running_pid(tmp_path) is None
    (tmp_path / "broker.pid").write_text("not a pid\n")
    assert running_pid(tmp_path) is None


def test_log_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert log_tail(tmp_path / "nope.log") == ""


def test_broker_cli_status_and_down_without_brokers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--cache-dir", str(tmp_path), "status"]) == STATUS_STOPPED
    assert "stopped" in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(tmp_path), "status", "--port", "19092"]) == STATUS_STOPPED
    assert "stopped: 127.0.0.1:19092" in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(tmp_path), "down"]) == 0
    assert "no local broker running" in capsys.readouterr().out


def test_admin_cli_reports_a_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMREC_BOOTSTRAP_SERVERS", "no-port-here")
    assert admin.main(["list"]) == admin.EXIT_CONFIG
    assert "STREAMREC_BOOTSTRAP_SERVERS" in capsys.readouterr().err


def test_murmur2_matches_the_java_client() -> None:
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {k: murmur2(k) for k in vectors} == vectors
    assert java_partition(b"21", 4) == (-973932308 & 0x7FFFFFFF) % 4


def test_stale_temporary_homes_are_pruned(tmp_path: Path) -> None:
    old, young = tmp_path / "broker-old", tmp_path / "broker-young"
    for d in (old, young):
        (d / "data").mkdir(parents=True)
    os.utime(old, (1_000_000, 1_000_000))
    local._prune_stale_homes(tmp_path)
    assert not old.exists()
    assert young.is_dir(), "a home created moments ago may belong to a broker that is starting"


def test_admin_cli_names_an_unreachable_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    monkeypatch.setenv("STREAMREC_BOOTSTRAP_SERVERS", address)
    assert admin.main(["create", "--timeout", "1"]) == 1
    assert f"cannot reach Kafka at {address}" in capsys.readouterr().err


def test_service_env_names_every_setting(tmp_path: Path) -> None:
    kafka = KafkaSettings(bootstrap_servers="10.0.0.1:9093", topic_prefix="", partitions=6)
    env = service_env(
        kafka, "trainer", base={"PATH": "/bin", "STREAMREC_TRAINER_SEED": "7"},
        batch_size=64, checkpoint_dir=tmp_path, categories=["a", "b"], model_options={"dropout": 0.0},
        lora_rank=None,
    )  # fmt: skip
    assert env["PATH"] == "/bin" and env["STREAMREC_TRAINER_SEED"] == "7"
    assert env["STREAMREC_BOOTSTRAP_SERVERS"] == "10.0.0.1:9093"
    assert env["STREAMREC_TOPIC_PREFIX"] == "", "an empty prefix must override the parent's"
    assert env["STREAMREC_PARTITIONS"] == "6" and env["STREAMREC_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert "STREAMREC_SASL_USERNAME" not in env, "unset settings are left out"
    assert env["STREAMREC_TRAINER_BATCH_SIZE"] == "64"
    assert env["STREAMREC_TRAINER_CHECKPOINT_DIR"] == str(tmp_path)
    assert env["STREAMREC_TRAINER_CATEGORIES"] == '["a", "b"]'
    assert env["STREAMREC_TRAINER_MODEL_OPTIONS"] == '{"dropout": 0.0}'
    assert env_value(False) == "false" and env_value(SecretStr("k")) == "k"
    assert "STREAMREC_TRAINER_LORA_RANK" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_service_env_without_inherited_service_settings() -> None:
    kafka = KafkaSettings(sasl_password="s3cret", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                          sasl_username="me")  # fmt: skip
    base = {"STREAMREC_JOIN_WINDOW_MS": "1", "STREAMREC_TRAINER_SEED": "7"}
    env = service_env(kafka, "join", base=base, inherit=False, data_dir="/tmp/j")
    assert "STREAMREC_JOIN_WINDOW_MS" not in env and env["STREAMREC_TRAINER_SEED"] == "7"
    assert env["STREAMREC_JOIN_DATA_DIR"] == "/tmp/j"
    assert env["STREAMREC_SASL_PASSWORD"] == "s3cret", "the child needs the secret itself"
    with pytest.raises(ValueError, match="unknown service"):
        service_env(kafka, "scorer")
    assert Service.of("join", env, "--log-level", "info").module == "streams.worker"
