"""lora_search: find the right LoRA configuration for a model and a task.

from lora_search import Sweep, BaseModel, Dataset, SearchSpace, Budget, Resources, run
"""

from lora_search.config import (
    BaseModel,
    Budget,
    ConfigError,
    Dataset,
    Problem,
    Resources,
    SearchSpace,
    Sweep,
)
from lora_search.evals import Evals

__all__ = [
    "BaseModel",
    "Budget",
    "ConfigError",
    "Dataset",
    "Evals",
    "Problem",
    "Resources",
    "SearchSpace",
    "Sweep",
    "run",
    "main",
]


def run(sweep: Sweep, **kwargs):  # noqa: ANN201 - re-export with a lazy import: Ray loads only when a sweep runs
    """Run `sweep` (see lora_search.sweep.run). A sweep file ends with `main(SWEEP)` instead to get the CLI flags."""
    from lora_search.sweep import run as _run

    return _run(sweep, **kwargs)


def main(sweep: Sweep) -> None:
    """Entry point for `python sweeps/NAME.py [--validate|--fresh]`; same behaviour as `lora-search run`."""
    from lora_search.cli import run_sweep_main

    run_sweep_main(sweep)
