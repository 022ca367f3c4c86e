"""The replay simulator (lora_search.replay) over a synthetic recorded grid: offline, CPU, no training, no Ray cluster
(Ray's schedulers are driven directly). Run: python -m pytest tests/test_replay.py
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from lora_search import grids, replay
from lora_search.records import StepReport


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "grid_synthetic.parquet"
    grids.synthetic_grid(120, seed=0).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def grid(table: Path) -> replay.Grid:
    return grids.load_grid(table, grace_period=50, reduction_factor=3)


def _recording(stop_at: int | None = None) -> Any:
    """A FIFOScheduler that records every result it is handed, and stops every other trial at `stop_at`."""
    from ray.tune.schedulers import FIFOScheduler

    class Recording(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, int]] = []
            self.results: list[dict[str, Any]] = []
            self.completed: list[str] = []

        def on_trial_result(self, controller: Any, trial: Any, result: dict[str, Any]) -> str:
            self.seen.append((trial.trial_id, result["step"]))
            self.results.append(result)
            if stop_at is not None and result["step"] >= stop_at and int(trial.trial_id) % 2 == 0:
                return self.STOP
            return self.CONTINUE

        def on_trial_complete(self, controller: Any, trial: Any, result: dict[str, Any]) -> None:
            self.completed.append(trial.trial_id)

    return Recording()


@pytest.mark.parametrize("searcher", sorted(replay.SEARCHERS))
def test_a_seed_replays_the_same_and_another_seed_another_order(grid: replay.Grid, searcher: str) -> None:
    first = replay.simulate(grid, searcher, "asha", workers=3, seed=0)
    again = replay.simulate(grid, searcher, "asha", workers=3, seed=0)
    other = replay.simulate(grid, searcher, "asha", workers=3, seed=1)
    assert first.trials == again.trials and first.trajectory == again.trajectory
    assert [t.config_id for t in first.trials] != [t.config_id for t in other.trials]


@pytest.mark.parametrize("searcher", sorted(replay.SEARCHERS))
def test_no_pruning_spends_the_whole_grid_and_finds_its_frontier(grid: replay.Grid, searcher: str) -> None:
    run = replay.simulate(grid, searcher, "fifo", workers=4, seed=3)
    assert sorted(t.config_id for t in run.trials) == sorted(grid.by_id)  # every configuration, once
    assert not any(t.status == "pruned" for t in run.trials)
    assert run.compute == pytest.approx(grid.compute, rel=1e-12)
    full = grid.frontier(grid.configurations)
    scored = grid.scored(grid.configurations)
    assert sorted(run.frontier) == sorted(c.config_id for c, on in zip(scored, full.mask, strict=True) if on)
    assert run.hypervolume / run.grid_hypervolume == pytest.approx(1.0, rel=1e-12)
    assert run.compute_to_hv(1.0) <= 1.0 + 1e-12 and run.hv_at_compute(1.0) == pytest.approx(1.0, rel=1e-12)
    compute, hv = zip(*run.trajectory, strict=True)
    assert list(compute) == sorted(compute) and list(hv) == sorted(hv) and compute[-1] <= grid.compute * (1 + 1e-12)


def test_asha_stops_only_at_rungs_and_spends_less_than_no_pruning(grid: replay.Grid) -> None:
    assert replay.rungs(grid) == [50, 150]
    asha = replay.simulate(grid, "random", "asha", workers=4, seed=0)
    fifo = replay.simulate(grid, "random", "fifo", workers=4, seed=0)
    pruned = [t for t in asha.trials if t.status == "pruned"]
    assert len(pruned) > len(grid.configurations) // 2  # ASHA keeps a third at each rung
    assert {t.step for t in pruned} <= {50, 150}
    assert all(t.step == 300 for t in asha.trials if t.status == "completed")
    assert asha.compute < 0.5 * fifo.compute
    for t in pruned:
        c = grid.by_id[t.config_id]
        assert t.device_s == pytest.approx(c.device_s * t.step / c.last_step)
    assert asha.compute == pytest.approx(sum(t.device_s for t in asha.trials))


def test_more_workers_shorten_the_wall_clock_not_the_compute(grid: replay.Grid) -> None:
    runs = {n: replay.simulate(grid, "random", "fifo", workers=n, seed=0) for n in (1, 2, 8)}
    assert runs[1].wall_s == pytest.approx(sum(c.train_s for c in grid.configurations))  # one after another
    assert runs[1].wall_s > runs[2].wall_s > runs[8].wall_s
    assert runs[8].wall_s < runs[1].wall_s / 6
    for run in runs.values():
        assert run.compute == pytest.approx(grid.compute, rel=1e-12)
    # With one worker nothing else runs when a trial ends: the trajectory's compute is what the trials so far spent.
    spent = list(itertools.accumulate(t.device_s for t in runs[1].trials))
    for compute, _ in runs[1].trajectory[1:]:
        assert min(abs(compute - s) for s in spent) < 1e-9


def test_a_stopped_trial_reports_nothing_more(grid: replay.Grid) -> None:
    scheduler = _recording(stop_at=100)
    run = replay.simulate(grid, "random", scheduler, workers=4, seed=0)
    stopped = {t.trial_id for t in run.trials if t.status == "pruned"}
    assert len(stopped) > 40 and all(int(i) % 2 == 0 for i in stopped)
    assert all(t.trial_id in stopped or t.step <= 100 for t in run.trials if int(t.trial_id) % 2 == 0)
    for trial_id, step in scheduler.seen:
        assert trial_id not in stopped or step <= 100
    assert all(t.step == 100 for t in run.trials if t.status == "pruned")
    # Tune's controller calls on_trial_complete for a stopped trial and for one that finished, never for a failed one
    assert sorted(scheduler.completed) == sorted(t.trial_id for t in run.trials if t.status in ("completed", "pruned"))


def test_results_carry_a_real_trials_keys(grid: replay.Grid) -> None:
    scheduler = _recording()
    run = replay.simulate(grid, "random", scheduler, workers=2, seed=0)
    first = scheduler.results[0]
    assert set(StepReport().metrics()) <= set(first)
    assert {"trial_id", "training_iteration", "time_total_s", "config"} <= set(first)
    assert first["adapter_bytes"] > 0 and first["steady_train_device_s"] > 0 and math.isnan(first["objective"])
    done = {t.trial_id for t in run.trials if t.status == "completed"}
    last = [r for r in scheduler.results if r["trial_id"] in done and r["step"] == 300]
    assert len(last) == len(done)
    assert all(math.isfinite(r["objective"]) and "golden/smollm2_dates/exact_match" in r for r in last)
    r = last[0]
    c = grid.by_id[next(t.config_id for t in run.trials if t.trial_id == r["trial_id"])]
    assert r["objective"] == c.objective and r["eval_loss"] == c.losses[-1]


def test_a_scheduler_that_pauses_is_refused(grid: replay.Grid) -> None:
    from ray.tune.schedulers import FIFOScheduler

    class Pausing(FIFOScheduler):
        def on_trial_result(self, controller: Any, trial: Any, result: dict[str, Any]) -> str:
            return self.PAUSE

    with pytest.raises(replay.UnsupportedScheduler, match="PAUSE"):
        replay.simulate(grid, "random", Pausing(), workers=1, seed=0)


def test_pareto_asha_replays_unchanged(grid: replay.Grid) -> None:
    pareto_asha = pytest.importorskip("lora_search.pareto_asha")
    b = grid.budget
    scheduler = pareto_asha.ParetoASHA(
        time_attr="step", max_t=b.max_steps, grace_period=b.grace_period, reduction_factor=b.reduction_factor
    )
    run = replay.simulate(grid, "random", scheduler, workers=4, seed=0)
    pruned = [t for t in run.trials if t.status == "pruned"]
    assert pruned and {t.step for t in pruned} <= {50, 150}
    assert run.compute < 0.5 * grid.compute


def test_load_grid_names_what_is_missing(table: Path, tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.read_parquet(table)
    frame.drop(columns=["device_s"]).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(grids.GridError, match="missing column 'device_s'"):
        grids.load_grid(tmp_path / "a.parquet")

    bad = frame.copy()
    bad.at[3, "curve_eval_loss"] = list(bad.at[3, "curve_eval_loss"])[:-1]
    bad.to_parquet(tmp_path / "b.parquet")
    with pytest.raises(grids.GridError, match=f"row 3 \\({bad.at[3, 'config_id']}\\): curve_step and curve_eval"):
        grids.load_grid(tmp_path / "b.parquet")

    short = frame.copy()
    done = short.index[short["status"] == "completed"][0]
    short.at[done, "curve_step"] = list(short.at[done, "curve_step"])[:-1]
    short.at[done, "curve_eval_loss"] = list(short.at[done, "curve_eval_loss"])[:-1]
    short.to_parquet(tmp_path / "c.parquet")
    with pytest.raises(grids.GridError, match=f"row {done} .*completed but its curve ends at step 275"):
        grids.load_grid(tmp_path / "c.parquet")

    bare = frame.copy()
    bare.attrs = {}
    bare.to_parquet(tmp_path / "d.parquet")
    with pytest.raises(grids.GridError, match="benchmarks/grid.py table"):
        grids.load_grid(tmp_path / "d.parquet")


def test_synthetic_grid_is_deterministic_and_in_the_grid_format(grid: replay.Grid) -> None:
    a, b, c = grids.synthetic_grid(60, 1), grids.synthetic_grid(60, 1), grids.synthetic_grid(60, 2)
    assert a.equals(b) and not a.equals(c) and len(a) == 60
    assert set(grids.REQUIRED) <= set(a.columns) and "smollm2_dates/exact_match_stderr" in a.columns
    assert grid.budget.max_steps == 300 and grid.objective == "smollm2_dates/exact_match"
    statuses = {c.status for c in grid.configurations}
    assert "completed" in statuses and statuses - {"completed"}  # some end early, as real grids have


def test_the_committed_measurement_is_the_replay_of_the_committed_grid() -> None:
    """benchmarks/replay_grid_*.json is what benchmarks/replay_measure.py computes from the grid table beside it (the
    real model's, recorded on the GPU): the two ASHA rows, every seed, replayed again here (~2 s)."""
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    measured = sorted(root.glob("benchmarks/replay_grid_*.json"))
    assert measured, "no benchmarks/replay_grid_*.json: run benchmarks/replay_measure.py on a recorded grid"
    spec = importlib.util.spec_from_file_location("replay_measure", root / "benchmarks" / "replay_measure.py")
    assert spec and spec.loader
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    for path in measured:
        committed = json.loads(path.read_text())
        table = root / committed["table"]
        grid = grids.load_grid(table, grace_period=committed["rungs"][0], reduction_factor=3, drop_unfinished=True)
        assert len(grid.configurations) == committed["configurations"]
        assert replay.rungs(grid) == committed["rungs"]
        assert grid.hypervolume == pytest.approx(committed["grid_hypervolume"], rel=1e-9)
        combos = {k: v for k, v in measure.COMBOS.items() if k in ("random+asha", "random+pareto-asha")}
        measure.COMBOS = combos
        rows = {r["scheduler"]: r for r in measure.measure(grid, committed["seeds"], committed["workers"])}
        for row in committed["rows"]:
            if row["scheduler"] not in rows:
                continue
            again = rows[row["scheduler"]]
            for key in ("compute_fraction_to_95pct_hv", "hv_at_0.15", "compute_fraction", "hv_ratio"):
                want = math.inf if row[key] is None else row[key]
                assert again[key] == pytest.approx(want, rel=1e-9), (row["scheduler"], key)
            assert again["reached_95pct_hv"] == row["reached_95pct_hv"]
        # The figures the README and Sweep.scheduler's default rest on.
        pareto, loss = rows["random+pareto-asha"], rows["random+asha"]
        assert pareto["hv_ratio"] > loss["hv_ratio"]
