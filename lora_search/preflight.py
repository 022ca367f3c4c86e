"""Pre-flight checks: everything about a sweep that can be known before any trial spends compute.

    lora-search validate sweeps/tiny.py     # exit 0 when clean, 2 with every problem listed

Reads only the model's config (no weights: the model is built on the meta device), the data files and
what this machine has installed. Ray is never started here.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import TYPE_CHECKING

from lora_search import data, environment, gguf, targets, varlen
from lora_search.config import BaseModel, ConfigError, Problem, Sweep
from lora_search.memory import meta_model
from lora_search.variants import VARIANTS

if TYPE_CHECKING:
    from lora_search.targets import LinearLayer


def model_layers(base: BaseModel) -> list[LinearLayer]:
    """The linear layers of `base`, read from its config alone."""
    return targets.linear_layers(meta_model(base))


def base_weight_bytes(base: BaseModel) -> int:
    """Bytes of the base's weights at the sweep's dtype: what a full fine-tune would save (tied weights once)."""
    import torch

    model = meta_model(base)
    dtype = getattr(model.config, "dtype", None) if base.dtype == "auto" else getattr(torch, base.dtype)
    size = torch.empty(0, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32).element_size()
    return sum(p.numel() for p in model.parameters()) * size


def problems(sweep: Sweep) -> list[Problem]:
    """Problems that need the outside world: model config, target modules, ranks, data as the trial will tokenize
    it, golden sets, GPU prerequisites, the tracking store. A check runs only on the parts of the sweep whose fields
    all have the annotated types (`Sweep.conforms`): those that do not are already reported. A GGUF base is
    checked, converted once (`lora_search.gguf`), and every later check reads its converted dir."""
    sweep, out = gguf.resolved(sweep)
    out.extend(environment.problems())  # the LORA_SEARCH_* switches this driver's workers inherit
    model = None
    if sweep.conforms("base") and not out:
        try:
            model = meta_model(sweep.base)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError for a bad model
            out.append(
                Problem(
                    "base.name_or_path",
                    sweep.base.name_or_path,
                    f"cannot read the model config ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                    "give a local dir with config.json, or a hub id this machine can reach (set HF_TOKEN if gated)",
                )
            )
    layers = targets.linear_layers(model) if model is not None else []
    seen: set[str] = set()
    for i, t in enumerate(sweep.space.targets if layers and sweep.conforms("space.targets", "space.ranks") else ()):
        if isinstance(t, str) and t not in targets.PRESETS:
            continue  # already reported as an unknown preset
        for p in targets.check(t, sweep.space.ranks, layers, f"space.targets[{i}]"):
            # A too-large rank shows up once per target set; the user needs it once.
            if str(p) not in seen:
                seen.add(str(p))
                out.append(p)
    if sweep.conforms("base.attn_implementation", "space.variants", "resources"):
        out.extend(_hardware(sweep))
    if model is not None and sweep.base.attn_implementation == varlen.NAME:
        if (why := varlen.unsupported(model.config)) is not None:
            out.append(
                Problem(
                    "base.attn_implementation",
                    varlen.NAME,
                    f"{sweep.base.name_or_path}'s attention has {why}, which torch_varlen does not compute",
                    "use 'auto' (it picks a kernel this model's attention runs on) or 'flex_attention'",
                )
            )
    if sweep.conforms("dataset"):
        found = data.check(sweep.dataset)
        out.extend(found)
        if model is not None:
            out.extend(_context_problems(sweep, model.config))
            if not found and sweep.conforms("budget.batch_size", "resources.workers", "seed"):
                out.extend(_token_problems(sweep))
    if sweep.evals is not None and sweep.conforms("evals"):
        from lora_search import evals

        out.extend(evals.check(sweep.evals))
    if sweep.conforms("name", "output_dir"):
        out.extend(_output_problems(sweep))
    if sweep.conforms("name", "output_dir", "tracking_uri"):
        from lora_search import tracking

        out.extend(tracking.problems(sweep))
    return out


def _local_fit(sweep: Sweep) -> list[Problem]:
    """On the local Ray a sweep starts (no RAY_ADDRESS), one trial's workers must fit this machine: Tune would
    otherwise wait for ever for CPUs or GPUs that never come, with no error."""
    if os.environ.get("RAY_ADDRESS"):
        return []
    r = sweep.resources
    out = []
    cores = os.cpu_count() or 1
    if r.workers * r.cpus_per_worker > cores:
        out.append(
            Problem(
                "resources",
                f"workers={r.workers} x cpus_per_worker={r.cpus_per_worker:g}",
                f"one trial needs {r.workers * r.cpus_per_worker:g} CPUs; this machine has {cores}, so no trial would "
                "ever start",
                f"use fewer workers or cpus_per_worker (at most {cores} in all), or run on a cluster (RAY_ADDRESS)",
            )
        )
    out.extend(_pack_host_fit(sweep, cores))
    if r.gpus_per_worker > 0:
        import torch

        gpus = torch.cuda.device_count()
        if r.workers * r.gpus_per_worker > gpus:
            out.append(
                Problem(
                    "resources",
                    f"workers={r.workers} x gpus_per_worker={r.gpus_per_worker:g}",
                    f"one trial needs {r.workers * r.gpus_per_worker:g} GPUs; this machine has {gpus}, so no trial "
                    "would ever start",
                    "set gpus_per_worker=0 to train on CPU, or run on a GPU machine or cluster (RAY_ADDRESS)",
                )
            )
    return out


def _pack_host_fit(sweep: Sweep, cores: int) -> list[Problem]:
    """A pack host reserves `cpus_per_worker` CPUs and each packed trial beside it `PACKED_TRIAL_CPU`: where the
    two together exceed this machine, the trials take their CPUs first, the host is never placed, and they wait for
    it for ever (seen on a 2-CPU machine with cpus_per_worker=2). `pack_host.hosts` caps the hosts of a machine
    that can place one; this is the case where none can."""
    from lora_search.pack_host import PACKED_TRIAL_CPU, host_cpus, packed

    r = sweep.resources
    if not any(packed(sweep, v) for v in sweep.space.variants):
        return []  # packing off, or no variant of the sweep packs
    trials = r.pack if sweep.max_concurrent_trials is None else min(r.pack, sweep.max_concurrent_trials)
    need = host_cpus(sweep, trials)
    if need <= cores + 1e-9:
        return []
    room = cores - trials * PACKED_TRIAL_CPU
    most_pack = math.floor((cores - r.cpus_per_worker) / PACKED_TRIAL_CPU + 1e-9)
    fixes = [f"cpus_per_worker to at most {room:g}"] if room > 0 else []
    fixes += [f"pack to at most {most_pack}"] if most_pack >= 2 else []
    fix = f"set {' or '.join(fixes)}" if fixes else "use fewer cpus_per_worker and a smaller pack"
    return [
        Problem(
            "resources",
            f"cpus_per_worker={r.cpus_per_worker:g} with pack={r.pack}",
            f"a pack host needs {need:g} CPUs (its cpus_per_worker, and {PACKED_TRIAL_CPU:g} for each of its "
            f"{trials} trials); this machine has {cores}, so the host would never start and its trials would wait "
            "for ever",
            f"{fix}, or run on a cluster (RAY_ADDRESS)",
        )
    ]


def _output_problems(sweep: Sweep) -> list[Problem]:
    """The sweep's results dir must be creatable: a file in its way, or a folder this user cannot write, would
    otherwise fail after Ray started."""
    from pathlib import Path

    target = Path(sweep.output_dir) / sweep.name
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        why = f"cannot hold the sweep's results: {existing} is a file"
        return [
            Problem("output_dir", sweep.output_dir, why, "point output_dir (or LORA_SEARCH_OUTPUT_DIR) at a folder")
        ]
    if not os.access(existing, os.W_OK | os.X_OK):
        why = f"cannot hold the sweep's results: {existing} is not writable by this user"
        return [Problem("output_dir", sweep.output_dir, why, "point output_dir (or LORA_SEARCH_OUTPUT_DIR) elsewhere")]
    return []


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Where a Transformers config keeps its context length, by architecture."""


def context_length(config: object) -> int | None:
    """The base's context length from its config, or None when it names none."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _context_problems(sweep: Sweep, config: object) -> list[Problem]:
    limit = context_length(config)
    if limit is None or sweep.dataset.max_length <= limit:
        return []
    field = next(n for n in CONTEXT_FIELDS if getattr(config, n, None) == limit)
    return [
        Problem(
            "dataset.max_length",
            sweep.dataset.max_length,
            f"exceeds the base's context length ({field} = {limit} in {sweep.base.name_or_path}'s config)",
            f"set max_length <= {limit}",
        )
    ]


def _token_problems(sweep: Sweep) -> list[Problem]:
    """The data as the trial sees it: tokenized with the base's own tokenizer and chat template, cut at max_length."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            sweep.base.name_or_path, revision=sweep.base.revision, trust_remote_code=sweep.base.trust_remote_code
        )
    except Exception as e:  # a model without a loadable tokenizer; the trial would fail the same way
        return [
            Problem(
                "base.name_or_path",
                sweep.base.name_or_path,
                f"has no tokenizer this machine can load ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                "save the tokenizer beside the model (tokenizer.save_pretrained(dir))",
            )
        ]
    # A step of one worker needs batch_size rows that train something; every worker gets its own share of rows.
    needed = sweep.budget.batch_size * sweep.resources.workers
    return data.token_problems(sweep.dataset, tokenizer, sweep.seed, needed)


# What Ray's `default` extra adds that a trial needs: without these Ray's dashboard starts in minimal mode, with no
# state API, so Ray Train cannot look up a finished trial's workers to free their placement group. The trial's GPUs
# are then never given back, and the next trial waits for them for ever (seen on a GPU machine: no error, no report).
RAY_DASHBOARD_MODULES = ("aiohttp_cors", "opencensus")

CUDA_ONLY_ATTENTION = frozenset({varlen.NAME, "flash_attention_2", "flash_attention_3"})
"""Attention kernels with no CPU implementation: a sweep naming one on CPU-only workers fails in every trial."""


def _hardware(sweep: Sweep) -> list[Problem]:
    out = []
    kernel = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(
        sweep.base.attn_implementation
    )
    if kernel and importlib.util.find_spec(kernel) is None:
        out.append(
            Problem(
                "base.attn_implementation",
                sweep.base.attn_implementation,
                f"needs the {kernel} package, which is not installed",
                "pip install flash-attn on every GPU node, or use 'sdpa' (or 'flex_attention' for padding-free)",
            )
        )
    attn = sweep.base.attn_implementation
    if attn in CUDA_ONLY_ATTENTION and sweep.resources.gpus_per_worker <= 0:
        out.append(
            Problem(
                "base.attn_implementation",
                attn,
                f"{attn} runs on CUDA GPUs only, but resources.gpus_per_worker = 0",
                "use 'auto' (it picks a varlen kernel wherever a trial has a GPU it runs on, SDPA elsewhere), or "
                "give the workers GPUs",
            )
        )
    if attn == varlen.NAME and not os.environ.get("RAY_ADDRESS") and not varlen.available():
        import torch  # this driver's torch is the trials' (no RAY_ADDRESS: a cluster's nodes have their own)

        out.append(
            Problem(
                "base.attn_implementation",
                attn,
                f"torch {torch.__version__} has no torch.nn.attention.varlen",
                "pip install 'torch>=2.10', or use 'auto' / 'sdpa'",
            )
        )
    missing = [m for m in RAY_DASHBOARD_MODULES if importlib.util.find_spec(m) is None]
    if missing and not os.environ.get("RAY_ADDRESS"):  # a cluster's head node has its own install
        out.append(
            Problem(
                "ray",
                "ray[default] missing " + ", ".join(missing),
                "Ray's dashboard would start without its state API, so a finished trial's GPUs/CPUs are never given "
                "back and the next trial waits for ever",
                "pip install 'ray[default,tune,train]' (lora-search's own dependencies include it)",
            )
        )
    out.extend(_local_fit(sweep))
    deepspeed = sorted(
        {sweep.resources.strategy_for(v) for v in sweep.space.variants} & {"deepspeed-zero2", "deepspeed-zero3"}
    )
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        out.append(
            Problem(
                "resources.strategy",
                ", ".join(deepspeed),
                "needs DeepSpeed, which is not installed",
                "pip install 'lora-search[deepspeed]' on every node, or choose strategy='fsdp'",
            )
        )
    quantized = [v for v in sweep.space.variants if v in VARIANTS and VARIANTS[v].quantized]
    if not quantized:
        return out
    names = ", ".join(quantized)
    if sweep.resources.gpus_per_worker <= 0:
        out.append(
            Problem(
                "space.variants",
                names,
                "4-bit NF4 variants run on CUDA GPUs only, but resources.gpus_per_worker = 0",
                "set resources=Resources(gpus_per_worker=1) on a GPU cluster, or drop them from space.variants",
            )
        )
    elif not os.environ.get("RAY_ADDRESS"):
        import torch

        if not torch.cuda.is_available():
            out.append(
                Problem("space.variants", names, "no CUDA device on this machine", "run on a GPU machine or cluster")
            )
    if importlib.util.find_spec("bitsandbytes") is None:
        out.append(
            Problem(
                "space.variants",
                names,
                "needs bitsandbytes, which is not installed",
                "pip install 'lora-search[gpu]' (or bitsandbytes)",
            )
        )
    return out


def validate(sweep: Sweep, construction_problems: list[Problem] | None = None) -> None:
    """Raise one ConfigError naming every problem with `sweep`, construction and pre-flight alike."""
    # The sweep's own problems again: a Sweep built at the top of a script (`python sweeps/x.py`) defers them to here.
    found = list(construction_problems or [])
    found += [p for p in sweep.problems() if p not in found]
    found += problems(sweep)
    if found:
        raise ConfigError(found, header=f"sweep {sweep.name!r} cannot run")
