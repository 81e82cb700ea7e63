"""When the trainer checkpoints, writing it, and the trained-ids debug log rolled back with it.

A checkpoint is written at every publish, every ``checkpoint_every_steps``
steps, at shutdown, and when the trainer is idle (nothing queued) with
offsets that moved without a step (duplicates, dead letters, held-back
examples only) ``checkpoint_every_s`` after the last one.  The file format
is :mod:`trainer.checkpoint`.

The trained-ids log (``STREAMREC_TRAINER_TRAINED_IDS_LOG``, a debug aid)
appends ``T <example_id>`` for every example trained and ``H <example_id>``
for every one held back; its size is checkpointed and a restart truncates it
back to that size, so it lists exactly the lineage of the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from contract.records import Labeled
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.service_settings import TrainerSettings

log = logging.getLogger(__name__)


class Checkpointer:
    """The checkpoint schedule of one trainer, and the writing (see the module doc)."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.steps_since = 0
        self.last = time.monotonic()
        self._offsets: dict[int, int] = {}

    def stepped(self) -> None:
        self.steps_since += 1

    def due(self, now: float, offsets: dict[int, int], idle: bool) -> str | None:
        """Why a checkpoint is due now (its log reason), or None."""
        if self.steps_since >= self.settings.checkpoint_every_steps:
            return f"{self.steps_since} steps"
        if (
            idle
            and offsets != self._offsets
            and now - self.last >= self.settings.checkpoint_every_s
        ):  # idle with progress since the last checkpoint: steps whose version the guardrail refused,
            # or progress no step covers (duplicates, dead letters, held back only)
            return "idle"
        return None

    def save(self, ckpt: Checkpoint, offsets: dict[int, int], reason: str) -> None:
        started = time.perf_counter()
        save_checkpoint(self.settings.checkpoint_dir, ckpt)
        self.steps_since = 0
        self._offsets = dict(offsets)
        self.last = time.monotonic()
        log.info("checkpoint (%s): %d examples trained, offsets %s, in %.2fs",
                 reason, ckpt.examples_trained, ckpt.offsets, time.perf_counter() - started)


class TrainedIdsLog:
    """The trained-ids debug log (see the module doc); does nothing without a path."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def open(self, keep: int) -> None:
        """Open for appending, cut back to ``keep`` bytes (the checkpoint's size; 0 on a fresh start)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - kept open for the service's life
        size = self._file.seek(0, 2)
        if size < keep:
            log.warning("trained-ids log %s is shorter (%d) than the checkpoint says (%d)", self.path, size, keep)
        elif size > keep:
            log.info("trained-ids log: rolling back %d bytes written after the checkpoint", size - keep)
            self._file.truncate(keep)
        self._file.seek(0, 2)

    def write(self, train: Sequence[Labeled], held: Sequence[Labeled]) -> None:
        if self._file is None or not (train or held):
            return
        lines = [f"T {ex.example_id}\n" for ex in train] + [f"H {ex.example_id}\n" for ex in held]
        self._file.write("".join(lines).encode())
        self._file.flush()

    def size(self) -> int:
        """Bytes written so far (what the checkpoint records)."""
        if self._file is None:
            return 0
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def trained_ids(path: str | Path) -> list[tuple[str, str]]:
    """Read a trained-ids debug log: ``[(T|H, example_id), ...]`` in training order."""
    out = []
    for line in Path(path).read_text().splitlines():
        kind, _, example = line.partition(" ")
        if example:
            out.append((kind, example))
    return out
