"""Compiled decoder layers: a trial's training forwards (and their backwards) through one `torch.compile`d function
shared by every decoder layer of the base, the regional compilation PyTorch recommends for transformer stacks.

    BaseModel("meta-llama/Llama-3.1-8B", dtype="bfloat16", compile_layers=True)

Why: on a GPU a trial's step of a large base waits on the host between kernels (benchmarks/NOTES.md: about 76 ms of
a 992 ms step of the 8B shape, with every other fast-path piece on). Inductor fuses each layer's elementwise work
(norms, rotary, activations, residual adds, the LoRA scale and add) into fewer, larger kernels, so there are fewer
launches to wait on. Compiling the layer's code once and calling it for every layer keeps the compile to one layer's
(layers share the code and their parameters are the compiled graph's inputs), not the whole model's.

Where it applies (`piece`): the training forward of a trial that keeps its activations (no gradient checkpointing:
the checkpointed layer reruns its forward inside backward), on one worker or DDP (FSDP and DeepSpeed shard and gather
parameters around each layer), on a base that is not 4-bit (bitsandbytes' layers break the graph). Inference
forwards (evals, the probe, lm-eval scoring, generation with its KV cache, which would specialise the graph per
layer) run the layer as it is. Off by default: the compile costs tens of seconds once per process, and its gain on
the trial path is measured by benchmarks/speed.py (`--attn sdpa,sdpa+compiled`), not assumed.

Its numerics: the compiled layer computes the same function; tests/test_compiled_layers.py holds a compiled trial's
loss curve to the eager one.
"""

from __future__ import annotations

import logging
from typing import Any

from lora_search.fastpath import Piece

log = logging.getLogger("lora_search.compiled_layers")

COMPILED_LAYERS = "compiled-layers"
WHY = "every decoder layer's training forward and backward through one torch.compile'd function"
_MARK = "_lora_search_eager_forward"
"""The attribute a compiled layer keeps its own forward under (for inference, and so that compiling twice is a no-op:
a warm trial's base keeps its layers)."""


def piece(asked: bool, strategy: str, keep_activations: bool, quantized: bool) -> Piece:
    """Whether a trial compiles its decoder layers, with the reason."""
    if not asked:
        return Piece(COMPILED_LAYERS, False, "BaseModel.compile_layers is off (the default)")
    if strategy != "ddp":
        return Piece(COMPILED_LAYERS, False, f"{strategy} shards parameters around each layer")
    if not keep_activations:
        return Piece(COMPILED_LAYERS, False, "gradient checkpointing reruns each layer's forward inside backward")
    if quantized:
        return Piece(COMPILED_LAYERS, False, "a 4-bit base's bitsandbytes layers break the compiled graph")
    return Piece(COMPILED_LAYERS, True, WHY)


def decoder_layers(model: Any) -> list[Any]:
    """The base's decoder layers: transformers' `GradientCheckpointingLayer`s (every decoder layer of its causal LMs
    derives from it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: Any) -> int:
    """Route each decoder layer's training forwards through one compiled function of the layer class's forward; the
    number of layers routed (0 when they already are)."""
    import torch

    layers = [layer for layer in decoder_layers(model) if not hasattr(layer, _MARK)]
    if not layers:
        return 0
    compiled = torch.compile(type(layers[0]).forward)
    for layer in layers:
        eager = layer.forward
        setattr(layer, _MARK, eager)

        def forward(*args: Any, _layer: Any = layer, _eager: Any = eager, **kwargs: Any) -> Any:
            if _layer.training and torch.is_grad_enabled():
                return compiled(_layer, *args, **kwargs)
            return _eager(*args, **kwargs)

        layer.forward = forward
    log.info("%d decoder layers train through one compiled forward (%s)", len(layers), type(layers[0]).__name__)
    return len(layers)
