"""What a sweep will need before it starts: trials, GPUs, memory per GPU, ASHA's budget, GPU-hours and cost.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lora_search import space, targets
from lora_search.config import BaseModel, ConfigError, Problem, Resources, Sweep
from lora_search.strategies import STRATEGIES
from lora_search.targets import LinearLayer

if TYPE_CHECKING:
    import torch

AdapterKind = Literal["lora", "dora", "vera", "adalora"]


@dataclass(frozen=True)
class Gpu:
    memory_gib: float
    """What nvidia-smi reports as total memory (H100 SXM 80GB: 81559 MiB; H200: 143771 MiB)."""
    bf16_tflops: float
    """Dense bf16 peak (NVIDIA datasheets, SXM; the 2x "with sparsity" figures do not apply to training)."""


GPUS: dict[str, Gpu] = {
    "H100": Gpu(memory_gib=81559 / 1024, bf16_tflops=989.4),
    "H200": Gpu(memory_gib=143771 / 1024, bf16_tflops=989.4),
}
GPU_LABELS = {"H100": "H100 80GB", "H200": "H200 141GB"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

USABLE_FRACTION = 0.9
"""A row fits a GPU when its total is at most 90% of the GPU's memory: the CUDA context and NCCL buffers take
1-3 GiB, and PyTorch's caching allocator fragments."""

NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
"""Bytes per NF4 weight with double quantisation (QLoRA, Dettmers et al. 2023): 4 bits of code, plus one 8-bit
absmax per 64-weight block (0.125 bits) and one fp32 constant per 256 absmax (32 / 16384 = 0.002 bits):
4.127 bits = 0.5159 bytes."""

ADAPTER_WEIGHT_BYTES = 4
"""Per trainable parameter: fp32 (PEFT's autocast_adapter_dtype keeps adapters fp32 under a bf16 base)."""
ADAPTER_GRAD_BYTES = 4
"""Per trainable parameter: the gradient, in the weight's dtype (fp32)."""

ADAM_BYTES = 4 + 4
"""Per trainable parameter: AdamW's exp_avg and exp_avg_sq in fp32. No fp32 master copy: the trainable weights
are fp32 already and mixed precision is bf16 autocast (a bf16-weight setup would add 4 bytes for the master)."""

BLOCK_ACTIVATION_FACTOR = 87
"""Bytes per token per hidden unit of one decoder block's forward and backward (its recompute under gradient
checkpointing). Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 2,
gives s*b*h*(34 + 5*a*s/h) for the activations a GPT block stores in 16-bit training (no tensor parallelism);
the 5*a*s/h attention-score term is 0 with SDPA/flash attention, which never materialise the scores. A Llama
block with LoRA under bf16 autocast measured 87 (Llama-3.1-70B widths, s=2048, b=1, H100): the SwiGLU MLP's
3.5h-wide intermediates, RMSNorm's fp32 upcasts and the backward's gradient buffers come on top of the 34."""

LIGER_BLOCK_FACTOR = 48
"""`BLOCK_ACTIVATION_FACTOR` of a trial with Liger's kernels on (RMSNorm, SwiGLU and RoPE keep less for backward)
and TRL's fused LM head (the loss scored in chunks: no s*b*vocab logits), without checkpointing: measured 45.8 on
the Llama-3-8B shape (seq 2048, micro-batch 2, r16 on all 7 projections: 38.5 GiB peak on an H200, of which
15.0 GiB weights and 0.6 GiB adapter state; benchmarks/speed_h200_2026-12-01.json), rounded up. Only the trial,
which knows Liger is active on its worker, uses it (`lora_search.train.micro_batching`); the plan stays at 87."""

CHECKPOINT_BYTES = 2
"""Bytes per token per hidden unit that gradient checkpointing keeps at each decoder-layer boundary (the bf16
input of the layer)."""

LOGIT_BYTES = 12
"""Bytes per output logit (s*b*vocab) at the loss: the bf16 logits (2), the fp32 log-softmax that cross-entropy
keeps for backward (4), and in backward its fp32 gradient (4) and the logits' bf16 gradient (2). Measured 11.8 to
12.0 bytes on an H100 (Llama-3.1-8B, b = 1, 4 and 8). Large for Llama-3's 128256-token vocab: 2048 tokens x
128256 x 12 bytes = 2.9 GiB a sequence, more than all 80 layer checkpoints of the 70B (2048 x 8192 x 2 x 80 = 2.5)."""

LORA_FLOPS_PER_PARAM = 4
"""FLOPs per token per matmul weight for LoRA on a frozen base: forward 2N, backward 2N for the activation
gradients, no weight gradients (Kaplan et al. 2020's 6N for full training, minus the 2N weight-gradient
term). Adapter FLOPs (r << h) and attention's s-dependent FLOPs (~4*s*h*layers, 4-7% at s=2048) are left out.
MFU counts model FLOPs only, so gradient checkpointing's recomputed forward (+2N) shows as a lower MFU."""


@dataclass(frozen=True)
class Architecture:
    """What the plan needs from a model, read off its meta-device build."""

    source: str
    params: int
    embedding_params: int
    """The input embedding: a lookup, so no FLOPs."""
    head_params: int
    """The output head (0 when tied to the embedding)."""
    linears: tuple[LinearLayer, ...]
    """The decoder's nn.Linear layers (the head excluded): what adapters target and what NF4 quantises."""
    hidden: int
    num_layers: int
    vocab: int
    dtype_bytes: int
    """Bytes per weight of the config's dtype (what BaseModel(dtype="auto") loads)."""

    @property
    def linear_params(self) -> int:
        return sum(layer.in_features * layer.out_features for layer in self.linears)

    @property
    def block_params(self) -> float:
        """One decoder layer: (params - embedding - head) / layers (the final norm spread over the layers)."""
        return (self.params - self.embedding_params - self.head_params) / self.num_layers


@dataclass(frozen=True)
class MemoryRow:
    """Estimated peak memory per GPU of one variant x rank, at the space's target set that needs most."""

    variant: str
    rank: int
    targets: str
    trainable: int
    """Trainable parameters of the whole adapter (every GPU of the trial together)."""
    weights: float
    adapter: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.optimizer + self.activations

    def fits(self, gpu: str) -> bool:
        return self.total <= USABLE_FRACTION * GPUS[gpu].memory_gib * 2**30


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


def architecture(model: torch.nn.Module, source: str) -> Architecture:
    """The plan's view of a (meta-device) model."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return Architecture(
        source=source,
        params=sum(p.numel() for p in model.parameters()),  # tied weights are yielded once
        embedding_params=embedding.numel(),
        head_params=0 if head is None or tied else head.weight.numel(),
        linears=tuple(targets.linear_layers(model)),
        hidden=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        dtype_bytes=embedding.element_size(),
    )


def read_architecture(base: BaseModel, config_dir: str | Path | None = None) -> Architecture:
    """`base`'s architecture from `config_dir` when given (no hub access needed), else from `base` itself."""
    from lora_search.preflight import meta_model

    source = str(config_dir) if config_dir is not None else base.name_or_path
    try:
        model = meta_model(
            BaseModel(source, revision=None if config_dir else base.revision, trust_remote_code=base.trust_remote_code)
        )
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError for a bad model
        reason = f"cannot read the model config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        fix = (
            "give a dir holding the same config.json: plan(sweep, config_dir=...), `--config-dir DIR`, or a "
            "sweep file's run_sweep_main(SWEEP, config_dir=...) (sweeps/configs/ ships Llama-3.1 8B and 70B)"
        )
        raise ConfigError(
            [Problem("config_dir" if config_dir else "base.name_or_path", source, reason, fix)], header="cannot plan"
        ) from e
    return architecture(model, source)


def shipped_config_dir(sweep_file: str | Path, base: BaseModel) -> Path | None:
    """`configs/<model name, lowercased>/` beside a sweep file when it holds a config.json: the architecture
    `lora-search plan` reads without --config-dir (sweeps/configs/llama-3.1-70b for meta-llama/Llama-3.1-70B)."""
    candidate = Path(sweep_file).resolve().parent / "configs" / base.name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
    return candidate if (candidate / "config.json").is_file() else None


def adapter_shape(variant: str, rank: int) -> tuple[AdapterKind, int]:
    """Which trainable-parameter arithmetic a variant's PEFT config needs, and the rank it starts at
    (AdaLoRA starts above the target rank and prunes down: its `init_r`)."""
    from lora_search.variants import VARIANTS, Adapter

    config = VARIANTS[variant].peft_config(Adapter(variant, rank, float(rank), ("q_proj",), 0.0, 1e-4, 1000))
    kind = type(config).__name__
    if kind == "AdaLoraConfig":
        return "adalora", config.init_r
    if kind == "VeraConfig":
        return "vera", config.r
    if kind == "LoraConfig":
        return ("dora" if config.use_dora else "lora"), config.r
    raise ConfigError(
        [
            Problem(
                "space.variants",
                variant,
                f"the planner has no trainable-parameter arithmetic for {kind}",
                "add it to adapter_shape and adapter_params in lora_search/plan.py",
            )
        ],
        header="cannot plan",
    )


def adapter_params(kind: AdapterKind, r: int, layers: Sequence[LinearLayer]) -> int:
    """Trainable parameters over the targeted layers (each in -> out):

    lora (also rslora, pissa, loraplus, qlora, loftq): A (r x in) + B (out x r) = r * (in + out)
    dora:    r * (in + out) + out        (the magnitude vector)
    adalora: r * (in + out) + r          (A, B and the singular values E; r = init_r)
    vera:    r + out                     (lambda_d and lambda_b; the random A, B are shared frozen buffers)
    """
    total = 0
    for layer in layers:
        i, o = layer.in_features, layer.out_features
        total += {"lora": r * (i + o), "dora": r * (i + o) + o, "adalora": r * (i + o + 1), "vera": r + o}[kind]
    return total


def weight_bytes(arch: Architecture, dtype_bytes: int, quantized: bool) -> float:
    """Bytes of the whole frozen base as trained.

    bf16/fp32:  params x dtype bytes.
    NF4:        decoder linears x NF4_BYTES (0.5159) + everything else (embedding, head, norms) x 4:
                `prepare_model_for_kbit_training` (lora_search.variants.attach) casts them from bf16 to fp32.
    """
    if not quantized:
        return arch.params * dtype_bytes
    return arch.linear_params * NF4_BYTES + (arch.params - arch.linear_params) * 4


def activation_bytes(
    arch: Architecture,
    batch: int,
    seq: int,
    extra_in_block: float = 0,
    checkpointing: bool = True,
    liger: bool = False,
) -> float:
    """Peak bf16 activations of one worker's micro-batch (b sequences of s tokens) with gradient checkpointing:

    2*s*b*h*layers           the bf16 layer inputs kept at the checkpoints      (CHECKPOINT_BYTES)
    + max(12*s*b*vocab,      the loss, or                                       (LOGIT_BYTES)
          34*s*b*h + extra)  one block recomputed in backward (Korthikanti 2022, BLOCK_ACTIVATION_FACTOR) plus
                             `extra_in_block` (DoRA's transient)

    The logits and one block's activations are never alive together, so the peak is the larger of the two.
    Without checkpointing every block keeps its activations until backward reaches it, and the loss comes on top:

    87*s*b*h*layers + extra + 12*s*b*vocab

    and with `liger` (Liger's kernels and TRL's fused LM head, as a trial runs them): 48*s*b*h*layers + extra.
    """
    sbh = seq * batch * arch.hidden
    if liger and not checkpointing:  # measured as a whole, the fused head's chunks included (LIGER_BLOCK_FACTOR)
        return LIGER_BLOCK_FACTOR * sbh * arch.num_layers + extra_in_block
    loss = LOGIT_BYTES * seq * batch * arch.vocab
    if not checkpointing:
        return BLOCK_ACTIVATION_FACTOR * sbh * arch.num_layers + extra_in_block + loss
    return CHECKPOINT_BYTES * sbh * arch.num_layers + max(loss, BLOCK_ACTIVATION_FACTOR * sbh + extra_in_block)


def dora_transient_bytes(layers: Sequence[LinearLayer]) -> float:
    """DoRA's extra peak inside one layer's forward (peft/tuners/lora/dora.py, DoraLinearLayer.forward): the
    fp32 identity (4*in^2) and its bf16 autocast copy (2*in^2) that B(A(I)) runs on, then the bf16 B@A, its
    scaled copy and W + s*B@A for the weight norm (3 x 2*in*out). Worst targeted layer: max(6*in^2 + 6*in*out);
    for Llama-3.1-70B's down_proj (28672 -> 8192) 5.9 GiB, measured 5.6 GiB on an H100."""
    return max((6 * lay.in_features**2 + 6 * lay.in_features * lay.out_features for lay in layers), default=0)


def dtype_bytes_of(sweep: Sweep, arch: Architecture) -> int:
    """Bytes per base weight as the sweep loads it (`BaseModel.dtype`; "auto": the config's)."""
    return arch.dtype_bytes if sweep.base.dtype == "auto" else DTYPE_BYTES[sweep.base.dtype]


def trial_memory(
    sweep: Sweep,
    arch: Architecture,
    variant: str,
    rank: int,
    target: targets.Targets,
    checkpointing: bool = True,
    batch: int | None = None,
    liger: bool = False,
) -> MemoryRow:
    """`memory_row` of one trial of `sweep`: `variant` x `rank` on `target` (a targets preset or names), at the
    sweep's dtype, micro-batch (`budget.batch_size`, or `batch`), max_length, strategy and workers; `liger`: the
    trial runs Liger's kernels (`LIGER_BLOCK_FACTOR`)."""
    from lora_search.variants import VARIANTS

    names = set(targets.resolve(target, list(arch.linears)))
    r = sweep.resources
    return memory_row(
        arch,
        variant=variant,
        rank=rank,
        targets_name=targets.target_key(target),
        layers=[lay for lay in arch.linears if lay.name.rsplit(".", 1)[-1] in names],
        quantized=VARIANTS[variant].quantized,
        dtype_bytes=dtype_bytes_of(sweep, arch),
        batch=sweep.budget.batch_size if batch is None else batch,
        seq=sweep.dataset.max_length,
        strategy=r.strategy_for(variant),
        world=r.workers,
        checkpointing=checkpointing,
        liger=liger,
    )


def memory_row(
    arch: Architecture,
    *,
    variant: str,
    rank: int,
    targets_name: str,
    layers: Sequence[LinearLayer],
    quantized: bool,
    dtype_bytes: int,
    batch: int,
    seq: int,
    strategy: str,
    world: int,
    checkpointing: bool = True,
    liger: bool = False,
) -> MemoryRow:
    """Per-GPU bytes of one trial worker. `world`: the trial's workers, over which a sharding strategy splits:

    weights     weight_bytes / world, plus 2 gathered blocks (the current and the prefetched) when sharded
    adapter     trainable x (4 weight [/ world if the base is sharded] + 4 gradient [/ world if state is sharded])
    optimizer   trainable x 8 [/ world if state is sharded]
    activations activation_bytes (with dora_transient_bytes in the block for DoRA); never sharded
    """
    base_sharded, state_sharded = STRATEGIES[strategy].shards_base, STRATEGIES[strategy].shards_grads
    kind, r = adapter_shape(variant, rank)
    trainable = adapter_params(kind, r, layers)
    total_weights = weight_bytes(arch, dtype_bytes, quantized)
    if base_sharded:
        per_param = NF4_BYTES if quantized else dtype_bytes
        weights = total_weights / world + 2 * arch.block_params * per_param
    else:
        weights = total_weights
    state_div = world if state_sharded else 1
    adapter = trainable * (ADAPTER_WEIGHT_BYTES / (world if base_sharded else 1) + ADAPTER_GRAD_BYTES / state_div)
    dora = dora_transient_bytes(layers) if kind == "dora" else 0
    activations = activation_bytes(arch, batch, seq, dora, checkpointing=checkpointing, liger=liger)
    return MemoryRow(
        variant, rank, targets_name, trainable, weights, adapter, trainable * ADAM_BYTES / state_div, activations
    )


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
) -> Plan:
    """The plan of `sweep` on `cluster_gpus` GPUs of type `gpu` on `nodes` nodes (None: full nodes of
    `gpus_per_node`). Raises ConfigError naming the fix when the sweep cannot run on that cluster at all.

    `mfu`: the fraction of peak bf16 FLOP/s the trials reach, counted at 4N FLOPs/token. 0.35 is an assumption;
    Llama-3.1-8B LoRA (r=16, every decoder linear, b=4 x 2048, gradient checkpointing, bf16 autocast, SDPA)
    measured 0.22 on one H100, and DoRA 0.11 (its weight norm recomputes W + BA every step): budgets scale by
    0.35 / mfu.
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
    compute = p.workers * min(p.gpus_per_trial / p.workers, 1.0)
    out += [
        "",
        f"throughput  {p.tokens_per_step:,} tokens/step ({p.batch} x grad_accum {p.grad_accum} x {p.max_length} "
        f"tokens x {p.workers} worker(s)) x {p.flops_per_token / 1e9:.1f} GFLOP/token "
        f"({LORA_FLOPS_PER_PARAM} x {_count(a.params - a.embedding_params)} matmul params)",
        f"            at MFU {p.mfu:g} of {compute:g} x {GPUS[p.gpu].bf16_tflops:g} TFLOP/s ({p.gpu}) -> "
        f"{p.step_s:.2f} s/step",
        "",
        f"budget on {p.gpu} at {p.price:.2f} {p.currency}/GPU-hour",
    ]
    budget = [
        [
            "full grid",
            f"{p.max_steps}",
            f"{p.full_gpu_hours:,.1f}",
            f"{p.full_gpu_hours * p.price:,.0f}",
            f"{p.full_wall_hours:,.1f}",
        ],
        [
            "ASHA (expected)",
            f"{p.expected_steps:.1f}",
            f"{p.asha_gpu_hours:,.1f}",
            f"{p.asha_gpu_hours * p.price:,.0f}",
            f">= {p.asha_wall_hours:,.1f}",
        ],
    ]
    out += [
        "  " + line for line in _table(["", "steps/trial", "GPU-hours", f"cost {p.currency}", "wall hours"], budget)
    ]
    out += ["", "notes"] + [f"  - {n}" for n in p.notes]
    return "\n".join(out)
