"""Which linear layers get adapters: the target-module presets and their check against a real model.

PEFT matches `target_modules` by name suffix and silently skips names that match nothing, so a partly
wrong list trains a smaller adapter than asked. `resolve` turns a preset or list into the exact module
names of one model and reports every name that matches nothing, and every rank too large for a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_search.problems import Problem

if TYPE_CHECKING:
    import torch

Targets = str | tuple[str, ...]
"""A preset name or module names, as `SearchSpace.targets` holds them (lora_search.config checks them)."""

PRESETS: dict[str, tuple[str, ...] | None] = {
    "attention": ("q_proj", "v_proj"),
    "attention-all": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": None,  # every nn.Linear in the decoder, as PEFT's "all-linear" (the output head excluded)
}
"""Names follow the Llama family (Llama, Mistral, Qwen2, Gemma); other architectures take explicit tuples."""


def target_key(targets: Targets) -> str:
    """A stable string for a targets value, used as the Tune param (`attention`, `q_proj+v_proj`)."""
    return targets if isinstance(targets, str) else "+".join(targets)


def targets_from_key(key: str) -> Targets:
    return key if key in PRESETS else tuple(key.split("+"))


@dataclass(frozen=True)
class LinearLayer:
    name: str
    in_features: int
    out_features: int


def linear_layers(model: torch.nn.Module) -> list[LinearLayer]:
    """Every nn.Linear of the decoder (not the output embedding), with its shape."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        LinearLayer(name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]


def resolve(targets: Targets, layers: list[LinearLayer]) -> tuple[str, ...]:
    """The suffixes PEFT should target for `targets` on a model with these layers (no checks)."""
    names = PRESETS.get(targets) if isinstance(targets, str) else targets
    if names is None:  # all-linear
        return tuple(sorted({layer.name.rsplit(".", 1)[-1] for layer in layers}))
    return tuple(names)


def check(targets: Targets, ranks: tuple[int, ...], layers: list[LinearLayer], field: str) -> list[Problem]:
    """Problems with `targets` on this model: names that match no layer, ranks above min(in, out)."""
    suffixes = {layer.name.rsplit(".", 1)[-1] for layer in layers}
    wanted = resolve(targets, layers)
    problems = []
    missing = [n for n in wanted if n not in suffixes]
    if missing:
        partly = len(missing) < len(wanted)
        problems.append(
            Problem(
                field,
                targets,
                f"module(s) {', '.join(missing)} not in the model"
                + (" (PEFT would silently train only the rest)" if partly else ""),
                f"the model's linear modules are: {', '.join(sorted(suffixes))}",
            )
        )
    matched = [layer for layer in layers if layer.name.rsplit(".", 1)[-1] in wanted]
    if matched:
        smallest = min(matched, key=lambda layer: min(layer.in_features, layer.out_features))
        limit = min(smallest.in_features, smallest.out_features)
        for r in ranks:
            if r > limit:
                problems.append(
                    Problem(
                        "space.ranks",
                        r,
                        f"exceeds min(in, out) = {limit} of targeted layer {smallest.name} "
                        f"({smallest.in_features}x{smallest.out_features}) for targets {target_key(targets)!r}",
                        f"use ranks <= {limit}",
                    )
                )
    return problems
