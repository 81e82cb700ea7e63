"""Shared fixtures: a real Kafka broker for the session, and fresh topics for each test.

``kafka_bootstrap`` finds a broker, in this order:

1. ``$STREAMREC_TEST_BOOTSTRAP`` (host:port of a broker you run yourself);
2. a testcontainers Kafka (``confluentinc/cp-kafka:7.9.0``, KRaft) when a
   Docker daemon answers a ping;
3. the local jar broker of :mod:`infra.broker`, started once for the session
   on free loopback ports in a temporary folder under the cache, and stopped
   (and removed) at the end of the session, failed or not.

``kafka_settings`` gives each test its own topic prefix, with every topic of
DESIGN.md created (4 partitions), so tests never see each other's records.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from contract.settings import KafkaSettings
from contract.topics import ALL_TOPICS
from infra.admin import AdminError, delete_topics, ensure_topics
from infra.broker import LocalBroker

log = logging.getLogger(__name__)

TEST_BOOTSTRAP_ENV = "STREAMREC_TEST_BOOTSTRAP"
CONTAINER_IMAGE = "confluentinc/cp-kafka:7.9.0"
TEST_PARTITIONS = 4

_broker_report: list[str] = []


def _docker_answers() -> bool:
    """True when a Docker daemon answers a ping (the ``docker`` CLI alone proves nothing)."""
    try:
        import docker  # lazy, like testcontainers below: only a session without $STREAMREC_TEST_BOOTSTRAP needs it

        docker.from_env(timeout=2).ping()
    except Exception as exc:  # no socket, no permission, no daemon: all mean "no Docker"
        log.info("no usable Docker daemon (%s: %s)", type(exc).__name__, exc)
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a real Kafka broker for the whole session."""
    given = os.environ.get(TEST_BOOTSTRAP_ENV, "").strip()
    if given:
        _broker_report.append(f"kafka: {given} (from ${TEST_BOOTSTRAP_ENV})")
        yield given
        return
    started = time.monotonic()
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer(CONTAINER_IMAGE).with_kraft() as container:
            bootstrap = container.get_bootstrap_server()
            _broker_report.append(
                f"kafka: {CONTAINER_IMAGE} container at {bootstrap}, ready in {time.monotonic() - started:.1f} s"
            )
            yield bootstrap
        return
    with LocalBroker(partitions=TEST_PARTITIONS) as broker:
        _broker_report.append(
            f"kafka: local jar broker at {broker.bootstrap}, ready in {broker.startup_seconds:.1f} s "
            f"(pid {broker.pid})"
        )
        yield broker.bootstrap


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> Iterator[KafkaSettings]:
    """Settings with a fresh topic prefix (``t-<uuid8>-``) and every DESIGN.md topic created."""
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"t-{uuid.uuid4().hex[:8]}-",
        partitions=TEST_PARTITIONS,
    )
    ensure_topics(settings, ALL_TOPICS)
    yield settings
    _delete_topics(settings)


def _delete_topics(settings: KafkaSettings) -> None:
    """Best effort: a shared broker ($STREAMREC_TEST_BOOTSTRAP) should not fill up with test topics."""
    try:
        delete_topics(settings, ALL_TOPICS, timeout=15)
    except AdminError as exc:
        log.warning("could not delete the test topics of %s: %s", settings.topic_prefix, exc)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _broker_report:
        terminalreporter.write_line(line)
