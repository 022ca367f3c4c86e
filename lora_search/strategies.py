"""How a trial's workers share the model: one table, strategy name -> what it shards and how the trainer is set up.

| name            | frozen base          | adapter grads + optimizer | through                                    |
|-----------------|----------------------|---------------------------|--------------------------------------------|
| ddp             | whole on every GPU   | replicated                | Ray Train's process group, DDP             |
| fsdp            | sharded (FSDP2)      | sharded                   | Transformers `fsdp=True`, `fsdp_config`    |
| deepspeed-zero2 | whole on every GPU   | sharded                   | DeepSpeed, `lora_search/deepspeed/zero2.json` |
| deepspeed-zero3 | sharded (ZeRO-3)     | sharded                   | DeepSpeed, `lora_search/deepspeed/zero3.json` |

A 70B bf16 base (131 GiB) fits no single GPU, so bf16 LoRA at that size needs `fsdp` or `deepspeed-zero3`;
`qlora` (NF4, ~37 GiB) fits one GPU per worker under `ddp`. `lora-search plan` prints the per-GPU memory of
every strategy before anything runs.

Sharding changes what a rank holds, so everything that reads whole parameters goes through here: saving the
adapter gathers its tensors first (`full_adapter_state_dict`; saving a sharded model without that writes the
known empty or shape-[0] adapter, which `variants.check_saved` refuses), and forward passes outside the
trainer (probe logits, golden scoring) run on every rank in step (`Strategy.shards_base`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

DEEPSPEED_CONFIGS = Path(__file__).parent / "deepspeed"


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    shards_base: bool
    """Each rank holds 1/world of the frozen base: forwards outside the trainer need every rank."""
    shards_grads: bool
    """Adapter gradients are partitioned: a per-step hook that reads whole gradients (AdaLoRA) cannot run."""
    deepspeed: str | None = None
    """File name under `lora_search/deepspeed/`."""
    fsdp: bool = False
    gpu_only: bool = True
    """Transformers' Trainer runs it on CUDA only (for FSDP on CPU, Accelerate silently falls back to DDP)."""


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("ddp", "data parallel, base replicated", shards_base=False, shards_grads=False, gpu_only=False),
        Strategy("fsdp", "FSDP2, base and adapter sharded", shards_base=True, shards_grads=True, fsdp=True),
        # DeepSpeed also runs on CPU workers (its CPU accelerator, over gloo): slow, but the same code path, so the
        # ZeRO-3 gather and the lock-step forwards are tested without a GPU.
        Strategy(
            "deepspeed-zero2",
            "DeepSpeed ZeRO-2",
            shards_base=False,
            shards_grads=True,
            deepspeed="zero2.json",
            gpu_only=False,
        ),
        Strategy(
            "deepspeed-zero3",
            "DeepSpeed ZeRO-3",
            shards_base=True,
            shards_grads=True,
            deepspeed="zero3.json",
            gpu_only=False,
        ),
    )
}

INCOMPATIBLE: dict[str, tuple[frozenset[str], str]] = {
    # variant -> (strategies it cannot run under, why)
    "pissa": (
        frozenset({"fsdp", "deepspeed-zero3"}),
        "PiSSA's initial SVD needs the whole base weight on every rank, and its save-time conversion to plain LoRA "
        "loads a second adapter into the model; a sharded base allows neither",
    ),
    "loftq": (
        frozenset({"fsdp", "deepspeed-zero3"}),
        "LoftQ replaces the adapter weights from the whole unquantised base weights on every rank",
    ),
    "adalora": (
        frozenset({"fsdp", "deepspeed-zero2", "deepspeed-zero3"}),
        "AdaLoRA's rank allocator reads every adapter gradient whole after each step; sharded gradients are not",
    ),
}


def incompatibility(variant: str, strategy: str) -> str | None:
    """Why `variant` cannot train under `strategy`, or None."""
    blocked, why = INCOMPATIBLE.get(variant, (frozenset(), ""))
    return why if strategy in blocked else None


def trainer_kwargs(strategy: str, adapter_param_numel: int = 0) -> dict[str, Any]:
    """The `SFTConfig` arguments that select `strategy`. Build the config before loading the model: under ZeRO-3 it
    makes `from_pretrained` partition the weights as they load, and under FSDP it makes ranks > 0 load none
    (`cpu_ram_efficient_loading`: 8 ranks x 131 GiB of a 70B base would not fit a node's RAM).

    `adapter_param_numel` bounds the size of the trial's largest adapter tensor (`adapter_param_bound`). Under ZeRO-3
    every parameter at or below the persistence threshold stays whole on every rank, so the adapter is never
    partitioned: it costs megabytes, saves two collectives per adapted layer per pass, and lets DoRA read its lora_A
    and lora_B weights outside their own forward (a partitioned lora_A fails there with "Cannot partition a param in
    flight", seen on an H200 with a 1.1B base, where the default threshold of 10 x hidden size partitions it)."""
    s = STRATEGIES[strategy]
    if s.fsdp:
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "reshard_after_forward": True,  # ZeRO-3-like: frees each layer's gathered weights after use
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per decoder layer (_no_split_modules)
                "cpu_ram_efficient_loading": True,
                "state_dict_type": "SHARDED_STATE_DICT",
            },
        }
    if s.deepspeed:
        config = json.loads((DEEPSPEED_CONFIGS / s.deepspeed).read_text())
        zero = config["zero_optimization"]
        if zero["stage"] == 3 and adapter_param_numel > 0:
            zero["stage3_param_persistence_threshold"] = adapter_param_numel
        return {"deepspeed": config}
    return {}


def skip_cpu_shm_all_reduce() -> None:
    """Make DeepSpeed's CPU backend use torch.distributed's all-reduce instead of compiling its shared-memory one.

    On CPU, DeepSpeed's communication backend JIT-compiles a C++ extension (`deepspeed_shm_comm`) when it starts:
    about a minute on a 2-core machine, on the first trial of every new environment (its build dir is keyed to the
    venv), far longer than the few-worker CPU trials lora_search runs there (a laptop try of a sharded setup, CI).
    Its gain is a faster all-reduce between many local ranks. DeepSpeed keeps the probe's result in one module-level
    dict and reads it before building (`deepspeed.comm.torch.build_shm_op`); marking the op incompatible there is
    the switch it offers. GPU trials use NCCL and never build it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def adapter_param_bound(model_config: Any, rank: int) -> int:
    """An upper bound on the elements of one adapter tensor of rank `rank` on a model with `model_config`: rank times
    the widest linear layer's in or out size (lora_B of gate/up, lora_A of down). Read from the config alone, before
    the weights load."""
    widths = [
        getattr(model_config, "hidden_size", 0) or 0,
        getattr(model_config, "intermediate_size", 0) or 0,
        getattr(model_config, "moe_intermediate_size", 0) or 0,
    ]
    heads, head_dim = getattr(model_config, "num_attention_heads", 0), getattr(model_config, "head_dim", None)
    if heads and head_dim:
        widths.append(heads * head_dim)
    return rank * max(widths)


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_adapter_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's entries of `model.state_dict()`, whole, on the CPU. A collective under FSDP2 and ZeRO-3:
    every rank must call it, in step. Keys keep the model's own names, as `PeftModel.save_pretrained(state_dict=)`
    expects them."""
    import torch

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment,misc]

    prefix = model.base_model.prefix  # "lora_" for LoRA/DoRA/AdaLoRA, "vera_lambda_" for VeRA
    state = model.state_dict()  # FSDP2: sharded DTensors, no communication; ZeRO-3: shape-[0] placeholders
    keys = [k for k in state if prefix in k]
    params = dict(model.named_parameters())
    partitioned = [params[k] for k in keys if k in params and _is_zero3(params[k])]
    gather: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    out: dict[str, torch.Tensor] = {}
    with gather, torch.no_grad():
        for k in keys:
            t = params[k].data if k in params and _is_zero3(params[k]) else state[k]
            if isinstance(t, DTensor):
                t = t.full_tensor()
            out[k] = t.detach().to("cpu", copy=True)
    return out


def deepspeed_when_used() -> None:
    """DeepSpeed imported only by the trials that use it. Accelerate's `extract_model_from_parallel` (under every
    `save_pretrained` and TRL's SFTTrainer set-up, so in every trial) imports DeepSpeed wherever it is installed, only
    to add `DeepSpeedEngine` to the wrappers it unwraps: 3.6 CPU-s a process on a 2-core machine (torch and
    Transformers import in 4.2 CPU-s, and 7.8 with DeepSpeed). A model can only be a DeepSpeedEngine once DeepSpeed
    is imported (a `deepspeed-*` strategy's trainer imports it before it wraps the model), so the check is answered
    from `sys.modules`: the same answer without the import. Accelerate has no setting for this; its own
    `is_deepspeed_available` is what is replaced, in that one module."""
    import sys

    from accelerate.utils import other

    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules
