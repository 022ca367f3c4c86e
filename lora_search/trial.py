"""One Tune trial: a Ray Train `TorchTrainer` run of `lora_search.train.train_loop`.

Tune runs `run_trial` once per sampled config. It starts a Ray Train run sized by the sweep's
`Resources` (workers x CPUs/GPUs, placement); the workers' reports reach Tune through
`TuneReportCallback`, so ASHA's decision to stop a trial stops its whole Ray Train run and frees its
devices. A failing training run raises here, which Tune records as this trial's error; the sweep goes on.

A trial that lost a worker process or a whole node trains on from its last adapter checkpoint: the same Ray Train
run is fitted again (Ray restores its checkpoints; lora_search.resume), up to `WORKER_LOSSES` times. Errors of
the training itself (failed, diverged, infeasible) are not retried: they would fail again the same way.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from lora_search.config import Sweep

DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}
"""The Tune trial process only waits on its Ray Train run: it reserves the memory it uses (a Python process
with torch imported, ~256 MiB) and no CPU, so a 2-CPU laptop runs two 1-CPU trials at once, not one. It runs on
the head node (Ray's own head resource; 0.001 of it: up to 1000 trials at once), where the Tune driver runs, and
so does the Ray Train controller it starts: losing a worker node never takes a trial's bookkeeping with it."""

WORKER_LOSSES = 3
"""Times one trial may lose a worker process or node and still train on from its last checkpoint."""

KEEP_CHECKPOINTS = 3
"""Checkpoints a trial's Ray Train run keeps. Tune may stop a pruned trial on a result its run is up to two reports
past (one waits in the queue to Tune, one in the report callback that feeds it), so keeping 3 keeps the checkpoint
of the result Tune stopped on (`results.newest_checkpoint` covers a run that got further still)."""


def scaling_config(sweep: Sweep) -> Any:
    from ray.train import ScalingConfig

    r = sweep.resources
    resources: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker > 0:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(
        num_workers=r.workers,
        use_gpu=r.gpus_per_worker > 0,
        resources_per_worker=resources,
        placement_strategy=r.placement,
    )


def run_trial(config: dict[str, Any], sweep: Sweep, storage_path: str) -> None:
    """Tune function trainable: `config` is the sampled point, the rest comes through tune.with_parameters."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from lora_search.resume import SNAPSHOT_FILE, usable_run
    from lora_search.space import trial_params

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(storage_path) / "train" / f"trial_{trial_id}"
    if run_dir.exists() and not usable_run(run_dir):
        # A trial cut short by a killed driver resumes from its Ray Train run's newest checkpoint. A snapshot that is
        # broken (the driver died while writing it) or names an incomplete checkpoint would stop Ray from starting the
        # run: it goes, and the worker resumes from the newest complete checkpoint it finds (lora_search.resume).
        (run_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
    loop_config = {
        "sweep": sweep,
        **trial_params(config),
        "run_dir": str(run_dir),
        "progress_file": str(Path(storage_path) / "progress" / f"trial_{trial_id}.json"),
        "tune_run": uuid.uuid4().hex,
        "tune_run_start": time.time(),
    }
    for losses in range(WORKER_LOSSES + 1):
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=loop_config,
            scaling_config=scaling_config(sweep),
            run_config=RunConfig(
                name=f"trial_{trial_id}",
                storage_path=str(Path(storage_path) / "train"),
                callbacks=[TuneReportCallback()],
                # The newest checkpoints only: what a pruned or finished trial hands on, and what a restart resumes.
                checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                # Ray Train would retry every error, a diverged loss too; lost workers are retried below instead.
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
            return
        except Exception as e:
            if losses == WORKER_LOSSES or not lost_workers(e):
                raise
            print(f"trial {trial_id} lost a worker ({e!s:.300}); training on from its last checkpoint", flush=True)


def lost_workers(error: BaseException) -> bool:
    """Whether a Ray Train run failed because workers died (process killed, node lost), not because training raised."""
    from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError
    from ray.train import ControllerError, WorkerGroupError

    lost = (RayActorError, ActorUnavailableError, NodeDiedError)
    # Ray Train reports a dead worker through its health check (ray.train.v2._internal.exceptions): failed, with the
    # actor's death as the cause, or timed out (a node that stopped answering).
    checks = ("WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError")
    if isinstance(error, WorkerGroupError):
        failures = error.worker_failures.values()
        return bool(failures) and all(isinstance(e, lost) or type(e).__name__ in checks for e in failures)
    if isinstance(error, ControllerError):  # e.g. the new worker group could not start while a node was going
        failure = error.controller_failure
        return isinstance(failure, lost) or type(failure).__name__.startswith("WorkerGroupStartup")
    return False


def _train_worker(config: dict[str, Any]) -> None:
    # Imported here, on the worker: the trial process itself never loads transformers/TRL (seconds per trial).
    imports_start = time.time()
    from lora_search.train import train_loop

    train_loop({**config, "imports_start": imports_start})
