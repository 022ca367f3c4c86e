"""Which serving engines load a saved adapter as it is, and why not: one rules table, read from the adapter dir.

A sweep's frontier can hold adapters the engine a user serves with refuses, or loads and serves wrong (a dropped
per-module alpha changes the scale silently). `check(adapter_dir)` reads what an engine reads, the adapter's
`adapter_config.json` and its tensor names, and applies `RULES`; every trial records the outcome (`servable`,
`serving_notes` in trials.parquet, an MLflow tag, the report), and `Sweep(serve_with="vllm")` keeps the frontier to
adapters that engine loads.

Each rule names its engine, the source it was read from and the commit read; check it against the version you serve
with. vLLM only for now (the engine the multi-LoRA serving literature and our users name first).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_search.variants import VARIANTS

ENGINES = ("vllm",)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's `--max-lora-rank` choices (vllm/config/lora.py `MaxLoRARanks`, read at commit 01230b40)."""

LORA_TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


@dataclass(frozen=True)
class Adapter:
    """What an engine reads from a saved PEFT adapter dir."""

    config: dict[str, Any]
    tensors: tuple[str, ...]

    @classmethod
    def read(cls, adapter_dir: str | Path) -> Adapter:
        from safetensors import safe_open

        adapter_dir = Path(adapter_dir)
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        weights = adapter_dir / "adapter_model.safetensors"
        with safe_open(str(weights), framework="numpy") as f:
            return cls(config=config, tensors=tuple(f.keys()))


@dataclass(frozen=True)
class Rule:
    engine: str
    says: str
    """Why the engine refuses (or mis-serves) an adapter that breaks the rule."""
    source: str
    """Where in the engine's source the rule was read, with the commit."""
    broken: Callable[[Adapter], bool]


def _unsupported_tensors(a: Adapter) -> bool:
    return any(not name.endswith(LORA_TENSOR_SUFFIXES) for name in a.tensors)


RULES: tuple[Rule, ...] = (
    Rule(
        "vllm",
        "not a LoRA adapter: vLLM loads peft_type LORA only",
        "vllm/lora/peft_helper.py (PEFTHelper), commit 02143692",
        lambda a: a.config.get("peft_type", "LORA") != "LORA",
    ),
    Rule(
        "vllm",
        "tensors other than lora_A/lora_B (VeRA's vectors, AdaLoRA's lora_E) are 'unsupported LoRA weight'",
        "vllm/lora/utils.py parse_fine_tuned_lora_name, commit 001e63a8",
        _unsupported_tensors,
    ),
    Rule(
        "vllm",
        "DoRA adapters are refused ('vLLM does not yet support DoRA')",
        "vllm/lora/peft_helper.py _validate_features, commit 02143692",
        lambda a: bool(a.config.get("use_dora")),
    ),
    Rule(
        "vllm",
        "modules_to_save must be None",
        "vllm/lora/peft_helper.py _validate_features, commit 02143692",
        lambda a: bool(a.config.get("modules_to_save")),
    ),
    Rule(
        "vllm",
        "rank_pattern / alpha_pattern are dropped: per-module ranks or scales would be served with the global ones",
        "vllm/lora/peft_helper.py from_dict keeps only PEFTHelper's fields, commit 02143692",
        lambda a: bool(a.config.get("rank_pattern")) or bool(a.config.get("alpha_pattern")),
    ),
    Rule(
        "vllm",
        f"rank above the largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
        "vllm/config/lora.py MaxLoRARanks, commit 01230b40",
        lambda a: int(a.config.get("r", 0)) > VLLM_MAX_LORA_RANKS[-1],
    ),
    Rule(
        "vllm",
        "a trained LoRA bias (bias != 'none') is not served as trained",
        "vllm/lora/peft_helper.py (bias field; LoRA bias deprecated), commit 02143692",
        lambda a: a.config.get("bias", "none") != "none",
    ),
)


@dataclass(frozen=True)
class Verdict:
    servable: tuple[str, ...]
    """The engines that load the adapter as saved."""
    notes: tuple[str, ...]
    """`engine: why not` for each broken rule, and `engine: serve with ...` for the flags a servable one needs."""

    @property
    def text(self) -> str:
        return "; ".join(self.notes)


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that serves `rank` (zero-padding a rank up is exact)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), math.inf)  # type: ignore[return-value]


def verdict(adapter: Adapter) -> Verdict:
    notes, ok = [], []
    for engine in ENGINES:
        broken = [r for r in RULES if r.engine == engine and r.broken(adapter)]
        notes += [f"{engine}: {r.says} [{r.source}]" for r in broken]
        if not broken:
            ok.append(engine)
    if "vllm" in ok:
        notes.append(f"vllm: serve with --enable-lora --max-lora-rank {max_lora_rank(int(adapter.config['r']))}")
    return Verdict(servable=tuple(ok), notes=tuple(notes))


def check(adapter_dir: str | Path) -> Verdict:
    """The verdict on a saved adapter dir; one that cannot be read is servable by no engine, and says why."""
    try:
        return verdict(Adapter.read(adapter_dir))
    except (OSError, ValueError, KeyError) as e:
        return Verdict(servable=(), notes=(f"unreadable adapter ({type(e).__name__}: {str(e)[:200]})",))


def can_serve(variants: tuple[str, ...], engine: str) -> tuple[str, ...]:
    """The variants in `variants` whose adapters `engine` can load as saved (for validate's warning): the ones that
    save plain LoRA tensors without DoRA (`VARIANTS_SAVED_AS_LORA`)."""
    return tuple(v for v in variants if engine != "vllm" or v in VARIANTS_SAVED_AS_LORA)


VARIANTS_SAVED_AS_LORA = frozenset(name for name, v in VARIANTS.items() if v.kind == "lora")
"""Variants whose saved adapter is plain LoRA tensors (`variants.Variant.kind`; PiSSA and LoftQ converted on save,
QLoRA's the same LoRA tensors trained against NF4 weights): vLLM loads them. DoRA, VeRA and AdaLoRA it refuses
(`RULES`)."""
