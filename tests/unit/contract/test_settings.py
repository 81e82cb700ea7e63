"""Settings are read once from the environment, fail early with the setting's name, and mask secrets."""

from __future__ import annotations

import pytest

from contract.errors import ConfigError
from contract.settings import KafkaSettings, load


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("STREAMREC_") and name != "STREAMREC_CACHE_DIR":
            monkeypatch.delenv(name)


def test_defaults_match_design() -> None:
    s = load()
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.topic_prefix == ""
    assert s.topic("items") == "items"
    assert s.confluent_config() == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}
    assert s.faust_credentials() is None


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_BOOTSTRAP_SERVERS", "k1:9092, k2:9093")
    monkeypatch.setenv("STREAMREC_TOPIC_PREFIX", "prod.")
    s = load()
    assert s.bootstrap_servers == "k1:9092,k2:9093"
    assert s.topic("clicks") == "prod.clicks"
    assert s.faust_broker() == ["kafka://k1:9092", "kafka://k2:9093"]


def test_producer_uses_the_java_partitioner() -> None:
    assert load().producer_config()["partitioner"] == "murmur2_random"


@pytest.mark.parametrize(
    ("env", "setting", "why"),
    [
        ({"STREAMREC_BOOTSTRAP_SERVERS": "localhost"}, "STREAMREC_BOOTSTRAP_SERVERS", "host:port"),
        ({"STREAMREC_BOOTSTRAP_SERVERS": "h:99999"}, "STREAMREC_BOOTSTRAP_SERVERS", "host:port"),
        ({"STREAMREC_PARTITIONS": "0"}, "STREAMREC_PARTITIONS", "greater than or equal to 1"),
        ({"STREAMREC_TOPIC_PREFIX": "a b"}, "STREAMREC_TOPIC_PREFIX", "letters"),
        ({"STREAMREC_SECURITY_PROTOCOL": "TLS"}, "STREAMREC_SECURITY_PROTOCOL", "SASL_SSL"),
        ({"STREAMREC_SECURITY_PROTOCOL": "SASL_SSL"}, "STREAMREC_SASL_MECHANISM", "required"),
        (
            {"STREAMREC_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "STREAMREC_SASL_MECHANISM": "PLAIN"},
            "STREAMREC_SASL_USERNAME",
            "required",
        ),
        ({"STREAMREC_SSL_CAFILE": "/nonexistent/ca.pem"}, "STREAMREC_SSL_CAFILE", "does not exist"),
    ],
)
def test_settings_that_cannot_work_name_the_setting(monkeypatch, env, setting, why) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load()
    assert info.value.setting == setting
    assert why in info.value.reason


def test_secrets_are_masked_but_reach_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", "hunter2")
    s = load()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    conf = s.confluent_config()
    assert conf["sasl.password"] == "hunter2"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["security.protocol"] == "SASL_SSL"
    creds = s.faust_credentials()
    assert creds.username == "svc"


def test_settings_are_frozen() -> None:
    s = KafkaSettings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
        s.topic_prefix = "x"  # type: ignore[misc]
