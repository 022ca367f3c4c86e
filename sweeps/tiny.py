"""The demo: a LoRA sweep on lora_search's own tiny Llama, on a laptop CPU, in a few minutes.

Run:  python sweeps/tiny.py                 (or: lora-search run sweeps/tiny.py)
On a running Ray cluster:  ray job submit --working-dir . -- python sweeps/tiny.py

The base model (a ~4M-parameter Llama and its tokenizer) is built and pretrained here on first use and cached
(lora_search/demo_base.py). The task, in data/tiny/, is one the base cannot do before adaptation: name the
mood of a sentence and give the antonym of its adjective. 18 trials over 7 variants and 4 ranks; ASHA on
eval loss prunes the weak ones at steps 50 and 150 of 200. Completed trials and the base model are scored
on two held-out golden sets with lm-eval (evals/tasks/tiny_mood.yaml: multiple choice; tiny_antonym.yaml:
greedy generation, exact match).
"""

from pathlib import Path

from lora_search import BaseModel, Budget, Dataset, Evals, Resources, SearchSpace, Sweep, build_tiny_base, main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny"

BASE = BaseModel(str(build_tiny_base()), dtype="float32")  # float32: fastest and exact on a CPU

SPACE = SearchSpace(
    ranks=(2, 4, 8, 16),
    alpha_over_rank=(1.0, 2.0),
    targets=("attention", "attention-all", "mlp", "all-linear"),
    variants=("lora", "rslora", "dora", "pissa", "loraplus", "adalora", "vera"),
    lr=(1e-4, 3e-3),
)

SWEEP = Sweep(
    name="tiny",
    base=BASE,
    dataset=Dataset(str(DATA / "train.jsonl"), eval_path=str(DATA / "eval.jsonl"), max_length=96),
    space=SPACE,
    # 200 steps x 16 rows: about 1.5 passes over the 2000 training rows.
    budget=Budget(max_steps=200, eval_every=25, grace_period=50, reduction_factor=3, batch_size=16),
    resources=Resources(workers=1, cpus_per_worker=1),
    search="random",
    num_samples=18,
    seed=0,
    # Golden sets (lm-eval tasks in evals/tasks): every completed trial and the base are scored on them.
    evals=Evals(
        tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(ROOT / "evals" / "tasks")
    ),
)

if __name__ == "__main__":
    main(SWEEP)
