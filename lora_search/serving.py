"""Which serving engines load a saved adapter as it is, and why not: one rules table, read from the adapter dir.

A sweep's frontier can hold adapters the engine a user serves with refuses, or loads and serves wrong (a dropped
per-module alpha changes the scale silently). `check(adapter_dir)` reads what an engine reads, the adapter's
`adapter_config.json` and its tensor names, and applies `RULES`; every trial records the outcome (`servable`,
`serving_notes` in trials.parquet, an MLflow tag, the report), `Sweep(serve_with=ENGINE)` keeps the frontier to
adapters that engine loads, and `lora-search validate` warns when part or all of the space cannot give it one
(`space_warning`).

Each rule names its engine and the source it was read from, with the commit or release read; check it against the
version you serve with. Engines (`ENGINES`): vLLM (the engine the multi-LoRA serving literature and our users name
first), SGLang (release 0.5.23, python/sglang/srt/lora/), TensorRT-LLM (tensorrt_llm/lora_manager.py, the loader of
HF PEFT adapters, and its DoRA example).

Not checked (so a verdict of "servable" does not promise them):
- vLLM: that the target modules are ones vLLM supports for the architecture (it asks the model class).
- SGLang: adapters that add tokens (`added_tokens.json`, refused by `validate_new_adapter`; our trials add none);
  per-model overrides of the supported modules and their shapes (`supported_lora_modules`, `get_hidden_dim`), so
  the target rules assume the Llama family's names, as `lora_search.targets.PRESETS` does; tensor and pipeline
  parallel limits; the LoRA kernel backends' own limits.
- TensorRT-LLM: which backend (TensorRT engines or the PyTorch flow) takes which rule; the engine-build flags
  (`--lora_plugin`) and LoraConfig's `lora_target_modules`; modules_to_save beyond its tensor names; any rule of the
  C++ runtime. `export --for` writes for vLLM and SGLang only: no TensorRT-LLM serve command was read.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lora_search.variants import VARIANTS

if TYPE_CHECKING:
    from lora_search.targets import LinearLayer

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's `--max-lora-rank` choices (vllm/config/lora.py `MaxLoRARanks`, read at commit 01230b40)."""

LORA_TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")

SGLANG = "sglang 0.5.23"
SGLANG_TARGET_NAMES = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    **dict.fromkeys(("gate_proj", "up_proj"), "gate_up_proj"),
    **dict.fromkeys(("vocab_emb", "embeddings", "word_embeddings"), "embed_tokens"),
    **dict.fromkeys(("output", "unembed_tokens"), "lm_head"),
    **dict.fromkeys(("q_a_proj", "kv_a_proj_with_mqa"), "fused_qkv_a_proj_with_mqa"),
    **{name: f"indexer.{name}" for name in ("wq_b", "wk", "weights_proj")},
}
"""How SGLang renames a PEFT target module before sizing its buffers (python/sglang/srt/lora/utils.py
`get_normalized_target_modules`, sglang 0.5.23): q/k/v are stacked into one qkv_proj, gate/up into gate_up_proj."""
SGLANG_KNOWN_TARGETS = frozenset(
    ("qkv_proj", "qkvr", "o_proj", "wo_ud", "out_proj", "in_proj", "in_proj_qkvz", "up_proj", "gate_up_proj")
    + ("down_proj", "fc1_latent_proj", "fc2_latent_proj", "embed_tokens", "lm_head", "fused_qkv_a_proj_with_mqa")
    + ("q_b_proj", "kv_b_proj", "indexer.wq_b", "indexer.wk", "indexer.weights_proj")
)
"""The renamed modules SGLang's LoRA memory pool can size (utils.py `_KNOWN_LORA_TARGET_MODULES`; any other name
reaches `get_default_hidden_dim`'s NotImplementedError unless the model class sizes it), sglang 0.5.23."""

TRTLLM = "commit 007e181b"
TRTLLM_LAYER_TENSOR = re.compile(r"\.\d+\..+\.lora_(A\.weight|B\.weight|magnitude_vector)")
"""A per-layer tensor TensorRT-LLM's HF loader parses: LoRA A/B weights or DoRA magnitudes under a layer index
(tensorrt_llm/lora_manager.py `HF_LORA_PATTERN`); other keys, except lm_head and embed_tokens ones, raise
"unsupported key"."""
TRTLLM_HF_MODULES = frozenset(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "gate_up_proj", "w1", "w2", "w3")
    + ("gate",)
)
"""The HF module names TensorRT-LLM maps to its LoRA modules (lora_manager.py
`get_default_trtllm_modules_to_hf_modules`); a tensor on another module fails "is not in supported list"."""


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
class Engine:
    """How an engine serves an adapter it loads."""

    name: str
    max_rank: Callable[[int], int]
    """The max-LoRA-rank setting that serves an adapter of rank r."""
    flags: str
    """What serving a loadable adapter needs, `{rank}` being `max_rank(r)` (the `servable` notes)."""
    serve_adapter: str | None = None
    """The command serving an exported adapter ({base}, {rank}, {name}, {path}); None: `export --for` does not write
    for this engine."""
    serve_model: str | None = None
    """The command serving an exported merged model ({path})."""


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that serves `rank` (zero-padding a rank up is exact)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), math.inf)  # type: ignore[return-value]


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine(
            "vllm",
            max_lora_rank,
            "--enable-lora --max-lora-rank {rank}",
            "vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules {name}={path}",
            "vllm serve {path}",
        ),
        Engine(
            "sglang",
            lambda r: r,  # any int (python/sglang/srt/arg_groups/fields/lora.py max_lora_rank), default: the largest r
            "--enable-lora --max-lora-rank {rank}",
            "python -m sglang.launch_server --model-path {base} --enable-lora --max-lora-rank {rank} "
            "--lora-paths {name}={path}",
            "python -m sglang.launch_server --model-path {path}",
        ),
        Engine("tensorrt-llm", lambda r: r, "max_lora_rank >= {rank} (tensorrt_llm LoraConfig; its default is 64)"),
    )
}
EXPORTABLE = tuple(name for name, e in ENGINES.items() if e.serve_adapter)
"""The engines `lora-search export --for` writes for."""


@dataclass(frozen=True)
class Rule:
    engine: str
    says: str
    """Why the engine refuses (or mis-serves) an adapter that breaks the rule."""
    source: str
    """Where in the engine's source the rule was read, with the commit or release."""
    broken: Callable[[Adapter], bool]


def _unsupported_tensors(a: Adapter) -> bool:
    return any(not name.endswith(LORA_TENSOR_SUFFIXES) for name in a.tensors)


def _leaf_targets(a: Adapter) -> set[str]:
    targets = a.config.get("target_modules") or []
    return set() if isinstance(targets, str) else {str(t).rsplit(".", 1)[-1] for t in targets}


def _sglang_unknown_targets(a: Adapter) -> bool:
    return any(SGLANG_TARGET_NAMES.get(t, t) not in SGLANG_KNOWN_TARGETS for t in _leaf_targets(a))


def _sglang_stacking_broken(a: Adapter) -> bool:
    t = _leaf_targets(a)
    qkv = ("q_proj" in t) != ("v_proj" in t) or ("k_proj" in t and "q_proj" not in t)
    return qkv or ("up_proj" in t and "gate_proj" not in t)


def _trtllm_unsupported_key(a: Adapter) -> bool:
    return any(not TRTLLM_LAYER_TENSOR.search(n) and "lm_head" not in n and "embed_tokens" not in n for n in a.tensors)


def _trtllm_unknown_module(a: Adapter) -> bool:
    parsed = [n.split(".lora_")[0].rsplit(".", 1)[-1] for n in a.tensors if TRTLLM_LAYER_TENSOR.search(n)]
    return any(m not in TRTLLM_HF_MODULES for m in parsed)


RULES: tuple[Rule, ...] = (
    # vLLM
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
    # SGLang
    Rule(
        "sglang",
        "not a LoRA adapter: SGLang asserts peft_type 'lora'",
        f"python/sglang/srt/lora/lora.py LoRAAdapter.__init__, {SGLANG}",
        lambda a: str(a.config.get("peft_type", "LORA")).lower() != "lora",
    ),
    Rule(
        "sglang",
        "DoRA adapters are refused ('LoRA serving currently doesn't support DoRA adapters')",
        f"python/sglang/srt/lora/lora_manager.py validate_new_adapter, {SGLANG}",
        lambda a: bool(a.config.get("use_dora")),
    ),
    Rule(
        "sglang",
        "use_rslora is not read: SGLang scales by lora_alpha / r, so an rsLoRA adapter is served at 1/sqrt(r) of "
        "its trained scale",
        f"python/sglang/srt/lora/lora.py LoRAAdapter.__init__ (scaling), lora_config.py LoRAConfig, {SGLANG}",
        lambda a: bool(a.config.get("use_rslora")),
    ),
    Rule(
        "sglang",
        "rank_pattern / alpha_pattern are not read: per-module ranks or scales would be served with the global ones",
        f"python/sglang/srt/lora/lora_config.py LoRAConfig (reads target_modules, r, lora_alpha, use_dora), {SGLANG}",
        lambda a: bool(a.config.get("rank_pattern")) or bool(a.config.get("alpha_pattern")),
    ),
    Rule(
        "sglang",
        "modules_to_save is not read: the fully trained modules are not served as trained",
        f"python/sglang/srt/lora/lora_config.py LoRAConfig, {SGLANG}",
        lambda a: bool(a.config.get("modules_to_save")),
    ),
    Rule(
        "sglang",
        "tensors other than lora_A/lora_B (a bias, a saved module) are loaded into the lora_B buffer",
        f"python/sglang/srt/lora/mem_pool.py load_lora_weight_to_buffer (no 'lora_A' in the name: B), {SGLANG}",
        _unsupported_tensors,
    ),
    Rule(
        "sglang",
        "target_modules as a string other than 'all' / 'all-linear' is refused",
        f"python/sglang/srt/lora/utils.py get_normalized_target_modules, {SGLANG}",
        lambda a: (
            isinstance(a.config.get("target_modules"), str) and a.config["target_modules"] not in ("all", "all-linear")
        ),
    ),
    Rule(
        "sglang",
        "a target module SGLang's LoRA buffers do not know (they know q/k/v/o, gate/up/down, embed_tokens, lm_head "
        "and a few MLA / MoE names)",
        f"python/sglang/srt/lora/utils.py _KNOWN_LORA_TARGET_MODULES, get_default_hidden_dim, {SGLANG}",
        _sglang_unknown_targets,
    ),
    Rule(
        "sglang",
        "q/k/v are stacked into qkv_proj from q_proj, zero-filling only k_proj, and up_proj into gate_up_proj from "
        "gate_proj: q_proj needs v_proj (and k_proj or v_proj needs q_proj), up_proj needs gate_proj",
        f"python/sglang/srt/lora/lora.py normalize_qkv_proj, normalize_gate_up_proj, {SGLANG}",
        _sglang_stacking_broken,
    ),
    # TensorRT-LLM
    Rule(
        "tensorrt-llm",
        "tensors other than lora_A/lora_B weights and DoRA magnitudes under a layer (VeRA's vectors, AdaLoRA's, a "
        "bias) are an 'unsupported key'",
        f"tensorrt_llm/lora_manager.py iterate_hf_lora (HF_LORA_PATTERN), {TRTLLM}",
        _trtllm_unsupported_key,
    ),
    Rule(
        "tensorrt-llm",
        "a LoRA module outside q/k/v/o, gate/up/down (and MoE w1/w2/w3, gate) is 'not in supported list'",
        f"tensorrt_llm/lora_manager.py iterate_hf_lora, get_default_trtllm_modules_to_hf_modules, {TRTLLM}",
        _trtllm_unknown_module,
    ),
    Rule(
        "tensorrt-llm",
        "a LoRA on lm_head or embed_tokens is skipped by the loader (dropped)",
        f"tensorrt_llm/lora_manager.py iterate_hf_lora, {TRTLLM}",
        lambda a: any(".lora_" in n and ("lm_head" in n or "embed_tokens" in n) for n in a.tensors),
    ),
    Rule(
        "tensorrt-llm",
        "alpha_pattern is not read: every module is scaled by the global lora_alpha / its rank",
        f"tensorrt_llm/lora_manager.py LoraManager.load_from_hf (scale), {TRTLLM}",
        lambda a: bool(a.config.get("alpha_pattern")),
    ),
    Rule(
        "tensorrt-llm",
        "DoRA as PEFT saves it is served wrong: the magnitudes must first be normalised against the base "
        "(normalize_weights.py) and the engine built with --dora_plugin=enable, else they are ignored",
        "examples/dora/README.md, commit 2a9abd95",
        lambda a: bool(a.config.get("use_dora")),
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


def broken(adapter: Adapter, engine: str) -> list[Rule]:
    """The rules of `engine` the adapter breaks."""
    return [r for r in RULES if r.engine == engine and r.broken(adapter)]


def verdict(adapter: Adapter) -> Verdict:
    notes, ok = [], []
    for engine in ENGINES:
        rules = broken(adapter, engine)
        notes += [f"{engine}: {r.says} [{r.source}]" for r in rules]
        if not rules:
            ok.append(engine)
    for engine in ok:
        e = ENGINES[engine]
        notes.append(f"{engine}: serve with {e.flags.format(rank=e.max_rank(int(adapter.config['r'])))}")
    return Verdict(servable=tuple(ok), notes=tuple(notes))


def check(adapter_dir: str | Path) -> Verdict:
    """The verdict on a saved adapter dir; one that cannot be read is servable by no engine, and says why."""
    try:
        return verdict(Adapter.read(adapter_dir))
    except (OSError, ValueError, KeyError) as e:
        return Verdict(servable=(), notes=(f"unreadable adapter ({type(e).__name__}: {str(e)[:200]})",))


# --- plan time: what a variant will save, without training it -------------------------------------------------------

PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "vera": "VERA", "adalora": "ADALORA"}
"""The peft_type each `variants.Variant.kind` saves."""
KIND_TENSORS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "vera": ("vera_lambda_b", "vera_lambda_d"),
    "adalora": ("lora_A", "lora_B", "lora_E"),
}
"""The tensors each kind saves per targeted module (PEFT 0.21; tests/test_serving.py compares with real saves)."""
SAVED_FLAGS = {"rslora": {"use_rslora": True}}
"""Config keys a variant saves beyond its kind's (`variants.VARIANTS` builds them with PEFT, which plan time does
not import; tests/test_serving.py checks each variant's sketch against its real saved adapter)."""
SKETCH_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def sketch(variant: str, rank: int, target_modules: tuple[str, ...] = SKETCH_TARGETS) -> Adapter:
    """The adapter `variant` saves at `rank` on these modules, as the rules read it (PiSSA's converted rank doubles),
    built without PEFT or a model."""
    v = VARIANTS[variant]
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[v.kind],
        "r": 2 * rank if v.converts_on_save else rank,
        "target_modules": list(target_modules),
        "use_dora": v.kind == "dora",
        "rank_pattern": {f"model.layers.0.{m}.lora_E": [True] * rank for m in target_modules}
        if v.kind == "adalora"
        else {},
        "bias": "none",
        **SAVED_FLAGS.get(variant, {}),
    }
    names = tuple(f"base_model.model.model.layers.0.{m}.{t}" for m in target_modules for t in KIND_TENSORS[v.kind])
    return Adapter(config=config, tensors=names)


def can_serve(variants: tuple[str, ...], engine: str) -> tuple[str, ...]:
    """The variants in `variants` whose adapters `engine` can load as saved, on rules that depend on the variant
    alone (a sketch at rank 8 on q/k/v/o); unknown names are not among them."""
    return tuple(v for v in variants if v in VARIANTS and not broken(sketch(v, 8), engine))


VARIANTS_SAVED_AS_LORA = frozenset(name for name, v in VARIANTS.items() if v.kind == "lora")
"""Variants whose saved adapter is plain LoRA tensors (`variants.Variant.kind`; PiSSA converted on save, QLoRA and
LoftQ the same LoRA tensors trained against NF4 weights). Which engines load each: `can_serve`."""


class Planned(Protocol):
    """What `space_warning` reads of a `config.Sweep` (a Protocol: config imports this module)."""

    serve_with: str
    space: Any
    base: Any

    def conforms(self, *names: str) -> bool: ...


def space_warning(sweep: Planned, layers_of: Callable[[Any], list[LinearLayer]]) -> str | None:
    """What of the sweep's space saves adapters `sweep.serve_with` will not load as saved, or None: each variant, rank
    and target set whose every trial breaks a rule it is to blame for, with the rules, and whether that is the whole
    space (the frontier would be empty). A value is to blame for a broken rule when putting the reference value in
    its place (lora, r=8, q/k/v/o) mends it: PiSSA at r=320 blames both (either change serves). `layers_of(base)`
    resolves "all-linear"."""
    from lora_search import targets

    engine = sweep.serve_with
    if engine == "any" or not sweep.conforms("space", "serve_with"):
        return None
    space = sweep.space
    layers: list[LinearLayer] = []
    if any(targets.PRESETS.get(t, ()) is None for t in space.targets if isinstance(t, str)):
        try:
            layers = layers_of(sweep.base)
        except Exception:  # an unreadable base is validate's error, not this warning's
            layers = []
    # an unread all-linear is judged as q/k/v/o, which every engine takes: its variants and ranks are still judged
    resolved = {targets.target_key(t): targets.resolve(t, layers) or SKETCH_TARGETS for t in space.targets}
    combos = [(v, r, t) for v in space.variants if v in VARIANTS for r in space.ranks for t in resolved]

    def refusals(v: str, r: int, modules: tuple[str, ...]) -> list[str]:
        return [rule.says for rule in broken(sketch(v, r, modules), engine)]

    refused = {(v, r, t): refusals(v, r, resolved[t]) for v, r, t in combos}
    reference = ("lora", 8, SKETCH_TARGETS)
    blamed: dict[tuple[int, object], dict[str, None]] = {}
    for combo, says in refused.items():
        for i in range(3):
            swapped = [combo[0], combo[1], resolved[combo[2]]]
            swapped[i] = reference[i]
            mended = set(says) - set(refusals(*swapped))  # type: ignore[arg-type]
            blamed.setdefault((i, combo[i]), {}).update(dict.fromkeys(s for s in says if s in mended))
    labels = ("variants", "ranks", "targets")
    never = [
        f"{labels[i]} {value}: {'; '.join(why)}"
        for (i, value), why in sorted(blamed.items(), key=lambda item: item[0][0])  # variants, ranks, targets
        if why and all(refused[c] for c in combos if c[i] == value)
    ]
    everything = all(refused.values())
    if everything and not never:
        never = [f"{v}, r={r}, {t}: {'; '.join(refused[(v, r, t)])}" for v, r, t in combos[:5]]
    if not never:
        return None
    head = (
        f"serve_with={engine!r}: every adapter this space can produce is one {engine} will not load as saved, so the "
        "frontier would be empty"
        if everything
        else f"serve_with={engine!r}: part of this space saves adapters {engine} will not load as saved; those trials "
        "cannot reach the frontier"
    )
    return f"{head} (rules and sources: lora_search/serving.py RULES): " + " | ".join(never)


def warn_unservable(sweep: Planned, layers_of: Callable[[Any], list[LinearLayer]]) -> str | None:
    """Print `space_warning` to stderr as a warning (validate goes on); return it."""
    warning = space_warning(sweep, layers_of)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return warning
