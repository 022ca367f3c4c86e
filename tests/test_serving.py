"""Which engines load a saved adapter as it is (lora_search.serving): real adapters of every CPU variant, saved the
way a trial saves them, against the rules table of vLLM, SGLang and TensorRT-LLM; validate's warning about a space an
engine cannot serve; `export --for ENGINE` and its reload check."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
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


SERVED_BY = {
    "lora": ("vllm", "sglang", "tensorrt-llm"),
    "pissa": ("vllm", "sglang", "tensorrt-llm"),
    "loraplus": ("vllm", "sglang", "tensorrt-llm"),
    "rslora": ("vllm", "tensorrt-llm"),  # SGLang scales by alpha/r whatever use_rslora says
    "dora": (),
    "vera": (),
    "adalora": (),
}
"""The engines that load each CPU variant's saved adapter as it is (serving.RULES)."""


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_every_variant_gets_each_engines_verdict(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real saved adapter of every variant: the engines that load it, the reasons of those that do not, and the
    plan-time sketch of what the variant saves (no PEFT, no model) reaching the same verdict."""
    found = serving.check(_saved(name, tiny_model_dir, tmp_path))
    assert found.servable == SERVED_BY[name], found.text
    why = {
        "dora": ("DoRA adapters are refused", "doesn't support DoRA", "normalised against the base"),
        "vera": ("unsupported LoRA weight", "asserts peft_type", "'unsupported key'"),
        "adalora": ("unsupported LoRA weight", "asserts peft_type", "'unsupported key'"),
        "rslora": ("use_rslora is not read",),
    }
    assert all(w in found.text for w in why.get(name, ())), found.text
    saved_rank = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"]
    if found.servable:  # PiSSA converted to plain LoRA doubles its rank: r=4 is served with --max-lora-rank 8
        assert saved_rank == (8 if name == "pissa" else 4)
    if "vllm" in found.servable:
        assert "vllm: serve with --enable-lora --max-lora-rank 8" in found.text  # vLLM's choices: 4 rounds up to 8
    if "sglang" in found.servable:
        assert f"sglang: serve with --enable-lora --max-lora-rank {saved_rank}" in found.text  # any int
    assert (name in serving.VARIANTS_SAVED_AS_LORA) == bool(found.servable)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert serving.verdict(serving.sketch(name, 4, tuple(saved))).servable == found.servable


LAYER = "base_model.model.model.layers.0.self_attn"


def test_each_rule_is_the_reason_given(tmp_path: Path) -> None:
    """Each rule of each engine, broken alone: the engines that refuse, each with its reason."""
    tensors = tuple(f"{LAYER}.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj") for ab in "AB")
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    ok = serving.Adapter(config=config, tensors=tensors)
    assert serving.verdict(ok).servable == tuple(serving.ENGINES)
    assert "vllm: serve with --enable-lora --max-lora-rank 16" in serving.verdict(ok).text
    cases: list[tuple[dict, tuple[str, ...], dict[str, str]]] = [
        ({"modules_to_save": ["lm_head"]}, (), {"vllm": "must be None", "sglang": "modules_to_save is not read"}),
        (
            {"alpha_pattern": {"q_proj": 8}},
            (),
            {"vllm": "rank_pattern", "sglang": "alpha_pattern are not read", "tensorrt-llm": "alpha_pattern is not"},
        ),
        ({"r": 1024}, (), {"vllm": "largest --max-lora-rank"}),
        ({"bias": "lora_only"}, (), {"vllm": "LoRA bias"}),
        ({"peft_type": "VERA"}, (), {"vllm": "peft_type LORA only", "sglang": "asserts peft_type"}),
        ({"use_rslora": True}, (), {"sglang": "use_rslora is not read"}),
        ({"use_dora": True}, (), {"vllm": "DoRA", "sglang": "DoRA", "tensorrt-llm": "--dora_plugin=enable"}),
        ({"target_modules": ["k_proj"]}, (), {"sglang": "q_proj needs v_proj"}),
        ({"target_modules": ["up_proj"]}, (), {"sglang": "up_proj needs gate_proj"}),
        ({"target_modules": ["c_attn"]}, (), {"sglang": "buffers do not know"}),
        ({"target_modules": "attention"}, (), {"sglang": "as a string"}),
        (
            {},
            (f"{LAYER}.q_proj.lora_B.bias",),
            {"vllm": "unsupported LoRA weight", "sglang": "lora_B buffer", "tensorrt-llm": "'unsupported key'"},
        ),
        ({}, (f"{LAYER}.c_attn.lora_A.weight",), {"tensorrt-llm": "not in supported list"}),
        ({}, ("base_model.model.lm_head.lora_A.weight",), {"tensorrt-llm": "skipped"}),
    ]
    for change, extra, refused in cases:
        found = serving.verdict(serving.Adapter(config={**config, **change}, tensors=tensors + extra))
        assert found.servable == tuple(e for e in serving.ENGINES if e not in refused), (change, extra, found.text)
        for engine, says in refused.items():
            assert any(n.startswith(f"{engine}: ") and says in n for n in found.notes), (engine, says, found.text)
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
    assert problems(("rslora", "dora"), "sglang") == [
        "serve_with: no variant of space.variants (rslora, dora) saves an adapter sglang loads, so the frontier would "
        "be empty"
    ]
    assert problems(("rslora",), "vllm") == problems(("rslora",), "tensorrt-llm") == []
    assert problems(("lora",), "vLLM") == ["serve_with: must be one of 'any', 'vllm', 'sglang', 'tensorrt-llm'"]


def test_validate_warns_of_the_space_an_engine_cannot_serve(tiny_model_dir: Path) -> None:
    """`lora-search validate`'s warning (serving.space_warning): the variants, ranks and target sets whose every
    adapter the engine refuses, and whether that is the whole space; none for 'any' or a space it serves."""
    from lora_search import BaseModel, Dataset, SearchSpace, Sweep
    from lora_search.preflight import model_layers

    def warning(serve_with: str, **space: object) -> str | None:
        sweep = Sweep(name="s", base=BaseModel(str(tiny_model_dir)), dataset=Dataset("d.jsonl"),
                      space=SearchSpace(**space), serve_with=serve_with)  # type: ignore[arg-type]  # fmt: skip
        return serving.space_warning(sweep, model_layers)

    part = warning("vllm", variants=("lora", "dora"), ranks=(8, 1024))
    assert part and "part of this space" in part
    assert "variants dora: " in part and "DoRA adapters are refused" in part
    assert "ranks 1024: rank above the largest --max-lora-rank (512)" in part and "variants lora" not in part
    # PiSSA saves twice its rank: r=320 is 640 on disk, above vLLM's 512; a space of only that serves nothing
    whole = warning("vllm", variants=("pissa",), ranks=(320,))
    assert whole and "every adapter this space can produce" in whole and "variants pissa: rank above" in whole
    only_k = warning("sglang", variants=("lora",), targets=(("k_proj",), ("k_proj", "o_proj")))
    assert only_k and "every adapter" in only_k and "targets k_proj: " in only_k and "q_proj needs v_proj" in only_k
    assert warning("sglang", variants=("lora", "pissa"), targets=("all-linear", "attention")) is None
    assert warning("any", variants=("dora",)) is None
    assert warning("tensorrt-llm", variants=("lora", "rslora"), ranks=(8, 1024)) is None


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
        assert row.servable == ("" if row.variant == "dora" else "vllm,sglang,tensorrt-llm"), row.serving_notes
        assert row.serving_notes
        tags = client.get_run(row.mlflow_run_id).data.tags
        assert tags["lora_search.servable"] == (row.servable or "none")
        assert tags["lora_search.serving_notes"] == row.serving_notes


@pytest.fixture(scope="module")
def probed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> a saved adapter of that variant with the probe a trial saves beside it (its own logits on one prompt),
    made once a module; a test that changes one works on a copy."""
    from transformers import AutoTokenizer

    from lora_search.config import BaseModel
    from lora_search.layout import PROBE_FILE
    from lora_search.probe import save_probe
    from lora_search.registry import load_adapter

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            adapter = _saved(name, tiny_model_dir, tmp_path_factory.mktemp(f"probed_{name}"))
            tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
            probe = [tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]]
            model = load_adapter(BaseModel(str(tiny_model_dir)), adapter, check=False)
            save_probe(model, probe, adapter / PROBE_FILE)
            made[name] = adapter
        return made[name]

    return get


def _export(adapter: Path, out: Path, engine: str, *flags: str) -> int:
    from lora_search.cli import main

    with pytest.raises(SystemExit) as done:
        main(["export", str(adapter), "--for", engine, "--output", str(out), "--no-check", *flags])
    return int(done.value.code or 0)


@pytest.mark.parametrize(
    ("engine", "name"),
    [("vllm", "lora"), ("vllm", "pissa"), ("vllm", "dora"), ("sglang", "lora"), ("sglang", "rslora")],
)
def test_export_for_an_engine_writes_what_it_loads_and_checks_it(
    engine: str, name: str, probed: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lora-search export DIR --for ENGINE`: an adapter the engine loads (PiSSA converted) is copied; one it refuses
    is merged (DoRA for vLLM; rsLoRA for SGLang, which would serve it at the wrong scale) and says why (VeRA and AdaLoRA
    take the same path: their verdicts are tested above). Either is reloaded as the engine reads it and compared with
    the trial's probe logits, within 2% of their scale."""
    from transformers import AutoModelForCausalLM

    from lora_search.registry import EXPORT_FILE

    out = tmp_path / "exported"
    assert _export(probed(name), out, engine) == 0
    how = json.loads((out / EXPORT_FILE).read_text())["serving"]
    printed = capsys.readouterr().out
    assert how["command"] in printed and "reloaded as" in printed
    assert how["reload_max_abs_logit_diff"] < 1e-4 < how["drift_bound"] == 0.02 * how["logit_scale"]
    if name in ("lora", "pissa"):
        assert how["written"] == "adapter" and (out / "adapter_model.safetensors").is_file()
        assert how["max_lora_rank"] == (8 if engine == "vllm" or name == "pissa" else 4)
        assert f"--enable-lora --max-lora-rank {how['max_lora_rank']}" in how["command"]
        assert how["command"].startswith("vllm serve" if engine == "vllm" else "python -m sglang.launch_server")
    else:
        assert how["written"] == "merged model" and how["why"].startswith(f"{engine}: ")
        assert all(f"{other}: " not in how["why"] for other in serving.ENGINES if other != engine)
        assert not (out / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model dir, as the engine reads it
        assert merged.config.model_type == "llama"


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_export_refuses_a_reload_that_drifts_unless_allowed(
    name: str, probed: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A probe the reloaded adapter (lora) or merged model (dora) misses by 5% of the logits' scale: the export
    fails naming the difference, the bound and the fixes, and keeps nothing; with --allow-drift it is kept and
    recorded (a merged model alike; one run of it suffices)."""
    from safetensors.torch import load_file, save_file

    from lora_search.layout import PROBE_FILE
    from lora_search.registry import EXPORT_FILE

    adapter = Path(shutil.copytree(probed(name), tmp_path / "adapter"))
    probe = load_file(str(adapter / PROBE_FILE))
    scale = float(probe["logits"].abs().max())
    probe["logits"][0, 0] += 0.05 * scale  # as if the trial had computed something else than the reload does
    save_file(probe, str(adapter / PROBE_FILE))
    out = tmp_path / "exported"
    assert _export(adapter, out, "vllm") == 2
    said = capsys.readouterr().err
    assert "export drifted" in said and "above the bound" in said and "2% of the logits' scale" in said
    assert "--allow-drift" in said and ("--dtype float32" in said if name == "dora" else "--base" in said)
    assert not out.exists()
    if name == "dora":
        return  # --allow-drift keeps either kind alike
    assert _export(adapter, out, "vllm", "--allow-drift") == 0
    how = json.loads((out / EXPORT_FILE).read_text())["serving"]
    assert how["drift_allowed"] and how["reload_max_abs_logit_diff"] > how["drift_bound"]
    assert "kept by --allow-drift" in capsys.readouterr().out


def test_export_for_an_engine_merges_a_4bit_trained_adapter_and_says_why(
    probed: Callable[[str], Path], tmp_path: Path
) -> None:
    """A qlora adapter is plain LoRA tensors that vLLM would load, but on bf16 weights it trained without (measured:
    0.08-0.12 exact match lower, benchmarks/qlora_drift_h200_2026-12-04.json): `--for vllm` writes the merged model
    and says why. On this CPU the merge goes into the original weights (NF4 needs CUDA), and the record says so; the
    bound stays 2% (the NF4 merge's 10% is for the dequantised base only)."""
    from lora_search.config import BaseModel
    from lora_search.registry import EXPORT_FILE, base_meta, write_meta

    adapter = Path(shutil.copytree(probed("lora"), tmp_path / "adapter"))
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    write_meta(adapter, base_meta(BaseModel(base), "not checked") | {"variant": "qlora"})  # as a qlora trial saves it
    out = tmp_path / "exported"
    assert _export(adapter, out, "vllm") == 0
    record = json.loads((out / EXPORT_FILE).read_text())
    how = record["serving"]
    assert how["written"] == "merged model" and not (out / "adapter_config.json").exists()
    assert how["why"].startswith("vllm: qlora trained against NF4 weights") and "qlora_drift" in how["why"]
    assert record["merged_into"].startswith("the original base weights: NF4 needs CUDA")
    assert how["drift_bound"] == pytest.approx(0.02 * how["logit_scale"])
