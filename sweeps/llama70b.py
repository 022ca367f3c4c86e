"""LoRA sweep on Llama-3.1-70B: 8 GPUs per trial, ASHA on eval loss, bf16 LoRA variants against QLoRA.

Run:   ray job submit --working-dir . -- python sweeps/llama70b.py
Plan:  python sweeps/llama70b.py --dry-run --gpus 64        (trials, memory per GPU, GPU-hours, cost; no Ray, no GPU)
       lora-search plan sweeps/llama70b.py --gpus 64 --nodes 8
Check: python sweeps/llama70b.py --validate                 (reads the model config and data; starts nothing)

The base is gated on the hub: accept Meta's licence and set HF_TOKEN on the cluster, or point LLAMA70B_PATH at a
local copy (config.json, tokenizer, safetensors) that every node can read. Read the dry run first: the bf16 base
(131 GiB) fits no GPU whole, so bf16 trials shard it over their 8 GPUs with FSDP (16.4 GiB each); qlora's NF4 base
(~37 GiB) fits one GPU, so its trials run plain DDP and skip the sharding traffic.
"""

import os
from pathlib import Path

from lora_search import BaseModel, Budget, Dataset, Evals, Pricing, Resources, SearchSpace, Sweep, main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny"

BASE = BaseModel(
    os.environ.get("LLAMA70B_PATH", "meta-llama/Llama-3.1-70B"),
    revision=None,  # pin a commit of the hub repo (revision="<40 hex>") so reruns train the same weights
    dtype="bfloat16",  # 70.6B params x 2 bytes = 131 GiB; qlora loads the decoder in NF4 instead (~41 GiB)
)
# The hub's config.json alone (no weights): --dry-run plans from it offline; `lora-search plan` finds it by name.
ARCHITECTURE = ROOT / "sweeps" / "configs" / "llama-3.1-70b"

SPACE = SearchSpace(
    ranks=(8, 16, 64),
    alpha_over_rank=(1.0, 2.0),
    targets=("attention", "all-linear"),  # q,v only (16.4M params at r=8) or every decoder linear (103.5M at r=8)
    variants=("qlora", "lora", "dora", "rslora"),
    lr=(1e-5, 3e-4),
)

SWEEP = Sweep(
    name="llama70b",
    base=BASE,
    # Placeholder: the demo's rows. Point these at your own chat or instruction JSONL (or a hub dataset id).
    dataset=Dataset(str(DATA / "train.jsonl"), eval_path=str(DATA / "eval.jsonl"), max_length=2048),
    space=SPACE,
    # A step is 1 sequence x 16 accumulated x 2048 tokens x 8 workers = 262,144 tokens; 1000 steps = 262M tokens.
    # Rungs at 200 and 600 (200 x 3): ASHA's expected 200 + 400/3 + 400/9 = 378 steps per trial, 38% of the grid.
    budget=Budget(
        max_steps=1000,
        eval_every=100,
        grace_period=200,
        reduction_factor=3,
        batch_size=1,
        grad_accum=16,
        warmup_steps=50,
    ),
    # One 8-GPU node per trial: PACK keeps the 8 workers on one node's NVLink, where FSDP's per-layer all-gathers
    # (1.6 GiB of bf16 weights a layer) run at NVLink rather than network speed.
    resources=Resources(
        workers=8,
        gpus_per_worker=1,
        cpus_per_worker=8,
        placement="PACK",
        strategy="fsdp",
        strategy_by_variant={"qlora": "ddp"},
    ),
    search="random",
    num_samples=24,  # random draws over 48 combinations (4 variants x 3 ranks x 2 targets x 2 alpha ratios) and lr
    seed=0,
    # Golden sets: the shipped demo tasks stand in; add your own lm-eval YAML to evals/tasks (data in evals/golden)
    # and name those tasks and the objective here.
    evals=Evals(
        tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(ROOT / "evals" / "tasks")
    ),
    # USD per GPU-hour, on-demand placeholders: set what you pay. A full trial takes ~7.3 h at MFU 0.35 and
    # ~12 h at the 0.22 measured for LoRA on one H100 (see `plan` in lora_search/plan.py); the hypervolume's
    # cost reference sits above both.
    pricing=Pricing(gpu_hour={"H100": 2.50, "H200": 3.50}, reference_trial_hours=16.0),
)

if __name__ == "__main__":
    main(SWEEP, config_dir=ARCHITECTURE)
