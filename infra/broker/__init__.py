"""A local single-node KRaft Apache Kafka 3.9.1 broker: its jars, its process, its command line.

- :mod:`infra.broker.jars`: the broker's jars, resolved with Maven into the cache;
- :mod:`infra.broker.local`: :class:`LocalBroker`, one broker process and its home;
- :mod:`infra.broker.cli`: ``python -m infra.broker fetch | up | down | status``.

The names other packages use are importable from here.
"""

from infra.broker.cli import STATUS_STOPPED, main
from infra.broker.errors import BrokerError, BrokerStartError, PortInUseError, ToolNotFoundError
from infra.broker.jars import KAFKA_VERSION, fetch_jars, jars_present, kafka_dir, libs_dir
from infra.broker.local import (
    DEFAULT_PORT,
    LIBRDKAFKA_LOGGER,
    LocalBroker,
    new_cluster_id,
    running_pid,
)

__all__ = [
    "DEFAULT_PORT",
    "KAFKA_VERSION",
    "LIBRDKAFKA_LOGGER",
    "STATUS_STOPPED",
    "BrokerError",
    "BrokerStartError",
    "LocalBroker",
    "PortInUseError",
    "ToolNotFoundError",
    "fetch_jars",
    "jars_present",
    "kafka_dir",
    "libs_dir",
    "main",
    "new_cluster_id",
    "running_pid",
]
