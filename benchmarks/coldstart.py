"""Trial cold start: warm trials (one reused process, its base kept) against a worker group per trial, in one run.

Runs the same sweep twice, one trial at a time: `Resources(reuse_workers=True)` (the default: one-worker trials
train in their Tune trial process, which Tune hands to the next trial, with the base it loaded,
`lora_search.train.BaseCache`) and `reuse_workers=False` (every trial starts a Ray Train worker group, imports the
training stack and loads the base). Prints each trial's cold-start parts, its cold start as a fraction of the trial,
and the ratios of the two sweeps' trial time and wall time.

    python benchmarks/coldstart.py --out "$OUT"                                     # GPU: 1.1B shape, 4 trials
    python benchmarks/coldstart.py --out /tmp/cs --shape tiny --seq 128 --steps 6   # CPU check of this script

Writes coldstart.json into --out; commit it as benchmarks/coldstart_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import speed

PARTS = speed.COLD_START


def sweep_once(reuse: bool, args: argparse.Namespace, base_dir: Path, data: Path) -> dict:
    import pandas as pd
    import torch

    from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep, run

    name = f"coldstart_{'warm' if reuse else 'cold'}"
    on_gpu = torch.cuda.is_available()
    sweep = Sweep(
        name=name,
        base=BaseModel(str(base_dir), dtype="bfloat16" if on_gpu else "float32"),
        dataset=Dataset(str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), max_length=args.seq),
        space=SearchSpace(
            ranks=(args.rank,),
            alpha_over_rank=(2.0,),
            targets=("all-linear",),
            variants=("lora",),
            lr=(5e-5, 2e-4),
            lr_grid_points=args.trials,
        ),
        budget=Budget(max_steps=args.steps, eval_every=args.steps, grace_period=args.steps, batch_size=args.bs),
        resources=Resources(gpus_per_worker=1 if on_gpu else 0, cpus_per_worker=1, reuse_workers=reuse),
        search="grid",
        num_samples=1,
        max_concurrent_trials=1,
        seed=0,
        output_dir=str(args.work / "reports"),
        tracking_uri="off",
    )
    start = time.perf_counter()
    run(sweep, fresh=True)
    wall = time.perf_counter() - start
    frame = pd.read_parquet(Path(sweep.output_dir) / name / "trials.parquet").sort_values("trial_id")
    trials = []
    for t in frame.itertuples():
        trials.append(
            {
                "status": t.status,
                "trial_s": round(float(t.trial_s), 2),
                "train_s": round(float(t.train_s), 2),
                "cold_start_fraction": round(1 - float(t.train_s) / float(t.trial_s), 3) if t.trial_s else None,
                **{k: round(float(getattr(t, k)), 2) for k in PARTS},
                "base_reused": bool(t.base_reused),
                "steady_tokens_per_s": round(float(t.steady_tokens_per_s))
                if t.steady_tokens_per_s == t.steady_tokens_per_s
                else None,
            }
        )
    trial_s = sum(t["trial_s"] for t in trials)
    train_s = sum(t["train_s"] for t in trials)
    return {
        "reuse_workers": reuse,
        "sweep_wall_s": round(wall, 1),
        "trial_s_total": round(trial_s, 1),
        "train_s_total": round(train_s, 1),
        "cold_start_fraction": round(1 - train_s / trial_s, 3) if trial_s else None,
        "trials": trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora_search_coldstart"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora_search_coldstart_work"))
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()

    import random_base
    import torch
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = random_base.build(args.shape, args.work / f"base_{args.shape}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = args.work / f"data_{args.seq}_{args.bs}"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "train.jsonl").exists():
        speed.write_rows(data / "train.jsonl", tokenizer, args.seq, args.bs * (args.steps + 2), 0)
        speed.write_rows(data / "eval.jsonl", tokenizer, args.seq, args.bs, 1)
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "shape": args.shape,
        "rank": args.rank,
        "seq": args.seq,
        "bs": args.bs,
        "steps": args.steps,
        "trials": args.trials,
        "sweeps": [],
    }
    # The worker-group sweep first: it pays the page cache's first read of the base, not the warm one.
    for reuse in (False, True):
        result["sweeps"].append(sweep_once(reuse, args, base_dir, data))
        (args.out / "coldstart.json").write_text(json.dumps(result, indent=1) + "\n")
    cold, warm = result["sweeps"]
    result["ratio_trial_s"] = round(cold["trial_s_total"] / warm["trial_s_total"], 2)
    result["ratio_sweep_wall_s"] = round(cold["sweep_wall_s"] / warm["sweep_wall_s"], 2)
    (args.out / "coldstart.json").write_text(json.dumps(result, indent=1) + "\n")
    shape = f"{args.shape} r{args.rank}, {args.steps} steps of {args.bs}x{args.seq}"
    print(f"\n{result['device']}: {args.trials} trials of {shape}")
    for s in result["sweeps"]:
        mode = "warm (reuse_workers=True)" if s["reuse_workers"] else "worker group per trial"
        print(
            f"{mode}: sweep {s['sweep_wall_s']} s, trials {s['trial_s_total']} s, of which training "
            f"{s['train_s_total']} s: cold start {s['cold_start_fraction']} of trial time"
        )
        for t in s["trials"]:
            parts = ", ".join(f"{k} {t[k]}" for k in PARTS)
            print(f"   trial {t['trial_s']} s ({t['cold_start_fraction']} cold): {parts}, base kept {t['base_reused']}")
    print(f"ratio: trial time x{result['ratio_trial_s']}, sweep wall time x{result['ratio_sweep_wall_s']}")


if __name__ == "__main__":
    main()
