"""The pack's layer: one frozen nn.Linear of the shared base with several LoRA adapters, each on its own rows.

    rows = Rows()
    layer = PackedLinear(base_linear, rows)
    layer.add("t1", r=8, scaling=2.0, dropout=0.05, dtype=torch.float32)
    rows.blocks = {"t1": slice(0, 4), "t2": slice(4, 12)}   # the pack sets this around a step
    y = layer(x)   # base(x); rows 0-3 also get 2.0 * B_t1(A_t1(dropout(x[0:4]))); t2 has no product here

`lora_search.pack.Pack` wraps each targeted nn.Linear in one of these, lays the adapters' micro-batches out as row
blocks (`concat`) and sets the shared `Rows` for the step. `config_problems` says which LoraConfigs this layer computes.

Why not PEFT's own LoRA layer: its mixed-batch forward (`adapter_names=`, one adapter per row) is refused in training
mode (`LoraModel._enable_peft_forward_hooks` in PEFT 0.21: "Cannot pass `adapter_names` when the model is in
training mode"), and it looks each adapter's rows up as Python index lists in every layer of every forward. A pack's
rows are contiguous blocks, one per adapter, and each adapter's update is added into its own rows in place.
The arithmetic per adapter is PEFT's `Linear.forward` (input cast to the adapter's dtype, `B(A(dropout(x))) *
scaling`, added to the base's output in its dtype), so a packed adapter computes what it computes alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_search.problems import Problem

if TYPE_CHECKING:
    from peft import LoraConfig

UNSUPPORTED = (
    "use_dora",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "megatron_config",
    "arrow_config",
    "monteclora_config",
    "kasa_config",
    "velora_config",
    "use_bdlora",
)
"""LoraConfig fields a packed adapter leaves at PEFT's default: each changes the layer, what trains or where."""

REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""`init_lora_weights` values whose init writes into the base weight (PEFT 0.21), which a pack shares."""


def config_problems(config: LoraConfig, init_given: bool) -> list[Problem]:
    """What in `config` a PackedLinear does not compute; `init_given`: the adapter's initial weights come with it."""
    default = type(config)()
    fix = "train this adapter solo (lora_search.pack.packs says which variants pack)"
    problems = [
        Problem(f"config.{f}", getattr(config, f), "changes the LoRA layer, which a pack does not compute", fix)
        for f in UNSUPPORTED
        if getattr(config, f, None) != getattr(default, f, None)
    ]
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(REWRITES_BASE):
        problems.append(Problem("config.init_lora_weights", init, "writes into the shared base weight", fix))
    elif not init_given and init not in (True, False, "gaussian"):
        why, give = "needs its initial weights given", "pass init_state (PEFT's state dict of the initialised adapter)"
        problems.append(Problem("config.init_lora_weights", init, why, give))
    if config.target_modules == "all-linear":
        why, give = "is not resolved here", "give the module names (lora_search.targets.resolve)"
        problems.append(Problem("config.target_modules", "all-linear", why, give))
    return problems


def concat(
    batches: Mapping[str, Mapping[str, torch.Tensor]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, slice]]:
    """(input_ids, attention_mask, labels, name -> its rows) on `device`: the micro-batches one under another,
    right-padded to the longest (pad token, mask 0, labels -100), so a row keeps its positions and its loss its
    tokens."""
    length = max(b["input_ids"].shape[1] for b in batches.values())
    ids, masks, labels, blocks, start = [], [], [], {}, 0
    for name, b in batches.items():
        x = b["input_ids"]
        mask = b.get("attention_mask")
        extra = (0, length - x.shape[1])
        ids.append(nn.functional.pad(x, extra, value=pad_token_id))
        masks.append(nn.functional.pad(torch.ones_like(x) if mask is None else mask, extra, value=0))
        labels.append(nn.functional.pad(b["labels"], extra, value=-100))
        blocks[name] = slice(start, start + x.shape[0])
        start += x.shape[0]
    return torch.cat(ids).to(device), torch.cat(masks).to(device), torch.cat(labels).to(device), blocks


class Rows:
    """Which rows of the packed batch each adapter owns during the current step: contiguous blocks that tile the
    batch in order. Shared by every PackedLinear of one pack; empty outside a step, where the layers compute the base
    alone."""

    def __init__(self) -> None:
        self.blocks: dict[str, slice] = {}

    @property
    def sizes(self) -> list[int]:
        return [b.stop - b.start for b in self.blocks.values()]


class _AddIntoRows(torch.autograd.Function):
    """out[rows_i] += delta_i for each adapter's block, in the output's own memory. Backward passes the output's
    gradient through and gives each delta its rows of it, as views. What autograd would do instead: an add into a
    slice copies the whole gradient once per adapter (CopySlices); index_add_ scatters, slowly on a CPU; a cat of
    the blocks copies the output forward and its gradient backward. In place is safe: a linear layer's backward needs
    its input and weight, never its output, and the blocks are disjoint."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, blocks: list[slice], *deltas: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(out)
        ctx.blocks = blocks
        for rows, delta in zip(blocks, deltas, strict=True):
            out[rows].add_(delta)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (grad, None, *(grad[rows] for rows in ctx.blocks))


class PackedLinear(nn.Module):
    """A frozen `base_layer` plus per-adapter `lora_A[name]`, `lora_B[name]` (nn.Linear, no bias: PEFT's shapes and
    names), `lora_dropout[name]` and `scaling[name]`."""

    def __init__(self, base_layer: nn.Linear, rows: Rows) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(
        self, name: str, *, r: int, scaling: float, dropout: float, dtype: torch.dtype, init: bool | str = True
    ) -> None:
        """Add adapter `name` of rank `r`. `init`: PEFT's `init_lora_weights` (True: A Kaiming-uniform and B zero, so
        the adapter starts as the base; "gaussian": A normal with std 1/r, B zero; False: both as nn.Linear starts).
        The random draws follow PEFT's order (A's and B's nn.Linear init, then A's reset), so under the same seed the
        weights are those `get_peft_model` draws for the same modules in the same order."""
        base = self.base_layer
        device = base.weight.device
        a = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1 / r)
            nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling

    def remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.rows.blocks:  # outside a step: the base alone
            return out
        blocks, deltas = [], []
        # One split of the input: its backward is one concatenation, where a slice per adapter would fill a
        # zero gradient of the whole input each.
        for (name, rows), part in zip(self.rows.blocks.items(), x.split(self.rows.sizes), strict=True):
            scaling = self.scaling.get(name)
            if scaling is None:  # that adapter does not target this module
                continue
            a = self.lora_A[name]
            delta = self.lora_B[name](a(self.lora_dropout[name](part.to(a.weight.dtype)))) * scaling
            blocks.append(rows)
            deltas.append(delta.to(out.dtype))
        return _AddIntoRows.apply(out, blocks, *deltas) if deltas else out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.lora_A[n].out_features} scaling={s:g}" for n, s in self.scaling.items())
