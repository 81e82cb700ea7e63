"""What a published version is on disk: its directory name, its ``manifest.json``, and the errors.

A version ``N`` is the directory ``v{N:06d}`` under the store root holding
``weights.safetensors`` and ``manifest.json``; it exists once its manifest
does.  :class:`WeightsError` carries a :class:`WeightsReason`, a fixed code
for metrics and control flow (a metric label or a retry decision must not
depend on an error's wording).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from contract.errors import RecordError, StreamrecError
from contract.records import ModelUpdate

FORMAT_VERSION = 1
"""Version of the manifest layout written here; readers refuse newer ones."""

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
VERSION_DIR = re.compile(r"^v(\d{6,})$")
SIGNATURE_FILE = "manifest.json.sig"
MAX_DELTA_CHAIN = 64
MAX_MANIFEST_BYTES = 1 << 20
"""Longest manifest read (1 MiB; a real one is a few KiB): a longer file (or ``/dev/zero``) is refused."""
MAX_WEIGHTS_BYTES = 8 << 30
"""Default longest weights file read (8 GiB), whatever a manifest claims."""
_MAX_SIGNATURE_BYTES = 1024


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
    FOREIGN = "foreign"
    """A reference outside the configured store (another scheme or root, ``..``, a symlink out of it),
    or an encoder that is not the offline default nor a local folder in a trusted root."""
    SIGNATURE = "signature"
    """A signing key is configured and the manifest's HMAC-SHA256 signature is missing or wrong."""
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


def sign(key: bytes, manifest: bytes) -> bytes:
    """The signature file's content: the hex HMAC-SHA256 of the manifest bytes under ``key``."""
    return hmac.new(key, manifest, hashlib.sha256).hexdigest().encode() + b"\n"


@dataclass(frozen=True)
class Trust:
    """What a reader accepts: files confined to ``root`` (a local store's resolved root, symlinks
    followed; None = no check), size caps, and the signing key (None = signatures not required)."""

    root: str | None = None
    signing_key: bytes | None = None
    max_weights_bytes: int = MAX_WEIGHTS_BYTES
    max_manifest_bytes: int = MAX_MANIFEST_BYTES

    def check_inside(self, path: str, where: str) -> None:
        """Refuse (FOREIGN) a local ``path`` that resolves outside ``root`` (``..``, symlinks)."""
        if self.root is None:
            return
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != self.root:
            raise WeightsError(f"{where}: {path} resolves to {real}, outside the store {self.root}", WeightsReason.FOREIGN)


NO_TRUST_CHECKS = Trust()


def read_capped(fs: fsspec.AbstractFileSystem, path: str, limit: int, where: str, what: str, trust: Trust) -> bytes:
    """At most ``limit`` bytes of a file (SIZE when it has more, MISSING / UNREADABLE as they say)."""
    trust.check_inside(path, where)
    try:
        with fs.open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise WeightsError(f"{where}: {what} {fs.unstrip_protocol(path)} not found", WeightsReason.MISSING) from None
    except IsADirectoryError as exc:
        raise WeightsError(f"{where}: {what} {fs.unstrip_protocol(path)} is a directory", WeightsReason.INVALID) from exc
    except OSError as exc:
        raise WeightsError(f"{where}: cannot read {what}: {exc}", WeightsReason.UNREADABLE) from exc
    if len(data) > limit:
        raise WeightsError(f"{where}: {what} is longer than the {limit} bytes read at most", WeightsReason.SIZE)
    return bytes(data)


def check_signature(fs: fsspec.AbstractFileSystem, path: str, data: bytes, where: str, trust: Trust) -> None:
    """With a signing key: the manifest at ``path`` must have a signature file of ``data`` under it."""
    if trust.signing_key is None:
        return
    sig_path = posixpath.join(posixpath.dirname(path), SIGNATURE_FILE)
    try:
        found = read_capped(fs, sig_path, _MAX_SIGNATURE_BYTES, where, "signature", trust).strip()
    except WeightsError as exc:
        if exc.reason is not WeightsReason.MISSING:
            raise
        raise WeightsError(f"{where}: unsigned ({SIGNATURE_FILE} missing), a signing key is set",
                           WeightsReason.SIGNATURE) from None
    if not hmac.compare_digest(found, sign(trust.signing_key, data).strip()):
        raise WeightsError(f"{where}: the manifest's signature does not verify under the signing key",
                           WeightsReason.SIGNATURE)


def read_manifest(fs: fsspec.AbstractFileSystem, path: str, where: str, trust: Trust = NO_TRUST_CHECKS) -> Manifest:
    """The manifest at ``path`` of ``fs`` (capped, its signature checked before it is parsed);
    ``where`` names the version in errors."""
    data = read_capped(fs, path, trust.max_manifest_bytes, where, "manifest", trust)
    check_signature(fs, path, data, where, trust)
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


def secret_bytes(key: object) -> bytes | None:
    """A signing key as bytes: a ``SecretStr``, str or bytes; None or empty = no key."""
    if key is None:
        return None
    if hasattr(key, "get_secret_value"):
        key = key.get_secret_value()
    data = key.encode() if isinstance(key, str) else bytes(key)  # type: ignore[arg-type]
    return data or None


def confined_manifest(
    store_fs: fsspec.AbstractFileSystem, store_path: str, uri: str, version: int
) -> str:
    """The store's manifest path of ``version`` when ``uri`` names exactly it (same scheme and root,
    no ``..``, a local path resolving to the same file), else FOREIGN (INVALID for a bad URL)."""
    where = f"version {version}"
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise WeightsError(f"{where}: bad uri {uri!r}: {exc}") from exc
    expected = posixpath.join(store_path, version_dir(version), MANIFEST_FILE)
    foreign = WeightsError(
        f"{where}: announced uri {uri!r} is not this version's manifest in the configured store "
        f"{store_fs.unstrip_protocol(expected)}", WeightsReason.FOREIGN,
    )
    if type(fs) is not type(store_fs) or fs.protocol != store_fs.protocol or ".." in path.split("/"):
        raise foreign
    local = isinstance(store_fs, LocalFileSystem)
    same = os.path.realpath(path) == os.path.realpath(expected) if local else posixpath.normpath(path) == expected
    if not same:
        raise foreign
    return expected


def check_encoder(encoder: str | None, roots: list[str], where: str) -> None:
    """A manifest's encoder must be the offline default (None) or a local folder inside one of
    ``roots`` (resolved, symlinks followed): never a hub name, URL or folder elsewhere (FOREIGN)."""
    if encoder is None:
        return
    real = os.path.realpath(os.path.expanduser(encoder))
    if "://" not in encoder and "::" not in encoder and os.path.isdir(real):
        for root in roots:
            if os.path.commonpath([real, root]) == root:
                return
    raise WeightsError(
        f"{where}: encoder {encoder!r} is not the offline default nor a local folder under {roots}",
        WeightsReason.FOREIGN,
    )
