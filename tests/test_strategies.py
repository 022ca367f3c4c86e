"""Strategies (lora_search/strategies.py): validation before compute, trainer arguments, and the adapter gather that
saving a sharded model needs, run for real on 2 CPU processes sharded by torch's FSDP2 (gloo).

Transformers' Trainer runs FSDP and DeepSpeed on CUDA only, so whole FSDP/ZeRO-3 trials are GPU tests
(tests marked `gpu`, and benchmarks/strategies.py on the device); the gather they depend on is tested here."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from lora_search import strategies, variants
from lora_search.config import Budget, ConfigError, Resources, SearchSpace, Sweep
from lora_search.strategies import DEEPSPEED_CONFIGS, STRATEGIES, adapter_param_bound, trainer_kwargs
from lora_search.train import optimizer_name
from lora_search.variants import Adapter, EmptyAdapterError


@pytest.fixture
def base_sweep(tiny_model_dir: Path, tiny_jsonl: Path) -> Sweep:
    from lora_search.config import BaseModel, Dataset

    return Sweep(
        name="strategies",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset(str(tiny_jsonl)),
        space=SearchSpace(variants=("lora",)),
    )


@pytest.mark.parametrize(
    ("resources", "variants_", "field", "says"),
    [
        ({"strategy": "zero3"}, ("lora",), "resources.strategy", "use one of ddp, fsdp"),
        ({"strategy": "fsdp"}, ("lora",), "resources.strategy", "CUDA GPUs only"),
        (
            {"strategy": "ddp", "gpus_per_worker": 1, "strategy_by_variant": {"lora": "deepspeed-zero3"}},
            ("lora",),
            None,
            None,
        ),
        ({"strategy": "fsdp", "gpus_per_worker": 1}, ("pissa",), "space.variants", "cannot train under strategy"),
        ({"strategy": "deepspeed-zero2", "gpus_per_worker": 1}, ("adalora",), "space.variants", "rank allocator"),
        ({"strategy": "ddp", "strategy_by_variant": {"dora": "fsdp"}}, ("dora",), "strategy_by_variant", "CUDA"),
    ],
)
def test_strategy_problems_refused_at_construction(
    base_sweep: Sweep, resources: dict, variants_: tuple[str, ...], field: str | None, says: str | None
) -> None:
    """Bad strategy choices are refused when the Sweep is built, naming the field, the value and the fix."""
    space = SearchSpace(variants=variants_)
    if field is None:
        sweep = base_sweep.replace(space=space, resources=Resources(**resources))
        assert sweep.resources.strategy_for("lora") == "deepspeed-zero3"
        return
    with pytest.raises(ConfigError) as e:
        base_sweep.replace(space=space, resources=Resources(**resources))
    text = str(e.value)
    assert field in text and says in text, text


def test_pissa_allowed_with_an_unsharded_override(base_sweep: Sweep) -> None:
    sweep = base_sweep.replace(
        space=SearchSpace(variants=("lora", "pissa")),
        resources=Resources(gpus_per_worker=1, strategy="fsdp", strategy_by_variant={"pissa": "ddp"}),
    )
    assert [sweep.resources.strategy_for(v) for v in ("lora", "pissa")] == ["fsdp", "ddp"]


def test_unknown_optimizer_refused(base_sweep: Sweep) -> None:
    with pytest.raises(ConfigError, match=r"budget\.optimizer.*adamw_9bit.*paged_adamw_8bit"):
        base_sweep.replace(budget=Budget(optimizer="adamw_9bit"))


def test_bitsandbytes_optimizer_under_fsdp_refused(base_sweep: Sweep) -> None:
    """An explicit 8-bit/paged optimizer with an FSDP variant is refused before compute, naming the variants."""
    with pytest.raises(ConfigError, match=r"budget\.optimizer = 'paged_adamw_8bit'.*DTensor.*lora train under"):
        base_sweep.replace(
            budget=Budget(optimizer="paged_adamw_8bit"),
            resources=Resources(gpus_per_worker=1, strategy="fsdp"),
        )
    base_sweep.replace(  # the same optimizer under DDP is fine
        budget=Budget(optimizer="paged_adamw_8bit"), resources=Resources(gpus_per_worker=1, strategy="ddp")
    )


def test_optimizer_auto() -> None:
    assert optimizer_name("auto", quantized=True, on_gpu=True) == "paged_adamw_8bit"
    assert optimizer_name("auto", quantized=False, on_gpu=True) == "adamw_torch_fused"
    assert optimizer_name("auto", quantized=False, on_gpu=False) == "adamw_torch"
    assert optimizer_name("adamw_8bit", quantized=False, on_gpu=True) == "adamw_8bit"
    # FSDP2's DTensor parameters: bitsandbytes' 8-bit update refuses them, so FSDP-QLoRA gets fused AdamW
    assert optimizer_name("auto", quantized=True, on_gpu=True, fsdp=True) == "adamw_torch_fused"


def test_trainer_kwargs() -> None:
    """fsdp selects FSDP2 with per-layer wrapping and rank-0 loading; DeepSpeed points at the shipped configs."""
    assert trainer_kwargs("ddp") == {}
    fsdp = trainer_kwargs("fsdp")
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["cpu_ram_efficient_loading"] is True
    for name, stage in (("deepspeed-zero2", 2), ("deepspeed-zero3", 3)):
        config = trainer_kwargs(name)["deepspeed"]
        assert config == json.loads((DEEPSPEED_CONFIGS / STRATEGIES[name].deepspeed).read_text())  # the shipped file
        assert config["zero_optimization"]["stage"] == stage
        # "auto" lets the Trainer fill batch sizes, accumulation and precision from the sweep's Budget
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert set(STRATEGIES) == {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"}


def test_zero3_keeps_the_adapter_whole() -> None:
    """Under ZeRO-3 the persistence threshold is raised to the largest adapter tensor, so no adapter tensor is
    partitioned while every weight of the base larger than that still is; ZeRO-2 partitions no parameters anyway."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
    bound = adapter_param_bound(config, 16)
    assert bound == 16 * 5632  # lora_B of gate/up_proj: 5632 x 16
    zero3 = trainer_kwargs("deepspeed-zero3", bound)["deepspeed"]["zero_optimization"]
    assert zero3["stage3_param_persistence_threshold"] == bound
    assert bound < 2048 * 256  # k_proj, the base's smallest linear weight (GQA 32/4): still partitioned
    assert "stage3_param_persistence_threshold" not in trainer_kwargs("deepspeed-zero2", bound)["deepspeed"]
    assert trainer_kwargs("deepspeed-zero3")["deepspeed"]["zero_optimization"]["stage3_param_persistence_threshold"]


def test_deepspeed_configs_ship_in_the_wheel() -> None:
    """The JSON configs are package data: a `pip install` (not only a checkout) has them."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["lora_search"]
    shipped = {p.name for pattern in patterns for p in Path(strategies.__file__).parent.glob(pattern)}
    assert {"zero2.json", "zero3.json"} <= shipped


ADAPTER = Adapter(
    variant="lora",
    rank=4,
    alpha=8.0,
    targets="q_proj+v_proj",
    lr=1e-3,
    dropout=0.0,
    target_modules=("q_proj", "v_proj"),
    total_steps=1,
)


def _tiny_peft() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = variants.attach(LlamaForCausalLM(config), ADAPTER)
    with torch.no_grad():  # as after training: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def _sharded_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _tiny_peft()
        whole = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        live = get_peft_model_state_dict(model)
        assert all(isinstance(v, DTensor) for v in live.values()), "the model is not sharded"

        gathered = strategies.full_adapter_state_dict(model)  # a collective: both ranks call it
        save_dir = Path(out) / f"rank{rank}"
        variants.save(model, ADAPTER, save_dir, state_dict=gathered, sharded=True)  # check_saved runs inside
        assert get_peft_model_state_dict(model, state_dict=gathered).keys() == whole.keys()
        for k, v in get_peft_model_state_dict(model, state_dict=gathered).items():
            torch.testing.assert_close(v, whole[k], rtol=0, atol=0)

        # The known failure, reproduced: saving each rank's local shards writes half-size tensors.
        local = {
            k: v.to_local() if isinstance(v, DTensor) else v for k, v in model.state_dict().items() if "lora_" in k
        }
        try:
            variants.save(model, ADAPTER, Path(out) / f"local{rank}", state_dict=local, sharded=True)
        except EmptyAdapterError as e:
            (Path(out) / f"refused{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_adapter_gather_and_empty_guard(tmp_path: Path) -> None:
    """Under FSDP2 (2 gloo ranks) the gathered adapter saves whole: it equals the unsharded model's and reloads with
    plain PEFT onto an unsharded copy with identical logits. Saving the local shards instead is refused."""
    import torch.multiprocessing as mp
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    mp.spawn(_sharded_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)

    for rank in (0, 1):
        refused = (tmp_path / f"refused{rank}.txt").read_text()
        assert "has shape" in refused and "must be gathered before saving" in refused, refused
    reference = _tiny_peft().eval()
    config = LlamaConfig(
        **{
            k: getattr(reference.config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        }
    )
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), str(tmp_path / "rank0")).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("on_demand", [True, False])
def test_a_trial_that_does_not_use_deepspeed_never_imports_it(tiny_model_dir: Path, on_demand: bool) -> None:
    """In a fresh process (this one may have imported DeepSpeed): a base's `save_pretrained` and Accelerate's unwrap
    (what every trial runs) import DeepSpeed wherever it is installed, unless `deepspeed_when_used` ran first; the
    unwrap still takes a model out of its DistributedDataParallel, and a model of a process that imported DeepSpeed
    is still checked against DeepSpeedEngine."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    script = f"""
import sys, tempfile
import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM
from lora_search.strategies import deepspeed_when_used
if {on_demand}:
    deepspeed_when_used()
model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)
imported = "deepspeed" in sys.modules
wrapped = torch.nn.DataParallel(model)
assert extract_model_from_parallel(wrapped) is model
import deepspeed
from accelerate.utils import other
assert other.is_deepspeed_available()  # once imported, DeepSpeedEngine is among the wrappers again
print("IMPORTED", imported)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"IMPORTED {not on_demand}" in done.stdout, done.stdout[-2000:]
