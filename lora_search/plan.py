"""What a sweep will need before it starts: trials, GPUs, memory per GPU, packing, ASHA's budget, GPU-hours and cost.

    python sweeps/llama70b.py --dry-run --gpus 64            # the sweep file's own plan; starts nothing
    lora-search plan sweeps/llama70b.py --gpus 64 --nodes 8  # the same from the CLI

Pure arithmetic over the sweep and the model's architecture, read from its config alone (a meta-device build:
no weights, no GPU, no Ray, no pre-flight checks). A hub id that cannot be read offline is planned from a dir
holding the same config.json (`config_dir`; sweeps/configs/ ships Llama-3.1 8B and 70B).

Every number is an estimate whose arithmetic is in the docstring of the function that makes it; the memory
model follows what lora_search/train.py does: bf16 autocast, PEFT adapters in fp32, AdamW, for NF4 variants
`prepare_model_for_kbit_training`, and gradient checkpointing on (the least a trial needs; a trial with
`budget.gradient_checkpointing="auto"` turns it off where `activation_bytes(checkpointing=False)` fits, and uses
more). tests/test_plan.py holds
the estimates within 3% of peaks measured on an H100 (bf16 LoRA and DoRA; NF4 not measured).

Packing (`Resources.pack`, `lora_search.pack`): per packable (rank, target set) the most trials whose pack fits one
GPU (`memory.pack_bytes`), and the sweep's wall time with packing at a measured speed-up, never a modelled one: the
ratio of the nearest comparable GPU run of benchmarks/pack.py (benchmarks/pack_*.json, `measured_ratio`), named in
the plan; with none, the plan says so (`pack_plan.NO_MEASUREMENT`). Where the solo trials share a GPU, the ratio is a
whole sweep's against them (benchmarks/packed_sweep_*.json, `pack_plan.sweep_runs`), and where packing measured slower,
the plan says to keep it off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_search import space
from lora_search.config import BaseModel, ConfigError, Problem, Resources, Sweep
from lora_search.layout import MODEL_CONFIG
from lora_search.memory import (
    GPUS,
    Architecture,
    MemoryRow,
    dtype_bytes_of,
    read_architecture,
    trial_memory,
)
from lora_search.pack_plan import PACK_BENCHMARKS, SHARING, Packing, packing
from lora_search.strategies import STRATEGIES

GPU_LABELS = {"H100": "H100 80GB", "H200": "H200 141GB"}

LORA_FLOPS_PER_PARAM = 4
"""FLOPs per token per matmul weight for LoRA on a frozen base: forward 2N, backward 2N for the activation
gradients, no weight gradients (Kaplan et al. 2020's 6N for full training, minus the 2N weight-gradient
term). Adapter FLOPs (r << h) and attention's s-dependent FLOPs (~4*s*h*layers, 4-7% at s=2048) are left out.
MFU counts model FLOPs only, so gradient checkpointing's recomputed forward (+2N) shows as a lower MFU."""


@dataclass(frozen=True)
class Plan:
    sweep: str
    base: str
    architecture: Architecture
    dtype: str
    trials: int
    search: str
    workers: int
    gpus_per_trial: float
    placement: str
    strategy: str
    node_gpus: tuple[int, ...]
    concurrent: int
    rungs: tuple[int, ...]
    reduction_factor: int
    max_steps: int
    expected_steps: float
    """ASHA's expected optimizer steps per trial (`asha_expected_steps`)."""
    memory: tuple[MemoryRow, ...]
    batch: int
    grad_accum: int
    max_length: int
    tokens_per_step: int
    flops_per_token: float
    gpu: str
    mfu: float
    step_s: float
    price: float
    currency: str
    notes: tuple[str, ...]
    packing: Packing

    @property
    def full_gpu_hours(self) -> float:
        """Every trial at max_steps: trials x max_steps x s/step x GPUs per trial / 3600."""
        return self.trials * self.max_steps * self.step_s * self.gpus_per_trial / 3600

    @property
    def asha_gpu_hours(self) -> float:
        """trials x ASHA's expected steps per trial x s/step x GPUs per trial / 3600."""
        return self.trials * self.expected_steps * self.step_s * self.gpus_per_trial / 3600

    @property
    def full_wall_hours(self) -> float:
        """ceil(trials / concurrent) waves of max_steps each."""
        return math.ceil(self.trials / self.concurrent) * self.max_steps * self.step_s / 3600

    @property
    def asha_wall_hours(self) -> float:
        """All trial-steps spread over the concurrent slots: a lower bound (the last trials leave slots idle)."""
        return self.trials * self.expected_steps * self.step_s / self.concurrent / 3600

    @property
    def packed_trials(self) -> float:
        """Trials whose variant packs, expected: trials x the packable share."""
        return self.trials * self.packing.share

    @property
    def packed_full_gpu_hours(self) -> float | None:
        """As `full_gpu_hours`, a packed trial-step taking 1/ratio of a solo one's time; None: no packed estimate."""
        m = self.packing.measured
        if m is None:
            return None
        trial_steps = self.trials - self.packed_trials + self.packed_trials / m.ratio
        return trial_steps * self.max_steps * self.step_s * self.gpus_per_trial / 3600

    @property
    def packed_asha_gpu_hours(self) -> float | None:
        """`packed_full_gpu_hours` at ASHA's expected steps per trial."""
        full = self.packed_full_gpu_hours
        return None if full is None else full * self.expected_steps / self.max_steps

    @property
    def packed_full_wall_hours(self) -> float | None:
        """The solo trials in ceil(solo / concurrent) waves of max_steps, then the packable ones in
        ceil(packable / (concurrent x k)) waves of packs, a pack's max_steps steps each k trial-steps at `ratio`
        times the solo rate: max_steps x s/step x k / ratio. None: no packed estimate."""
        m = self.packing.measured
        if m is None:
            return None
        if m.run.baseline == SHARING:  # a whole sweep's wall-time ratio: the packable trials' share of it
            return self.full_wall_hours * (1 - self.packing.share + self.packing.share / m.ratio)
        k, solo = self.packing.k, self.trials - self.packed_trials
        solo_waves = math.ceil(solo / self.concurrent - 1e-9)
        pack_waves = math.ceil(self.packed_trials / (self.concurrent * k) - 1e-9)
        return (solo_waves + pack_waves * k / m.ratio) * self.max_steps * self.step_s / 3600

    @property
    def packed_asha_wall_hours(self) -> float | None:
        """As `asha_wall_hours`, the packable trials' steps taking 1/ratio of the time: (solo + packable / ratio) x
        ASHA's expected steps x s/step / concurrent. A lower bound, as `asha_wall_hours` is. None: no estimate."""
        gpu_hours = self.packed_asha_gpu_hours
        return None if gpu_hours is None else gpu_hours / self.gpus_per_trial / self.concurrent

    def spend_gpu_hours(self, wall_hours: float) -> float:
        """The sweep's spend (lora_search.cost): the GPUs of every concurrent slot held for `wall_hours`. A lower
        bound: start-up, loading and evaluation add to it; the GPU-hours above are the configurations' cost."""
        return wall_hours * self.concurrent * self.gpus_per_trial


def prediction(p: Plan) -> dict[str, Any]:
    """What `p` predicts, in the units a sweep measures (sweep_metrics.json): ASHA's expected configuration
    device-hours and cost, the wall hours and the spend (both lower bounds), trial-steps and seconds a step."""
    wall = p.asha_wall_hours
    return {
        "gpu": p.gpu,
        "mfu": p.mfu,
        "step_s": p.step_s,
        "trials": p.trials,
        "concurrent": p.concurrent,
        "gpus_per_trial": p.gpus_per_trial,
        "trial_steps": p.trials * p.expected_steps,
        "device_hours": p.asha_gpu_hours,
        "cost": p.asha_gpu_hours * p.price,
        "wall_hours": wall,
        "spend_device_hours": p.spend_gpu_hours(wall),
        "currency": p.currency,
    }


def gpu_kind(cluster: dict[str, float]) -> str | None:
    """The `GPUS` row of a running Ray cluster's GPUs, from the `accelerator_type:<NAME>` resource Ray detects."""
    names = [k.removeprefix("accelerator_type:") for k in cluster if k.startswith("accelerator_type:")]
    return next((g for g in GPUS for n in names if g.lower() == n.lower()), None)


def for_run(sweep: Sweep, cluster: dict[str, float], config_dir: str | Path | None = None) -> dict[str, Any]:
    """The prediction (`prediction`) for the cluster `sweep` is about to run on, or `{"error": why}` where the
    planner cannot plan it (a CPU sweep, an unknown GPU, an unreadable config). Never raises: it is recorded beside
    the results (`layout.PLAN_FILE`) so the report can set prediction against measurement."""
    if sweep.resources.gpus_per_worker <= 0:
        return {"error": "the planner plans GPU sweeps; this one trains on CPUs"}
    gpu = gpu_kind(cluster)
    if gpu is None:
        known = ", ".join(GPUS)
        return {"error": f"the cluster's GPU type is not one the planner knows ({known})"}
    try:
        p = plan(sweep, cluster_gpus=int(cluster.get("GPU", 0)), config_dir=config_dir, gpu=gpu)
    except ConfigError as e:
        return {"error": "; ".join(f"{x.field}: {x.message}" for x in e.problems)}
    return prediction(p)


def shipped_config_dir(sweep_file: str | Path, base: BaseModel) -> Path | None:
    """`configs/<model name, lowercased>/` beside a sweep file when it holds a config.json: the architecture
    `lora-search plan` reads without --config-dir (sweeps/configs/llama-3.1-70b for meta-llama/Llama-3.1-70B)."""
    candidate = Path(sweep_file).resolve().parent / "configs" / base.name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
    return candidate if (candidate / MODEL_CONFIG).is_file() else None


def node_sizes(cluster_gpus: int, nodes: int | None, gpus_per_node: int) -> tuple[int, ...]:
    """GPUs per node: `cluster_gpus` spread evenly over `nodes`; None: full nodes of `gpus_per_node` and the
    remainder on one more (12 GPUs -> 8 + 4)."""
    problems = []
    if cluster_gpus < 1:
        problems.append(Problem("--gpus", cluster_gpus, "must be >= 1", "e.g. --gpus 8"))
    if nodes is not None and nodes < 1:
        problems.append(Problem("--nodes", nodes, "must be >= 1", "e.g. --nodes 1"))
    if gpus_per_node < 1:
        problems.append(Problem("--gpus-per-node", gpus_per_node, "must be >= 1", "e.g. --gpus-per-node 8"))
    if problems:
        raise ConfigError(problems, header="cannot plan")
    if nodes is None:
        full, rest = divmod(cluster_gpus, gpus_per_node)
        return (gpus_per_node,) * full + ((rest,) if rest else ())
    base, extra = divmod(cluster_gpus, nodes)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(nodes))
    if sizes[0] > gpus_per_node:
        raise ConfigError(
            [
                Problem(
                    "--nodes",
                    nodes,
                    f"{cluster_gpus} GPUs on {nodes} node(s) is {sizes[0]} per node, more than {gpus_per_node}",
                    f"give --nodes {math.ceil(cluster_gpus / gpus_per_node)} or --gpus-per-node {sizes[0]}",
                )
            ],
            header="cannot plan",
        )
    return sizes


def concurrent_trials(resources: Resources, sizes: Sequence[int]) -> tuple[int, str]:
    """Whole trials the nodes hold at once (what Ray can place; sweep.py's limit is all GPUs / GPUs per trial),
    and a note when placement costs something.

    STRICT_PACK: sum over nodes of floor(node GPUs / GPUs per trial); a trial bigger than a node never starts.
    PACK, SPREAD: floor(all GPUs / GPUs per trial). PACK is best effort: it keeps a trial on one node when one has
                  room, else spreads it, so trials bigger than a node, or made of the GPUs others leave, span nodes.
    STRICT_SPREAD (each worker on its own node): floor(worker slots / workers), none with fewer nodes than workers.
    """
    per_trial = resources.workers * resources.gpus_per_worker
    total, biggest = sum(sizes), max(sizes)
    in_nodes = sum(int(size // per_trial) for size in sizes)
    if resources.placement == "STRICT_PACK":
        if not in_nodes:
            return 0, f"STRICT_PACK needs {per_trial:g} GPUs on one node, but nodes have {biggest}"
        idle = total - in_nodes * per_trial
        return (
            in_nodes,
            f"{idle:g} GPU(s) stay idle: {per_trial:g} GPUs per trial do not divide the nodes" if idle else "",
        )
    if resources.placement == "STRICT_SPREAD":
        slots = sum(int(size // resources.gpus_per_worker) for size in sizes)
        fit = slots // resources.workers if resources.workers <= len(sizes) else 0
        return fit, "" if fit else f"STRICT_SPREAD needs {resources.workers} nodes, the cluster has {len(sizes)}"
    fit = int(total // per_trial)
    if resources.placement != "PACK" or fit == in_nodes:
        return fit, ""
    if per_trial > biggest:
        return fit, (
            f"a {per_trial:g}-GPU trial spans {math.ceil(per_trial / biggest)} nodes of {biggest}: PACK places it over "
            "several nodes, so its workers talk over the network, not NVLink (STRICT_PACK could not place it at all)"
        )
    return fit, (
        f"{fit - in_nodes} of the {fit} concurrent trials span nodes, on GPUs the others leave free (PACK is best "
        f"effort); STRICT_PACK keeps each trial on one node: {in_nodes} at once"
    )


def asha_expected_steps(rungs: Sequence[int], reduction_factor: int, max_steps: int) -> float:
    """Expected optimizer steps per trial under ASHA with rungs r_0 < ... < r_{K-1} and reduction factor eta,
    where a fraction eta^-k of the trials passes k rungs (each rung keeps the best 1/eta):

        E = r_0 + sum_{k=1}^{K-1} eta^-k (r_k - r_{k-1}) + eta^-K (max_steps - r_{K-1})

    Synchronous halving's count; asynchronous promotion is more lenient early on, so real spend lies between
    this and the full grid. Example: rungs 200, 600 of 1000, eta 3: 200 + 400/3 + 400/9 = 377.8 steps.
    """
    steps, previous = 0.0, 0
    for k, rung in enumerate(rungs):
        steps += (rung - previous) / reduction_factor**k
        previous = rung
    return steps + (max_steps - previous) / reduction_factor ** len(rungs)


def tokens_per_step(batch: int, grad_accum: int, max_length: int, workers: int) -> int:
    """batch x grad_accum x max_length x data-parallel workers: an upper bound, as rows shorter than
    max_length are padded only to the longest row of their batch (no packing)."""
    return batch * grad_accum * max_length * workers


def step_seconds(tokens: int, flops_per_token: float, gpus: float, mfu: float, peak_tflops: float) -> float:
    """tokens x FLOPs/token / (MFU x peak FLOP/s x computing GPUs)."""
    return tokens * flops_per_token / (mfu * peak_tflops * 1e12 * gpus)


def plan(
    sweep: Sweep,
    *,
    cluster_gpus: int,
    nodes: int | None = None,
    gpus_per_node: int = 8,
    config_dir: str | Path | None = None,
    gpu: str = "H100",
    mfu: float = 0.35,
    pack_benchmarks: str | Path = PACK_BENCHMARKS,
) -> Plan:
    """The plan of `sweep` on `cluster_gpus` GPUs of type `gpu` on `nodes` nodes (None: full nodes of
    `gpus_per_node`). Raises ConfigError naming the fix when the sweep cannot run on that cluster at all.

    `mfu`: the fraction of peak bf16 FLOP/s the trials reach, counted at 4N FLOPs/token. 0.35 is an assumption;
    Llama-3.1-8B LoRA (r=16, every decoder linear, b=4 x 2048, gradient checkpointing, bf16 autocast, SDPA)
    measured 0.22 on one H100, and DoRA 0.11 (its weight norm recomputes W + BA every step): budgets scale by
    0.35 / mfu.

    `pack_benchmarks`: the dir of benchmarks/pack.py's results, whose measured speed-ups the packed wall time uses
    (`packing`).
    """
    problems = []
    if gpu not in GPUS:
        problems.append(
            Problem("--gpu", gpu, f"unknown GPU; known: {', '.join(GPUS)}", "add a row to GPUS in lora_search/plan.py")
        )
    strategy = sweep.resources.strategy
    r = sweep.resources
    if r.gpus_per_worker <= 0:
        problems.append(
            Problem(
                "resources.gpus_per_worker",
                r.gpus_per_worker,
                "the planner sizes GPU trials",
                "give Resources(gpus_per_worker=1)",
            )
        )
    if not 0 < mfu <= 1:
        problems.append(Problem("mfu", mfu, "must be in (0, 1]", "e.g. 0.35"))
    if problems:
        raise ConfigError(problems, header="cannot plan")
    sizes = node_sizes(cluster_gpus, nodes, gpus_per_node)
    fit, placement_note = concurrent_trials(r, sizes)
    per_trial = r.workers * r.gpus_per_worker
    if fit == 0:
        raise ConfigError(
            [
                Problem(
                    "--gpus",
                    cluster_gpus,
                    f"no trial fits: {placement_note or f'a trial needs {per_trial:g} GPUs'}",
                    f"give a cluster of at least {math.ceil(per_trial)} GPUs or change resources.placement",
                )
            ],
            header="cannot plan",
        )
    trials = space.total_trials(sweep)
    concurrent = min(fit, trials, sweep.max_concurrent_trials or fit)

    arch = read_architecture(sweep.base, config_dir)
    dtype_bytes = dtype_bytes_of(sweep, arch)
    b, seq = sweep.budget.batch_size, sweep.dataset.max_length
    rows = []
    for variant in sweep.space.variants:
        for rank in sweep.space.ranks:
            candidates = [trial_memory(sweep, arch, variant, rank, t) for t in sweep.space.targets]
            rows.append(max(candidates, key=lambda row: row.total))

    compute_gpus = r.workers * min(r.gpus_per_worker, 1.0)
    tokens = tokens_per_step(b, sweep.budget.grad_accum, seq, r.workers)
    flops = LORA_FLOPS_PER_PARAM * (arch.params - arch.embedding_params)
    rungs = tuple(space.rungs(sweep))
    notes = [n for n in (placement_note,) if n]
    if r.gpus_per_worker > 1:
        notes.append(
            f"each worker holds {r.gpus_per_worker:g} GPUs but train.py trains on one: the rest are paid for idle; "
            f"use Resources(workers={r.workers * math.ceil(r.gpus_per_worker)}, gpus_per_worker=1)"
        )
    notes += _fit_notes(rows, arch, strategy, r.workers, dtype_bytes)
    if sweep.budget.gradient_checkpointing == "auto":
        notes.append(
            "the memory table assumes gradient checkpointing; trials whose activations fit without it turn it off "
            "(budget.gradient_checkpointing='auto'), about a third fewer FLOPs a step for more memory"
        )
    notes.append(
        "time excludes model loading, the eval loss every "
        f"{sweep.budget.eval_every} steps and golden-set scoring; NF4 dequantisation makes qlora steps slower"
    )
    return Plan(
        sweep=sweep.name,
        base=sweep.base.name_or_path,
        architecture=arch,
        dtype=sweep.base.dtype,
        trials=trials,
        search=sweep.search,
        workers=r.workers,
        gpus_per_trial=per_trial,
        placement=r.placement,
        strategy=strategy,
        node_gpus=sizes,
        concurrent=concurrent,
        rungs=rungs,
        reduction_factor=sweep.budget.reduction_factor,
        max_steps=sweep.budget.max_steps,
        expected_steps=asha_expected_steps(rungs, sweep.budget.reduction_factor, sweep.budget.max_steps),
        memory=tuple(rows),
        batch=b,
        grad_accum=sweep.budget.grad_accum,
        max_length=seq,
        tokens_per_step=tokens,
        flops_per_token=flops,
        gpu=gpu,
        mfu=mfu,
        step_s=step_seconds(tokens, flops, compute_gpus, mfu, GPUS[gpu].bf16_tflops),
        price=sweep.pricing.per_device_hour(gpu),
        currency=sweep.pricing.currency,
        notes=tuple(notes),
        packing=packing(sweep, arch, gpu=gpu, trials=trials, concurrent=concurrent, benchmarks=pack_benchmarks),
    )


def _fit_notes(rows: Sequence[MemoryRow], arch: Architecture, strategy: str, world: int, dtype_bytes: int) -> list[str]:
    """Why rows fit no GPU, and the fix: sharding when a replicated bf16 base alone is too big, else smaller
    micro-batches."""
    notes = []
    misfits = [row for row in rows if not any(row.fits(g) for g in GPUS)]
    whole_base = arch.params * dtype_bytes
    replicated = (
        [] if STRATEGIES[strategy].shards_base or world == 1 else [r for r in misfits if r.weights >= whole_base]
    )
    if replicated:
        sharded = whole_base / world + 2 * arch.block_params * dtype_bytes
        notes.append(
            f"{', '.join(dict.fromkeys(r.variant for r in replicated))} fit no GPU with strategy {strategy!r}, which "
            f"puts the whole {whole_base / 2**30:.0f} GiB base on every GPU; 'fsdp' or 'deepspeed-zero3' shards it "
            f"over the trial's {world} GPUs (~{sharded / 2**30:.1f} GiB of weights each): set resources.strategy"
        )
    rest = [row for row in misfits if row not in replicated]
    if rest:
        notes.append(
            f"{len(rest)} row(s) fit no GPU: lower budget.batch_size (raise grad_accum) or dataset.max_length, "
            "shard the base over more GPUs (resources.workers, strategy 'fsdp'), or use qlora"
        )
    return notes


def _hours(h: float) -> str:
    """Hours to 3 significant figures (a small sweep's 0.0025, a large one's 1,234)."""
    return f"{h:,.0f}" if h >= 1000 else f"{h:.3g}"


def _money(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}" if scale == 1e9 else f"{n / scale:.1f}{suffix}"
    return str(int(n))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:  # first column left, numbers right
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), *(line(row) for row in rows)]


def format_plan(p: Plan) -> str:
    """The plan as a readable text report."""
    a = p.architecture
    nodes = len(p.node_gpus)
    shape = f"{nodes} node(s) of {p.node_gpus[0]}" if len(set(p.node_gpus)) == 1 else f"nodes of {p.node_gpus}"
    replicated = "replicates the base on every GPU" if not STRATEGIES[p.strategy].shards_base else "shards the base"
    passes = ", ".join(f"1/{p.reduction_factor ** (k + 1)} pass {rung}" for k, rung in enumerate(p.rungs))
    out = [
        f"plan for sweep {p.sweep!r}",
        f"  base        {p.base} ({_count(a.params)} params, {p.dtype}; architecture from {a.source})",
        f"  trials      {p.trials} ({p.search} search)",
        f"  per trial   {p.gpus_per_trial:g} GPU(s) ({p.workers} worker(s) x {p.gpus_per_trial / p.workers:g} GPU, "
        f"{p.placement}); strategy {p.strategy} {replicated}",
        f"  cluster     {sum(p.node_gpus)} GPUs on {shape} -> {p.concurrent} concurrent trial(s)",
        f"  ASHA        rungs at steps {', '.join(map(str, p.rungs))} of {p.max_steps}, reduction factor "
        f"{p.reduction_factor}: {passes}; {p.expected_steps:.1f} expected steps per trial",
        "",
        f"memory per GPU in GiB (micro-batch {p.batch} x {p.max_length} tokens, gradient checkpointing; targets: "
        "the space's set that needs most)",
    ]
    header = ["variant", "rank", "targets", "trainable", "weights", "adapter", "optimizer", "activations", "total"]
    header += [GPU_LABELS[g] for g in GPUS]
    rows = [
        [
            row.variant,
            str(row.rank),
            row.targets,
            _count(row.trainable),
            _gib(row.weights),
            _gib(row.adapter),
            _gib(row.optimizer),
            _gib(row.activations),
            _gib(row.total),
        ]
        + ["yes" if row.fits(g) else "no" for g in GPUS]
        for row in p.memory
    ]
    out += ["  " + line for line in _table(header, rows)]
    out += _format_packing(p)
    compute = p.workers * min(p.gpus_per_trial / p.workers, 1.0)
    out += [
        "",
        f"throughput  {p.tokens_per_step:,} tokens/step ({p.batch} x grad_accum {p.grad_accum} x {p.max_length} "
        f"tokens x {p.workers} worker(s)) x {p.flops_per_token / 1e9:.1f} GFLOP/token "
        f"({LORA_FLOPS_PER_PARAM} x {_count(a.params - a.embedding_params)} matmul params)",
        f"            at MFU {p.mfu:g} of {compute:g} x {GPUS[p.gpu].bf16_tflops:g} TFLOP/s ({p.gpu}) -> "
        f"{p.step_s:.3g} s/step",
        "",
        f"budget on {p.gpu} at {p.price:.2f} {p.currency}/GPU-hour",
    ]
    budget = [
        [
            "full grid",
            f"{p.max_steps}",
            f"{_hours(p.full_gpu_hours)}",
            f"{_money(p.full_gpu_hours * p.price)}",
            f"{_hours(p.full_wall_hours)}",
            f">= {_hours(p.spend_gpu_hours(p.full_wall_hours))}",
        ],
        [
            "ASHA (expected)",
            f"{p.expected_steps:.1f}",
            f"{_hours(p.asha_gpu_hours)}",
            f"{_money(p.asha_gpu_hours * p.price)}",
            f">= {_hours(p.asha_wall_hours)}",
            f">= {_hours(p.spend_gpu_hours(p.asha_wall_hours))}",
        ],
    ]
    m = p.packing.measured
    if m is not None:
        packed = (
            ("full grid, packed", f"{p.max_steps}", p.packed_full_gpu_hours, p.packed_full_wall_hours, ""),
            ("ASHA, packed", f"{p.expected_steps:.1f}", p.packed_asha_gpu_hours, p.packed_asha_wall_hours, ">= "),
        )
        budget += [
            [
                name,
                steps,
                _hours(gpu_hours or 0),
                _money((gpu_hours or 0) * p.price),
                f"{bound}{_hours(wall or 0)}",
                f">= {_hours(p.spend_gpu_hours(wall or 0))}",
            ]
            for name, steps, gpu_hours, wall, bound in packed
        ]
    out += [
        "  " + line
        for line in _table(
            ["", "steps/trial", "GPU-hours", f"cost {p.currency}", "wall hours", "spend GPU-hours"], budget
        )
    ]
    if m is not None:
        run = m.run
        against = (
            f"{m.ratio:g}x as soon as the same sweep's {m.k * run.hosts} solo trials sharing the GPU ({run.hosts} pack "
            f"host(s) of {m.k} on it), measured in {run.file}"
            if run.baseline == SHARING
            else f"{m.ratio:g}x the solo trial-steps/s, measured in {run.file} row k={m.k}"
            + (" (captured steps)" if m.k in run.graphed else "")
        )
        out.append(
            f"  packed: {p.packed_trials:.3g} of {p.trials} trials ({', '.join(p.packing.packable)}) in packs of "
            f"{p.packing.k} at {against} ({run.device}, {run.base}, {run.rows_per_trial} rows x {run.seq} tokens a "
            f"trial; this sweep {p.packing.rows} x {p.max_length})"
        )
        if m.ratio < 1:
            out.append(f"  packing measured slower than solo ({m.ratio:g}x): keep resources.pack=1 for this shape")
    elif p.packing.shapes:  # without shapes, the packing section said why already
        out.append(f"  {p.packing.why_not}")
    out.append(
        "  GPU-hours and cost: the configurations' (training steps at the planned rate); spend: every GPU the sweep "
        "holds for its wall hours, start-up, loading and evaluation not counted"
    )
    out += ["", "notes"] + [f"  - {n}" for n in p.notes]
    return "\n".join(out)


def _format_packing(p: Plan) -> list[str]:
    """The packing section: per packable shape the most trials a pack fits and holds, whether that pack checkpoints
    and, where some pack's step runs in more than one, its micro-batches a step; the variants that train solo."""
    k = p.packing
    out = ["", f"packing     up to {k.limit} trial(s) a pack (resources.pack) over one copy of the base on one GPU"]
    if not k.shapes:
        out.append(f"  {k.why_not}" if k.why_not else "  no shape of the space packs")
    else:
        out += [
            f"  variants {', '.join(k.packable)}: a pack of k on one {GPU_LABELS[p.gpu]} ({_gib(k.usable)} GiB usable) "
            f"holds the base once ({_gib3(k.shapes[0].base)} GiB)",
            "  + k x per trial: its adapter, gradients and AdamW state, and the activations of its rows of a step "
            f"({k.rows} rows x {p.max_length} tokens; where that does not fit, the pack checkpoints its layers: "
            "recompute, or runs a step in micro-batches, each 1/n of the rows, the gradients summed: micro-batches)",
        ]
        header = ["rank", "targets", "per trial GiB", "fits", "packs", "recompute", "micro-batches"]
        rows = [
            [str(s.rank), s.targets, _gib3(s.per_trial), str(s.fits), str(s.k), "yes" if s.recompute else "no"]
            + [str(s.micro_batches)]
            for s in k.shapes
        ]
        if all(s.micro_batches == 1 for s in k.shapes):  # the micro-batches column only where a pack accumulates
            header, rows = header[:-1], [row[:-1] for row in rows]
        out += ["  " + line for line in _table(header, rows)]
        out.append(
            "  fits: the most trials one pack could hold, checkpointed and in micro-batches where that fits more "
            "(budget.gradient_checkpointing, grad_accum); per trial GiB, recompute and micro-batches: at the size it "
            "packs"
        )
        if any(s.fits == 0 for s in k.shapes):
            out.append(
                "  fits 0: not even one trial's pack fits the GPU, in grad_accum micro-batches of budget.batch_size "
                "rows each; to pack, lower budget.batch_size or dataset.max_length"
            )
    out += [f"  solo: {variant}: {why}" for variant, why in k.solo]
    return out


def _gib3(n: float) -> str:
    """GiB to 3 significant figures: an adapter's 0.0728 GiB, a base's 131 GiB."""
    return f"{n / 2**30:.3g}"
