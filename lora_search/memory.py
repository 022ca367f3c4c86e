"""The memory model: what one trial worker needs, estimated from the model's architecture alone.

Read by the plan (lora_search.plan: the memory table of `--dry-run`) and, at run time, by every trial worker:
`micro_batching` sizes the trial's micro-batches and turns gradient checkpointing off where its activations fit; and
by every pack host (lora_search.pack_host): `pack_host_fit` decides the same two for its pack's steps.

The architecture is read from the model's config alone (`meta_model`: a meta-device build, no weights, no GPU).
Every number is an estimate whose arithmetic is in the docstring of the function that makes it; the model follows
what a trial does (lora_search.train): bf16 autocast, PEFT adapters in fp32, AdamW, for NF4 variants
`prepare_model_for_kbit_training`, and gradient checkpointing on unless `micro_batching` turns it off.
tests/test_memory.py holds the estimates within 3% of peaks measured on an H100 (bf16 LoRA and DoRA; NF4 not
measured).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_search import fastpath, targets
from lora_search.config import BaseModel, ConfigError, Problem, Sweep
from lora_search.strategies import STRATEGIES
from lora_search.targets import LinearLayer
from lora_search.variants import VARIANTS, AdapterKind

if TYPE_CHECKING:
    import torch

    from lora_search.records import TrialParams


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
which knows Liger is active on its worker, uses it (`micro_batching`); the plan stays at 87."""

CHECKPOINT_BYTES = 2
"""Bytes per token per hidden unit that gradient checkpointing keeps at each decoder-layer boundary (the bf16
input of the layer)."""

LOGIT_BYTES = 12
"""Bytes per output logit (s*b*vocab) at the loss: the bf16 logits (2), the fp32 log-softmax that cross-entropy
keeps for backward (4), and in backward its fp32 gradient (4) and the logits' bf16 gradient (2). Measured 11.8 to
12.0 bytes on an H100 (Llama-3.1-8B, b = 1, 4 and 8). Large for Llama-3's 128256-token vocab: 2048 tokens x
128256 x 12 bytes = 2.9 GiB a sequence, more than all 80 layer checkpoints of the 70B (2048 x 8192 x 2 x 80 = 2.5)."""


LOSS_CHUNK_LOGITS = 2**26
"""Logits one chunk of a pack step's loss holds at a time: the step runs the decoder once, then the LM head and
cross-entropy over `LOSS_CHUNK_LOGITS // vocab` tokens at a time, each chunk's gradient to the hidden state computed
in its forward (`pack._chunked_cross_entropy`, `pack.HEAD_LOSS` "fused", the default; with "checkpointed", or a head
that trains, each chunk is recomputed in the backward instead: one more head product, 2 x tokens x hidden x vocab
FLOPs, a step). 2**26 logits x LOGIT_BYTES (12: bf16 logits, fp32 log-softmax, their gradients) = 768 MiB, where the
whole batch's are 12 x rows x tokens x vocab (an 8B pack of 32 rows x 2048 tokens of Llama-3's 128,256-token vocab:
100 GB). A chunk is 523 tokens of Llama-3 (a 523 x 4096 x 128,256 head product, 0.55 TFLOP: a GEMM large enough to
run near the GPU's peak), 1365 of SmolLM2's 49,152; the chunks' extra kernel launches (~10 each) are small beside
their products, two a chunk (its logits and its gradient)."""

PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3"})
"""Architectures (`config.model_type`) whose causal-LM forward computes its logits as `lm_head` of the decoder's
`last_hidden_state` and nothing more (Transformers 5.25; tests/test_pack.py holds each to it), so a pack step can
compute them a chunk at a time from the decoder's output. Others do more, which the chunks would not reproduce:
Gemma-2/3's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling` of the logits, MiniCPM3's of
the hidden states; a pack over them (or over an adapter on the head itself) computes the whole batch's logits through
the model's own forward, and `pack_bytes` counts them whole."""


def loss_chunk_tokens(model_type: str, vocab: int) -> int | None:
    """Tokens whose logits a pack step over a base of `model_type` holds at once: `LOSS_CHUNK_LOGITS // vocab`, or
    None where it holds the whole batch's (not in `PLAIN_HEADS`). What `pack_bytes` counts at the loss."""
    return max(1, LOSS_CHUNK_LOGITS // vocab) if model_type in PLAIN_HEADS else None


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
    model_type: str
    """The config's `model_type`: whether a pack scores its loss in chunks (`PLAIN_HEADS`)."""

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


def meta_model(base: BaseModel) -> torch.nn.Module:
    """`base` built from its config alone on the meta device (no weights). Raises OSError/ValueError if no config.

    A GGUF base's config comes from the file's own metadata (Transformers' `gguf_file=`), so a plan needs neither
    its conversion nor a config dir: in fp32, as `gguf.convert` writes its converted dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_search import gguf

    if gguf.is_gguf(base.name_or_path):
        path = gguf.locate(base.name_or_path)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config.dtype = torch.float32
    else:
        config = AutoConfig.from_pretrained(
            base.name_or_path, revision=base.revision, trust_remote_code=base.trust_remote_code
        )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=base.trust_remote_code)


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
        model_type=config.model_type,
    )


def read_architecture(base: BaseModel, config_dir: str | Path | None = None) -> Architecture:
    """`base`'s architecture from `config_dir` when given (no hub access needed), else from `base` itself."""
    source = str(config_dir) if config_dir is not None else base.name_or_path
    try:
        model = meta_model(
            BaseModel(source, revision=None if config_dir else base.revision, trust_remote_code=base.trust_remote_code)
        )
    except ConfigError:  # a GGUF base that is not there (`gguf.locate`): its own field, reason and fix
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError for a bad model
        reason = f"cannot read the model config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        fix = (
            "give a dir holding the same config.json: plan(sweep, config_dir=...), `--config-dir DIR`, or a "
            "sweep file's main(SWEEP, config_dir=...) (sweeps/configs/ ships Llama-3.1 8B and 70B)"
        )
        raise ConfigError(
            [Problem("config_dir" if config_dir else "base.name_or_path", source, reason, fix)], header="cannot plan"
        ) from e
    return architecture(model, source)


def adapter_shape(variant: str, rank: int) -> tuple[AdapterKind, int]:
    """Which trainable-parameter arithmetic a variant needs, and the rank it starts at: its row's `kind` and
    `starting_rank` (AdaLoRA starts above the target rank and prunes down: its `init_r`)."""
    row = VARIANTS[variant]
    return row.kind, row.starting_rank(rank)


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
    loss_tokens: int | None = None,
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
    `loss_tokens`: the loss holds the logits of this many tokens at a time, not all s*b (a pack's chunks,
    `LOSS_CHUNK_LOGITS`): 12*min(loss_tokens, s*b)*vocab in place of 12*s*b*vocab.
    """
    sbh = seq * batch * arch.hidden
    if liger and not checkpointing:  # measured as a whole, the fused head's chunks included (LIGER_BLOCK_FACTOR)
        return LIGER_BLOCK_FACTOR * sbh * arch.num_layers + extra_in_block
    tokens = seq * batch if loss_tokens is None else min(loss_tokens, seq * batch)
    loss = LOGIT_BYTES * tokens * arch.vocab
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
    loss_tokens: int | None = None,
) -> MemoryRow:
    """`memory_row` of one trial of `sweep`: `variant` x `rank` on `target` (a targets preset or names), at the
    sweep's dtype, micro-batch (`budget.batch_size`, or `batch`), max_length, strategy and workers; `liger`: the
    trial runs Liger's kernels (`LIGER_BLOCK_FACTOR`); `loss_tokens`: the loss holds this many tokens' logits at a
    time (a pack's chunks; None: the whole micro-batch's, as a solo trial without Liger)."""
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
        loss_tokens=loss_tokens,
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
    loss_tokens: int | None = None,
) -> MemoryRow:
    """Per-GPU bytes of one trial worker. `world`: the trial's workers, over which a sharding strategy splits:

    weights     weight_bytes / world, plus 2 gathered blocks (the current and the prefetched) when sharded
    adapter     trainable x (4 weight [/ world if the base is sharded] + 4 gradient [/ world if state is sharded])
    optimizer   trainable x 8 [/ world if state is sharded]
    activations activation_bytes (with dora_transient_bytes in the block for DoRA, the loss over `loss_tokens`);
                never sharded
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
    activations = activation_bytes(
        arch, batch, seq, dora, checkpointing=checkpointing, liger=liger, loss_tokens=loss_tokens
    )
    return MemoryRow(
        variant, rank, targets_name, trainable, weights, adapter, trainable * ADAM_BYTES / state_div, activations
    )


@dataclass(frozen=True)
class MicroBatching:
    """How a trial runs its optimizer steps: `micro` sequences a forward/backward, `accum` of them a step (always
    `budget.batch_size * budget.grad_accum` sequences a step), and whether it recomputes activations in backward."""

    micro: int
    accum: int
    keep_activations: fastpath.Piece
    merge: fastpath.Piece


def worker_memory(sweep: Sweep, on_gpu: bool) -> tuple[float, str]:
    """(usable bytes, where they are) for one worker: `USABLE_FRACTION` of its share of the GPU (`gpus_per_worker` of
    the device's total) or, on CPU, of `resources.memory_limit_gb` when set (host memory otherwise)."""
    import torch

    limit = sweep.resources.memory_limit_gb
    if on_gpu:
        have = torch.cuda.mem_get_info()[1] * min(sweep.resources.gpus_per_worker, 1.0)
        where = f"{min(sweep.resources.gpus_per_worker, 1.0):g} of this GPU"
    elif limit is not None:
        have, where = limit * 2**30, f"resources.memory_limit_gb={limit:g}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
    return USABLE_FRACTION * have, where


def micro_batching(sweep: Sweep, params: TrialParams, on_gpu: bool, liger: bool = False) -> MicroBatching:
    """The trial's micro-batch and gradient checkpointing, from the memory estimate (`trial_memory`)
    against what this worker holds: its share of the GPU (`gpus_per_worker` of the device's total) or, on CPU,
    `resources.memory_limit_gb` when set (host memory otherwise), of which `USABLE_FRACTION` is counted.

    A step's `budget.grad_accum` micro-batches of `budget.batch_size` run as 1/k as many of k times the size, for the
    largest k dividing grad_accum that fits ("merge-micro-batches"): the same sequences per step and the same loss
    (the Trainer divides by the step's label tokens either way), with 1/k of the per-micro-batch CPU work. Without
    recompute ("keep-activations": `Budget.gradient_checkpointing` "off", or "auto" where even k=1 fits without it)
    the merge is sized without checkpointing; with it, with checkpointing. `liger`: the trial runs Liger's kernels,
    which keep less (`LIGER_BLOCK_FACTOR`)."""
    budget = sweep.budget
    arch = read_architecture(sweep.base)
    target = targets.targets_from_key(params.targets)
    usable, where = worker_memory(sweep, on_gpu)

    def need(checkpointing: bool, k: int) -> float:
        row = trial_memory(
            sweep, arch, params.variant, params.rank, target, checkpointing, budget.batch_size * k, liger
        )
        return row.total

    choice = budget.gradient_checkpointing
    alone = need(False, 1)
    if choice == "auto":
        keep = alone <= usable
        verdict = "fits" if keep else "exceeds"
        why = (
            f"no recompute: {alone / 2**30:.1f} GiB estimated without checkpointing {verdict} "
            f"{usable / 2**30:.1f} GiB usable of {where}"
        )
    else:
        keep, why = choice == "off", f"budget.gradient_checkpointing={choice!r}"
    factors = [k for k in range(budget.grad_accum, 0, -1) if budget.grad_accum % k == 0]
    k = next((k for k in factors if need(not keep, k) <= usable), 1)
    micro, accum = budget.batch_size * k, budget.grad_accum // k
    if budget.grad_accum == 1:
        merge = fastpath.Piece(fastpath.MERGE_MICRO, False, "budget.grad_accum=1: one micro-batch a step already")
    elif k == 1:
        larger = budget.batch_size * factors[-2]
        merge = fastpath.Piece(
            fastpath.MERGE_MICRO,
            False,
            f"a micro-batch of {larger} ({need(not keep, factors[-2]) / 2**30:.1f} GiB estimated) exceeds "
            f"{usable / 2**30:.1f} GiB usable of {where}",
        )
    else:
        merge = fastpath.Piece(
            fastpath.MERGE_MICRO,
            True,
            f"{budget.grad_accum} micro-batches of {budget.batch_size} a step run as {accum} of {micro} "
            f"({need(not keep, k) / 2**30:.1f} GiB estimated)",
        )
    return MicroBatching(micro, accum, fastpath.Piece(fastpath.KEEP_ACTIVATIONS, keep, why), merge)


def pack_rows(sweep: Sweep) -> int:
    """Rows one trial puts into a pack step: its whole optimizer step, batch_size x grad_accum, run through the base as
    one micro-batch or, where that does not fit, as n micro-batches of pack_rows / n rows each (`pack_fit`)."""
    return sweep.budget.batch_size * sweep.budget.grad_accum


def pack_splits(sweep: Sweep) -> list[int]:
    """The micro-batch counts a pack step may run in, fewest first: the divisors of `budget.grad_accum`, so that a
    micro-batch holds a whole number of `budget.batch_size` runs of each trial's rows (at grad_accum micro-batches,
    a solo trial's own micro-batch)."""
    accum = sweep.budget.grad_accum
    return [n for n in range(1, accum + 1) if accum % n == 0]


@dataclass(frozen=True)
class PackFit:
    """How a pack step fits its device (`pack_fit`)."""

    checkpointing: bool
    """The base's layers recompute their activations in the backward (`pack.Pack`'s `checkpointing`)."""
    micro_batches: int
    """Forward/backward passes a step runs, each over 1/micro_batches of every adapter's rows, the gradients summed
    (`pack.Pack.step`): 1, the whole step at once."""


def pack_bytes(
    sweep: Sweep,
    arch: Architecture,
    variant: str,
    rank: int,
    target: targets.Targets,
    k: int,
    checkpointing: bool = False,
    micro_batches: int = 1,
) -> float:
    """Bytes on the one device of a pack of `k` trials of one shape (`lora_search.pack`): the frozen base once, each
    adapter's own weights, gradients and AdamW state, and the activations of one micro-batch of a pack step, which
    runs the base once on all k adapters' rows concatenated (k x `pack_rows` / `micro_batches`), with or without
    gradient checkpointing (`pack_fit`), and scores the loss a chunk of tokens at a time (`loss_chunk_tokens`: one
    chunk's logits, not the batch's):

        weights + k x (adapter + optimizer [+ PiSSA's correction]) + activation_bytes(k x pack_rows / micro_batches,
                                                               checkpointing, loss_tokens=chunk)

    each term as `trial_memory` counts it. Example, sweeps/smollm2.py on a GPU (bf16 base, r=16 on all-linear, 32
    rows of 96 tokens), without checkpointing: 0.25 GiB of base + k x (0.07 GiB of adapter, gradients and AdamW
    state + 4.3 GiB in the blocks: 87 x 96 x 32 x 576 x 30 layers) + 0.75 GiB of loss, once: 12 x 1365 tokens (a
    chunk, 2**26 // 49152) x 49152 (the whole batch's logits would be 12 x 96 x 32 x 49152 = 1.7 GiB a trial). With
    batch_size=16 and grad_accum=2 (the same 32 rows a step) in 2 micro-batches: 2.15 GiB a trial in the blocks (87 x
    96 x 16 x 576 x 30)."""
    row = trial_memory(
        sweep,
        arch,
        variant,
        rank,
        target,
        checkpointing=checkpointing,
        batch=pack_rows(sweep) * k // micro_batches,
        loss_tokens=loss_chunk_tokens(arch.model_type, arch.vocab),
    )
    # PiSSA's frozen correction (A0 and -B0, `pack_layers.PackedLinear.correct`): its weights again, no gradient
    correction = row.trainable * ADAPTER_WEIGHT_BYTES if variant == "pissa" else 0
    return row.weights + k * (row.adapter + row.optimizer + correction) + row.activations


def pack_fit(
    sweep: Sweep, arch: Architecture, variant: str, rank: int, target: targets.Targets, k: int, usable: float
) -> PackFit | None:
    """How a pack of `k` trials fits `usable` bytes, as a solo trial's `micro_batching` decides: under
    `Budget.gradient_checkpointing` "auto" without checkpointing where the pack fits so in the most micro-batches
    (`pack_splits`: grad_accum, each a solo trial's micro-batch), else checkpointed; "off" / "on" as they say. Then
    the fewest micro-batches that fit. None: it does not fit (with grad_accum=1, one micro-batch or nothing)."""
    choice = sweep.budget.gradient_checkpointing
    splits = pack_splits(sweep)

    def fits(checkpointing: bool, n: int) -> bool:
        return pack_bytes(sweep, arch, variant, rank, target, k, checkpointing, n) <= usable

    checkpointing = choice == "on" if choice != "auto" else not fits(False, splits[-1])
    n = next((n for n in splits if fits(checkpointing, n)), None)
    return None if n is None else PackFit(checkpointing, n)


def largest_pack(
    sweep: Sweep, arch: Architecture, variant: str, rank: int, target: targets.Targets, usable: float
) -> int:
    """The most trials of one shape whose pack fits `usable` bytes in any way the sweep allows (`pack_fit`: checkpointed
    and in micro-batches where it needs to), 0 when not even one trial fits. `pack_bytes` grows with k, so doubling to
    a k that does not fit and then halving the interval finds it in about 2 log2(k) estimates."""
    fits = lambda k: pack_fit(sweep, arch, variant, rank, target, k, usable) is not None  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2  # fits(low), and high is the next to try
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def pack_host_fit(sweep: Sweep, packable: Sequence[str], usable: float, where: str) -> tuple[PackFit, str]:
    """How a pack host runs its steps (whether it checkpoints its base's layers, in how many micro-batches), and why in
    one sentence: `pack_fit` for a full pack (`Resources.pack` trials) of the sweep's most demanding packable shape
    (its largest `pack_bytes` over the `packable` variants, its ranks and target sets). A pack that fits in no way
    runs in the least memory the sweep allows (grad_accum micro-batches, checkpointed unless "off"), and says so.

    Example, sweeps/llama8b.py with Resources(pack=4) on an H100 (32 rows of 2048 tokens a trial's step): "4 x lora
    r=64 all-linear, 71.7 GiB usable of 1 of this GPU: 373.7 GiB in 8 micro-batches of 4 rows a trial without
    checkpointing exceeds it; 100.5 GiB in 2 micro-batches of 16 rows a trial checkpointed exceeds it; 62.7 GiB in 4
    micro-batches of 8 rows a trial checkpointed fits"."""
    arch = read_architecture(sweep.base)
    k = sweep.resources.pack
    shapes = [
        (variant, rank, target) for variant in packable for rank in sweep.space.ranks for target in sweep.space.targets
    ]
    if not shapes:
        return PackFit(False, 1), "no variant of the sweep packs"
    worst = max(shapes, key=lambda shape: pack_bytes(sweep, arch, *shape, k))
    fit = pack_fit(sweep, arch, *worst, k, usable)
    choice, splits = sweep.budget.gradient_checkpointing, pack_splits(sweep)
    chosen = fit or PackFit(choice != "off", splits[-1])

    def said(how: PackFit, verdict: str) -> str:
        size = pack_bytes(sweep, arch, *worst, k, how.checkpointing, how.micro_batches) / 2**30
        n = how.micro_batches
        runs = "one micro-batch" if n == 1 else f"{n} micro-batches"
        recompute = "checkpointed" if how.checkpointing else "without checkpointing"
        return f"{size:.1f} GiB in {runs} of {pack_rows(sweep) // n} rows a trial {recompute} {verdict}"

    reasons = []
    if choice != "auto":
        reasons.append(f"budget.gradient_checkpointing={choice!r}")
    elif chosen.checkpointing:
        reasons.append(said(PackFit(False, splits[-1]), "exceeds it"))
    if fit is None:
        reasons.append(said(chosen, "exceeds it: it runs so all the same"))
    else:
        if fit.micro_batches > 1:  # the next fewer micro-batches do not fit
            reasons.append(said(PackFit(fit.checkpointing, splits[splits.index(fit.micro_batches) - 1]), "exceeds it"))
        reasons.append(said(fit, "fits"))
    variant, rank, target = worst
    shape = f"{k} x {variant} r={rank} {targets.target_key(target)}"
    return chosen, f"{shape}, {usable / 2**30:.1f} GiB usable of {where}: {'; '.join(reasons)}"
