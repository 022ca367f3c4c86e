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


def _record(trial_id: str, variant: str, objective: float, adapter_bytes: int, servable: str):
    from lora_search.results import TrialRecord

    return TrialRecord(
        variant=variant, rank=4, alpha=8.0, targets="all-linear", lr=1e-3, dropout=0.0, trial_id=trial_id,
        status="completed", step=10, eval_loss=0.5, best_eval_loss=0.5, base_eval_loss=1.0, train_loss=0.5,
        trainable_params=100, adapter_bytes=adapter_bytes, train_s=1.0, device_s=1.0, trial_s=1.0, tokens_per_s=1.0,
        peak_mem_bytes=1, adapter_path=f"/a/{trial_id}", reason="", objective=objective, cost=0.01,
        servable=servable, serving_notes="checked",
    )  # fmt: skip


def test_serve_with_keeps_the_frontier_to_what_the_engine_loads(tiny_model_dir: Path) -> None:
    """A DoRA adapter that dominates every LoRA one is the frontier for 'any', and off it for 'vllm'."""
    from lora_search import BaseModel, Dataset, Sweep
    from lora_search.sweep import _frontier

    records = [
        _record("dora", "dora", 0.9, 1000, ""),
        _record("small", "lora", 0.6, 2000, "vllm"),
        _record("big", "lora", 0.8, 4000, "vllm"),
    ]
    base = {"objective": 0.1, "higher_is_better": True}
    sweep = Sweep(name="s", base=BaseModel(str(tiny_model_dir)), dataset=Dataset("d.jsonl"))

    def front(serve_with: str) -> set[str]:
        marked, _, _ = _frontier(sweep.replace(serve_with=serve_with), records, base, 10**6)
        return {r.trial_id for r in marked if r.pareto}

    assert front("any") == {"dora"}
    served = front("vllm")
    assert served and served <= {"small", "big"}


def test_a_real_sweep_records_what_serves_its_adapters(shared_sweep) -> None:
    """The shared sweep (lora and dora): each adapter's servable and notes in trials.parquet and its MLflow run."""
    from mlflow import MlflowClient

    sweep, trials, _ = shared_sweep
    saved = trials[trials["adapter_path"] != ""]
    assert len(saved)
    client = MlflowClient(sweep.tracking_uri)
    for row in saved.itertuples():
        assert row.servable == ("" if row.variant == "dora" else "vllm"), row.serving_notes
        assert row.serving_notes
        tags = client.get_run(row.mlflow_run_id).data.tags
        assert tags["lora_search.servable"] == (row.servable or "none")
        assert tags["lora_search.serving_notes"] == row.serving_notes


@pytest.mark.parametrize("name", ["lora", "pissa", "dora"])
def test_export_for_vllm_writes_what_vllm_loads_and_checks_it(
    name: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lora-search export DIR --for vllm`: a LoRA (PiSSA converted) adapter is copied, reloaded with plain PEFT and
    compared with the trial's probe logits; a DoRA one is merged (the merge check) and says why (VeRA and AdaLoRA take
    the same path: their verdicts are tested above)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search.cli import main
    from lora_search.config import BaseModel
    from lora_search.layout import PROBE_FILE
    from lora_search.probe import save_probe
    from lora_search.registry import EXPORT_FILE, load_adapter

    adapter = _saved(name, tiny_model_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    probe = [tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]]
    save_probe(load_adapter(BaseModel(str(tiny_model_dir)), adapter, check=False), probe, adapter / PROBE_FILE)
    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as done:
        main(["export", str(adapter), "--for", "vllm", "--output", str(out), "--no-check"])
    assert done.value.code == 0
    how = json.loads((out / EXPORT_FILE).read_text())["serving"]
    printed = capsys.readouterr().out
    assert how["command"] in printed
    if name in ("lora", "pissa"):
        assert how["written"] == "adapter" and (out / "adapter_model.safetensors").is_file()
        assert how["max_lora_rank"] == 8 and "--enable-lora --max-lora-rank 8" in how["command"]
        assert how["reload_max_abs_logit_diff"] < 1e-4
    else:
        assert how["written"] == "merged model" and "vllm" in how["why"]
        assert not (out / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model dir, as vLLM reads it
        assert merged.config.model_type == "llama"
