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
"""Set to 0 in a trial's environment (Ray's workers inherit the driver's), LoRA layers (solo and a pack's masked
products) compute under autograd's own graph instead of `LoraLinear`: what benchmarks/speed.py's `+two-node` runs
beside the default, to measure the one node side by side. Read when a layer runs."""


def fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """The forward `lora_search.fastpath.fuse_lora_add` binds to a plain LoRA layer; PEFT's own where it does not
    apply (merged, disabled, several active adapters, a variant, a biased B)."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in self.lora_variant
        or self.lora_B[name].bias is not None
    ):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own: merged, mixed, biased, several adapters
    # The base product on the tokens as rows (2-D), so that the update accumulates into it in place: `addmm_` on a
    # view of a 3-D output would make autograd copy the whole output gradient back in backward (CopySlices), and
    # out-of-place `addmm` copies the base output first. Nothing saved for backward holds the base output.
    rows = x.reshape(-1, x.shape[-1])
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
    itself where it has that dtype already). Valid while A and B keep the versions they were cast at: an optimizer step
    or a checkpoint load writes them in place, which bumps a tensor's version. `refresh_casts` recasts every adapter's
    in a few foreach kernels after each optimizer step, so a step's forwards cast nothing."""

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
    for a scaling that is not a plain number (the pack's per-row masks keep `LoraLinear`'s own casts)."""
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

    `scaling`: a number, or for a pack's masked products (`lora_search.pack_layers`) a (rows x rank) tensor that scales
    each row's tokens of the rank-r intermediate, several adapters' A and B stacked into `a` and `b`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float | torch.Tensor,
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


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the call where it would return `t` itself (a dispatch saved per operand per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def _scale_(h: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """`h` (tokens x rank) times `scaling` in place: a number, or a (rows x rank) tensor whose row i scales the i-th
    run of tokens (tokens = rows x tokens a row)."""
    if isinstance(scaling, torch.Tensor):
        h.view(scaling.shape[0], -1, h.shape[-1]).mul_(scaling[:, None, :])
        return h
    return h.mul_(scaling)
