"""``python -m trainer``: run the trainer service until SIGTERM/SIGINT (then checkpoint and exit 0)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from contract.errors import StreamrecError
from contract.settings import KafkaSettings, load, settings_help
from trainer.service_settings import TrainerSettings

log = logging.getLogger("trainer")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m trainer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The streamrec trainer: consumes `labeled` (and `items`), trains the recommender "
            "continually, publishes guarded versions to the weight store and announces them on "
            "`model-updates`.  Checkpoints at every publish and on SIGTERM; a restart resumes "
            "from the checkpoint.  Configured by environment variables:"
        ),
        epilog=(
            settings_help(("trainer settings", TrainerSettings),
                          ("kafka settings (shared by every service)", KafkaSettings))
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=os.environ.get("STREAMREC_LOG_LEVEL", "INFO").upper(),
                        help="DEBUG, INFO, WARNING, ERROR (default INFO or $STREAMREC_LOG_LEVEL)")
    args = parser.parse_args(argv)
    # under torchrun (WORLD_SIZE > 1) each rank is one trainer of a data-parallel group
    ranked = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")
    rank_tag = f"[rank {os.environ.get('RANK', '?')}] " if ranked else ""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s {rank_tag}%(name)s: %(message)s")
    # lazy (start-up cost): torch and the model are imported only once --help and argv are handled
    from trainer.service import TrainerService

    try:
        kafka = load(KafkaSettings)
        settings = load(TrainerSettings)
        if ranked:
            from trainer.distributed import rank_from_env
            from trainer.distributed_service import DistributedTrainerService

            info = rank_from_env()
            service: TrainerService = (
                TrainerService(settings, kafka) if info is None else DistributedTrainerService(settings, kafka, info)
            )
        else:
            service = TrainerService(settings, kafka)
    except StreamrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: checkpointing and stopping", signal.Signals(signum).name)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.run()
    except StreamrecError as exc:
        log.error("trainer failed: %s", exc)
        if ranked:  # the threads of a broken process group can abort a normal interpreter exit
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
