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
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # lazy (start-up cost): torch and the model are imported only once --help and argv are handled
    from trainer.service import TrainerService

    try:
        kafka = load(KafkaSettings)
        settings = load(TrainerSettings)
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
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
