"""How `make test` lays the suite over its two workers (tests/conftest.py): the files that read the session's shared
sweeps run on one worker, so those sweeps run once a CI run. Reads the test sources with `ast`; runs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import SHARED_SWEEP_FILES

TESTS = Path(__file__).resolve().parent
SHARED_SWEEPS = ("shared_sweep", "failed_sweep")
"""The session fixtures of tests/conftest.py that run a real sweep for several files."""


def readers(source: str) -> bool:
    """Whether a test file's functions (tests or fixtures) take one of `SHARED_SWEEPS` as a parameter."""
    return any(
        arg.arg in SHARED_SWEEPS
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for arg in node.args.args + node.args.kwonlyargs
    )


def test_the_shared_sweep_files_are_the_files_that_read_the_shared_sweeps() -> None:
    found = {p.name for p in TESTS.glob("test_*.py") if readers(p.read_text())}
    assert found == SHARED_SWEEP_FILES, (
        f"tests/conftest.py SHARED_SWEEP_FILES: add {sorted(found - SHARED_SWEEP_FILES)}, "
        f"drop {sorted(SHARED_SWEEP_FILES - found)}"
    )


def test_the_check_sees_a_reader_and_a_non_reader() -> None:
    assert readers("def test_x(shared_sweep, tmp_path):\n    pass\n")
    assert readers("import pytest\n@pytest.fixture\ndef copy(failed_sweep):\n    return failed_sweep\n")
    assert not readers("def test_x(tmp_path):\n    shared_sweep = 1\n")
