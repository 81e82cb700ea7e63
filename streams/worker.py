"""``python -m streams.worker``: run one impression–click join worker.

Several workers with the same ``STREAMREC_JOIN_APP_ID`` (the consumer group)
on one topic set share the partitions; a worker that dies hands its
partitions, and their state, to the others.  Settings come from the
environment (``STREAMREC_*`` for Kafka and the partition count,
``STREAMREC_JOIN_*`` for the join, listed by ``--help``); a setting that cannot
work stops the worker before it connects, naming the variable (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from contract.errors import ConfigError, StreamrecError
from contract.settings import KafkaSettings, settings_help
from contract.topics import CLICKS, DEAD_LETTERS, IMPRESSIONS, LABELED, USER_HISTORY
from infra.admin import ensure_topics
from streams.join_settings import DEPRECATED_ENV, JoinSettings, load_worker_settings
from streams.restore import changelog_topic_name

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_FAILED = 1
INPUTS = (IMPRESSIONS, CLICKS)
OUTPUTS = (LABELED, USER_HISTORY, DEAD_LETTERS)


def check_topics(kafka: KafkaSettings, join: JoinSettings, *, create: bool = False, timeout: float = 30.0) -> None:
    """Fail (ConfigError naming the setting) unless the topics exist with matching partition counts.

    The two inputs and the state changelog must have ``STREAMREC_PARTITIONS``
    partitions (the count topics are created with): co-partitioning (and
    Faust's changelog recovery) depend on it.  With ``create``, missing
    DESIGN.md topics are created first.
    """
    if create:
        made = ensure_topics(kafka, INPUTS + OUTPUTS, partitions=kafka.partitions)
        if made:
            log.info("created topics %s", ", ".join(made))
    admin = AdminClient(kafka.confluent_config(logger=logging.getLogger(f"{__name__}.librdkafka")))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ConfigError("STREAMREC_BOOTSTRAP_SERVERS", f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
    topics = metadata.topics
    for spec in INPUTS + OUTPUTS:
        name = spec.real_name(kafka)
        if name not in topics or topics[name].error is not None:
            raise ConfigError(
                "STREAMREC_TOPIC_PREFIX",
                f"topic {name!r} does not exist on {kafka.bootstrap_servers} "
                "(create the topics with `python -m infra.admin create`, or pass --create-topics)",
            )
    for name in [s.real_name(kafka) for s in INPUTS] + [changelog_topic_name(kafka, join)]:
        meta = topics.get(name)
        if meta is not None and len(meta.partitions) != kafka.partitions:
            raise ConfigError(
                "STREAMREC_PARTITIONS",
                f"is {kafka.partitions} but topic {name!r} has {len(meta.partitions)} partitions; "
                "the inputs and the state changelog must all have the same count",
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streams.worker",
        description="Run one impression–click join worker (reads impressions and clicks, "
        "writes labeled, user-history and dead-letters).",
        epilog=settings_help(("join settings", JoinSettings),
                             ("kafka settings (shared by every service)", KafkaSettings))
        + "\n\ndeprecated names (still read): "
        + ", ".join(f"{old} -> {new}" for old, new in DEPRECATED_ENV.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        "--loglevel",  # the old spelling, still accepted
        dest="log_level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--create-topics", action="store_true", help="create missing topics first (as `python -m infra.admin create`)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        kafka, join = load_worker_settings()
        check_topics(kafka, join, create=args.create_topics)
    except ConfigError as exc:
        print(f"streams.worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StreamrecError as exc:
        print(f"streams.worker: {exc}", file=sys.stderr)
        return EXIT_FAILED

    # Faust is imported only now: --help and a bad setting answer without its start-up cost.
    import faust

    from streams.app import create_app

    app = create_app(kafka, join)
    app.join_service.metrics.serve(join.metrics_port)  # type: ignore[attr-defined]
    log.info(
        "join worker: group %s, %d partitions, window %d ms, lateness %d ms, idle %.1f s",
        app.conf.id,
        kafka.partitions,
        join.window_ms,
        join.allowed_lateness_ms,
        join.idle_timeout_s,
    )
    worker = faust.Worker(app, loglevel=args.log_level, quiet=True, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
        if app.crash_reason is not None:
            return EXIT_FAILED
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
