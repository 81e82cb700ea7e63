"""The layering of DESIGN.md §1.1, checked on the source: no package imports one above it.

contract (bottom) <- infra <- streams | trainer <- serving <- harness, benchmarks (top floor).
Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contract", "infra", "streams", "trainer", "serving", "harness", "benchmarks")

ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "infra": {"contract"},
    "streams": {"contract", "infra"},
    "trainer": {"contract", "infra"},
    "serving": {"contract", "infra", "trainer"},
    "harness": {"contract", "infra", "streams", "trainer", "serving"},
    "benchmarks": {"contract", "infra", "streams", "trainer", "serving", "harness"},
}
SERVING_MAY_USE = {
    "model", "model_config", "weights", "catalog", "popularity", "prefix_cache", "device", "metrics",
    "posterior", "dedupe", "learner_config",
}
"""What serving takes from the trainer package: the model and its weights, the per-user posterior it refreshes
(serving/refresh.py: the posterior's Bayes rule, its settings, the redelivery window), not the learner or the service."""


def _imports(path: Path) -> set[str]:
    """Dotted project modules imported by ``path`` (absolute imports; relative ones stay in the package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_one_above_it(package: str) -> None:
    bad = []
    for path in _files(package):
        for mod in sorted(_imports(path)):
            top = mod.split(".")[0]
            if top == package:
                continue
            if top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
            elif package == "serving" and top == "trainer":
                sub = mod.split(".")[1] if "." in mod else ""
                if sub and sub not in SERVING_MAY_USE and not sub[0].isupper():
                    bad.append(f"{path.relative_to(ROOT)} imports {mod} (serving uses the model, not the trainer)")
    assert not bad, "\n".join(bad)


def test_only_the_top_floor_imports_every_service() -> None:
    services = {"streams", "trainer", "serving"}
    knows_all = [
        p for p in PACKAGES if services <= {m.split(".")[0] for f in _files(p) for m in _imports(f)} | {p}
    ]
    assert set(knows_all) <= {"harness", "benchmarks"}, knows_all
