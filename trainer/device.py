"""The one device resolver of the trainer, the learner and serving: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch

from contract.errors import StreamrecError


class DeviceError(StreamrecError):
    """A device setting that cannot work on this machine (the caller names the setting)."""


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; :class:`DeviceError` saying why when it cannot be used here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"{name!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise DeviceError(f"{name!r}: only cpu and cuda devices are supported")
    return dev
