"""``python -m streams.replay`` (console script ``streamrec-replay``): replay a dataset into Kafka.

::

    python -m streams.replay movielens [--slate-size 10] [--seed 0] [--speed 10000|max]
                                       [--limit N] [--click-delay-ms 5000]
    python -m streams.replay synthetic [--users 200] [--items 300] [--events 5000]
                                       [--shift-at 0.5|none] [--seed 0] [--speed 10000|max]
    python -m streams.replay simulate [--users 200] [--items 300] [--requests 3000] [--k 10]
                                      [--position-bias 1.0] [--rate 25|max] [--window 250]

``simulate`` is a closed loop (:mod:`streams.replay.simulate`): simulated users send
``rec-requests`` to the scoring agent already running on the cluster, are shown its
answers and click by the synthetic ground truth; it prints click rate / optimal per
window of requests and a summary (a JSON last line).  ``make loop`` runs it for four
arms, each with a pipeline of its own (:mod:`harness.loop`).

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
    sub = parser.add_subparsers(
        dest="dataset", required=True, metavar="{movielens,synthetic,simulate}"
    )

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
    add_simulate_parser(sub)
    return parser


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    """The closed loop's world and pacing flags (shared with ``python -m harness.loop``)."""
    from streams.replay.simulate import LoopConfig

    d = LoopConfig()
    p.add_argument(
        "--users", type=int, default=d.users, help=f"simulated users (default {d.users})"
    )
    p.add_argument(
        "--items", type=int, default=d.items, help=f"items at the start (default {d.items})"
    )
    p.add_argument(
        "--new-items",
        type=int,
        default=d.new_items,
        help=f"items produced to `items` during the run, on schedule (default {d.new_items})",
    )
    p.add_argument(
        "--requests", type=int, default=d.requests, help=f"requests (default {d.requests})"
    )
    p.add_argument(
        "--topics", type=int, default=d.topics, help=f"latent topics (default {d.topics})"
    )
    p.add_argument("--k", type=int, default=d.k, help=f"items per recommendation (default {d.k})")
    p.add_argument(
        "--shift-at",
        type=_fraction_or_none,
        default=d.shift_at,
        metavar="FRACTION|none",
        help=f"fraction of the requests after which interests shift (default {d.shift_at})",
    )
    p.add_argument(
        "--shift-fraction",
        type=float,
        default=d.shift_fraction,
        help=f"fraction of users whose interests are re-drawn (default {d.shift_fraction})",
    )
    p.add_argument(
        "--mean-gap-ms",
        type=float,
        default=d.mean_gap_ms,
        help=f"simulation clock: mean event time between requests (default {d.mean_gap_ms:g})",
    )
    p.add_argument(
        "--position-bias",
        type=float,
        default=d.position_bias,
        help="click probability at position j is p * FACTOR**j (default 1: no position effect)",
    )
    p.add_argument(
        "--rate",
        type=_speed,
        default=d.rate,
        metavar="REQ_PER_S|max",
        help=f"requests per wall-clock second (default {d.rate:g}; max = as fast as answered)",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=d.in_flight,
        help=f"requests outstanding at most (default {d.in_flight})",
    )
    p.add_argument(
        "--window",
        type=int,
        default=d.window,
        help=f"requests per report window (default {d.window})",
    )
    p.add_argument(
        "--recover-to",
        type=float,
        default=d.recover_to,
        help=f"recovery threshold, share of optimal (default {d.recover_to})",
    )
    p.add_argument(
        "--answer-timeout",
        type=float,
        default=d.answer_timeout_s,
        help=f"longest wait for one answer, s (default {d.answer_timeout_s:g})",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the world and the clicks (default 0)"
    )


def loop_config(args: argparse.Namespace) -> Any:
    from streams.replay.simulate import LoopConfig

    return LoopConfig(
        users=args.users, items=args.items, new_items=args.new_items, requests=args.requests,
        topics=args.topics, k=args.k, shift_at=args.shift_at, shift_fraction=args.shift_fraction,
        mean_gap_ms=args.mean_gap_ms, position_bias=args.position_bias, rate=args.rate,
        in_flight=args.in_flight, window=args.window, recover_to=args.recover_to,
        answer_timeout_s=args.answer_timeout, seed=args.seed,
    )  # fmt: skip


def add_simulate_parser(sub: Any) -> None:
    sim = sub.add_parser(
        "simulate",
        help="a closed loop: simulated users ask the running scoring agent and click by a known truth",
        description="Simulated users (the synthetic world) send rec-requests, are shown the answers read from "
        "recommendations, and produce the impressions (with the agent's propensities and model_version) and "
        "the clicks the ground truth draws. Prints click rate / optimal per window and a JSON last line. "
        "The join's window must exceed the click delay (10 s of event time) and should be short: with the "
        "default 30 minutes, negatives follow 1,800 requests later (make loop uses STREAMREC_JOIN_WINDOW_MS=30000).",
    )
    add_simulate_arguments(sim)
    sim.add_argument(
        "--no-create-topics", action="store_true", help="do not create missing topics first"
    )
    sim.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _simulate(args: argparse.Namespace) -> int:
    from streams.replay.loop_figures import format_summary, format_window_details, json_line
    from streams.replay.simulate import LoopWorld, produce_catalog, run_closed_loop

    try:
        settings = load(KafkaSettings)
        cfg = loop_config(args)
        if not args.no_create_topics:
            from infra.admin import ensure_topics

            ensure_topics(settings)
        world = LoopWorld(cfg)
        produce_catalog(settings, world)
        run = run_closed_loop(settings, cfg, world=world, catalog_done=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StreamrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    summary = run.summary()
    print(f"closed loop: {cfg.requests:,} requests in {run.elapsed_s:.0f} s; shift at request {run.shift_index}; "
          f"records produced {run.produced}")  # fmt: skip
    print(format_window_details(run.windows()))
    print(format_summary({"run": summary}))
    print(json_line({"config": cfg.__dict__, "summary": summary, "elapsed_s": run.elapsed_s}))
    return EXIT_OK


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
    if args.dataset == "simulate":
        return _simulate(args)
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
