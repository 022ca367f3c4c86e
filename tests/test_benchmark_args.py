"""The benchmarks' command lines: every bad argument is named with its fix at once, exit 2, before any model loads
(a device call is minutes of a scarce budget; a traceback after the set-up would waste it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        (
            "pack.py",
            ["--device", "cpu", "--ks", "0", "20", "--skip", "5", "--steps", "3", "--products", "masked"],
            ("--ks 0 20: give packs of 1 to 8", "--skip 5: give 0 to 2", "--products masked: give auto and any of"),
        ),
        (
            "pack_sweep.py",
            ["--out", "/tmp/unused", "--pack", "1", "--hosts", "0", "--trials", "0", "--seq", "0"],
            ("--pack 1: give 2", "--hosts 0: give 1", "--trials 0: give 1", "--seq 0: give 1"),
        ),
    ],
)
def test_bad_benchmark_arguments_are_all_named_before_any_work(
    script: str, args: list[str], says: tuple[str, ...], tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--work", str(tmp_path / "work"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for fragment in says:
        assert fragment in done.stderr, f"{fragment!r} not in:\n{done.stderr}"
    assert not (tmp_path / "work").exists()  # nothing was built
