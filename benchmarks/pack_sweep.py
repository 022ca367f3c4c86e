"""A packed sweep against the same sweep solo, on one GPU: wall time, and whether both find the same frontier.

Issue 24's sweep-level claim, measured without the golden sets' wheels (lm-eval, MLflow) or the SmolLM2 GGUF, so that
one device call carrying benchmarks/device_wheels.sh's `.whl` runs it: a random-init base of a real shape
(`random_base`), rows of exactly `--seq` tokens (`speed.write_rows`), MLflow off, no golden sets, eval loss the
objective. The same space, seed and ASHA budget twice, one after the other in fresh local Rays:

- solo: `Resources(gpus_per_worker=1/k)`, k trials at a time sharing the GPU (as `sweeps/smollm2.py` runs solo);
- packed: `Resources(gpus_per_worker=1, pack=k)`, one pack host holding the base once for k trials at a time, its
  steps captured as CUDA graphs (`lora_search.pack_graphs`, the default);
- eager (when `--order` names it): the packed sweep with every step as it comes (`LORA_SEARCH_PACK_GRAPHS=0`).

With `--hosts H`, both run H x k trials at a time: solo at 1/(H x k) of the GPU each, packed as H pack hosts of k
trials, each host on 1/H of the GPU (as `SMOLLM2_PACK=k` packs `sweeps/smollm2.py`'s 0.25-GPU shares). One host
(the default) sets one process against k; H hosts give the packs as many processes for their host work as H solo
trials would have, each process doing k trials' steps.

Only packable variants (lora, rslora, loraplus) are drawn, so every trial of the packed sweep packs. Prints and writes
each sweep's wall time (the driver's `run`, Ray's start included), the ratio, each trial's ending and eval loss, and
the frontier (completed trials on `pareto`) of each. The base is random, so its losses say nothing about quality;
the question is whether the two sweeps make the same decisions and how long they take.

    python benchmarks/pack_sweep.py --shape 1b --seq 512 --pack 4 --trials 16 --steps 60 --out $OUT   # GPU
    python benchmarks/pack_sweep.py --shape tiny --seq 64 --pack 2 --trials 4 --steps 4 --out /tmp/ps  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PACKABLE = ("lora", "rslora", "loraplus")
"""The variants drawn, all of which pack (`lora_search.pack.SOLO` names those that do not). PiSSA packs too since
2026-12-06 (session 18) and is left out, so the runs stay comparable with the earlier ones."""


def sweep_for(args: argparse.Namespace, base_dir: Path, data: Path, which: str):  # noqa: ANN201 (a Sweep)
    import torch

    from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep

    gpu = torch.cuda.is_available()
    packed = which != "solo"
    k, hosts, cpus = args.pack, args.hosts, 2 if gpu else 1  # a CPU check: a pack host's share leaves a core
    if packed:
        resources = Resources(workers=1, gpus_per_worker=1 / hosts if gpu else 0, cpus_per_worker=cpus, pack=k)
    else:
        # every solo trial at once, as many as the packs hold: 1 CPU each where 2 would not fit them all
        solo_cpus = cpus if hosts * k * cpus <= (os.cpu_count() or 1) else 1
        resources = Resources(workers=1, gpus_per_worker=1 / (hosts * k) if gpu else 0, cpus_per_worker=solo_cpus)
    rung = max(1, args.steps // 4)
    return Sweep(
        name=f"pack_sweep_{args.shape}_{which}{k}" + (f"x{hosts}" if hosts > 1 else ""),
        base=BaseModel(str(base_dir), dtype="bfloat16" if gpu else "float32"),
        dataset=Dataset(str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), max_length=args.seq),
        space=SearchSpace(
            ranks=(4, 8, 16, 32),
            alpha_over_rank=(1.0, 2.0),
            targets=("attention", "mlp", "all-linear"),
            variants=PACKABLE,
            lr=(2e-5, 2e-3),
        ),
        budget=Budget(
            max_steps=args.steps,
            eval_every=rung,
            grace_period=rung,
            reduction_factor=3,
            batch_size=args.bs,
            # --pack-checkpointing: the packs' own (a pack that recomputes is not captured as a graph); solo: auto
            gradient_checkpointing=args.pack_checkpointing if packed else "auto",
        ),
        resources=resources,
        search="random",
        num_samples=args.trials,
        max_concurrent_trials=hosts * k,
        seed=0,
        scheduler="asha",
        output_dir=str(args.work / "reports"),
        tracking_uri="off",
    )


def run_one(sweep) -> dict:  # noqa: ANN001 (a Sweep)
    """Run `sweep` fresh in its own local Ray; its wall time and per-trial outcome."""
    import ray

    from lora_search import run

    start = time.perf_counter()
    try:
        frame = run(sweep, fresh=True)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    cols = [c for c in ("variant", "rank", "alpha", "targets", "lr") if c in frame.columns]
    trials = []
    for _, row in frame.sort_values(cols).iterrows():
        loss, step = row.get("eval_loss"), row.get("step")
        trials.append(
            {
                **{c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in cols},
                "status": row["status"],
                "step": int(step) if step == step and step is not None else None,  # NaN: never reported
                "eval_loss": round(float(loss), 5) if loss == loss and loss is not None else None,
                "pareto": bool(row.get("pareto", False)),
            }
        )
    # where a trial's time went, the mean over trials (`results.StepReport`'s fields, as each last reported them)
    phases = {
        c: round(float(frame[c].mean()), 2)
        for c in ("startup_s", "prepare_s", "load_s", "train_s", "eval_wall_s")
        if c in frame.columns and frame[c].notna().any()
    }
    steps = int(sum(t["step"] or 0 for t in trials))
    return {
        "wall_s": round(wall, 1),
        "trial_steps": steps,
        "trial_phases_mean_s": phases,
        "trials": trials,
        **host_times(Path(sweep.output_dir) / sweep.name),
    }


def host_times(out: Path) -> dict:
    """Where each pack host's time went (its journal's last totals, `pack_host.PackHost._log`): steps, the steps' own
    seconds, and the seconds between steps (waiting for its trials' next batches); {} for a solo sweep."""
    hosts = []
    for journal in sorted(out.rglob("pack_host_*.jsonl")):
        lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "steps" in line), None)
        if last is not None:
            hosts.append({k: last.get(k) for k in ("steps", "step_s", "between_steps_s", "graph_replays")})
    if hosts:
        steps = sum(h["steps"] for h in hosts)
        print(
            f"[pack_sweep] {len(hosts)} host(s), {steps} pack steps: "
            f"{1000 * sum(h['step_s'] for h in hosts) / steps:.0f} ms a step in the pack, "
            f"{1000 * sum(h['between_steps_s'] for h in hosts) / steps:.0f} ms between steps",
            flush=True,
        )
    return {"hosts_time": hosts} if hosts else {}


def compare(result: dict) -> bool:
    """Where the packed and the solo sweep both ran: set how many times sooner the packed one ended (`ratio`; and
    `ratio_eager`, the packed sweep without graphs, where it ran), which trials ended alike, and whether the frontiers
    match; False where one of the two is missing."""
    packed, solo = result.get("packed"), result.get("solo")
    if not (packed and solo):
        return False
    result["ratio"] = round(solo["wall_s"] / packed["wall_s"], 3)
    if result.get("eager"):
        result["ratio_eager"] = round(solo["wall_s"] / result["eager"]["wall_s"], 3)
    ending = {config_key(t): t["status"] for t in solo["trials"]}
    same = [ending.get(config_key(t)) == t["status"] for t in packed["trials"]]
    result["same_endings"] = f"{sum(same)} of {len(same)}"
    front = {config_key(t) for t in solo["trials"] if t["pareto"]}
    result["same_frontier"] = front == {config_key(t) for t in packed["trials"] if t["pareto"]}
    if (full := full_rates(result)) is not None:
        result["full_trial_steps_per_s"] = full
    return True


def full_rates(result: dict) -> dict | None:
    """Trial-steps a second with every slot full, for the packed and the solo sweep: what the two sweeps' training
    can give, startup, waits and the sweep's tail aside (session 18: the solo sweeps' trials, sharing the GPU as Ray
    fractions, out-stepped the packs). Packed: hosts x k over the hosts' mean step (`hosts_time`: each step's own
    seconds, with up to k adapters). Solo: hosts x k trials at once, each at its mean steps over its mean `train_s`
    (a trial's training phase, rung evaluations in it). None where a figure is missing."""
    packed, solo = result["packed"], result["solo"]
    hosts = packed.get("hosts_time") or []
    n = len(solo["trials"])
    train_s = solo["trial_phases_mean_s"].get("train_s")
    steps = sum(h["steps"] for h in hosts)
    if not (hosts and steps and n and train_s):
        return None
    slots = result["hosts"] * result["pack"]
    pack_rate = slots / (sum(h["step_s"] for h in hosts) / steps)
    solo_rate = slots * solo["trial_steps"] / n / train_s
    return {
        "packed": round(pack_rate, 1),
        "solo": round(solo_rate, 1),
        "packed_over_solo": round(pack_rate / solo_rate, 3),
    }


def config_key(trial: dict) -> tuple:
    return tuple(trial.get(c) for c in ("variant", "rank", "alpha", "targets", "lr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", help="random_base shape: tiny, 1b, 8b")
    parser.add_argument("--seq", type=int, default=512, help="tokens a row (every row exactly this long)")
    parser.add_argument("--bs", type=int, default=8, help="rows a trial's step")
    parser.add_argument("--pack", type=int, default=4, help="k: trials a pack, and solo trials sharing the GPU")
    parser.add_argument("--hosts", type=int, default=1, help="H: pack hosts on the GPU (solo: H x k trials at once)")
    parser.add_argument("--trials", type=int, default=16, help="configurations drawn (the same in both sweeps)")
    parser.add_argument("--steps", type=int, default=60, help="a trial's full budget; rungs at a quarter of it")
    parser.add_argument(
        "--order",
        default="packed,solo",
        help="the sweeps, in this order (a warm cache helps the later): packed, solo, and eager (packed, no graphs)",
    )
    parser.add_argument(
        "--pack-checkpointing",
        choices=("auto", "off", "on"),
        default="auto",
        help="the packed sweeps' Budget.gradient_checkpointing (auto: the memory model decides, as for the solo one)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/pack_sweep"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    bad = [f"--{name} {value}: give {want}" for name, value, ok, want in (
        ("pack", args.pack, args.pack >= 2, "2 or more trials a pack"),
        ("hosts", args.hosts, args.hosts >= 1, "1 or more pack hosts"),
        ("trials", args.trials, args.trials >= 1, "1 or more configurations"),
        ("steps", args.steps, args.steps >= 1, "1 or more steps"),
        ("seq", args.seq, args.seq >= 1, "1 or more tokens a row"),
        ("bs", args.bs, args.bs >= 1, "1 or more rows a step"),
        ("order", args.order, set(args.order.split(",")) <= {"packed", "solo", "eager"},
         "packed, solo, eager or several, e.g. --order packed,solo,eager"),
    ) if not ok]  # fmt: skip
    if bad:
        parser.error("; ".join(bad))
    import random_base
    import speed
    import torch
    from transformers import AutoTokenizer

    base_dir = random_base.build(args.shape, args.work / f"base_{args.shape}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = args.work / f"data_{args.seq}_{args.bs}_{args.steps}"
    if not (data / "train.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        speed.write_rows(data / "train.jsonl", tokenizer, args.seq, args.bs * (args.steps + 2), 0)
        speed.write_rows(data / "eval.jsonl", tokenizer, args.seq, args.bs, 1)
    result: dict = {
        "what": __doc__.split("\n")[0],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "shape": args.shape,
        "base_params": json.loads((base_dir / "random_base.json").read_text())["params"],
        "seq": args.seq,
        "rows_per_step": args.bs,
        "pack": args.pack,
        "hosts": args.hosts,
        "pack_checkpointing": args.pack_checkpointing,
        "trials": args.trials,
        "max_steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # The base's fingerprint (sha256 of its weights, `registry.fingerprint`) is cached once a sweep has computed it;
    # computed here, before either sweep's clock starts, so that the first sweep timed does not pay it alone (session
    # 21's 8B run, 16 GB of weights: Ray started 22 s into the packed sweep, timed first, and 7 s into the solo one).
    from lora_search import registry
    from lora_search.config import BaseModel

    registry.fingerprint(BaseModel(str(base_dir)))
    for which in args.order.split(","):
        print(f"[pack_sweep] {which} sweep ...", flush=True)
        # eager: the packed sweep, its hosts' steps as they come (read by every process of the fresh local Ray)
        os.environ["LORA_SEARCH_PACK_GRAPHS"] = "0" if which == "eager" else "1"
        result[which] = run_one(sweep_for(args, base_dir, data, which))
        print(f"[pack_sweep] {which}: {result[which]['wall_s']} s", flush=True)
        compare(result)  # after each sweep: a call cut short keeps what it measured
        (args.out / "packed_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    if compare(result):
        print(
            f"\n{result['device']}: {args.trials} trials of {args.shape} at {args.seq} tokens, ASHA, "
            f"k = {args.pack}, {args.hosts} host(s): solo {result['solo']['wall_s']} s, packed "
            f"{result['packed']['wall_s']} s, x{result['ratio']} sooner; same endings {result['same_endings']}; "
            f"same frontier: {result['same_frontier']}"
        )
        if full := result.get("full_trial_steps_per_s"):
            print(
                f"every slot full: packed {full['packed']} trial-steps/s, solo {full['solo']} "
                f"(x{full['packed_over_solo']})"
            )


if __name__ == "__main__":
    main()
