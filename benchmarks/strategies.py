"""GPU run of the distributed trial paths: one real sweep (Ray Tune + ASHA + Ray Train) whose trials train a
1.1B-parameter Llama-architecture base under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, and QLoRA (NF4) under FSDP and
DDP, each trial using every GPU of the machine. Then every saved adapter is reloaded with plain PEFT onto a fresh
base and its probe logits compared with the trial's, and the GPU memory timeline shows whether a pruned trial's
memory is back before the next trial starts.

Run on the GPU machine (see ../shared/device/README.md for carrying Ray, TRL, DeepSpeed and bitsandbytes):
    python benchmarks/strategies.py --out "$OUT"
Writes NAME.json (and NAME_gpu_memory.csv) into --out; commit the JSON as benchmarks/NAME_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STRATEGY_OF = {  # the default trials: one per variant, each under the strategy it exercises
    "lora": "fsdp",
    "rslora": "deepspeed-zero2",
    "qlora": "fsdp",  # FSDP-QLoRA: NF4 weights stored as bf16 so FSDP can shard them
    "dora": "deepspeed-zero3",
}


class GpuSampler(threading.Thread):
    """Samples NVML's memory.used of every GPU every `period` s: the timeline trials start and end on."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.rows, self.stop = period, [], threading.Event()

    def run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no NVIDIA driver (a CPU check of this script): no timeline
            return
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self.stop.is_set():
            now = time.time()
            for index, handle in enumerate(handles):
                self.rows.append((now, index, pynvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20))
            self.stop.wait(self.period)

    def used_at(self, t: float) -> dict[int, int]:
        """MiB in use per GPU at the first sample at or after `t`."""
        out: dict[int, int] = {}
        for when, index, used in self.rows:
            if when >= t and index not in out:
                out[index] = used
        return out


class StallDump(threading.Thread):
    """When no trial has reported for `after` s, dumps every Ray worker's Python stack with py-spy into `out`: a
    stalled collective or a JIT build shows up there, where a killed command would return nothing."""

    def __init__(self, sweep_dir: Path, out: Path, after: float = 150.0) -> None:
        super().__init__(daemon=True)
        self.sweep_dir, self.out, self.after, self.stop = sweep_dir, out, after, threading.Event()
        self.dumps = 0

    def run(self) -> None:
        import subprocess

        import psutil

        last = time.time()
        while not self.stop.wait(10.0):
            stamps = [p.stat().st_mtime for p in self.sweep_dir.glob("ray/*/*/result.json")]
            last = max([last, *stamps])
            if time.time() - last < self.after or self.dumps >= 1:
                continue
            self.dumps += 1
            last = time.time()
            lines = []
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if any(k in cmd for k in ("RayTrainWorker", "ImplicitFunc", "TrainController")) and len(lines) < 6:
                    dump = subprocess.run(
                        ["py-spy", "dump", "--pid", str(proc.info["pid"])], capture_output=True, text=True, timeout=20
                    )
                    lines.append(f"=== pid {proc.info['pid']} {cmd[:200]}\n{dump.stdout}{dump.stderr}")
            dump_file = self.out / f"{self.sweep_dir.name}_stall_{self.dumps}.txt"
            dump_file.write_text("\n".join(lines))
            print(f"[stall] no trial report for {self.after:.0f}s: stacks in {dump_file.name}", flush=True)


def reload_check(adapter_dir: Path, variant: str) -> dict[str, object]:
    """Reload with plain PEFT on a fresh base on the GPU (NF4 for 4-bit variants, as the trial trained): max |logit
    diff| against the trial's own probe logits; every tensor non-empty, every lora_B non-zero."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_search.probe import PROBE_FILE, probe_logits
    from lora_search.registry import read_meta
    from lora_search.variants import VARIANTS, quantization_config

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    zero_b = [k for k, v in tensors.items() if "lora_B" in k and not bool(v.abs().max() > 0)]
    base = read_meta(adapter_dir)["base_name_or_path"]
    kwargs: dict[str, object] = {"dtype": torch.bfloat16, "device_map": {"": 0 if torch.cuda.is_available() else "cpu"}}
    if VARIANTS[variant].quantized:
        kwargs["quantization_config"] = quantization_config()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), str(adapter_dir)).eval()
    saved = load_file(str(adapter_dir / PROBE_FILE))
    probe = [saved[f"input_ids_{i}"][None] for i in range(len(saved) - 1)]
    diff = float((probe_logits(model, probe) - saved["logits"]).abs().max())
    scale = float(saved["logits"].abs().max())
    del model
    torch.cuda.empty_cache()
    return {
        "tensors": len(tensors),
        "empty_tensors": len(empty),
        "zero_lora_B": len(zero_b),
        "reload_max_logit_diff": diff,
        "logit_scale": scale,
    }


def last_reports(sweep_dir: Path) -> list[dict[str, object]]:
    """One row per trial that reported, from its last Tune result: the table of a sweep cut short."""
    out = []
    for result in sweep_dir.glob("ray/*/*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        last, config = rows[-1], rows[-1].get("config", {})
        out.append(
            {
                "trial_id": last["trial_id"],
                "variant": config.get("variant", "?"),
                "lr": config.get("lr", float("nan")),
                "strategy": last.get("strategy", "?"),
                "status": f"cut short at the deadline (last report: step {last.get('step')})",
                "step": last.get("step", 0),
                "tokens_per_s": last.get("tokens_per_s", 0.0),
                "peak_mem_bytes": last.get("peak_mem_bytes", 0),
                "adapter_bytes": last.get("adapter_bytes", 0),
                "trainable_params": last.get("trainable_params", 0),
                "reason": "",
                "adapter_path": "",
            }
        )
    return out


def trial_timestamps(sweep_dir: Path) -> dict[str, tuple[float, float, int]]:
    """trial_id -> (first, last) report timestamp and the GPU bytes in use (all processes) when its worker started,
    from Tune's result.json files."""
    out = {}
    for result in sweep_dir.glob("ray/*/*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = (
                rows[0]["timestamp"],
                rows[-1]["timestamp"],
                int(rows[0].get("gpu_in_use_at_start_bytes", -1)),
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-dir", type=Path, default=Path("/tmp/lora_search_llama_1b"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--trials",
        default=",".join(f"{v}:{s}" for v, s in STRATEGY_OF.items()),
        help="comma-separated VARIANT:STRATEGY pairs, one strategy per variant",
    )
    parser.add_argument(
        "--lr",
        default="4e-4",
        help="comma-separated learning rates, each run for every variant; a tiny second one (1e-7) makes ASHA "
        "prune trials, whose GPU memory hand-over the timeline then shows",
    )
    parser.add_argument("--name", default="gpu_strategies")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora_search_bench"), help="sweep output dir")
    parser.add_argument(
        "--deadline-s", type=float, default=1e9, help="interrupt the sweep this long after the script started"
    )
    parser.add_argument("--stall-s", type=float, default=150.0, help="py-spy dump after this long without a report")
    args = parser.parse_args()
    script_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

    import pandas as pd
    import random_base
    import torch

    from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep, run

    gpus = torch.cuda.device_count()  # 0: a CPU check of the script itself (DDP / DeepSpeed trials only)
    chosen = dict(pair.split(":") for pair in args.trials.split(","))
    lrs = sorted(float(x) for x in args.lr.split(","))
    sampler = GpuSampler()
    sampler.start()
    t_base = time.time()
    base_dir = random_base.build("1b", args.base_dir)
    t_idle = time.time()
    time.sleep(1.0)
    idle = sampler.used_at(t_idle)  # nothing of ours holds the GPUs now (the first sample after t_idle)

    data = ROOT / "data" / "tiny"
    sweep = Sweep(
        name=args.name,
        base=BaseModel(str(base_dir), dtype="bfloat16"),
        dataset=Dataset(str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), max_length=256),
        space=SearchSpace(
            ranks=(16,),
            alpha_over_rank=(2.0,),
            targets=("all-linear",),
            variants=tuple(chosen),
            lr=(lrs[0], lrs[-1]) if len(lrs) > 1 else (lrs[0] / 2, lrs[0] * 2),  # one point: their geometric mean
            lr_grid_points=len(lrs),
        ),
        budget=Budget(
            max_steps=args.steps,
            eval_every=max(1, args.steps // 3),
            grace_period=max(1, args.steps // 3),
            reduction_factor=3,
            batch_size=args.batch,
        ),
        resources=Resources(
            workers=max(gpus, 1),
            gpus_per_worker=1 if gpus else 0,
            cpus_per_worker=2,
            strategy="fsdp" if gpus else "ddp",
            strategy_by_variant={v: s for v, s in chosen.items() if s != ("fsdp" if gpus else "ddp")},
        ),
        search="grid",
        num_samples=1,
        max_concurrent_trials=1,  # one trial at a time on all GPUs: the memory timeline shows each hand-over
        seed=0,
        output_dir=str(args.work / "reports"),
        tracking_uri="off",
    )
    start = time.time()
    stall = StallDump(Path(sweep.output_dir) / sweep.name, args.out, after=args.stall_s)
    stall.start()
    # At the deadline the sweep is interrupted like Ctrl+C: what the trials reported so far still makes the table,
    # from Tune's result files, instead of a killed command returning nothing.
    # counted from the script's start (base build and imports included), so an outer `timeout` of the same length
    # never fires first
    remaining = max(1.0, args.deadline_s - (time.time() - script_start))
    deadline = threading.Timer(remaining, lambda: os.kill(os.getpid(), signal.SIGINT))
    deadline.daemon = True
    deadline.start()
    try:
        run(sweep)
    except (KeyboardInterrupt, SystemExit, Exception) as e:  # SweepInterrupted, or a crash: report
        print(f"sweep ended early: {type(e).__name__}: {e}", flush=True)
    deadline.cancel()
    sweep_s = time.time() - start
    stall.stop.set()
    sampler.stop.set()
    sampler.join()

    sweep_dir = Path(sweep.output_dir) / sweep.name
    stamps = trial_timestamps(sweep_dir)
    if (sweep_dir / "trials.parquet").is_file():
        trials = pd.read_parquet(sweep_dir / "trials.parquet")
    else:
        trials = pd.DataFrame(last_reports(sweep_dir))
    order = sorted(stamps, key=lambda t: stamps[t][0])
    rows = []
    for _, t in trials.iterrows():
        row = {
            "trial_id": t.trial_id,
            "variant": t.variant,
            "lr": float(t.lr),
            "strategy": t.strategy,
            "gpus": gpus,
            "status": t.status,
            "step": int(t.step),
            "tokens_per_s": round(float(t.tokens_per_s), 1),
            "tokens_per_s_per_gpu": round(float(t.tokens_per_s) / max(gpus, 1), 1),
            "peak_mem_gib_per_gpu": round(float(t.peak_mem_bytes) / 2**30, 2),
            "adapter_bytes": int(t.adapter_bytes),
            "trainable_params": int(t.trainable_params),
            "reason": t.reason[:300],
        }
        if t.adapter_path:
            row.update(reload_check(Path(t.adapter_path), t.variant))
        if t.trial_id in stamps:
            i = order.index(t.trial_id)
            last = stamps[t.trial_id][1]
            row["gpu_mib_after_end"] = sampler.used_at(last + 5.0)  # 5 s after its last report
            row["order"] = i
            row["gpu_mib_in_use_at_its_start"] = stamps[t.trial_id][2] // 2**20  # read by its worker, before loading
            if i + 1 < len(order):
                row["next_trial_gpu_mib_in_use_at_start"] = stamps[order[i + 1]][2] // 2**20
        rows.append(row)

    import peft
    import ray
    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    result = {
        "device": torch.cuda.get_device_name(0) if gpus else "cpu",
        "gpus": gpus,
        "base": json.loads((base_dir / "random_base.json").read_text())
        if (base_dir / "random_base.json").is_file()
        else {"dir": str(base_dir)},
        "settings": {"steps": args.steps, "batch": args.batch, "max_length": 256, "rank": 16, "targets": "all-linear"},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "ray": ray.__version__,
            "deepspeed": ds_version,
        },
        "gpu_mib_idle_before_sweep": idle,
        "sweep_s": round(sweep_s, 1),
        "base_build_s": round(start - t_base, 1),
        "trials": rows,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    with open(args.out / f"{args.name}_gpu_memory.csv", "w") as f:
        f.write("unix_time,gpu,used_mib\n")
        f.writelines(f"{t:.2f},{i},{u}\n" for t, i, u in sampler.rows)

    print(f"\n{result['device']} x {gpus}; idle GPU memory before the sweep: {idle} MiB; sweep {sweep_s:.0f}s")
    cols = ["variant", "lr", "strategy", "gpus", "status", "step", "tokens_per_s_per_gpu", "peak_mem_gib_per_gpu"]
    cols += ["adapter_bytes", "empty_tensors", "zero_lora_B", "reload_max_logit_diff", "gpu_mib_in_use_at_its_start"]
    cols += ["next_trial_gpu_mib_in_use_at_start"]
    print(pd.DataFrame(rows).reindex(columns=cols).to_string(index=False))
    for r in rows:
        if r["reason"]:
            print(f"{r['variant']}: {r['reason']}")


if __name__ == "__main__":
    main()
