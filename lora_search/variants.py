"""The LoRA variants a sweep can try, as one table: name -> how its PEFT config and optimizer are built.

Adding a variant is one row in `VARIANTS` (plus, at most, a small function). Every row runs through the
same contract test (tests/test_variants.py): build, train a few steps, loss falls, save, reload with
plain `peft.PeftModel.from_pretrained` in a fresh model, identical logits.

| name     | what changes                                                      | needs          |
|----------|-------------------------------------------------------------------|----------------|
| lora     | plain LoRA, scale alpha/r                                         |                |
| rslora   | rank-stabilised scale alpha/sqrt(r)                               |                |
| dora     | weight-decomposed LoRA (magnitude vector + LoRA direction)        |                |
| pissa    | A,B from the top-r singular vectors; saved converted to plain LoRA|                |
| loraplus | LoRA with B's learning rate 16x A's (PEFT's LoRA+ optimizer)      |                |
| adalora  | SVD-form LoRA whose ranks are re-allocated during training        |                |
| vera     | frozen shared random A,B; trains only scaling vectors             |                |
| qlora    | LoRA on an NF4 (double-quantised) base, bf16 compute              | CUDA, bnb      |
| loftq    | qlora with LoftQ init (A,B absorb the quantisation error)         | CUDA, bnb      |
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_search.records import TrialParams

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel


@dataclass(frozen=True, kw_only=True)
class Adapter(TrialParams):
    """One trial's sampled hyperparameters (`records.TrialParams`) resolved against its base, as the variant builders
    need them."""

    target_modules: tuple[str, ...]
    """The base's modules that `targets` names (`lora_search.targets.resolve`)."""
    total_steps: int


AdapterKind = Literal["lora", "dora", "vera", "adalora"]
"""How a variant's trainable parameters are counted (lora_search.memory.adapter_params)."""


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    peft_config: Callable[[Adapter], PeftConfig]
    kind: AdapterKind = "lora"
    """Its trainable parameters per targeted layer: LoRA's A and B, plus DoRA's magnitude, AdaLoRA's singular values;
    VeRA's scaling vectors only (lora_search.memory.adapter_params)."""
    start_rank: Callable[[int], int] | None = None
    """The rank its adapter starts at, from the sampled rank (AdaLoRA starts above it and prunes down); None: the
    sampled rank."""
    optimizer: Callable[[PeftModel, Adapter], torch.optim.Optimizer] | None = None
    """None: the trainer's default AdamW over the trainable parameters."""
    quantized: bool = False
    """The base is loaded in 4-bit NF4 with double quantisation (bitsandbytes, CUDA only)."""
    after_init: Callable[[PeftModel], None] | None = None
    """Runs once after `get_peft_model` (LoftQ's weight replacement)."""
    step_hook: Callable[[PeftModel, int], None] | None = None
    """Runs after each optimizer step, before gradients are zeroed (AdaLoRA's rank allocator)."""
    converts_on_save: bool = False
    """The trained adapter only makes sense on a mutated base (PiSSA); save it converted to plain LoRA."""
    saving: Callable[[PeftModel], AbstractContextManager[None]] | None = None
    """Wraps the save and its check (AdaLoRA: writes the ranks the live adapter computes with)."""
    uses_alpha: bool = True

    def starting_rank(self, rank: int) -> int:
        return rank if self.start_rank is None else self.start_rank(rank)

    @property
    def changes_base(self) -> bool:
        """Whether a trial leaves its base other than it was loaded: quantized (4-bit layers PEFT prepares in place),
        rewritten by the adapter's init (PiSSA, LoftQ). Such a base is never kept for another trial (`BaseCache`)."""
        return self.quantized or self.converts_on_save or self.after_init is not None


def _lora(a: Adapter, **extra: Any) -> PeftConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=a.rank,
        lora_alpha=a.alpha,
        target_modules=list(a.target_modules),
        lora_dropout=a.dropout,
        task_type="CAUSAL_LM",
        **extra,
    )


LORAPLUS_LR_RATIO = 16.0
"""LoRA+'s learning rate of B over A: the LoRA+ paper's recommendation for decoder LMs (B learns 16x faster)."""


def _loraplus_optimizer(model: PeftModel, a: Adapter) -> torch.optim.Optimizer:
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=a.lr, loraplus_lr_ratio=LORAPLUS_LR_RATIO)


def _adalora_init_r(rank: int) -> int:
    return max(rank + 1, math.ceil(1.5 * rank))


def _adalora(a: Adapter) -> PeftConfig:
    from peft import AdaLoraConfig

    # Start 1.5x above the target rank and prune down; allocate between 10% and 70% of training.
    tinit = max(1, a.total_steps // 10)
    tfinal = max(1, (3 * a.total_steps) // 10)
    return AdaLoraConfig(
        init_r=_adalora_init_r(a.rank),
        target_r=a.rank,
        lora_alpha=a.alpha,
        target_modules=list(a.target_modules),
        lora_dropout=a.dropout,
        total_step=a.total_steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, a.total_steps // 20),
        task_type="CAUSAL_LM",
    )


def _adalora_step(model: PeftModel, step: int) -> None:
    model.base_model.update_and_allocate(step)


@contextmanager
def _adalora_live_ranks(model: PeftModel) -> Iterator[None]:
    """Save the adapter the model computes with, at the ranks it computes with; training's own state is left as is.

    PEFT's save cuts every module down to the config's `rank_pattern`: the allocator's last mask (one list of booleans
    per module, keyed by its `lora_E` parameter). In the budgeting phase the allocator masks only every `deltaT`
    steps and the masked singular values (E) train again in between, so a checkpoint cut to the last mask is not the
    adapter whose eval loss it is reported with. A triplet whose E is zero (masked, or never trained) adds exactly
    nothing, so the live ranks are the non-zero E; from step `total_step - tfinal` on the allocator re-masks after
    every step and the two patterns are the same. A module may have rank 0: its (0, in) / (out, 0) tensors are saved
    as such and `PeftModel.from_pretrained` rebuilds it at rank 0 (`AdaLoraModel.resize_modules_by_rank_pattern`).

    Reloading warns "rank_pattern keys did not match any targeted module and were ignored" (PEFT 0.21): that generic
    check reads the keys as LoRA module-name patterns, but AdaLoRA's are `lora_E` parameter names that its own loader
    applies; the reloaded ranks are the saved ones (tests/test_adalora.py).
    """
    from peft.utils.warning import PeftWarning

    tuner = model.base_model
    name = tuner.trainable_adapter_name
    config = model.peft_config[name]
    allocated = config.rank_pattern  # the allocator's, which its final phase re-masks with: restored afterwards
    config.rank_pattern = {
        n: (p != 0).view(-1).tolist() for n, p in tuner.model.named_parameters() if n.endswith(f".lora_E.{name}")
    }
    try:
        with warnings.catch_warnings():
            # PEFT takes a rank-0 module's empty lora_A / lora_B for an ungathered FSDP / ZeRO-3 shard; `check_saved`
            # tells the two apart against the model's own shapes (and AdaLoRA never runs sharded).
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape", category=PeftWarning)
            yield
    finally:
        config.rank_pattern = allocated


def _vera(a: Adapter) -> PeftConfig:
    from peft import VeraConfig

    return VeraConfig(r=a.rank, target_modules=list(a.target_modules), vera_dropout=a.dropout, task_type="CAUSAL_LM")


def _loftq_replace(model: PeftModel) -> None:
    from peft import replace_lora_weights_loftq

    # LoftQ reads the unquantised weights from the checkpoint's safetensors: a local model dir is passed as is
    # (PEFT only resolves hub ids itself, from the local HF cache).
    source = Path(model.base_model.config._name_or_path)
    replace_lora_weights_loftq(model, model_path=str(source) if source.is_dir() else None)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("lora", "LoRA (Hu et al. 2021)", _lora),
        Variant("rslora", "rank-stabilised LoRA", lambda a: _lora(a, use_rslora=True)),
        Variant("dora", "weight-decomposed LoRA", lambda a: _lora(a, use_dora=True), kind="dora"),
        Variant(
            "pissa",
            "principal singular vectors init",
            lambda a: _lora(a, init_lora_weights="pissa_niter_4"),
            converts_on_save=True,
        ),
        Variant("loraplus", "LoRA+ (B at 16x lr)", _lora, optimizer=_loraplus_optimizer),
        Variant(
            "adalora",
            "adaptive rank allocation",
            _adalora,
            kind="adalora",
            start_rank=_adalora_init_r,
            step_hook=_adalora_step,
            saving=_adalora_live_ranks,
        ),
        Variant("vera", "shared random projections", _vera, kind="vera", uses_alpha=False),
        Variant("qlora", "LoRA on an NF4 base", _lora, quantized=True),
        Variant("loftq", "QLoRA with LoftQ init", _lora, quantized=True, after_init=_loftq_replace),
    )
}


def quantization_config(storage: torch.dtype | None = None) -> Any:
    """QLoRA's recipe: NF4 weights, double quantisation of the scales, bf16 compute. `storage`: the dtype the packed
    4-bit weights are stored as (default uint8); FSDP and ZeRO-3 need the model's float dtype to shard them."""
    import torch
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        **extra,
    )


def attach(model: torch.nn.Module, adapter: Adapter, init_dir: Path | None = None) -> PeftModel:
    """Wrap `model` in the variant's adapter. For variants that convert on save, the untrained adapter is
    written to `init_dir` first (PEFT needs it to express the trained adapter as plain LoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    variant = VARIANTS[adapter.variant]
    if variant.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, variant.peft_config(adapter))
    if variant.after_init is not None:
        variant.after_init(peft_model)
    if variant.converts_on_save:
        if init_dir is None:
            raise ValueError(f"variant {adapter.variant!r} needs an init_dir to save its initial adapter")
        # Saved with init_lora_weights=True so that reloading it for the conversion does not re-run the SVD.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(init_dir))
    return peft_model


def save(
    model: PeftModel,
    adapter: Adapter,
    out_dir: Path,
    init_dir: Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    sharded: bool,
) -> int:
    """Save the adapter as a standard PEFT dir (safetensors) that loads on the original base; return its bytes.

    `state_dict`: the adapter's tensors gathered whole from a sharded model (`strategies.full_adapter_state_dict`);
    None reads them from the model, which holds them whole under DDP. `sharded`: the trial's strategy shards the
    model (FSDP, ZeRO-3); it decides what a refused save's message blames. Raises `EmptyAdapterError`."""
    variant = VARIANTS[adapter.variant]
    kwargs: dict[str, Any] = {}
    if variant.converts_on_save:
        kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    with variant.saving(model) if variant.saving is not None else _nothing():
        model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
        check_saved(model, out_dir, sharded=sharded, reshaped=variant.converts_on_save)
    return adapter_bytes(out_dir)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class EmptyAdapterError(RuntimeError):
    """A saved adapter file holds no tensors, or tensors of the wrong shape, empty or all zeros: the known failure of
    saving a sharded (FSDP, DeepSpeed ZeRO-3) model without gathering its parameters first, or an adapter that never
    trained."""


def check_saved(model: PeftModel, out_dir: Path, *, sharded: bool, reshaped: bool = False) -> None:
    """Every saved tensor has the live parameter's full shape; trained B/up matrices are non-zero; something is saved.

    The full shape of a sharded parameter is its `ds_shape` (DeepSpeed ZeRO-3) or its `shape` (FSDP2's DTensor is
    global). An empty tensor passes only where the model's own is empty too: an AdaLoRA module its allocator pruned
    to rank 0 (PEFT's state dict is cut to the rank pattern), never a whole adapter of them. `reshaped`: the variant
    rewrites its matrices on save (PiSSA's conversion doubles the rank), so only emptiness and zeros are checked.
    `sharded`: the message blames an ungathered shard only when the trial was sharded.
    """
    import torch
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(out_dir) / SAFETENSORS_WEIGHTS_NAME))
    # The model's own tensors, each standing in at its full shape: a ZeRO-3 parameter holds a shape-[0] placeholder
    # whose real shape is `ds_shape`, which PEFT's state dict (tensors, not Parameters) would lose.
    whole: dict[str, Any] = dict(model.state_dict())
    for name, p in model.named_parameters(remove_duplicate=False):
        ds_shape = getattr(p, "ds_shape", None)
        if ds_shape is not None:
            whole[name] = torch.empty(tuple(ds_shape), dtype=p.dtype, device="meta")
    live = get_peft_model_state_dict(model, state_dict=whole)
    problems = []
    for name, tensor in saved.items():
        param = live.get(name)
        shape = tuple(tensor.shape)
        expected = tuple(param.shape) if param is not None else None
        if tensor.numel() == 0:
            if reshaped or shape != expected:
                problems.append(f"{name} is empty {shape}" + (f", the model's is {expected}" if expected else ""))
        elif expected is not None and not reshaped and shape != expected:
            problems.append(f"{name} has shape {shape}, the model's is {expected}")
        elif any(k in name for k in ("lora_B", "vera_lambda_b")) and not bool(tensor.abs().max() > 0):
            problems.append(f"{name} is all zeros")
    if not problems and all(t.numel() == 0 for t in saved.values()):
        problems.append("it holds no tensors" if not saved else f"all {len(saved)} of its tensors are empty (rank 0)")
    if problems:
        raise EmptyAdapterError(
            f"the adapter saved to {out_dir} is broken: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + (
                ". A sharded model (FSDP, ZeRO-3) must be gathered before saving its adapter."
                if sharded
                else ". The trial was not sharded, so nothing was left ungathered: the adapter itself is empty or "
                "untrained (check that its parameters get gradients and that the optimizer steps before the save)."
            )
        )


def adapter_bytes(adapter_dir: Path) -> int:
    """Bytes of the adapter weights on disk (the number the Pareto frontier uses)."""
    return sum(p.stat().st_size for p in Path(adapter_dir).glob("adapter_model.*"))
