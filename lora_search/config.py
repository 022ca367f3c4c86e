"""The sweep definition: frozen dataclasses for the base model, data, search space, budget and resources.

A sweep file builds one `Sweep` and hands it to `lora_search.run`:

    python sweeps/tiny.py            # or: lora-search run sweeps/tiny.py

Every part is frozen because trial configs travel to Ray workers and must not drift. `Sweep` checks all
of its parts at construction and raises one `ConfigError` naming every problem (field, value, fix).
Checks that need the outside world (the model's config, the data files, CUDA) run in
`lora_search.preflight` before any trial starts; `lora-search validate` reports both kinds together.

Each field's annotation is its contract (type, and `Range` for its documented bounds): `lora_search.checks` checks
every field of every part against it first, so a string where a number belongs, NaN or a list where a tuple belongs
is a Problem, never a traceback. The classes' `problems()` methods check only what an annotation cannot say.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from lora_search.checks import Positive, Range, field_problems
from lora_search.problems import ConfigError, Problem, collect_or_raise, collecting, collecting_problems

__all__ = ["ConfigError", "Problem", "collecting_problems"]  # re-exported from lora_search.problems; the rest below

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
"""torch dtypes a base loads in (`getattr(torch, dtype)`), or "auto": the checkpoint's own."""
SearchAlgorithm = Literal["random", "grid", "optuna"]
Scheduler = Literal["asha", "pareto-asha"]
"""`Sweep.scheduler` values: rows of `lora_search.space.SCHEDULERS`."""
ServeWith = Literal["any", "vllm", "sglang", "tensorrt-llm"]
"""`Sweep.serve_with` values: "any", or an engine of `lora_search.serving.ENGINES`."""
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Attention = Literal["auto", "sdpa", "eager", "torch_varlen", "flash_attention_2", "flash_attention_3", "flex_attention"]
"""Transformers' attention kernels (`attn_implementation`), and "torch_varlen", torch's own varlen flash kernel that
lora_search registers with transformers (`lora_search.varlen`); preflight checks the kernel's package is installed."""
ATTENTION: tuple[str, ...] = get_args(Attention)
Name = Annotated[str, Range(ge=1, example="'q_proj'")]
"""A non-empty string."""
Targets = Name | tuple[Name, ...]
"""A target-module preset name (see `lora_search.targets.PRESETS`) or an explicit tuple of module names."""
Count = Annotated[int, Positive]
Fields = Callable[..., bool]
"""`ok("grace_period", "max_steps")`: whether those fields of a part conform to their annotations, so that a rule
relating them may compare them (`Sweep.problems` passes it to each part's `problems`)."""


def _everything(*_fields: str) -> bool:
    return True


@dataclass(frozen=True)
class BaseModel:
    """The model every trial adapts."""

    name_or_path: Annotated[str, Range(ge=1, example="'meta-llama/Llama-3.1-8B' or a local model dir")]
    """A Hugging Face hub id (`meta-llama/Llama-3.1-8B`) or a local directory with config.json and weights; or a GGUF
    file, as a path ending in `.gguf` or as `gguf:PACKAGE/FILE.gguf` inside an installed package: pre-flight converts
    it once into a safetensors dir in the cache, which every trial loads and every adapter records
    (`lora_search.gguf`; the weights keep the GGUF's quantization rounding)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit). Pin a commit for reproducible nightly sweeps."""
    dtype: Dtype = "float32"
    """Weights dtype. bfloat16 halves memory on GPUs; CPUs train fastest and most exactly in float32."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust that repository."""
    attn_implementation: Attention = "auto"
    """Transformers' attention kernel. "auto": padding-free batches where the rows pad, on torch's own varlen flash
    kernel ("torch_varlen", `lora_search.varlen`: no compile, no extra package) where it matches SDPA on the trial's
    CUDA device, else on flex attention where its compile pays (`lora_search.fastpath.resolve_attention`), else
    "sdpa" on padded batches; the trial's fast path summary says which and why. A named varlen kernel
    ("torch_varlen", "flash_attention_2" with flash-attn installed, "flash_attention_3", "flex_attention") also turns
    on padding-free batches; "sdpa" keeps padded ones; "eager" is the slow reference."""
    compile_layers: bool = False
    """Train through compiled decoder layers (`lora_search.compiled_layers`: one `torch.compile` of the layer class,
    shared by every layer; inference forwards stay eager). Fewer, fused kernels a step for tens of seconds of compile
    once per trial process; only where activations are kept, on one worker or DDP, and not on a 4-bit base (the
    trial's fast path summary says when it is off and why). Off by default: on one H200 (8B shape, r16) it trained at
    0.95x the eager fast path and the compile took longer than the 16 steps it sped up (benchmarks/NOTES.md)."""

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        return []


@dataclass(frozen=True)
class Dataset:
    """Training data. Local JSONL rows are either chat (`{"messages": [{"role", "content"}, ...]}`) or
    instruction (`{"instruction", "input"?, "output"}`); a local dir saved by `datasets` or a hub id also works."""

    path: Annotated[str, Range(ge=1, example="'data/mine/train.jsonl'")]
    eval_path: str | None = None
    """Held-out rows for the eval loss that ASHA prunes on. Without it, `eval_fraction` of `path` is held out."""
    eval_fraction: Annotated[float, Range(gt=0, lt=1, example="0.1")] = 0.1
    max_length: Annotated[int, Range(ge=8, example="512")] = 512
    """Tokens per row; longer rows are truncated (their answer first), and a row whose prompt alone fills it trains
    nothing (preflight counts them with the base's tokenizer). At most the base's context length. Memory per trial
    grows linearly with it (activations)."""
    split: Annotated[str, Range(ge=1, example="'train'")] = "train"
    """Split to read when `path` is a hub id or a `datasets` dir."""

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        if ok("eval_path") and self.eval_path is not None and not self.eval_path.strip():
            return [Problem("dataset.eval_path", self.eval_path, "is empty", "a .jsonl path, or None")]
        return []


@dataclass(frozen=True)
class SearchSpace:
    """What the sweep varies. Discrete axes are sampled uniformly (or gridded); lr is log-uniform."""

    ranks: tuple[Annotated[int, Range(ge=1, example="8")], ...] = (8, 16)
    """LoRA rank r. Adapter size and trainable params grow linearly with r."""
    alpha_over_rank: tuple[Annotated[float, Range(gt=0, example="2.0")], ...] = (2.0,)
    """lora_alpha = ratio * r. Ignored when `alpha` is set. (rsLoRA scales by alpha/sqrt(r) instead of alpha/r.)"""
    alpha: tuple[Annotated[float, Range(gt=0, example="16")], ...] | None = None
    """Absolute lora_alpha values; overrides `alpha_over_rank`."""
    targets: tuple[Targets, ...] = ("all-linear",)
    """Presets: attention (q,v), attention-all (q,k,v,o), mlp (gate,up,down), all-linear; or tuples of names."""
    variants: tuple[Name, ...] = ("lora",)
    """Rows of `lora_search.variants.VARIANTS`."""
    lr: tuple[Annotated[float, Range(gt=0, example="1e-4")], Annotated[float, Range(gt=0, example="1e-3")]] = (
        1e-4,
        1e-3,
    )
    """(low, high) of a log-uniform learning-rate range."""
    lr_grid_points: Count = 3
    """With search='grid', lr takes this many geometrically spaced values from the range."""
    dropout: tuple[Annotated[float, Range(ge=0, lt=1, example="0.05")], ...] = (0.0,)

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        from lora_search.targets import PRESETS
        from lora_search.variants import VARIANTS

        out = []
        low, high = self.lr if ok("lr") else (0, 1)
        if not low < high:
            if low == high:  # one learning rate: the grid's one point of a range is its geometric middle
                fix = f"for lr {low:g} alone: lr=({low / 10:g}, {low * 10:g}), lr_grid_points=1 with search='grid'"
            else:
                fix = f"e.g. lr=({min(self.lr)}, {max(self.lr)})"
            out.append(Problem("space.lr", self.lr, "need 0 < low < high", fix))
        variants = self.variants if ok("variants") else ()
        for i, name in ((i, v) for i, v in enumerate(variants) if variants.index(v) != i):
            out.append(Problem(f"space.variants[{i}]", name, "is listed twice", "list each variant once"))
        for v in variants:
            if v not in VARIANTS:
                out.append(
                    Problem(
                        "space.variants",
                        v,
                        f"unknown variant; known: {', '.join(VARIANTS)}",
                        "fix the name, or add a row to VARIANTS in lora_search/variants.py",
                    )
                )
        for t in self.targets if ok("targets") else ():
            if isinstance(t, str):
                if t not in PRESETS:
                    out.append(
                        Problem(
                            "space.targets",
                            t,
                            f"unknown preset; presets: {', '.join(PRESETS)}",
                            "use a preset or a tuple of module names, e.g. ('q_proj', 'v_proj')",
                        )
                    )
        return out


Optimizer = Literal["auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"]
"""`Budget.optimizer` values: Transformers `optim` names (the 8-bit and paged ones need bitsandbytes and CUDA)."""
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
# Transformers' `lr_scheduler_type` names (SchedulerType) that need no extra arguments.
Schedule = Literal["linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
BITSANDBYTES_OPTIMIZERS = frozenset({"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"})
Checkpointing = Literal["auto", "on", "off"]
CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)
"""`Budget.gradient_checkpointing` values."""
Sampling = Literal["random", "group_by_length"]
"""`Budget.sampling` values: Transformers' `train_sampling_strategy` names a trial's Trainer takes."""


@dataclass(frozen=True)
class Budget:
    """How long each trial trains and how ASHA cuts it short. ASHA's time unit is the optimizer step."""

    max_steps: Annotated[int, Range(ge=1, example="200")] = 200
    """Optimizer steps of a trial that is never pruned."""
    eval_every: Annotated[int, Range(ge=1, example="25")] = 25
    """Eval loss is computed and reported to Tune every this many steps; ASHA decides only at reports."""
    grace_period: Annotated[int, Range(ge=1, example="50")] = 50
    """No trial is pruned before this many steps. The first rung; later rungs are grace * factor^k."""
    reduction_factor: Annotated[int, Range(ge=2, example="3")] = 3
    """ASHA keeps the best 1/factor of trials at each rung: 3 prunes about 2/3 at the first rung."""
    batch_size: Annotated[int, Range(ge=1, example="8")] = 8
    """Sequences per micro-batch (one forward/backward) per worker."""
    grad_accum: Annotated[int, Range(ge=1, example="1")] = 1
    """Micro-batches per optimizer step: a step sees batch_size x grad_accum sequences per worker. A trial runs them
    as fewer, larger micro-batches where its memory allows (`lora_search.train.micro_batching`), with the same loss; a
    pack host (`Resources.pack`) runs its trials' steps whole, or in as few micro-batches as fit (`memory.pack_fit`)."""
    warmup_steps: Annotated[int, Range(ge=0, example="0")] = 0
    lr_schedule: Schedule = "linear"
    """The learning rate after warmup, over max_steps (Transformers' `lr_scheduler_type`). Every trial of a sweep
    follows it to max_steps, so a trial pruned at a rung saw the same rates up to there as one that went on."""
    optimizer: Optimizer = "auto"
    """A Transformers `optim` name for the adapter's optimizer. "auto": paged 8-bit AdamW for 4-bit variants on
    GPU (QLoRA's recipe: 2 bytes of state per adapter parameter instead of 8, paged to the CPU under memory
    spikes) unless they train under FSDP (bitsandbytes cannot update its sharded parameters), fused AdamW on other
    GPU trials, plain AdamW on CPU. LoRA+ always builds its own AdamW groups."""
    sampling: Sampling = "random"
    """How a trial draws its rows into steps (Transformers' `train_sampling_strategy`). "random": the Trainer's
    seeded shuffle. "group_by_length": Transformers' `LengthGroupedSampler`, each step's rows of about one length, so
    a padded batch pads less: for padded attention, where no variable-length kernel runs (`fastpath`'s padding-free
    needs flash or flex attention). Either way every trial of a sweep sees the same rows at the same step (the sweep's
    seed), so ASHA compares trials on the same data; "group_by_length" orders steps by length within each group of
    about 50 steps, which a loss curve shows. Packed trials (`Resources.pack` > 1) take the rows at random."""
    gradient_checkpointing: Checkpointing = "auto"
    """"auto": off where the trial's activations without it fit its device (`lora_search.plan`'s estimate at
    batch_size x max_length against the GPU's share, or `resources.memory_limit_gb`), on otherwise. Recomputing the
    forward in backward costs about a third more compute per step (TRL's SFTConfig turns it on by default); keeping
    every layer's activations costs memory. "on" / "off" force it."""

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        out = []
        if ok("grace_period", "max_steps") and self.grace_period > self.max_steps:
            out.append(
                Problem(
                    "budget.grace_period",
                    self.grace_period,
                    f"exceeds max_steps={self.max_steps}, so ASHA could never prune",
                    f"set grace_period <= {self.max_steps}",
                )
            )
        if ok("eval_every", "max_steps") and self.eval_every > self.max_steps:
            out.append(
                Problem(
                    "budget.eval_every",
                    self.eval_every,
                    f"exceeds max_steps={self.max_steps}: no eval loss would ever be reported",
                    f"set eval_every <= {self.max_steps}",
                )
            )
        if ok("grace_period", "eval_every") and self.grace_period % self.eval_every:
            out.append(
                Problem(
                    "budget.grace_period",
                    self.grace_period,
                    f"is not a multiple of eval_every={self.eval_every}; ASHA only sees reports at those steps",
                    "make grace_period a multiple of eval_every",
                )
            )
        if ok("warmup_steps", "max_steps") and self.warmup_steps >= self.max_steps:
            out.append(
                Problem(
                    "budget.warmup_steps",
                    self.warmup_steps,
                    f"must be below max_steps={self.max_steps}: the learning rate would never reach its value",
                    f"e.g. warmup_steps={self.max_steps // 10}",
                )
            )
        return out


@dataclass(frozen=True)
class Resources:
    """What one trial gets. A trial is a Ray Train run of `workers` data-parallel workers."""

    workers: Annotated[int, Range(ge=1, example="1")] = 1
    cpus_per_worker: Annotated[float, Range(ge=0, example="1.0")] = 1.0
    gpus_per_worker: Annotated[float, Range(ge=0, example="1")] = 0.0
    """Fractions share a GPU between trials (0.25: four trials on one GPU); above 1, whole GPUs only."""
    placement: Placement = "PACK"
    """PACK keeps a trial's workers on one node when they fit (fast NCCL); SPREAD puts them on different nodes."""
    memory_limit_gb: Annotated[float, Range(gt=0, example="70")] | None = None
    """Stop a trial whose worker's peak memory passes this (GPU allocator peak, or the process's peak RSS on CPU)
    as `infeasible`, as a CUDA out-of-memory error does anyway: set it to keep trials within a budget smaller than
    the device. None: no limit of ours."""
    strategy: Name = "ddp"
    """How the workers share the model (`lora_search.strategies.STRATEGIES`): "ddp" replicates the base on every
    GPU; "fsdp" and "deepspeed-zero3" shard it (a 70B bf16 base is 131 GiB: 16.4 GiB a GPU over 8);
    "deepspeed-zero2" shards only the adapter's gradients and optimizer state. Sharding costs communication:
    take the least that fits (`lora-search plan` prints the memory per GPU of each)."""
    strategy_by_variant: dict[Name, Name] = field(default_factory=dict)
    """Per-variant overrides, e.g. {"qlora": "ddp"} beside strategy="fsdp": an NF4 70B base fits one GPU, so
    its trials skip the sharding traffic."""
    reuse_workers: bool = True
    """One-worker DDP trials (every variant's strategy "ddp", `workers=1`) are warm (`lora_search.trial.warm`): they
    train in their Tune trial process, not in a Ray Train worker group, and Tune hands that process on to the next
    trial (`reuse_actors`): its imports, CUDA context and the loaded base model (`lora_search.train.BaseCache`) carry
    over, where a worker group would start, import and load again for every trial. A lost trial process is retried by
    Tune (`trial.max_failures`) and trains on from its newest checkpoint, as a lost worker does. False: every trial
    starts its own Ray Train worker group."""
    pack: Annotated[int, Range(ge=1, example="4")] = 1
    """Trials that train together over one copy of the base on one device (`lora_search.pack`): up to this many
    adapters whose variant packs (`pack.packs`) attach to one base and step together, each still its own Tune trial.
    The pack's host reserves what one worker does (`gpus_per_worker`: a whole GPU, or a share of one beside other
    trials). 1: every trial alone (as before packing existed). `lora-search plan` shows how many fit a GPU."""

    def strategy_for(self, variant: str) -> str:
        return self.strategy_by_variant.get(variant, self.strategy)

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        from lora_search.strategies import STRATEGIES

        out = []
        names = ", ".join(STRATEGIES)
        named: list[tuple[str, str]] = []
        if ok("strategy", "strategy_by_variant", "gpus_per_worker"):
            named = [("resources.strategy", self.strategy)]
            named += [(f"resources.strategy_by_variant[{v!r}]", s) for v, s in self.strategy_by_variant.items()]
        for where, name in named:
            if name not in STRATEGIES:
                out.append(Problem(where, name, "unknown strategy", f"use one of {names}"))
            elif STRATEGIES[name].gpu_only and self.gpus_per_worker <= 0:
                out.append(
                    Problem(
                        where,
                        name,
                        "runs on CUDA GPUs only (Transformers' Trainer has no CPU FSDP path), but "
                        "resources.gpus_per_worker = 0",
                        'use strategy="ddp" or "deepspeed-zero3" on CPU, or gpus_per_worker=1 on a GPU cluster',
                    )
                )
        if ok("cpus_per_worker", "gpus_per_worker") and self.cpus_per_worker <= 0 and self.gpus_per_worker <= 0:
            out.append(
                Problem(
                    "resources.cpus_per_worker",
                    self.cpus_per_worker,
                    "a worker needs a CPU or a GPU, and gpus_per_worker is 0 too",
                    "e.g. cpus_per_worker=1",
                )
            )
        if ok("gpus_per_worker") and self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            out.append(
                Problem(
                    "resources.gpus_per_worker",
                    self.gpus_per_worker,
                    "Ray gives a worker either a fraction of one GPU or whole GPUs",
                    f"e.g. gpus_per_worker={int(self.gpus_per_worker)} or 0.5",
                )
            )
        if ok("pack", "workers", "strategy", "gpus_per_worker") and self.pack > 1:
            # A pack host holds one device, or a worker's share of it, and the base once (lora_search.pack_host); a
            # trial of several workers or a sharded base cannot be one of its adapters.
            needs = [
                ("resources.workers", self.workers, self.workers == 1, "workers=1, or pack=1"),
                ("resources.strategy", self.strategy, self.strategy == "ddp", 'strategy="ddp", or pack=1'),
                (
                    "resources.gpus_per_worker",
                    self.gpus_per_worker,
                    self.gpus_per_worker <= 1,
                    "gpus_per_worker of at most 1 (a host holds one GPU, or that share of it beside other trials) "
                    "or 0 on CPU, or pack=1",
                ),
            ]
            out += [
                Problem(where, value, f"resources.pack={self.pack} needs one device per host", fix)
                for where, value, fine, fix in needs
                if not fine
            ]
        return out


GPU_HOUR_PRICES = {"H200": 3.50, "H100": 2.50, "A100": 1.30, "L40S": 1.00, "A10G": 1.00, "L4": 0.70, "T4": 0.35}
"""Rough on-demand cloud prices per GPU-hour in USD (late 2026). Placeholders: set what you actually pay."""


@dataclass(frozen=True)
class Pricing:
    """What a device-hour costs: the cost column of every trial and the cost axis of the Pareto frontier.

    A trial's cost is its device-seconds x price / 3600, where device-seconds count every device the trial holds
    (workers x GPUs per worker; on CPU workers x cores per worker) for as long as it holds them: start-up,
    loading and training count as training, golden-set scoring as eval. Example: 1 worker x 8 H100 for 30 min
    = 4 device-hours = $10 at $2.50.
    """

    gpu_hour: dict[Name, Annotated[float, Range(ge=0, example="2.5")]] = field(
        default_factory=lambda: dict(GPU_HOUR_PRICES)
    )
    """Price per GPU-hour by device type: a key matches when it appears in torch's device name
    ("NVIDIA H100 80GB HBM3" matches "H100"); the longest matching key wins."""
    default_gpu_hour: Annotated[float, Range(ge=0, example="2.0")] = 2.00
    """For a GPU whose name matches no key of `gpu_hour`."""
    cpu_core_hour: Annotated[float, Range(ge=0, example="0.04")] = 0.04
    """Price per CPU core-hour (a cloud vCPU is about $0.02-0.05)."""
    currency: Annotated[str, Range(ge=1, example="'USD'")] = "USD"
    reference_trial_hours: Annotated[float, Range(gt=0, example="1.0")] = 1.0
    """The Pareto hypervolume's cost reference: a trial costing as much as this many hours of its devices adds
    nothing. Fixed by the sweep, not by its trials, so nightly hypervolumes compare; raise it for long trials."""

    def per_device_hour(self, device_name: str) -> float:
        """Price of one device-hour of `device_name` ("cpu", or torch.cuda.get_device_name())."""
        if device_name.lower() == "cpu":
            return self.cpu_core_hour
        matches = [k for k in self.gpu_hour if k.lower() in device_name.lower()]
        return self.gpu_hour[max(matches, key=len)] if matches else self.default_gpu_hour

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        return []


@dataclass(frozen=True)
class Evals:
    """Which golden sets score each completed trial, and the primary objective among their metrics
    (`lora_search.evals` scores them)."""

    tasks: tuple[Annotated[str, Range(ge=1, example="'tiny_mood'")], ...]
    """lm-eval task names defined by YAML files in `tasks_dir`."""
    objective: Annotated[str, Range(ge=1, example="'tiny_mood/acc'")]
    """`task/metric`, e.g. `tiny_mood/acc`; its direction is lm-eval's `higher_is_better` for that metric."""
    tasks_dir: Annotated[str, Range(ge=1, example="'evals/tasks'")] = "evals/tasks"
    batch_size: Annotated[int, Range(ge=1, example="16")] = 16
    limit: Annotated[int, Range(ge=1, example="100")] | None = None
    """Score only the first N examples of each task (a quick look; the full set is the real score)."""
    reuse_base_scores: bool = True
    """Reuse the base's golden scores from an earlier sweep that scored the same base (weights fingerprint, dtype) on
    the same golden sets (task YAML, data and code files), limit, batch size, seed, device kind and library versions
    (`lora_search.evals.BaseScoresCache`, under `$LORA_SEARCH_CACHE/base_scores/`): a nightly sweep then scores the
    base once, not every night. False: score it again."""

    def problems(self, ok: Fields = _everything) -> list[Problem]:
        if not ok("objective", "tasks"):
            return []
        task, _, metric = self.objective.partition("/")
        if metric and task in self.tasks:
            return []
        return [
            Problem(
                "evals.objective",
                self.objective,
                "must be 'task/metric' with task in evals.tasks",
                f"e.g. '{self.tasks[0]}/acc'",
            )
        ]


def _in_sweep_script() -> bool:
    """Whether this Sweep is being built at the top level of a script run as `python sweeps/x.py`. Its problems are
    then not raised here, which would print a traceback before the script's `main(SWEEP)` runs: `main` and `run`
    check the sweep again and report every problem in the one-message, exit-2 form."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in (__name__, "dataclasses"):
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "<module>":
        return False
    return frame.f_globals.get("__name__") == "__main__" and "__file__" in frame.f_globals  # not a REPL or notebook


def _broken_parts(problems: list[Problem], depth: int = 1) -> set[str]:
    """The Sweep fields (`base`, `space`, `num_samples`, ...) these problems are about; with depth=2 the fields of
    those parts (`space.ranks`)."""
    out = set()
    for p in problems:
        path = re.split(r"[\[ ]", p.field, maxsplit=1)[0].split(".")
        out.add(".".join(path[:depth]))
    return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Sweep:
    """One LoRA hyperparameter sweep. Results land in `<output_dir>/<name>/`."""

    name: Annotated[str, Range(ge=1, example="'mine'")]
    base: BaseModel
    dataset: Dataset
    space: SearchSpace = field(default_factory=SearchSpace)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    search: SearchAlgorithm = "random"
    """random and optuna (TPE through Ray's OptunaSearch) draw `num_samples` trials; grid runs every combination
    `num_samples` times."""
    scheduler: Scheduler = "pareto-asha"
    """Which trials stop at a rung (`Budget` sets the rungs). "pareto-asha" (the default): `lora_search.pareto_asha`,
    on eval loss, adapter bytes and device-seconds a step together: a small or cheap adapter a little behind on loss
    goes on where it may reach the frontier, and about the same 1/reduction_factor of trials go on from each rung;
    where only one axis differs it decides exactly as Ray's ASHA. "asha": the same on eval loss alone (Ray's ASHA's
    decisions). Replayed over the recorded grid of the real model (119 configurations, 20 seeds,
    benchmarks/replay_grid_smollm2_h200_2026-12-04.json), Pareto ASHA reached 95% of the grid frontier's hypervolume
    at 0.10x the grid's compute (all 20 seeds), loss-only ASHA in 7 of 20 seeds; a whole random sweep found 99% and
    93% of it, for about the same compute (35% and 37% of the grid's); README "How much compute does a sweep
    save?"."""
    num_samples: Annotated[int, Range(ge=1, example="16")] = 16
    seed: Annotated[int, Range(ge=0, lt=2**32, example="0")] = 0
    """Seeds torch, numpy (which takes 0 <= seed < 2**32), the data order and the searcher."""
    output_dir: Annotated[str, Range(ge=1, example="'reports'")] = field(
        default_factory=lambda: os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports")
    )
    """Relative paths resolve against the driver's working directory. Under `ray job submit --working-dir` that
    is a temporary copy: point LORA_SEARCH_OUTPUT_DIR (or this field) at storage that outlives the job."""
    max_concurrent_trials: Annotated[int, Range(ge=1, example="4")] | None = None
    """None: as many as the cluster's CPUs/GPUs fit at `resources` per trial."""
    evals: Evals | None = None
    """Golden sets (lm-eval tasks) that score every completed trial and the base model; None: eval loss only."""
    pricing: Pricing = field(default_factory=Pricing)
    tracking_uri: str | None = None
    """MLflow tracking URI (`http://mlflow.internal:5000`, `sqlite:///...`). None: $MLFLOW_TRACKING_URI, else a
    SQLite store at `<output_dir>/mlflow.db` with artifacts in `<output_dir>/mlartifacts` (`lora-search ui`).
    "off": no MLflow at all; every result still lands in the sweep dir (trials.parquet, adapters, index.html)."""
    serve_with: ServeWith = "any"
    """The engine the winners will be served with: "vllm", "sglang" or "tensorrt-llm" keeps the frontier to adapters
    that engine loads as saved (`lora_search.serving` RULES: vLLM and SGLang refuse DoRA, SGLang serves rsLoRA at the
    wrong scale, none takes VeRA or AdaLoRA; the others stay in the table, marked), trading the frontier's best
    points for ones you can serve unmerged. "any": every completed trial is a candidate."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems and (collecting() or not _in_sweep_script()):
            collect_or_raise(problems, header=f"invalid sweep {self.name!r}")

    def problems(self) -> list[Problem]:
        """Every problem with the sweep's own values: first each field against its annotation (`checks`), then,
        for the parts whose fields all conform, what relates one field to another."""
        out = field_problems(self, "")
        broken = _broken_parts(out, depth=2)
        if "name" not in broken and not _NAME.match(self.name):
            out.append(Problem("name", self.name, "must be letters, digits, '_', '-', '.'", "it names reports/<name>/"))
        parts = ("base", "dataset", "space", "budget", "resources", "evals", "pricing")
        for name in parts:
            part = getattr(self, name)
            if part is not None and name not in broken:  # a whole part of the wrong type is reported as such
                out.extend(part.problems(lambda *fields, name=name: not broken & {f"{name}.{f}" for f in fields}))
        if self.conforms("space.variants", "resources", "budget.optimizer"):
            out.extend(self._strategy_problems())
        grouped = self.conforms("budget.sampling", "resources.pack") and self.budget.sampling != "random"
        if grouped and self.resources.pack > 1:
            out.append(
                Problem(
                    "budget.sampling",
                    self.budget.sampling,
                    f"packed trials (resources.pack={self.resources.pack}) take their rows in the Trainer's random "
                    "order (lora_search.pack_trial), so the sweep's trials would not see the same rows a step",
                    'sampling="random", or resources.pack=1',
                )
            )
        if self.conforms("space.variants", "serve_with") and self.serve_with != "any":
            from lora_search.serving import can_serve
            from lora_search.variants import VARIANTS

            if not can_serve(self.space.variants, self.serve_with):
                out.append(
                    Problem(
                        "serve_with",
                        self.serve_with,
                        f"no variant of space.variants ({', '.join(self.space.variants)}) saves an adapter "
                        f"{self.serve_with} loads, so the frontier would be empty",
                        f"add one of {', '.join(sorted(can_serve(tuple(VARIANTS), self.serve_with)))}, or "
                        "serve_with='any' (merged "
                        "models: lora-search export --merge)",
                    )
                )
        return out

    def conforms(self, *names: str) -> bool:
        """Whether the named parts or fields (`"base"`, `"space.targets"`, ...) have every field as annotated, in
        type and range: a pre-flight check runs only on what it reads conforming, so it need not guard against a
        string where a number belongs, and it adds no second message about a value already reported."""
        broken = _broken_parts(field_problems(self, ""), depth=2)
        return not any(b == n or n.startswith(b + ".") or b.startswith(n + ".") for b in broken for n in names)

    def _strategy_problems(self) -> list[Problem]:
        from lora_search.strategies import STRATEGIES, incompatibility

        out = []
        for v in self.resources.strategy_by_variant:
            if v not in self.space.variants:
                out.append(
                    Problem(
                        f"resources.strategy_by_variant[{v!r}]",
                        v,
                        f"is not a variant of this sweep ({', '.join(self.space.variants)}): it would do nothing",
                        "fix the name, or add the variant to space.variants",
                    )
                )
        fsdp = sorted(v for v in self.space.variants if self.resources.strategy_for(v) == "fsdp")
        if fsdp and self.budget.optimizer in BITSANDBYTES_OPTIMIZERS:
            out.append(
                Problem(
                    "budget.optimizer",
                    self.budget.optimizer,
                    f"bitsandbytes optimizers cannot update FSDP2's sharded (DTensor) adapter parameters, and "
                    f"{', '.join(fsdp)} train under strategy 'fsdp'",
                    "use optimizer='auto' (fused AdamW under FSDP, its state sharded) or 'adamw_torch_fused', or "
                    "strategy 'deepspeed-zero3' for those variants",
                )
            )
        for v in self.space.variants:
            strategy = self.resources.strategy_for(v)
            why = incompatibility(v, strategy) if strategy in STRATEGIES else None
            if why:
                out.append(
                    Problem(
                        "space.variants",
                        v,
                        f"cannot train under strategy {strategy!r}: {why}",
                        f"drop {v!r}, or give it an unsharded strategy: "
                        f'Resources(strategy_by_variant={{"{v}": "ddp"}})',
                    )
                )
        return out

    def replace(self, **changes: Any) -> Sweep:
        """A copy with top-level fields changed (`sweep.replace(num_samples=4)`)."""
        return dataclasses.replace(self, **changes)
