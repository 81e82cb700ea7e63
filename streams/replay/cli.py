"""``python -m streams.replay`` (console script ``streamrec-replay``): replay a dataset into Kafka.

::

    python -m streams.replay movielens [--slate-size 10] [--seed 0] [--speed 10000|max]
                                       [--limit N] [--click-delay-ms 5000]
    python -m streams.replay synthetic [--users 200] [--items 300] [--events 5000]
                                       [--shift-at 0.5|none] [--seed 0] [--speed 10000|max]

The cluster comes from the environment (``STREAMREC_BOOTSTRAP_SERVERS``,
``STREAMREC_TOPIC_PREFIX``, ...; see :mod:`contract.settings`).  The topics are
created first (idempotent) unless ``--no-create-topics``; ``--dry-run`` only
converts the dataset and prints what would be produced.

Exit status: 0 done, 1 a record was not delivered or the cluster/data failed,
2 a setting or an argument is invalid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from contract.errors import ConfigError, StreamrecError
from contract.settings import KafkaSettings, load
from streams.replay.producer import ProduceResult, produce

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
DEFAULT_SPEED = 10_000.0


def _speed(text: str) -> float | None:
    if text.strip().lower() in {"max", "inf", "none"}:
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'max'") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"speed must be a positive number or 'max', got {text!r}")
    return value


def _fraction_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'none'") from None


def _user_ids(text: str) -> frozenset[str]:
    ids = frozenset(u.strip() for u in text.split(",") if u.strip())
    if not ids:
        raise argparse.ArgumentTypeError("give at least one user id")
    return ids


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--speed",
        type=_speed,
        default=DEFAULT_SPEED,
        metavar="FACTOR|max",
        help="event time runs FACTOR times faster than wall time; 'max' = no pacing "
        f"(default {DEFAULT_SPEED:g})",
    )
    common.add_argument(
        "--seed",
        type=int,
        default=0,
        help="RNG seed; the same seed gives the same stream (default 0)",
    )
    common.add_argument(
        "--slate-size", type=int, default=10, help="items per impression (default 10)"
    )
    common.add_argument(
        "--dry-run", action="store_true", help="convert and print the counts; do not touch Kafka"
    )
    common.add_argument(
        "--no-create-topics",
        action="store_true",
        help="do not create missing topics first (when the user has no admin rights)",
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument(
        "--flush-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the last acknowledgements (default 60)",
    )
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    parser = argparse.ArgumentParser(
        prog="python -m streams.replay",
        description="Replay a dataset as items, impressions and clicks into Kafka, in event-time order. "
        "The cluster comes from STREAMREC_* environment variables.",
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{movielens,synthetic}")

    ml = sub.add_parser(
        "movielens",
        parents=[common],
        help="MovieLens-100k ratings as impressions and clicks",
        description="One impression per rating (the rated item among unrated ones, position randomised), "
        "one click per rating >= --min-rating.",
    )
    ml.add_argument(
        "--limit", type=int, default=None, help="replay only the first N ratings in event time"
    )
    ml.add_argument(
        "--click-delay-ms",
        type=int,
        default=5_000,
        help="event time from impression to click (default 5000)",
    )
    ml.add_argument(
        "--min-rating", type=float, default=4.0, help="ratings >= this are clicks (default 4)"
    )
    ml.add_argument(
        "--user-ids",
        type=_user_ids,
        default=None,
        metavar="ID[,ID...]",
        help="replay only these MovieLens users",
    )
    ml.add_argument(
        "--data-dir",
        default=None,
        help="folder with ml-100k.inter and ml-100k.item (default: fetched into the cache)",
    )

    syn = sub.add_parser(
        "synthetic",
        parents=[common],
        help="a seeded synthetic world with a known click model and drift",
        description="Topic-model users and items, click probability sigmoid(a*<interest,topics>+b), "
        "new items over time, interests re-drawn for some users at --shift-at.",
    )
    syn.add_argument("--users", type=int, default=200, help="number of users (default 200)")
    syn.add_argument("--items", type=int, default=300, help="items at the start (default 300)")
    syn.add_argument(
        "--new-items", type=int, default=100, help="items arriving mid-stream (default 100)"
    )
    syn.add_argument(
        "--events", type=int, default=5_000, help="number of impressions (default 5000)"
    )
    syn.add_argument("--topics", type=int, default=8, help="latent topics (default 8)")
    syn.add_argument(
        "--shift-at",
        type=_fraction_or_none,
        default=0.5,
        metavar="FRACTION|none",
        help="fraction of the impressions after which interests shift; 'none' = no drift (default 0.5)",
    )
    syn.add_argument(
        "--shift-fraction",
        type=float,
        default=0.5,
        help="fraction of users whose interests are re-drawn (default 0.5)",
    )
    syn.add_argument(
        "--mean-gap-ms",
        type=float,
        default=1_000.0,
        help="mean event time between impressions (default 1000)",
    )
    return parser


def _build_stream(args: argparse.Namespace) -> Any:
    """The replay object of the chosen dataset (MovieLensReplay or SyntheticStream)."""
    if args.dataset == "movielens":
        from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig

        config = MovieLensReplayConfig(
            slate_size=args.slate_size,
            seed=args.seed,
            click_delay_ms=args.click_delay_ms,
            min_rating_for_click=args.min_rating,
            limit=args.limit,
            users=args.user_ids,
        )
        return MovieLensReplay.from_path(args.data_dir, config)
    from streams.replay.synthetic import SyntheticConfig, SyntheticStream

    return SyntheticStream(
        SyntheticConfig(
            users=args.users,
            items=args.items,
            new_items=args.new_items,
            events=args.events,
            topics=args.topics,
            slate_size=args.slate_size,
            shift_at=args.shift_at,
            shift_fraction=args.shift_fraction,
            mean_gap_ms=args.mean_gap_ms,
            seed=args.seed,
        )
    )


def _print_counts(title: str, counts: dict[str, int]) -> None:
    print(title)
    for topic, n in counts.items():
        print(f"  {topic:<12} {n:>9,}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings: KafkaSettings | None = None if args.dry_run else load(KafkaSettings)
        replay = _build_stream(args)
        counts = replay.counts()
        first, last = replay.time_range()
        span_s = (last - first) / 1000.0
        if args.dry_run:
            _print_counts(
                f"{args.dataset}: would produce (event time spans {span_s / 86400:.1f} days)",
                counts,
            )
            return EXIT_OK
        assert settings is not None
        if args.speed is not None:
            log.info(
                "pacing at %gx event time: about %.0f s for %.1f days of events",
                args.speed,
                span_s / args.speed,
                span_s / 86400,
            )
        if not args.no_create_topics:
            from infra.admin import ensure_topics

            ensure_topics(settings)
        result: ProduceResult = produce(
            replay.stream(),
            settings,
            speed=args.speed,
            total=sum(counts.values()),
            progress=not args.no_progress,
            flush_timeout=args.flush_timeout,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StreamrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    prefix = f" (topic prefix {settings.topic_prefix!r})" if settings.topic_prefix else ""
    _print_counts(
        f"{args.dataset}: delivered to {settings.bootstrap_servers}{prefix}", result.counts
    )
    print(
        f"  {result.delivered:,} records in {result.elapsed_s:.1f} s ({result.rate:,.0f} records/s)"
    )
    if args.dataset == "synthetic":
        print(f"  best achievable AUC (ground truth vs sampled labels): {replay.best_auc():.4f}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
