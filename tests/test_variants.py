"""The variant contract: every row of VARIANTS builds, trains, saves a standard PEFT dir, and reloads exactly."""

from __future__ import annotations

import pytest
import torch

from lora_search import targets, variants
from lora_search.variants import VARIANTS, Adapter

CPU_VARIANTS = [name for name, v in VARIANTS.items() if not v.quantized]
GPU_VARIANTS = [name for name, v in VARIANTS.items() if v.quantized]
STEPS = 8


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["the cat joy runs", "a dog fear eats", "the bird calm sleeps"], return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def _contract(name: str, model_dir, tmp_path, device: str = "cpu", quantized: bool = False) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search.config import BaseModel
    from lora_search.train import load_base

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base(BaseModel(str(model_dir)), quantized)
    adapter = Adapter(
        variant=name,
        rank=4,
        alpha=8.0,
        targets="all-linear",
        lr=5e-3,
        dropout=0.0,
        total_steps=STEPS,
        target_modules=targets.resolve("all-linear", targets.linear_layers(model)),
    )
    model = variants.attach(model, adapter, tmp_path / "init")
    variant = VARIANTS[name]
    optimizer = (
        variant.optimizer(model, adapter)
        if variant.optimizer
        else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=adapter.lr)
    )
    batch = {k: v.to(device) for k, v in _batch(tokenizer).items()}
    losses = []
    model.train()
    for step in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if variant.step_hook is not None:
            variant.step_hook(model, step)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"

    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    out = tmp_path / "adapter"
    size = variants.save(model, adapter, out, tmp_path / "init", sharded=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert size == (out / "adapter_model.safetensors").stat().st_size > 0

    if quantized:
        from peft import prepare_model_for_kbit_training

        # The same set-up as the trial's (norms upcast to float32), so the comparison is exact, not bf16-close.
        fresh = prepare_model_for_kbit_training(
            load_base(BaseModel(str(model_dir)), True), use_gradient_checkpointing=False
        )
    else:
        fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(fresh, str(out)).to(device).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    # PiSSA is reloaded as the converted plain-LoRA adapter on the original base: equal up to float rounding.
    torch.testing.assert_close(logits, trained_logits, atol=2e-4 if variant.converts_on_save else 1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_variant_contract(name: str, tiny_model_dir, tmp_path) -> None:
    _contract(name, tiny_model_dir, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_VARIANTS)
def test_quantized_variant_contract(name: str, tiny_model_dir, tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run with -m gpu on the device machine)")
    _contract(name, tiny_model_dir, tmp_path, device="cuda", quantized=True)


def test_every_variant_is_tested() -> None:
    assert set(CPU_VARIANTS) | set(GPU_VARIANTS) == set(VARIANTS)
    assert {"lora", "rslora", "dora", "pissa", "loraplus", "qlora", "adalora", "loftq", "vera"} <= set(VARIANTS)


def test_saving_a_sharded_looking_adapter_is_refused(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """What an ungathered FSDP/ZeRO-3 save writes (empty or zero tensors) never passes as an adapter."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = Adapter(
        variant="lora",
        rank=4,
        alpha=8.0,
        targets="q_proj+v_proj",
        lr=1e-3,
        dropout=0.0,
        target_modules=("q_proj", "v_proj"),
        total_steps=1,
    )
    model = variants.attach(model, adapter, tmp_path / "init")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert variants.save(model, adapter, tmp_path / "ok", sharded=True) > 0  # a trained adapter passes

    original = type(model).save_pretrained

    def save_like_an_ungathered_shard(self, out_dir, **kwargs):
        original(self, out_dir, **kwargs)
        path = f"{out_dir}/adapter_model.safetensors"
        tensors = load_file(path)
        broken = {k: (v[:0] if "lora_A" in k else torch.zeros_like(v)) for k, v in tensors.items()}
        save_file(broken, path)

    monkeypatch.setattr(type(model), "save_pretrained", save_like_an_ungathered_shard)
    with pytest.raises(variants.EmptyAdapterError, match=r"lora_A.weight is empty .*must be gathered before saving"):
        variants.save(model, adapter, tmp_path / "broken", sharded=True)
