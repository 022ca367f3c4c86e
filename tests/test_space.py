"""Search space, ASHA rungs and concurrency: pure functions, no cluster."""

from __future__ import annotations

import pytest

from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep, space
from lora_search.records import trial_params
from lora_search.sweep import trials_at_once, tune_concurrency


def _sweep(**changes) -> Sweep:
    base = Sweep(
        name="s",
        base=BaseModel("m"),
        dataset=Dataset("d.jsonl"),
        space=SearchSpace(
            ranks=(4, 8), targets=("attention", ("q_proj", "down_proj")), variants=("lora", "dora"), lr=(1e-4, 1e-2)
        ),
    )
    return base.replace(**changes)


def test_lr_grid_is_geometric_and_inclusive() -> None:
    grid = space.lr_grid(1e-4, 1e-2, 3)
    assert grid == pytest.approx([1e-4, 1e-3, 1e-2])
    assert space.lr_grid(1e-4, 1e-2, 1) == pytest.approx([1e-3])


def test_param_space_random_and_grid() -> None:
    from ray.tune.search.sample import Categorical, Float

    random_space = space.param_space(_sweep())
    assert isinstance(random_space["variant"], Categorical) and isinstance(random_space["lr"], Float)
    assert random_space["targets"].categories == ["attention", "q_proj+down_proj"]
    grid = space.param_space(_sweep(search="grid"))
    assert grid["rank"] == {"grid_search": [4, 8]}
    assert grid["lr"]["grid_search"] == pytest.approx([1e-4, 1e-3, 1e-2])


def test_alpha_resolves_from_ratio_or_absolute() -> None:
    assert (
        trial_params(
            {"variant": "lora", "rank": 8, "alpha_over_rank": 2.0, "targets": "mlp", "lr": 1e-3, "dropout": 0.0}
        )["alpha"]
        == 16.0
    )
    assert (
        trial_params({"variant": "lora", "rank": 8, "alpha": 4.0, "targets": "mlp", "lr": 1e-3, "dropout": 0.0})[
            "alpha"
        ]
        == 4.0
    )


@pytest.mark.parametrize(("max_steps", "grace", "factor"), [(200, 50, 3), (150, 50, 3), (20, 5, 2), (100, 10, 4)])
def test_rungs_match_ray_asha_milestones(max_steps: int, grace: int, factor: int) -> None:
    """Ray's ASHA with the sweep's budget, and both of the sweep's schedulers (ASHA, Pareto ASHA), decide at the
    steps `space.rungs` names."""
    from ray.tune.schedulers import ASHAScheduler

    budget = Budget(max_steps=max_steps, eval_every=grace, grace_period=grace, reduction_factor=factor)
    sweep = _sweep(budget=budget, scheduler="asha")
    ray_asha = ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=grace, reduction_factor=factor)
    assert space.rungs(sweep) == sorted(int(m) for m, _ in ray_asha._brackets[0]._rungs)
    for name in ("asha", "pareto-asha"):
        assert space.rungs(sweep) == sorted(space.scheduler(_sweep(budget=budget, scheduler=name)).rungs.milestones)


def test_search_algorithms() -> None:
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(space.search_algorithm(_sweep(), 2), BasicVariantGenerator)
    assert isinstance(space.search_algorithm(_sweep(search="optuna"), 2), OptunaSearch)


def test_concurrent_trials_fit_the_cluster() -> None:
    assert trials_at_once(_sweep(), {"CPU": 2.0}) == 2
    assert trials_at_once(_sweep(resources=Resources(workers=2, cpus_per_worker=1)), {"CPU": 2.0}) == 1
    gpu = _sweep(resources=Resources(workers=2, cpus_per_worker=4, gpus_per_worker=1))
    assert trials_at_once(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert trials_at_once(_sweep(max_concurrent_trials=3), {"CPU": 64.0}) == 3
    assert trials_at_once(_sweep(), {"CPU": 0.5}) == 1  # never 0: Tune would queue the trials forever


def test_a_packed_sweep_runs_pack_trials_on_each_placeable_host() -> None:
    """Packed: `pack` trials per host, the hosts capped by devices and by CPUs (`pack_host.hosts`); a sweep's own
    max_concurrent_trials wins; packing off leaves `trials_at_once`."""
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    quarter = _sweep(resources=Resources(cpus_per_worker=2, gpus_per_worker=0.25, pack=4))
    assert tune_concurrency(quarter, one_gpu) == 16  # 4 hosts of 2.4 CPUs on 16 CPUs, 4 trials each
    assert tune_concurrency(quarter, {**one_gpu, "CPU": 5.0}) == 8  # CPUs place 2 hosts only
    whole = _sweep(resources=Resources(cpus_per_worker=2, gpus_per_worker=1, pack=4))
    assert tune_concurrency(whole, one_gpu) == 4
    assert tune_concurrency(whole, {**one_gpu, "GPU": 2.0}) == 8
    assert (
        tune_concurrency(_sweep(resources=Resources(gpus_per_worker=1, pack=4), max_concurrent_trials=3), one_gpu) == 3
    )
    assert tune_concurrency(_sweep(resources=Resources(gpus_per_worker=1)), one_gpu) == 1
