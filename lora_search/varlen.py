"""Padding-free attention on torch's own variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`),
registered with transformers as the attention implementation "torch_varlen".

    from lora_search import varlen
    varlen.register()  # then from_pretrained(..., attn_implementation="torch_varlen"), or set_attn_implementation
    varlen.failure(model.config)  # None where it trains here, else why not (tried once a process and head shape)

Why this kernel. A padding-free batch is one row of several sequences end to end, and its attention must keep each
sequence to itself. Flash attention's varlen kernel does that from the sequences' cumulative lengths, at the cost of
the real tokens alone; torch builds it in (2.10 and later, CUDA), so it needs neither the flash-attn package, which a
cluster may lack, nor flex attention's Inductor compile (41 s on the 8B shape, benchmarks/NOTES.md). Transformers has
no attention function for it (its "flash_attention_2" imports flash-attn or fetches a kernel from the Hub), hence this
one: transformers' `AttentionInterface` is the documented way to add one.

The sequences' lengths come from the collator on the CPU (`fastpath.SEQ_LENGTHS`): the trial's trainer turns them into
`cu_seq_lens_q` / `max_length_q` (transformers' `FlashAttentionKwargs`, which the model hands every attention call)
without reading the device. Without them the lengths are found from the position ids, with a device read a layer.

Training only (`fastpath.TRAINING_ONLY_ATTENTION`): forwards of padded rows (the probe, lm-eval scoring) have an
attention mask this function does not read, so a trial's inference forwards run on SDPA.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

log = logging.getLogger("lora_search.varlen")

NAME = "torch_varlen"
"""The attention implementation name lora_search registers with transformers."""

_tried: dict[tuple[Any, ...], str | None] = {}
_repeat_kv = False  # set where the kernel refused fewer key/value heads than query heads (no `enable_gqa`)
_found_logged: list[bool] = []  # the position-id fallback is logged once a process


def available() -> bool:
    """Whether this torch has the varlen kernel's Python API (torch 2.10 and later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Make "torch_varlen" an attention implementation transformers knows (idempotent). Not a mask function: the
    model then builds no attention mask for it (transformers' `_preprocess_mask_arguments` skips kernels it has no
    mask function for), which is right for padding-free rows."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention)


def unsupported(model_config: Any) -> str | None:
    """Why this model's attention is not plain causal attention the kernel computes, or None: a sliding window or
    logit soft-capping (Mistral's window, Gemma 2's caps) need what `varlen_attn` does not take on every torch."""
    window = getattr(model_config, "sliding_window", None)
    if window and getattr(model_config, "use_sliding_window", True):
        return f"a sliding window of {window} tokens"
    if getattr(model_config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None


@functools.cache
def _kernel() -> tuple[Any, frozenset[str]]:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen(q: Any, k: Any, v: Any, cu: Any, longest: int, scale: float | None) -> Any:
    """Causal attention of the packed sequences `cu` marks, (tokens, heads, head dim) in and out, on torch's kernel,
    in bf16 where the inputs are fp32: its keyword arguments differ between torch releases (`is_causal` in some,
    `window_size=(-1, 0)` in others; `enable_gqa` where grouped key/value heads must be asked for)."""
    import torch

    global _repeat_kv
    dtype = q.dtype
    if dtype not in (torch.bfloat16, torch.float16):  # flash computes in half precision (an fp32 base, no autocast)
        return varlen(*(t.to(torch.bfloat16) for t in (q, k, v)), cu, longest, scale).to(dtype)
    kernel, params = _kernel()
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if scale is not None:
        kwargs["scale"] = scale
    grouped = q.shape[1] != k.shape[1]
    if grouped and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif grouped and _repeat_kv:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    try:
        return kernel(q, k, v, cu, cu, longest, longest, **kwargs)
    except (RuntimeError, ValueError):
        if not grouped or _repeat_kv or "enable_gqa" in params:
            raise
        _repeat_kv = True  # this torch checks the heads match: give the kernel every query head its key/value
        log.info("torch's varlen kernel takes equal query and key/value heads here; repeating key/value heads")
        return varlen(q, k, v, cu, longest, scale)


def sequences(position_ids: Any, rows: int, tokens: int, device: Any) -> tuple[Any, int]:
    """(cumulative lengths, longest) of the sequences in `rows` x `tokens`: where `position_ids` restart at 0 (a
    device read), else one sequence a row."""
    import torch

    if position_ids is None:
        cu = torch.arange(0, (rows + 1) * tokens, tokens, dtype=torch.int32, device=device)
        return cu, tokens
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    end = torch.tensor([flat.numel()], dtype=starts.dtype, device=starts.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    return cu, int(cu.diff().max())


def attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Transformers' attention-function contract: query, key, value as (batch, heads, tokens, head dim), returns
    (batch, tokens, heads, head dim) and no weights. The sequences come from `cu_seq_lens_q` and `max_length_q`
    (`FlashAttentionKwargs`), else from the position ids (`sequences`)."""
    import torch

    if attention_mask is not None:
        raise ValueError(f"{NAME} takes padding-free rows, not an attention mask (inference forwards run on SDPA)")
    if dropout:
        raise ValueError(f"{NAME} has no attention dropout (the model asked for {dropout})")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError(f"{NAME} computes plain causal attention: no sliding window or soft-capping")
    rows, heads, tokens, dim = query.shape
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        if not _found_logged:
            _found_logged.append(True)
            log.warning(
                "%s: a batch came without cu_seq_lens_q, so each layer finds its sequences from the position ids "
                "(a device read a layer); lora_search's collator and trainer hand them over (fastpath.SEQ_LENGTHS)",
                NAME,
            )
        cu, longest = sequences(kwargs.get("position_ids"), rows, tokens, query.device)
    q, k, v = (t.transpose(1, 2).reshape(rows * tokens, t.shape[1], dim) for t in (query, key, value))
    out = varlen(q, k, v, cu.to(torch.int32), int(longest), scaling)
    return out.reshape(rows, tokens, heads, dim), None


def cu_lengths(lengths: Any, tokens: int, device: Any) -> dict[str, Any]:
    """`FlashAttentionKwargs` for a packed row of `tokens` holding sequences of `lengths` (CPU ints), the tail past
    their sum (padding, if any) a sequence of its own: cumulative lengths on `device`, copied without a wait on CUDA."""
    import numpy as np
    import torch

    lengths = [int(n) for n in np.asarray(lengths).reshape(-1) if n > 0]
    if tokens > sum(lengths):
        lengths.append(tokens - sum(lengths))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    if torch.device(device).type == "cuda":
        cu = cu.pin_memory().to(device, non_blocking=True)
    else:
        cu = cu.to(device)
    longest = max(lengths) if lengths else tokens
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def head_shape(model_config: Any) -> tuple[Any, ...]:
    """(the current CUDA device's name, query heads, key/value heads, head size): what a kernel's trial is kept by."""
    import torch

    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
    return (torch.cuda.get_device_name(torch.cuda.current_device()), heads, kv_heads, head_dim)


TOLERANCE = 2e-2
"""How far the kernel's bf16 output and input gradients may be from SDPA's in fp32 on each sequence alone, as the
largest difference over the largest value of each tensor. bf16 keeps 8 bits of mantissa (0.4% a value); an absolute
bound failed on the H100 (0.031 on gradients of about 8, 2026-12-07), where the kernel was right."""


def failure(model_config: Any) -> str | None:
    """None if the kernel trains this model's attention here: the forward and backward of three packed sequences at
    the model's query heads, key/value heads and head size, bf16, on the current CUDA device, through `attention`
    itself, matching causal SDPA (fp32) on each sequence alone within `TOLERANCE`. Else why not, one line. Tried once
    a process and shape; no compile."""
    import torch

    if not available():
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch 2.10 and later)"
    if (why := unsupported(model_config)) is not None:
        return why
    key = head_shape(model_config)
    if key in _tried:
        return _tried[key]
    _, heads, kv_heads, head_dim = key
    device = torch.device("cuda", torch.cuda.current_device())
    lengths = [37, 128, 219]
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(1, sum(lengths), n, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
            .transpose(1, 2)
            .requires_grad_(True)
            for n in (heads, kv_heads, kv_heads)
        )
        scale = head_dim**-0.5
        packed = cu_lengths(lengths, sum(lengths), device)
        out, _ = attention(None, q, k, v, None, scaling=scale, **packed)
        grad = torch.randn(out.shape, device=device, dtype=out.dtype, generator=generator)
        got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
        want = _reference(q, k, v, lengths, scale, grad)
        worst = max(
            float((a.float() - b).abs().max()) / max(float(b.abs().max()), 1e-6) for a, b in zip(got, want, strict=True)
        )
        failure_ = None if worst <= TOLERANCE else f"differs from SDPA by {worst:.3g} of its largest value"
        log.info("torch's varlen kernel vs SDPA at %s: %.3g of the largest value (at most %s)", key, worst, TOLERANCE)
    except Exception as e:  # any failure to run means another kernel, with its reason
        failure_ = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    _tried[key] = failure_
    if failure_ is not None:
        log.warning("torch's varlen attention does not train on this device: %s", failure_)
    return failure_


def _reference(q: Any, k: Any, v: Any, lengths: list[int], scale: float, grad: Any) -> list[Any]:
    """SDPA in fp32 on each sequence alone: the output (batch, tokens, heads, dim) and the gradients of q, k, v."""
    import torch
    import torch.nn.functional as F

    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    grad = grad.float()
    parts, start = [], 0
    for n in lengths:
        span = slice(start, start + n)
        qs, ks, vs = (t[:, :, span] for t in leaves)
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True))
        start += n
    out = torch.cat(parts, dim=2).transpose(1, 2)
    return [out, *torch.autograd.grad(out, leaves, grad)]
