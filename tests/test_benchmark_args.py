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
            ["--device", "cpu", "--ks", "0", "20", "--skip", "5", "--steps", "3", "--products", "masked"]
            + ["--head-loss", "fused,bogus"],
            (
                "--ks 0 20: give packs of 1 to 8",
                "--skip 5: give 0 to 2",
                "--products masked: give auto and any of",
                "--head-loss bogus,fused: give fused and/or checkpointed",
            ),
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


def test_a_packed_sweeps_summary_gives_both_sweeps_rates_with_every_slot_full() -> None:
    """`pack_sweep.compare`: 2 hosts of 4 whose steps took 0.2 s each give 8 / 0.2 = 40 trial-steps/s; 8 solo trials
    at once, each 100 steps in 10 s of training, give 80; a sweep without host journals gets no such figure."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import pack_sweep
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def trials(n: int) -> list[dict]:
        return [{"variant": "lora", "rank": 4, "lr": i, "status": "completed", "pareto": i == 0} for i in range(n)]

    result = {
        "hosts": 2,
        "pack": 4,
        "packed": {
            "wall_s": 50.0,
            "trials": trials(4),
            "hosts_time": [{"steps": 100, "step_s": 20.0}, {"steps": 50, "step_s": 10.0}],
        },
        "solo": {"wall_s": 40.0, "trials": trials(4), "trial_steps": 400, "trial_phases_mean_s": {"train_s": 10.0}},
    }
    assert pack_sweep.compare(result)
    assert result["ratio"] == 0.8 and result["same_endings"] == "4 of 4" and result["same_frontier"]
    assert result["full_trial_steps_per_s"] == {"packed": 40.0, "solo": 80.0, "packed_over_solo": 0.5}
    del result["packed"]["hosts_time"], result["full_trial_steps_per_s"]
    assert pack_sweep.compare(result) and "full_trial_steps_per_s" not in result
