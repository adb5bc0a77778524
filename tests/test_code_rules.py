"""Rules of the code itself that no linter here states: short functions, the model's imports.

import-linter (`make lint`) keeps export/, gateway/, launcher/ and perf/ apart; the model's
modules are not a package (Triton loads them from their folder), so their imports are
checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("export", "gateway", "launcher", "perf", "helm/diagram", "model_repository")
MAX_FUNCTION_LINES = 80
MODEL_CODE = ROOT / "model_repository" / "stable_diffusion" / "1"
OTHER_WINGS = {"export", "gateway", "launcher", "perf", "tests"}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


@pytest.mark.parametrize("path", python_files(*CODE), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_over_80_lines(path: Path) -> None:
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines, line {f.lineno})"
        for f in functions(path)
        if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)}"


@pytest.mark.parametrize("path", sorted(MODEL_CODE.glob("*.py")), ids=lambda p: p.name)
def test_the_model_imports_nothing_from_the_other_wings(path: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & OTHER_WINGS, f"{path.name} imports {sorted(imported & OTHER_WINGS)}"
