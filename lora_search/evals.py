"""Golden-set scoring of adapters with lm-evaluation-harness.

Golden sets are lm-eval tasks: YAML under `evals/tasks/`, data under `evals/golden/`. Relative `data_files`
in a task YAML are relative to the project root (the folder holding `evals/`), as when running the lm-eval
CLI from there: `lm_eval --include_path evals/tasks --tasks tiny_mood ...`.

    lora-search eval sweeps/tiny.py                      # rescore every saved adapter of the sweep
    lora-search eval sweeps/tiny.py --adapters DIR [DIR] # or these adapter dirs, on the sweep's base

Scores come from `lm_eval.simple_evaluate` over an in-memory `HFLM`: a trial scores its live PEFT model
(no reload), and rescoring loads the base once and swaps adapters. Before any score, `check_applied` makes
sure the adapter changes the model's outputs: a zero or wrongly loaded adapter never produces a score.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_search.config import Problem

if TYPE_CHECKING:
    import torch

APPLIED_ATOL = 1e-6
"""Max |logit difference| between adapter on and off below which the adapter counts as not applied."""


class AdapterNotAppliedError(RuntimeError):
    """The adapter leaves the model's outputs unchanged (all-zero, or loaded onto nothing)."""


@dataclass(frozen=True)
class Evals:
    """Which golden sets score each completed trial, and the primary objective among their metrics."""

    tasks: tuple[str, ...]
    """lm-eval task names defined by YAML files in `tasks_dir`."""
    objective: str
    """`task/metric`, e.g. `tiny_mood/acc`; its direction is lm-eval's `higher_is_better` for that metric."""
    tasks_dir: str = "evals/tasks"
    batch_size: int = 16
    limit: int | None = None
    """Score only the first N examples of each task (a quick look; the full set is the real score)."""

    def problems(self) -> list[Problem]:
        out = []
        if not self.tasks:
            out.append(Problem("evals.tasks", self.tasks, "is empty", "name at least one lm-eval task"))
        task, _, metric = self.objective.partition("/")
        if not metric or task not in self.tasks:
            out.append(
                Problem("evals.objective", self.objective, "must be 'task/metric' with task in evals.tasks",
                        f"e.g. '{self.tasks[0] if self.tasks else 'my_task'}/acc'")
            )
        return out


def project_root(evals: Evals) -> Path:
    return Path(evals.tasks_dir).resolve().parent.parent


def task_configs(evals: Evals) -> list[dict[str, Any]]:
    """The named tasks' YAML configs with relative data files made absolute (workers may run anywhere)."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(Path(evals.tasks_dir).glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and "task" in config:
            found[str(config["task"])] = (path, config)
    missing = [t for t in evals.tasks if t not in found]
    if missing:
        raise FileNotFoundError(f"no task YAML in {evals.tasks_dir} defines {', '.join(missing)}")
    root = project_root(evals)
    out = []
    for name in evals.tasks:
        config = copy.deepcopy(found[name][1])
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, value in list(files.items()):
            files[split] = str(root / value) if not Path(value).is_absolute() else value
        out.append(config)
    return out


def task_versions(evals: Evals) -> dict[str, Any]:
    return {c["task"]: c.get("metadata", {}).get("version") for c in task_configs(evals)}


def check_applied(model: Any, input_ids: torch.Tensor) -> float:
    """Max |logits(adapter on) - logits(adapter off)| on a probe batch; raises AdapterNotAppliedError if ~0."""
    import torch

    was_training = model.training
    model.eval()
    ids = input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        on = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            off = model(input_ids=ids).logits.float()
    model.train(was_training)
    diff = float((on - off).abs().max())
    if not diff > APPLIED_ATOL:
        raise AdapterNotAppliedError(
            f"the adapter does not change the model's outputs (max |logit diff| = {diff:.2e} on the probe batch): "
            "it is all-zero or was not loaded onto the model's layers; refusing to score it as if it were trained"
        )
    return diff


def score(model: Any, tokenizer: Any, evals: Evals, seed: int) -> dict[str, Any]:
    """Score an in-memory model on the golden sets. Returns flat metrics (`task/metric`, `task/metric_stderr`),
    the objective's value and direction, and lm-eval's own results JSON (`results`)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=evals.batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_configs(evals),
        task_manager=TaskManager(include_defaults=False),
        limit=evals.limit,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    return flatten(output, evals)


def flatten(output: dict[str, Any], evals: Evals) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or key == "alias":
                continue
            metric, _, filter_name = key.partition(",")
            metrics[f"{task}/{metric}"] = float(value)
    task, _, metric = evals.objective.partition("/")
    higher = output.get("higher_is_better", {}).get(task, {}).get(metric, True)
    objective = metrics.get(evals.objective, math.nan)
    return {
        "metrics": metrics,
        "objective": objective,
        "higher_is_better": bool(higher),
        "results": json.loads(json.dumps(output, default=str)),
    }
