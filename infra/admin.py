"""Create and inspect the topics of DESIGN.md with the Kafka admin API (idempotent).

``ensure_topics(settings)`` creates every topic of :data:`contract.topics.ALL_TOPICS`
that does not exist yet, with the settings' partition count and replication
factor and each spec's config (``cleanup.policy=compact`` for the catalog,
the user histories and the model manifest).  Existing topics are left as they
are; one whose partition count or cleanup policy differs from the spec is
reported with a warning, since co-partitioned topics with different counts
break the join.

The command line reads :class:`~contract.settings.KafkaSettings` from the
environment (``STREAMREC_BOOTSTRAP_SERVERS``, ``STREAMREC_TOPIC_PREFIX``, ...)::

    python -m infra.admin create [--partitions N] [--replication N]
    python -m infra.admin list
    python -m infra.admin describe
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from contract.errors import ConfigError, StreamrecError
from contract.settings import KafkaSettings, load
from contract.topics import ALL_TOPICS, TopicSpec

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


class AdminError(StreamrecError):
    """A topic could not be created or described, or the cluster could not be reached."""


@dataclass(frozen=True)
class TopicInfo:
    """What the cluster says about one topic."""

    name: str
    partitions: int
    replication: int
    config: dict[str, str]


def admin_client(settings: KafkaSettings) -> AdminClient:
    """An AdminClient with the settings' security options; librdkafka logs go to ``logging``."""
    return AdminClient(settings.confluent_config(logger=logging.getLogger(f"{__name__}.librdkafka")))


def _unwrap(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


def _metadata(admin: AdminClient, settings: KafkaSettings, timeout: float):  # noqa: ANN202
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise AdminError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from exc


def ensure_topics(
    settings: KafkaSettings,
    specs: Iterable[TopicSpec] = ALL_TOPICS,
    partitions: int | None = None,
    replication: int | None = None,
    *,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics of ``specs`` that are missing; return the names created (in spec order).

    Partitions and replication default to the settings'.  A topic that already
    exists is not an error (a second call creates nothing and returns ``[]``).
    Returns once every topic is visible with a leader for each partition, so
    clients can produce to it straight away.
    """
    specs = list(specs)
    partitions = partitions or settings.partitions
    replication = replication or settings.replication_factor
    admin = admin_client(settings)
    _metadata(admin, settings, timeout)  # a clear "cannot reach" error before anything else
    new = [
        NewTopic(
            spec.real_name(settings),
            num_partitions=partitions,
            replication_factor=replication,
            config=spec.topic_config(),
        )
        for spec in specs
    ]
    if not new:
        return []
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    created: list[str] = []
    existing: list[str] = []
    for topic in new:
        name = topic.topic
        try:
            futures[name].result(timeout=timeout)
        except KafkaException as exc:
            err = _unwrap(exc)
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                existing.append(name)
                continue
            raise AdminError(f"creating topic {name!r} on {settings.bootstrap_servers} failed: {exc}") from exc
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError on 3.11
            raise AdminError(f"creating topic {name!r}: no answer from the cluster in {timeout:.0f} s") from exc
        created.append(name)
    if created:
        log.info("created %d topic(s): %s", len(created), ", ".join(created))
    _wait_visible(admin, settings, [t.topic for t in new], timeout)
    if existing:
        by_name = {spec.real_name(settings): spec for spec in specs}
        _check_existing(admin, settings, {n: by_name[n] for n in existing}, partitions)
    return created


def delete_topics(
    settings: KafkaSettings,
    specs: Iterable[TopicSpec] = ALL_TOPICS,
    *,
    timeout: float = 30.0,
) -> list[str]:
    """Delete the topics of ``specs`` (with the settings' prefix); return the names deleted.

    A topic that does not exist is skipped.  Meant for tests and benchmarks
    that clean up after themselves; there is deliberately no CLI for it.
    """
    names = [spec.real_name(settings) for spec in specs]
    if not names:
        return []
    admin = admin_client(settings)  # must outlive the futures
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    deleted = []
    for name in names:
        try:
            futures[name].result(timeout=timeout)
        except KafkaException as exc:
            err = _unwrap(exc)
            if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise AdminError(f"deleting topic {name!r} failed: {exc}") from exc
        except TimeoutError as exc:
            raise AdminError(f"deleting topic {name!r}: no answer from the cluster in {timeout:.0f} s") from exc
        deleted.append(name)
    return deleted


def _wait_visible(admin: AdminClient, settings: KafkaSettings, names: Sequence[str], timeout: float) -> None:
    """Wait until the cluster metadata shows every topic with a leader on every partition."""
    deadline = time.monotonic() + timeout
    missing = list(names)
    while True:
        md = _metadata(admin, settings, timeout=max(1.0, deadline - time.monotonic()))
        missing = [
            n for n in names
            if n not in md.topics
            or md.topics[n].error is not None
            or not md.topics[n].partitions
            or any(p.leader < 0 for p in md.topics[n].partitions.values())
        ]  # fmt: skip
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AdminError(f"topics not ready after {timeout:.0f} s: {', '.join(missing)}")
        time.sleep(0.05)  # metadata propagates within milliseconds on a healthy cluster


def _check_existing(
    admin: AdminClient, settings: KafkaSettings, specs: dict[str, TopicSpec], partitions: int
) -> None:
    info = describe_topics(settings, list(specs), admin=admin)
    for name, spec in specs.items():
        ti = info.get(name)
        if ti is None:
            continue
        if ti.partitions != partitions:
            log.warning(
                "topic %s exists with %d partitions but %d are configured; co-partitioned "
                "topics must agree (recreate it or set STREAMREC_PARTITIONS=%d)",
                name, ti.partitions, partitions, ti.partitions,
            )  # fmt: skip
        want = spec.topic_config().get("cleanup.policy")
        have = ti.config.get("cleanup.policy")
        if want and have and want != have:
            log.warning("topic %s exists with cleanup.policy=%s but the spec wants %s", name, have, want)


def describe_topics(
    settings: KafkaSettings,
    names: Sequence[str],
    *,
    admin: AdminClient | None = None,
    timeout: float = 30.0,
) -> dict[str, TopicInfo]:
    """Partitions, replication and (non-default and policy) config of the topics that exist."""
    admin = admin or admin_client(settings)
    md = _metadata(admin, settings, timeout)
    present = [n for n in names if n in md.topics and md.topics[n].error is None]
    if not present:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in present]
    futures = admin.describe_configs(resources, request_timeout=timeout)
    out: dict[str, TopicInfo] = {}
    for res, fut in futures.items():
        try:
            entries = fut.result(timeout=timeout)
        except KafkaException as exc:
            raise AdminError(f"describing topic {res.name!r} failed: {exc}") from exc
        config = {
            k: e.value
            for k, e in entries.items()
            if e.value is not None and (not e.is_default or k in ("cleanup.policy", "retention.ms"))
        }
        parts = md.topics[res.name].partitions
        replication = len(next(iter(parts.values())).replicas) if parts else 0
        out[res.name] = TopicInfo(res.name, len(parts), replication, config)
    return out


def list_topics(settings: KafkaSettings, *, timeout: float = 30.0) -> list[str]:
    """Every topic of the cluster except internal ones (``__consumer_offsets`` ...), sorted."""
    md = _metadata(admin_client(settings), settings, timeout)
    return sorted(n for n in md.topics if not n.startswith("__"))


# --- command line --------------------------------------------------------------------------


def _cmd_create(settings: KafkaSettings, args: argparse.Namespace) -> int:
    created = set(
        ensure_topics(settings, partitions=args.partitions, replication=args.replication, timeout=args.timeout)
    )
    for spec in ALL_TOPICS:
        name = spec.real_name(settings)
        print(f"{'created' if name in created else 'exists '}  {name}")
    print(f"{len(created)} created, {len(ALL_TOPICS) - len(created)} already existed "
          f"on {settings.bootstrap_servers}")  # fmt: skip
    return 0


def _cmd_list(settings: KafkaSettings, args: argparse.Namespace) -> int:
    for name in list_topics(settings, timeout=args.timeout):
        print(name)
    return 0


def _cmd_describe(settings: KafkaSettings, args: argparse.Namespace) -> int:
    names = [spec.real_name(settings) for spec in ALL_TOPICS]
    info = describe_topics(settings, names, timeout=args.timeout)
    missing = 0
    for name in names:
        ti = info.get(name)
        if ti is None:
            missing += 1
            print(f"{name:<40} MISSING")
            continue
        conf = " ".join(f"{k}={v}" for k, v in sorted(ti.config.items()))
        print(f"{name:<40} partitions={ti.partitions} replication={ti.replication} {conf}")
    if missing:
        print(f"{missing} topic(s) missing: run `python -m infra.admin create`", file=sys.stderr)
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.admin",
        description="Create and inspect the streamrec topics on $STREAMREC_BOOTSTRAP_SERVERS.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the cluster (default 15)")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", parents=[common], help="create the missing topics of DESIGN.md (idempotent)")
    create.add_argument("--partitions", type=int, default=None, help="default: $STREAMREC_PARTITIONS (4)")
    create.add_argument("--replication", type=int, default=None,
                        help="default: $STREAMREC_REPLICATION_FACTOR (1)")  # fmt: skip
    sub.add_parser("list", parents=[common], help="list the cluster's topics")
    sub.add_parser("describe", parents=[common], help="partitions and config of each DESIGN.md topic (exit 1 if any is missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger(f"{__name__}.librdkafka").setLevel(logging.CRITICAL)
    try:
        settings = load(KafkaSettings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    commands = {"create": _cmd_create, "list": _cmd_list, "describe": _cmd_describe}
    try:
        return commands[args.command](settings, args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
