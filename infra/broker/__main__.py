"""``python -m infra.broker``: the local broker's command line (:mod:`infra.broker.cli`)."""

import sys

from infra.broker.cli import main

sys.exit(main())
