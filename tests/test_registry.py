"""Adapter provenance and export: base fingerprints, refusing the wrong base, merges checked against the adapter.

Run: python -m pytest tests/test_registry.py

Adapters are built directly with PEFT on the tiny random Llama (conftest) with nonzero lora_B, so an adapter
moves the logits and a wrong merge scale shows. No network, no Ray; MLflow runs on a sqlite file in tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lora_search import registry
from lora_search.cli import main
from lora_search.config import BaseModel, ConfigError
from lora_search.probe import PROBE_FILE
from lora_search.registry import BaseMismatchError, MergeCheckError

PROMPTS = ("the cat joy runs big", "a dog fear eats the small red bird")
ATOL = RTOL = registry.MERGE_TOLERANCE["float32"]
LORA_CONFIGS = {  # alpha != r everywhere, so a scale of alpha/r vs alpha/sqrt(r) vs 1 differs
    "lora": {"r": 4, "lora_alpha": 12},
    "rslora": {"r": 4, "lora_alpha": 12, "use_rslora": True},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
}


@pytest.fixture(scope="module", autouse=True)
def fingerprint_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Fingerprint digests go to a tmp cache, never ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_SEARCH_CACHE", str(path))
        yield path


def make_adapter(base_dir: Path, out: Path, seed: int = 0, probe: bool = False, **lora: object) -> Path:
    """A PEFT adapter on `base_dir` with random nonzero lora_B (as if trained), plus its lora_search meta and,
    with `probe`, the probe file a trial saves (the merge check then runs on its prompts)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search.probe import save_probe

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **lora))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.save_pretrained(str(out))
    if probe:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        save_probe(peft_model, [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS], out / PROBE_FILE)
    registry.write_meta(out, registry.base_meta(BaseModel(str(base_dir))) | {"trial_id": out.name, **lora})
    return out


def logits(model: torch.nn.Module, base_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS])


def adapter_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """Base + adapter with plain PEFT, independent of lora_search."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)), base_dir)


def plain_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(model_dir), model_dir)


@pytest.fixture(scope="module")
def other_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture and tokenizer as tiny_model_dir, different random weights (seed 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other") / "base"
    shutil.copytree(tiny_model_dir, out)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "trial_lora"
    return make_adapter(tiny_model_dir, out, probe=True, **LORA_CONFIGS["lora"])


# --- fingerprint -----------------------------------------------------------------------------------------------


def test_fingerprint_is_the_documented_digest(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = BaseModel(str(tiny_model_dir))
    files = {name: hashlib.sha256((tiny_model_dir / name).read_bytes()).hexdigest() for name in ("config.json",)}
    files |= {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_model_dir.glob("*.safetensors")}
    assert set(files) == {"config.json", "model.safetensors"}
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    expected = "sha256:" + hashlib.sha256(canonical).hexdigest()

    assert registry.fingerprint(base) == registry.fingerprint(base) == expected
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")  # where the bytes live does not matter
    (copy / "tokenizer.json").unlink()  # nor do the tokenizer files
    assert registry.fingerprint(BaseModel(str(copy))) == expected


def test_fingerprint_changes_with_one_weight(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    def resaved(name: str, perturb: bool) -> str:
        out = shutil.copytree(tiny_model_dir, tmp_path / name)
        tensors = load_file(str(out / "model.safetensors"))
        if perturb:
            tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] += 1e-3
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return registry.fingerprint(BaseModel(str(out)))

    same, changed = resaved("same", perturb=False), resaved("changed", perturb=True)
    assert same.startswith("sha256:") and changed.startswith("sha256:")
    assert same != changed


def test_fingerprint_hashes_each_file_once(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "cache"))
    hashed: list[str] = []
    real = registry._sha256_file
    monkeypatch.setattr(registry, "_sha256_file", lambda path: hashed.append(path.name) or real(path))
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "base")  # its mtimes are touched below
    base = BaseModel(str(model_dir))

    first = registry.fingerprint(base)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    cache = json.loads((tmp_path / "cache" / registry.FINGERPRINT_CACHE).read_text())
    weights = (model_dir / "model.safetensors").resolve()
    assert cache[str(weights)]["size"] == weights.stat().st_size
    assert cache[str(weights)]["mtime_ns"] == weights.stat().st_mtime_ns

    hashed.clear()
    assert registry.fingerprint(base) == first and hashed == []  # served from the cache
    config = model_dir / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a touched file is hashed again
    assert registry.fingerprint(base) == first and hashed == ["config.json"]


def test_hub_fingerprint_agrees_with_a_local_copy(tiny_model_dir: Path, monkeypatch) -> None:
    """Offline stand-in for the hub: its listing gives LFS files' sha256; only config.json is downloaded."""
    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    weights = tiny_model_dir / "model.safetensors"
    lfs = BlobLfsInfo(
        size=weights.stat().st_size, sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), pointer_size=0
    )
    siblings = [RepoSibling("config.json"), RepoSibling("model.safetensors", lfs=lfs), RepoSibling("tokenizer.json")]
    info = type("Info", (), {"sha": "c0ffee", "siblings": siblings})
    downloads: list[tuple[str, str]] = []

    def download(repo: str, filename: str, revision: str) -> str:
        downloads.append((filename, revision))
        return str(tiny_model_dir / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, revision, files_metadata: info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    hub = registry.fingerprint(BaseModel("org/tiny-llama", revision="main"))
    assert hub == registry.fingerprint(BaseModel(str(tiny_model_dir)))
    assert downloads == [("config.json", "c0ffee")]  # the weights were never downloaded


def test_fingerprint_without_weights_names_the_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no weight files.*Fix: give the model dir") as e:
        registry.fingerprint(BaseModel(str(tmp_path)))
    assert str(tmp_path) in str(e.value)


# --- metadata and base checks ----------------------------------------------------------------------------------


def test_meta_round_trips_and_missing_meta_says_how_to_proceed(
    tiny_model_dir: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    meta = registry.read_meta(lora_adapter)
    assert meta["base_fingerprint"].startswith("sha256:") and meta["trial_id"] == "trial_lora" and meta["r"] == 4
    bare = shutil.copytree(lora_adapter, tmp_path / "bare")
    (bare / registry.META_FILE).unlink()
    with pytest.raises(ConfigError, match="not a lora_search adapter") as e:
        registry.read_meta(bare)
    assert "--no-check" in str(e.value) and str(bare) in str(e.value)
    with pytest.raises(ValueError, match="base_fingerprint"):
        registry.write_meta(bare, {"base_name_or_path": "x", "base_revision": None})

    with pytest.raises(ConfigError, match="--no-check"):
        registry.export(bare, tmp_path / "out", merge=False)
    out = registry.export(bare, tmp_path / "out", merge=False, check=False)  # base from adapter_config.json
    record = json.loads((out / registry.EXPORT_FILE).read_text())
    assert record["base_name_or_path"] == str(tiny_model_dir) and record["base_fingerprint"] is None


def test_wrong_base_is_refused_unless_unchecked(
    tiny_model_dir: Path, other_base: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    expected = registry.read_meta(lora_adapter)["base_fingerprint"]
    given = registry.fingerprint(BaseModel(str(other_base)))
    assert registry.check_base(lora_adapter, tiny_model_dir) == expected != given
    for attempt in (
        lambda: registry.load_adapter(other_base, lora_adapter),
        lambda: registry.export(lora_adapter, tmp_path / "out", merge=True, base=other_base),
    ):
        with pytest.raises(BaseMismatchError) as e:
            attempt()
        message = str(e.value)
        assert expected in message and given in message and "--base" in message
        assert str(lora_adapter) in message and str(other_base) in message and str(tiny_model_dir) in message
    assert not (tmp_path / "out").exists()

    model = registry.load_adapter(other_base, lora_adapter, check=False)
    assert isinstance(model, PeftModel)
    torch.testing.assert_close(logits(model, other_base), adapter_logits(other_base, lora_adapter))
    out = registry.export(lora_adapter, tmp_path / "out", merge=True, base=other_base, check=False)
    assert json.loads((out / registry.EXPORT_FILE).read_text())["base_fingerprint"] is None


# --- export ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", LORA_CONFIGS)
def test_merged_export_computes_what_the_adapter_does(variant: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model_dir, tmp_path / f"trial_{variant}", **LORA_CONFIGS[variant])
    out = registry.export(adapter, tmp_path / "merged", merge=True)

    expected = adapter_logits(tiny_model_dir, adapter)
    assert (expected - plain_logits(tiny_model_dir)).abs().max() > 100 * ATOL  # the adapter matters
    merged = plain_logits(out)  # tokenizer saved beside the merged model
    torch.testing.assert_close(merged, expected, atol=ATOL, rtol=RTOL)
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(out / "model.safetensors")) if "lora" in k]
    record = json.loads((out / registry.EXPORT_FILE).read_text())
    assert record["base_fingerprint"] == registry.read_meta(adapter)["base_fingerprint"]
    assert record["source_adapter"] == str(adapter.resolve()) and record["dtype"] == "float32"
    assert 0 <= record["max_abs_logit_diff"] < ATOL


def test_merge_check_refuses_a_wrong_scale(lora_adapter: Path, tmp_path: Path, monkeypatch) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    real = BaseTuner.merge_and_unload

    def doubled(self, *args, **kwargs):
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.scaling = {k: 2 * v for k, v in module.scaling.items()}
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BaseTuner, "merge_and_unload", doubled)
    assert (lora_adapter / PROBE_FILE).is_file()  # the check runs on the trial's probe prompts
    with pytest.raises(MergeCheckError, match=r"(?s)merge check failed.*nothing was written"):
        registry.export(lora_adapter, tmp_path / "exported" / "merged", merge=True)
    assert not (tmp_path / "exported").exists()


def test_plain_export_reloads_identically(tiny_model_dir: Path, lora_adapter: Path, tmp_path: Path) -> None:
    out = registry.export(lora_adapter, tmp_path / "plain", merge=False)
    assert {"adapter_config.json", "adapter_model.safetensors", registry.META_FILE} <= {p.name for p in out.iterdir()}
    assert torch.equal(adapter_logits(tiny_model_dir, out), adapter_logits(tiny_model_dir, lora_adapter))
    with pytest.raises(ConfigError, match=r"exists and is not empty"):
        registry.export(lora_adapter, out, merge=False)


# --- CLI and MLflow --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_run(lora_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(tracking URI, run id) of a run that logged `lora_adapter` as its `adapter` artifact."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tiny", artifact_location=(root / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(lora_adapter), "adapter")
    client.set_terminated(run_id)
    return uri, run_id


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_cli_exports_a_run_merged(tiny_model_dir: Path, lora_adapter: Path, mlflow_run, tmp_path: Path, capsys) -> None:
    uri, run_id = mlflow_run
    out = tmp_path / "merged"
    assert run_cli(["export", run_id, "--merge", "--tracking-uri", uri, "--output", str(out)]) == 0
    assert f"exported merged model to {out}" in capsys.readouterr().out
    assert json.loads((out / registry.EXPORT_FILE).read_text())["adapter_meta"]["trial_id"] == "trial_lora"
    torch.testing.assert_close(plain_logits(out), adapter_logits(tiny_model_dir, lora_adapter), atol=ATOL, rtol=RTOL)


def test_cli_unknown_run_exits_2(mlflow_run, tmp_path: Path, capsys) -> None:
    from mlflow import MlflowClient

    uri, run_id = mlflow_run
    assert run_cli(["export", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "0123456789abcdef0123456789abcdef" in err and uri in err and "--tracking-uri" in err

    client = MlflowClient(uri)
    bare_run = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id  # a pruned trial's
    assert run_cli(["export", bare_run, "--tracking-uri", uri, "--output", str(tmp_path / "out")]) == 2
    assert f"run = '{bare_run}': has no 'adapter' artifact" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert run_cli(["export", run_id, "--tracking-uri", missing]) == 2
    assert "no MLflow store there" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_cli_wrong_base_exits_2(other_base: Path, lora_adapter: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run_cli(["export", str(lora_adapter), "--merge", "--base", str(other_base), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "adapter does not match the base" in err and "--base" in err and not out.exists()


def test_cli_exports_a_dir_to_the_default_output(lora_adapter: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["export", str(lora_adapter)]) == 0
    out = tmp_path / "exported" / lora_adapter.name
    assert (out / "adapter_model.safetensors").read_bytes() == (lora_adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("broken", "content", "says"),
    [
        (registry.META_FILE, b'{"base_fingerprint": \n', "lora_search.json:2:1: invalid JSON"),
        (registry.META_FILE, b'{"variant": "lora\xff"}', "lora_search.json:1: not UTF-8 (byte 0xff at column 18)"),
        ("adapter_config.json", b"{,}", "adapter_config.json:1:2: invalid JSON"),
    ],
)
def test_cli_an_adapter_dir_with_a_broken_json_file_exits_2_at_its_line(
    lora_adapter: Path, tmp_path: Path, capsys, broken: str, content: bytes, says: str
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    (adapter / broken).write_bytes(content)
    if broken == "adapter_config.json":
        (adapter / registry.META_FILE).unlink()  # the merge then reads the base from adapter_config.json
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(adapter), "--merge", "--no-check", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
