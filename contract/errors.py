"""One exception root for the whole project; each package raises a subclass."""

from __future__ import annotations


class StreamrecError(Exception):
    """Root of every error streamrec raises on purpose."""


class ConfigError(StreamrecError, ValueError):
    """A setting that cannot work; the message names the setting and says why."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"setting {setting}: {reason}")


class RecordError(StreamrecError):
    """A record that does not satisfy the topic contract of DESIGN.md.

    Deliberately not a ``ValueError``: pydantic would wrap it inside another
    validation error instead of letting it through.

    ``field`` names the offending field (``"<json>"`` when the payload is not
    JSON at all, ``"<record>"`` for a rule that spans several fields).
    """

    def __init__(self, record_type: str, field: str, reason: str) -> None:
        self.record_type = record_type
        self.field = field
        self.reason = reason
        super().__init__(f"{record_type}.{field}: {reason}")
