"""What a published version is on disk: its directory name, its ``manifest.json``, and the errors.

A version ``N`` is the directory ``v{N:06d}`` under the store root holding
``weights.safetensors`` and ``manifest.json``; it exists once its manifest
does.  :class:`WeightsError` carries a :class:`WeightsReason`, a fixed code
for metrics and control flow (a metric label or a retry decision must not
depend on an error's wording).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import fsspec

from contract.errors import RecordError, StreamrecError
from contract.records import ModelUpdate

FORMAT_VERSION = 1
"""Version of the manifest layout written here; readers refuse newer ones."""

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
VERSION_DIR = re.compile(r"^v(\d{6,})$")
MAX_DELTA_CHAIN = 64


class WeightsReason(StrEnum):
    """Why a version cannot be published or loaded: a stable code (never parsed from a message)."""

    CHECKSUM = "checksum"
    """The weights' sha256 differs from the manifest's (or the announced one)."""
    TRUNCATED = "truncated"
    """The weights file is shorter than the manifest says."""
    SIZE = "size"
    """The weights file is longer than the manifest says."""
    CORRUPT = "corrupt"
    """The weights file is not valid safetensors."""
    MISSING = "missing"
    """A manifest, weights file or base version is not there."""
    UNREADABLE = "unreadable"
    """The storage failed to read a file (I/O error)."""
    MISMATCH = "mismatch"
    """Tensors that do not fit the model (names or shapes)."""
    CONFIG = "config"
    """A model config that does not validate, or differs where it must not."""
    NON_FINITE = "non_finite"
    """Weights that give NaN/inf item vectors or scores (checked by serving before a swap)."""
    EXISTS = "exists"
    """The version number is taken (another writer published it)."""
    INVALID = "invalid"
    """Anything else: a bad argument, manifest, reference or URL."""


class WeightsError(StreamrecError):
    """A version that cannot be published or loaded; the message says which and why, ``reason`` codes it."""

    def __init__(self, message: str, reason: WeightsReason = WeightsReason.INVALID) -> None:
        super().__init__(message)
        self.reason = WeightsReason(reason)


def version_dir(version: int) -> str:
    return f"v{version:06d}"


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one version."""

    version: int
    kind: Literal["full", "delta"]
    base_version: int | None
    sha256: str
    size: int
    model_name: str
    model_config: dict[str, Any]
    metrics: dict[str, float]
    trained_examples: int
    source_offsets: dict[str, int]
    created_ts: int
    tensors: int
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "model_name": self.model_name,
            "version": self.version,
            "kind": self.kind,
            "base_version": self.base_version,
            "weights_file": WEIGHTS_FILE,
            "sha256": self.sha256,
            "size": self.size,
            "tensors": self.tensors,
            "model_config": self.model_config,
            "metrics": self.metrics,
            "trained_examples": self.trained_examples,
            "source_offsets": self.source_offsets,
            "created_ts": self.created_ts,
        }
        return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
            fmt = int(doc["format_version"])
            if fmt > FORMAT_VERSION:
                raise WeightsError(
                    f"{where}: manifest format {fmt} is newer than this reader ({FORMAT_VERSION})"
                )
            kind = doc["kind"]
            if kind not in ("full", "delta"):
                raise WeightsError(f"{where}: unknown kind {kind!r}")
            base = doc.get("base_version")
            return cls(
                version=int(doc["version"]),
                kind=kind,
                base_version=None if base is None else int(base),
                sha256=str(doc["sha256"]),
                size=int(doc["size"]),
                model_name=str(doc["model_name"]),
                model_config=dict(doc["model_config"]),
                metrics={str(k): float(v) for k, v in doc.get("metrics", {}).items()},
                trained_examples=int(doc["trained_examples"]),
                source_offsets={str(k): int(v) for k, v in doc.get("source_offsets", {}).items()},
                created_ts=int(doc["created_ts"]),
                tensors=int(doc.get("tensors", 0)),
                format_version=fmt,
            )
        except WeightsError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{where}: manifest is not valid ({type(exc).__name__}: {exc})") from exc


def read_manifest(fs: fsspec.AbstractFileSystem, path: str, where: str) -> Manifest:
    """The manifest at ``path`` of ``fs``; ``where`` names the version in errors."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise WeightsError(f"{where}: manifest {fs.unstrip_protocol(path)} not found", WeightsReason.MISSING) from None
    except OSError as exc:
        raise WeightsError(f"{where}: cannot read manifest: {exc}", WeightsReason.UNREADABLE) from exc
    return Manifest.from_json(data, where)


def update_of(man: Manifest, uri: str) -> ModelUpdate:
    """The ModelUpdate record that announces the version of ``man`` (its manifest at ``uri``)."""
    try:
        return ModelUpdate(
            model=man.model_name,
            version=man.version,
            uri=uri,
            sha256=man.sha256,
            kind=man.kind,
            base_version=man.base_version,
            created_ts=man.created_ts,
            metrics=man.metrics,
            trained_examples=man.trained_examples,
            source_offsets=man.source_offsets,
            ts=man.created_ts,
        )
    except RecordError as exc:
        raise WeightsError(f"version {man.version}: manifest does not make a valid ModelUpdate: {exc}") from exc
