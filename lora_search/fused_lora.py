"""fused-lora-add (`lora_search.fastpath.FUSED_ADD_WHY`): a plain PEFT LoRA layer's forward with its update in the base
product's epilogue, and for layers without dropout the base and the adapter as one autograd node (`LoraLinear`).

Our own code because neither PEFT nor Liger has it: PEFT's `Linear.forward` adds `lora_B(lora_A(x)) * scaling` to
the base output as separate passes, and Liger patches norms, activations and the loss, not LoRA layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_search import environment

ONE_NODE_ENV = environment.LORA_ONE_NODE
LORA_GROUPS = environment.LORA_GROUPS
"""Set to 0 in a trial's environment (Ray's workers inherit the driver's), LoRA layers (solo and a pack's masked
products) compute under autograd's own graph instead of `LoraLinear`: what benchmarks/speed.py's `+two-node` runs
beside the default, to measure the one node side by side. Read when a layer runs."""


def fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """The forward `lora_search.fastpath.fuse_lora_add` binds to a plain LoRA layer; PEFT's own where it does not
    apply (merged, disabled, several active adapters, a variant, a biased B)."""
    name = None if args or kwargs else _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own: merged, mixed, biased, several adapters
    # The base product on the tokens as rows (2-D), so that the update accumulates into it in place: `addmm_` on a
    # view of a 3-D output would make autograd copy the whole output gradient back in backward (CopySlices), and
    # out-of-place `addmm` copies the base output first. Nothing saved for backward holds the base output.
    rows = x.reshape(-1, x.shape[-1])
    group = self.__dict__.get(GROUP)
    if group is not None and (out := group.output(self, x, rows)) is not None:
        return out
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    base = self.base_layer
    one_node = isinstance(self.lora_dropout[name], torch.nn.Identity)
    if one_node and (dtype := one_node_dtype(base, rows, lora_a.weight.dtype)) is not None:
        a, b, scaling = lora_a.weight, lora_b.weight, self.scaling[name]
        casts = adapter_casts(self, name, a, b, dtype, scaling)
        result = LoraLinear.apply(rows, base.weight, base.bias, a, b, scaling, dtype, *casts)
        return result.view(*x.shape[:-1], result.shape[-1])
    result = base(rows)
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(rows, lora_a.weight.dtype))) * self.scaling[name]
    result.addmm_(h.to(result.dtype), lora_b.weight.t().to(result.dtype))
    return result.view(*x.shape[:-1], result.shape[-1])


def _plain_adapter(layer: Any) -> str | None:
    """The name of `layer`'s one active adapter where the fused forward applies to it; None where PEFT's own forward
    must run (adapters disabled or merged, several active, a variant, a biased B)."""
    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    if (
        layer.disable_adapters
        or layer.merged
        or name not in layer.lora_A
        or name in layer.lora_variant
        or layer.lora_B[name].bias is not None
    ):
        return None
    return name


def _one_node(layer: Any, rows: torch.Tensor) -> tuple[str, torch.dtype] | None:
    """(adapter name, products' dtype) where `layer`'s fused forward would run its adapter as one node on `rows`
    (`LoraLinear`), with its cached casts (a plain-number scaling); None where it would not."""
    name = _plain_adapter(layer)
    if (
        name is None
        or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
        or not isinstance(layer.scaling[name], (int, float))
    ):
        return None
    dtype = one_node_dtype(layer.base_layer, rows, layer.lora_A[name].weight.dtype)
    return None if dtype is None else (name, dtype)


def one_node_dtype(base: torch.nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype `LoraLinear` runs `base` and adapter weights of `adapter_dtype` in on input `x`: autocast's where it
    is on (what autocast would run the products in), else the one dtype of input, base and adapter. None where it
    does not apply: `ONE_NODE_ENV` is 0, the base is not a frozen `nn.Linear`, or the dtypes differ outside autocast
    (the layer then computes as autograd's graph would, and raises as it would)."""
    if not environment.value(ONE_NODE_ENV) or type(base) is not torch.nn.Linear:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype if adapter_dtype == x.dtype == base.weight.dtype else None


CASTS = "_lora_search_casts"
"""A fused layer's attribute: adapter name -> `Casts`."""


@dataclass
class Casts:
    """An adapter's weights as its one-node products read them: `a` is `scaling * A` in `dtype` (the scaling folded
    into the A-side product, which saves a multiply on the rank-r intermediate each way), `b` is B in `dtype` (B
    itself where it has that dtype already). Valid while A and B keep the versions they were cast at: a checkpoint load
    writes them in place, which bumps a tensor's version. Torch's fused AdamW (a GPU trial's) writes them without a
    bump, so whatever steps an optimizer over these layers must run `refresh_casts` after each step (a step post-hook:
    `trainer.TrialTrainer` registers it), which also means a step's forwards cast nothing."""

    a_src: torch.Tensor
    b_src: torch.Tensor
    a_version: int
    b_version: int
    dtype: torch.dtype
    scaling: float
    a: torch.Tensor
    b: torch.Tensor

    def valid(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scaling: float) -> bool:
        return (
            self.a_src is a
            and self.b_src is b
            and self.a_version == a._version
            and self.b_version == b._version
            and self.dtype == dtype
            and self.scaling == scaling
        )


def adapter_casts(
    layer: Any, name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scaling: Any
) -> tuple[torch.Tensor, torch.Tensor] | tuple[()]:
    """(`scaling` * A, B) in `dtype` for `layer`'s adapter `name`, cast where the cached ones are stale (`Casts`); ()
    for a scaling that is not a plain number (`LoraLinear` then casts and scales on its own). A pack's layers keep
    their stacked casts in `lora_search.pack_layers._Stack`."""
    if not isinstance(scaling, (int, float)):
        return ()
    cache = layer.__dict__.setdefault(CASTS, {})
    hit = cache.get(name)
    if hit is not None and hit.valid(a, b, dtype, scaling):
        return hit.a, hit.b
    with torch.no_grad():
        entry = Casts(a, b, a._version, b._version, dtype, float(scaling), _as(a * scaling, dtype), _as(b, dtype))
    cache[name] = entry
    return entry.a, entry.b


def refresh_casts(layers: list[Any]) -> int:
    """Recast the cached adapters of `layers` (`Casts`) from their current weights, a few foreach kernels for all of
    them in place of two casts a layer in the next forward; returns how many. Registered on a trial's optimizer as a
    step post-hook (`lora_search.trainer.TrialTrainer`). A cast whose source changed otherwise (a checkpoint load)
    is still caught by its version."""
    entries = [e for layer in layers for e in layer.__dict__.get(CASTS, {}).values()]
    if not entries:
        return 0
    with torch.no_grad():
        scaled = torch._foreach_mul([e.a_src for e in entries], [e.scaling for e in entries])
        torch._foreach_copy_([e.a for e in entries], scaled)
        own_b = [e for e in entries if e.b is not e.b_src]  # B already in the products' dtype is read as it is
        if own_b:
            torch._foreach_copy_([e.b for e in own_b], [e.b_src for e in own_b])
    for e in entries:
        e.a_version, e.b_version = e.a_src._version, e.b_src._version
    return len(entries)


class LoraLinear(torch.autograd.Function):
    """A frozen linear layer and its LoRA update as one autograd node, for the layers without dropout: forward
    `out = x W^T (+ bias); out += (s x A^T) B^T` (the update in the product's epilogue, `addmm_`), backward
    `dx = g W; dx += (s g B) A` the same way. Autograd's own graph of the same forward makes the base's and the
    adapter's input gradients apart and then adds them, one pass over a tokens x in_features tensor per layer:
    632 `add_` kernels in two 8B steps, 70 ms of 1.83 s of GPU time (H200 profile, benchmarks/NOTES.md change 20).
    Every product runs in `dtype` (the autocast dtype, or the input's), as autocast would run it, and the adapter's
    gradients come back in its weights' dtype; `tests/test_fastpath.py` holds outputs and gradients to PEFT's.

    A pack's masked products (several adapters, each on its own rows) are `lora_search.pack_layers.MaskedLoraLinear`,
    the same arithmetic over stacked weights."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
        a_scaled: torch.Tensor | None = None,
        b_cast: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Every operand is cast to `dtype` here, so autocast (whose dtype `dtype` is, where it is on) has nothing left
        # to cast: no autocast context is needed around these products, and none is entered (a few us of host time
        # per layer call, where a small step's host time is what sets its pace).
        xc, w = _as(x, dtype), _as(weight, dtype)
        out = torch.mm(xc, w.t()) if bias is None else torch.addmm(_as(bias, dtype), xc, w.t())
        if a_scaled is not None and b_cast is not None:  # `adapter_casts`: the scaling is in the A side already
            ac, bc = a_scaled, b_cast
            h = torch.mm(xc, ac.t())
        else:
            ac, bc = _as(a, dtype), _as(b, dtype)
            h = _scale_(torch.mm(xc, ac.t()), scaling)
        out.addmm_(h, bc.t())
        ctx.save_for_backward(xc, weight, h, ac, bc)
        ctx.scaling, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scaling, x.dtype, a.dtype, b.dtype
        ctx.folded = a_scaled is not None and b_cast is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, weight, h, ac, bc = ctx.saved_tensors
        grad = _as(grad, xc.dtype)
        if ctx.folded:  # h = x (sA)^T: dA = s dh^T x with dh = g B, scaled as it is cast to A's dtype (one kernel)
            dh = grad.mm(bc)
            grad_a = torch.mul(dh.t().mm(xc), ctx.scaling, out=torch.empty_like(ac, dtype=ctx.a_dtype))
        else:
            dh = _scale_(grad.mm(bc), ctx.scaling)
            grad_a = _as(dh.t().mm(xc), ctx.a_dtype)
        grad_b = _as(grad.t().mm(h), ctx.b_dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _as(grad.mm(_as(weight, xc.dtype)).addmm_(dh, ac), ctx.x_dtype)
        return dx, None, None, grad_a, grad_b, None, None, None, None


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections of one module that read the same input in the decoder layers of the architectures lora_search fuses
(Llama, Mistral, Qwen2/3, Gemma; Phi-3 has its own fused `qkv_proj` and `gate_up_proj`): their adapters run as one
node (`LoraGroup`). Matched by name, as PEFT's target names and vLLM's packed modules are: which modules share an
input cannot be read off the module tree (Llama's `o_proj` has `q_proj`'s width and parent)."""
GROUP = "_lora_search_group"
"""A grouped LoRA layer's attribute: its `Siblings`."""


def group_siblings(model: Any) -> int:
    """Group the fused LoRA layers of `model` that read one input (`SIBLINGS`, two or more under one parent module)
    so that the first of them called computes all of them (`Siblings`); returns how many groups."""
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if m is not None and getattr(m, "forward", None) is not None]
            members = [m for m in members if getattr(m.forward, "__func__", None) is fused_lora_forward]
            if len(members) >= 2:
                group = Siblings(members)
                for m in members:
                    m.__dict__[GROUP] = group
                groups += 1
    return groups


class Siblings:
    """LoRA layers of one module that read the same input (q/k/v, gate/up), computed together: the first called
    (`output`) runs every member's base and adapter products as one autograd node (`LoraGroup`) and keeps the others'
    outputs for their own calls on the same input, which take them. Why: each layer alone is its own autograd node,
    its own A product, its own pass over the input for A's gradient, and the input's gradients of the layers meet in
    autograd's adds over a tokens x hidden tensor (two for q/k/v, one for gate/up, a layer a micro-batch); as a group,
    one A product over the stacked scaled A's, one pass for their gradients, and the input's gradient accumulated in
    the products' epilogues (`addmm_`), with one autograd node and one Python call in place of three (two).

    Falls back to each layer alone, exactly as before, where a member does not take the one-node path
    (`_one_node`), the members differ in adapter or dtype, `environment.LORA_GROUPS` is 0, or a member is called on
    an input the group did not compute (its kept outputs are then dropped)."""

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        self.kept: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None  # (input, member index -> output)
        self.a_cat: torch.Tensor | None = None  # the members' scaled A's stacked; their `Casts.a` are views of it
        self.views: tuple[torch.Tensor, ...] = ()

    def output(self, layer: Any, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        kept, self.kept = self.kept, None
        index = next(i for i, m in enumerate(self.members) if m is layer)
        if kept is not None and kept[0] is x and index in kept[1]:
            out = kept[1].pop(index)
            if kept[1]:
                self.kept = kept
            return out
        if not environment.value(LORA_GROUPS):
            return None
        found = [_one_node(m, rows) for m in self.members]
        if any(f is None or f != found[0] for f in found):
            return None
        name, dtype = found[0]  # type: ignore[misc]
        casts = [
            adapter_casts(m, name, m.lora_A[name].weight, m.lora_B[name].weight, dtype, m.scaling[name])
            for m in self.members
        ]
        a_cat = self._stacked(name, [c[0] for c in casts])
        outs = LoraGroup.apply(
            rows,
            dtype,
            tuple(float(m.scaling[name]) for m in self.members),
            a_cat,
            *(m.base_layer.weight for m in self.members),
            *(m.base_layer.bias for m in self.members),
            *(m.lora_A[name].weight for m in self.members),
            *(m.lora_B[name].weight for m in self.members),
            *(c[1] for c in casts),
        )
        outs = [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]
        self.kept = (x, {i: o for i, o in enumerate(outs) if i != index})
        return outs[index]

    def _stacked(self, name: str, scaled: list[torch.Tensor]) -> torch.Tensor:
        """The members' scaled A's as one (sum of ranks x in_features) tensor whose row blocks are the members' cached
        casts (so `refresh_casts` writes into it); restacked where a member's cast was made anew."""
        if (
            self.a_cat is None
            or len(self.views) != len(scaled)
            or any(v is not a for v, a in zip(self.views, scaled, strict=True))
        ):
            with torch.no_grad():
                self.a_cat = torch.cat(scaled)
            views, start = [], 0
            for m, a in zip(self.members, scaled, strict=True):
                view = self.a_cat[start : start + a.shape[0]]
                m.__dict__[CASTS][name].a = view
                views.append(view)
                start += a.shape[0]
            self.views = tuple(views)
        return self.a_cat


class LoraGroup(torch.autograd.Function):
    """k frozen linear layers that read one input, each with its LoRA update, as one autograd node (`Siblings`):
    forward `out_i = x W_i^T (+ bias_i)`, `h = x [s_1 A_1; ...; s_k A_k]^T` (one product), `out_i += h_i B_i^T`;
    backward `dh_i = g_i B_i`, `[dA_1; ...] = [dh_1 ... dh_k]^T x` (one pass over x), `dB_i = g_i^T h_i`,
    `dx = sum_i g_i W_i + [dh_1 ... dh_k] [s_1 A_1; ...]`, accumulated in the products' epilogues. The same products
    as k `LoraLinear` nodes, in the same dtype; `tests/test_fastpath.py` holds outputs and gradients to PEFT's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, dtype: torch.dtype, scalings: tuple[float, ...], a_cat: torch.Tensor, *tensors: Any
    ) -> tuple[torch.Tensor, ...]:
        k = len(scalings)
        weights, biases, a_src, b_src, b_cast = (tensors[i * k : (i + 1) * k] for i in range(5))
        xc = _as(x, dtype)
        outs = []
        for w, bias in zip(weights, biases, strict=True):
            w = _as(w, dtype)
            outs.append(torch.mm(xc, w.t()) if bias is None else torch.addmm(_as(bias, dtype), xc, w.t()))
        h = torch.mm(xc, a_cat.t())
        ranks = [a.shape[0] for a in a_src]
        for out, h_i, b in zip(outs, h.split(ranks, dim=1), b_cast, strict=True):
            out.addmm_(h_i, b.t())
        ctx.save_for_backward(xc, h, a_cat, *weights, *b_cast)
        ctx.k, ctx.ranks, ctx.scalings, ctx.x_dtype = k, ranks, scalings, x.dtype
        ctx.a_dtypes, ctx.b_dtypes = [a.dtype for a in a_src], [b.dtype for b in b_src]
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Launches counted because the 8B step's backward is where the GPU waited on the host (benchmarks/NOTES.md
        # change 30): dh^T is written block by block into one buffer (no cat) and the A gradients are scaled and
        # cast in one kernel where the members share scaling and dtype: 4k + 3 kernels, down from 5k + 3. B's
        # gradients stay a half-precision product and a cast: cuBLAS's fp32-output products (`torch.mm(...,
        # out_dtype=)`) ran on slower sm80 kernels there, 12.8 against 9.7 ms a micro-batch (H100, 8B r16).
        xc, h, a_cat, *rest = ctx.saved_tensors
        k, ranks = ctx.k, ctx.ranks
        weights, b_cast = rest[:k], rest[k:]
        gs = [_as(g, xc.dtype) for g in grads]
        dh_t = xc.new_empty((a_cat.shape[0], xc.shape[0]))  # [dh_1 ... dh_k]^T, rank rows x tokens
        for g, b, block in zip(gs, b_cast, dh_t.split(ranks), strict=True):
            torch.mm(b.t(), g.t(), out=block)
        d_a = dh_t.mm(xc)
        if len(set(ctx.scalings)) == 1 and len(set(ctx.a_dtypes)) == 1:  # one kernel; each gradient a row block
            scaled = torch.mul(d_a, ctx.scalings[0], out=torch.empty_like(d_a, dtype=ctx.a_dtypes[0]))
            grad_a = list(scaled.split(ranks))
        else:
            grad_a = [
                torch.mul(d_a_i, s, out=torch.empty_like(d_a_i, dtype=a_dtype))
                for d_a_i, s, a_dtype in zip(d_a.split(ranks), ctx.scalings, ctx.a_dtypes, strict=True)
            ]
        grad_b = [
            _as(g.t().mm(h_i), b_dtype) for g, h_i, b_dtype in zip(gs, h.split(ranks, dim=1), ctx.b_dtypes, strict=True)
        ]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = gs[0].mm(_as(weights[0], xc.dtype))
            for g, w in zip(gs[1:], weights[1:], strict=True):
                dx.addmm_(g, _as(w, xc.dtype))
            dx = _as(dx.addmm_(dh_t.t(), a_cat), ctx.x_dtype)
        return (dx, None, None, None, *[None] * (2 * k), *grad_a, *grad_b, *[None] * k)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the call where it would return `t` itself (a dispatch saved per operand per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def _scale_(h: torch.Tensor, scaling: float) -> torch.Tensor:
    """`h` (tokens x rank) times `scaling`, in place."""
    return h.mul_(scaling)
