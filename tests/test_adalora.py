"""AdaLoRA's contract: a module its allocator prunes to rank 0 saves, and plain PEFT reloads it at the trained ranks
with the trained logits; the empty-adapter guard still refuses what is really empty, blaming sharding only when the
trial was sharded. Run: pytest -q tests/test_adalora.py (a few seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_search import targets, variants
from lora_search.variants import Adapter

STEPS = 40
"""The trial's total_step. `variants._adalora` makes it tinit 4, tfinal 12, deltaT 2: masks at steps 6, 8, ..., 26,
the final allocation at step 28, then 11 steps at the final ranks."""
MID = 16
"""Steps before the mid-training save: the last mask was at step 14, and step 15 trained the masked triplets again."""


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["the cat joy runs", "a dog fear eats", "the bird calm sleeps"], return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def _attach(model_dir: Path, variant: str, rank: int = 1):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = Adapter(
        variant=variant,
        rank=rank,  # AdaLoRA: init_r 2, target_r 1, so the allocator cuts half of all triplets
        alpha=2.0,
        targets="all-linear",
        lr=1e-2,
        dropout=0.0,
        total_steps=STEPS,
        target_modules=targets.resolve("all-linear", targets.linear_layers(model)),
    )
    return variants.attach(model, adapter), adapter


def _ranks(model: torch.nn.Module) -> dict[str, int]:
    """Module name (as in the base model) -> the rank its AdaLoRA layer computes with."""
    return {
        name.removeprefix("base_model.model."): int(module.lora_E["default"].shape[0])
        for name, module in model.named_modules()
        if hasattr(module, "lora_E") and "default" in module.lora_E
    }


def _allocated(config) -> dict[str, int]:
    """The allocator's ranks, by module name (its rank_pattern keys are the modules' lora_E parameters)."""
    return {key.split(".lora_E")[0]: sum(mask) for key, mask in config.rank_pattern.items()}


def _save_and_reload(model, adapter, out: Path, model_dir: Path, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    variants.save(model, adapter, out, sharded=False)
    model.train()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return trained, logits, _ranks(reloaded)


def test_adalora_pruned_to_rank_0_saves_and_reloads_exactly(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    model, adapter = _attach(tiny_model_dir, "adalora")
    config = model.peft_config["default"]
    batch = _batch(AutoTokenizer.from_pretrained(tiny_model_dir))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=adapter.lr)
    step_hook = variants.VARIANTS["adalora"].step_hook
    assert step_hook is not None
    for step in range(STEPS):
        if step == MID:
            # Mid-allocation: the checkpoint is the adapter whose eval loss the trial reports, not its last mask.
            allocated = config.rank_pattern
            live = {n: int(torch.count_nonzero(p)) for n, p in model.named_parameters() if ".lora_E." in n}
            assert sum(live.values()) > sum(map(sum, allocated.values())), "no masked triplet trained again"
            trained, logits, ranks = _save_and_reload(model, adapter, tmp_path / "mid", tiny_model_dir, batch)
            torch.testing.assert_close(logits, trained, atol=1e-6, rtol=0)
            assert ranks == {n.removeprefix("base_model.model.").split(".lora_E")[0]: r for n, r in live.items()}
            assert config.rank_pattern is allocated, "saving changed the allocator's state"
        model(**batch).loss.backward()
        optimizer.step()
        step_hook(model, step)
        optimizer.zero_grad()

    allocated = _allocated(config)
    pruned = sorted(name for name, rank in allocated.items() if rank == 0)
    assert pruned, f"no module was pruned to rank 0: {allocated}"
    assert any(allocated.values()), allocated

    out = tmp_path / "final"
    trained, logits, ranks = _save_and_reload(model, adapter, out, tiny_model_dir, batch)
    assert ranks == allocated  # PEFT's "rank_pattern keys did not match" warning on reload notwithstanding
    saved = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert {key.split(".lora_E")[0]: sum(mask) for key, mask in saved.items()} == allocated
    torch.testing.assert_close(logits, trained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "sharded"])
def test_an_untrained_adapter_is_refused_blaming_sharding_only_when_sharded(
    sharded: bool, tiny_model_dir, tmp_path
) -> None:
    """LoRA's untrained B is all zeros; untrained AdaLoRA's singular values are, which leaves every module rank 0."""
    lora, lora_adapter = _attach(tiny_model_dir, "lora", rank=4)
    with pytest.raises(variants.EmptyAdapterError, match=r"lora_B.weight is all zeros") as lora_refusal:
        variants.save(lora, lora_adapter, tmp_path / "lora", sharded=sharded)
    adalora, adalora_adapter = _attach(tiny_model_dir, "adalora")
    with pytest.raises(variants.EmptyAdapterError, match=r"all \d+ of its tensors are empty") as adalora_refusal:
        variants.save(adalora, adalora_adapter, tmp_path / "adalora", sharded=sharded)
    for refusal in (lora_refusal, adalora_refusal):
        message = str(refusal.value)
        assert ("FSDP" in message and "gathered" in message) == sharded, message
        assert ("not sharded" in message) == (not sharded), message


def test_an_empty_module_that_has_rank_is_refused(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """An empty tensor passes only where the model's own is empty (a pruned module); elsewhere it is refused."""
    from safetensors.torch import load_file, save_file

    model, adapter = _attach(tiny_model_dir, "adalora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_E." in name:
                p.normal_()
    original = type(model).save_pretrained

    def save_one_module_empty(self, out_dir, **kwargs):
        original(self, out_dir, **kwargs)
        path = f"{out_dir}/adapter_model.safetensors"
        tensors = load_file(path)
        tensors = {k: v[:0] if "layers.0.self_attn.q_proj.lora_A" in k else v for k, v in tensors.items()}
        save_file(tensors, path)

    monkeypatch.setattr(type(model), "save_pretrained", save_one_module_empty)
    with pytest.raises(variants.EmptyAdapterError, match=r"q_proj.lora_A is empty \(0, 64\), the model's is \(2, 64\)"):
        variants.save(model, adapter, tmp_path / "broken", sharded=False)
