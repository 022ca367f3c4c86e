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

A step's adapter products take one of three paths (`products`, per layer and step; tests/test_pack_layers.py holds
each to the first): "loop", one adapter at a time (3-4 kernels each, forward and backward again); "bmm", batched
matrix products over the adapters where they have one rank and one row count; "masked", two products over the whole
batch for any ranks and rows, each row masked to its own adapter's rank slice, at the price of computing every
adapter's product on every row. A pack step on a GPU waits on kernel launches more than on FLOPs (benchmarks/pack.py
counts both), so on a GPU "auto" masks where the launches it saves outweigh its extra FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_search.fused_lora import _as, one_node_dtype
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

REWRITES_BASE = ("olora", "corda", "loftq", "lora_ga")
"""`init_lora_weights` values whose init writes into the base weight (PEFT 0.21), which a pack shares. PiSSA's
("pissa", "pissa_niter_N") writes one too, and packs: its correction (`PackedLinear.correct`) stands in for it."""

CORRECTION = "#0"
"""What follows an adapter's name in a layer's dicts for its frozen correction (`PackedLinear.correct`); an
adapter's name has no "#" (`lora_search.pack.Pack.attach` checks), so the two never meet."""


def is_pissa(init: Any) -> bool:
    """`init_lora_weights` is PiSSA's ("pissa", or "pissa_niter_N": PEFT's randomised SVD of N iterations)."""
    return isinstance(init, str) and init.lower().startswith("pissa")


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
    elif not init_given and init not in (True, False, "gaussian") and not is_pissa(init):
        why, give = "needs its initial weights given", "pass init_state (PEFT's state dict of the initialised adapter)"
        problems.append(Problem("config.init_lora_weights", init, why, give))
    if config.target_modules == "all-linear":
        why, give = "is not resolved here", "give the module names (lora_search.targets.resolve)"
        problems.append(Problem("config.target_modules", "all-linear", why, give))
    return problems


def pissa_weights(base_layer: nn.Linear, config: LoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's initial (A0, B0) for `base_layer` under `config`, as PEFT makes them: PEFT's own LoRA layer
    (`peft.tuners.lora.layer.Linear`, whose `pissa_init` runs the SVD) built over a stand-in for the base layer, a
    new parameter over the same weight tensor. PEFT then rebinds the stand-in's weight to the residual W - s B0 A0;
    the base's own parameter, shared by the pack, is not written. In the adapter's dtype as PEFT leaves it after
    `get_peft_model` (fp32 for a half-precision base: PEFT moves A0 and B0 to the base's dtype, then autocasts the
    adapter to fp32), so a packed PiSSA starts where its solo trial starts."""
    from peft.tuners.lora.layer import Linear

    weight = base_layer.weight
    stand_in = nn.Linear(base_layer.in_features, base_layer.out_features, bias=False, device="meta")
    stand_in.weight = nn.Parameter(weight.detach(), requires_grad=False)
    layer = Linear(stand_in, "default", config, r=config.r, lora_alpha=config.lora_alpha)
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return a0.detach().to(dtype), b0.detach().to(dtype)


def concat(
    batches: Mapping[str, Mapping[str, torch.Tensor]],
    pad_token_id: int,
    device: torch.device | str,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, slice]]:
    """(input_ids, attention_mask, labels, name -> its rows) on `device`: the micro-batches one under another,
    right-padded to the longest (or to `length` tokens, at least the longest: a CUDA graph's fixed shape,
    `pack_graphs`) with the pad token, mask 0 and labels -100, so a row keeps its positions and its loss its
    tokens. Made where the batches are (the CPU) and copied to a GPU from pinned memory without a wait: a copy from
    pageable memory waits for every kernel queued before it (the previous step's), and the host loses its lead."""
    length = max([b["input_ids"].shape[1] for b in batches.values()] + [length or 0])
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
    return _to(torch.cat(ids), device), _to(torch.cat(masks), device), _to(torch.cat(labels), device), blocks


def right_padded(batches: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """Every row of every batch is padded on the right only (its mask ones, then zeros; no mask: no padding). A read
    of the masks where they are (the CPU's, before `concat`)."""
    for b in batches.values():
        mask = b.get("attention_mask")
        if mask is not None and not bool((mask[:, 1:] <= mask[:, :-1]).all()):
            return False
    return True


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the CPU to a GPU through pinned memory, without waiting (`concat`)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Rows:
    """Which rows of the packed batch each adapter owns during the current step: contiguous blocks that tile the
    batch in order. Shared by every PackedLinear of one pack; empty outside a step, where the layers compute the base
    alone."""

    def __init__(self) -> None:
        self.blocks: dict[str, slice] = {}

    @property
    def sizes(self) -> list[int]:
        return [b.stop - b.start for b in self.blocks.values()]


PRODUCTS = "auto"
"""How a PackedLinear computes its adapters' products in a step: "auto" (`products` picks per layer and step), or
"loop", "bmm", "masked" for every layer where they apply (benchmarks/pack.py --products times them side by side)."""

LOOP_KERNELS = 12
"""Kernels the one-at-a-time path launches per adapter and layer in a training step (forward: A, B, scale, cast, add;
backward: two products each for A and B, the scale's, gradient accumulation)."""
MASKED_KERNELS = 9
"""Kernels "masked" launches per layer in a training step, for all its adapters together: measured 2.9 fewer per
adapter layer than the one-at-a-time path with a single adapter (benchmarks/pack_h100_1b_512_2026-12-05.json, k=1:
712 launches a step against 970)."""
LAUNCH_S = 40e-6
"""Host seconds a launch costs a pack's step (Python, the aten ops around it, dispatch, launch): a pack on a GPU waits
on its host. Measured on one H100, the 1.1B shape at 512 tokens (benchmarks/NOTES.md change 32): "masked" against
the one-at-a-time path saved 10.5 ms of a step for 258 fewer launches at k=1 and 142 ms for 3,252 at k=4, 41 and
44 us each (the first estimate, 10 us, was the launch alone)."""
MASKED_MFU = 0.3
"""The fraction of the GPU's peak the extra FLOPs of "masked" are assumed to run at (small, skinny products)."""


@dataclass(frozen=True)
class Step:
    """What the choice of products depends on, for one layer in one step: each of its adapters' row count and rank
    (in the batch's order), whether any applies dropout, how many weight dtypes they have, the layer's (in, out),
    and the batch's rows and tokens a row."""

    rows: tuple[int, ...]
    ranks: tuple[int, ...]
    dropout: bool
    dtypes: int
    features: tuple[int, int]
    batch: int
    tokens: int

    def masked_extra_flops(self) -> float:
        """FLOPs of a training step (forward and backward: 6 per multiply-add) that "masked" spends beyond the
        adapters' own products: it computes every adapter's product on every row of the batch."""
        needed = sum(n * r for n, r in zip(self.rows, self.ranks, strict=True))
        return 6.0 * self.tokens * sum(self.features) * (self.batch * sum(self.ranks) - needed)

    def masked_pays(self, peak_tflops: float) -> bool:
        """The launches "masked" saves (`LOOP_KERNELS` per adapter against its own `MASKED_KERNELS`, at `LAUNCH_S`)
        outweigh the time of its extra FLOPs at `MASKED_MFU` of `peak_tflops`. With one adapter it saves launches
        too, and spends FLOPs only on the rows of the pack's other trials."""
        saved = (len(self.ranks) * LOOP_KERNELS - MASKED_KERNELS) * LAUNCH_S
        return self.masked_extra_flops() / (peak_tflops * 1e12 * MASKED_MFU) < saved


def products(how: str, step: Step, peak_tflops: float | None) -> str:
    """Which products compute `step`'s adapters: "loop" (one adapter at a time, `LOOP_KERNELS` kernels each), "bmm"
    (one rank and one row count: batched products over the adapters, no FLOP spent twice), "masked" (any ranks and
    rows: two products over the whole batch, each row masked to its own adapter; not with dropout, whose draws are
    per adapter). `how`: `PRODUCTS`. "auto" on a GPU of `peak_tflops`: masked where it pays (`Step.masked_pays`, one
    adapter included), else bmm where it applies to several, else loop; on a CPU (`peak_tflops` None) one at a time:
    there a kernel costs little and a FLOP much."""
    masked = not step.dropout and step.dtypes == 1
    bmm = len(set(step.rows)) == 1 and len(set(step.ranks)) == 1 and step.dtypes == 1
    if how == "masked" and masked or how == "bmm" and bmm:
        return how
    if how != "auto" or peak_tflops is None:
        return "loop"
    if masked and step.masked_pays(peak_tflops):
        return "masked"
    return "bmm" if bmm and len(step.rows) > 1 else "loop"


_PEAKS: dict[torch.device, float] = {}


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of `device` for "auto" (`memory.GPUS`; a GPU not listed counts as an H100), None on a CPU."""
    if device.type != "cuda":
        return None
    if device not in _PEAKS:  # once per device: the name query is a driver call
        from lora_search.memory import GPUS

        name = torch.cuda.get_device_name(device).lower()
        found = next((gpu.bf16_tflops for kind, gpu in GPUS.items() if kind.lower() in name), None)
        _PEAKS[device] = found or GPUS["H100"].bf16_tflops
    return _PEAKS[device]


class _AddIntoRows(torch.autograd.Function):
    """out[rows_i] += delta_i for each adapter's block, in the output's own memory. Backward passes the output's
    gradient through and gives each delta its rows of it, as views. What autograd would do instead: an add into a
    slice copies the whole gradient once per adapter (CopySlices); index_add_ scatters, slowly on a CPU; a cat of
    the blocks copies the output forward and its gradient backward. In place is safe: a linear layer's backward needs
    its input and weight, never its output. Blocks are disjoint but for a correction's, which is its adapter's
    (`PackedLinear.correct`): both add into the rows, and both get the rows' gradient."""

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


@dataclass
class _Stack:
    """One layer's adapters of one layout, stacked for `MaskedLoraLinear`: `a` is every adapter's `scaling * A` one
    under another ((sum of ranks) x in), `b` their B side by side (out x (sum of ranks)), both in the products' dtype
    (the solo trial's `fused_lora.Casts`, for several adapters). Valid while each source weight keeps the version it
    was cast at; an optimizer step writes the weights in place (and says so: `lora_search.pack._Attached.wrote`, as
    torch's fused AdamW bumps no version), and `refresh_stacks` recasts every stale stack of a pack in a few foreach
    kernels, where a cat and two casts per layer in every forward did it before."""

    a_src: list[torch.Tensor]
    b_src: list[torch.Tensor]
    scalings: list[float]
    ranks: tuple[int, ...]
    a: torch.Tensor
    b: torch.Tensor
    a_t: torch.Tensor
    b_t: torch.Tensor
    """`a.t()` and `b.t()`, as the products read them: views made once, which the in-place recasts keep current."""
    scale_rows: torch.Tensor
    """(sum of ranks) x 1, fp32: each row of `a`'s adapter scaling, which A's gradient is multiplied by."""
    versions: list[int]

    @staticmethod
    def of(a_src: list[torch.Tensor], b_src: list[torch.Tensor], scalings: list[float], dtype: torch.dtype) -> _Stack:
        ranks = tuple(t.shape[0] for t in a_src)
        device = a_src[0].device
        a = torch.empty(sum(ranks), a_src[0].shape[1], dtype=dtype, device=device)
        b = torch.empty(b_src[0].shape[0], sum(ranks), dtype=dtype, device=device)
        # made on the device (fill kernels, no copy from the host): a stack first needed inside a graph's capture
        column = torch.cat([torch.full((r, 1), float(s), device=device) for r, s in zip(ranks, scalings, strict=True)])
        return _Stack(list(a_src), list(b_src), list(scalings), ranks, a, b, a.t(), b.t(), column, [-1])

    def stale(self) -> bool:
        return self.versions != [t._version for t in (*self.a_src, *self.b_src)]


def refresh_stacks(stacks: list[_Stack]) -> int:
    """Recast the stale `stacks` from their adapters' current weights, in a few foreach kernels for all of them;
    returns how many. `lora_search.pack.Pack.step` calls it after its optimizer steps with every layer's last stack
    (`PackedLinear.last_stack`), so the next step's forwards cast nothing; a stack it did not recast (another
    layout's) is recast by the forward that uses it."""
    stale = [s for s in stacks if s is not None and s.stale()]
    if not stale:
        return 0
    a_src = [t for s in stale for t in s.a_src]
    scalings = [c for s in stale for c in s.scalings]
    with torch.no_grad():
        a_dst = [v for s in stale for v in s.a.split(s.ranks)]
        b_dst = [v for s in stale for v in s.b.split(s.ranks, dim=1)]
        torch._foreach_copy_(a_dst, torch._foreach_mul(a_src, scalings))
        torch._foreach_copy_(b_dst, [t for s in stale for t in s.b_src])
    mark_fresh(stale)
    return len(stale)


def mark_fresh(stacks: list[_Stack]) -> None:
    """Record `stacks` as cast from their adapters' current weights (`refresh_stacks` did it, or a replayed graph's
    recast: `lora_search.pack_graphs`)."""
    for s in stacks:
        s.versions = [t._version for t in (*s.a_src, *s.b_src)]


class MaskedLoraLinear(torch.autograd.Function):
    """A frozen linear layer and several adapters' LoRA updates as one autograd node, each row of the batch updated
    by its own adapter only (`PackedLinear._masked`): forward `out = x W^T (+ bias); h = mask * (x a^T);
    out += h b^T` with `a`, `b` a `_Stack`'s (scalings folded into `a`), backward `dh = mask * (g b)`,
    `dx = g W + dh a`, A_i's gradient `s_i (dh^T x)` and B_i's `(g^T h)` in each adapter's rank slice, returned to
    the adapters' own weights (the trailing arguments: every A, then every B). `fused_lora.LoraLinear`'s arithmetic,
    which the solo trial runs, for a pack; tests/test_pack_layers.py holds it to one adapter at a time."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor,
        stack: _Stack,
        dtype: torch.dtype,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        xc, w = _as(x, dtype), _as(weight, dtype)
        out = torch.mm(xc, w.t()) if bias is None else torch.addmm(_as(bias, dtype), xc, w.t())
        h = torch.mm(xc, stack.a_t)
        h.view(mask.shape[0], -1, h.shape[-1]).mul_(mask)
        out.addmm_(h, stack.b_t)
        ctx.save_for_backward(xc, weight, h, mask, stack.a, stack.b, stack.scale_rows)
        ctx.ranks, ctx.x_dtype = stack.ranks, x.dtype
        ctx.dtypes = [p.dtype for p in params]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, weight, h, mask, a, b, scale_rows = ctx.saved_tensors
        k = len(ctx.ranks)
        grad = _as(grad, xc.dtype)
        dh = grad.mm(b)
        dh.view(mask.shape[0], -1, dh.shape[-1]).mul_(mask)
        grad_a = _as(dh.t().mm(xc).mul(scale_rows), ctx.dtypes[0]).split(ctx.ranks)  # fp32 scale rows: fp32
        grad_b = [_as(g, d) for g, d in zip(grad.t().mm(h).split(ctx.ranks, dim=1), ctx.dtypes[k:], strict=True)]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _as(grad.mm(_as(weight, xc.dtype)).addmm_(dh, a), ctx.x_dtype)
        return (dx, None, None, None, None, None, *grad_a, *grad_b)


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
        self.corrections: dict[str, str] = {}
        """Adapter -> the key of its frozen correction in these dicts (`correct`; PiSSA's), for those that have one."""
        self._scaling_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._masks: dict[tuple[Any, ...], torch.Tensor] = {}
        self._stacks: dict[tuple[Any, ...], _Stack] = {}
        self.last_stack: _Stack | None = None
        """The stack the last masked forward used: `refresh_stacks` recasts it after the optimizer step."""

    def add(
        self,
        name: str,
        *,
        r: int,
        scaling: float,
        dropout: float,
        dtype: torch.dtype,
        init: bool | str = True,
        config: LoraConfig | None = None,
    ) -> None:
        """Add adapter `name` of rank `r`. `init`: PEFT's `init_lora_weights` (True: A Kaiming-uniform and B zero, so
        the adapter starts as the base; "gaussian": A normal with std 1/r, B zero; False: both as nn.Linear starts;
        PiSSA's: the base weight's top-r singular vectors, `pissa_weights`, with `config` the adapter's LoraConfig,
        and the correction that keeps the adapter's start the base, `correct`). The random draws follow PEFT's order
        (A's and B's nn.Linear init, then A's reset or PiSSA's randomised SVD), so under the same seed the weights are
        those `get_peft_model` draws for the same modules in the same order."""
        base = self.base_layer
        device = base.weight.device
        pissa = is_pissa(init)
        if pissa and config is None:
            raise ValueError(f"init={init!r} needs the adapter's LoraConfig: add(..., config=)")
        # PiSSA's weights come from PEFT's own layer, which draws the nn.Linear inits itself: none drawn here
        make = nn.utils.skip_init if pissa else lambda cls, *args, **kw: cls(*args, **kw)
        a = make(nn.Linear, base.in_features, r, bias=False, device=device, dtype=dtype)
        b = make(nn.Linear, r, base.out_features, bias=False, device=device, dtype=dtype)
        if pissa:
            a0, b0 = pissa_weights(base, config)
            with torch.no_grad():
                a.weight.copy_(a0)
                b.weight.copy_(b0)
        elif init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1 / r)
            nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        if pissa:
            self.correct(name, a.weight, b.weight)
        self.forget_layouts()

    def correct(self, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Give adapter `name` a frozen correction `-scaling * B0 A0` on its rows: the product of PiSSA's initial A0
        and B0, which PEFT subtracts from the base weight once (W_res = W - s B0 A0, `LoraLayer.pissa_init`) and a
        pack, whose base is shared and stays as loaded, subtracts in every forward. The adapter's rows then see
        W + s(BA - B0A0), the solo trial's W_res + sBA to float rounding: in fp32 exactly its arithmetic's order
        aside; on a bf16 base W_res's own rounding is not there. Computed as one more adapter (`CORRECTION`) of the
        same rank on the same rows, A0 and -B0 copied and frozen: every product path (loop, bmm, masked) takes it as
        it takes adapters, at twice the adapter's low-rank work. It is also PEFT's save conversion, [A; A0] and
        [B | -B0] (`lora_search.pack.Pack.save`)."""
        key = name + CORRECTION
        a = nn.utils.skip_init(nn.Linear, a0.shape[1], a0.shape[0], bias=False, device=a0.device, dtype=a0.dtype)
        b = nn.utils.skip_init(nn.Linear, b0.shape[1], b0.shape[0], bias=False, device=b0.device, dtype=b0.dtype)
        with torch.no_grad():
            a.weight.copy_(a0)
            b.weight.copy_(b0).neg_()
        a.requires_grad_(False)
        b.requires_grad_(False)
        self.lora_A[key], self.lora_B[key] = a, b
        self.lora_dropout[key] = nn.Identity()  # the base's product, which PEFT's W_res is, sees no dropout
        self.scaling[key] = self.scaling[name]
        self.corrections[name] = key
        self.forget_layouts()

    def correction(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adapter `name`'s (A0, B0) of its correction (`correct`), copies; None where it has none."""
        key = self.corrections.get(name)
        if key is None:
            return None
        return self.lora_A[key].weight.detach().clone(), self.lora_B[key].weight.detach().neg()

    def remove(self, name: str) -> None:
        for key in (name, self.corrections.pop(name, None)):
            if key is not None:
                del self.lora_A[key], self.lora_B[key], self.lora_dropout[key], self.scaling[key]
        self.forget_layouts()

    def forget_layouts(self) -> None:
        """Drop the layouts' stacks, masks and scalings (an adapter added or removed; a graph whose capture failed may
        have made some, which no kernel has filled)."""
        self._scaling_cache.clear()
        self._masks.clear()
        self._stacks.clear()
        self.last_stack = None

    @property
    def adapters(self) -> list[str]:
        """The adapters' names (their corrections not among them)."""
        corrections = set(self.corrections.values())
        return [n for n in self.scaling if n not in corrections]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rows.blocks:  # outside a step: the base alone
            return self.base_layer(x)
        blocks = [(n, rows) for n, rows in self.rows.blocks.items() if n in self.scaling]
        if self.corrections:  # a correction (PiSSA's) right after its adapter, on the same rows
            blocks = [(k, rows) for n, rows in blocks for k in (n, self.corrections.get(n)) if k is not None]
        if not blocks:  # no adapter of this step targets this module
            return self.base_layer(x)
        how = products(PRODUCTS, self._shape(blocks, x), device_peak_tflops(x.device))
        if how == "masked":
            return self._masked(x, blocks)
        out = self.base_layer(x)
        # One split of the input: its backward is one concatenation, where a slice per adapter would fill a
        # zero gradient of the whole input each.
        parts = dict(zip(self.rows.blocks, x.split(self.rows.sizes), strict=True))
        mine = [(name, rows, parts[name.removesuffix(CORRECTION)]) for name, rows in blocks]
        if how == "bmm":
            rows_of, deltas = self._bmm(x, mine, out.dtype)
        else:
            rows_of, deltas = [], []
            for name, rows, part in mine:
                a = self.lora_A[name]
                delta = self.lora_B[name](a(self.lora_dropout[name](part.to(a.weight.dtype)))) * self.scaling[name]
                rows_of.append(rows)
                deltas.append(delta.to(out.dtype))
        return _AddIntoRows.apply(out, rows_of, *deltas)

    def _shape(self, blocks: list[tuple[str, slice]], x: torch.Tensor) -> Step:
        names = [n for n, _ in blocks]
        return Step(
            rows=tuple(r.stop - r.start for _, r in blocks),
            ranks=tuple(self.lora_A[n].out_features for n in names),
            dropout=any(not isinstance(self.lora_dropout[n], nn.Identity) for n in names),
            dtypes=len({self.lora_A[n].weight.dtype for n in names}),
            features=(self.base_layer.in_features, self.base_layer.out_features),
            batch=x.shape[0],
            tokens=x.numel() // (x.shape[0] * x.shape[-1]),  # ints, not an aten op on x[0]
        )

    def _masked(self, x: torch.Tensor, blocks: list[tuple[str, slice]]) -> torch.Tensor:
        """The base's output with every adapter's update in it, in two matrix products for all adapters: the
        adapters' A stacked by rank ((sum of ranks) x in), then B side by side (out x (sum of ranks)), and between them
        a mask that keeps, in each row, only its own adapter's rank slice (zeros elsewhere, so other adapters add
        exact zeros). A fixed number of kernels for any number of adapters, ranks and row counts, at the price of
        computing every adapter's product on every row (`products` says when that price is small). As the solo
        trial's fused-lora-add (`fused_lora`): the base product on the tokens as 2-D rows, the second product
        accumulated into it in place (`addmm_`), and base and adapters one autograd node (`MaskedLoraLinear`) whose
        backward adds the adapters' input gradient into the base's the same way. The stacked weights come cast, with
        each adapter's scaling folded into its A rows, from `_Stack` (made once per layout, recast in place after
        each optimizer step by `refresh_stacks`), so a step's forward neither concatenates nor casts a weight."""
        names = tuple(n for n, _ in blocks)
        tokens = x.reshape(-1, x.shape[-1])
        a_dtype = self.lora_A[names[0]].weight.dtype
        if (dtype := one_node_dtype(self.base_layer, tokens, a_dtype)) is not None:
            stack = self._stack(names, dtype)
            mask = self._mask(blocks, x.shape[0], x.device, dtype)  # rows x 1 x ranks, 0 or 1
            params = [self.lora_A[n].weight for n in names] + [self.lora_B[n].weight for n in names]
            base = self.base_layer
            out = MaskedLoraLinear.apply(tokens, base.weight, base.bias, mask, stack, dtype, *params)
            return out.view(*x.shape[:-1], out.shape[-1])
        # autograd's own graph (LORA_ONE_NODE=0, or dtypes that differ outside autocast)
        if len(names) == 1:  # a lone adapter's own weights: a cat of one would copy them, and its gradients back
            a, b = self.lora_A[names[0]].weight, self.lora_B[names[0]].weight
        else:
            a = torch.cat([self.lora_A[n].weight for n in names])
            b = torch.cat([self.lora_B[n].weight for n in names], dim=1)
        mask = self._mask(blocks, x.shape[0], x.device, None)  # rows x ranks, each adapter's scaling
        out = self.base_layer(tokens)
        h = nn.functional.linear(tokens.to(a.dtype), a)
        h = (h.view(x.shape[0], -1, h.shape[-1]) * mask[:, None, :]).view(-1, h.shape[-1])
        out.addmm_(h.to(out.dtype), b.t().to(out.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    def _stack(self, names: tuple[str, ...], dtype: torch.dtype) -> _Stack:
        """The stacked weights of adapters `names` in `dtype`, made for this layout once and kept (the last few
        layouts), recast here only where `refresh_stacks` has not already (an adapter's weights written since)."""
        key = (names, dtype)
        stack = self._stacks.get(key)
        if stack is None:
            if len(self._stacks) >= 8:  # layouts change when a trial sits a step out; keep the recent few
                self._stacks.pop(next(iter(self._stacks)))
            a = [self.lora_A[n].weight for n in names]
            b = [self.lora_B[n].weight for n in names]
            stack = self._stacks[key] = _Stack.of(a, b, [self.scaling[n] for n in names], dtype)
        if stack.stale():
            refresh_stacks([stack])
        self.last_stack = stack
        return stack

    def _mask(
        self, blocks: list[tuple[str, slice]], batch: int, device: torch.device, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Which rank columns each row keeps: with `dtype`, a (rows x 1 x sum of ranks) 0/1 mask in it for
        `MaskedLoraLinear` (the scalings are in the stacked A); with None, (rows x sum of ranks) in fp32 with adapter
        i's scaling on its rows and rank slice, so that the autograd-graph path scales a bf16 product in fp32 and
        rounds once, as the one-at-a-time path's Python float scales it. 0 elsewhere. Made once per layout and kept."""
        key = (tuple((n, r.start, r.stop) for n, r in blocks), batch, device, dtype)
        if key not in self._masks:
            # filled on the device, no copy from the host: a mask first needed inside a graph's capture (its layout's
            # warm-up steps' mask dropped from these few since) is then captured too, where a copy of an unpinned
            # host tensor stops the capture (session 16: every pack host's graphs went off so)
            ranks = [self.lora_A[n].out_features for n, _ in blocks]
            mask = torch.zeros(batch, sum(ranks), device=device, dtype=torch.float32 if dtype is None else dtype)
            col = 0
            for (name, rows), rank in zip(blocks, ranks, strict=True):
                mask[rows, col : col + rank] = 1.0 if dtype is not None else self.scaling[name]
                col += rank
            if len(self._masks) >= 8:  # layouts change when a trial sits a step out; keep the recent few
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask if dtype is None else mask[:, None, :]
        return self._masks[key]

    def _bmm(
        self, x: torch.Tensor, mine: list[tuple[str, slice, torch.Tensor]], dtype: torch.dtype
    ) -> tuple[list[slice], list[torch.Tensor]]:
        """The adapters' products as two batched matrix products (`torch.bmm`) over the adapters, for adapters of
        one rank and one row count (`products`): A and B stacked, the inputs as one (adapters, rows x tokens,
        features) tensor, a view of the layer's input where the adapters' rows are one contiguous run and no dropout
        applies. No FLOP is spent twice; each adapter's dropout draws in the one-at-a-time path's order."""
        names = [name for name, _, _ in mine]
        shape = mine[0][2].shape
        contiguous = all(a[1].stop == b[1].start for a, b in zip(mine, mine[1:], strict=False))
        if contiguous and all(isinstance(self.lora_dropout[n], nn.Identity) for n in names):
            x = x[mine[0][1].start : mine[-1][1].stop]  # a view: no copy forward, one gradient backward
        else:
            x = torch.stack([self.lora_dropout[n](part) for n, _, part in mine])
        a = torch.stack([self.lora_A[n].weight for n in names])  # (adapters, rank, in)
        b = torch.stack([self.lora_B[n].weight for n in names])  # (adapters, out, rank)
        x = x.to(a.dtype).reshape(len(mine), -1, shape[-1])
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        delta = delta * self._scalings(tuple(names), delta.dtype, delta.device)
        delta = delta.to(dtype).reshape(len(mine) * shape[0], *shape[1:-1], -1)
        if contiguous:
            return [slice(mine[0][1].start, mine[-1][1].stop)], [delta]
        return [rows for _, rows, _ in mine], list(delta.split(shape[0]))

    def _scalings(self, names: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The adapters' scalings as an (adapters, 1, 1) tensor in the product's dtype (a Python float keeps a bf16
        product bf16, as this does), made once per set of adapters: not a host-to-device copy in every forward."""
        key = (names, dtype, device)
        if key not in self._scaling_cache:
            # fill kernels, not a copy from the host: capturable (`_mask`)
            values = [torch.full((1,), float(self.scaling[n]), dtype=dtype, device=device) for n in names]
            self._scaling_cache[key] = torch.cat(values).view(-1, 1, 1)
        return self._scaling_cache[key]

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.lora_A[n].out_features} scaling={s:g}" for n, s in self.scaling.items())
