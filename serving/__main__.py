"""``python -m serving``: run one scoring agent until SIGTERM/SIGINT (then drain, commit, exit 0)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from contract.errors import StreamrecError
from contract.settings import KafkaSettings, load, settings_help
from serving.settings import FALLBACK_VERSION, ServingSettings, check_renamed

log = logging.getLogger("serving")


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m serving",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The streamrec scoring agent: answers `rec-requests` with the top-k items on "
            "`recommendations`, scored by the live model version; keeps the catalog, user "
            "histories and click popularity from `items` and `user-history`, and hot-swaps "
            "versions announced on `model-updates` (verified; a bad version is refused and the "
            f"old one keeps serving).  Before any valid version it serves `{FALLBACK_VERSION}`. "
            "Run several with the same group to share the load.  Configured by environment "
            "variables:"
        ),
        epilog=(
            settings_help(("serving settings", ServingSettings),
                          ("kafka settings (shared by every service)", KafkaSettings))
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    parser.add_argument("--log-level", default=os.environ.get("STREAMREC_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING... (default INFO or $STREAMREC_LOG_LEVEL)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Hand the GIL over every 1 ms (default 5): the consuming and scoring threads take turns sooner.
    sys.setswitchinterval(0.001)
    try:
        kafka = load(KafkaSettings)
        check_renamed()
        settings = load(ServingSettings)
        # Imported here: the agent pulls in torch and transformers (seconds), which --help does not need.
        from serving.agent import ServingAgent

        agent = ServingAgent(kafka, settings)
    except StreamrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining and stopping", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
        while not agent.wait(1.0):
            pass
        agent.stop()
    except StreamrecError as exc:
        log.error("serving failed: %s", exc)
        agent.stop()
        return 1
    if agent.error is not None:
        log.error("serving stopped on an error: %s", agent.error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
