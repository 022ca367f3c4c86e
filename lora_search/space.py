"""The search space as Ray Tune sees it: param_space, search algorithm and scheduler (ASHA or Pareto ASHA) for a Sweep.

Every trial's config has the same flat keys (`lora_search.records.PARAMS`: variant, rank, alpha, targets, lr,
dropout) so results, MLflow params and reports line up. Alpha is derived from rank when the space gives
`alpha_over_rank` (`records.trial_params`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lora_search.config import Sweep
from lora_search.targets import target_key


def lr_grid(low: float, high: float, points: int) -> list[float]:
    """`points` geometrically spaced learning rates from low to high (inclusive)."""
    if points == 1:
        return [math.sqrt(low * high)]
    ratio = (high / low) ** (1 / (points - 1))
    return [low * ratio**i for i in range(points)]


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Tune param_space. Grid search enumerates every combination; random/optuna sample."""
    from ray import tune

    space = sweep.space
    grid = sweep.search == "grid"
    pick = tune.grid_search if grid else tune.choice
    out: dict[str, Any] = {
        "variant": pick(list(space.variants)),
        "rank": pick(list(space.ranks)),
        "targets": pick([target_key(t) for t in space.targets]),
        "dropout": pick(list(space.dropout)),
        "lr": tune.grid_search(lr_grid(*space.lr, space.lr_grid_points)) if grid else tune.loguniform(*space.lr),
    }
    if space.alpha is not None:
        out["alpha"] = pick([float(a) for a in space.alpha])
    else:
        out["alpha_over_rank"] = pick([float(r) for r in space.alpha_over_rank])
    return out


def total_trials(sweep: Sweep) -> int:
    """How many trials the sweep runs in all: `num_samples`, times every grid combination for grid search."""
    if sweep.search != "grid":
        return sweep.num_samples
    combos = 1
    for values in param_space(sweep).values():
        combos *= len(values["grid_search"]) if isinstance(values, dict) and "grid_search" in values else 1
    return sweep.num_samples * combos


def search_algorithm(sweep: Sweep, max_concurrent: int) -> Any:
    """Tune's BasicVariantGenerator (random or grid, seeded) or Optuna's TPE through Ray's OptunaSearch.

    The trial driver reserves no CPU, so the concurrency limit is what keeps trials from starting before their
    workers can get devices: BasicVariantGenerator takes it directly; Tune wraps other searchers in a
    ConcurrencyLimiter from TuneConfig.max_concurrent_trials.
    """
    if sweep.search != "optuna":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed))


def _asha(**args: Any) -> Any:
    from lora_search.pareto_asha import ParetoASHA

    return ParetoASHA(**args, quality_only=True)  # Ray's ASHA's decisions, with a state that survives a resume


def _pareto_asha(**args: Any) -> Any:
    from lora_search.pareto_asha import ParetoASHA

    return ParetoASHA(**args)


SCHEDULERS: dict[str, Callable[..., Any]] = {"asha": _asha, "pareto-asha": _pareto_asha}
"""`Sweep.scheduler` -> a builder taking Ray ASHAScheduler's arguments (time_attr, max_t, grace_period,
reduction_factor); Tune passes the metric and mode (`TuneConfig`)."""


def scheduler(sweep: Sweep) -> Any:
    """The sweep's scheduler (`Sweep.scheduler`) with optimizer steps as its time unit: ASHA on eval loss (Ray's
    ASHA's decisions), or Pareto ASHA on eval loss, adapter bytes and cost a step (`lora_search.pareto_asha`), with the
    same rungs; both keep their state in a file for a resumed sweep (`lora_search.resume`)."""
    b = sweep.budget
    return SCHEDULERS[sweep.scheduler](
        time_attr="step", max_t=b.max_steps, grace_period=b.grace_period, reduction_factor=b.reduction_factor
    )


def rungs(sweep: Sweep) -> list[int]:
    """The steps at which ASHA compares trials: grace * factor^k up to max_steps (Ray's milestones)."""
    b = sweep.budget
    out, step = [], b.grace_period
    while step <= b.max_steps:
        out.append(step)
        step *= b.reduction_factor
    return out
