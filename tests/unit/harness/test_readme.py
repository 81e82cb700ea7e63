"""The README documents the real settings and the two commands."""

from __future__ import annotations

from contract.settings import PROJECT_ROOT
from harness.settings_doc import render


def test_settings_table_is_current() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert render(readme) == readme, "stale settings table: run python -m harness.settings_doc --write README.md"


def test_readme_shows_the_two_commands() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_readme_holds_no_path_of_this_machine() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert str(PROJECT_ROOT) not in readme
