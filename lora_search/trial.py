"""One Tune trial: a Ray Train `TorchTrainer` run of `lora_search.train.train_loop`.

Tune runs `run_trial` once per sampled config. It starts a Ray Train run sized by the sweep's
`Resources` (workers x CPUs/GPUs, placement); the workers' reports reach Tune through
`TuneReportCallback`, so ASHA's decision to stop a trial stops its whole Ray Train run and frees its
devices. A failing training run raises here, which Tune records as this trial's error; the sweep goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lora_search.config import Sweep

DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
"""The Tune trial process only waits on its Ray Train run: it reserves the memory it uses (a Python process
with torch imported, ~256 MiB) and no CPU, so a 2-CPU laptop runs two 1-CPU trials at once, not one."""


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

    from lora_search.space import trial_params

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(storage_path) / "train" / f"trial_{trial_id}"
    if run_dir.exists():
        # A trial cut short by an interrupted driver trains again from step 0 when the sweep resumes. Ray Train
        # would otherwise try to restore the cut-short run, whose newest checkpoint may never have been written.
        shutil.rmtree(run_dir)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"sweep": sweep, **trial_params(config)},
        scaling_config=scaling_config(sweep),
        run_config=RunConfig(
            name=f"trial_{trial_id}",
            storage_path=str(Path(storage_path) / "train"),
            callbacks=[TuneReportCallback()],
            # Keep the newest adapter only: it is what a pruned or finished trial hands on.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def _train_worker(config: dict[str, Any]) -> None:
    # Imported here, on the worker: the trial process itself never loads transformers/TRL (seconds per trial).
    from lora_search.train import train_loop

    train_loop(config)
