"""One Tune trial: a Ray Train `TorchTrainer` run of `lora_search.train.train_loop`, or, warm, that loop in the
trial's own reused process.

Tune runs `run_trial` once per sampled config. It starts a Ray Train run sized by the sweep's
`Resources` (workers x CPUs/GPUs, placement); the workers' reports reach Tune through
`TuneReportCallback`, so ASHA's decision to stop a trial stops its whole Ray Train run and frees its
devices. A failing training run raises here, which Tune records as this trial's error; the sweep goes on.

A trial that lost a worker process or a whole node trains on from its last adapter checkpoint: the same Ray Train
run is fitted again (Ray restores its checkpoints; lora_search.checkpoints), up to `WORKER_LOSSES` times. Errors of
the training itself (failed, diverged, infeasible) are not retried: they would fail again the same way.

Warm trials (`warm`: one-worker DDP sweeps, `Resources.reuse_workers`) skip the worker group: the Tune trial
process holds the trial's devices and runs the same `train_loop` itself, as rank 0 of 1, and Tune reuses the
process for the next trial. (Ray Train starts a new worker group for every run and cannot keep one; its one-process
local mode refuses to run inside Tune.) Its reports go to Tune directly (`callbacks.report_result`), with
checkpoints kept in the same run dir, under the same names, as Ray Train keeps them. A lost trial process is Tune's
to retry (`max_failures`), and the retry trains on from the newest checkpoint; a retry of a trial whose training raised
raises that error again (`FAILED_FILE`) instead of training a second time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from lora_search import layout
from lora_search.checkpoints import KEEP_CHECKPOINTS, keep_error, kept_error, usable_run
from lora_search.config import Sweep
from lora_search.devices import release_memory
from lora_search.layout import SNAPSHOT_FILE
from lora_search.records import TrialParams

DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}
"""What a trial process that starts a Ray Train worker group reserves (a warm trial's reserves its worker's devices,
`trial_resources`). It only waits on its Ray Train run: it reserves the memory it uses (a Python process
with torch imported, ~256 MiB) and no CPU, so a 2-CPU laptop runs two 1-CPU trials at once, not one. It runs on
the head node (Ray's own head resource; 0.001 of it: up to 1000 trials at once), where the Tune driver runs, and
so does the Ray Train controller it starts: losing a worker node never takes a trial's bookkeeping with it."""

WORKER_LOSSES = 3
"""Times one trial may lose a worker process or node and still train on from its last checkpoint."""


def warm(sweep: Sweep) -> bool:
    """Whether the sweep's trials train in their (reused) Tune trial process: one worker, DDP for every variant."""
    r = sweep.resources
    return r.reuse_workers and r.workers == 1 and all(r.strategy_for(v) == "ddp" for v in sweep.space.variants)


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """What Tune reserves for one trial's own process: the worker's devices when it trains there (`warm`)."""
    if not warm(sweep):
        return DRIVER_RESOURCES
    r = sweep.resources
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}


def max_failures(sweep: Sweep) -> int:
    """Tune's retries of a trial: a warm trial's process is its worker, so Tune retries a lost one; other trials
    retry lost workers themselves (`run_trial`), and Tune never retries a trial that raised."""
    return WORKER_LOSSES if warm(sweep) else 0


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

    trial_id = ray.tune.get_context().get_trial_id()
    # Tune hands a trial's process on to the next trial (`reuse_actors`) once the training thread of the stopped
    # (pruned or finished) one has unwound, which it does at its next report: a warm trial's next steps, a packed
    # trial's next pack steps. Tune waits TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default) and then fails the next
    # trial ("Could not re-use actor"); a CI run lost a packed sweep's fourth trial so. Set for every trial, since a
    # process may run a packed trial after a solo one or the other way round.
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = "60"
    if sweep.resources.pack > 1:
        from lora_search import pack_host, pack_trial

        if pack_host.packed(sweep, TrialParams.from_config(config).variant):
            pack_trial.run_packed_trial({**config, "tune_run_start": time.time()}, sweep, storage_path, trial_id)
            return
    run_dir = layout.run_dir(storage_path, trial_id)
    if run_dir.exists() and not usable_run(run_dir):
        # A trial cut short by a killed driver resumes from its Ray Train run's newest checkpoint. A snapshot that is
        # broken (the driver died while writing it) or names an incomplete checkpoint would stop Ray from starting the
        # run: it goes, and the worker resumes from the newest complete checkpoint it finds (lora_search.resume).
        (run_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
    loop_config = {
        "sweep": sweep,
        **dataclasses.asdict(TrialParams.from_config(config)),
        "run_dir": str(run_dir),
        "progress_file": str(layout.progress_file(storage_path, trial_id)),
        "tune_run": uuid.uuid4().hex,
        "tune_run_start": time.time(),
    }
    if warm(sweep):
        _fit_here(loop_config, run_dir)
        return
    for losses in range(WORKER_LOSSES + 1):
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=loop_config,
            scaling_config=scaling_config(sweep),
            run_config=RunConfig(
                name=f"trial_{trial_id}",
                storage_path=str(layout.run_dir(storage_path, trial_id).parent),
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


def _fit_here(loop_config: dict[str, Any], run_dir: Path) -> None:
    """Train in this process: a warm trial. Its error is kept for Tune's retry to raise."""
    earlier = kept_error(run_dir)
    if earlier is not None:
        raise earlier
    _log_to_stderr()
    try:
        _train_worker({**loop_config, "warm": True})
    except Exception as e:
        keep_error(run_dir, e)
        raise
    finally:
        release_memory()


def _log_to_stderr() -> None:
    """lora_search's INFO lines (each trial's set-up and fast path, its evals) into the process's stderr, which Ray
    keeps in the session's worker logs: one process runs trial after trial, and each line names its trial."""
    logger = logging.getLogger("lora_search")
    if logger.handlers or logger.level != logging.NOTSET:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
