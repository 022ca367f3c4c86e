"""Schedulers and searchers replayed over the recorded grid (lora_search.replay), no training: the compute each needs
to find 95% of the grid's frontier hypervolume, and the share of it found at 0.15x the grid's compute.

    python benchmarks/replay_measure.py                  # the newest benchmarks/grid_*.parquet (benchmarks/grid.py)
    python benchmarks/replay_measure.py --synthetic      # lora_search.grids.synthetic_grid: ~30 s on 2 CPU cores
    python benchmarks/replay_measure.py TABLE --seeds 50 --workers 8 --out replay.json

Each combination runs once a seed (seeds 0..N-1) until its searcher has tried every configuration. Compute is the
grid's recorded device-seconds (`device_s`, a configuration's steady training and evaluation) of the steps each trial
ran, as a fraction of the whole grid's (what a sweep that prunes nothing spends); a combination that never reaches
95% of the grid's hypervolume (a pruned frontier configuration) counts as inf, so the figure is the median over
seeds, with a percentile-bootstrap 95% interval. `hv_at_0.15` is the mean hypervolume ratio at 0.15x the grid's
compute. The Spearman rows say how well eval loss at each rung (and the last step) ranks the configurations'
golden objective: ASHA prunes on the former. Writes JSON (--out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_search import grids, replay  # noqa: E402

COMBOS: dict[str, tuple[str, str]] = {
    "random+asha": ("random", "asha"),  # ASHA on eval loss, Ray's decisions (Sweep(scheduler="asha"))
    "random+pareto-asha": ("random", "pareto-asha"),  # the default: ASHA on (eval loss, adapter bytes, cost a step)
    "random+fifo": ("random", "fifo"),  # no pruning: the grid in a random order
    "tpe+fifo": ("tpe", "fifo"),  # Optuna TPE on the golden objective
    "nsga2+fifo": ("nsga2", "fifo"),  # Optuna NSGA-II on (objective, adapter bytes, cost)
}
TARGET, EARLY = 0.95, 0.15
FRACTIONS = np.linspace(0.0, 0.6, 121)  # the plot's compute axis: every scheduler's whole sweep ends below 0.6


SCHEDULERS = replay.SCHEDULERS


def bootstrap(values: np.ndarray, statistic: Callable[[np.ndarray], float], n: int = 2000) -> list[float]:
    """Percentile-bootstrap 95% interval of `statistic` over `values` (resampled with a fixed seed); nearest-rank,
    so that an inf (never reached) stays inf instead of becoming NaN."""
    rng = np.random.default_rng(0)
    stats = np.array([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(n)])
    return [float(np.quantile(stats, q, method="nearest")) for q in (0.025, 0.975)]


def measure(
    grid: replay.Grid, seeds: int, workers: int, curves: dict[str, np.ndarray] | None = None
) -> list[dict[str, Any]]:
    """One row per COMBOS entry over `seeds` replays; `curves` (if given) gets each one's hypervolume ratio at every
    compute fraction of FRACTIONS, one row a seed (the plot's)."""
    rows = []
    for name, (searcher, scheduler) in COMBOS.items():
        start = time.perf_counter()
        runs = [replay.simulate(grid, searcher, SCHEDULERS[scheduler](grid), workers, seed) for seed in range(seeds)]
        if curves is not None:
            curves[name] = np.array([[r.hv_at_compute(f) for f in FRACTIONS] for r in runs])
        to_target = np.array([r.compute_to_hv(TARGET) for r in runs])
        early = np.array([r.hv_at_compute(EARLY) for r in runs])
        rows.append(
            {
                "scheduler": name,
                "searcher": searcher,
                "compute_fraction_to_95pct_hv": float(np.median(to_target)),
                "compute_fraction_to_95pct_hv_ci95": bootstrap(to_target, np.median),
                "reached_95pct_hv": f"{int(np.isfinite(to_target).sum())}/{seeds}",
                "hv_at_0.15": float(early.mean()),
                "hv_at_0.15_ci95": bootstrap(early, np.mean),
                "compute_fraction": float(np.mean([r.compute / r.grid_compute for r in runs])),
                "hv_ratio": float(np.mean([r.hypervolume / r.grid_hypervolume for r in runs])),
                "wall_fraction": float(np.mean([r.wall_s for r in runs]) / _fifo_wall(grid, workers)),
                "pruned": float(np.mean([sum(t.status == "pruned" for t in r.trials) for r in runs])),
                "replay_s": time.perf_counter() - start,
            }
        )
    return rows


def plot(result: dict[str, Any], curves: dict[str, np.ndarray], out: Path) -> Path:
    """The measurement as a page in the sweep report's style (lora_search.report's CSS and figure settings): each
    scheduler's hypervolume found against compute spent, mean over seeds with its 2.5-97.5 percentile band, and the
    goal's two lines (95% of the grid's hypervolume, 0.15x its compute); the table below it."""
    import html

    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from lora_search.report import CSS, _figure

    fig = go.Figure()
    palette = ("#d62728", "#1f77b4", "#7f7f7f", "#2ca02c", "#9467bd")
    for (name, hv), color in zip(curves.items(), palette, strict=False):
        lo, hi = np.quantile(hv, 0.025, axis=0), np.quantile(hv, 0.975, axis=0)
        band = dict(mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip")
        fig.add_scatter(x=FRACTIONS, y=hi, **band)
        fig.add_scatter(x=FRACTIONS, y=lo, fill="tonexty", fillcolor=_alpha(color), **band)
        fig.add_scatter(x=FRACTIONS, y=hv.mean(axis=0), mode="lines", name=name, line={"color": color})
    fig.add_hline(y=TARGET, line_dash="dot", annotation_text="95% of the grid's hypervolume")
    fig.add_vline(x=EARLY, line_dash="dot", annotation_text="0.15x the grid's compute")
    fig.update_layout(
        xaxis_title="compute spent (fraction of the whole grid's device-seconds)",
        yaxis_title="hypervolume found (fraction of the grid's)",
        yaxis_range=[0, 1.02],
    )
    head = ("scheduler", "compute to 95% HV (median)", "95% CI", "reached", "HV at 0.15x (mean)", "95% CI",
            "whole sweep: compute", "whole sweep: HV")  # fmt: skip
    cells = [
        (
            r["scheduler"],
            _num(r["compute_fraction_to_95pct_hv"]),
            _ci(r["compute_fraction_to_95pct_hv_ci95"]),
            r["reached_95pct_hv"],
            _num(r["hv_at_0.15"]),
            _ci(r["hv_at_0.15_ci95"]),
            _num(r["compute_fraction"], ".2f"),
            _num(r["hv_ratio"], ".2f"),
        )  # fmt: skip
        for r in result["rows"]
    ]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    title = html.escape(f"How much compute a sweep saves: {result['table']}")
    rhos = ", ".join(f"step {s['step']}: {s['rho']:+.2f}" for s in result["spearman_eval_loss_vs_objective"])
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head>\n<body><h1>{title}</h1>\n"
        f"<p class='note'>{result['completed_scored']} configurations replayed ({result['left_out_unfinished']} cut "
        f"short and left out), {result['seeds']} seeds, {result['workers']} trials at once, rungs {result['rungs']}; "
        f"frontier of {result['grid_frontier']} over ({html.escape(result['objective'])}, adapter bytes, "
        f"device-seconds). Spearman(eval loss, objective): {rhos}. benchmarks/replay_measure.py wrote it.</p>\n"
        + _figure(fig, "replay-hv", height=520)
        + table
        + "</table></body></html>\n"
    )
    out.write_text(page, encoding="utf-8")
    return out


def _alpha(color: str) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.15)"


def _num(value: Any, spec: str = ".3f") -> str:
    return "never" if value is None or not math.isfinite(value) else format(value, spec)


def _ci(pair: list[float | None]) -> str:
    return "[" + ", ".join(_num(v) for v in pair) + "]"


def _fifo_wall(grid: replay.Grid, workers: int) -> float:
    return replay.simulate(grid, "random", "fifo", workers, 0).wall_s


def spearman(grid: replay.Grid) -> list[dict[str, Any]]:
    """Spearman's rho between eval loss at each rung (and the last step) and the golden objective, over the
    completed, scored configurations (negative: lower loss, better objective)."""
    from scipy.stats import spearmanr

    done = grid.scored(grid.configurations)
    out = []
    for step in sorted({*replay.rungs(grid), grid.budget.max_steps}):
        pairs = [(dict(zip(c.steps, c.losses, strict=True))[step], c.objective) for c in done if step in c.steps]
        rho, p = spearmanr(*zip(*pairs, strict=True))
        out.append({"step": step, "rho": float(rho), "p": float(p), "configurations": len(pairs)})
    return out


def _relative(path: Path) -> str:
    """The table as the repository names it (a path under it), so the JSON reads the same on every machine."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _finite(value: Any) -> Any:
    """JSON has no inf: never reached is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", type=Path, help="a grid table (default: the newest grid_*.parquet)")
    parser.add_argument("--synthetic", action="store_true", help="grids.synthetic_grid(120, seed 0) instead")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4, help="trials at a time (sweeps/smollm2.py: 4 an H200)")
    parser.add_argument("--grace-period", type=int, default=50, help="ASHA's first rung (sweeps/smollm2.py: 50)")
    parser.add_argument("--reduction-factor", type=int, default=3, help="sweeps/smollm2.py: 3")
    parser.add_argument("--out", type=Path, help="JSON (default: benchmarks/replay_<table>.json)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="optuna")  # ExperimentalWarning for NSGA-II's and enqueue's options

    if args.synthetic:
        path = Path(tempfile.mkdtemp()) / "grid_synthetic.parquet"
        grids.synthetic_grid(120, seed=0).to_parquet(path)
    else:
        tables = sorted(ROOT.glob("benchmarks/grid_*.parquet"), key=lambda p: p.stat().st_mtime)
        if args.table is None and not tables:
            sys.exit("no benchmarks/grid_*.parquet: record one (benchmarks/grid.py), or pass --synthetic")
        path = args.table or tables[-1]
    recorded = len(pd.read_parquet(path, columns=["config_id"]))
    # A configuration the recording cut short has no score and no whole curve: it is left out, not replayed as failed.
    grid = grids.load_grid(
        path, grace_period=args.grace_period, reduction_factor=args.reduction_factor, drop_unfinished=True
    )
    out = args.out or ROOT / "benchmarks" / f"replay_{path.stem}.json"

    start = time.perf_counter()
    curves: dict[str, np.ndarray] = {}
    rows = measure(grid, args.seeds, args.workers, curves)
    rhos = spearman(grid)
    done = grid.scored(grid.configurations)
    result = {
        "table": "synthetic: lora_search.grids.synthetic_grid(120, seed=0)" if args.synthetic else _relative(path),
        "configurations": len(grid.configurations),
        "left_out_unfinished": recorded - len(grid.configurations),
        "completed_scored": len(done),
        "objective": grid.objective,
        "grid_device_s": grid.compute,
        "grid_frontier": len(grid.frontier(done).mask.nonzero()[0]),
        "grid_hypervolume": grid.hypervolume,
        "reference": dict(zip(("objective", "adapter_bytes", "cost_device_s"), grid.reference, strict=True)),
        "rungs": replay.rungs(grid),
        "seeds": args.seeds,
        "workers": args.workers,
        "rows": [{k: _finite(v) for k, v in r.items()} for r in rows],
        "spearman_eval_loss_vs_objective": rhos,
        "seconds": time.perf_counter() - start,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    page = plot(result, curves, out.with_suffix(".html"))

    print(
        f"{result['table']}: {len(grid.configurations)} configurations, {len(done)} completed and scored, "
        f"frontier {result['grid_frontier']}, hypervolume {grid.hypervolume:.4f}, {grid.compute / 3600:.3g} "
        f"device-hours; rungs {result['rungs']}; {args.seeds} seeds, {args.workers} workers"
    )
    print(
        f"{'scheduler':<20} {'compute to 95% HV':>18} {'95% CI':>15} {'reached':>8} {'HV at 0.15':>11} {'95% CI':>13}"
    )
    for r in rows:
        lo, hi = r["compute_fraction_to_95pct_hv_ci95"]
        elo, ehi = r["hv_at_0.15_ci95"]
        print(
            f"{r['scheduler']:<20} {r['compute_fraction_to_95pct_hv']:>18.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
            f"{r['reached_95pct_hv']:>8} {r['hv_at_0.15']:>11.3f} {f'[{elo:.3f}, {ehi:.3f}]':>13}"
        )
    print(
        "Spearman(eval loss at step, objective): "
        + ", ".join(f"step {s['step']}: {s['rho']:+.2f}" for s in rhos)
        + f"  (n={rhos[0]['configurations']})"
    )
    print(f"{result['seconds']:.1f} s; wrote {out} and {page.name}")


if __name__ == "__main__":
    main()
