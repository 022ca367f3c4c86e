"""The recorded grid (a tabular benchmark) of sweeps/smollm2.py: every configuration of a grid trained to the full
budget on the GPU, each eval-every point of its curve kept, so that schedulers and searchers can be replayed over it
without training (lora_search's replay simulator reads the table this writes).

    python benchmarks/grid.py run --shard attention    # half the grid as a sweep: no pruning, 8 trials a GPU
    python benchmarks/grid.py run --shard all-linear   # the other half (another GPU, or after it)
    GRID_PER_GPU=12 python benchmarks/grid.py run --shard all   # the whole grid as one sweep (one GPU)
    python benchmarks/grid.py table    # -> benchmarks/grid_smollm2_<gpu>_<date>.parquet (or --out DIR)

A grid cut short is finished in parts, at the same GRID_PER_GPU (device_s is the GPU share's device-seconds):
    GRID_PER_GPU=16 python benchmarks/grid.py run --shard all --variants pissa,loraplus,dora
    python benchmarks/grid.py table --earlier benchmarks/grid_smollm2_h200_2026-12-04.parquet
A finished part whose Ray experiment is gone (the machine given back) joins from its report dir:
    python benchmarks/grid.py table --earlier TABLE --reports DIR/smollm2-grid-all-linear-pissa

`run` is an ordinary lora_search sweep (named smollm2-grid, under $LORA_SEARCH_OUTPUT_DIR): interrupted (Ctrl-C,
SIGINT, a time limit), the same command resumes it. `table` reads its Ray experiment directly, so a grid cut short
still gives a table of the configurations that finished (`status` says which did not). The table's columns are
described in benchmarks/GRID.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

NAME = "smollm2-grid"
# The grid in two sweeps that can run side by side (one a GPU) and resume apart; `table` joins them.
SHARDS = {"attention": ("attention",), "all-linear": ("all-linear",), "all": ("attention", "all-linear")}
# Trials sharing one GPU ($GRID_PER_GPU): a 135M trial is host-bound, so the machine's cores set how many pay off.
PER_GPU = int(os.environ.get("GRID_PER_GPU", "8"))
# Tune's grid varies the first key slowest: DoRA (the slowest to train) comes last, so a grid cut short lacks DoRA
# configurations rather than a slice of every variant.
VARIANTS = ("lora", "rslora", "pissa", "loraplus", "dora")


def grid_sweep(shard: str, smoke: bool = False, variants: tuple[str, ...] = ()) -> Any:
    """sweeps/smollm2.py's base, data, budget and golden sets over a grid of 5 variants x 3 ranks x 2 target sets x
    4 learning rates (120 configurations), alpha = 2 x rank, every trial to max_steps; `shard` picks the target set
    (`SHARDS`), `variants` a part of the variants (a grid recorded in parts: the sweep's name says which). `smoke` (with
    SMOLLM2_MODE=smoke): two configurations on the CPU, to try the script end to end."""
    from lora_search import Resources, SearchSpace
    from lora_search.cli import load_sweep

    sweep, problems = load_sweep(ROOT / "sweeps" / "smollm2.py")
    assert not problems, problems
    grid = SearchSpace(
        ranks=(4, 16, 64),
        alpha_over_rank=(2.0,),
        targets=SHARDS[shard],
        variants=variants or VARIANTS,
        lr=(2e-5, 2e-3),
        lr_grid_points=4,  # 2e-5, 9.3e-5, 4.3e-4, 2e-3
    )
    budget = dataclasses.replace(sweep.budget, grace_period=sweep.budget.max_steps)  # ASHA never stops one
    if smoke:
        grid = dataclasses.replace(grid, ranks=(4,), targets=("attention",), variants=("lora",), lr_grid_points=2)
        return sweep.replace(
            name=f"{NAME}-smoke-{shard}", space=grid, search="grid", num_samples=1, budget=budget, tracking_uri="off"
        )
    return sweep.replace(
        name=f"{NAME}-{shard}" + ("-" + "_".join(variants) if variants else ""),
        space=grid,
        search="grid",
        num_samples=1,
        budget=budget,
        # A 135M trial is host-bound: PER_GPU share a GPU, two cores each up to eight, one beyond.
        resources=Resources(workers=1, gpus_per_worker=round(1 / PER_GPU, 4), cpus_per_worker=2 if PER_GPU <= 8 else 1),
        tracking_uri="off",
    )


def _rows(sweep: Any, out: Path, analysis: Any) -> list[dict[str, Any]]:
    from lora_search import results
    from lora_search.layout import ADAPTERS_DIR

    rows = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        history = frame.to_dict("records") if frame is not None else []
        history = list({int(h.get("step", 0)): h for h in history if "step" in h}.values())
        error = RuntimeError(str(trial.error_file)) if trial.status == "ERROR" else None
        rec = results.record(trial.trial_id, trial.config, history, error, sweep, out / ADAPTERS_DIR)
        curve = dict((int(h["step"]), float(h["eval_loss"])) for h in history if "eval_loss" in h)
        if math.isfinite(rec.base_eval_loss):
            curve.setdefault(0, rec.base_eval_loss)  # the step-0 eval: the base itself
        curve = sorted(curve.items())
        status = rec.status if rec.status != "pruned" else "unfinished"  # nothing is pruned in the grid
        row = {
            "config_id": f"{rec.variant}-r{rec.rank}-{rec.targets}-lr{rec.lr:.3g}",
            "variant": rec.variant,
            "rank": rec.rank,
            "alpha": rec.alpha,
            "targets": rec.targets,
            "lr": rec.lr,
            "status": status,
            "step": rec.step,
            "curve_step": [s for s, _ in curve],
            "curve_eval_loss": [v for _, v in curve],
            "base_eval_loss": rec.base_eval_loss,
            "eval_loss": rec.eval_loss,
            "best_eval_loss": rec.best_eval_loss,
            "train_loss": rec.train_loss,
            "trainable_params": rec.trainable_params,
            "adapter_bytes": rec.adapter_bytes,
            "train_s": rec.train_s,
            "device_s": rec.device_s,
            "eval_s": rec.eval_s,
            "trial_s": rec.trial_s,
            "steady_tokens_per_s": rec.steady_tokens_per_s,
            "tokens_per_s": rec.tokens_per_s,
            "peak_mem_bytes": rec.peak_mem_bytes,
            "device_name": rec.device_name,
            "trial_id": rec.trial_id,
        }
        row.update({k: v for k, v in (rec.scores or {}).items()})
        rows.append(row)
    return rows


def _rows_from_report(out: Path) -> list[dict[str, Any]]:
    """The rows of a finished part whose Ray experiment is gone (a device machine given back) from what its report
    wrote: trials.parquet (one row a trial) and history.parquet (every report of every trial)."""
    import pandas as pd

    trials = pd.read_parquet(out / "trials.parquet")
    history = pd.read_parquet(out / "history.parquet")
    columns = _COLUMNS + [c for c in trials.columns if "/" in c]  # and the golden scores, task/metric[_stderr]
    rows = []
    for t in trials.to_dict("records"):
        h = history[(history["trial_id"] == t["trial_id"]) & history["eval_loss"].notna()]
        curve = dict(zip(h["step"].astype(int), h["eval_loss"].astype(float), strict=True))
        if math.isfinite(t["base_eval_loss"]):
            curve.setdefault(0, float(t["base_eval_loss"]))
        curve = sorted(curve.items())
        row = {c: t.get(c) for c in columns if c in t}
        row.update(
            config_id=f"{t['variant']}-r{t['rank']}-{t['targets']}-lr{t['lr']:.3g}",
            status=t["status"] if t["status"] != "pruned" else "unfinished",
            curve_step=[s for s, _ in curve],
            curve_eval_loss=[v for _, v in curve],
        )
        rows.append(row)
    return rows


# The table's columns (benchmarks/GRID.md), in order; the golden scores follow.
_COLUMNS = [
    "config_id", "variant", "rank", "alpha", "targets", "lr", "status", "step", "curve_step", "curve_eval_loss",
    "base_eval_loss", "eval_loss", "best_eval_loss", "train_loss", "trainable_params", "adapter_bytes", "train_s",
    "device_s", "eval_s", "trial_s", "steady_tokens_per_s", "tokens_per_s", "peak_mem_bytes", "device_name",
    "trial_id",
]  # fmt: skip


def table(out_dir: Path, smoke: bool = False, earlier: tuple[Path, ...] = (), reports: tuple[Path, ...] = ()) -> Path:
    """One row per configuration: its hyperparameters, status, curve (steps and eval losses), final golden scores
    with stderr, adapter bytes, speed and device-seconds. Reads every part of the grid recorded under the output
    dir (each shard, each `--variants` part) and the rows of `earlier` tables; where a configuration appears more
    than once, its completed row wins."""
    import pandas as pd
    import torch
    from ray.tune import ExperimentAnalysis

    from lora_search.layout import ray_storage
    from lora_search.sweep import sweep_dir

    probe = grid_sweep("all", smoke)
    root = sweep_dir(probe).parent
    prefix = f"{NAME}-smoke-" if smoke else f"{NAME}-"
    names = sorted(p.name for p in root.glob(prefix + "*") if (ray_storage(p) / p.name).is_dir())
    if not smoke:
        names = [n for n in names if not n.startswith(f"{NAME}-smoke-")]
    shards = [(probe.replace(name=n), root / n) for n in names]
    missing = [str(p) for p in earlier if not Path(p).is_file()]
    missing += [
        str(Path(d) / f) for d in reports for f in ("trials.parquet", "history.parquet") if not (Path(d) / f).is_file()
    ]
    if missing:  # all of them at once, before anything is read
        sys.exit(
            "grid.py table: not found: " + ", ".join(missing) + ". Fix: --earlier takes grid tables (grid_*.parquet), "
            "--reports the report dirs of finished parts (reports/<sweep name>/, as copied back from the device)"
        )
    rows = [r for path in earlier for r in pd.read_parquet(path).to_dict("records")]
    rows += [r for out in reports for r in _rows_from_report(out)]
    for sweep, out in shards:
        rows += _rows(sweep, out, ExperimentAnalysis(str(ray_storage(out) / sweep.name)))
    if not rows:
        sys.exit(f"nothing recorded under {root} (benchmarks/grid.py run) and no --earlier table")
    best: dict[str, dict[str, Any]] = {}
    for r in rows:  # completed first, then the furthest step
        key = (r["status"] == "completed", r["step"])
        if r["config_id"] not in best or key > (
            best[r["config_id"]]["status"] == "completed",
            best[r["config_id"]]["step"],
        ):
            best[r["config_id"]] = r
    rows = list(best.values())
    shards_here = bool(shards)  # parts whose Ray experiment is on this machine
    shards = shards or [(probe, root)]
    sweep = shards[0][0]
    assert sweep.evals is not None
    frame = pd.DataFrame(rows).sort_values(["variant", "rank", "targets", "lr"]).reset_index(drop=True)
    date = dt.date.today().isoformat()
    device = next((d for d in frame["device_name"] if d and d != "cpu"), "cpu")
    tag = "cpu" if device == "cpu" else device.split()[-1].lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"grid_smollm2_{tag}_{date}.parquet"
    meta = {
        "sweep": "benchmarks/grid.py (sweeps/smollm2.py's base, data, budget, golden sets)",
        "shards": [s.name for s, _ in shards] + [str(p) for p in earlier] + [p.name for p in reports],
        "budget": dataclasses.asdict(sweep.budget),
        "seed": sweep.seed,
        "objective": sweep.evals.objective,
        "device": device,
        "date": date,
        "torch": torch.__version__,
        "configurations": len(frame),
        "by_status": {k: int(v) for k, v in frame["status"].value_counts().items()},
    }
    for lib in ("transformers", "peft", "trl", "ray", "lm_eval"):
        try:
            meta[lib] = __import__(lib).__version__
        except Exception:  # a library missing on this machine is recorded as missing
            meta[lib] = "missing"
    if earlier and not shards_here:  # parts merged here (a CPU), all recorded on the device: keep the device's
        # budget, seed and versions from the first earlier table, and list every part
        recorded = json.loads(Path(earlier[0]).with_suffix(".json").read_text())
        parts = recorded["shards"] + [str(p) for p in earlier[1:]] + [p.name for p in reports]
        meta = recorded | {"shards": parts, "configurations": meta["configurations"], "by_status": meta["by_status"]}
    frame.attrs["lora_search"] = meta  # pandas keeps attrs in the parquet's metadata
    frame.to_parquet(path, index=False)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    done = frame[frame["status"] == "completed"]
    obj = sweep.evals.objective
    print(f"{len(frame)} configurations: {meta['by_status']}")
    if len(done):
        best = done.sort_values(obj, ascending=False).iloc[0]
        print(
            f"best {obj}: {best[obj]:.4f} ({best['config_id']}); median {done[obj].median():.4f}; "
            f"{sum(math.isfinite(x) for x in done[obj])} scored"
        )
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("run", "table"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--shard", choices=tuple(SHARDS), default="attention", help="run: which target set")
    parser.add_argument("--smoke", action="store_true", help="two configurations on the CPU (SMOLLM2_MODE=smoke)")
    parser.add_argument("--variants", default="", help="run: a part of the variants, comma-separated (e.g. pissa,dora)")
    parser.add_argument("--earlier", type=Path, nargs="*", default=(), help="table: rows of tables recorded before")
    parser.add_argument(
        "--reports", type=Path, nargs="*", default=(),
        help="table: finished parts' report dirs (trials.parquet, history.parquet) whose Ray experiment is gone",
    )  # fmt: skip
    args = parser.parse_args()
    if args.what == "run":
        from lora_search import run
        from lora_search.sweep import SweepExistsError

        try:
            run(grid_sweep(args.shard, args.smoke, tuple(v for v in args.variants.split(",") if v)))
        except SweepExistsError as e:
            print(e)
    else:
        table(args.out, args.smoke, tuple(args.earlier), tuple(args.reports))


if __name__ == "__main__":
    main()
