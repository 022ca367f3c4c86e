"""Running a sweep: pre-flight, Ray Tune with ASHA over Ray Train trials, results.

    python sweeps/tiny.py                  # a sweep file calls run(SWEEP)
    lora-search run sweeps/tiny.py         # the same, through the CLI

On a cluster (`ray job submit ...`, or RAY_ADDRESS set) it joins that cluster; otherwise it starts a
local Ray with the dashboard off. Results land in `<output_dir>/<name>/`:

    trials.parquet        one row per trial (lora_search.results.TrialRecord), `pareto` and `mlflow_run_id` included
    history.parquet       every reported step of every trial (results.HISTORY_COLUMNS): what ASHA saw
    frontier.csv          completed trials' quality, adapter bytes, cost; 3-D and 2-D frontier flags
    sweep_metrics.json    sweep cost, ASHA's savings, hypervolume and its reference point, status counts
    base_scores.json      the base model's golden scores (with base_lm_eval_results.json)
    index.html            the HTML report (lora_search.report; `lora-search report NAME` writes it again)
    provenance.json       git commit and dirty flag, package and eval task versions, base fingerprint
    tracking.json         MLflow tracking URI, experiment and parent run id (lora_search.tracking)
    sweep_source.json     the sweep file it was started from and its sha256 (`lora-search resume NAME` reloads it)
    adapters/<trial_id>/  the newest adapter of every trial (standard PEFT dir, safetensors, lora_search.json)
    ray/                  Ray Tune/Train state; an interrupted sweep resumes from it (`run` again, or `resume NAME`)

Resume: a driver that died (Ctrl+C, SIGKILL, a lost machine) leaves Ray Tune's experiment state in `ray/<name>/`;
running the sweep again restores it (`Tuner.restore`): finished trials, ASHA's rungs and the searcher's state are
kept, and trials cut short train on from their last adapter checkpoint (lora_search.checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from lora_search import (
    cost,
    layout,
    pack_host,
    pareto,
    plan,
    preflight,
    provenance,
    records,
    registry,
    results,
    resume,
    space,
    tracking,
)
from lora_search.config import ConfigError, Problem, Sweep
from lora_search.gguf import resolve
from lora_search.layout import (
    ADAPTERS_DIR,
    ASHA_STATE_FILE,
    BASE_LM_EVAL_RESULTS,
    BASE_SCORES_FILE,
    FAILED_FILE,
    FRONTIER_FILE,
    HISTORY_FILE,
    PLAN_FILE,
    PROVENANCE_FILE,
    RAY_DIR,
    SOURCE_FILE,
    SWEEP_METRICS_FILE,
    TRIALS_FILE,
)
from lora_search.records import PARAMS
from lora_search.trial import max_failures, run_trial, trial_resources, warm

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
    return layout.sweep_dir(sweep.output_dir, sweep.name)


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": WORKER_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)  # ray job submit, or an explicit cluster
    else:
        # Local: always a new Ray of this driver's own ("local"; with no address Ray would join whatever cluster
        # `ray start` last started on this machine, e.g. someone else's). Its GCS port is chosen here so that its
        # workers can be told the address: Ray Train's placement-group cleaner looks its controller up through the
        # State API, which without RAY_ADDRESS fails when several Rays run on the machine, and then never frees
        # the devices of a trial ASHA stopped. The dashboard (which those state queries need) binds to 127.0.0.1
        # only. Worker logs stay in Ray's session dir; the driver prints one progress line per trial event instead.
        port = _free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        runtime_env["env_vars"] = {**WORKER_ENV, "RAY_ADDRESS": address}
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts the local head
        try:
            ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=runtime_env)
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def trials_at_once(sweep: Sweep, cluster: dict[str, float]) -> int:
    """How many trials fit on the running cluster at once at the sweep's per-trial resources (what Tune may run;
    the plan's `plan.concurrent_trials` counts whole trials per node of a planned cluster instead)."""
    if sweep.max_concurrent_trials is not None:
        return sweep.max_concurrent_trials
    r = sweep.resources
    fits = [math.floor(cluster.get("CPU", 0) / (r.workers * r.cpus_per_worker))]
    if r.gpus_per_worker > 0:
        fits.append(math.floor(cluster.get("GPU", 0) / (r.workers * r.gpus_per_worker)))
    return max(1, min(fits))


def tune_concurrency(sweep: Sweep, cluster: dict[str, float]) -> int:
    """Tune's `max_concurrent_trials`: `trials_at_once`, and in a packed sweep (set no `max_concurrent_trials` of
    its own) up to `pack` trials on each pack host the cluster can place. CPUs can cap the hosts below the devices
    (`pack_host.hosts`); a trial beyond them would find every host full."""
    n = trials_at_once(sweep, cluster)
    if sweep.resources.pack > 1 and sweep.max_concurrent_trials is None:
        n = min(n, pack_host.hosts(sweep, cluster)) * sweep.resources.pack
    return n


class SweepInterrupted(RuntimeError):
    """The driver stopped (Ctrl+C, SIGINT) before every trial ended; Ray saved the state, a rerun resumes it."""


class _Session:
    """This driver's view of the running sweep: the progress lines and the MLflow tracker.

    Module-level and reached through `_SESSION` because Tune pickles its callbacks into the experiment state;
    a resumed sweep runs the unpickled copies, which must report to this run, not to the one that pickled them.
    """

    def __init__(self, sweep: Sweep, tracker: tracking.Tracker | None) -> None:
        self.sweep, self.tracker = sweep, tracker
        self.start = time.monotonic()
        self.best = math.inf
        self.started = 0
        self.ended: set[str] = set()
        """Trials Tune saw complete, get pruned or fail. A trial the driver's stop cut short is TERMINATED
        too, but without this event."""
        self.unfinished: list[tuple[str, dict[str, Any]]] = []
        self.interrupted = False
        self.refailing: set[str] = set()
        """Warm trials whose training raised, started once more by Tune's retry to end with the same error."""

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f}s] {text}", flush=True)


_SESSION: _Session | None = None


class _Events(Callback):
    """One progress line per trial event, and live MLflow logging. Holds no state (see `_Session`)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (s := _SESSION) is None or trial.trial_id in s.refailing:
            return
        s.started += 1
        p = records.trial_params(trial.config)
        s.say(
            f"trial {trial.trial_id} started ({s.started}): {p['variant']} r={p['rank']} "
            f"alpha={p['alpha']:g} targets={p['targets']} lr={p['lr']:.2e}"
        )
        if s.tracker:
            s.tracker.trial_started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if (s := _SESSION) is None:
            return
        s.best = min(s.best, result["eval_loss"])
        s.say(
            f"trial {trial.trial_id} step {result['step']:>4}/{s.sweep.budget.max_steps} "
            f"eval_loss {result['eval_loss']:.4f} (best {s.best:.4f})"
        )
        if s.tracker and not result.get("replayed"):  # a resumed trial's repeat of its checkpoint's step: logged
            s.tracker.trial_result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (s := _SESSION) is None:
            return
        last = trial.last_result or {}
        status = results.status_of(None, last, s.sweep.budget.max_steps)
        how = "completed" if status == "completed" else f"pruned by ASHA at step {last.get('step')}"
        s.ended.add(trial.trial_id)
        s.say(f"trial {trial.trial_id} {how}")
        if s.tracker:
            s.tracker.trial_ended(trial.trial_id, trial.config, status, int(last.get("step", 0)))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Tune retries a warm trial (`trial.max_failures`): one that lost its process trains on from its newest
        checkpoint; one whose training raised left its error (`layout.FAILED_FILE`), raises it again at once on this
        start, and is retried no more."""
        if (s := _SESSION) is None:
            return
        if (layout.run_dir(layout.ray_storage(sweep_dir(s.sweep)), trial.trial_id) / FAILED_FILE).is_file():
            trial.max_failures = 0
            s.refailing.add(trial.trial_id)
            return
        s.say(f"trial {trial.trial_id} lost its process; it trains on from its newest checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (s := _SESSION) is None:
            return
        # Tune writes the error to the trial's local error file before this callback; get_error() reads the copy in
        # the sweep's storage, which is synced later (often empty here).
        local = Path(getattr(trial, "error_file", None) or "")
        text = local.read_text() if local.name and local.is_file() else trial.get_error()
        reason = records.error_reason(text)
        status = records.stopped_status(reason)
        s.ended.add(trial.trial_id)
        s.say(f"trial {trial.trial_id} {status.upper()} (the sweep goes on): {reason}")
        if s.tracker:
            step = int(records.stopped_figures(reason).get("step", 0))
            s.tracker.trial_ended(trial.trial_id, trial.config, status, step, reason)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if (s := _SESSION) is not None:
            # On Ctrl+C Tune saves its state, then stops the running trials as TERMINATED without a completion
            # event; the trials the searcher had not yet drawn do not exist at all.
            s.unfinished = [(t.trial_id, t.config) for t in trials if t.trial_id not in s.ended]
            s.interrupted = bool(s.unfinished) or len(trials) < space.total_trials(s.sweep)


def _device_kind(sweep: Sweep, cluster: dict[str, float]) -> str:
    """What the base is scored on, as a base score's key names it: "cpu", or the cluster's accelerator types (Ray's
    `accelerator_type:*` resources), "gpu" where Ray names none."""
    if sweep.resources.gpus_per_worker <= 0:
        return "cpu"
    kinds = sorted(k.removeprefix("accelerator_type:") for k in cluster if k.startswith("accelerator_type:"))
    return ",".join(kinds) or "gpu"


def _base_scores(sweep: Sweep, pending: Any, out: Path, kept: Any = None) -> dict[str, Any] | None:
    """Wait for the base model's golden scores (`pending`: a Ray ref, or scores already read from `kept`, the
    `evals.BaseScoresCache`, which keeps scores computed here); a failure there is reported, and loses no trial
    result."""
    import ray

    try:
        base = pending if isinstance(pending, dict) else ray.get(pending)
    except Exception as e:  # whatever broke, the trials' results are already on disk
        reason = records.error_reason(e)
        (out / BASE_SCORES_FILE).write_text(json.dumps({"error": reason}, indent=1))
        print(f"\nthe base model could not be scored on the golden sets: {reason}")
        return None
    if kept is not None and "reused_from" not in base:
        try:
            kept.write(base, sweep.name)
        except OSError as e:  # a read-only cache costs the next sweep a scoring, nothing more
            print(f"\nthe base's golden scores were not kept for the next sweep ({kept.path}: {e})")
    summary = {k: base[k] for k in ("metrics", "objective", "higher_is_better", "reused_from") if k in base}
    (out / BASE_SCORES_FILE).write_text(json.dumps(summary, indent=1))
    (out / BASE_LM_EVAL_RESULTS).write_text(json.dumps(base["results"], indent=1))
    return base


def _frontier(
    sweep: Sweep,
    records: list[results.TrialRecord],
    base: dict[str, Any] | None,
    base_bytes: int,
    wall_s: float = 0.0,
    devices_held: float = 0.0,
) -> tuple[list[results.TrialRecord], pd.DataFrame, dict[str, float]]:
    """Mark the Pareto frontier among completed trials; the frontier table, the configurations' cost figures and the
    sweep's spend (`devices_held` for `wall_s`, broken down: `cost.sweep_spend`)."""
    if sweep.evals is not None:
        quality = pareto.Objective("objective", higher_is_better=bool(base["higher_is_better"]) if base else True)
        base_quality = float(base["objective"]) if base else math.nan
    else:
        quality = pareto.Objective("eval_loss", higher_is_better=False)
        base_quality = float(pd.Series([r.base_eval_loss for r in records]).median()) if records else math.nan
    candidates = [r for r in records if r.status == "completed" and math.isfinite(getattr(r, quality.key))]
    if sweep.serve_with != "any":  # the frontier of what the user's engine loads; the rest stay in the table
        candidates = [r for r in candidates if sweep.serve_with in r.servable.split(",")]
    device = next((r.device_name for r in records if r.device_name), "cpu")
    ref_cost = cost.reference_cost(sweep.resources, sweep.pricing, device)
    rows = [dataclasses.asdict(r) for r in candidates]
    front = pareto.frontier(rows, quality, base_quality, base_bytes, ref_cost)
    on_front = {r.trial_id for r, keep in zip(candidates, front.mask, strict=True) if keep}
    records = [dataclasses.replace(r, pareto=r.trial_id in on_front) for r in records]

    table = pd.DataFrame(
        {
            "trial_id": [r.trial_id for r in candidates],
            "variant": [r.variant for r in candidates],
            "rank": [r.rank for r in candidates],
            "targets": [r.targets for r in candidates],
            "lr": [r.lr for r in candidates],
            quality.key: [getattr(r, quality.key) for r in candidates],
            "adapter_bytes": [r.adapter_bytes for r in candidates],
            "cost": [r.cost for r in candidates],
            "pareto": front.mask.tolist(),
            **{f"pareto_{a}_vs_{b}": m.tolist() for (a, b), m in front.projections.items()},
        }
    )
    pruned = [cost.PrunedTrial(r.step, r.train_cost) for r in records if r.status == "pruned"]
    scored = [r.eval_cost for r in records if r.status == "completed"]
    saved = cost.pruning_savings(pruned, sweep.budget.max_steps, sum(scored) / len(scored) if scored else 0.0)
    spent = sum(r.cost for r in records)
    spend = cost.sweep_spend(
        [{k: getattr(r, f"spend_{k}") for k in cost.SPEND_PARTS} for r in records], wall_s, devices_held
    )
    price = sweep.pricing.per_device_hour(device)
    figures = {
        "sweep_cost": spent,  # the configurations' cost, summed; what the sweep held is `spend`
        "sweep_device_hours": sum(r.device_s for r in records) / 3600,
        "spend": sum(spend.values()) * price / 3600,
        "wall_hours": wall_s / 3600,
        "spend_device_hours": sum(spend.values()) / 3600,
        **{f"spend_{k}_device_hours": v / 3600 for k, v in spend.items()},
        "asha_saved_cost": saved,
        "full_budget_cost": spent + saved,
        "hypervolume": front.hypervolume if math.isfinite(base_quality) else math.nan,
        "frontier_size": float(len(on_front)),
        "reference_cost": ref_cost,
        "base_weight_bytes": float(base_bytes),
        f"base_{quality.key}": base_quality,
        **{
            f"trials_{s}": float(sum(r.status == s for r in records))
            for s in ("completed", "pruned", "failed", "diverged", "infeasible")
        },
    }
    return records, table, figures


def _write_meta(sweep: Sweep, records: list[results.TrialRecord], fingerprint: str) -> None:
    """lora_search.json beside each adapter: the base it belongs on, so no other base loads it silently."""
    for r in records:
        if r.adapter_path:
            meta = {
                **registry.base_meta(sweep.base, fingerprint),
                "sweep": sweep.name,
                "trial_id": r.trial_id,
                "status": r.status,
                "step": r.step,
                **{k: getattr(r, k) for k in PARAMS},
                "mlflow_run_id": r.mlflow_run_id,
            }
            registry.write_meta(Path(r.adapter_path), meta)


def _print_outcome(
    sweep: Sweep, frame: pd.DataFrame, base: dict[str, Any] | None, figures: dict[str, float], elapsed: float
) -> None:
    print(f"\n{results.summary(frame)}\nfinished in {elapsed:.0f}s; trials, best first:")
    print(results.table(frame))
    if base is not None and sweep.evals is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in base["metrics"].items() if not k.endswith("_stderr"))
        print(f"\nbase model on the golden sets: {shown}")
        print(results.objective_summary(frame, sweep.evals.objective, base["objective"], base["higher_is_better"]))
    currency = sweep.pricing.currency
    print(
        f"cost of the configurations (training and evaluation at their steady rate): {figures['sweep_cost']:.4g} "
        f"{currency} for {figures['sweep_device_hours']:.3g} device-hours; ASHA's pruning saved about "
        f"{figures['asha_saved_cost']:.4g} {currency} of {figures['full_budget_cost']:.4g} {currency} for every "
        "trial at the full budget"
    )
    print(f"spend (every device-hour the sweep held): {cost.spend_line(figures, currency)}")
    front = frame[frame["pareto"]]
    print(
        f"Pareto frontier (quality vs adapter bytes vs cost): {len(front)} trial(s) "
        f"[{', '.join(front['trial_id'])}], hypervolume {figures['hypervolume']:.4g}"
    )


def validate(sweep: Sweep, construction_problems: list[Problem] | None = None) -> None:
    """Raise ConfigError with every problem of the sweep; print nothing, start nothing."""
    preflight.validate(sweep, construction_problems)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resumable(out: Path) -> bool:
    """Whether the sweep dir holds Ray Tune state of a sweep that has not finished."""
    from ray import tune

    return not (out / TRIALS_FILE).exists() and tune.Tuner.can_restore(str(out / RAY_DIR / out.name))


def run(
    sweep: Sweep,
    *,
    fresh: bool = False,
    construction_problems: list[Problem] | None = None,
    sweep_file: str | Path | None = None,
) -> pd.DataFrame:
    """Validate, run (or resume) the sweep, write and print its results. Returns the trials table.

    `sweep_file`: the file the sweep came from, recorded so that `lora-search resume NAME` finds it again.
    Raises ConfigError before Ray starts when the sweep cannot run, and SweepExistsError when its name
    already has finished results (pass fresh=True to move them aside first).
    """
    validate(sweep, construction_problems)
    sweep = sweep.replace(base=resolve(sweep.base))  # a GGUF base: trials, scores and adapters use its converted dir
    out = sweep_dir(sweep)
    parquet = out / TRIALS_FILE
    if parquet.exists():
        if not fresh:
            raise SweepExistsError(
                f"sweep {sweep.name!r} already has results in {out}; nothing was overwritten. "
                "Rerun with --fresh (lora-search run --fresh) to move them to a timestamped folder, "
                "or give the sweep another name."
            )
        out.rename(out.with_name(f"{sweep.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
    out.mkdir(parents=True, exist_ok=True)
    if sweep_file is not None and not (out / SOURCE_FILE).exists():
        source = Path(sweep_file).resolve()
        (out / SOURCE_FILE).write_text(json.dumps({"sweep_file": str(source), "sha256": file_sha256(source)}))
    fingerprint = registry.fingerprint(sweep.base)
    base_bytes = preflight.base_weight_bytes(sweep.base)
    try:
        tracker = None if tracking.is_off(sweep) else tracking.Tracker(sweep, out, fingerprint)
    except Exception as e:  # before any compute: say what to fix
        uri = tracking.tracking_uri(sweep)
        raise ConfigError(
            [Problem("tracking_uri", uri, f"MLflow tracking cannot start ({type(e).__name__}: {str(e)[:300]})", "")]
        ) from e

    from ray import tune

    _init_ray()
    import ray

    storage = layout.ray_storage(out)
    experiment = storage / sweep.name
    storage.mkdir(exist_ok=True)
    asha_state = storage / ASHA_STATE_FILE
    resources: Any = trial_resources(sweep)
    if sweep.resources.pack > 1:
        # Packed trials reserve a little CPU (their pack host holds the device); the others what a trial reserves.
        solo = resources
        resources = lambda config: pack_host.trial_resources(sweep, config["variant"], solo)  # noqa: E731
        for variant, why in pack_host.solo_reasons(sweep).items():
            print(f"pack: {variant} trials train solo: {why}", flush=True)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, storage_path=str(storage)), resources)
    session = _Session(sweep, tracker)
    # What the planner predicts for this cluster, beside what the sweep will measure (the report shows both).
    (out / PLAN_FILE).write_text(json.dumps(plan.for_run(sweep, ray.cluster_resources()), indent=1))
    if tune.Tuner.can_restore(str(experiment)):
        print(f"resuming sweep {sweep.name!r} from {experiment}", flush=True)
        from ray.tune import ExperimentAnalysis

        done = [t.trial_id for t in ExperimentAnalysis(str(experiment)).trials if t.status in ("TERMINATED", "ERROR")]
        session.ended.update(done)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        asha_state.unlink(missing_ok=True)  # of an earlier sweep by this name whose Ray state was unusable
        n_concurrent = tune_concurrency(sweep, ray.cluster_resources())
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
                scheduler=resume.restorable(space.scheduler(sweep), asha_state),
                search_alg=space.search_algorithm(sweep, n_concurrent),
                num_samples=sweep.num_samples,
                max_concurrent_trials=n_concurrent,
                trial_name_creator=lambda t: f"trial_{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
                reuse_actors=warm(sweep),  # a warm trial's process, imports and base go on to the next
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(storage),
                callbacks=[_Events()],
                failure_config=tune.FailureConfig(max_failures=max_failures(sweep)),
                verbose=0,
            ),
        )
    base_scores, kept = None, None
    if sweep.evals is not None:
        # The base reference is scored once, on the devices one trial worker would get, beside the trials; or read
        # back from the sweep that last scored it the same way (`Evals.reuse_base_scores`).
        from lora_search.evals import base_scores_cache, score_base

        r = sweep.resources
        try:
            kept = base_scores_cache(sweep, fingerprint, _device_kind(sweep, ray.cluster_resources()))
        except (OSError, ConfigError) as e:  # a golden file unreadable now: scored (and reported) as before
            print(f"base golden scores: not kept ({e})")
        base_scores = kept.read() if kept is not None and sweep.evals.reuse_base_scores else None
        if base_scores is not None:
            kept_at = base_scores["reused_from"]
            print(f"base golden scores: reused from sweep {kept_at['sweep']!r} ({kept_at['scored_at']}, {kept.path})")
        else:
            base_scores = ray.remote(score_base).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)
            base_scores = base_scores.remote(sweep)
    global _SESSION
    _SESSION = session
    try:
        if sweep.resources.pack > 1:  # the hosts load while Tune starts the trials (`pack_host.start_hosts`)
            cluster = ray.cluster_resources()
            pack_host.start_hosts(sweep, str(storage), tune_concurrency(sweep, cluster), cluster)
        grid = tuner.fit()
    finally:
        session, _SESSION = _SESSION, None
        if sweep.resources.pack > 1:
            pack_host.stop_hosts(sweep, ray.cluster_resources())
    if session.interrupted:
        if tracker:
            tracker.interrupted(session.unfinished)
        raise SweepInterrupted(
            f"sweep {sweep.name!r} stopped before its end ({len(session.unfinished)} trial(s) cut short); "
            f"Ray saved its state in {experiment}. Run the same command again to resume: finished trials are "
            "kept, the ones cut short train on from their last checkpoint."
        )
    records, configs, histories = [], {}, {}
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        history = list({int(h.get("step", 0)): h for h in history}.values())  # a step reported again after a resume
        records.append(results.record(trial_id, result.config, history, result.error, sweep, out / ADAPTERS_DIR))
        configs[trial_id], histories[trial_id] = result.config, history
    base = _base_scores(sweep, base_scores, out, kept) if base_scores is not None else None
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    held = min(trials_at_once(sweep, cluster), max(len(records), 1)) * cost.devices_per_trial(sweep.resources)
    wall_s = time.monotonic() - session.start
    records, frontier_table, figures = _frontier(sweep, records, base, base_bytes, wall_s, held)
    if tracker:
        _drop_orphan_runs(tracker, {r.trial_id for r in records})
        records = [dataclasses.replace(r, mlflow_run_id=tracker.children.get(r.trial_id, "")) for r in records]
    _write_meta(sweep, records, fingerprint)
    results.history_frame(histories).to_parquet(out / HISTORY_FILE, index=False)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance.provenance(sweep, fingerprint), indent=1))
    results.write(records, parquet)
    frontier_table.to_csv(out / FRONTIER_FILE, index=False)
    quality = sweep.evals.objective if sweep.evals is not None else "eval_loss"
    labels = {"quality_key": quality, "currency": sweep.pricing.currency}
    (out / SWEEP_METRICS_FILE).write_text(json.dumps({**figures, **labels}, indent=1))
    frame = results.to_frame(records)
    _print_outcome(sweep, frame, base, figures, time.monotonic() - session.start)
    report = write_sweep_report(sweep, out)
    if tracker:
        tracker.finish(records, configs, histories, figures, frontier_table, base["results"] if base else None, report)
        print(f"MLflow: experiment {sweep.name!r} at {tracker.uri} (parent run {tracker.parent_id}); `lora-search ui`")
    print(f"\nresults: {parquet}\nadapters: {out / ADAPTERS_DIR}")
    if report:
        print(f"report: {report}")
    return frame


def _drop_orphan_runs(tracker: tracking.Tracker, trial_ids: set[str]) -> None:
    """Delete child runs of trials Ray does not have: a driver killed after a trial started but before Tune saved
    its state leaves that trial's run behind, and the restored searcher may give the trial another id."""
    for trial_id in sorted(set(tracker.children) - trial_ids):
        run_id = tracker.children.pop(trial_id)
        try:
            tracker.client.delete_run(run_id)
        except Exception as e:  # tracking never takes the sweep down
            print(f"MLflow: the orphan run {run_id} of trial {trial_id} could not be deleted ({e!s:.200})", flush=True)
            continue
        print(f"MLflow: deleted run {run_id} of trial {trial_id}, which the restored sweep does not have", flush=True)


def write_sweep_report(sweep: Sweep, out: Path, baseline: dict[str, Any] | None = None) -> Path | None:
    """The sweep's HTML report (`report.write_report`); a failure is printed and loses no result."""
    from lora_search.report import write_report as write

    try:
        return write(out, baseline=baseline, extra_provenance=provenance.sweep_params(sweep))
    except Exception as e:  # the results on disk stand without their report
        print(f"the HTML report could not be written ({type(e).__name__}: {e}); `lora-search report {sweep.name}`")
        return None


__all__ = ["ConfigError", "SweepExistsError", "SweepInterrupted", "run", "validate"]
