"""An adapter's provenance (which base it was trained on, by content) and its export, plain or merged.

    lora-search export RUN_ID --merge                  # MLflow run -> merged model in ./exported/RUN_ID-merged
    lora-search export reports/tiny/adapters/TRIAL     # adapter dir -> copy in ./exported/TRIAL

Every adapter a trial saves carries `lora_search.json` (`META_FILE`) beside adapter_config.json: the base's
name, revision and `fingerprint`, plus the trial's hyperparameters. A LoRA delta is only meaningful on the
exact weights it was trained against, and a name does not pin weights (a local dir is overwritten, a hub
branch moves), so `load_adapter` and `export` compare fingerprints first and refuse a different base
(`BaseMismatchError`). A merged export is checked too: the merged model's logits must match the unmerged
adapter's on a fixed batch (`MERGE_TOLERANCE`), so a scaling bug (alpha/r vs alpha/sqrt(r), DoRA's norm)
cannot ship silently.

Adapters are read from safetensors only: an adapter dir whose weights are a pickle (`adapter_model.bin`, which PEFT
reads with torch.load) is refused by `load_adapter`, `export` and `lora-search eval` unless the caller opts in
(`allow_pickle=True`, `--allow-pickle`), since unpickling a file can run code it carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_search.config import BaseModel, ConfigError, Problem
from lora_search.layout import MODEL_CONFIG, PEFT_CONFIG, PEFT_WEIGHTS, PROBE_FILE, default_cache_dir
from lora_search.userfiles import load_json
from lora_search.variants import VARIANTS

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

META_FILE = "lora_search.json"
EXPORT_FILE = "lora_search_export.json"
FINGERPRINT_CACHE = "fingerprints.json"
"""Per-file sha256 digests under `$LORA_SEARCH_CACHE`, so a large base is read once, not per export."""
CHUNK = 8 << 20  # 8 MiB reads: hashing runs at disk speed without holding a shard in memory
META_KEYS = ("base_name_or_path", "base_revision", "base_fingerprint")

PICKLE_WEIGHTS = "adapter_model.bin"  # PEFT's WEIGHTS_NAME: read with torch.load, i.e. unpickled

MERGE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
"""atol = rtol for merged vs unmerged logits, by the base's dtype. float32: merging only reorders roundings
(~1e-6 on the test model), so 1e-4 leaves 100x headroom while a wrong scale moves logits by far more. In half
precision the merged weight W + s*B@A is rounded to 11 (fp16) or 8 (bf16) significant bits once more, which the
unmerged path never does; the bounds are 6-10x eps (fp16 9.8e-4, bf16 7.8e-3). Measured on the test model (lora,
rslora, dora): max |diff| 1e-3 in fp16, 1.1e-2 in bf16; a doubled LoRA scale moved float32 logits by 0.41."""
FALLBACK_PROMPTS = ("The quick brown fox jumps over the lazy dog.", "Question: what is the answer?\nAnswer:")
"""The merge check's batch when the adapter has no probe file (`lora_search.layout.PROBE_FILE`)."""


class BaseMismatchError(ConfigError):
    """The base given is not, by content, the base the adapter was trained on."""

    def __init__(self, adapter_dir: Path, meta: dict[str, Any], given: BaseModel, given_fingerprint: str) -> None:
        self.expected, self.actual = meta["base_fingerprint"], given_fingerprint
        trained_on = meta["base_name_or_path"] + (f"@{meta['base_revision']}" if meta["base_revision"] else "")
        super().__init__(
            [
                Problem(
                    "base",
                    given.name_or_path,
                    f"has fingerprint {given_fingerprint}, but adapter {adapter_dir} was trained on {trained_on} "
                    f"with fingerprint {self.expected}",
                    f"load it onto the base it was trained on ({trained_on}), or pass that base (a local copy is "
                    "fine) with --base PATH_OR_ID",
                )
            ],
            header="adapter does not match the base",
        )


class PickleAdapterError(ConfigError):
    """The adapter's weights are a pickle, and the caller did not opt in to unpickling them."""


def check_safetensors(adapter_dir: Path, *, allow_pickle: bool = False) -> None:
    """Raise PickleAdapterError when PEFT would read this adapter's weights from a pickle (`adapter_model.bin`
    and no `adapter_model.safetensors`, which PEFT prefers when both exist), unless `allow_pickle`."""
    adapter_dir = Path(adapter_dir)
    if allow_pickle or (adapter_dir / PEFT_WEIGHTS).is_file() or not (adapter_dir / PICKLE_WEIGHTS).is_file():
        return
    raise PickleAdapterError(
        [
            Problem(
                "adapter",
                str(adapter_dir / PICKLE_WEIGHTS),
                f"is a pickle and the dir has no {PEFT_WEIGHTS}: loading it runs torch.load, and unpickling can "
                "execute code the file carries; lora_search reads adapters from safetensors only",
                "convert it once, where you trust its source: "
                f"PeftModel.from_pretrained(base, DIR).save_pretrained(DIR) writes {PEFT_WEIGHTS} beside it; "
                "or, trusting the file, pass --allow-pickle (allow_pickle=True)",
            )
        ],
        header="pickle adapter refused",
    )


class MergeCheckError(ConfigError):
    """The merged model does not compute what the adapter on its base computes; nothing was written."""


class DriftError(ConfigError):
    """What `export_for` wrote, reloaded as the engine reads it, does not compute what the trial computed (beyond
    `DRIFT_BOUND`); nothing was kept."""


DRIFT_BOUND = 0.02
"""`export_for`'s bound on max |reloaded - trial logit| over the probe, as a fraction of the logits' scale (max |logit|
of the trial's probe): the criterion of the GPU benchmark's reload check (benchmarks/smollm2_gpu.py `reload_check`).
bf16 logits of ~40 carry ~0.16 of rounding (2^-8 x 40), so 2% (0.8) leaves ~5x headroom for a reload in another
precision or on another device, while a wrong base, a dropped scale or a NF4-trained adapter on unquantised weights
moves logits by more."""
NF4_MERGE_DRIFT_BOUND = 0.10
"""The bound for a qlora/loftq adapter merged into its dequantised NF4 base (on a CUDA machine): that merge rounds
the NF4 weights plus the adapter's product into bf16, and moved logits of ~44 by up to 3.6 (8%) while keeping every
golden score of the unmerged adapter; the same adapters on the original bf16 weights moved them by 21-22 (~50%) and
lost 0.08-0.12 exact match (benchmarks/qlora_drift_h200_2026-12-04.json). 10% passes the first, refuses the second."""

QUANTIZED_WHY = (
    "trained against NF4 weights: on the original bf16 weights (what the engine would serve it on) it scored 0.08-0.12 "
    "lower exact match on SmolLM2-135M, merged into the dequantised NF4 base it kept its scores "
    "(benchmarks/qlora_drift_h200_2026-12-04.json), so the merged model is written"
)


# --- fingerprint -----------------------------------------------------------------------------------------------


def fingerprint(base: BaseModel) -> str:
    """A digest of the base's config and weights, equal for a hub repo and any local copy of it.

    Algorithm: take `config.json` and the weight files at the top of the model dir (every `*.safetensors`,
    or, if there are none, every `*.bin`; index files and tokenizer files are left out); map each file name to
    the sha256 hex digest of its bytes; return "sha256:" + sha256 of that map as canonical JSON
    (`json.dumps(m, sort_keys=True, separators=(",", ":"))`, UTF-8).

    A local dir (`base.name_or_path` is a directory) is hashed on disk, each file's digest cached in
    `$LORA_SEARCH_CACHE/fingerprints.json` under its absolute path, size and mtime_ns, so a 140 GB base is read
    once. A hub id downloads no weights: the hub lists each LFS file's sha256 (the same digest of the same bytes);
    only config.json is downloaded. Raises ConfigError when config.json or every weight file is missing.
    """
    root = Path(base.name_or_path)
    digests = _local_digests(root) if root.is_dir() else _hub_digests(base)
    canonical = json.dumps(digests, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _fingerprinted_files(name_or_path: str, names: list[str]) -> list[str]:
    weights = sorted(n for n in names if n.endswith(".safetensors")) or sorted(n for n in names if n.endswith(".bin"))
    missing = [what for what, found in ((MODEL_CONFIG, MODEL_CONFIG in names), ("weight files", weights)) if not found]
    if missing:
        raise ConfigError(
            [
                Problem(
                    "base",
                    name_or_path,
                    f"has no {' and no '.join(missing)} (*.safetensors or *.bin), so it cannot be fingerprinted",
                    "give the model dir that AutoModelForCausalLM.from_pretrained loads, or its hub id",
                )
            ]
        )
    return [MODEL_CONFIG, *weights]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _local_digests(root: Path) -> dict[str, str]:
    from filelock import FileLock

    cache_file = default_cache_dir() / FINGERPRINT_CACHE
    cache = _read_json(cache_file)
    names = _fingerprinted_files(str(root), [p.name for p in root.iterdir() if p.is_file()])
    digests, fresh = {}, {}
    for name in names:
        path = (root / name).resolve()  # HF cache snapshots are symlinks to blobs: key on the blob
        stat = path.stat()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        hit = cache.get(str(path), {})
        if {k: hit.get(k) for k in entry} == entry:
            digests[name] = hit["sha256"]
        else:
            digests[name] = _sha256_file(path)
            fresh[str(path)] = entry | {"sha256": digests[name]}
    if fresh:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{cache_file}.lock"):  # concurrent exports each add their own entries
            merged = _read_json(cache_file) | fresh
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            os.replace(tmp, cache_file)
    return digests


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _hub_digests(base: BaseModel) -> dict[str, str]:
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(base.name_or_path, revision=base.revision, files_metadata=True)
    top = {s.rfilename: s for s in info.siblings or [] if "/" not in s.rfilename}
    digests = {}
    for name in _fingerprinted_files(base.name_or_path, list(top)):
        lfs = top[name].lfs
        if lfs is not None:
            digests[name] = lfs.sha256
        else:  # config.json and any small weight file stored in git: download (small) and hash
            local = hf_hub_download(base.name_or_path, name, revision=info.sha)
            digests[name] = _sha256_file(Path(local))
    return digests


# --- adapter metadata ------------------------------------------------------------------------------------------


def base_meta(base: BaseModel, base_fingerprint: str | None = None) -> dict[str, Any]:
    """The base part of an adapter's meta (`META_KEYS`); merge the trial's own fields into it."""
    return {
        "base_name_or_path": base.name_or_path,
        "base_revision": base.revision,
        "base_fingerprint": base_fingerprint or fingerprint(base),
    }


def write_meta(adapter_dir: Path, meta: dict[str, Any]) -> None:
    """Write `meta` (JSON-serialisable, holding at least `META_KEYS`) as `adapter_dir/lora_search.json`."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"adapter meta lacks {missing}; build it as base_meta(base) | {{trial fields}}")
    (Path(adapter_dir) / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    """The meta `write_meta` wrote. Raises ConfigError when the dir has none (not saved by lora_search)."""
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(
            [
                Problem(
                    "adapter",
                    str(adapter_dir),
                    f"has no {META_FILE}: it is not a lora_search adapter, so the base it was trained on is unknown "
                    "and its fingerprint cannot be checked",
                    "export it with --no-check (and --base PATH_OR_ID), trusting the base yourself",
                )
            ],
            header="unknown adapter provenance",
        )
    return load_json(path, "restore the adapter dir as the sweep saved it")


def check_base(adapter_dir: Path, base_dir_or_base: str | Path | BaseModel) -> str:
    """Return the given base's fingerprint; raise BaseMismatchError if the adapter was trained on another."""
    meta = read_meta(adapter_dir)
    base = _as_base(base_dir_or_base, meta)
    given = fingerprint(base)
    if given != meta["base_fingerprint"]:
        raise BaseMismatchError(Path(adapter_dir), meta, base, given)
    return given


def _as_base(base: str | Path | BaseModel, meta: dict[str, Any]) -> BaseModel:
    """A BaseModel as given, else one for the path or id; the recorded revision applies to the recorded name."""
    if isinstance(base, BaseModel):
        return base
    name = str(base)
    revision = meta.get("base_revision") if name == meta.get("base_name_or_path") else None
    return BaseModel(name, revision=revision, dtype="auto")


# --- loading and export ----------------------------------------------------------------------------------------


def load_adapter(
    base: str | Path | BaseModel,
    adapter_dir: Path,
    *,
    check: bool = True,
    dequantized_nf4: bool = False,
    allow_pickle: bool = False,
) -> PeftModel:
    """The base (in its dtype, on the CPU) with the adapter applied, in eval mode. `dequantized_nf4`: the base as
    4-bit variants (qlora, loftq) train on it, NF4-quantised and dequantised to bf16, on the GPU (needs CUDA).

    With `check`, a base whose fingerprint differs from the adapter's recorded one is refused before any
    weights load (BaseMismatchError); without it, an adapter with no meta loads too. Pickle weights are refused
    (PickleAdapterError) unless `allow_pickle`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_safetensors(adapter_dir, allow_pickle=allow_pickle)
    if check:
        check_base(adapter_dir, base)
    meta = read_meta(adapter_dir) if (Path(adapter_dir) / META_FILE).is_file() else {}
    base = _as_base(base, meta)
    if dequantized_nf4:
        # The base as a 4-bit variant trained against it: NF4 on the GPU, then dequantised to bf16 weights. Merging
        # into these reproduces what training saw; merging into the original weights would add the adapter to
        # weights it never saw (off by the quantisation error, which the adapter partly learned to correct).
        from lora_search.variants import quantization_config

        model = AutoModelForCausalLM.from_pretrained(
            base.name_or_path,
            revision=base.revision,
            trust_remote_code=base.trust_remote_code,
            dtype=torch.bfloat16,
            quantization_config=quantization_config(),
            device_map={"": torch.cuda.current_device()},
        )
        model = model.dequantize()
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base.name_or_path,
            revision=base.revision,
            trust_remote_code=base.trust_remote_code,
            dtype="auto" if base.dtype == "auto" else getattr(torch, base.dtype),
        )
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def export(
    adapter_dir: Path,
    output: Path,
    *,
    merge: bool,
    base: str | Path | None = None,
    check: bool = True,
    allow_pickle: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write the adapter (a copy of its PEFT dir) or, with `merge`, base + adapter as one plain model, to `output`.
    `dtype`: the dtype the base loads in, and a merged model is written in (None: the checkpoint's own).

    `base` defaults to the one recorded in the adapter's meta (at its revision), else, unchecked, to
    adapter_config.json's `base_model_name_or_path`. With `check` the base's fingerprint must match the
    recorded one (BaseMismatchError). A merge is verified before anything is written: logits of the merged
    model on the adapter's probe prompts (or `FALLBACK_PROMPTS`) must match the unmerged adapter's within
    `MERGE_TOLERANCE` (MergeCheckError). The merged dir holds model (safetensors), tokenizer and
    `lora_search_export.json` (source adapter, base fingerprint, max logit diff). Returns `output`.
    Raises ConfigError when `output` exists and is not empty, PickleAdapterError for pickle weights without
    `allow_pickle`.
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    if not (adapter_dir / PEFT_CONFIG).is_file():
        raise ConfigError(
            [Problem("adapter", str(adapter_dir), "has no adapter_config.json", "give a PEFT adapter dir")]
        )
    check_safetensors(adapter_dir, allow_pickle=allow_pickle)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(
            [Problem("--output", str(output), "exists and is not empty", "choose another --output, or remove it")],
            header="nothing overwritten",
        )
    has_meta = (adapter_dir / META_FILE).is_file()
    meta = read_meta(adapter_dir) if check or has_meta else {}
    if base is not None:
        base_model = _as_base(base, meta)
    elif meta:
        base_model = BaseModel(meta["base_name_or_path"], revision=meta["base_revision"], dtype="auto")
    else:
        config = load_json(adapter_dir / PEFT_CONFIG, "give a PEFT adapter dir")
        if not isinstance(config, dict) or not isinstance(config.get("base_model_name_or_path"), str):
            why = "names no base_model_name_or_path, so the base to merge into is unknown"
            problem = Problem(str(adapter_dir / PEFT_CONFIG), None, why, "pass --base PATH_OR_ID")
            raise ConfigError([problem], header="unknown base")
        base_model = BaseModel(config["base_model_name_or_path"], dtype="auto")
    if dtype is not None:
        base_model = dataclasses.replace(base_model, dtype=dtype)  # type: ignore[arg-type]
    record: dict[str, Any] = {
        "source_adapter": str(adapter_dir.resolve()),
        "merged": merge,
        "base_name_or_path": base_model.name_or_path,
        "base_revision": base_model.revision,
        "base_fingerprint": check_base(adapter_dir, base_model) if check else None,
        "adapter_meta": meta,
    }
    quantized = _quantized(meta)
    dequantize = False
    if merge and quantized:
        import torch

        dequantize = torch.cuda.is_available()
        record["merged_into"] = (
            "NF4-dequantised bf16 base (the weights the adapter trained on; on SmolLM2-135M this merge kept the golden "
            "scores of the unmerged adapter, the merge into the original bf16 base lost 0.08-0.12 exact match: "
            "benchmarks/qlora_drift_h200_2026-12-04.json)"
            if dequantize
            else "the original base weights: NF4 needs CUDA to dequantise, so the merge omits the quantisation error "
            "the adapter trained against; merge on a GPU machine to reproduce training exactly"
        )
        record["merged_into_nf4"] = dequantize
    # raises before anything is written
    merged = _merge_checked(adapter_dir, base_model, dequantize, allow_pickle) if merge else None

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        if merged is None:
            shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        else:
            model, tokenizer, diff, tol = merged
            model.save_pretrained(str(tmp))  # safetensors: transformers 5 writes nothing else
            tokenizer.save_pretrained(str(tmp))
            record |= {"max_abs_logit_diff": diff, "tolerance": tol, "dtype": str(model.dtype).removeprefix("torch.")}
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if output.exists():
            output.rmdir()  # empty, checked above
        os.rename(tmp, output)  # a finished export appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def export_for(
    adapter_dir: Path,
    output: Path,
    engine: str,
    *,
    base: str | Path | None = None,
    check: bool = True,
    allow_pickle: bool = False,
    dtype: str | None = None,
    allow_drift: bool = False,
) -> Path:
    """Export what `engine` serves (`lora_search.serving.ENGINES`): the adapter as it is where the engine loads it,
    else base + adapter merged (DoRA, VeRA, AdaLoRA, per-module ranks), checked by `export`'s merge check. The export
    record (`EXPORT_FILE`) gains `serving`: the engine, what was written and why, the flags it needs, the command that
    serves it, and the reload check.

    The reload check: what was written is loaded back as the engine reads it (the adapter onto its base with plain
    PEFT, the merged dir with transformers) and its logits on the trial's probe compared with the trial's own. A max
    difference above `DRIFT_BOUND` of the logits' scale removes `output` and raises DriftError naming both, unless
    `allow_drift` (then recorded as allowed). An adapter saved without a probe is written unchecked, and says so.
    """
    from lora_search import serving

    spec = serving.ENGINES[engine]
    if not (spec.serve_adapter and spec.serve_model):
        fix = f"export for one of {', '.join(serving.EXPORTABLE)}, or export the adapter (or --merge) as it is"
        problem = Problem("--for", engine, "no command serving it was read (serving.ENGINES)", fix)
        raise ConfigError([problem], header="nothing exported")
    verdict = serving.check(adapter_dir)
    meta = read_meta(adapter_dir) if (Path(adapter_dir) / META_FILE).is_file() else {}
    quantized = _quantized(meta)
    as_adapter = engine in verdict.servable and not quantized  # an engine serves an adapter on bf16 weights
    out = export(
        adapter_dir, output, merge=not as_adapter, base=base, check=check, allow_pickle=allow_pickle, dtype=dtype
    )
    record = json.loads((out / EXPORT_FILE).read_text())
    written = "adapter" if as_adapter else "merged model"
    how: dict[str, Any] = {"engine": engine, "written": written}
    path = Path(output).resolve()
    if as_adapter:
        rank = spec.max_rank(int(json.loads((out / PEFT_CONFIG).read_text())["r"]))
        base_name = record["base_name_or_path"]
        command = spec.serve_adapter.format(base=base_name, rank=rank, name=Path(output).name, path=path)
        how |= {"max_lora_rank": rank, "command": command}
        revision = record["base_revision"]
        reload_base = BaseModel(base_name, revision=revision, dtype=dtype or "auto")  # type: ignore[arg-type]
    else:
        why = "; ".join(n for n in verdict.notes if n.startswith(f"{engine}: ")) or verdict.text  # or: unreadable
        if quantized and engine in verdict.servable:
            why = f"{engine}: {meta['variant']} {QUANTIZED_WHY}"
        how |= {"why": why, "command": spec.serve_model.format(path=path)}
        reload_base = None
    bound = NF4_MERGE_DRIFT_BOUND if record.get("merged_into_nf4") else DRIFT_BOUND
    drift = _reload_drift(adapter_dir, out, reload_base, bound)
    how |= drift or {"reload_max_abs_logit_diff": None, "reload_check": f"not run: the adapter has no {PROBE_FILE}"}
    if drift and drift["reload_max_abs_logit_diff"] > drift["drift_bound"]:
        if not allow_drift:
            shutil.rmtree(out, ignore_errors=True)
            raise DriftError([_drift_problem(out, engine, written, drift, record)], header="export drifted")
        how["drift_allowed"] = True
    record["serving"] = how
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out


def _quantized(meta: dict[str, Any]) -> bool:
    """Whether the adapter's meta names a variant trained on a 4-bit base (qlora, loftq)."""
    return meta.get("variant") in VARIANTS and VARIANTS[meta["variant"]].quantized


def _drift_problem(out: Path, engine: str, written: str, drift: dict[str, float], record: dict[str, Any]) -> Problem:
    diff, bound, scale = drift["reload_max_abs_logit_diff"], drift["drift_bound"], drift["logit_scale"]
    variant = (record.get("adapter_meta") or {}).get("variant")
    if written == "merged model" and variant in VARIANTS and VARIANTS[variant].quantized:
        fix = "it trained against NF4 weights: export on a GPU machine, which merges into the dequantised NF4 base"
    elif written == "merged model":
        fix = f"the merge rounded the adapter into {record.get('dtype')} weights: export with --dtype float32"
    else:
        fix = (
            "the adapter on this base does not compute what the trial computed (another base, or weights it trained "
            "against in another precision, such as NF4): check --base, or export where it trained"
        )
    return Problem(
        "export",
        str(out),
        f"the {written} written for {engine}, reloaded as {engine} reads it, differs from the trial's probe logits by "
        f"up to {diff:.3g}, above the bound {bound:.3g} ({bound / scale:.0%} of the logits' scale {scale:.3g}); "
        "nothing was kept",
        f"{fix}; or pass --allow-drift to keep it anyway (recorded in {EXPORT_FILE})",
    )


def _reload_drift(
    adapter_dir: Path, out: Path, base: BaseModel | None, bound: float = DRIFT_BOUND
) -> dict[str, float] | None:
    """Max |last-position logit| difference between what `out` holds, reloaded as an engine reads it (an adapter on
    `base` with plain PEFT; `base` None: a merged model dir, with transformers) and the trial's own logits on the
    probe it saved beside the adapter, with the logits' scale (max |logit|) and the bound; None without a probe."""
    import torch
    from safetensors.torch import load_file

    probe_path = Path(adapter_dir) / PROBE_FILE
    if not probe_path.is_file():
        return None
    saved = load_file(str(probe_path))
    if base is not None:
        model = load_adapter(base, out, check=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").eval()
    with torch.no_grad():
        got = torch.stack(
            [model(input_ids=saved[f"input_ids_{i}"][None]).logits[0, -1].float() for i in range(len(saved) - 1)]
        )
    scale = float(saved["logits"].abs().max())
    return {
        "reload_max_abs_logit_diff": float((got - saved["logits"]).abs().max()),
        "logit_scale": scale,
        "drift_bound": bound * scale,
    }


def _merge_checked(
    adapter_dir: Path, base: BaseModel, dequantize: bool = False, allow_pickle: bool = False
) -> tuple[torch.nn.Module, Any, float, float]:
    """Merge the adapter into its base; return (merged model, tokenizer, max |logit diff|, tolerance).
    `dequantize`: merge into the NF4-dequantised bf16 base a 4-bit variant trained on (`load_adapter`)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        base.name_or_path, revision=base.revision, trust_remote_code=base.trust_remote_code
    )
    probe_path = adapter_dir / PROBE_FILE
    if probe_path.is_file():
        saved = load_file(str(probe_path))
        batch = [saved[f"input_ids_{i}"][None] for i in range(len(saved) - 1)]
    else:
        batch = [tokenizer(p, return_tensors="pt")["input_ids"] for p in FALLBACK_PROMPTS]

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():  # every position, not just the last: a merge bug shows anywhere
            return torch.cat([model(input_ids=ids).logits[0].float() for ids in batch])

    model = load_adapter(base, adapter_dir, check=False, dequantized_nf4=dequantize, allow_pickle=allow_pickle)
    device = next(model.parameters()).device
    batch = [ids.to(device) for ids in batch]
    before = logits(model)
    merged = model.merge_and_unload()
    after = logits(merged)
    dtype = str(merged.dtype).removeprefix("torch.")
    tol = MERGE_TOLERANCE.get(dtype, max(MERGE_TOLERANCE.values()))
    diff = float((after - before).abs().max())
    if not torch.allclose(after, before, atol=tol, rtol=tol):
        raise MergeCheckError(
            [
                Problem(
                    "merge",
                    str(adapter_dir),
                    f"merged model's logits differ from the adapter's by up to {diff:.3g} "
                    f"(tolerance atol=rtol={tol:g} for {dtype}); nothing was written",
                    "this is a merge bug (PEFT version, variant scaling): export without --merge and load the "
                    "adapter with PeftModel instead, and report it",
                )
            ],
            header="merge check failed",
        )
    return merged, tokenizer, diff, tol


# --- MLflow ----------------------------------------------------------------------------------------------------


def download_run_adapter(run_id: str, tracking_uri: str, dst: Path) -> Path:
    """Download the `adapter` artifact of MLflow run `run_id` into `dst`; return the adapter dir.

    Raises ConfigError when the store, the run or its adapter artifact does not exist.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        # Opening a missing sqlite store would create an empty one and then report the run unknown.
        raise ConfigError(
            [
                Problem(
                    "tracking URI",
                    tracking_uri,
                    "no MLflow store there",
                    "pass --tracking-uri of the sweep's store (or set MLFLOW_TRACKING_URI, or LORA_SEARCH_OUTPUT_DIR "
                    "to the sweep's output dir)",
                )
            ],
            header="unknown run",
        )
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise ConfigError(
            [
                Problem(
                    "run",
                    run_id,
                    f"not found in {tracking_uri} ({e.error_code})",
                    "check the run id in the MLflow UI, or pass --tracking-uri of the store the sweep logged to",
                )
            ],
            header="unknown run",
        ) from e
    try:
        local = Path(client.download_artifacts(run_id, "adapter", str(dst)))
    except (MlflowException, OSError) as e:
        raise ConfigError(
            [
                Problem(
                    "run",
                    run_id,
                    f"has no 'adapter' artifact in {tracking_uri} ({e})",
                    "only completed trials log their adapter; pick a completed trial's run",
                )
            ],
            header="nothing to export",
        ) from e
    return local
