"""The planner (lora_search/plan.py): architecture, adapter and memory arithmetic checked by hand and against
real PEFT models, concurrency and ASHA arithmetic, and the shipped sweeps' dry runs (no Ray, offline)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lora_search import plan as P
from lora_search.config import BaseModel, Budget, ConfigError, Dataset, Resources, SearchSpace, Sweep
from lora_search.targets import resolve

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "sweeps" / "configs"


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 64, 4 heads of 16 (2 KV heads: k, v are 64 -> 32), MLP 176, 2 layers, vocab 320, untied head."""
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        tie_word_embeddings=False,
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_config_dir: Path) -> P.Architecture:
    return P.read_architecture(BaseModel(str(tiny_config_dir)))


def layers_for(arch: P.Architecture, targets: str) -> list:
    names = set(resolve(targets, list(arch.linears)))
    return [layer for layer in arch.linears if layer.name.rsplit(".", 1)[-1] in names]


@pytest.mark.parametrize(
    ("name", "params", "hidden", "layers"),
    [("llama-3.1-8b", 8.03e9, 4096, 32), ("llama-3.1-70b", 7.06e10, 8192, 80)],
)
def test_shipped_configs_are_llama_3_1(name: str, params: float, hidden: int, layers: int) -> None:
    arch = P.read_architecture(BaseModel("meta-llama/unreachable"), config_dir=CONFIGS / name)
    assert arch.params == pytest.approx(params, rel=0.01)
    assert (arch.hidden, arch.num_layers, arch.vocab, arch.dtype_bytes) == (hidden, layers, 128256, 2)
    assert arch.embedding_params == arch.head_params == 128256 * hidden  # untied


def test_tiny_architecture_by_hand(tiny: P.Architecture) -> None:
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up 64x176 + down 176x64 = 46,080 linear weights
    assert tiny.linear_params == 2 * 46_080
    # embedding 320x64 + head 320x64 + 2 layers x (46,080 + 2 norms x 64) + final norm 64
    assert tiny.params == 2 * 20_480 + 2 * (46_080 + 128) + 64 == 133_440
    assert tiny.block_params == (133_440 - 2 * 20_480) / 2 == 46_240


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora", "vera", "adalora"])
@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_adapter_params_match_peft(
    tiny_config_dir: Path, tiny: P.Architecture, variant: str, rank: int, targets: str
) -> None:
    """The independent check: PEFT's own trainable count on the real (CPU) model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_search.variants import VARIANTS, Adapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_config_dir))
    names = resolve(targets, list(tiny.linears))
    peft_model = get_peft_model(
        model, VARIANTS[variant].peft_config(Adapter(variant, rank, 2.0 * rank, names, 0.0, 1e-4, 100))
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert P.adapter_params(*P.adapter_shape(variant, rank), layers_for(tiny, targets)) == trainable


def test_adapter_params_by_hand(tiny: P.Architecture) -> None:
    layers = layers_for(tiny, "all-linear")
    # r x (in + out) summed per layer: q 128 + k 96 + v 96 + o 128 + gate 240 + up 240 + down 240 = 1,168; 2 layers
    assert P.adapter_params("lora", 8, layers) == 8 * 1_168 * 2 == 18_688
    # DoRA adds each layer's out: 64 + 32 + 32 + 64 + 176 + 176 + 64 = 608 per layer
    assert P.adapter_params("dora", 8, layers) == 18_688 + 2 * 608


def test_memory_arithmetic_by_hand(tiny: P.Architecture) -> None:
    layers = layers_for(tiny, "all-linear")
    common = dict(rank=8, targets_name="all-linear", layers=layers, dtype_bytes=2, batch=2, seq=16)
    row = P.memory_row(tiny, variant="lora", quantized=False, strategy="ddp", world=8, **common)
    assert row.trainable == 18_688
    assert row.weights == 133_440 * 2  # bf16, replicated
    assert row.adapter == 18_688 * (4 + 4)  # fp32 weight + fp32 gradient
    assert row.optimizer == 18_688 * 8  # AdamW exp_avg + exp_avg_sq, fp32, no master copy
    # s*b*h = 16 * 2 * 64 = 2,048: checkpoints 2 x 2,048 x 2 layers + the larger of the logits 12 x 32 x 320 and
    # one block 87 x 2,048
    assert row.activations == 8_192 + max(122_880, 178_176)
    assert row.total == row.weights + row.adapter + row.optimizer + row.activations

    nf4 = P.memory_row(tiny, variant="qlora", quantized=True, strategy="ddp", world=8, **common)
    # 92,160 linear weights x 4.127 bits / 8 + the other 41,280 params upcast to fp32
    assert nf4.weights == pytest.approx(92_160 * (4 + 0.125 + 32 / 16_384) / 8 + 41_280 * 4)
    assert nf4.weights < row.weights

    fsdp = P.memory_row(tiny, variant="lora", quantized=False, strategy="fsdp", world=4, **common)
    assert fsdp.weights == 133_440 * 2 / 4 + 2 * 46_240 * 2  # a quarter, plus the gathered and prefetched block
    assert fsdp.adapter == 18_688 * (4 / 4 + 4 / 4) and fsdp.optimizer == 18_688 * 8 / 4
    zero2 = P.memory_row(tiny, variant="lora", quantized=False, strategy="deepspeed-zero2", world=4, **common)
    assert zero2.weights == row.weights and zero2.adapter == 18_688 * (4 + 4 / 4) and zero2.optimizer == fsdp.optimizer

    dora = P.memory_row(tiny, variant="dora", quantized=False, strategy="ddp", world=8, **common)
    # the worst layer is down_proj (176 -> 64): 6 x 176^2 + 6 x 176 x 64 on top of the block
    assert dora.activations == 8_192 + 178_176 + 6 * 176**2 + 6 * 176 * 64


MEASURED_8B = {("lora", 1): 18.96, ("lora", 4): 29.36, ("lora", 8): 43.22, ("dora", 1): 18.97, ("dora", 4): 29.37}
"""Peak GiB (torch.cuda.max_memory_allocated) of Llama-3.1-8B, random bf16 weights, r=16 on every decoder linear,
(variant, micro-batch) x 2048 tokens, gradient checkpointing (use_reentrant=False), bf16 autocast, fused AdamW, three
steps on one H100 (PyTorch 2.11, transformers 5.17, PEFT 0.21; 2026-11). The logits dominate the activations here.
Time per micro-step at b=4: 1.14 s for LoRA (MFU 0.22 at 4N FLOPs/token), 2.23 s for DoRA (0.11)."""

MEASURED_70B_WIDTH = {"lora": 4.714, "dora": 10.344}
"""The same at b=1 on a 2-layer model of Llama-3.1-70B's widths with a 1024-token vocab: the block and DoRA's
transient dominate."""


@pytest.mark.parametrize(("variant", "batch"), sorted(MEASURED_8B))
def test_estimates_match_measured_8b_peaks(variant: str, batch: int) -> None:
    arch = P.read_architecture(BaseModel("meta-llama/Llama-3.1-8B"), config_dir=CONFIGS / "llama-3.1-8b")
    row = P.memory_row(
        arch,
        variant=variant,
        rank=16,
        targets_name="all-linear",
        layers=list(arch.linears),
        quantized=False,
        dtype_bytes=2,
        batch=batch,
        seq=2048,
        strategy="ddp",
        world=1,
    )
    assert row.trainable == {"lora": 41_943_040, "dora": 43_319_296}[variant]  # PEFT's count there
    assert row.total / 2**30 == pytest.approx(MEASURED_8B[variant, batch], rel=0.03)


@pytest.mark.parametrize("variant", sorted(MEASURED_70B_WIDTH))
def test_estimates_match_measured_70b_width_peaks(tmp_path: Path, variant: str) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(CONFIGS / "llama-3.1-70b")
    config.num_hidden_layers, config.vocab_size, config.bos_token_id, config.eos_token_id = 2, 1024, 0, 1
    config.save_pretrained(tmp_path)
    arch = P.read_architecture(BaseModel(str(tmp_path)))
    row = P.memory_row(
        arch,
        variant=variant,
        rank=16,
        targets_name="all-linear",
        layers=list(arch.linears),
        quantized=False,
        dtype_bytes=2,
        batch=1,
        seq=2048,
        strategy="ddp",
        world=1,
    )
    assert row.total / 2**30 == pytest.approx(MEASURED_70B_WIDTH[variant], rel=0.03)


def test_node_sizes_and_concurrency() -> None:
    assert P.node_sizes(64, None, 8) == (8,) * 8
    assert P.node_sizes(64, 8, 8) == (8,) * 8
    assert P.node_sizes(12, None, 8) == (8, 4)
    assert P.node_sizes(12, 2, 8) == (6, 6)
    with pytest.raises(ConfigError, match="--nodes 8"):
        P.node_sizes(64, 4, 8)

    per_node = (8,) * 8
    assert P.concurrent_trials(Resources(workers=8, gpus_per_worker=1), per_node) == (8, "")  # 64 / 8
    assert P.concurrent_trials(Resources(workers=1, gpus_per_worker=1), per_node)[0] == 64
    fit, note = P.concurrent_trials(Resources(workers=16, gpus_per_worker=1, placement="PACK"), per_node)
    assert fit == 4 and "spans 2 nodes of 8" in note
    assert P.concurrent_trials(Resources(workers=16, gpus_per_worker=1, placement="STRICT_PACK"), per_node)[0] == 0
    # 3-GPU trials: 2 per 8-GPU node leave 2 GPUs on each; PACK builds 5 more trials from those across nodes
    fit, note = P.concurrent_trials(Resources(workers=3, gpus_per_worker=1), per_node)
    assert fit == 64 // 3 == 21 and "5 of the 21 concurrent trials span nodes" in note
    fit, note = P.concurrent_trials(Resources(workers=3, gpus_per_worker=1, placement="STRICT_PACK"), per_node)
    assert fit == 8 * 2 and "16 GPU(s) stay idle" in note
    assert P.concurrent_trials(Resources(workers=4, gpus_per_worker=1, placement="STRICT_SPREAD"), (8, 8))[0] == 0


def test_asha_expected_steps_by_hand() -> None:
    # 8 trials, eta 2, rungs 1 and 2, max 4: 8 run 1 step, 4 run on to 2, 2 run on to 4 = 16 steps = 2 per trial
    assert P.asha_expected_steps((1, 2), 2, 4) == 16 / 8
    assert P.asha_expected_steps((200, 600), 3, 1000) == pytest.approx(200 + 400 / 3 + 400 / 9)
    assert P.asha_expected_steps((50, 100), 2, 100) == 50 + 50 / 2  # a rung at max_steps adds nothing after it
    assert P.asha_expected_steps((), 3, 100) == 100


def tiny_sweep(config_dir: Path, resources: Resources, **budget: int) -> Sweep:
    return Sweep(
        name="plan-test",
        base=BaseModel(str(config_dir), dtype="bfloat16"),
        dataset=Dataset("unused.jsonl", max_length=16),
        space=SearchSpace(ranks=(4, 8), targets=("attention", "all-linear"), variants=("qlora", "lora", "dora")),
        budget=Budget(
            **{
                "max_steps": 100,
                "eval_every": 10,
                "grace_period": 10,
                "reduction_factor": 3,
                "batch_size": 2,
                "grad_accum": 4,
                **budget,
            }
        ),
        resources=resources,
        num_samples=10,
    )


def test_plan_budget_and_cost(tiny_config_dir: Path, tiny: P.Architecture) -> None:
    sweep = tiny_sweep(tiny_config_dir, Resources(workers=2, gpus_per_worker=1))
    p = P.plan(sweep, cluster_gpus=8, gpu="H200", mfu=0.5)
    assert (p.trials, p.gpus_per_trial, p.concurrent, p.rungs) == (10, 2, 4, (10, 30, 90))
    assert p.tokens_per_step == 2 * 4 * 16 * 2
    assert p.flops_per_token == 4 * (133_440 - 20_480)  # the embedding lookup does no matmul
    assert p.step_s == p.tokens_per_step * p.flops_per_token / (0.5 * 989.4e12 * 2)
    assert p.expected_steps == pytest.approx(10 + 20 / 3 + 60 / 9 + 10 / 27)
    assert p.full_gpu_hours == pytest.approx(10 * 100 * p.step_s * 2 / 3600)
    assert p.asha_gpu_hours == pytest.approx(p.full_gpu_hours * p.expected_steps / 100)
    assert p.asha_gpu_hours < p.full_gpu_hours
    assert p.price == 3.50  # Pricing's default H200 price
    assert [(row.variant, row.rank) for row in p.memory] == [(v, r) for v in ("qlora", "lora", "dora") for r in (4, 8)]
    assert {row.targets for row in p.memory} == {"all-linear"}  # the set that needs most memory
    assert P.plan(sweep, cluster_gpus=8, gpu="H200", mfu=0.5) == p  # deterministic
    text = P.format_plan(p)
    assert "4 concurrent trial(s)" in text and "GPU-hours" in text


def test_plan_errors_name_the_fix(tiny_config_dir: Path) -> None:
    sweep = tiny_sweep(tiny_config_dir, Resources(workers=16, gpus_per_worker=1, placement="STRICT_PACK"))
    with pytest.raises(ConfigError, match="no trial fits.*at least 16 GPUs"):
        P.plan(sweep, cluster_gpus=64)
    with pytest.raises(ConfigError, match="known: H100, H200"):
        P.plan(sweep, cluster_gpus=64, gpu="A100")
    cpu = tiny_sweep(tiny_config_dir, Resources(workers=1, cpus_per_worker=1))
    with pytest.raises(ConfigError, match="gpus_per_worker=1"):
        P.plan(cpu, cluster_gpus=8)
    with pytest.raises(ConfigError, match="config_dir"):
        P.read_architecture(BaseModel("lora-search-test/no-such-model"))


def test_fsdp_fits_what_ddp_does_not() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama70b_sweep", ROOT / "sweeps" / "llama70b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = module.SWEEP
    assert sweep.resources.strategy == "fsdp" and sweep.resources.strategy_for("qlora") == "ddp"
    fsdp = P.plan(sweep, cluster_gpus=64, config_dir=module.ARCHITECTURE)
    assert all(row.fits("H100") for row in fsdp.memory)
    ddp_resources = dataclasses.replace(sweep.resources, strategy="ddp", strategy_by_variant={})
    ddp = P.plan(sweep.replace(resources=ddp_resources), cluster_gpus=64, config_dir=module.ARCHITECTURE)
    assert not any(row.fits("H200") for row in ddp.memory if row.variant == "lora")
    assert any("'fsdp' or 'deepspeed-zero3' shards it" in note for note in ddp.notes)
    qlora = [row for row in ddp.memory if row.variant == "qlora"]
    assert qlora and [row.total for row in qlora] == [row.total for row in fsdp.memory if row.variant == "qlora"]
    assert P.shipped_config_dir(ROOT / "sweeps" / "llama70b.py", sweep.base) == CONFIGS / "llama-3.1-70b"


DRY_RUN = """
import runpy, sys
for name in ("llama8b", "llama70b"):
    file = f"sweeps/{name}.py"
    sys.argv = [file, "--dry-run", "--gpus", "64"]
    print(f"=== {name}")
    try:
        runpy.run_path(file, run_name="__main__")
    except SystemExit as e:
        print("EXIT", e.code)
print("RAY IMPORTED", "ray" in sys.modules)
"""


@pytest.fixture(scope="module")
def dry_runs() -> dict[str, str]:
    """`python sweeps/NAME.py --dry-run --gpus 64` for both Llama sweeps, in one subprocess (one torch import)."""
    done = subprocess.run(
        [sys.executable, "-c", DRY_RUN], capture_output=True, text=True, cwd=ROOT, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("RAY IMPORTED False"), done.stdout + done.stderr  # planning never loads Ray
    return dict(part.split("\n", 1) for part in done.stdout.split("=== ")[1:])


@pytest.mark.parametrize("name", ["llama8b", "llama70b"])
def test_sweep_dry_run(dry_runs: dict[str, str], name: str) -> None:
    """The dry run prints the plan offline and exits 0: memory table, GPU-hours and cost."""
    out = dry_runs[name]
    assert "EXIT 0" in out
    assert "64 GPUs on 8 node(s) of 8" in out and "GPU-hours" in out and "cost USD" in out
    weights = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("qlora", "lora") and cells[1] == "64":
            weights[cells[0]] = float(cells[4])
    if name == "llama8b":  # DDP: every GPU holds the whole base, NF4 or bf16
        assert weights["qlora"] < weights["lora"]
    else:  # bf16 base sharded over 8 GPUs by FSDP against a whole NF4 base per GPU (qlora runs DDP)
        assert "strategy fsdp shards the base" in out
        assert weights["lora"] < weights["qlora"]
    full = next(line for line in out.splitlines() if line.strip().startswith("full grid")).split()
    asha = next(line for line in out.splitlines() if line.strip().startswith("ASHA (expected)")).split()
    assert 0 < float(asha[3].replace(",", "")) < float(full[3].replace(",", ""))  # GPU-hours


def test_cli_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from lora_search.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["plan", str(ROOT / "sweeps" / "llama70b.py"), "--gpus", "64", "--nodes", "8"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "8 concurrent trial(s)" in out and "llama-3.1-70b" in out
    with pytest.raises(SystemExit) as exited:
        main(["plan", str(ROOT / "sweeps" / "llama70b.py"), "--gpus", "4"])
    assert exited.value.code == 2
    assert "no trial fits" in capsys.readouterr().err
