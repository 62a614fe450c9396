"""The fast lane's lists (tests/conftest.py) name tests and fixtures that exist: a renamed test would otherwise slip
into the fast lane unnoticed, or a list keep a name nobody can read back."""

import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def defined_functions(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}


def test_every_test_and_fixture_the_lists_name_exists():
    for file in conftest.SLOW_FILES:
        assert (TESTS / file).exists(), file
    for file, names in conftest.SLOW_TESTS.items():
        assert names <= defined_functions(TESTS / file), (file, names - defined_functions(TESTS / file))
    fixtures = set().union(*(defined_functions(path) for path in TESTS.glob("*.py")))
    assert conftest.SLOW_FIXTURES <= fixtures, conftest.SLOW_FIXTURES - fixtures
