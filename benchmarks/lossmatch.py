"""The fast trial path's loss curve against the plain TRL + PEFT path's, on a real run on the GPU machine.

Ours: a one-trial sweep, the trial path every sweep runs (warm trial process, Liger, no pad mask, few syncs,
merged micro-batches, bf16 adapter inputs, fused LoRA add: whatever `lora_search.fastpath` picks there). Reference:
TRL's SFTTrainer on the PEFT model as TRL and Transformers give it (masked batches, Hugging Face's kernels, the step's
micro-batches accumulated one by one), with the same base, adapter config and init, data, order, learning-rate
schedule, optimizer and bf16 autocast. Both evaluate the same eval set every `--eval-every` steps; the check passes
when every eval loss (step 0 included) and every logged training loss agree within `--tolerance` (relative) and the
run learned (the last eval loss at least 1% under the base's, so that the curves compared move).

    python benchmarks/lossmatch.py --out "$OUT"                                       # GPU: 1.1B shape
    python benchmarks/lossmatch.py --out /tmp/lm --shape tiny --seq 128 --steps 12    # CPU check of this script

Writes lossmatch.json into --out; exits 1 when the curves disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import speed

LR = 1e-3


def ours(args: argparse.Namespace, base_dir: Path, data: Path) -> dict:
    import pandas as pd
    import torch

    from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep, run

    on_gpu = torch.cuda.is_available()
    sweep = Sweep(
        name="lossmatch",
        base=BaseModel(str(base_dir), dtype="bfloat16" if on_gpu else "float32"),
        dataset=Dataset(str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), max_length=args.seq),
        space=SearchSpace(
            ranks=(args.rank,),
            alpha_over_rank=(2.0,),
            targets=("all-linear",),
            variants=("lora",),
            lr=(LR, LR * 1.0001),
            lr_grid_points=1,
        ),
        budget=Budget(
            max_steps=args.steps,
            eval_every=args.eval_every,
            grace_period=args.steps,
            batch_size=args.bs,
            grad_accum=args.accum,
        ),
        resources=Resources(gpus_per_worker=1 if on_gpu else 0, cpus_per_worker=1),
        search="grid",
        num_samples=1,
        seed=0,
        output_dir=str(args.work / "reports"),
        tracking_uri="off",
    )
    run(sweep, fresh=True)
    out = Path(sweep.output_dir) / "lossmatch"
    trial = pd.read_parquet(out / "trials.parquet").iloc[0]
    history = pd.read_parquet(out / "history.parquet").sort_values("step")
    evals = {0: float(trial.base_eval_loss), **{int(h.step): float(h.eval_loss) for h in history.itertuples()}}
    train = {int(h.step): float(h.train_loss) for h in history.itertuples()}
    return {"eval": evals, "train": train, "fast_path": trial.fast_path, "lr": float(trial.lr), "status": trial.status}


def reference(args: argparse.Namespace, base_dir: Path, data: Path, lr: float) -> dict:
    """TRL + PEFT as they come, on the trial's own data split, adapter config and seeds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_search import Dataset, variants
    from lora_search import data as lsdata
    from lora_search.records import TrialParams
    from lora_search.train import build_adapter

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    params = TrialParams("lora", args.rank, 2.0 * args.rank, "all-linear", lr, 0.0)
    adapter = build_adapter(model, params, args.steps)
    torch.manual_seed(0)  # as the trial does after loading its base: the adapter's init draws the same numbers
    model = variants.attach(model, adapter)
    dataset = Dataset(str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), max_length=args.seq)
    train_ds, eval_ds = lsdata.load(dataset, 0)

    class Log(TrainerCallback):
        def __init__(self) -> None:
            self.eval: dict[int, float] = {}
            self.train: dict[int, float] = {}

        def on_log(self, a, state, control, logs=None, **kw) -> None:
            if logs and "eval_loss" in logs:
                self.eval[state.global_step] = float(logs["eval_loss"])
            if logs and "loss" in logs:
                self.train[state.global_step] = float(logs["loss"])

    log = Log()
    config = SFTConfig(
        output_dir=str(args.work / "reference"),
        max_steps=args.steps,
        per_device_train_batch_size=args.bs,
        per_device_eval_batch_size=args.bs * 2,
        gradient_accumulation_steps=args.accum,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        eval_strategy="steps",
        eval_steps=args.eval_every,
        eval_on_start=True,
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        max_length=args.seq,
        use_cpu=not on_gpu,
        bf16=on_gpu,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[log],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"eval": log.eval, "train": log.train}


def compare(mine: dict[int, float], ref: dict[int, float]) -> tuple[float, list[int]]:
    steps = sorted(set(mine) & set(ref))
    worst = max((abs(mine[s] - ref[s]) / max(1.0, abs(ref[s])) for s in steps), default=float("inf"))
    return worst, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora_search_lossmatch"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora_search_lossmatch_work"))
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative, per loss")
    args = parser.parse_args()

    import random_base
    import torch
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = random_base.build(args.shape, args.work / f"base_{args.shape}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = args.work / f"data_{args.seq}_{args.bs * args.accum}"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "train.jsonl").exists():
        speed.write_rows(data / "train.jsonl", tokenizer, args.seq, args.bs * args.accum * (args.steps + 2), 0)
        speed.write_rows(data / "eval.jsonl", tokenizer, args.seq, args.bs * 4, 1)
    mine = ours(args, base_dir, data)
    ref = reference(args, base_dir, data, mine["lr"])
    eval_diff, eval_steps = compare(mine["eval"], ref["eval"])
    train_diff, train_steps = compare(mine["train"], ref["train"])
    learned = mine["eval"][max(mine["eval"])] < 0.99 * mine["eval"][0]
    passed = learned and eval_diff <= args.tolerance and train_diff <= args.tolerance and len(eval_steps) >= 2
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        **{k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "lora_search": mine,
        "reference": ref,
        "max_relative_diff_eval": round(eval_diff, 5),
        "max_relative_diff_train": round(train_diff, 5),
        "learned": learned,
        "passed": passed,
    }
    (args.out / "lossmatch.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}: {args.shape} r{args.rank}, {args.steps} steps of {args.bs}x{args.accum}x{args.seq}")
    print(f"fast path: {mine['fast_path']}")
    for what, steps in (("eval", eval_steps), ("train", train_steps)):
        for s in steps:
            a, b = mine[what][s], ref[what][s]
            print(
                f"  {what} step {s:>4}: lora_search {a:.5f}  TRL+PEFT {b:.5f}  rel diff {abs(a - b) / max(1.0, b):.2e}"
            )
    print(
        f"max relative difference: eval {eval_diff:.2e}, train {train_diff:.2e} (tolerance {args.tolerance}); "
        f"learned {learned}: {'PASSED' if passed else 'FAILED'}"
    )
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
