"""The house's plan (README, "Architecture"): lora_search's modules in six rooms, the import arrows between them.

Run: python -m pytest tests/test_architecture.py   (reads the source with `ast`; imports nothing of lora_search)

Every import counts, module-level, inside functions and under `TYPE_CHECKING` alike: a lazy import is still an
arrow a reader has to follow, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_search"

ROOMS = {
    "face": {"__init__", "cli"},
    "driver": {
        "sweep",
        "preflight",
        "plan",
        "pack_plan",  # the plan's packing part: how many trials a pack fits, at which measured speed-up
        "resume",
        "results",
        "replay",  # the sweep's scheduler and searcher replayed over a recorded grid: a driver with no training
    },
    "worker": {
        "trial",
        "train",
        "trainer",
        "callbacks",
        "checkpoints",
        "devices",
        "memory",
        "fastpath",
        "varlen",  # torch's varlen flash kernel as transformers' "torch_varlen" attention (padding-free)
        "compiled_layers",  # the compiled-layers piece: one torch.compile of the decoder layer, shared by every layer
        "idle",  # a profiled window's device idle gaps named by the host's ops (the trial's kernel profile)
        "fused_lora",  # fused-lora-add: a LoRA layer's forward and its one-autograd-node form (solo and packed)
        "data",
        "probe",
        "demo_base",
        "gguf",  # a GGUF base converted into the cache, as demo_base builds the demo's
        "pack",  # several trials' adapters training over one loaded base
        "pack_layers",
        "pack_graphs",  # a pack's step as one CUDA graph per layout: what it captures, when, and its fallbacks
        "pack_host",  # a sweep's packed trials: the host actor per device that holds the base and steps the pack
        "pack_trial",  # a packed trial's life in its Tune trial process: its data, its steps through its host, reports
    },
    "scoring": {"evals"},
    "outputs": {"tracking", "logged_models", "provenance", "registry", "report", "answers"},
    "core": {
        "config",
        "environment",  # the LORA_SEARCH_* switches and their readers, one table
        "problems",
        "checks",
        "userfiles",
        "space",
        "variants",
        "pareto",
        "pareto_asha",  # the Pareto ASHA scheduler, which space builds; its Ray subclass is made on first use
        "pruning",
        "grids",  # a recorded grid (tabular benchmark) as the replay reads it
        "serving",  # the serving engines' rules, which config checks serve_with against
        "nightly",
        "cost",
        "targets",
        "layout",
        "records",
        "strategies",  # the strategy table, which config checks names against; its worker code imports lazily
    },
}
"""Face -> Driver -> Worker -> Scoring; Outputs read results; Core is imported by all and imports none of them."""

FORBIDDEN = [
    ("worker", "driver"),  # the worker's names (file layout, metric keys) live low, not in the driver
    ("outputs", "worker"),  # tracking, the registry and the report read results, never the training stack
    ("core", "outputs"),
    ("core", "worker"),
    ("core", "driver"),
    ("core", "scoring"),
    ("core", "face"),
]

HEAVY = ("ray", "mlflow", "lm_eval", "transformers", "trl", "peft", "torch")
"""What a pure-core module may import inside a function only: a config, a frontier or a verdict needs none of it."""


def _room(module: str) -> str:
    return next(room for room, members in ROOMS.items() if module in members)


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imported(node: ast.AST, modules: set[str]) -> list[str]:
    """The lora_search modules an import statement names."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name.split(".")[1] for a in node.names if a.name.startswith("lora_search.")]
    elif isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level == 0 and module == "lora_search" or node.level == 1 and not module:
            names = [a.name for a in node.names]  # from lora_search import x: x may be a module
        elif node.level == 0 and module.startswith("lora_search."):
            names = [module.split(".")[1]]
        elif node.level == 1:
            names = [module.split(".")[0]]
    return [n for n in names if n in modules]


def import_graph() -> dict[str, set[str]]:
    """module -> the lora_search modules it imports anywhere in its source."""
    trees = _modules()
    return {
        name: {m for node in ast.walk(tree) for m in _imported(node, set(trees)) if m != name}
        for name, tree in trees.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_has_a_room() -> None:
    unplaced = sorted(set(_modules()) - set().union(*ROOMS.values()))
    assert not unplaced, f"add {unplaced} to ROOMS in tests/test_architecture.py (and README's map)"


def test_no_import_cycle() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_forbidden_arrow() -> None:
    found = [
        f"{a} ({_room(a)}) -> {b} ({_room(b)})"
        for a, targets in sorted(import_graph().items())
        for b in sorted(targets)
        if (_room(a), _room(b)) in FORBIDDEN
    ]
    assert not found, "arrows the house forbids:\n" + "\n".join(found)


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Top-level packages imported at module level: in the module body, outside `if TYPE_CHECKING:`."""
    out: list[str] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append(node.module.split(".")[0])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)

    walk(tree.body)
    return out


@pytest.mark.parametrize("module", sorted(ROOMS["core"]))
def test_core_imports_no_heavy_stack_at_module_level(module: str) -> None:
    heavy = sorted(set(_module_level_imports(_modules()[module])) & set(HEAVY))
    assert not heavy, f"lora_search/{module}.py imports {heavy} at module level; import them inside the function"


def test_the_checks_catch_what_they_guard() -> None:
    """The graph sees lazy imports and the cycle finder finds a cycle through one."""
    tree = ast.parse("def f():\n    from lora_search import train\n")
    assert [m for node in ast.walk(tree) for m in _imported(node, {"train"})] == ["train"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\nimport ray\n")
    assert _module_level_imports(tree) == ["typing", "ray"]
