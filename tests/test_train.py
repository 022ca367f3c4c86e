"""The worker's entry (lora_search/train.py): loading the base, the warm process's `BaseCache` (lend, take back
without the adapter, give up), the adapter built from a trial's params, and the optimizer choice.

Run: python -m pytest tests/test_train.py   (CPU, seconds; train_loop itself runs in every sweep test)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lora_search import variants
from lora_search.config import BaseModel
from lora_search.records import TrialParams
from lora_search.train import BaseCache, build_adapter, load_base, optimizer_name, trainable_parameters

PARAMS = TrialParams(variant="lora", rank=4, alpha=8.0, targets="attention", lr=1e-3, dropout=0.0)


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    """BaseCache is process-wide: every test starts and ends with nothing kept."""
    BaseCache.take(None)
    yield
    BaseCache.take(None)


def test_load_base_reads_the_dir_without_a_kv_cache(tiny_model_dir: Path) -> None:
    model = load_base(BaseModel(str(tiny_model_dir)), quantized=False)
    assert model.config.use_cache is False
    assert model.dtype == torch.float32  # dtype="auto": as saved
    assert load_base(BaseModel(str(tiny_model_dir), dtype="bfloat16"), quantized=False).dtype == torch.bfloat16


def test_build_adapter_resolves_targets_on_the_model(tiny_model_dir: Path) -> None:
    model = load_base(BaseModel(str(tiny_model_dir)), quantized=False)
    adapter = build_adapter(model, PARAMS, total_steps=30)
    assert set(adapter.target_modules) == {"q_proj", "v_proj"}  # the "attention" preset
    assert (adapter.variant, adapter.rank, adapter.alpha, adapter.targets, adapter.total_steps) == (
        "lora",
        4,
        8.0,
        "attention",
        30,
    )
    peft_model = variants.attach(model, adapter)
    # rank 4 on q and v of 2 layers (hidden 64; v projects to 2 heads x 16 = 32): A is 4 x 64, B is out x 4
    assert trainable_parameters(peft_model) == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) == 1792


def test_base_cache_key_only_for_variants_that_leave_the_base_as_it_was(tiny_model_dir: Path) -> None:
    base = BaseModel(str(tiny_model_dir))
    assert BaseCache.key(base, "lora") == BaseCache.key(base, "dora") is not None
    assert BaseCache.key(base, "pissa") is None  # rewrites the targeted weights
    assert BaseCache.key(base, "qlora") is None and BaseCache.key(base, "loftq") is None  # 4-bit layers
    assert BaseCache.key(dataclasses.replace(base, dtype="bfloat16"), "lora") != BaseCache.key(base, "lora")


def test_base_cache_lends_the_base_back_without_its_adapter(tiny_model_dir: Path) -> None:
    base = BaseModel(str(tiny_model_dir))
    key = BaseCache.key(base, "lora")
    assert key is not None and BaseCache.take(key) is None  # nothing kept yet
    model = load_base(base, quantized=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = variants.attach(model, build_adapter(model, PARAMS, total_steps=10))
    peft_model.train()
    BaseCache.keep(key, peft_model)

    lent = BaseCache.take(key)
    assert lent is not None and not lent.training
    assert not any("lora" in name for name, _ in lent.named_modules())
    assert all(p.requires_grad for p in lent.parameters())
    after = lent.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert BaseCache.take(key) is None  # lent: it is the trial's until it is kept again


def test_base_cache_frees_a_base_another_trial_cannot_use(tiny_model_dir: Path) -> None:
    base = BaseModel(str(tiny_model_dir))
    key = BaseCache.key(base, "lora")
    assert key is not None
    model = load_base(base, quantized=False)
    BaseCache.keep(key, variants.attach(model, build_adapter(model, PARAMS, total_steps=10)))
    assert BaseCache.take(BaseCache.key(dataclasses.replace(base, dtype="bfloat16"), "lora")) is None  # another base
    assert BaseCache.take(key) is None  # and the kept one is gone, not kept beside it


@pytest.mark.parametrize(
    ("asked", "quantized", "on_gpu", "fsdp", "name"),
    [
        ("adamw_torch", True, True, False, "adamw_torch"),  # asked for: taken as is
        ("auto", False, False, False, "adamw_torch"),
        ("auto", True, False, False, "adamw_torch"),
        ("auto", False, True, False, "adamw_torch_fused"),
        ("auto", True, True, False, "paged_adamw_8bit"),
        ("auto", True, True, True, "adamw_torch_fused"),  # bitsandbytes refuses FSDP2's DTensors
    ],
)
def test_optimizer_name(asked: str, quantized: bool, on_gpu: bool, fsdp: bool, name: str) -> None:
    assert optimizer_name(asked, quantized, on_gpu, fsdp=fsdp) == name
