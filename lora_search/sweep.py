"""Running a sweep: pre-flight, Ray Tune with ASHA over Ray Train trials, results.

    python sweeps/tiny.py                  # a sweep file calls run(SWEEP)
    lora-search run sweeps/tiny.py         # the same, through the CLI

On a cluster (`ray job submit ...`, or RAY_ADDRESS set) it joins that cluster; otherwise it starts a
local Ray with the dashboard off. Results land in `<output_dir>/<name>/`:

    trials.parquet        one row per trial (lora_search.results.TrialRecord)
    adapters/<trial_id>/  the newest adapter of every trial (standard PEFT dir, safetensors)
    ray/                  Ray Tune/Train state; an interrupted sweep resumes from it
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lora_search import preflight, results, space
from lora_search.config import ConfigError, Problem, Sweep
from lora_search.trial import DRIVER_RESOURCES, run_trial

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # Ray Train notices a finished worker group at its next health check (default every 2 s); on short
    # trials that wait is a visible share of the trial, and the check itself costs nothing.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


class SweepExistsError(RuntimeError):
    """The sweep's name already has finished results; running again would overwrite them."""


def sweep_dir(sweep: Sweep) -> Path:
    return Path(sweep.output_dir).resolve() / sweep.name


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": WORKER_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)  # ray job submit, or an explicit cluster
    else:
        # Local: the dashboard (which Ray Train's state queries need) binds to 127.0.0.1 only. Worker logs stay
        # in Ray's session dir; the driver prints one progress line per trial event instead.
        ray.init(dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=runtime_env)


def concurrent_trials(sweep: Sweep, cluster: dict[str, float]) -> int:
    """How many trials fit on the cluster at once at the sweep's per-trial resources."""
    if sweep.max_concurrent_trials is not None:
        return sweep.max_concurrent_trials
    r = sweep.resources
    fits = [math.floor(cluster.get("CPU", 0) / (r.workers * r.cpus_per_worker))]
    if r.gpus_per_worker > 0:
        fits.append(math.floor(cluster.get("GPU", 0) / (r.workers * r.gpus_per_worker)))
    return max(1, min(fits))


def _progress(sweep: Sweep, start: float) -> Any:
    from ray.tune import Callback

    class Progress(Callback):
        """One line per trial event, so a long sweep shows what it is doing."""

        def __init__(self) -> None:
            self.best = math.inf
            self.started = 0

        def _say(self, text: str) -> None:
            print(f"[{time.monotonic() - start:6.0f}s] {text}", flush=True)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started += 1
            p = space.trial_params(trial.config)
            self._say(
                f"trial {trial.trial_id} started ({self.started}): {p['variant']} r={p['rank']} "
                f"alpha={p['alpha']:g} targets={p['targets']} lr={p['lr']:.2e}"
            )

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.best = min(self.best, result["eval_loss"])
            self._say(
                f"trial {trial.trial_id} step {result['step']:>4}/{sweep.budget.max_steps} "
                f"eval_loss {result['eval_loss']:.4f} (best {self.best:.4f})"
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            status = results.status_of(None, last, sweep.budget.max_steps)
            how = "completed" if status == "completed" else f"pruned by ASHA at step {last.get('step')}"
            self._say(f"trial {trial.trial_id} {how}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            reason = results.error_reason(info.get("error") or trial.get_error())
            self._say(f"trial {trial.trial_id} FAILED (the sweep goes on): {reason}")

    return Progress()


def _report_base(sweep: Sweep, frame: pd.DataFrame, pending: Any, out: Path) -> None:
    """Wait for the base model's golden scores; a failure there is reported, and loses no trial result."""
    import ray

    assert sweep.evals is not None
    try:
        base = ray.get(pending)
    except Exception as e:  # noqa: BLE001 - whatever broke, the trials' results are already on disk
        reason = results.error_reason(e)
        (out / "base_scores.json").write_text(json.dumps({"error": reason}, indent=1))
        print(f"\nthe base model could not be scored on the golden sets: {reason}")
        return
    summary = {k: base[k] for k in ("metrics", "objective", "higher_is_better")}
    (out / "base_scores.json").write_text(json.dumps(summary, indent=1))
    (out / "base_lm_eval_results.json").write_text(json.dumps(base["results"], indent=1))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in base["metrics"].items() if not k.endswith("_stderr"))
    print(f"\nbase model on the golden sets: {shown}")
    print(results.objective_summary(frame, sweep.evals.objective, base["objective"], base["higher_is_better"]))


def validate(sweep: Sweep, construction_problems: list[Problem] | None = None) -> None:
    """Raise ConfigError with every problem of the sweep; print nothing, start nothing."""
    preflight.validate(sweep, construction_problems)


def run(sweep: Sweep, *, fresh: bool = False, construction_problems: list[Problem] | None = None) -> pd.DataFrame:
    """Validate, run (or resume) the sweep, write and print its results. Returns the trials table.

    Raises ConfigError before Ray starts when the sweep cannot run, and SweepExistsError when its name
    already has finished results (pass fresh=True to move them aside first).
    """
    validate(sweep, construction_problems)
    out = sweep_dir(sweep)
    parquet = out / "trials.parquet"
    if parquet.exists():
        if not fresh:
            raise SweepExistsError(
                f"sweep {sweep.name!r} already has results in {out}; nothing was overwritten. "
                "Rerun with --fresh (lora-search run --fresh) to move them to a timestamped folder, "
                "or give the sweep another name."
            )
        out.rename(out.with_name(f"{sweep.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
    out.mkdir(parents=True, exist_ok=True)

    from ray import tune

    _init_ray()
    start = time.monotonic()
    import ray

    storage = out / "ray"
    experiment = storage / sweep.name
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, storage_path=str(storage)), DRIVER_RESOURCES
    )
    if tune.Tuner.can_restore(str(experiment)):
        print(f"resuming sweep {sweep.name!r} from {experiment}", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        n_concurrent = concurrent_trials(sweep, ray.cluster_resources())
        print(
            f"sweep {sweep.name!r}: {sweep.num_samples} sample(s), search={sweep.search}, "
            f"ASHA rungs at steps {space.rungs(sweep)} of {sweep.budget.max_steps}, "
            f"{n_concurrent} trial(s) at a time; results in {out}",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(sweep),
            tune_config=tune.TuneConfig(
                metric="eval_loss",
                mode="min",
                scheduler=space.scheduler(sweep),
                search_alg=space.search_algorithm(sweep, n_concurrent),
                num_samples=sweep.num_samples,
                max_concurrent_trials=n_concurrent,
                trial_name_creator=lambda t: f"trial_{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(storage),
                callbacks=[_progress(sweep, start)],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    base_scores = None
    if sweep.evals is not None:
        # The base reference is scored once, on the devices one trial worker would get, beside the trials.
        from lora_search.evals import score_base

        r = sweep.resources
        base_scores = ray.remote(score_base).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)
        base_scores = base_scores.remote(sweep)
    grid = tuner.fit()
    records = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        records.append(
            results.record(trial_id, result.config, history, result.error, sweep.budget.max_steps, out / "adapters")
        )
    results.write(records, parquet)
    frame = results.to_frame(records)
    print(f"\n{results.summary(frame)}\nfinished in {time.monotonic() - start:.0f}s; trials, best first:")
    print(results.table(frame))
    if base_scores is not None:
        _report_base(sweep, frame, base_scores, out)
    print(f"\nresults: {parquet}\nadapters: {out / 'adapters'}")
    return frame


__all__ = ["ConfigError", "SweepExistsError", "run", "validate"]
