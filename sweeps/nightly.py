"""The nightly regression sweep: small, pinned, and compared with a baseline every night.

Run:  lora-search nightly sweeps/nightly.py --baseline mlflow            (exit 1 on a regression)
      lora-search nightly sweeps/nightly.py --baseline mlflow --promote  (a passing run becomes the baseline)
On a cluster: cluster/nightly-cronjob.yaml (Kubernetes CronJob -> KubeRay RayJob) or cluster/nightly.cron.

Everything that could drift is pinned: the base (built from a hashed recipe, lora_search/demo_base.py), the data
(data/tiny/), the eval tasks (evals/tasks/, versioned), the seed and the sampled configs (random search, seed 0).
Four trials of 100 steps: a few minutes on a laptop CPU. ASHA prunes at step 50, so cost and pruning are
exercised too.
"""

from pathlib import Path

from lora_search import BaseModel, Budget, Dataset, Evals, Resources, SearchSpace, Sweep, build_tiny_base, main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny"

SWEEP = Sweep(
    name="nightly",
    base=BaseModel(str(build_tiny_base()), dtype="float32"),
    dataset=Dataset(str(DATA / "train.jsonl"), eval_path=str(DATA / "eval.jsonl"), max_length=96),
    space=SearchSpace(
        ranks=(4, 8),
        alpha_over_rank=(2.0,),
        targets=("attention-all", "all-linear"),
        variants=("lora", "dora"),
        lr=(1e-3, 3e-3),
    ),
    budget=Budget(max_steps=100, eval_every=25, grace_period=50, reduction_factor=2, batch_size=16),
    resources=Resources(workers=1, cpus_per_worker=1),
    search="random",
    num_samples=4,
    seed=0,
    evals=Evals(
        tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(ROOT / "evals" / "tasks")
    ),
)

if __name__ == "__main__":
    main(SWEEP)
