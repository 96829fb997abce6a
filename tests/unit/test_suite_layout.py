"""The test suite's own rules: shared code lives in tests/support/, so no module imports
a test module or a conftest file (nor runs one with `python -m`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
RUN_MODULE = re.compile(r"""["']-m["']\s*,\s*["'](tests\.[\w.]+)["']""")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_only_tests_support_is_imported_or_run() -> None:
    bad: list[str] = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == Path(__file__).resolve():
            continue  # its examples of violations below
        text = path.read_text()
        where = path.relative_to(TESTS.parent)
        for line, module in _imports(ast.parse(text, str(path))):
            if module.startswith("tests.") and not module.startswith("tests.support"):
                bad.append(f"{where}:{line}: imports {module}")
        for m in RUN_MODULE.finditer(text):
            if not m.group(1).startswith("tests.support."):
                bad.append(f"{where}: runs -m {m.group(1)}")
    assert bad == [], "shared test code belongs in tests/support/:\n" + "\n".join(bad)


def test_the_rule_sees_a_violation() -> None:
    """The check above can fail."""
    tree = ast.parse("from tests.unit.test_server import running\nimport tests.e2e.conftest\n")
    assert [m for _, m in _imports(tree)] == ["tests.unit.test_server", "tests.e2e.conftest"]
    assert RUN_MODULE.search('[sys.executable, "-m", "tests.e2e.fault_proxy"]')
