"""The trainer's checkpoint: everything needed to resume exactly where it stopped.

A checkpoint holds the learner's state (model, optimizer, replay buffer, metric
state, RNG), the consumer offsets it has trained up to (next offset per
``"topic:partition"``), the number of examples trained, the recent example_id
dedupe window, the model config, and the service's own small state (versions
published, held-back examples...).

It is written atomically (``torch.save`` to a temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory): after a crash the
file on disk is either the previous checkpoint or the new one, never a mix.
The previous checkpoint is kept as ``checkpoint.prev.pt`` (renamed just before
the write; renamed back when the write fails), and :func:`load_checkpoint`
falls back to it when the newest one is missing (a crash mid-write) or
corrupt (a truncated file, a bad disk block): the trainer then resumes one
checkpoint earlier and redoes the work after it, instead of not starting.
Loading rebuilds nothing by itself; it checks that the checkpoint's model
config equals the one the trainer is configured with and refuses a mismatch
with an error naming the differing fields.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from contract.errors import StreamrecError
from trainer.files import atomic_open

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"


class CheckpointError(StreamrecError):
    """A checkpoint that cannot be written, read, or does not fit this trainer."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be decoded (truncated, garbled, not a checkpoint)."""


@dataclass
class Checkpoint:
    learner_state: dict[str, Any]
    offsets: dict[str, int]
    """Next offset to consume per ``"topic:partition"``: everything before it is trained."""
    examples_trained: int
    recent_example_ids: list[str]
    model_config: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    """The trainer settings it was written under (informational, JSON types)."""
    service_state: dict[str, Any] = field(default_factory=dict)
    """The service's own resumable state (versions published, held-back examples...)."""
    created_ts: int = 0
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created_ts": self.created_ts or int(time.time() * 1000),
            "learner_state": self.learner_state,
            "offsets": dict(self.offsets),
            "examples_trained": int(self.examples_trained),
            "recent_example_ids": list(self.recent_example_ids),
            "model_config": self.model_config,
            "settings": self.settings,
            "service_state": self.service_state,
        }


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / CHECKPOINT_FILE


def save_checkpoint(directory: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``<directory>/checkpoint.pt``; return the path."""
    path = checkpoint_path(directory)
    previous = Path(directory) / PREVIOUS_FILE
    started = time.perf_counter()
    kept = False
    if path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, previous)  # the newest becomes the previous one
        kept = True
    try:
        with atomic_open(path, mode=0o600) as f:
            torch.save(ckpt.to_dict(), f)
    except Exception as exc:  # disk full, an unpicklable value...: the old checkpoint stays
        if kept and not path.exists():
            os.replace(previous, path)
        raise CheckpointError(f"cannot write checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    log.debug("checkpoint written to %s in %.2fs", path, time.perf_counter() - started)
    return path


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> int:
    """Delete temporary files of checkpoint writes that a crash interrupted; return how many."""
    removed = 0
    for tmp in Path(directory).glob(f".{CHECKPOINT_FILE}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    if removed:
        log.info("removed %d interrupted checkpoint write(s) in %s", removed, directory)
    return removed


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    expected_model_config: dict[str, Any] | None = None,
) -> Checkpoint | None:
    """Read ``<directory>/checkpoint.pt``, or the previous one when it is missing or corrupt
    (None when there is neither).

    Raises :class:`CheckpointError` when the file is unreadable, of a newer
    format, or (given ``expected_model_config``) written for another model,
    and :class:`CorruptCheckpointError` when both files are corrupt.
    """
    path, previous = checkpoint_path(directory), Path(directory) / PREVIOUS_FILE
    try:
        ckpt = _read(path)
    except CorruptCheckpointError as exc:
        if not previous.exists():
            raise
        log.error("%s; resuming from the previous checkpoint %s", exc, previous)
        ckpt = _read(previous)
    if ckpt is None and previous.exists():
        log.warning("no checkpoint %s (a write was interrupted): resuming from %s", path, previous)
        ckpt = _read(previous)
    if ckpt is not None and expected_model_config is not None:
        check_model_config(ckpt.model_config, expected_model_config, where=str(path))
    return ckpt


def _read(path: Path) -> Checkpoint | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    try:
        doc = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {exc}") from exc
    if not isinstance(doc, dict) or "format_version" not in doc:
        raise CorruptCheckpointError(f"checkpoint {path} is not a streamrec trainer checkpoint")
    if int(doc["format_version"]) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {doc['format_version']}, newer than this trainer ({FORMAT_VERSION})"
        )
    try:
        ckpt = Checkpoint(
            learner_state=doc["learner_state"],
            offsets={str(k): int(v) for k, v in doc["offsets"].items()},
            examples_trained=int(doc["examples_trained"]),
            recent_example_ids=[str(x) for x in doc["recent_example_ids"]],
            model_config=dict(doc["model_config"]),
            settings=dict(doc.get("settings", {})),
            service_state=dict(doc.get("service_state", {})),
            created_ts=int(doc.get("created_ts", 0)),
            format_version=int(doc["format_version"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {exc}") from exc
    return ckpt


def check_model_config(found: dict[str, Any], expected: dict[str, Any], *, where: str) -> None:
    """Raise :class:`CheckpointError` naming every field where the two configs differ."""
    if found == expected:
        return
    keys = sorted(set(found) | set(expected))
    diffs = [
        f"{k}: checkpoint has {found.get(k, '<absent>')!r}, configured {expected.get(k, '<absent>')!r}"
        for k in keys
        if found.get(k, "<absent>") != expected.get(k, "<absent>")
    ]
    raise CheckpointError(
        f"checkpoint {where} was written for another model ({'; '.join(diffs)}); "
        "point the trainer at another checkpoint dir or restore the model settings"
    )
