"""The tensors of a version: what a delta holds, and how a version (its delta chain) is read back.

A delta holds only the tensors that differ from its base version
(:func:`changed_tensors` against the base's state; without it, the trainable
parameters).  Reading a version verifies every file of its chain against its
manifest's size and sha256 (:func:`read_weights`), then either merges the
states (:func:`state_chain`) or builds the model from the full version's
config and applies each delta on top (:func:`build_chain`).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.model import RecModel, build_model
from trainer.model_config import ModelConfig
from trainer.weight_manifest import (
    MANIFEST_FILE,
    MAX_DELTA_CHAIN,
    NO_TRUST_CHECKS,
    WEIGHTS_FILE,
    Manifest,
    Trust,
    WeightsError,
    WeightsReason,
    read_capped,
    read_manifest,
    version_dir,
)

R = WeightsReason


# --------------------------------------------------------------------------- building a delta
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


def config_json(model: RecModel) -> dict[str, Any]:
    """The model's config as the manifest stores it (JSON types)."""
    return json.loads(json.dumps(model.config.model_dump(mode="json")))


def serialize(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of a state dict."""
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return st_save(tensors, metadata=metadata)


def config_mismatch(
    found: Mapping[str, Any], expected: Mapping[str, Any], *, ignore: tuple[str, ...] = ("seed",)
) -> list[str]:
    """Fields where two model configs differ (each normalised through ModelConfig, so fields
    one side lacks compare as their defaults), as ``"field: found X, expected Y"``."""

    def norm(cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
        try:
            return ModelConfig.model_validate(dict(cfg)).model_dump(mode="json")
        except Exception as exc:  # pydantic ValidationError or a config rule
            raise WeightsError(f"the {what} model config does not validate: {exc}", R.CONFIG) from exc

    a, b = norm(found, "published"), norm(expected, "configured")
    return [
        f"{k}: published {a.get(k)!r}, configured {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
    ]


# --------------------------------------------------------------------------- reading a version
def read_weights(
    fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, trust: Trust = NO_TRUST_CHECKS
) -> dict[str, torch.Tensor]:
    """The tensors of one version directory, verified against its manifest's size and sha256; never
    more than ``trust.max_weights_bytes`` (nor one byte past the manifest's size) is read."""
    path = posixpath.join(vdir, WEIGHTS_FILE)
    if not 0 <= man.size <= trust.max_weights_bytes:
        raise WeightsError(
            f"{where}: the manifest's weights size {man.size} is outside 0..{trust.max_weights_bytes} bytes", R.SIZE
        )
    try:
        data = read_capped(fs, path, man.size, where, "weights file", trust)
    except WeightsError as exc:
        if exc.reason is not R.SIZE:
            raise
        raise WeightsError(f"{where}: weights file is longer than the manifest's {man.size} bytes (extra bytes)",
                           R.SIZE) from None
    if len(data) != man.size:
        short = len(data) < man.size
        raise WeightsError(
            f"{where}: weights file is {len(data)} bytes but the manifest says {man.size}"
            f" ({'truncated' if short else 'extra bytes'})",
            R.TRUNCATED if short else R.SIZE,
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != man.sha256:
        raise WeightsError(
            f"{where}: sha256 mismatch: file has {digest[:12]}…, manifest says {man.sha256[:12]}…", R.CHECKSUM
        )
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise WeightsError(f"{where}: weights file is not valid safetensors: {exc}", R.CORRUPT) from exc


def base_of(
    fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, trust: Trust = NO_TRUST_CHECKS
) -> tuple[str, Manifest, str]:
    """A delta's base version: (its directory, its manifest, how errors name it); same config."""
    assert man.base_version is not None
    base_dir = posixpath.join(posixpath.dirname(vdir), version_dir(man.base_version))
    base_where = f"base version {man.base_version} of {where}"
    base_man = read_manifest(fs, posixpath.join(base_dir, MANIFEST_FILE), base_where, trust)
    if base_man.model_config != man.model_config:
        raise WeightsError(f"{where}: model config differs from its base version {man.base_version}", R.CONFIG)
    return base_dir, base_man, base_where


def verify_chain(
    fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, depth: int = 0,
    trust: Trust = NO_TRUST_CHECKS,
) -> None:
    """Check that a version and its base chain are complete and match their sha256."""
    _check_depth(depth, where)
    read_weights(fs, vdir, man, where, trust)
    if man.kind == "delta":
        verify_chain(fs, *base_of(fs, vdir, man, where, trust), depth=depth + 1, trust=trust)


def state_chain(
    fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, depth: int = 0,
    trust: Trust = NO_TRUST_CHECKS,
) -> dict[str, torch.Tensor]:
    """A version's whole state dict: its full base with every delta of the chain applied."""
    _check_depth(depth, where)
    state = read_weights(fs, vdir, man, where, trust)
    if man.kind == "full":
        return dict(state)
    merged = state_chain(fs, *base_of(fs, vdir, man, where, trust), depth=depth + 1, trust=trust)
    unexpected = sorted(set(state) - set(merged))
    if unexpected:
        raise WeightsError(f"{where}: delta has tensors its base lacks: {unexpected[:5]}", R.MISMATCH)
    merged.update(state)
    return merged


def manifest_config(man: Manifest, where: str) -> ModelConfig:
    """The manifest's model config, validated (bounds included), else CONFIG."""
    try:
        return ModelConfig.model_validate(man.model_config)
    except Exception as exc:  # pydantic ValidationError or a config rule
        raise WeightsError(f"{where}: model config does not validate: {exc}", R.CONFIG) from exc


def build_chain(
    fs: fsspec.AbstractFileSystem, vdir: str, man: Manifest, where: str, depth: int = 0,
    trust: Trust = NO_TRUST_CHECKS,
) -> RecModel:
    """The model of a version: built from its full base's config, each delta applied on top."""
    _check_depth(depth, where)
    config = manifest_config(man, where)  # bounds first: nothing is read or built for a config out of them
    state = read_weights(fs, vdir, man, where, trust)
    if man.kind == "full":
        model = build_model(config)
        load_exact(model, state, where)
        return model
    model = build_chain(fs, *base_of(fs, vdir, man, where, trust), depth=depth + 1, trust=trust)
    apply_delta(model, state, where)
    return model


def _check_depth(depth: int, where: str) -> None:
    if depth > MAX_DELTA_CHAIN:
        raise WeightsError(f"{where}: delta chain longer than {MAX_DELTA_CHAIN}")


def load_exact(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load a whole state dict: the same tensor names and shapes as the model, else :class:`WeightsError`."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{where}: weights do not fit the model built from its config"
            f" (missing {missing[:5]}{'…' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''})",
            R.MISMATCH,
        )
    check_shapes(own, state, where)
    model.load_state_dict(dict(state), strict=True)


def apply_delta(model: torch.nn.Module, delta: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy a delta's tensors into the model (names and shapes it has)."""
    own = model.state_dict()
    unexpected = sorted(set(delta) - set(own))
    if unexpected:
        raise WeightsError(f"{where}: delta has tensors the model lacks: {unexpected[:5]}", R.MISMATCH)
    check_shapes(own, delta, where)
    with torch.no_grad():
        for name, tensor in delta.items():
            own[name].copy_(tensor)


def check_shapes(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise WeightsError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the model has {tuple(own[name].shape)}",
                R.MISMATCH,
            )
