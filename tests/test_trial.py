"""One Tune trial (lora_search/trial.py) without a Ray cluster: which sweeps train warm, what a trial reserves and how
often it is retried, the config a trial hands its training, a warm trial's error kept for Tune's retry, a broken
snapshot cleared, and which Ray Train failures count as lost workers.

Run: python -m pytest tests/test_trial.py   (CPU, seconds: `run_trial` runs with Tune's trial context stubbed and
the training replaced; the whole path runs in every sweep test)
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_search import layout, trial
from lora_search.config import BaseModel, Dataset, Resources, SearchSpace, Sweep

CONFIG = {"variant": "lora", "rank": 4, "alpha_over_rank": 2.0, "targets": "attention", "lr": 1e-3, "dropout": 0.0}


def _sweep(**resources: Any) -> Sweep:
    return Sweep(
        name="t",
        base=BaseModel("m"),
        dataset=Dataset("d.jsonl"),
        space=SearchSpace(ranks=(4,), variants=("lora", "dora")),
        resources=Resources(**resources),
    )


def test_which_sweeps_train_warm() -> None:
    assert trial.warm(_sweep())  # the default: one DDP worker
    assert not trial.warm(_sweep(reuse_workers=False))
    assert not trial.warm(_sweep(workers=2))
    assert not trial.warm(_sweep(strategy="deepspeed-zero3"))
    assert not trial.warm(_sweep(strategy_by_variant={"dora": "deepspeed-zero3"}))  # every variant must be DDP


def test_what_a_trial_reserves_and_how_often_tune_retries_it() -> None:
    warm = _sweep(cpus_per_worker=2.0)
    assert trial.trial_resources(warm) == {"CPU": 2.0} and trial.max_failures(warm) == trial.WORKER_LOSSES
    assert trial.trial_resources(_sweep(gpus_per_worker=0.5)) == {"CPU": 1.0, "GPU": 0.5}
    cold = _sweep(workers=2, gpus_per_worker=1.0)
    # the trial process only waits on its worker group: no CPU, and it retries lost workers itself
    assert trial.trial_resources(cold) == trial.DRIVER_RESOURCES and trial.max_failures(cold) == 0


def test_scaling_config_sizes_the_worker_group() -> None:
    config = trial.scaling_config(_sweep(workers=2, cpus_per_worker=3.0, gpus_per_worker=1.0, placement="SPREAD"))
    assert (config.num_workers, config.use_gpu, config.placement_strategy) == (2, True, "SPREAD")
    assert config.resources_per_worker == {"CPU": 3.0, "GPU": 1.0}
    assert trial.scaling_config(_sweep()).resources_per_worker == {"CPU": 1.0}


class _Context:
    def get_trial_id(self) -> str:
        return "abc_00001"


@pytest.fixture
def tune_trial(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """`run_trial` as Tune would call it in a trial process, its training replaced: the configs training got."""
    import ray.tune

    monkeypatch.setattr(ray.tune, "get_context", lambda: _Context())
    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "2")  # a warm trial sets it; restored after the test
    logger = logging.getLogger("lora_search")
    handlers, level = list(logger.handlers), logger.level
    trained: list[dict[str, Any]] = []
    monkeypatch.setattr(trial, "_train_worker", trained.append)
    yield trained
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_a_warm_trial_trains_its_typed_params_in_its_own_process(tune_trial: list, tmp_path: Path) -> None:
    sweep = _sweep()
    trial.run_trial(dict(CONFIG), sweep, str(tmp_path))
    (config,) = tune_trial
    assert config["warm"] is True and config["sweep"] == sweep
    assert {k: config[k] for k in ("variant", "rank", "alpha", "targets", "lr", "dropout")} == {
        "variant": "lora",
        "rank": 4,
        "alpha": 8.0,  # from alpha_over_rank
        "targets": "attention",
        "lr": 1e-3,
        "dropout": 0.0,
    }
    assert config["run_dir"] == str(layout.run_dir(tmp_path, "abc_00001"))
    assert config["progress_file"] == str(layout.progress_file(tmp_path, "abc_00001"))
    assert isinstance(config["tune_run"], str) and config["tune_run_start"] > 0


def test_a_warm_trial_that_raised_raises_again_on_tunes_retry(
    tune_trial: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverges(config: dict[str, Any]) -> None:
        raise ValueError("eval_loss=nan at step 5")

    monkeypatch.setattr(trial, "_train_worker", diverges)
    with pytest.raises(ValueError, match="eval_loss=nan"):
        trial.run_trial(dict(CONFIG), _sweep(), str(tmp_path))
    assert (layout.run_dir(tmp_path, "abc_00001") / layout.FAILED_FILE).is_file()
    monkeypatch.setattr(trial, "_train_worker", tune_trial.append)  # a retry would train fine: it must not
    with pytest.raises(ValueError, match="eval_loss=nan"):
        trial.run_trial(dict(CONFIG), _sweep(), str(tmp_path))
    assert tune_trial == []


def test_an_error_that_does_not_pickle_is_kept_as_its_text(
    tune_trial: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Local(RuntimeError):  # defined in a function: pickle cannot find it
        pass

    def fails(config: dict[str, Any]) -> None:
        raise Local("out of luck")

    monkeypatch.setattr(trial, "_train_worker", fails)
    with pytest.raises(Local):
        trial.run_trial(dict(CONFIG), _sweep(), str(tmp_path))
    kept = pickle.loads((layout.run_dir(tmp_path, "abc_00001") / layout.FAILED_FILE).read_bytes())
    assert type(kept) is RuntimeError and str(kept) == "Local: out of luck"


def test_a_broken_snapshot_is_cleared_before_the_trial_resumes(tune_trial: list, tmp_path: Path) -> None:
    run_dir = layout.run_dir(tmp_path, "abc_00001")
    run_dir.mkdir(parents=True)
    (run_dir / layout.SNAPSHOT_FILE).write_text('{"checkpoint_results": [')  # the driver died mid-write
    trial.run_trial(dict(CONFIG), _sweep(), str(tmp_path))
    assert not (run_dir / layout.SNAPSHOT_FILE).exists() and len(tune_trial) == 1


def test_lost_workers_are_deaths_not_training_errors() -> None:
    from ray.exceptions import NodeDiedError, RayActorError
    from ray.train import ControllerError, WorkerGroupError

    assert trial.lost_workers(WorkerGroupError("lost", {0: RayActorError(), 1: NodeDiedError("node gone")}))
    assert not trial.lost_workers(WorkerGroupError("mixed", {0: RayActorError(), 1: ValueError("bad data")}))
    assert not trial.lost_workers(WorkerGroupError("none", {}))
    assert trial.lost_workers(ControllerError(NodeDiedError("node gone")))
    assert not trial.lost_workers(ControllerError(ValueError("bad config")))
    assert not trial.lost_workers(ValueError("eval_loss=nan at step 5"))


def test_the_config_a_trial_hands_on_round_trips_through_trial_params(tune_trial: list, tmp_path: Path) -> None:
    from lora_search.records import TrialParams

    trial.run_trial({**CONFIG, "alpha": 3.0}, _sweep(), str(tmp_path))
    (config,) = tune_trial
    params = TrialParams.from_config(config)
    assert params == dataclasses.replace(TrialParams.from_config(CONFIG), alpha=3.0)  # an absolute alpha wins
