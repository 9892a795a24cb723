"""The suite's marks sit on tests: a mark on a helper marks nothing, and the test it was
meant for runs in the wrong tier (``slow`` is what keeps the fast tier fast) or without
its timeout."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).parent


def marks_on_helpers(source: str) -> list[str]:
    """``name (line)`` of every function not named ``test_*`` that carries a
    ``pytest.mark`` decorator."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("test_"):
            for decorator in node.decorator_list:
                if ast.unparse(decorator).startswith("pytest.mark."):
                    found.append(f"{node.name} ({node.lineno})")
    return found


def test_the_check_sees_a_mark_on_a_helper() -> None:
    source = "import pytest\n@pytest.mark.slow\ndef helper():\n    pass\n"
    assert marks_on_helpers(source) == ["helper (3)"]
    assert marks_on_helpers(source.replace("def helper", "def test_it")) == []


def test_every_pytest_mark_decorates_a_test() -> None:
    misplaced = {
        path.name: found
        for path in sorted(HERE.glob("*.py"))
        if (found := marks_on_helpers(path.read_text()))
    }
    assert misplaced == {}
