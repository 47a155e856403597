"""Test modules are leaves: shared test code lives in helper modules (`tests/**/helpers.py`,
`tests/daemons.py`, ...) or conftest fixtures, and no module imports a `test_*.py` module
or a conftest. (lint-imports checks the rest: no cycles in tests/, and common/, services/
and bench/ never import tests.)"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    offenders = sorted(
        f"{path.relative_to(TESTS.parent)}: {name}"
        for path in TESTS.rglob("*.py")
        for name in imported_modules(path)
        if name.startswith("tests.")
        and (name.rsplit(".", 1)[-1].startswith("test_") or name.endswith(".conftest"))
    )
    assert offenders == []
