"""The sweep definition: frozen dataclasses for the base model, data, search space, budget and resources.

A sweep file builds one `Sweep` and hands it to `lora_search.run`:

    python sweeps/tiny.py            # or: lora-search run sweeps/tiny.py

Every part is frozen because trial configs travel to Ray workers and must not drift. `Sweep` checks all
of its parts at construction and raises one `ConfigError` naming every problem (field, value, fix).
Checks that need the outside world (the model's config, the data files, CUDA) run in
`lora_search.preflight` before any trial starts; `lora-search validate` reports both kinds together.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lora_search.evals import Evals

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
SearchAlgorithm = Literal["random", "grid", "optuna"]
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Targets = str | tuple[str, ...]
"""A target-module preset name (see `lora_search.targets.PRESETS`) or an explicit tuple of module names."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a sweep: where (`field`, or `file:line` for data), what was given, how to fix it."""

    field: str
    value: Any
    message: str
    fix: str = ""

    def __str__(self) -> str:
        shown = "" if self.value is None else f" = {self.value!r}"
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.field}{shown}: {self.message}.{fix}"


class ConfigError(ValueError):
    """A sweep that cannot run. `problems` holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem], header: str = "invalid sweep") -> None:
        self.problems = list(problems)
        lines = [f"{header}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


_collected: contextvars.ContextVar[list[Problem] | None] = contextvars.ContextVar("collected", default=None)


@contextlib.contextmanager
def collecting_problems() -> Iterator[list[Problem]]:
    """Within this block a `Sweep` with problems is still built and its problems land in the yielded list.

    `lora-search validate` and `run` use it so that construction problems and pre-flight problems
    (missing modules, broken data lines) are reported together in one message.
    """
    problems: list[Problem] = []
    token = _collected.set(problems)
    try:
        yield problems
    finally:
        _collected.reset(token)


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""`BaseModel.attn_implementation` values (Transformers' names)."""


@dataclass(frozen=True)
class BaseModel:
    """The model every trial adapts."""

    name_or_path: str
    """A Hugging Face hub id (`meta-llama/Llama-3.1-8B`) or a local directory with config.json and weights."""
    revision: str | None = None
    """Hub revision (branch, tag or commit). Pin a commit for reproducible nightly sweeps."""
    dtype: Dtype = "float32"
    """Weights dtype. bfloat16 halves memory on GPUs; CPUs train fastest and most exactly in float32."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust that repository."""
    attn_implementation: str = "sdpa"
    """Transformers' attention kernel. A varlen kernel ("flash_attention_2" with flash-attn installed,
    "flash_attention_3", "flex_attention") also turns on padding-free batches (`lora_search.fastpath`); "eager" is
    the slow reference."""

    def problems(self) -> list[Problem]:
        out = []
        if not self.name_or_path:
            out.append(
                Problem("base.name_or_path", self.name_or_path, "is empty", "give a hub id or a local model dir")
            )
        if self.attn_implementation not in ATTENTION:
            out.append(
                Problem(
                    "base.attn_implementation",
                    self.attn_implementation,
                    "unknown attention kernel",
                    f"use one of {', '.join(ATTENTION)}",
                )
            )
        return out


@dataclass(frozen=True)
class Dataset:
    """Training data. Local JSONL rows are either chat (`{"messages": [{"role", "content"}, ...]}`) or
    instruction (`{"instruction", "input"?, "output"}`); a local dir saved by `datasets` or a hub id also works."""

    path: str
    eval_path: str | None = None
    """Held-out rows for the eval loss that ASHA prunes on. Without it, `eval_fraction` of `path` is held out."""
    eval_fraction: float = 0.1
    max_length: int = 512
    """Longer rows are truncated. Memory per trial grows linearly with it (activations)."""
    split: str = "train"
    """Split to read when `path` is a hub id or a `datasets` dir."""

    def problems(self) -> list[Problem]:
        out = []
        if not self.path:
            out.append(Problem("dataset.path", self.path, "is empty", "give a .jsonl file, a dataset dir or hub id"))
        if self.eval_path is None and not 0.0 < self.eval_fraction < 1.0:
            out.append(
                Problem("dataset.eval_fraction", self.eval_fraction, "must be in (0, 1)", "e.g. 0.1, or set eval_path")
            )
        if self.max_length < 8:
            out.append(Problem("dataset.max_length", self.max_length, "must be >= 8 tokens", "e.g. 512"))
        return out


@dataclass(frozen=True)
class SearchSpace:
    """What the sweep varies. Discrete axes are sampled uniformly (or gridded); lr is log-uniform."""

    ranks: tuple[int, ...] = (8, 16)
    """LoRA rank r. Adapter size and trainable params grow linearly with r."""
    alpha_over_rank: tuple[float, ...] = (2.0,)
    """lora_alpha = ratio * r. Ignored when `alpha` is set. (rsLoRA scales by alpha/sqrt(r) instead of alpha/r.)"""
    alpha: tuple[float, ...] | None = None
    """Absolute lora_alpha values; overrides `alpha_over_rank`."""
    targets: tuple[Targets, ...] = ("all-linear",)
    """Presets: attention (q,v), attention-all (q,k,v,o), mlp (gate,up,down), all-linear; or tuples of names."""
    variants: tuple[str, ...] = ("lora",)
    """Rows of `lora_search.variants.VARIANTS`."""
    lr: tuple[float, float] = (1e-4, 1e-3)
    """(low, high) of a log-uniform learning-rate range."""
    lr_grid_points: int = 3
    """With search='grid', lr takes this many geometrically spaced values from the range."""
    dropout: tuple[float, ...] = (0.0,)

    def problems(self) -> list[Problem]:
        from lora_search.targets import PRESETS
        from lora_search.variants import VARIANTS

        out = []
        for name in ("ranks", "targets", "variants", "dropout", "alpha_over_rank"):
            if len(getattr(self, name)) == 0:
                out.append(Problem(f"space.{name}", getattr(self, name), "is empty", "give at least one value"))
        for r in self.ranks:
            if not isinstance(r, int) or r < 1:
                out.append(Problem("space.ranks", r, "rank must be a positive integer", "e.g. ranks=(8, 16)"))
        for a in self.alpha if self.alpha is not None else ():
            if not a > 0:
                out.append(
                    Problem("space.alpha", a, "lora_alpha must be > 0", "e.g. alpha=(16,) or use alpha_over_rank")
                )
        if self.alpha is not None and len(self.alpha) == 0:
            out.append(Problem("space.alpha", self.alpha, "is empty", "drop it to use alpha_over_rank"))
        for ratio in self.alpha_over_rank:
            if not ratio > 0:
                out.append(Problem("space.alpha_over_rank", ratio, "must be > 0", "e.g. (1.0, 2.0)"))
        if len(self.lr) != 2:
            out.append(Problem("space.lr", self.lr, "must be a (low, high) pair", "e.g. lr=(1e-4, 1e-3)"))
        else:
            low, high = self.lr
            if not (0 < low < high and math.isfinite(high)):
                out.append(
                    Problem("space.lr", self.lr, "need 0 < low < high", f"e.g. lr=({min(self.lr)}, {max(self.lr)})")
                )
        if self.lr_grid_points < 1:
            out.append(Problem("space.lr_grid_points", self.lr_grid_points, "must be >= 1", "e.g. 3"))
        for d in self.dropout:
            if not 0.0 <= d < 1.0:
                out.append(Problem("space.dropout", d, "must be in [0, 1)", "e.g. dropout=(0.0, 0.05)"))
        for v in self.variants:
            if v not in VARIANTS:
                out.append(
                    Problem(
                        "space.variants",
                        v,
                        f"unknown variant; known: {', '.join(VARIANTS)}",
                        "fix the name, or add a row to VARIANTS in lora_search/variants.py",
                    )
                )
        for t in self.targets:
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
            elif not t or not all(isinstance(m, str) and m for m in t):
                out.append(Problem("space.targets", t, "must be a non-empty tuple of module names", "e.g. ('q_proj',)"))
        return out


OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")
"""`Budget.optimizer` values: Transformers `optim` names (the 8-bit and paged ones need bitsandbytes and CUDA)."""
BITSANDBYTES_OPTIMIZERS = frozenset({"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"})
CHECKPOINTING = ("auto", "on", "off")
"""`Budget.gradient_checkpointing` values."""


@dataclass(frozen=True)
class Budget:
    """How long each trial trains and how ASHA cuts it short. ASHA's time unit is the optimizer step."""

    max_steps: int = 200
    """Optimizer steps of a trial that is never pruned."""
    eval_every: int = 25
    """Eval loss is computed and reported to Tune every this many steps; ASHA decides only at reports."""
    grace_period: int = 50
    """No trial is pruned before this many steps. The first rung; later rungs are grace * factor^k."""
    reduction_factor: int = 3
    """ASHA keeps the best 1/factor of trials at each rung: 3 prunes about 2/3 at the first rung."""
    batch_size: int = 8
    """Sequences per micro-batch (one forward/backward) per worker."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: a step sees batch_size x grad_accum sequences per worker. A trial runs them
    as fewer, larger micro-batches where its memory allows (`lora_search.train.micro_batching`), with the same loss."""
    warmup_steps: int = 0
    optimizer: str = "auto"
    """A Transformers `optim` name for the adapter's optimizer. "auto": paged 8-bit AdamW for 4-bit variants on
    GPU (QLoRA's recipe: 2 bytes of state per adapter parameter instead of 8, paged to the CPU under memory
    spikes) unless they train under FSDP (bitsandbytes cannot update its sharded parameters), fused AdamW on other
    GPU trials, plain AdamW on CPU. LoRA+ always builds its own AdamW groups."""
    gradient_checkpointing: str = "auto"
    """"auto": off where the trial's activations without it fit its device (`lora_search.plan`'s estimate at
    batch_size x max_length against the GPU's share, or `resources.memory_limit_gb`), on otherwise. Recomputing the
    forward in backward costs about a third more compute per step (TRL's SFTConfig turns it on by default); keeping
    every layer's activations costs memory. "on" / "off" force it."""

    def problems(self) -> list[Problem]:
        out = []
        for name in ("max_steps", "eval_every", "grace_period", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                out.append(Problem(f"budget.{name}", value, "must be a positive integer", ""))
        if out:
            return out
        if self.optimizer not in OPTIMIZERS:
            out.append(
                Problem("budget.optimizer", self.optimizer, "unknown optimizer", f"use one of {', '.join(OPTIMIZERS)}")
            )
        if self.gradient_checkpointing not in CHECKPOINTING:
            out.append(
                Problem(
                    "budget.gradient_checkpointing",
                    self.gradient_checkpointing,
                    "unknown setting",
                    f"use one of {', '.join(CHECKPOINTING)}",
                )
            )
        if self.grace_period > self.max_steps:
            out.append(
                Problem(
                    "budget.grace_period",
                    self.grace_period,
                    f"exceeds max_steps={self.max_steps}, so ASHA could never prune",
                    f"set grace_period <= {self.max_steps}",
                )
            )
        if self.eval_every > self.max_steps:
            out.append(
                Problem(
                    "budget.eval_every",
                    self.eval_every,
                    f"exceeds max_steps={self.max_steps}: no eval loss would ever be reported",
                    f"set eval_every <= {self.max_steps}",
                )
            )
        if self.grace_period % self.eval_every:
            out.append(
                Problem(
                    "budget.grace_period",
                    self.grace_period,
                    f"is not a multiple of eval_every={self.eval_every}; ASHA only sees reports at those steps",
                    "make grace_period a multiple of eval_every",
                )
            )
        if self.reduction_factor < 2:
            out.append(Problem("budget.reduction_factor", self.reduction_factor, "must be >= 2", "e.g. 3"))
        if not 0 <= self.warmup_steps < self.max_steps:
            out.append(Problem("budget.warmup_steps", self.warmup_steps, "must be in [0, max_steps)", ""))
        return out


@dataclass(frozen=True)
class Resources:
    """What one trial gets. A trial is a Ray Train run of `workers` data-parallel workers."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement: Placement = "PACK"
    """PACK keeps a trial's workers on one node when they fit (fast NCCL); SPREAD puts them on different nodes."""
    memory_limit_gb: float | None = None
    """Stop a trial whose worker's peak memory passes this (GPU allocator peak, or the process's peak RSS on CPU)
    as `infeasible`, as a CUDA out-of-memory error does anyway: set it to keep trials within a budget smaller than
    the device. None: no limit of ours."""
    strategy: str = "ddp"
    """How the workers share the model (`lora_search.strategies.STRATEGIES`): "ddp" replicates the base on every
    GPU; "fsdp" and "deepspeed-zero3" shard it (a 70B bf16 base is 131 GiB: 16.4 GiB a GPU over 8);
    "deepspeed-zero2" shards only the adapter's gradients and optimizer state. Sharding costs communication:
    take the least that fits (`lora-search plan` prints the memory per GPU of each)."""
    strategy_by_variant: dict[str, str] = field(default_factory=dict)
    """Per-variant overrides, e.g. {"qlora": "ddp"} beside strategy="fsdp": an NF4 70B base fits one GPU, so
    its trials skip the sharding traffic."""
    reuse_workers: bool = True
    """One-worker DDP trials (every variant's strategy "ddp", `workers=1`) train in their Tune trial process, and
    Tune hands that process on to the next trial (`reuse_actors`): its imports, CUDA context and the loaded base
    model (`lora_search.basemodel.BaseCache`) carry over, where a Ray Train worker group would start, import and
    load again for every trial. It is still a Ray Train run (TorchTrainer's one-process local mode); a lost
    process trains on from its last checkpoint as a lost worker does. False: every trial starts its own worker."""

    def strategy_for(self, variant: str) -> str:
        return self.strategy_by_variant.get(variant, self.strategy)

    def problems(self) -> list[Problem]:
        from lora_search.strategies import STRATEGIES

        out = []
        names = ", ".join(STRATEGIES)
        for where, name in (("resources.strategy", self.strategy),) + tuple(
            (f"resources.strategy_by_variant[{v!r}]", s) for v, s in self.strategy_by_variant.items()
        ):
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
        if self.workers < 1:
            out.append(Problem("resources.workers", self.workers, "must be >= 1", ""))
        if self.memory_limit_gb is not None and not self.memory_limit_gb > 0:
            out.append(Problem("resources.memory_limit_gb", self.memory_limit_gb, "must be > 0 or None", "e.g. 70"))
        if self.cpus_per_worker <= 0 and self.gpus_per_worker <= 0:
            out.append(Problem("resources.cpus_per_worker", self.cpus_per_worker, "a worker needs a CPU or a GPU", ""))
        if self.gpus_per_worker < 0:
            out.append(Problem("resources.gpus_per_worker", self.gpus_per_worker, "must be >= 0", ""))
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

    gpu_hour: dict[str, float] = field(default_factory=lambda: dict(GPU_HOUR_PRICES))
    """Price per GPU-hour by device type: a key matches when it appears in torch's device name
    ("NVIDIA H100 80GB HBM3" matches "H100"); the longest matching key wins."""
    default_gpu_hour: float = 2.00
    """For a GPU whose name matches no key of `gpu_hour`."""
    cpu_core_hour: float = 0.04
    """Price per CPU core-hour (a cloud vCPU is about $0.02-0.05)."""
    currency: str = "USD"
    reference_trial_hours: float = 1.0
    """The Pareto hypervolume's cost reference: a trial costing as much as this many hours of its devices adds
    nothing. Fixed by the sweep, not by its trials, so nightly hypervolumes compare; raise it for long trials."""

    def per_device_hour(self, device_name: str) -> float:
        """Price of one device-hour of `device_name` ("cpu", or torch.cuda.get_device_name())."""
        if device_name.lower() == "cpu":
            return self.cpu_core_hour
        matches = [k for k in self.gpu_hour if k.lower() in device_name.lower()]
        return self.gpu_hour[max(matches, key=len)] if matches else self.default_gpu_hour

    def problems(self) -> list[Problem]:
        out = []
        prices = {f"pricing.gpu_hour[{k!r}]": v for k, v in self.gpu_hour.items()}
        prices |= {"pricing.default_gpu_hour": self.default_gpu_hour, "pricing.cpu_core_hour": self.cpu_core_hour}
        for name, value in prices.items():
            if not isinstance(value, int | float) or value < 0 or math.isnan(value):
                out.append(Problem(name, value, "must be a price >= 0", "a price per device-hour, e.g. 2.5"))
        if not self.reference_trial_hours > 0:
            out.append(Problem("pricing.reference_trial_hours", self.reference_trial_hours, "must be > 0", "e.g. 1.0"))
        return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Sweep:
    """One LoRA hyperparameter sweep. Results land in `<output_dir>/<name>/`."""

    name: str
    base: BaseModel
    dataset: Dataset
    space: SearchSpace = field(default_factory=SearchSpace)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    search: SearchAlgorithm = "random"
    """random and optuna (TPE through Ray's OptunaSearch) draw `num_samples` trials; grid runs every combination
    `num_samples` times."""
    num_samples: int = 16
    seed: int = 0
    output_dir: str = field(default_factory=lambda: os.environ.get("LORA_SEARCH_OUTPUT_DIR", "reports"))
    """Relative paths resolve against the driver's working directory. Under `ray job submit --working-dir` that
    is a temporary copy: point LORA_SEARCH_OUTPUT_DIR (or this field) at storage that outlives the job."""
    max_concurrent_trials: int | None = None
    """None: as many as the cluster's CPUs/GPUs fit at `resources` per trial."""
    evals: Evals | None = None
    """Golden sets (lm-eval tasks) that score every completed trial and the base model; None: eval loss only."""
    pricing: Pricing = field(default_factory=Pricing)
    tracking_uri: str | None = None
    """MLflow tracking URI (`http://mlflow.internal:5000`, `sqlite:///...`). None: $MLFLOW_TRACKING_URI, else a
    SQLite store at `<output_dir>/mlflow.db` with artifacts in `<output_dir>/mlartifacts` (`lora-search ui`).
    "off": no MLflow at all; every result still lands in the sweep dir (trials.parquet, adapters, index.html)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if not problems:
            return
        collected = _collected.get()
        if collected is None:
            raise ConfigError(problems, header=f"invalid sweep {self.name!r}")
        collected.extend(problems)

    def problems(self) -> list[Problem]:
        out = []
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            out.append(Problem("name", self.name, "must be letters, digits, '_', '-', '.'", "it names reports/<name>/"))
        for part in (self.base, self.dataset, self.space, self.budget, self.resources, self.evals, self.pricing):
            if part is not None:
                out.extend(part.problems())
        out.extend(self._strategy_problems())
        if self.search not in ("random", "grid", "optuna"):
            out.append(Problem("search", self.search, "unknown search algorithm", "use random, grid or optuna"))
        if self.num_samples < 1:
            out.append(Problem("num_samples", self.num_samples, "must be >= 1", ""))
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            out.append(Problem("max_concurrent_trials", self.max_concurrent_trials, "must be >= 1 or None", ""))
        return out

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
