"""LoRA sweep on Llama-3.1-8B: 1 GPU per trial, ASHA on eval loss, bf16 LoRA variants against QLoRA.

Run:   ray job submit --working-dir . -- python sweeps/llama8b.py
Plan:  python sweeps/llama8b.py --dry-run --gpus 8          (trials, memory per GPU, GPU-hours, cost; no Ray, no GPU)
       lora-search plan sweeps/llama8b.py --gpus 8
Check: python sweeps/llama8b.py --validate                  (reads the model config and data; starts nothing)

The base is gated on the hub: accept Meta's licence and set HF_TOKEN on the cluster, or point LLAMA8B_PATH at a
local copy (config.json, tokenizer, safetensors) that every node can read.
"""

import os
from pathlib import Path

from lora_search import BaseModel, Budget, Dataset, Evals, Pricing, Resources, SearchSpace, Sweep, main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny"

BASE = BaseModel(
    os.environ.get("LLAMA8B_PATH", "meta-llama/Llama-3.1-8B"),
    revision=None,  # pin a commit of the hub repo (revision="<40 hex>") so reruns train the same weights
    dtype="bfloat16",  # 8.03B params x 2 bytes = 15 GiB; qlora loads the decoder in NF4 instead (~7.3 GiB)
)
# The hub's config.json alone (no weights): --dry-run plans from it offline; `lora-search plan` finds it by name.
ARCHITECTURE = ROOT / "sweeps" / "configs" / "llama-3.1-8b"

SPACE = SearchSpace(
    ranks=(8, 16, 64),
    alpha_over_rank=(1.0, 2.0),
    targets=("attention", "all-linear"),  # q,v only (3.4M params at r=8) or every decoder linear (21.0M at r=8)
    variants=("qlora", "lora", "dora", "rslora"),
    lr=(1e-5, 3e-4),
)

SWEEP = Sweep(
    name="llama8b",
    base=BASE,
    # Placeholder: the demo's rows. Point these at your own chat or instruction JSONL (or a hub dataset id).
    dataset=Dataset(str(DATA / "train.jsonl"), eval_path=str(DATA / "eval.jsonl"), max_length=2048),
    space=SPACE,
    # A step is 4 sequences x 8 accumulated x 2048 tokens x 1 worker = 65,536 tokens; 1000 steps = 66M tokens.
    # Rungs at 100, 300, 900: ASHA's expected 100 + 200/3 + 600/9 + 100/27 = 237 steps per trial, 24% of the grid.
    budget=Budget(
        max_steps=1000,
        eval_every=50,
        grace_period=100,
        reduction_factor=3,
        batch_size=4,
        grad_accum=8,
        warmup_steps=50,
    ),
    # One GPU per trial: 8 trials at once on an 8-GPU node, and no gradient all-reduce to wait on.
    resources=Resources(workers=1, gpus_per_worker=1, cpus_per_worker=8, placement="PACK"),
    search="random",
    num_samples=32,  # random draws over 48 combinations (4 variants x 3 ranks x 2 targets x 2 alpha ratios) and lr
    seed=0,
    # Golden sets: the shipped demo tasks stand in; add your own lm-eval YAML to evals/tasks (data in evals/golden)
    # and name those tasks and the objective here.
    evals=Evals(
        tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(ROOT / "evals" / "tasks")
    ),
    # USD per GPU-hour, on-demand placeholders: set what you pay. A full trial takes ~1.6 h at MFU 0.35 and
    # ~2.5 h at the 0.22 measured for LoRA on one H100 (see `plan` in lora_search/plan.py); the hypervolume's
    # cost reference sits above both.
    pricing=Pricing(gpu_hour={"H100": 2.50, "H200": 3.50}, reference_trial_hours=4.0),
)

if __name__ == "__main__":
    main(SWEEP, config_dir=ARCHITECTURE)
