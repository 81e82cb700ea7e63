"""``python -m streams.replay``: see :mod:`streams.replay.cli`."""

import sys

from streams.replay.cli import main

sys.exit(main())
