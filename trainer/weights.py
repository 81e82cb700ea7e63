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
the reason; the serving agent keeps its old model in that case.

A delta holds only the tensors that differ from its base version (the
trainer passes the base's state: :func:`changed_tensors`; without it, the
trainable parameters: LoRA adapters, unfrozen layers, heads); loading it loads
its base version first, recursively, then applies the delta on top.  Comparing
with the base, not trusting ``requires_grad``, also carries buffers that change
while training.

:func:`locate_version` names one version of *another* store by its directory
or manifest (``STREAMREC_TRAINER_INIT_FROM``), and :func:`config_mismatch` says
where its model config differs from the one configured.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from contract.errors import RecordError, StreamrecError
from contract.records import ModelUpdate

if TYPE_CHECKING:
    from trainer.model import RecModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the manifest layout written here; readers refuse newer ones."""

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_MAX_DELTA_CHAIN = 64


class WeightsError(StreamrecError):
    """A version that cannot be published or loaded; the message says which and why."""


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


class WeightStore:
    """Versioned model snapshots under one root (local directory or fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
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

    def __repr__(self) -> str:
        return f"WeightStore({self.url!r})"

    # --- paths ------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def manifest_uri(self, version: int) -> str:
        return self.fs.unstrip_protocol(self._join(version_dir(version), MANIFEST_FILE))

    # --- listing ----------------------------------------------------------------
    def versions(self) -> list[int]:
        """Every published version (those with a manifest), oldest first."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            m = _VERSION_DIR.match(posixpath.basename(str(entry).rstrip("/")))
            if m and self.fs.exists(self._join(m.group(0), MANIFEST_FILE)):
                found.append(int(m.group(1)))
        return sorted(found)

    def next_version(self) -> int:
        """One past the newest version whose directory exists (published or half-written)."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return 1
        nums = [
            int(m.group(1))
            for e in entries
            if (m := _VERSION_DIR.match(posixpath.basename(str(e).rstrip("/"))))
        ]
        return max(nums, default=0) + 1

    def manifest(self, version: int) -> Manifest:
        path = self._join(version_dir(version), MANIFEST_FILE)
        return self._read_manifest(self.fs, path, f"version {version}")

    @staticmethod
    def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, where: str) -> Manifest:
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise WeightsError(f"{where}: manifest {fs.unstrip_protocol(path)} not found") from None
        except OSError as exc:
            raise WeightsError(f"{where}: cannot read manifest: {exc}") from exc
        return Manifest.from_json(data, where)

    def update(self, version: int) -> ModelUpdate:
        """The ModelUpdate record that announces an already published version."""
        return _update_of(self.manifest(version), self.manifest_uri(version))

    def latest_valid(self) -> ModelUpdate | None:
        """The newest version whose weights (and base chain) verify, or None."""
        for version in reversed(self.versions()):
            try:
                man = self._verify_chain(version)
            except WeightsError as exc:
                log.warning("skipping version %d: %s", version, exc)
                continue
            return _update_of(man, self.manifest_uri(version))
        return None

    def verify(self, version: int) -> Manifest:
        """Check that a version and its base chain are complete and match their sha256."""
        return self._verify_chain(version)

    def _verify_chain(self, version: int) -> Manifest:
        man = self.manifest(version)
        self._read_weights(self.fs, self._join(version_dir(version)), man, f"version {version}")
        if man.kind == "delta":
            assert man.base_version is not None
            self._verify_chain(man.base_version)
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
        always the whole ``state_dict()``.
        """
        if version < 1:
            raise WeightsError(f"version must be >= 1, got {version}")
        if kind not in ("full", "delta"):
            raise WeightsError(f"kind must be 'full' or 'delta', got {kind!r}")
        if kind == "delta":
            if base_version is None or not 1 <= base_version < version:
                raise WeightsError(f"a delta needs an older base_version, got {base_version!r}")
            if base_version not in self.versions():
                raise WeightsError(f"base version {base_version} of delta {version} is not published")
            base_cfg = self.manifest(base_version).model_config
            if base_cfg != _config_json(model):
                raise WeightsError(
                    f"delta {version}: the model config differs from base version {base_version}'s"
                )
        elif base_version is not None:
            raise WeightsError("a full version has no base_version")
        vdir = self._join(version_dir(version))
        if self.fs.exists(self._join(version_dir(version), MANIFEST_FILE)):
            raise WeightsError(f"version {version} already exists in {self.url}")

        if kind == "full":
            state: Mapping[str, torch.Tensor] = model.state_dict()
        elif tensors is not None:
            own = model.state_dict()
            unknown = sorted(set(tensors) - set(own))
            if unknown:
                raise WeightsError(f"delta {version}: tensors the model lacks: {unknown[:5]}")
            state = tensors
        else:
            state = model.trainable_state_dict()
        if not state:
            raise WeightsError(f"version {version}: the model has no {'trainable ' if kind == 'delta' else ''}tensors")
        data = _serialize(state, {"model_name": model_name, "version": str(version), "kind": kind})
        digest = hashlib.sha256(data).hexdigest()
        created = int(time.time() * 1000) if created_ts is None else int(created_ts)
        clean_metrics = {
            str(k): float(v) for k, v in (metrics or {}).items() if _finite(v)
        }
        man = Manifest(
            version=version,
            kind=kind,
            base_version=base_version,
            sha256=digest,
            size=len(data),
            model_name=model_name,
            model_config=_config_json(model),
            metrics=clean_metrics,
            trained_examples=int(trained_examples),
            source_offsets={str(k): int(v) for k, v in (source_offsets or {}).items()},
            created_ts=created,
            tensors=len(state),
        )
        self.fs.makedirs(vdir, exist_ok=True)
        self._atomic_write(self._join(version_dir(version), WEIGHTS_FILE), data)
        self._atomic_write(self._join(version_dir(version), MANIFEST_FILE), man.to_json())
        update = _update_of(man, self.manifest_uri(version))
        log.info(
            "published %s version %d (%s%s, %.1f MB, sha256 %s…) to %s",
            model_name, version, kind,
            f" on {base_version}" if base_version else "",
            len(data) / 1e6, digest[:12], update.uri,
        )
        return update

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

        A :class:`ModelUpdate` is located by its ``uri``; its ``sha256`` must also
        match the manifest's.  Raises :class:`WeightsError` with the reason.
        """
        if isinstance(update_or_version, ModelUpdate):
            upd = update_or_version
            try:
                fs, mpath = fsspec.core.url_to_fs(upd.uri)
            except (ValueError, ImportError) as exc:
                raise WeightsError(f"version {upd.version}: bad uri {upd.uri!r}: {exc}") from exc
            vdir = posixpath.dirname(mpath)
            where = f"version {upd.version}"
            man = self._read_manifest(fs, mpath, where)
            if man.version != upd.version:
                raise WeightsError(f"{where}: manifest at {upd.uri} is version {man.version}")
            if man.sha256 != upd.sha256:
                raise WeightsError(
                    f"{where}: announced sha256 {upd.sha256[:12]}… but the manifest says {man.sha256[:12]}…"
                )
        else:
            fs, vdir = self.fs, self._join(version_dir(int(update_or_version)))
            where = f"version {update_or_version}"
            man = self.manifest(int(update_or_version))
        model = self._build(fs, vdir, man, where, depth=0)
        model.to(device)
        model.eval()
        return model

    def load_into(self, model: torch.nn.Module, version: int) -> Manifest:
        """Load a version's tensors (its delta chain resolved, every file verified) into a model
        built elsewhere, e.g. from this deployment's own config; return the version's manifest.

        The tensors must fit the model exactly (names and shapes), else :class:`WeightsError`."""
        man = self.manifest(version)
        _load_exact(model, self.state(version), f"version {version} of {self.url}")
        return man

    def state(self, version: int) -> dict[str, torch.Tensor]:
        """A version's whole state dict on the CPU (its delta chain resolved, every file verified)."""
        where = f"version {version} of {self.url}"
        man = self.manifest(version)
        return self._state_chain(self.fs, self._join(version_dir(version)), man, where, depth=0)

    def _state_chain(
        self, fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, depth: int
    ) -> dict[str, torch.Tensor]:
        if depth > _MAX_DELTA_CHAIN:
            raise WeightsError(f"{where}: delta chain longer than {_MAX_DELTA_CHAIN}")
        state = self._read_weights(fs, vdir, man, where)
        if man.kind == "full":
            return dict(state)
        base_dir, base_man, base_where = self._base_of(fs, vdir, man, where)
        merged = self._state_chain(fs, base_dir, base_man, base_where, depth + 1)
        unexpected = sorted(set(state) - set(merged))
        if unexpected:
            raise WeightsError(f"{where}: delta has tensors its base lacks: {unexpected[:5]}")
        merged.update(state)
        return merged

    def _base_of(
        self, fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str
    ) -> tuple[str, Manifest, str]:
        """A delta's base version: (its directory, its manifest, how errors name it); same config."""
        assert man.base_version is not None
        base_dir = posixpath.join(posixpath.dirname(vdir), version_dir(man.base_version))
        base_where = f"base version {man.base_version} of {where}"
        base_man = self._read_manifest(fs, posixpath.join(base_dir, MANIFEST_FILE), base_where)
        if base_man.model_config != man.model_config:
            raise WeightsError(f"{where}: model config differs from its base version {man.base_version}")
        return base_dir, base_man, base_where

    def _build(
        self, fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, depth: int
    ) -> RecModel:
        from trainer.model import ModelConfig, build_model

        if depth > _MAX_DELTA_CHAIN:
            raise WeightsError(f"{where}: delta chain longer than {_MAX_DELTA_CHAIN}")
        state = self._read_weights(fs, vdir, man, where)
        if man.kind == "full":
            try:
                config = ModelConfig.model_validate(man.model_config)
            except Exception as exc:  # pydantic ValidationError or a config rule
                raise WeightsError(f"{where}: model config does not validate: {exc}") from exc
            model = build_model(config)
            _load_exact(model, state, where)
            return model
        base_dir, base_man, base_where = self._base_of(fs, vdir, man, where)
        model = self._build(fs, base_dir, base_man, base_where, depth + 1)
        _apply_delta(model, state, where)
        return model

    @staticmethod
    def _read_weights(
        fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str
    ) -> dict[str, torch.Tensor]:
        path = posixpath.join(vdir, WEIGHTS_FILE)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise WeightsError(f"{where}: weights file {fs.unstrip_protocol(path)} is missing") from None
        except OSError as exc:
            raise WeightsError(f"{where}: cannot read weights: {exc}") from exc
        if len(data) != man.size:
            raise WeightsError(
                f"{where}: weights file is {len(data)} bytes but the manifest says {man.size}"
                f" ({'truncated' if len(data) < man.size else 'extra bytes'})"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != man.sha256:
            raise WeightsError(
                f"{where}: sha256 mismatch: file has {digest[:12]}…, manifest says {man.sha256[:12]}…"
            )
        try:
            return st_load(data)
        except (SafetensorError, ValueError) as exc:
            raise WeightsError(f"{where}: weights file is not valid safetensors: {exc}") from exc

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
            vdir = self._join(version_dir(v))
            # Manifest first: the version stops existing before its weights go.
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._join(version_dir(v), MANIFEST_FILE))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(vdir, recursive=True)
            deleted.append(v)
        if deleted:
            log.info("pruned %d old version(s) from %s: %s", len(deleted), self.url, deleted)
        self._remove_abandoned(versions)
        return deleted

    def _remove_abandoned(self, versions: list[int]) -> None:
        """Remove directories of publishes that crashed before their manifest (older than the newest)."""
        if not versions:
            return
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return
        published = set(versions)
        for entry in entries:
            m = _VERSION_DIR.match(posixpath.basename(str(entry).rstrip("/")))
            if m and int(m.group(1)) < versions[-1] and int(m.group(1)) not in published:
                log.info("removing %s: a publish that never completed", m.group(0))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self._join(m.group(0)), recursive=True)


# --- deltas and other stores' versions -------------------------------------------


def changed_tensors(
    state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that differ from ``base`` (or that ``base`` lacks): a delta on it."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        old = base.get(name)
        t = tensor.detach()
        if old is None or old.shape != t.shape or old.dtype != t.dtype or not torch.equal(old, t.to(old.device)):
            out[name] = t
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor data of a state dict (what a safetensors file of it is, give or take)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict (the base a later delta is compared with)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


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
    m = _VERSION_DIR.match(posixpath.basename(path))
    if not m:
        raise WeightsError(
            f"{ref!r} is not a version directory (<store root>/v000001) or its {MANIFEST_FILE}"
        )
    store = WeightStore(fs.unstrip_protocol(posixpath.dirname(path) or "/"))
    version = int(m.group(1))
    if version not in store.versions():
        raise WeightsError(f"{ref!r}: no published version {version} in {store.url} (no {MANIFEST_FILE})")
    return store, version


def config_mismatch(
    found: Mapping[str, Any], expected: Mapping[str, Any], *, ignore: tuple[str, ...] = ("seed",)
) -> list[str]:
    """Fields where two model configs differ (each normalised through ModelConfig, so fields
    one side lacks compare as their defaults), as ``"field: found X, expected Y"``."""
    from trainer.model import ModelConfig

    def norm(cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
        try:
            return ModelConfig.model_validate(dict(cfg)).model_dump(mode="json")
        except Exception as exc:  # pydantic ValidationError or a config rule
            raise WeightsError(f"the {what} model config does not validate: {exc}") from exc

    a, b = norm(found, "published"), norm(expected, "configured")
    return [
        f"{k}: published {a.get(k)!r}, configured {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
    ]


# --- helpers --------------------------------------------------------------------


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def _config_json(model: RecModel) -> dict[str, Any]:
    return json.loads(json.dumps(model.config.model_dump(mode="json")))


def _serialize(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return st_save(tensors, metadata=metadata)


def _load_exact(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{where}: weights do not fit the model built from its config"
            f" (missing {missing[:5]}{'…' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''})"
        )
    _check_shapes(own, state, where)
    model.load_state_dict(dict(state), strict=True)


def _apply_delta(model: torch.nn.Module, delta: Mapping[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    unexpected = sorted(set(delta) - set(own))
    if unexpected:
        raise WeightsError(f"{where}: delta has tensors the model lacks: {unexpected[:5]}")
    _check_shapes(own, delta, where)
    with torch.no_grad():
        for name, tensor in delta.items():
            own[name].copy_(tensor)


def _check_shapes(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise WeightsError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the model has {tuple(own[name].shape)}"
            )


def _update_of(man: Manifest, uri: str) -> ModelUpdate:
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; readers (serving) may be other users
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
