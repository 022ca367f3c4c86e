"""sweeps/smollm2.py's GPU run, measured: the sweep against the base and against the recipe a user would have used.

    python sweeps/smollm2.py                          # the sweep (GPU budget on CUDA)
    python benchmarks/smollm2_gpu.py default          # the default recipe, once, on the same budget
    python benchmarks/smollm2_gpu.py collect          # -> benchmarks/smollm2_<gpu>_<date>.json (or --out DIR)

The default recipe is what PEFT's and TRL's examples reach for: LoRA r=16, alpha 32, every linear projection, lr
2e-4, cosine decay; the sweep's own step budget, batch, warm-up and golden sets. `collect` reads both sweep dirs
(under $LORA_SEARCH_OUTPUT_DIR), reloads every frontier adapter with plain `PeftModel.from_pretrained` on the
converted base (NF4 for the 4-bit variants, as they trained) and compares its logits on the trial's saved probe with
the trial's own, and writes one JSON: base, default recipe and sweep-best golden scores with stderr, trials, pruned,
GPU-seconds, adapter bytes, reloads.
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

DEFAULT_NAME = "smollm2-default"


def sweeps() -> tuple[Any, Any]:
    """(sweeps/smollm2.py's sweep, the default recipe as a one-trial sweep on the same budget and golden sets)."""
    from lora_search import SearchSpace
    from lora_search.cli import load_sweep

    sweep, problems = load_sweep(ROOT / "sweeps" / "smollm2.py")
    assert not problems, problems
    recipe = SearchSpace(
        ranks=(16,),
        alpha_over_rank=(2.0,),  # alpha 32
        targets=("all-linear",),
        variants=("lora",),
        lr=(1e-4, 4e-4),
        lr_grid_points=1,  # the geometric mean: 2e-4
    )
    budget = dataclasses.replace(sweep.budget, lr_schedule="cosine", grace_period=sweep.budget.max_steps)
    default = sweep.replace(name=DEFAULT_NAME, space=recipe, search="grid", num_samples=1, budget=budget)
    return sweep, default


def _metric(row: Any, key: str) -> dict[str, float]:
    return {"value": float(row[key]), "stderr": float(row.get(f"{key}_stderr", math.nan))}


def _golden(row: Any, keys: list[str]) -> dict[str, dict[str, float]]:
    return {k: _metric(row, k) for k in keys if k in row}


def reload_check(adapter_dir: Path, variant: str) -> dict[str, Any]:
    """Plain PEFT onto the converted base (NF4 for 4-bit variants); max |logit diff| against the trial's probe."""
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_search.layout import PROBE_FILE
    from lora_search.probe import probe_logits

    saved = load_file(str(adapter_dir / PROBE_FILE))
    config = PeftConfig.from_pretrained(str(adapter_dir))
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if on_gpu else torch.float32}
    if on_gpu:
        kwargs["device_map"] = {"": 0}
    if variant in ("qlora", "loftq"):
        from lora_search.variants import quantization_config

        kwargs["quantization_config"] = quantization_config()
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, **kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    probe = [saved[f"input_ids_{i}"][None] for i in range(len(saved) - 1)]
    # Like for like: a bf16 trial computed its probe under bf16 autocast (fp32 adapter weights, bf16 products).
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
        got = probe_logits(model, probe)
    diff = float((got - saved["logits"]).abs().max())
    same_top = bool((got.argmax(-1) == saved["logits"].argmax(-1)).all())
    scale = float(saved["logits"].abs().max())
    del model, base
    if on_gpu:
        torch.cuda.empty_cache()
    # bf16 logits of ~40 carry ~0.2 of rounding; the same next token and a diff within 2% of the scale is a reload
    return {
        "max_logit_diff": diff,
        "logit_scale": scale,
        "same_next_token": same_top,
        "ok": same_top and diff <= 0.02 * scale,
        "criterion": "same next token, max |diff| <= 2% of max |logit|, under the trial's autocast",
    }


def collect(out_dir: Path) -> Path:
    import pandas as pd
    import torch

    from lora_search.layout import BASE_SCORES_FILE, SWEEP_METRICS_FILE, TRIALS_FILE
    from lora_search.sweep import sweep_dir

    sweep, default = sweeps()
    assert sweep.evals is not None
    objective = sweep.evals.objective
    here, there = sweep_dir(sweep), sweep_dir(default)
    trials = pd.read_parquet(here / TRIALS_FILE)
    recipe = pd.read_parquet(there / TRIALS_FILE)
    base = json.loads((here / BASE_SCORES_FILE).read_text())
    figures = json.loads((here / SWEEP_METRICS_FILE).read_text())
    golden = sorted(k for k in trials.columns if "/" in k and not k.endswith("_stderr"))
    completed = trials[trials["status"] == "completed"].sort_values(objective, ascending=False)
    best = completed.iloc[0]
    default_row = recipe.iloc[0]
    frontier = trials[trials["pareto"]]
    reloads = {
        r.trial_id: {"variant": r.variant, **reload_check(Path(r.adapter_path), r.variant)}
        for r in frontier.itertuples()
    }

    def trial(row: Any) -> dict[str, Any]:
        return {
            "trial_id": row["trial_id"],
            "status": row["status"],
            "variant": row["variant"],
            "rank": int(row["rank"]),
            "alpha": float(row["alpha"]),
            "targets": row["targets"],
            "lr": float(row["lr"]),
            "step": int(row["step"]),
            "golden": _golden(row, golden),
            "eval_loss": float(row["eval_loss"]),
            "adapter_bytes": int(row["adapter_bytes"]),
            "gpu_seconds": float(row["device_s"]),
            "cost": float(row["cost"]),
            "steady_tokens_per_s": float(row["steady_tokens_per_s"]),
        }

    b_obj, b_err = float(best[objective]), float(best.get(f"{objective}_stderr", math.nan))
    d_obj, d_err = float(default_row[objective]), float(default_row.get(f"{objective}_stderr", math.nan))
    gap = b_obj - d_obj
    record = {
        "what": "sweeps/smollm2.py on one GPU: the sweep's best adapter against the base and the default recipe "
        "(lora r16 alpha 32 all-linear lr 2e-4 cosine, same budget) on the full golden sets",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": dt.date.today().isoformat(),
        "objective": objective,
        "base": {
            k: {"value": v, "stderr": base["metrics"].get(f"{k}_stderr", math.nan)}
            for k, v in base["metrics"].items()
            if not k.endswith("_stderr")
        },
        "default_recipe": trial(default_row),
        "sweep_best": trial(best),
        "best_minus_default": {
            "value": gap,
            "stderr": math.hypot(b_err, d_err),
            "verdict": (
                "sweep beat the default"
                if gap > 2 * math.hypot(b_err, d_err)
                else "default beat the sweep"
                if -gap > 2 * math.hypot(b_err, d_err)
                else "within 2 stderr: no clear winner"
            ),
        },
        "trials": int(len(trials)),
        "by_status": {k: int(v) for k, v in trials["status"].value_counts().items()},
        "gpu_seconds": {
            "configurations": figures["sweep_device_hours"] * 3600,
            "held": figures["spend_device_hours"] * 3600,
            "default_recipe": float(default_row["device_s"]),
        },
        "sweep_figures": figures,
        "frontier": [trial(r) for _, r in frontier.iterrows()],
        "frontier_reloads_with_plain_peft": all(r["ok"] for r in reloads.values()) if reloads else None,
        "reloads": reloads,
        "all_trials": [trial(r) for _, r in trials.iterrows()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = record["device"].split()[-1].lower()
    path = out_dir / f"smollm2_{tag}_{record['date']}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"base {objective}: {record['base'].get(objective)}")
    print(
        f"default recipe: {d_obj:.4f} ± {d_err:.4f}; sweep best ({best['trial_id']} {best['variant']} "
        f"r{int(best['rank'])}): {b_obj:.4f} ± {b_err:.4f}; {record['best_minus_default']['verdict']}"
    )
    print(
        f"trials {record['by_status']}; frontier reloads with plain PEFT: {record['frontier_reloads_with_plain_peft']}"
    )
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("default", "collect"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    if args.what == "default":
        from lora_search import run
        from lora_search.sweep import SweepExistsError

        try:
            run(sweeps()[1])
        except SweepExistsError as e:
            print(e)
    else:
        collect(args.out)


if __name__ == "__main__":
    main()
