"""benchmarks/grid.py's table from parts: a part whose Ray experiment is gone joins from its report's parquet files,
in the same columns as the rows read from Ray."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _grid_module():
    spec = importlib.util.spec_from_file_location("grid_bench", ROOT / "benchmarks" / "grid.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_tables_columns_are_the_ones_both_row_builders_write() -> None:
    grid = _grid_module()
    table = sorted(ROOT.glob("benchmarks/grid_*.parquet"))[-1]
    columns = list(pd.read_parquet(table).columns)
    assert [c for c in columns if "/" not in c] == grid._COLUMNS


def test_a_report_dir_gives_one_row_a_trial_with_its_curve_from_step_0(tmp_path: Path) -> None:
    grid = _grid_module()
    trials = pd.DataFrame(
        [
            {"trial_id": "a_00000", "status": "completed", "variant": "pissa", "rank": 16, "alpha": 32.0,
             "targets": "all-linear", "lr": 4.31e-4, "step": 50, "base_eval_loss": 1.2, "eval_loss": 0.2,
             "adapter_bytes": 10, "device_s": 3.0, "mlflow_run_id": "x", "t/exact_match": 0.7,
             "t/exact_match_stderr": 0.03},
            {"trial_id": "a_00001", "status": "pruned", "variant": "lora", "rank": 4, "alpha": 8.0,
             "targets": "attention", "lr": 2e-5, "step": 25, "base_eval_loss": 1.2, "eval_loss": 0.9,
             "adapter_bytes": 5, "device_s": 1.0, "mlflow_run_id": "y", "t/exact_match": math.nan,
             "t/exact_match_stderr": math.nan},
        ]
    )  # fmt: skip
    history = pd.DataFrame(
        {
            "trial_id": ["a_00000", "a_00000", "a_00000", "a_00001"],
            "step": [25, 50, 50, 25],
            "eval_loss": [0.5, math.nan, 0.2, 0.9],  # a train-only report at step 50 has no eval loss
        }
    )
    trials.to_parquet(tmp_path / "trials.parquet")
    history.to_parquet(tmp_path / "history.parquet")

    rows = {r["trial_id"]: r for r in grid._rows_from_report(tmp_path)}

    done = rows["a_00000"]
    assert done["config_id"] == "pissa-r16-all-linear-lr0.000431"
    assert done["curve_step"] == [0, 25, 50] and done["curve_eval_loss"] == [1.2, 0.5, 0.2]
    assert done["t/exact_match"] == 0.7 and done["t/exact_match_stderr"] == 0.03
    assert "mlflow_run_id" not in done  # only the table's columns
    assert rows["a_00001"]["status"] == "unfinished"  # nothing is pruned in a grid: it was cut short


def test_table_names_every_missing_input_at_once(tmp_path: Path, monkeypatch) -> None:
    """A wrong --earlier table and a --reports dir lacking its parquet files: one message naming all three paths and
    the fix, before anything is read."""
    import pytest

    grid = _grid_module()
    monkeypatch.setenv("LORA_SEARCH_OUTPUT_DIR", str(tmp_path / "none"))
    (tmp_path / "part").mkdir()
    with pytest.raises(SystemExit) as stop:
        grid.table(tmp_path / "out", earlier=(tmp_path / "nosuch.parquet",), reports=(tmp_path / "part",))
    said = str(stop.value)
    assert "nosuch.parquet" in said and "part/trials.parquet" in said and "part/history.parquet" in said
    assert "Fix: --earlier takes grid tables" in said and not (tmp_path / "out").exists()
