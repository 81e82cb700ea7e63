"""What can go wrong with the local broker: fetching its jars, starting it, stopping it."""

from __future__ import annotations

from contract.errors import StreamrecError


class BrokerError(StreamrecError):
    """The local broker could not be fetched, started or stopped."""


class ToolNotFoundError(BrokerError):
    """``java`` or ``mvn`` is not installed (or not on PATH)."""


class PortInUseError(BrokerError):
    """The requested port already has a listener on it."""


class BrokerStartError(BrokerError):
    """The broker process died or did not become ready in time; the message ends with its log."""
