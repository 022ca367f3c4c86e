"""Which engines load a saved adapter as it is (lora_search.serving): real adapters of every CPU variant, saved the
way a trial saves them, against the rules table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_search import serving, targets, variants
from lora_search.variants import VARIANTS, Adapter

CPU_VARIANTS = [name for name, v in VARIANTS.items() if not v.quantized]


def _saved(name: str, model_dir: Path, out: Path, rank: int = 4) -> Path:
    """A trained-looking adapter of `name`, saved as a trial saves it (PiSSA converted to plain LoRA)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = Adapter(
        variant=name,
        rank=rank,
        alpha=2.0 * rank,
        targets="all-linear",
        lr=1e-3,
        dropout=0.0,
        total_steps=10,
        target_modules=targets.resolve("all-linear", targets.linear_layers(model)),
    )
    model = variants.attach(model, adapter, out / "init")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # B (and VeRA's lambdas) off zero, as after training
                p.add_(0.01 * torch.randn_like(p))
    variants.save(model, adapter, out / "adapter", out / "init", sharded=False)
    return out / "adapter"


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_every_variant_gets_the_verdict_vllm_would_give(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    found = serving.check(_saved(name, tiny_model_dir, tmp_path))
    if name in ("dora", "vera", "adalora"):
        assert found.servable == ()
        why = {"dora": "DoRA adapters are refused", "vera": "unsupported LoRA weight", "adalora": "unsupported"}
        assert why[name] in found.text and "vllm/lora/" in found.text
    else:
        assert found.servable == ("vllm",), found.text
        saved_rank = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"]
        # PiSSA converted to plain LoRA doubles its rank: r=4 is served with --max-lora-rank 8
        assert saved_rank == (8 if name == "pissa" else 4)
        assert "--max-lora-rank 8" in found.text  # r=4 rounds up to vLLM's 8; PiSSA's r=8 is one
    assert (name in serving.VARIANTS_SAVED_AS_LORA) == bool(found.servable)


def test_each_rule_is_the_reason_given(tmp_path: Path) -> None:
    ok = serving.Adapter(config={"peft_type": "LORA", "r": 16, "lora_alpha": 32}, tensors=("m.lora_A.weight",))
    assert serving.verdict(ok).servable == ("vllm",) and "--max-lora-rank 16" in serving.verdict(ok).text
    cases = {
        "modules_to_save": {"modules_to_save": ["lm_head"]},
        "rank_pattern": {"alpha_pattern": {"q_proj": 8}},
        "largest --max-lora-rank": {"r": 1024},
        "LoRA bias": {"bias": "lora_only"},
        "peft_type LORA only": {"peft_type": "VERA"},
    }
    for says, change in cases.items():
        bad = serving.Adapter(config={**ok.config, **change}, tensors=ok.tensors)
        found = serving.verdict(bad)
        assert found.servable == () and says in found.text, (says, found.text)
    assert serving.max_lora_rank(33) == 64 and serving.max_lora_rank(320) == 320 and serving.max_lora_rank(1) == 1
    broken = serving.check(tmp_path / "missing")
    assert broken.servable == () and "unreadable adapter" in broken.text


def test_a_sweep_served_with_vllm_needs_a_variant_vllm_loads() -> None:
    from lora_search import BaseModel, Dataset, SearchSpace, Sweep
    from lora_search.problems import collecting_problems

    def problems(variants: tuple[str, ...], serve_with: str) -> list[str]:
        with collecting_problems() as found:
            Sweep(name="s", base=BaseModel("b"), dataset=Dataset("d.jsonl"), space=SearchSpace(variants=variants),
                  serve_with=serve_with)  # fmt: skip
        return [f"{p.field}: {p.message}" for p in found]

    assert problems(("dora", "vera", "adalora"), "vllm") == [
        "serve_with: no variant of space.variants (dora, vera, adalora) saves an adapter vllm loads, so the frontier "
        "would be empty"
    ]
    assert problems(("dora", "lora"), "vllm") == [] and problems(("dora",), "any") == []
    assert problems(("lora",), "vLLM") == ["serve_with: must be one of 'any', 'vllm'"]
