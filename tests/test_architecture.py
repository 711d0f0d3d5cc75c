"""The house rules of docs/architecture.md, checked: dependencies point one way, modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imported_top_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", _modules("modeling"), ids=lambda p: str(p.relative_to(ROOT)))
def test_modeling_imports_neither_pipelines_nor_service(path):
    assert not _imported_top_packages(path) & {"pipelines", "service"}


@pytest.mark.parametrize("path", _modules("service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_does_not_import_pipelines(path):
    """The service loads bundles through modeling; training and batch jobs are not its business."""
    assert "pipelines" not in _imported_top_packages(path)


def test_importing_modeling_loads_no_pipelines_or_service_module():
    code = ("import sys, modeling, modeling.predictors, modeling.bundle, modeling.drift, modeling.features;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipelines', 'service')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", _modules("modeling") + _modules("pipelines") + _modules("service"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_over_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_LINES}): split it"
