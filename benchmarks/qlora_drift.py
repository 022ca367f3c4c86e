"""QLoRA / LoftQ merge drift on the real model (issue 25 item 3): how far an adapter trained on the NF4 base moves when
it is merged for export.

    python benchmarks/qlora_drift.py --out DIR            # a CUDA machine with bitsandbytes (~3 min on one H200)
    python benchmarks/qlora_drift.py --smoke --out DIR    # this CPU: the control flow, the 4-bit parts skipped

1. One sweep of two trials at once, sweeps/smollm2.py's GPU budget cut to MAX_STEPS: qlora and loftq, r16 alpha 32
   all-linear, lr 2e-4 (the geometric mean of 1e-4 and 4e-4), no pruning (grace period = max steps).
2. Each completed adapter, scored on the sweep's golden sets (`lora_search.evals.score`, the lm-eval path the trials
   use, GOLDEN_LIMIT rows a task, stderr included) three ways:
     unmerged        the adapter on the NF4 base, as it trained (the reference)
     merged_dequant  merged into the NF4 base dequantized to bf16 (`merge_and_unload`)
     merged_bf16     merged into the original bf16 base (the converted GGUF dir loaded in bf16)
   and the max |logit difference| of each merge against `unmerged` on the first PROBE_PROMPTS golden prompts.
3. One JSON, `qlora_drift_<gpu>_<date>.json` in --out, written again after every part: a part that fails records its
   error and the rest go on, and a run cut short by a timeout leaves what it had. The export pick per adapter: the
   merge whose golden scores are closest to `unmerged` (sum of |difference| over the golden metrics), a tie going to
   the plain bf16 merge (it needs neither bitsandbytes nor the 4-bit base).

--smoke (no CUDA): SMOLLM2_MODE=smoke's sweep (2 steps, 2 golden rows a task), variant lora in place of the 4-bit
ones; `unmerged` is the adapter on the fp32 base, `merged_dequant` is skipped with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MAX_STEPS = 150  # of sweeps/smollm2.py's 300: ~13 s a 4-bit trial on an H200 (smollm2_h200_2026-12-04.json)
GOLDEN_LIMIT = 100  # rows a golden task, of 300: each task's stderr is ~0.05 at 100 rows rather than ~0.03 at 300
PROBE_PROMPTS = 4
GPU_SHARE = 0.3  # two trials and the sweep's base scoring (a third share) on one GPU at once; 0.5 would queue one
WAYS = ("unmerged", "merged_dequant", "merged_bf16")
TIE = 1e-9


def sweep_for(smoke: bool) -> Any:
    """The two-trial drift sweep on sweeps/smollm2.py's base, data, golden sets and budget (steps cut)."""
    if smoke:
        os.environ["SMOLLM2_MODE"] = "smoke"
    from lora_search import SearchSpace
    from lora_search.cli import load_sweep

    sweep, problems = load_sweep(ROOT / "sweeps" / "smollm2.py")
    assert not problems, problems
    assert sweep.evals is not None
    space = SearchSpace(
        ranks=(16,),
        alpha_over_rank=(2.0,),  # alpha 32
        targets=("all-linear",),
        variants=("lora",) if smoke else ("qlora", "loftq"),
        lr=(1e-4, 4e-4),
        lr_grid_points=1,  # 2e-4
    )
    if smoke:
        return sweep.replace(
            name="smollm2-qlora-drift-smoke", space=space, search="grid", num_samples=1, tracking_uri="off"
        )
    steps = min(MAX_STEPS, sweep.budget.max_steps)
    budget = dataclasses.replace(sweep.budget, max_steps=steps, grace_period=steps, eval_every=50)
    resources = dataclasses.replace(sweep.resources, gpus_per_worker=GPU_SHARE)
    evals = dataclasses.replace(sweep.evals, limit=GOLDEN_LIMIT)
    return sweep.replace(
        name="smollm2-qlora-drift",
        space=space,
        search="grid",
        num_samples=1,
        budget=budget,
        resources=resources,
        evals=evals,
        tracking_uri="off",
    )


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "peft", "bitsandbytes", "transformers", "lm_eval", "ray"):
        try:
            out[name] = metadata.version(name if name != "lm_eval" else "lm-eval")
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def probe_prompts(evals: Any, tokenizer: Any) -> list[Any]:
    path = ROOT / "evals" / "golden" / "smollm2_dates.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:PROBE_PROMPTS]]
    return [tokenizer(r["prompt"], return_tensors="pt")["input_ids"] for r in rows]


def logits(model: Any, prompts: list[Any], bf16: bool) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for ids in prompts:
            out.append(model(input_ids=ids.to(device)).logits.float().cpu())
    return out


def max_diff(a: list[Any], b: list[Any]) -> dict[str, Any]:
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    scale = max(float(x.abs().max()) for x in a)
    same = all(bool((x[:, -1].argmax(-1) == y[:, -1].argmax(-1)).all()) for x, y in zip(a, b, strict=True))
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "same_next_token": same}


def dequantize(model: Any) -> tuple[Any, str]:
    """Replace every bitsandbytes Linear4bit by a bf16 nn.Linear holding its dequantized weight; returns the model and
    the method."""
    import torch

    try:
        model = model.dequantize(dtype=torch.bfloat16) or model
        method = "transformers PreTrainedModel.dequantize(dtype=bfloat16)"
    except Exception as e:  # older/newer transformers without it for bnb: do it by hand
        import bitsandbytes as bnb

        method = f"by hand, bnb.functional.dequantize_4bit (dequantize() failed: {type(e).__name__}: {e})"
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear = linear.to(device=weight.device, dtype=torch.bfloat16)
                linear.weight.data.copy_(weight.to(torch.bfloat16))
                if module.bias is not None:
                    linear.bias.data.copy_(module.bias.data.to(torch.bfloat16))
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    import bitsandbytes as bnb

    left = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if left:
        raise RuntimeError(f"{left} Linear4bit module(s) left after dequantizing ({method})")
    dtypes = sorted({str(m.weight.dtype) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    return model, f"{method}; nn.Linear weight dtypes after: {', '.join(dtypes)}"


def load_way(way: str, base_dir: str, adapter_dir: str, on_gpu: bool, base_dtype: str) -> tuple[Any, dict[str, Any]]:
    """The model one way builds, and notes on how."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_search.variants import quantization_config

    kwargs: dict[str, Any] = {"device_map": {"": 0}} if on_gpu else {}
    notes: dict[str, Any] = {}
    if way in ("unmerged", "merged_dequant") and on_gpu:
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=quantization_config(), dtype=torch.bfloat16, **kwargs
        )
        notes["base"] = "NF4 double-quant, bf16 compute (lora_search.variants.quantization_config)"
        if way == "merged_dequant":
            base, notes["dequantize"] = dequantize(base)
            notes["base"] += ", dequantized to bf16"
    else:
        dtype = torch.bfloat16 if on_gpu else getattr(torch, base_dtype)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, **kwargs)
        notes["base"] = f"original converted base in {dtype}"
    model = PeftModel.from_pretrained(base, adapter_dir)
    if way != "unmerged":
        model = model.merge_and_unload()
        notes["merged"] = "merge_and_unload"
    model.eval()
    return model, notes


def pick(ways: dict[str, Any]) -> dict[str, Any]:
    """The merge to export: golden scores closest to the unmerged adapter's, a tie going to the plain bf16 merge."""
    ref = ways.get("unmerged", {}).get("golden")
    if not ref:
        return {"pick": None, "why": "no scores of the unmerged adapter to compare against"}
    distance = {}
    for way in ("merged_bf16", "merged_dequant"):  # bf16 first: min() keeps the first of equals
        golden = ways.get(way, {}).get("golden")
        if golden:
            distance[way] = sum(abs(golden[k]["value"] - ref[k]["value"]) for k in ref if k in golden)
    if not distance:
        return {"pick": None, "why": "no merge was scored"}
    best = min(distance, key=lambda w: distance[w] - (TIE if w == "merged_bf16" else 0))
    tied = len(distance) == 2 and abs(distance["merged_bf16"] - distance["merged_dequant"]) <= TIE
    stderr = max((ref[k]["stderr"] for k in ref if not math.isnan(ref[k]["stderr"])), default=math.nan)
    why = (
        f"sum |golden - unmerged| over {len(ref)} metric(s): "
        + ", ".join(f"{w} {d:.4f}" for w, d in distance.items())
        + ("; tied, so the plain bf16 merge (no bitsandbytes or 4-bit base needed)" if tied else f"; {best} closest")
        + (f"; largest unmerged stderr {stderr:.4f}" if not math.isnan(stderr) else "")
        + (
            " (the gap between the merges is within it)"
            if not tied and len(distance) == 2 and abs(distance["merged_bf16"] - distance["merged_dequant"]) < stderr
            else ""
        )
    )
    return {"pick": best, "distance": distance, "tied": tied, "why": why}


def guarded(part: dict[str, Any], save: Callable[[], None], fn: Callable[[], Any]) -> Any:
    """Run one part; on failure record its error in `part` and go on. Saves the record either way."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as e:
        part["error"] = f"{type(e).__name__}: {e}"
        part["traceback"] = traceback.format_exc()[-3000:]
        print(f"part failed: {part['error']}", flush=True)
        return None
    finally:
        part["seconds"] = round(time.perf_counter() - start, 2)
        save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU: smoke sweep, lora in place of the 4-bit variants")
    args = parser.parse_args()

    import torch

    on_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    date = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"qlora_drift_{device.split()[-1].lower()}{'_smoke' if args.smoke else ''}_{date}.json"
    record: dict[str, Any] = {
        "what": "QLoRA/LoftQ merge drift on SmolLM2-135M-Instruct (issue 25 item 3): golden scores and logits of each "
        "adapter unmerged on the NF4 base, merged into the dequantized NF4 base, merged into the original bf16 base",
        "device": device,
        "date": date,
        "smoke": args.smoke,
        "versions": versions(),
        "parts": {},
        "adapters": {},
    }

    def save() -> None:
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")

    if not on_gpu:
        record["note"] = (
            "no CUDA (or --smoke): the 4-bit parts need bitsandbytes on CUDA; variant lora stands in for qlora/loftq, "
            "`unmerged` is on the float base and `merged_dequant` is skipped"
        )
    setup: dict[str, Any] = record["parts"].setdefault("setup", {})
    sweep = guarded(setup, save, lambda: sweep_for(args.smoke))
    if sweep is None:
        return print(f"wrote {path}")
    record["sweep"] = {
        "name": sweep.name,
        "variants": list(sweep.space.variants),
        "rank": 16,
        "alpha": 32,
        "targets": "all-linear",
        "lr": math.sqrt(1e-4 * 4e-4),
        "max_steps": sweep.budget.max_steps,
        "max_steps_why": f"{MAX_STEPS} of sweeps/smollm2.py's 300 to fit ~200 s of GPU" if not args.smoke else "smoke",
        "batch_size": sweep.budget.batch_size,
        "gpus_per_worker": sweep.resources.gpus_per_worker,
        "golden_tasks": list(sweep.evals.tasks),
        "golden_limit": sweep.evals.limit,
        "golden_limit_why": "rows a task, to fit the time; stderr reported with every score",
    }

    def train() -> Any:
        import pandas as pd

        from lora_search import run
        from lora_search.layout import TRIALS_FILE
        from lora_search.sweep import SweepExistsError, sweep_dir

        try:
            run(sweep)
        except SweepExistsError as e:  # an earlier run's adapters: reuse them
            print(e, flush=True)
            record["parts"]["train"]["reused"] = str(e)
        out = sweep_dir(sweep)
        base_scores = out / "base_scores.json"
        if base_scores.is_file():
            metrics = json.loads(base_scores.read_text()).get("metrics", {})
            record["base_golden"] = {
                k: {"value": v, "stderr": metrics.get(f"{k}_stderr", math.nan)}
                for k, v in metrics.items()
                if not k.endswith("_stderr")
            }
        return pd.read_parquet(out / TRIALS_FILE)

    trials = guarded(record["parts"].setdefault("train", {}), save, train)
    if trials is None:
        return print(f"wrote {path}")
    golden_keys = sorted(k for k in trials.columns if "/" in k and not k.endswith("_stderr"))
    for row in trials.to_dict("records"):
        name = row["variant"]
        entry = record["adapters"].setdefault(
            name,
            {
                "trial_id": row["trial_id"],
                "status": row["status"],
                "step": int(row["step"]),
                "adapter_path": row["adapter_path"],
                "trial_golden": {
                    k: {"value": float(row[k]), "stderr": float(row.get(f"{k}_stderr", math.nan))} for k in golden_keys
                },
                "trial_device_s": float(row.get("device_s", math.nan)),
                "ways": {},
            },
        )
        error = row.get("error")
        if isinstance(error, str) and error:
            entry["error"] = error[:2000]
    save()

    from transformers import AutoTokenizer

    from lora_search.evals import score
    from lora_search.gguf import resolve

    base = resolve(sweep.base)
    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path)
    prompts = probe_prompts(sweep.evals, tokenizer)
    for name, entry in record["adapters"].items():
        if entry["status"] != "completed" or not entry["adapter_path"]:
            entry["skipped"] = f"trial {entry['status']}: no adapter to score"
            continue
        reference: list[Any] | None = None
        for way in WAYS:
            part: dict[str, Any] = entry["ways"].setdefault(way, {})
            if way == "merged_dequant" and not on_gpu:
                part["skipped"] = "needs bitsandbytes NF4 on CUDA"
                continue

            def one(way: str = way, part: dict[str, Any] = part, adapter: str = entry["adapter_path"]) -> None:
                nonlocal reference
                model, notes = load_way(way, base.name_or_path, adapter, on_gpu, base.dtype)
                part.update(notes)
                got = logits(model, prompts, on_gpu)
                if way == "unmerged":
                    reference = got
                elif reference is not None:
                    part["logits_vs_unmerged"] = max_diff(reference, got)
                    part["logits_vs_unmerged"]["prompts"] = len(prompts)
                save()
                scored = score(model, tokenizer, sweep.evals, sweep.seed, autocast_bf16=on_gpu)
                metrics = scored["metrics"]
                part["golden"] = {
                    k: {"value": v, "stderr": metrics.get(f"{k}_stderr", math.nan)}
                    for k, v in metrics.items()
                    if not k.endswith("_stderr")
                }
                del model
                if on_gpu:
                    torch.cuda.empty_cache()

            guarded(part, save, one)
            print(f"{name} {way}: {part.get('golden', part.get('error'))}", flush=True)
        entry["export"] = pick(entry["ways"])
        save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
