"""The fast trial path: which speed pieces every trial turns on, and why any piece is off.

    from lora_search import fastpath
    path = fastpath.choose(on_gpu=True, model_type="llama", attn="sdpa")
    print(path.summary())  # liger on (rms_norm, swiglu, rope, fused linear cross-entropy); padding-free off (...)

The pieces, each with the condition it needs. A trial logs `summary()` and reports it to Tune, trials.parquet and
MLflow (`fast_path`, tag `lora_search.fast_path`), so a slow trial says which piece it ran without.

- liger: Liger kernels (RMSNorm, SwiGLU, RoPE, and the fused linear + cross-entropy that never materialises the
  tokens x vocab logits). Needs CUDA, Triton, liger-kernel and an architecture Liger patches.
- padding-free: each batch is one row of its sequences end to end, with per-sequence position ids, so every matrix
  product sees only real tokens; the loss is unchanged (the same tokens count: `tests/test_fastpath.py` checks the
  curve). Needs a varlen attention kernel (torch's own varlen flash kernel, `lora_search.varlen`; flash attention
  2/3; flex attention) and an architecture whose masks read packed position ids.
- attention: SDPA (flash / memory-efficient kernels) instead of eager attention; transformers' default, reported.
- no-cudnn-sdpa: on GPU, SDPA's cuDNN backend is turned off in the trial's process (`CUDNN_WHY`).
- no-pad-mask: padded batches go without their attention mask (`NO_PAD_MASK_WHY`), so SDPA runs causal flash.
- few-syncs: per-step metrics stay on the device between log steps (`FEW_SYNCS_WHY`).
- label-index: the LM head takes the positions it scores from the collator's CPU labels (`LABEL_INDEX_WHY`).
- bf16-adapter-inputs: under bf16 autocast, LoRA layers take their input as it is (`BF16_INPUTS_WHY`).
- fused-lora-add: a plain LoRA layer adds its update inside the matrix product (`FUSED_ADD_WHY`).
- keep-activations: gradient checkpointing off where the activations fit (`lora_search.train.micro_batching`).
- merge-micro-batches: `budget.grad_accum` micro-batches run as fewer, larger ones where memory allows (the same
  sequences per optimizer step and the same loss: the Trainer normalises by the step's label tokens either way).
- inference-attention: a trial that trains on a training-only kernel (torch_varlen, flex attention) runs its
  inference forwards (eval loss, the probe, golden scoring) on SDPA (`inference_attention`, `INFERENCE_ATTENTION_WHY`).

Padding-free stays off under plain SDPA: SDPA has no variable-length kernel, so a packed row of T tokens would
cost T^2 attention (a block-diagonal mask computes the masked blocks too) where the padded batch costs
sum(len_i^2): 8 rows of 1,000 tokens pay 8x the attention. It turns on with `attn_implementation` set to a varlen
kernel.

Not here yet, with why: torch.compile (a 96 s compile warm-up on an 8B H100 run for 1.1x over Liger; it pays only
on long trials, and that threshold is not measured yet); one kernel for q/k/v and gate/up (the 8B step's matrix
products already run at 71% of the GPU's peak; benchmarks/NOTES.md). Sequence packing across examples
(`packing=True`) is not used: it changes how many examples a step sees, and so what ASHA's step budget means.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lora_search import varlen

log = logging.getLogger("lora_search.fastpath")

PADDING_FREE_MODELS = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
    }
)
"""Architectures whose attention masks are built by transformers' masking_utils, which turns packed position ids
into a block-diagonal causal mask (`find_packed_sequence_indices`): the sequences of a padding-free row cannot see
each other. Others fall back to padded batches."""

LIGER_MODELS = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})
"""Architectures `liger_kernel.transformers` patches (its `MODEL_TYPE_TO_APPLY_LIGER_FN`, where importable)."""


@dataclass(frozen=True)
class Piece:
    name: str
    active: bool
    why: str
    """What it does when active; what it lacks when not."""


@dataclass(frozen=True)
class FastPath:
    pieces: tuple[Piece, ...] = field(default_factory=tuple)

    def active(self, name: str) -> bool:
        return any(p.name == name and p.active for p in self.pieces)

    def summary(self) -> str:
        return "; ".join(f"{p.name} {'on' if p.active else 'off'} ({p.why})" for p in self.pieces)

    def with_piece(self, piece: Piece) -> FastPath:
        """This path with `piece` added (or replacing the piece of that name)."""
        return FastPath((*(p for p in self.pieces if p.name != piece.name), piece))

    def prepare(self) -> None:
        """Process-wide switches of the active pieces, set in the trial's worker before training."""
        if self.active(CUDNN_OFF):
            import torch

            torch.backends.cuda.enable_cudnn_sdp(False)

    def prepare_model(self, model: Any) -> None:
        """Per-layer changes of the active pieces, made on the trial's PEFT model before training."""
        if self.active(BF16_INPUTS):
            keep_input_dtype(model)
        if self.active(FUSED_ADD):
            fuse_lora_add(model)

    def trainer_args(self) -> dict[str, Any]:
        """`SFTConfig` arguments for the active pieces."""
        return {"use_liger_kernel": True} if self.active("liger") else {}

    def collator(self, pad_token_id: int) -> Any:
        """The data collator for the active pieces: TRL's, padded or padding-free, that also counts each batch's
        real tokens on the CPU (`REAL_TOKENS`), with `NO_PAD_MASK` leaves out the attention mask, with
        `TOKEN_BUDGET` lists each row's tokens (`ROW_TOKENS`), with `LABEL_INDEX` keeps which labels count, on the
        CPU (`LABEL_MASK`), and padding-free lists the packed row's sequence lengths (`SEQ_LENGTHS`)."""
        return collator_class()(
            pad_token_id=pad_token_id,
            padding_free=self.active("padding-free"),
            drop_mask=self.active(NO_PAD_MASK),
            lengths=self.active(TOKEN_BUDGET),
            label_mask=self.active(LABEL_INDEX),
            seq_lengths=self.active("padding-free"),
        )


SEQ_LENGTHS = "lora_search_seq_lengths"
"""The batch key of a padding-free batch listing its packed row's sequence lengths (NumPy, so Accelerate leaves it on
the CPU): the trial's trainer hands them to the model as cumulative lengths (`varlen.cu_lengths`), which varlen kernels
read (torch_varlen, flash attention) instead of finding the sequences on the device from the position ids."""

ROW_TOKENS = "lora_search_row_tokens"
"""The batch key listing each row's tokens (CPU ints), which the trainer splits a step by (`token_chunks`)."""

TOKEN_BUDGET = "token-budget"
TOKEN_BUDGET_WHY = "a step's rows as micro-batches of up to {budget} tokens, not {micro} rows of max_length each"
"""Why a step's micro-batches are cut by tokens. The memory estimate sizes a micro-batch as rows of `max_length`
tokens, so real rows, most far shorter, leave most of that memory and the GPU's width unused: 8 chat rows of 450
tokens fill a quarter of 8 x 2,048. The Trainer then gets the whole step's rows as one batch (`grad_accum` 1) and
the trial's trainer (`lora_search.trainer.TrialTrainer.training_step`) runs it as micro-batches of at most
micro x max_length tokens (`token_chunks`): the same rows a step, and the same loss (each micro-batch's summed
token loss is divided by the step's label tokens, as the Trainer does over accumulated micro-batches:
`tests/test_fastpath.py` checks the curve). Padded micro-batches take the step's rows longest first, so each pads
to rows of about its own length; padding-free ones take them in order. One worker only: under DDP every worker
would have to run as many backward passes a step as the others."""


def token_budget(micro: int, accum: int, max_length: int, world_size: int) -> Piece:
    """The `TOKEN_BUDGET` piece of a trial whose steps run as `accum` micro-batches of `micro` rows."""
    if world_size > 1:
        return Piece(TOKEN_BUDGET, False, "several workers: each must run a step's micro-batches in lockstep")
    if accum == 1:
        return Piece(TOKEN_BUDGET, False, "one micro-batch a step already")
    budget = micro * max_length
    return Piece(TOKEN_BUDGET, True, TOKEN_BUDGET_WHY.format(budget=budget, micro=micro))


def token_chunks(lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """The rows (indices into `lengths`) of each micro-batch of at most `budget` tokens: padded, a micro-batch of n
    rows costs n x its longest, and rows go longest first (the least padding); padding-free it costs its rows' sum,
    and rows keep their order (contiguous spans of the packed row). A row longer than `budget` gets a micro-batch of
    its own."""
    chunks: list[list[int]] = []
    if padded:
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks
    used = 0
    for i, n in enumerate(lengths):
        if chunks and used + n <= budget:
            chunks[-1].append(i)
            used += n
        else:
            chunks.append([i])
            used = n
    return chunks


REAL_TOKENS = "lora_search_real_tokens"
"""The batch key holding how many real (non-pad) tokens the batch has, counted by the collator on the CPU: the
trainer (`lora_search.train._Trainer`) counts tokens seen from it without reading a device tensor, and takes it
out before the model's forward."""


def collator_class() -> type:
    """TRL's `DataCollatorForLanguageModeling` (right padding), plus the real-token count and the mask choice.

    Passed in rather than set with SFTConfig(padding_free=True), which would also stop TRL truncating rows to
    `max_length` (it expects packing then); truncation must stay."""
    from dataclasses import dataclass as _dataclass

    import numpy as np
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    @_dataclass
    class Collator(DataCollatorForLanguageModeling):
        drop_mask: bool = False
        lengths: bool = False  # also each row's tokens (`ROW_TOKENS`), for the token-budget split
        label_mask: bool = False  # also which labels count, as a NumPy array (`LABEL_MASK`), for the LM head
        seq_lengths: bool = False  # also a padding-free row's sequence lengths, as a NumPy array (`SEQ_LENGTHS`)

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            batch[REAL_TOKENS] = sum(len(e["input_ids"]) for e in examples)
            if self.lengths:
                batch[ROW_TOKENS] = [len(e["input_ids"]) for e in examples]
            if self.seq_lengths and self.padding_free:  # NumPy, as the label mask below
                batch[SEQ_LENGTHS] = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
            if self.label_mask:  # NumPy, not a tensor: Accelerate moves every tensor of a batch to the device
                batch[LABEL_MASK] = (batch["labels"] != -100).numpy()
            if self.drop_mask:  # TRL pads on the right: each row's mask is ones, then zeros
                batch.pop("attention_mask", None)
            return batch

    return Collator


def bf16_inputs(autocast_bf16: bool) -> Piece:
    """The `BF16_INPUTS` piece of a trial: on where it trains under bf16 autocast (the GPU trials with bf16)."""
    if not autocast_bf16:
        return Piece(BF16_INPUTS, False, "no bf16 autocast: inputs already match the adapter's dtype or need the cast")
    return Piece(BF16_INPUTS, True, BF16_INPUTS_WHY)


def autocast(model: Any, bf16: bool) -> Any:
    """The bf16 autocast a trial trains under, for forwards outside the Trainer (golden scoring with lm-eval).

    `BF16_INPUTS` and `FUSED_ADD` layers hand bf16 activations to fp32 adapter weights, which is only right under
    autocast. Accelerate wraps the PEFT model's `forward` in it, but `generate` goes to the base model's forward,
    outside that wrapper: a generate_until golden task raised a dtype mismatch there on the GPU. Scoring under the
    same autocast also scores what training computed. lm-eval's own forwards need its `mixed_precision_dtype` too
    (`evals.score`): its `torch.autocast(enabled=False)` turns this one off inside."""
    import torch

    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def plain_lora_layers(model: Any) -> list[Any]:
    """PEFT's LoRA `Linear` layers of `model` that run its vanilla forward: no variant (DoRA), not a subclass (QLoRA's
    4-bit layers)."""
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear and not m.lora_variant]


def keep_input_dtype(model: Any) -> int:
    """Turn PEFT's input cast off in the plain LoRA layers of `model` (`BF16_INPUTS_WHY`); returns how many."""
    layers = plain_lora_layers(model)
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def fused_add(strategy: str, autocast_bf16: bool, base_fp32: bool) -> Piece:
    """The `FUSED_ADD` piece of a trial: DDP, and a bf16 autocast run or an all-fp32 one (the dtypes addmm needs)."""
    if strategy != "ddp":
        return Piece(FUSED_ADD, False, f"{strategy} gathers weights around PEFT's own layer calls")
    if not (autocast_bf16 or base_fp32):
        return Piece(FUSED_ADD, False, "neither bf16 autocast nor an fp32 base: PEFT's mixed-dtype add")
    return Piece(FUSED_ADD, True, FUSED_ADD_WHY)


def fuse_lora_add(model: Any) -> int:
    """Give the plain LoRA layers of `model` the fused forward (`FUSED_ADD_WHY`); returns how many."""
    import types

    from lora_search.fused_lora import fused_lora_forward, group_siblings

    layers = plain_lora_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(fused_lora_forward, layer)
    group_siblings(model)  # q/k/v and gate/up as one node each (`fused_lora.Siblings`)
    return len(layers)


def _liger_models() -> frozenset[str]:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return LIGER_MODELS
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


VARLEN_ATTENTION = frozenset({varlen.NAME, "flash_attention_2", "flash_attention_3", "flex_attention"})

AUTO_ATTENTION = "auto"
"""`BaseModel.attn_implementation`'s default: the trial's kernel is chosen by `resolve_attention`."""
AUTO_FALLBACK = "sdpa"
_flex_tried: dict[tuple[Any, ...], str | None] = {}

Pays = Callable[[float], tuple[bool, str]]
"""Whether padding-free batches are worth `compile_s` seconds of compile to a trial, and why (`padding_free_pays`)."""


def resolve_attention(
    requested: str, on_gpu: bool, model_config: Any, pays: Pays = lambda compile_s: (True, "")
) -> tuple[str, str]:
    """The attention kernel a trial trains with, and why. A kernel the sweep names is used as named. "auto" (the
    default) is padding-free wherever it works and pays: on a CUDA device, for an architecture that masks packed
    rows, torch's own varlen flash kernel (`lora_search.varlen`: no compile, so any padding saved pays) if it trains
    this model's attention here (`varlen.failure`, tried once a process); else flex attention if the padding saved
    outweighs its compile (`pays`) and a packed forward and backward runs here (`flex_failure`); otherwise SDPA on
    padded batches, with the reason. Both are in torch itself (flash-attn is a separate build that a cluster may
    lack). On the H200 flex trained the 8B shape on variable-length chat rows at 1.39x the padded path's real
    tokens/s (benchmarks/NOTES.md, change 15)."""
    if requested != AUTO_ATTENTION:
        return requested, "set in base.attn_implementation"
    if not on_gpu:
        return AUTO_FALLBACK, "auto: no CUDA device (torch's varlen kernels are CUDA only), so padded batches"
    model_type = getattr(model_config, "model_type", None)
    if model_type not in PADDING_FREE_MODELS:
        return AUTO_FALLBACK, f"auto: {model_type!r} is not known to mask packed rows, so padded batches"
    worth, why = pays(0.0)
    if not worth:
        return AUTO_FALLBACK, why
    failure = varlen.failure(model_config)
    if failure is None:
        varlen.register()
        return varlen.NAME, "auto: torch's varlen flash kernel matched SDPA here on packed rows" + (
            f"; {why}" if why else ""
        )
    worth, why = pays(0.0 if flex_compiled(model_config) else FLEX_COMPILE_S)
    if not worth:
        return AUTO_FALLBACK, f"{why} (torch's varlen kernel: {failure})"
    flex = flex_failure(model_config)
    if flex is not None:
        return AUTO_FALLBACK, f"auto: neither varlen kernel trains here (torch's: {failure}; flex: {flex}), so padded"
    ran = f"auto: flex attention ran a packed row's forward and backward here (torch's varlen kernel: {failure})"
    return "flex_attention", ran + (f"; {why}" if why else "")


FLEX_COMPILE_S = 41.0
"""Seconds a trial spends compiling flex attention in a process that has not yet: the 8B shape's 16-step trial on
variable-length rows trained in 57.8 s on flex against 16.8 s padded on SDPA, the steady steps being faster (H200,
torch 2.11, Inductor's cache cold; benchmarks/speed_varlen_h200_2026-12-04.json). Kept once compiled: transformers
holds the compiled function for the process, so a warm trial process's later trials pay none of it."""
PADDED_MFU = 0.21
"""The padded trial path's model FLOP utilisation on those rows (0.208, same file): what a padded token costs."""


def padding_fraction(lengths: Sequence[int], rows: int, seed: int = 0, grouped: bool = False) -> tuple[float, float]:
    """(the share of padding, the mean padding tokens) of right-padded micro-batches of `rows` rows of these
    `lengths`, drawn in a seeded random order as the Trainer's sampler draws them, or `grouped` by length as
    `Budget(sampling="group_by_length")` draws them (Transformers' length-grouped order)."""
    import random

    order = list(lengths)
    if grouped:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(seed)
        order = [order[i] for i in get_length_grouped_indices(order, rows, generator=generator)]
    else:
        random.Random(seed).shuffle(order)
    batches = [order[i : i + rows] for i in range(0, len(order), rows)]
    pads = [len(b) * max(b) - sum(b) for b in batches if b]
    padded = sum(len(b) * max(b) for b in batches if b)
    return (sum(pads) / padded if padded else 0.0), (sum(pads) / len(pads) if pads else 0.0)


def padding_free_pays(
    lengths: Sequence[int],
    rows: int,
    micro_batches: int,
    params: int,
    peak_tflops: float,
    compile_s: float,
    grouped: bool = False,
) -> tuple[bool, str]:
    """Whether padding-free batches save a trial more than its kernel's compile costs it, and why: the padding
    tokens of its `micro_batches` micro-batches of `rows` rows (`padding_fraction`, `grouped` by length where the
    trial's steps are), each costing 4 x `params` FLOPs at `PADDED_MFU` of `peak_tflops`, against twice `compile_s`
    (`FLEX_COMPILE_S` for flex attention not yet compiled in this process; none for torch's varlen kernel). Twice: the
    estimate is a model, and a compile that does not pay back costs the trial outright."""
    share, pad_tokens = padding_fraction(lengths, rows, grouped=grouped)
    saved = micro_batches * pad_tokens * 4 * params / (peak_tflops * 1e12 * PADDED_MFU)
    numbers = (
        f"{share:.0%} of its padded batches' tokens would be padding, about {saved:.0f} s of compute over "
        f"{micro_batches} micro-batches of {rows}, against {compile_s:.0f} s of compile"
    )
    if share == 0.0 or saved < 2 * compile_s:
        hint = ""
        if not grouped and share > 0.0 and (in_groups := padding_fraction(lengths, rows, grouped=True)[0]) < share / 2:
            # the lever that needs no compile, but changes which rows share a step: the user's to choose
            hint = (
                f"; Budget(sampling='group_by_length') would pad {in_groups:.0%} (it ran 1.73x the random order's real "
                "tokens/s on the 8B variable-length rows, H100, benchmarks/NOTES.md change 22)"
            )
        return False, f"auto: padded batches pay here: {numbers}{hint}"
    return True, f"padding-free pays: {numbers}"


def flex_compiled(model_config: Any) -> bool:
    """Whether flex attention at this model's head shape already trained in this process (`flex_failure`)."""
    return _flex_tried.get(varlen.head_shape(model_config), "untried") is None


def flex_failure(model_config: Any) -> str | None:
    """None if flex attention trains here: a forward and backward of three packed sequences (a document-causal block
    mask) at the model's head count, key/value heads and head size, in bf16 on the current CUDA device, through the
    same compiled function transformers calls in training (`compile_friendly_flex_attention`). Else the error, one
    line. Tried once per process and shape: the compiled kernel is then in the process (transformers keeps it), and
    the model's first packed batch recompiles it for dynamic lengths, as it would without this try."""
    import torch

    key = varlen.head_shape(model_config)
    _, heads, kv_heads, head_dim = key
    device = torch.device("cuda", torch.cuda.current_device())
    if key in _flex_tried:
        return _flex_tried[key]
    try:
        from torch.nn.attention.flex_attention import create_block_mask
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        length = 384
        document = torch.arange(length, device=device) // 128

        def causal_within_document(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (document[q] == document[kv]) & (q >= kv)

        block_mask = create_block_mask(causal_within_document, None, None, length, length, device=device)
        q, k, v = (
            torch.randn(1, n, length, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for n in (heads, kv_heads, kv_heads)
        )
        out = compile_friendly_flex_attention(
            q, k, v, training=True, block_mask=block_mask, enable_gqa=heads != kv_heads, scale=head_dim**-0.5
        )
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        torch.cuda.synchronize(device)
        failure = None
    except Exception as e:  # any failure to compile or run means padded batches, with its reason
        failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    _flex_tried[key] = failure
    if failure is not None:
        log.warning("flex attention does not train on this device, so trials pad their batches: %s", failure)
    return failure


def choose(on_gpu: bool, model_type: str, attn: str, attn_why: str = "") -> FastPath:
    """The pieces a trial on this device and architecture runs with; each piece falls back on its own. `attn` is the
    kernel the base loads with (`resolve_attention`), `attn_why` how it was chosen."""
    pieces = []
    if not on_gpu:
        pieces.append(Piece("liger", False, "no CUDA device"))
    elif importlib.util.find_spec("triton") is None:
        pieces.append(Piece("liger", False, "no Triton"))
    elif importlib.util.find_spec("liger_kernel") is None:
        pieces.append(Piece("liger", False, "liger-kernel not installed: pip install 'lora-search[gpu]'"))
    elif model_type not in _liger_models():
        pieces.append(Piece("liger", False, f"Liger has no kernels for {model_type!r}"))
    else:
        pieces.append(Piece("liger", True, "rms_norm, swiglu, rope, fused linear cross-entropy"))

    if model_type not in PADDING_FREE_MODELS:
        pieces.append(Piece("padding-free", False, f"{model_type!r} is not known to mask packed rows"))
    elif attn not in VARLEN_ATTENTION:
        pieces.append(Piece("padding-free", False, f"{attn} has no varlen kernel: a packed row would cost T^2"))
    else:
        pieces.append(Piece("padding-free", True, f"one row per batch, {attn} varlen"))

    pieces.append(Piece("attention", attn in {"sdpa"} | VARLEN_ATTENTION, f"{attn}: {attn_why}" if attn_why else attn))
    if any(p.name == "padding-free" and p.active for p in pieces):
        pieces.append(Piece(NO_PAD_MASK, False, "padding-free rows have no padding"))
    elif model_type not in PADDING_FREE_MODELS:
        pieces.append(Piece(NO_PAD_MASK, False, f"{model_type!r} is not known to build its causal mask without one"))
    elif attn not in {"sdpa"} | VARLEN_ATTENTION:
        pieces.append(Piece(NO_PAD_MASK, False, f"{attn} attention masks every call anyway"))
    else:
        pieces.append(Piece(NO_PAD_MASK, True, NO_PAD_MASK_WHY))
    pieces.append(Piece(FEW_SYNCS, True, FEW_SYNCS_WHY))
    if attn in TRAINING_ONLY_ATTENTION:
        pieces.append(
            Piece(INFERENCE_ATTN, True, f"evals, probe and scoring on {INFERENCE_ATTENTION}: {attn} trains only")
        )
    if on_gpu and (attn == "sdpa" or attn in TRAINING_ONLY_ATTENTION):  # the latter's inference forwards run SDPA
        pieces.append(Piece(CUDNN_OFF, True, "SDPA on flash / memory-efficient kernels: " + CUDNN_WHY))
    return FastPath(tuple(pieces))


FROZEN_HEAP = "frozen-heap"
FROZEN_HEAP_WHY = "the objects that exist when training starts are left out of Python's full collections (gc.freeze)"
"""Why a trial freezes its process's heap as training starts. Python's cyclic collector runs a full collection over
every object the process holds whenever enough objects have survived into its oldest generation, and every forward
leaves objects alive until its backward (autograd's contexts, saved tensors), which count: a trial's process ran one
every step or two. On the 8B H100 profile (benchmarks/NOTES.md change 29) the GPU sat idle 164 ms in one gap of two
steps, its next kernel launched late from inside a backward with no op on the host the while: the collection, over the
580,000 objects a trial's process holds (269 ms on the CPU machine). `gc.freeze` moves what exists when training starts
(the base, the libraries' modules) into a generation the collector never scans, so a full collection scans only what
training made since. Unfrozen when training ends, so that a warm process's later trial collects what this one left."""


FROZEN_HEAP_PIECE = Piece(FROZEN_HEAP, True, FROZEN_HEAP_WHY)
"""The piece in a trial's and a pack host's fast path: always on (it changes no result, only when collections run)."""


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The process's heap frozen out of Python's collections while the block runs (`FROZEN_HEAP_WHY`); collected
    first, so no garbage is frozen."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


NO_PAD_MASK = "no-pad-mask"
INFERENCE_ATTN = "inference-attention"
NO_PAD_MASK_WHY = "right-padded batches without an attention mask: causal SDPA on its flash kernel"
"""Why a padded batch can go without its mask. Rows are padded on the right, and causal attention lets a token
see only the ones before it, so no real token ever sees a pad: the mask changes nothing a loss counts (pads carry
label -100; `tests/test_fastpath.py` checks the curve). Without it SDPA runs `is_causal` on the flash kernel; with
it, the memory-efficient kernel, whose backward took 3.0 ms a layer against flash's 0.7 on the 8B shape (H200).
Needs an architecture whose position ids and causal mask do not come from the attention mask (transformers'
masking_utils: `PADDING_FREE_MODELS`)."""

FEW_SYNCS = "few-syncs"
FEW_SYNCS_WHY = "per-step metrics stay on the device until a log step"
"""TRL's SFTTrainer reads its token accuracy, entropy and token count with `.item()` after every micro-batch, the
Trainer its tokens seen and a NaN check: each a device sync that stops the CPU queueing the next kernels. The
trial's trainer (`lora_search.train._Trainer`) sums them on the device, reads them at log steps, and counts tokens
from the collator's CPU count (`REAL_TOKENS`). The Trainer's NaN filter is off: a NaN loss is not averaged away
but shows in the logged loss, and the trial ends as diverged."""

LABEL_INDEX = "label-index"
LABEL_INDEX_WHY = "the LM head scores the positions the collator's CPU labels name: no device read a micro-batch"
"""Why the trial's LM head takes its positions from the CPU. TRL's fused head (`trl.trainer.utils.add_fused_lm_head`)
scores only the tokens whose label counts, picked with a boolean mask on the device (`hidden_states[mask]`); how many
there are is known only once the device has computed the mask, so the host stops there and waits for every kernel
queued before it (the whole forward), and its backward (`masked_scatter`, the index's gradient) waits again. On the
8B H100 profile (benchmarks/NOTES.md change 34) those were 4 waits over two steps, 740 ms of the host's lead, and the
GPU then idled while the host launched the head's chunks: ~30 ms of the 93 ms idle. The collator keeps which labels
count as a NumPy array (`LABEL_MASK`, split with the batch by the token budget); the trial's trainer turns it into the
positions on the CPU and copies them without a wait, and the head (`lora_search.trainer.indexed_lm_head`) gathers
those rows with `index_select`: TRL's kernel on the same rows, the same loss (`tests/test_trainer.py`)."""

LABEL_MASK = "lora_search_label_mask"
"""The batch key holding `labels != -100` as a NumPy bool array (rows x tokens): which labels count, on the CPU."""


def label_index(on_gpu: bool, shards_base: bool) -> Piece:
    """The `LABEL_INDEX` piece of a trial: on where a device read stalls the host (CUDA) and the head is whole."""
    if not on_gpu:
        return Piece(LABEL_INDEX, False, "no CUDA device: a read of a CPU tensor waits for nothing")
    if shards_base:
        return Piece(LABEL_INDEX, False, "the LM head is sharded: TRL's head gathers it")
    return Piece(LABEL_INDEX, True, LABEL_INDEX_WHY)


BF16_INPUTS = "bf16-adapter-inputs"
BF16_INPUTS_WHY = "LoRA layers skip PEFT's fp32 copy of their input, which autocast cast straight back to bf16"
"""Why a plain LoRA layer under bf16 autocast keeps its input's dtype. PEFT keeps the adapter's weights in fp32
(`autocast_adapter_dtype`) and casts each layer's input to their dtype before `lora_B(lora_A(x))`; autocast then
casts it back to bf16 for the matrix product. On an 8B step of 8 x 2048 tokens these copies of every targeted
layer's input, and their gradients' copies in backward, took 180 ms of the 1,140 ms GPU step (H200 profile,
benchmarks/NOTES.md). The round trip bf16 -> fp32 -> bf16 is exact, so the products, the loss and the adapter's
fp32 gradients are the same without it (`tests/test_fastpath.py`). Layers with a variant forward (DoRA) or
another class (QLoRA's 4-bit layers) keep PEFT's cast."""

FUSED_ADD = "fused-lora-add"
FUSED_ADD_WHY = "result += (scaling * A(x)) @ B^T as one in-place addmm: no output-sized multiply, add or copy"
"""Why plain LoRA layers run their own forward. PEFT computes `result + lora_B(lora_A(x)) * scaling`: a multiply and
an add over the layer's whole output (tokens x out_features, 14,336 wide for Llama's MLP) in forward, and the
multiply's gradient in backward, about 100 ms of a 960 ms 8B step (H200 profile, benchmarks/NOTES.md). Scaling
the rank-r intermediate instead and letting the second product accumulate into the base output in place (`addmm_`,
the GEMM's own beta=1 epilogue) does the same arithmetic with neither pass (`tests/test_fastpath.py` checks outputs and
gradients). Only DDP trials: a layer that shards or gathers its weights around its submodules' own calls
(DeepSpeed ZeRO-3, FSDP) keeps PEFT's forward, as do variant layers (DoRA) and QLoRA's 4-bit layers."""

KEEP_ACTIVATIONS = "keep-activations"
"""The piece for gradient checkpointing off (no recompute); `lora_search.train.micro_batching` decides it."""
MERGE_MICRO = "merge-micro-batches"
"""The piece for running a step's accumulated micro-batches as fewer, larger ones (`lora_search.train.micro_batching`).
A step's CPU work (Python, kernel launches) is per micro-batch and its GPU work per token, so a larger micro-batch
keeps the GPU busy where small ones leave it waiting on the CPU."""
CUDNN_OFF = "no-cudnn-sdpa"
CUDNN_WHY = (
    "cuDNN's SDPA built a new graph for every masked call, 20 ms of CPU each (H200, torch 2.11: 64 calls a step on "
    "an 8B, padded batches), leaving the GPU idle"
)
"""Why trials keep SDPA off its cuDNN backend. A padded batch's attention has a mask, and with a mask PyTorch
picks cuDNN first on Hopper; the trial then ran at 0.76x HF PEFT's tokens/s on the 8B shape while its GPU kernels
took half its step (benchmarks/NOTES.md). Unmasked calls (is_causal) go to flash attention instead, as fast."""

TRAINING_ONLY_ATTENTION = frozenset({varlen.NAME, "flex_attention"})
"""Attention kernels a trial trains on but never runs inference on (`inference_attention`)."""
INFERENCE_ATTENTION = "sdpa"
INFERENCE_ATTENTION_WHY = {
    "flex_attention": "flex attention's short forwards go to Inductor's flex decoding kernel, which raised "
    "NoValidChoicesError on the H200 (torch 2.11), and every switch between training and eval recompiles it",
    varlen.NAME: "torch_varlen reads packed rows' sequence lengths, not the attention mask of padded rows",
}
"""Why a trial's inference forwards leave a training-only kernel. torch_varlen (`lora_search.varlen`) takes one
packed row's sequences from the lengths the collator lists; the probe's and lm-eval's batches are padded rows with an
attention mask, which SDPA reads. The probe's one-prompt forward under
flex_attention went to Inductor's flex *decoding* kernel (short queries), which failed to lower on the GPU
(`LoweringException: NoValidChoicesError`) and ended the trial at its first report (issue 23). Transformers also
compiles flex attention again whenever the module's training flag flips (`WrappedFlexAttention`), so evaluations
between steps would recompile it twice each. SDPA computes the same attention (`tests/test_fastpath.py` checks the
logits on padded rows), needs no compile, and builds its mask from the same inputs: right-padded rows, or packed
rows whose position ids restart (transformers' `find_packed_sequence_indices`)."""

_switch_logged: set[str] = set()


def pretrained_model(model: Any) -> Any:
    """The transformers model inside `model` (a PEFT model, a DDP/Accelerate wrapper, or the model itself); None if
    there is none."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


@contextmanager
def inference_attention(model: Any, enabled: bool = True) -> Iterator[None]:
    """Run the forwards inside on SDPA if `model` trains on a training-only kernel (`TRAINING_ONLY_ATTENTION`), and
    put the training kernel back after. A no-op for any other kernel, when nested, or when not `enabled` (for call
    sites shared by training and inference). Logs the switch once per kernel, with its reason."""
    base = pretrained_model(model) if enabled else None
    kernel = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if base is None or kernel not in TRAINING_ONLY_ATTENTION:
        yield
        return
    if kernel not in _switch_logged:
        _switch_logged.add(kernel)
        log.info(
            "inference forwards run on %s, training on %s: %s",
            INFERENCE_ATTENTION,
            kernel,
            INFERENCE_ATTENTION_WHY[kernel],
        )
    base.set_attn_implementation(INFERENCE_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(kernel)


UNPACKED_WHY = (
    "a padded batch's rows hold one sequence each, so transformers' check for packed rows (position ids that "
    "restart), which every forward without an attention mask runs and which reads the device (`.all()` in an `if`), "
    "is skipped: it waited for the whole previous micro-batch's backward before each forward (benchmarks/NOTES.md "
    "change 33)"
)


@contextmanager
def rows_unpacked(enabled: bool = True) -> Iterator[None]:
    """Forwards inside take their rows as one sequence each without asking the device (`UNPACKED_WHY`): transformers'
    `masking_utils.find_packed_sequence_indices` answers None, what it returns for such rows after a device read. For
    padded batches only: padding-free batches are packed rows, which their attention needs told apart. A no-op where
    not `enabled`; nests."""
    if not enabled:
        yield
        return
    from transformers import masking_utils

    found = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = _one_sequence_a_row
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


def _one_sequence_a_row(position_ids: Any) -> None:
    """`find_packed_sequence_indices` for rows known to be unpacked (`rows_unpacked`)."""
    return None


@contextmanager
def causal_when_capturing(enabled: bool = True) -> Iterator[None]:
    """Forwards inside run causal SDPA without a mask under a CUDA graph capture too, as they do outside one. Where a
    forward has no attention mask (right-padded rows, `NO_PAD_MASK`), transformers skips the causal mask and asks SDPA
    for `is_causal`, which runs flash. Under a capture, transformers 5.17 (the GPU machine's) most likely does not skip
    it: its `is_tracing` counts a stream capture as a trace, and the full causal mask sends SDPA to its
    memory-efficient kernels, which is what the captured 1.1B pack step ran (benchmarks/NOTES.md, session 16: 57 ms
    of its step against ~25 ms on flash; 5.25 skips it where there is no padding mask). With this, session 17's
    captured 1.1B step ran flash (`fmha_cutlass` gone from its kernel table; graphs / eager 0.85-0.98x -> 1.05x). Here
    `masking_utils._ignore_causal_mask_sdpa` answers True under a capture where it would outside one without a padding
    mask: no padding mask, as many queries as keys, no cache offset, no local window reached. A no-op where not
    `enabled`; nests."""
    if not enabled:
        yield
        return
    from transformers import masking_utils

    found = masking_utils._ignore_causal_mask_sdpa
    signature = _signature(found)

    def ignore(*args: Any, **kwargs: Any) -> bool:
        if _capturing():
            given = signature.bind(*args, **kwargs)
            given.apply_defaults()
            a = given.arguments
            queries, keys = a.get("q_length", a.get("query_length")), a.get("kv_length")
            local = a.get("local_attention_size")
            if (
                a.get("padding_mask") is None
                and queries is not None
                and queries == keys
                and not a.get("q_offset")
                and not a.get("kv_offset")
                and (local is None or keys < local)
            ):
                return True
        return found(*args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = ignore
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = found


@functools.cache
def _signature(function: Any) -> Any:
    """`inspect.signature(function)`, read once per function: `causal_when_capturing` is entered every forward."""
    import inspect

    return inspect.signature(function)


def _capturing() -> bool:
    """A CUDA graph capture is under way on this thread's stream."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


PACK_PIECES = ("liger", "attention", NO_PAD_MASK, CUDNN_OFF)
"""The pieces of a solo trial's path that a pack (`lora_search.pack_host`) runs on its shared base: the kernels and
attention switches of the base itself. The rest are the Trainer's or PEFT's layers', which a pack replaces with its
own (one device sync a step, `lora_search.pack_layers`' products, its micro-batches)."""
PACK_LIGER = {
    "rms_norm": True,
    "swiglu": True,
    "rope": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}
"""Liger's kernels on a pack's base (transformers' `apply_liger_kernel` config): not the loss, which the pack scores
per adapter itself, a chunk of tokens at a time (`lora_search.pack.Pack._per_token`)."""
PACK_LIGER_WHY = "rms_norm, swiglu, rope on the shared base; the pack scores each adapter's loss itself"


def pack_path(on_gpu: bool, model_type: str, attn: str) -> FastPath:
    """The pieces a pack's base runs with (`PACK_PIECES`), each on or off as a solo trial's on the same device,
    architecture and attention kernel (`choose`), so that packed and solo trials of a sweep train on the same base
    kernels. `prepare_pack` applies them."""
    pieces = []
    for piece in choose(on_gpu, model_type, attn).pieces:
        if piece.name == "liger" and piece.active:
            piece = Piece("liger", True, PACK_LIGER_WHY)
        if piece.name in PACK_PIECES:
            pieces.append(piece)
    return FastPath(tuple(pieces))


def prepare_pack(path: FastPath, model: Any) -> None:
    """Apply `path` (`pack_path`) to a pack's base before any adapter attaches: the process-wide switches, and
    Liger's kernels patched into this model instance as the Trainer patches a solo trial's (transformers'
    `apply_liger_kernel`). The pack's own `drop_mask` is `path.active(NO_PAD_MASK)`."""
    path.prepare()
    if path.active("liger"):
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, PACK_LIGER)
