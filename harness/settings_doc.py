"""The README's settings table, generated from the settings classes themselves.

``python -m harness.settings_doc`` prints the table; ``--write README.md``
replaces the part between the ``<!-- settings:start -->`` and
``<!-- settings:end -->`` markers.  A unit test fails when the README is stale,
so the documented defaults are always the real ones.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings

SETTINGS_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("contract.settings", "KafkaSettings", "Kafka connection and topics (every service)"),
    ("streams.join_settings", "JoinSettings", "Streams worker: the impression–click join"),
    ("trainer.service_settings", "TrainerSettings", "Trainer service"),
    ("serving.settings", "ServingSettings", "Scoring agent"),
)
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _default(field) -> str:  # noqa: ANN001 - pydantic FieldInfo
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        if isinstance(value, str | Path):  # a location derived from the machine: see the description
            return "(computed)"
    else:
        value = field.default
    if value is None:
        return "—"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Path):
        return "(computed)"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else '`""`'


def table() -> str:
    lines: list[str] = []
    for module, name, title in SETTINGS_CLASSES:
        cls: type[BaseSettings] = getattr(importlib.import_module(module), name)
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        lines += [f"**{title}** (`{module}.{name}`)", "", "| variable | default | meaning |", "|---|---|---|"]
        for fname, field in cls.model_fields.items():
            doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{prefix}{fname.upper()}` | {_default(field)} | {doc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(readme: str) -> str:
    """``readme`` with the generated table between the markers."""
    head, sep, rest = readme.partition(START)
    if not sep or END not in rest:
        raise SystemExit(f"README has no {START} ... {END} section")
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.settings_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="update this README in place")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(render(args.write.read_text()))
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
