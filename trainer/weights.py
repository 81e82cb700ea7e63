"""The versioned weight store: safetensors snapshots with a manifest, verified by sha256.

Layout under the store root (a local directory, or any fsspec URL such as
``file:///srv/weights`` or ``memory://weights``)::

    v000001/weights.safetensors   full: model.state_dict()
    v000001/manifest.json         model config, sha256, kind, metrics, offsets...
    v000002/weights.safetensors   delta: model.trainable_state_dict() only
    v000002/manifest.json         kind "delta", base_version 1

A version exists once its manifest exists.  :meth:`WeightStore.publish` writes
the weights first and the manifest last, each to a temporary name that is then
renamed, so a reader never sees half a file and a crash mid-publish leaves no
version behind.  :meth:`WeightStore.load` refuses a version whose weights do
not match the manifest's sha256 (or size), raising :class:`WeightsError` with
the reason (``exc.reason``, a :class:`WeightsReason` code); the serving agent
keeps its old model in that case.

This module is the store (paths, listing, publishing, pruning); the manifest
and the errors are in :mod:`trainer.weight_manifest`, the tensors of a delta
and the reading of a delta chain in :mod:`trainer.weight_deltas`.  Everything
is importable from here.

:func:`locate_version` names one version of *another* store by its directory
or manifest (``STREAMREC_TRAINER_INIT_FROM``), and :func:`config_mismatch` says
where its model config differs from the one configured.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from contract.records import ModelUpdate
from contract.settings import default_cache_dir
from trainer.files import atomic_write_bytes, fsync_dir
from trainer.metrics import finite
from trainer.model import RecModel
from trainer.weight_deltas import (
    build_chain,
    changed_tensors,
    config_json,
    config_mismatch,
    cpu_state,
    load_exact,
    serialize,
    state_bytes,
    state_chain,
    verify_chain,
)
from trainer.weight_manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_WEIGHTS_BYTES,
    SIGNATURE_FILE,
    VERSION_DIR,
    WEIGHTS_FILE,
    Manifest,
    Trust,
    WeightsError,
    WeightsReason,
    check_encoder,
    confined_manifest,
    read_manifest,
    secret_bytes,
    sign,
    update_of,
    version_dir,
)

__all__ = [
    "FORMAT_VERSION", "MANIFEST_FILE", "SIGNATURE_FILE", "WEIGHTS_FILE", "Manifest", "WeightStore", "WeightsError",
    "WeightsReason", "atomic_write_bytes", "changed_tensors", "config_mismatch", "cpu_state", "fsync_dir",
    "locate_version", "state_bytes", "version_dir",
]

log = logging.getLogger(__name__)
R = WeightsReason


class WeightStore:
    """Versioned model snapshots under one root (local directory or fsspec URL).

    Every read stays inside the root (an announced uri must name this store's manifest of its
    version; local files resolving outside it are refused, FOREIGN) and is capped (manifest 1 MiB,
    weights ``max_weights_bytes``; SIZE).  With ``signing_key`` (a shared secret) each publish
    writes ``manifest.json.sig`` (HMAC-SHA256 of the manifest bytes) before the manifest, and every
    read verifies it before parsing the manifest (SIGNATURE when missing or wrong).  A version loaded
    from an announcement must name the offline default encoder or a local folder inside the store,
    the cache directory or ``encoder_roots`` (FOREIGN)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        signing_key: object = None,
        max_weights_bytes: int = MAX_WEIGHTS_BYTES,
        encoder_roots: tuple[str | os.PathLike[str], ...] = (),
    ) -> None:
        root_str = os.fspath(root)
        if not root_str:
            raise WeightsError("weight store root must not be empty")
        try:
            fs, path = fsspec.core.url_to_fs(root_str)
        except (ValueError, ImportError) as exc:
            raise WeightsError(f"weight store root {root_str!r}: {exc}") from exc
        self.fs: fsspec.AbstractFileSystem = fs
        self._local = isinstance(fs, LocalFileSystem)
        if self._local:
            path = Path(path).expanduser().resolve().as_posix()
        self.path: str = path.rstrip("/") or "/"
        self.url: str = fs.unstrip_protocol(self.path)
        self._key = secret_bytes(signing_key)
        self.trust = Trust(
            root=os.path.realpath(self.path) if self._local else None,
            signing_key=self._key,
            max_weights_bytes=int(max_weights_bytes),
        )
        roots = [default_cache_dir(), *encoder_roots] + ([self.path] if self._local else [])
        self.encoder_roots = [os.path.realpath(os.path.expanduser(os.fspath(r))) for r in roots]

    def __repr__(self) -> str:
        return f"WeightStore({self.url!r})"

    # --- paths ------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def _vdir(self, version: int) -> str:
        return self._join(version_dir(version))

    def manifest_uri(self, version: int) -> str:
        return self.fs.unstrip_protocol(self._join(version_dir(version), MANIFEST_FILE))

    # --- listing ----------------------------------------------------------------
    def _numbered_dirs(self) -> list[int]:
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return [
            int(m.group(1)) for e in entries if (m := VERSION_DIR.match(posixpath.basename(str(e).rstrip("/"))))
        ]

    def versions(self) -> list[int]:
        """Every published version (those with a manifest), oldest first."""
        return sorted(v for v in self._numbered_dirs() if self.fs.exists(self._join(version_dir(v), MANIFEST_FILE)))

    def next_version(self) -> int:
        """One past the newest version whose directory exists (published or half-written)."""
        return max(self._numbered_dirs(), default=0) + 1

    def manifest(self, version: int) -> Manifest:
        return read_manifest(self.fs, self._join(version_dir(version), MANIFEST_FILE), f"version {version}", self.trust)

    def update(self, version: int) -> ModelUpdate:
        """The ModelUpdate record that announces an already published version."""
        return update_of(self.manifest(version), self.manifest_uri(version))

    def latest_valid(self) -> ModelUpdate | None:
        """The newest version whose weights (and base chain) verify, or None."""
        for version in reversed(self.versions()):
            try:
                man = self.verify(version)
            except WeightsError as exc:
                log.warning("skipping version %d: %s", version, exc)
                continue
            return update_of(man, self.manifest_uri(version))
        return None

    def verify(self, version: int) -> Manifest:
        """Check that a version and its base chain are complete and match their sha256."""
        man = self.manifest(version)
        verify_chain(self.fs, self._vdir(version), man, f"version {version}", trust=self.trust)
        return man

    # --- publish ----------------------------------------------------------------
    def publish(
        self,
        model: RecModel,
        *,
        version: int,
        kind: Literal["full", "delta"] = "full",
        base_version: int | None = None,
        metrics: Mapping[str, float] | None = None,
        trained_examples: int = 0,
        source_offsets: Mapping[str, int] | None = None,
        model_name: str = "streamrec",
        created_ts: int | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> ModelUpdate:
        """Write one version atomically and return the ModelUpdate that announces it.

        ``tensors`` are a delta's tensors (e.g. :func:`changed_tensors` against its
        base); default: the model's trainable parameters.  A full version is
        always the whole ``state_dict()``.  A taken version number raises
        :class:`WeightsError` with reason :attr:`WeightsReason.EXISTS`.
        """
        self._check_publish(model, version, kind, base_version)
        state = self._publish_state(model, version, kind, tensors)
        data = serialize(state, {"model_name": model_name, "version": str(version), "kind": kind})
        digest = hashlib.sha256(data).hexdigest()
        man = Manifest(
            version=version,
            kind=kind,
            base_version=base_version,
            sha256=digest,
            size=len(data),
            model_name=model_name,
            model_config=config_json(model),
            metrics={str(k): float(v) for k, v in (metrics or {}).items() if finite(v)},
            trained_examples=int(trained_examples),
            source_offsets={str(k): int(v) for k, v in (source_offsets or {}).items()},
            created_ts=int(time.time() * 1000) if created_ts is None else int(created_ts),
            tensors=len(state),
        )
        self.fs.makedirs(self._vdir(version), exist_ok=True)
        self._atomic_write(self._join(version_dir(version), WEIGHTS_FILE), data)
        manifest = man.to_json()
        if self._key is not None:  # before the manifest: a version exists signed or not at all
            self._atomic_write(self._join(version_dir(version), SIGNATURE_FILE), sign(self._key, manifest))
        self._atomic_write(self._join(version_dir(version), MANIFEST_FILE), manifest)
        update = update_of(man, self.manifest_uri(version))
        log.info(
            "published %s version %d (%s%s, %.1f MB, sha256 %s…) to %s",
            model_name, version, kind,
            f" on {base_version}" if base_version else "",
            len(data) / 1e6, digest[:12], update.uri,
        )
        return update

    def _check_publish(self, model: RecModel, version: int, kind: str, base_version: int | None) -> None:
        if version < 1:
            raise WeightsError(f"version must be >= 1, got {version}")
        if kind not in ("full", "delta"):
            raise WeightsError(f"kind must be 'full' or 'delta', got {kind!r}")
        if kind == "delta":
            if base_version is None or not 1 <= base_version < version:
                raise WeightsError(f"a delta needs an older base_version, got {base_version!r}")
            if base_version not in self.versions():
                raise WeightsError(f"base version {base_version} of delta {version} is not published", R.MISSING)
            if self.manifest(base_version).model_config != config_json(model):
                raise WeightsError(
                    f"delta {version}: the model config differs from base version {base_version}'s", R.CONFIG
                )
        elif base_version is not None:
            raise WeightsError("a full version has no base_version")
        if self.fs.exists(self._join(version_dir(version), MANIFEST_FILE)):
            raise WeightsError(f"version {version} already exists in {self.url}", R.EXISTS)

    @staticmethod
    def _publish_state(
        model: RecModel, version: int, kind: str, tensors: Mapping[str, torch.Tensor] | None
    ) -> Mapping[str, torch.Tensor]:
        if kind == "full":
            state: Mapping[str, torch.Tensor] = model.state_dict()
        elif tensors is not None:
            unknown = sorted(set(tensors) - set(model.state_dict()))
            if unknown:
                raise WeightsError(f"delta {version}: tensors the model lacks: {unknown[:5]}", R.MISMATCH)
            state = tensors
        else:
            state = model.trainable_state_dict()
        if not state:
            raise WeightsError(f"version {version}: the model has no {'trainable ' if kind == 'delta' else ''}tensors")
        return state

    def _atomic_write(self, path: str, data: bytes) -> None:
        if self._local:
            atomic_write_bytes(Path(path), data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    # --- load -------------------------------------------------------------------
    def load(
        self,
        update_or_version: ModelUpdate | int,
        *,
        device: str | torch.device = "cpu",
    ) -> RecModel:
        """Fetch, verify and build a version (applying deltas on their base), in eval mode.

        A :class:`ModelUpdate`'s ``uri`` must name this store's manifest of its version
        (else FOREIGN, nothing read), its ``sha256`` must match the manifest's, and its
        encoder must be trusted (see the class doc).  Raises :class:`WeightsError` with the reason.
        """
        if isinstance(update_or_version, ModelUpdate):
            upd = update_or_version
            mpath = confined_manifest(self.fs, self.path, upd.uri, upd.version)
            fs, vdir = self.fs, posixpath.dirname(mpath)
            where = f"version {upd.version}"
            man = read_manifest(fs, mpath, where, self.trust)
            if man.version != upd.version:
                raise WeightsError(f"{where}: manifest at {upd.uri} is version {man.version}", R.MISMATCH)
            if man.sha256 != upd.sha256:
                raise WeightsError(
                    f"{where}: announced sha256 {upd.sha256[:12]}… but the manifest says {man.sha256[:12]}…",
                    R.CHECKSUM,
                )
            check_encoder(man.model_config.get("encoder"), self.encoder_roots, where)
        else:
            fs, vdir = self.fs, self._vdir(int(update_or_version))
            where = f"version {update_or_version}"
            man = self.manifest(int(update_or_version))
        model = build_chain(fs, vdir, man, where, trust=self.trust)
        model.to(device)
        model.eval()
        return model

    def load_into(self, model: torch.nn.Module, version: int) -> Manifest:
        """Load a version's tensors (its delta chain resolved, every file verified) into a model
        built elsewhere, e.g. from this deployment's own config; return the version's manifest.

        The tensors must fit the model exactly (names and shapes), else :class:`WeightsError`."""
        man = self.manifest(version)
        load_exact(model, self.state(version), f"version {version} of {self.url}")
        return man

    def state(self, version: int) -> dict[str, torch.Tensor]:
        """A version's whole state dict on the CPU (its delta chain resolved, every file verified)."""
        return state_chain(
            self.fs, self._vdir(version), self.manifest(version), f"version {version} of {self.url}", trust=self.trust
        )

    # --- housekeeping -----------------------------------------------------------
    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions (and the bases they need); return the deleted."""
        if keep < 1:
            raise WeightsError(f"prune keep must be >= 1, got {keep}")
        versions = self.versions()
        kept = set(versions[-keep:])
        stack = list(kept)
        while stack:  # keep the base chain of every kept delta
            try:
                base = self.manifest(stack.pop()).base_version
            except WeightsError:
                continue
            if base is not None and base not in kept:
                kept.add(base)
                stack.append(base)
        deleted = []
        for v in versions:
            if v in kept:
                continue
            self.remove(v)
            deleted.append(v)
        if deleted:
            log.info("pruned %d old version(s) from %s: %s", len(deleted), self.url, deleted)
        self._remove_abandoned(versions)
        return deleted

    def remove(self, version: int) -> None:
        """Delete one version: its manifest first, so it stops existing before its weights go."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._join(version_dir(version), MANIFEST_FILE))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._vdir(version), recursive=True)

    def _remove_abandoned(self, versions: list[int]) -> None:
        """Remove directories of publishes that crashed before their manifest (older than the newest)."""
        if not versions:
            return
        published = set(versions)
        for v in self._numbered_dirs():
            if v < versions[-1] and v not in published:
                log.info("removing %s: a publish that never completed", version_dir(v))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self._vdir(v), recursive=True)


def locate_version(ref: str) -> tuple[WeightStore, int]:
    """The store and version a reference names: a version directory (``.../v000024``) or its
    ``manifest.json``, as a local path or an fsspec URL.  Raises :class:`WeightsError` when
    it names no published version."""
    ref = ref.strip()
    try:
        fs, path = fsspec.core.url_to_fs(ref)
    except (ValueError, ImportError) as exc:
        raise WeightsError(f"{ref!r}: {exc}") from exc
    path = path.rstrip("/")
    if posixpath.basename(path) == MANIFEST_FILE:
        path = posixpath.dirname(path)
    m = VERSION_DIR.match(posixpath.basename(path))
    if not m:
        raise WeightsError(
            f"{ref!r} is not a version directory (<store root>/v000001) or its {MANIFEST_FILE}"
        )
    store = WeightStore(fs.unstrip_protocol(posixpath.dirname(path) or "/"))
    version = int(m.group(1))
    if version not in store.versions():
        raise WeightsError(
            f"{ref!r}: no published version {version} in {store.url} (no {MANIFEST_FILE})", R.MISSING
        )
    return store, version
