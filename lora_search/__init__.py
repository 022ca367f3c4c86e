"""lora_search: find the right LoRA configuration for a model and a task.

from lora_search import Sweep, BaseModel, Dataset, SearchSpace, Budget, Resources, run

Everything a sweep file needs comes from here: the config classes, `main` (a sweep file's command line), `run`,
and `build_tiny_base` (the demo's own base model, lora_search.demo_base).
"""

from pathlib import Path

from lora_search.config import (
    BaseModel,
    Budget,
    ConfigError,
    Dataset,
    Evals,
    Pricing,
    Problem,
    Resources,
    SearchSpace,
    Sweep,
)
from lora_search.demo_base import build_tiny_base

__all__ = [
    "BaseModel",
    "Budget",
    "ConfigError",
    "Dataset",
    "Evals",
    "Pricing",
    "Problem",
    "Resources",
    "SearchSpace",
    "Sweep",
    "build_tiny_base",
    "run",
    "main",
]


def run(sweep: Sweep, **kwargs):  # re-export with a lazy import: Ray loads only when a sweep runs
    """Run `sweep` (see lora_search.sweep.run). A sweep file ends with `main(SWEEP)` instead to get the CLI flags."""
    from lora_search.sweep import run as _run

    return _run(sweep, **kwargs)


def main(sweep: Sweep, *, config_dir: str | Path | None = None) -> None:
    """Entry point for `python sweeps/NAME.py [--validate|--fresh|--dry-run]`; same behaviour as `lora-search run`.

    `config_dir`: a dir with the base's config.json that `--dry-run` plans from, so that a hub id plans offline."""
    from lora_search.cli import run_sweep_main

    run_sweep_main(sweep, config_dir=config_dir)
