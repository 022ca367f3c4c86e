"""Compiled decoder layers (lora_search/compiled_layers.py): a compiled trial trains the eager trial's loss curve,
its inference forwards stay eager, and the piece says where it does not apply.

Run: python -m pytest -q tests/test_compiled_layers.py   (CPU; Inductor's first compile takes about 20 s here)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_search import compiled_layers
from lora_search.compiled_layers import COMPILED_LAYERS, piece


def test_the_piece_is_on_only_where_asked_and_where_a_compiled_layer_trains() -> None:
    assert piece(True, "ddp", keep_activations=True, quantized=False).active
    off = {
        "BaseModel.compile_layers is off": piece(False, "ddp", True, False),
        "fsdp shards": piece(True, "fsdp", True, False),
        "gradient checkpointing": piece(True, "ddp", False, False),
        "4-bit": piece(True, "ddp", True, True),
    }
    for why, p in off.items():
        assert p.name == COMPILED_LAYERS and not p.active and why in p.why, (why, p.why)


def _model(model_dir: Path, compiled: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a live adapter from the first step
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    if compiled:
        assert compiled_layers.compile_layers(model) == len(compiled_layers.decoder_layers(model)) > 0
        assert compiled_layers.compile_layers(model) == 0  # a kept base's layers are not wrapped twice
    return model


def _curve(model: torch.nn.Module) -> list[float]:
    """6 AdamW steps on right-padded rows of changing lengths (the attention mask on), then an eval forward."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.tensor([5, 9, 14, 22, 31, 40])
    losses = []
    model.train()
    for length in (24, 24, 32, 32, 40, 24):
        ids = tokens[torch.randint(0, 6, (4, length), generator=g)]
        mask = torch.ones_like(ids)
        mask[0, length - 5 :] = 0
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return losses


def test_a_compiled_model_trains_the_eager_curve_and_infers_eagerly(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = _curve(_model(tiny_model_dir, compiled=False))
    calls = []
    compile_fn = torch.compile

    def counted(fn: object, **kwargs: object) -> object:
        inner = compile_fn(fn, **kwargs)

        def call(*args: object, **kw: object) -> object:
            calls.append(torch.is_grad_enabled())
            return inner(*args, **kw)

        return call

    monkeypatch.setattr(torch, "compile", counted)
    model = _model(tiny_model_dir, compiled=True)
    compiled = _curve(model)
    layers = len(compiled_layers.decoder_layers(model))
    assert calls and all(calls) and len(calls) == 6 * layers  # every training forward of every layer, no other
    assert compiled[0] > compiled[-2] + 0.1, f"the run must learn for the comparison to mean anything: {compiled}"
    assert compiled == pytest.approx(eager, rel=1e-5, abs=0)
    # generation with its KV cache (an inference forward per token) runs the eager layers
    before = len(calls)
    out = model.generate(input_ids=torch.tensor([[5, 9, 14]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and len(calls) == before
