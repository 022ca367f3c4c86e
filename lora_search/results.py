"""Trial records: what each trial was, how it ended, what it cost; written to `reports/<sweep>/trials.parquet`.

A trial ends in exactly one of five states:
- completed: trained the full budget (`budget.max_steps`);
- pruned: ASHA stopped it at a rung (`stopped_at_step` says where);
- diverged: its train or eval loss became NaN or infinite (`step` and the loss columns hold where and what);
- infeasible: it ran out of device memory or past `Resources.memory_limit_gb` (`peak_mem_bytes` holds the peak);
- failed: its training raised for any other reason (`reason` says why).
No ending but completed puts a trial on the frontier, and none stops the sweep.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_search import serving
from lora_search.config import Sweep
from lora_search.cost import DEVICE_SHARE, SPEND_PARTS, configuration_cost, devices_per_trial, trial_spend
from lora_search.layout import REPORT_FILE, TRAINER_DIR, UPLOADED_FILE
from lora_search.records import Status, StepReport, TrialParams, error_reason, stopped_figures, stopped_status

if TYPE_CHECKING:
    import pandas as pd

TABLE_COLUMNS = [
    "trial_id",
    "status",
    "eval_loss",
    "variant",
    "rank",
    "alpha",
    "lr",
    "targets",
    "adapter_bytes",
    "trainable_params",
    "step",
    "train_s",
    "cost",
    "spend",
]


@dataclass(frozen=True, kw_only=True)
class TrialRecord(TrialParams):
    """One trial of a sweep: its hyperparameters (`records.TrialParams`), how it ended, what it cost; a row of
    trials.parquet (`to_frame`: trial_id and status first, then the hyperparameters, then the rest)."""

    trial_id: str
    status: Status
    step: int
    """Last optimizer step reported (for pruned trials: the rung it was stopped at)."""
    eval_loss: float
    best_eval_loss: float
    base_eval_loss: float
    """The base model's eval loss (the trial's step-0 eval, before the adapter has learned anything)."""
    train_loss: float
    trainable_params: int
    adapter_bytes: int
    train_s: float
    device_s: float
    """Device-seconds of the configuration's training at its steady rate and its evaluations (lora_search.cost):
    what `cost` prices. What the trial held is `spend_device_s`."""
    trial_s: float
    """Wall time of the whole trial as Tune saw it (start-up, loading, training and scoring)."""
    tokens_per_s: float
    """Tokens over the trial's training seconds, warm-up and evaluations included: what the trial's cost pays for."""
    peak_mem_bytes: int
    adapter_path: str
    reason: str
    objective: float = float("nan")
    """The sweep's primary golden-set metric (`Evals.objective`), for completed trials scored with lm-eval."""
    eval_s: float = 0.0
    """Seconds spent on golden-set scoring, apart from training."""
    device_name: str = "cpu"
    """What the trial's workers ran on ("cpu", or torch's CUDA device name); picks the price per device-hour."""
    train_cost: float = 0.0
    eval_cost: float = 0.0
    cost: float = 0.0
    """train_cost + eval_cost, in `Pricing.currency`: the configuration's cost, the frontier's axis
    (lora_search.cost)."""
    spend_device_s: float = 0.0
    """Device-seconds the trial held: devices x `trial_s` (x its share of them, for a packed trial:
    `cost.DEVICE_SHARE`), the sum of the `spend_<part>` columns (`cost.SPEND_PARTS`: training, evaluation, startup,
    base_load, restarts, idle)."""
    spend_training: float = 0.0
    spend_evaluation: float = 0.0
    spend_startup: float = 0.0
    spend_base_load: float = 0.0
    spend_restarts: float = 0.0
    spend_idle: float = 0.0
    spend: float = 0.0
    """`spend_device_s` priced: what the trial spent, in `Pricing.currency`; never on the frontier."""
    worker_nodes: str = ""
    """Ray node ids the trial's workers ran on (',' joined): a multi-node trial lists several."""
    strategy: str = "ddp"
    """How the trial's workers shared the model (`lora_search.strategies`)."""
    fast_path: str = ""
    """Which speed pieces the trial ran with and why any was off (`lora_search.fastpath`)."""
    steady_tokens_per_s: float = float("nan")
    """Tokens per second of training steps alone, after the first `callbacks.STEADY_AFTER_STEPS`, evaluations and
    checkpoints left out: the figure to compare training paths by (NaN for a trial too short to have one)."""
    startup_s: float = 0.0
    """Cold start, part 1: the trial's Ray Train worker group starting and importing, until its worker runs. A warm
    trial (`lora_search.trial.warm`) starts in its own, already running process: its imports, if any, alone."""
    imports_s: float = 0.0
    """Of `startup_s`, the worker's imports of the training stack (torch, transformers, TRL, PEFT); the rest is Ray
    Train starting the worker group (controller, placement, process, torch.distributed). About 0 in a warm process
    after its first trial."""
    load_s: float = 0.0
    """Part 2: loading the base (or taking the one the warm process kept, `base_reused`), attaching the adapter,
    reading the data."""
    base_reused: bool = False
    """The trial trained on the base its warm process kept from its previous trial (`lora_search.train.BaseCache`)
    instead of loading it."""
    prepare_s: float = 0.0
    """Part 3: building the Trainer (TRL tokenises the dataset here) and preparing the model for training."""
    base_eval_s: float = 0.0
    """Part 4: the step-0 eval of the base, the reference every eval loss is compared with."""
    mlflow_run_id: str = ""
    """The trial's MLflow child run ("" when tracking was off or failed)."""
    pareto: bool = False
    """On the Pareto frontier of quality vs adapter bytes vs cost (lora_search.pareto), among completed trials."""
    servable: str = ""
    """The serving engines that load the trial's saved adapter as it is, ',' joined ("vllm"; "" for none, or no
    adapter): `lora_search.serving`."""
    serving_notes: str = ""
    """Why an engine would refuse the adapter (the rule and its source), or the flags a servable one needs."""
    restarts: int = 0
    """Times the trial trained on from its last checkpoint after a worker process, a node or the driver died."""
    steps_redone: int = 0
    """Optimizer steps those restarts trained again (done after the last checkpoint, lost with the attempt)."""
    scores: dict[str, float] | None = None
    """Every golden metric and stderr, `task/metric` -> value; a column each in trials.parquet."""


def status_of(error: BaseException | None, last: dict[str, Any], max_steps: int) -> Status:
    if error is not None:
        return stopped_status(error_reason(error))
    if last.get("step", 0) >= max_steps:
        return "completed"
    return "pruned"


def record(
    trial_id: str,
    config: dict[str, Any],
    history: list[dict[str, Any]],
    error: BaseException | None,
    sweep: Sweep,
    adapters_dir: Path,
) -> TrialRecord:
    """One trial's record, priced; copies its newest adapter checkpoint to `adapters_dir/<trial_id>`."""
    params = TrialParams.from_config(config)
    max_steps = sweep.budget.max_steps
    last = history[-1] if history else {}
    # a stopped trial's last result is where it stopped; one Tune pruned may have trained (and saved) past it
    source, last = newest_checkpoint(trial_id, last, follow=error is None)
    status = status_of(error, last, max_steps)
    if status in ("diverged", "infeasible"):
        last = {**last, **stopped_figures(error_reason(error))}  # the real loss value / the peak, at its step
    adapter_path, servable, serving_notes = "", "", ""
    if source is not None:
        target = adapters_dir / trial_id
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(TRAINER_DIR, REPORT_FILE, UPLOADED_FILE))
        adapter_path = str(target)
        verdict = serving.check(target)
        servable, serving_notes = ",".join(verdict.servable), verdict.text
    losses = [h["eval_loss"] for h in [*history, last] if "eval_loss" in h]
    nan = float("nan")
    reported = StepReport.from_metrics(last)
    device_name = reported.device_name or "cpu"
    # Tune counts a trial's time from its latest start; `prior_s` is what earlier starts (before a killed driver) held.
    trial_s = float(last.get("time_total_s", 0.0)) + _count(last, "prior_s")
    eval_s = reported.eval_s
    priced = configuration_cost(
        reported.steady_train_device_s,
        reported.eval_device_s + reported.golden_device_s,
        sweep.resources.workers,
        device_name,
        sweep.pricing,
    )
    per_step = reported.train_s / reported.step if reported.step > 0 else 0.0
    devices = devices_per_trial(sweep.resources)
    spent = trial_spend(
        trial_s,
        devices,
        startup_s=reported.startup_s + reported.prepare_s,
        load_s=reported.load_s,
        eval_s=reported.base_eval_s + reported.eval_wall_s + eval_s,
        train_s=reported.train_s - reported.eval_wall_s,
        restart_s=_count(last, "prior_s") + reported.steps_redone * per_step,
        share=_count(last, DEVICE_SHARE) or 1.0,  # a packed trial's share of its device; others held it whole
    )
    price = sweep.pricing.per_device_hour(device_name)
    return TrialRecord(
        **asdict(params),
        trial_id=trial_id,
        status=status,
        step=reported.step,
        eval_loss=reported.eval_loss,
        best_eval_loss=min(losses) if losses else nan,
        base_eval_loss=reported.base_eval_loss,
        train_loss=reported.train_loss,
        trainable_params=reported.trainable_params,
        adapter_bytes=reported.adapter_bytes,
        train_s=reported.train_s,
        device_s=priced.device_s,
        trial_s=trial_s,
        tokens_per_s=reported.tokens_per_s,
        peak_mem_bytes=reported.peak_mem_bytes,
        adapter_path=adapter_path,
        reason=error_reason(error),
        objective=reported.objective,
        eval_s=eval_s,
        device_name=device_name,
        worker_nodes=reported.worker_nodes,
        strategy=reported.strategy or sweep.resources.strategy_for(params.variant),
        fast_path=reported.fast_path,
        steady_tokens_per_s=reported.steady_tokens_per_s,
        startup_s=reported.startup_s,
        imports_s=reported.imports_s,
        load_s=reported.load_s,
        prepare_s=reported.prepare_s,
        base_eval_s=reported.base_eval_s,
        base_reused=reported.base_reused,
        train_cost=priced.train_cost,
        eval_cost=priced.eval_cost,
        cost=priced.cost,
        spend_device_s=sum(spent.values()),
        **{f"spend_{k}": spent[k] for k in SPEND_PARTS},
        spend=sum(spent.values()) * price / 3600,
        restarts=reported.restarts,
        steps_redone=reported.steps_redone,
        scores=reported.scores,
        servable=servable,
        serving_notes=serving_notes,
    )


def newest_checkpoint(trial_id: str, last: dict[str, Any], follow: bool) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint a trial's last result names, with that result; or, where Ray Train already dropped it and
    `follow`, the newest checkpoint after it, with the report saved in it.

    Tune stops a pruned trial on a result its Ray Train run may already be past: the run can register one or two
    newer checkpoints (and drop the oldest, `checkpoints.KEEP_CHECKPOINTS`) before the stop reaches it. The trial then
    trained further than Tune saw, and its record says so rather than losing the adapter."""
    named = last.get("checkpoint_path")
    if not named:
        return None, last
    if Path(named).is_dir():
        return Path(named), last
    if not follow:
        return None, last
    later = sorted(d for d in Path(named).parent.glob("step_*") if (d / REPORT_FILE).is_file())
    if not later:
        return None, last
    report = json.loads((later[-1] / REPORT_FILE).read_text())
    if int(report.get("step", 0)) < int(last.get("step", 0)):
        return None, last
    print(
        f"trial {trial_id}: the checkpoint of step {last.get('step')} is gone (Ray Train kept newer ones while Tune "
        f"stopped the trial); recording step {report.get('step')}, the newest, from {later[-1]}",
        flush=True,
    )
    return later[-1], {**last, **report, "checkpoint_path": str(later[-1])}


def _count(last: dict[str, Any], key: str) -> float:
    """A figure older reports (or a history table's empty cell, NaN) do not have counts as 0."""
    value = last.get(key)
    return float(value) if isinstance(value, int | float) and value == value else 0.0


def to_frame(records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial; golden scores spread into one column per `task/metric`."""
    import pandas as pd

    rows = []
    for r in records:
        row = asdict(r)
        row.update(row.pop("scores") or {})
        rows.append(row)
    first = ["trial_id", "status"]
    columns = first + [c for c in TrialRecord.__dataclass_fields__ if c not in first and c != "scores"]
    extra = sorted({k for r in records for k in (r.scores or {})})
    return pd.DataFrame(rows, columns=columns + extra)


HISTORY_COLUMNS = ("trial_id", "step", "eval_loss", "train_loss", "tokens_per_s", "time_total_s")


def history_frame(histories: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """Every reported step of every trial (what ASHA saw): one row per (trial_id, step)."""
    import pandas as pd

    rows = [{"trial_id": t, **{k: h.get(k) for k in HISTORY_COLUMNS[1:]}} for t, hs in histories.items() for h in hs]
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def write(records: list[TrialRecord], path: Path) -> None:
    """Write atomically: a reader (or a killed driver) never sees half a file."""
    tmp = path.with_suffix(".parquet.tmp")
    to_frame(records).to_parquet(tmp, index=False)
    tmp.replace(path)


def table(frame: pd.DataFrame, top: int | None = None) -> str:
    """The final table: completed trials first, best eval loss first; then pruned, diverged, infeasible, failed."""
    order = {"completed": 0, "pruned": 1, "diverged": 2, "infeasible": 3, "failed": 4}
    shown = frame.assign(_o=frame["status"].map(order)).sort_values(["_o", "eval_loss"], na_position="last")
    columns = TABLE_COLUMNS[:3] + (["objective"] if frame["objective"].notna().any() else []) + TABLE_COLUMNS[3:]
    shown = shown[columns].head(top) if top else shown[columns]
    return shown.to_string(
        index=False,
        formatters={
            "eval_loss": "{:.4f}".format,
            "objective": "{:.4f}".format,
            "lr": "{:.2e}".format,
            "alpha": "{:g}".format,
            "train_s": "{:.1f}".format,
            "cost": "{:.2g}".format,
            "spend": "{:.2g}".format,
        },
    )


def summary(frame: pd.DataFrame) -> str:
    """Counts per status, and the best completed trial's eval loss against the base model's."""
    counts = frame["status"].value_counts()
    parts = [f"{counts.get(s, 0)} {s}" for s in ("completed", "pruned", "failed")]
    parts += [f"{counts[s]} {s}" for s in ("diverged", "infeasible") if counts.get(s, 0)]
    line = f"{len(frame)} trials: " + ", ".join(parts)
    done = frame[frame["status"] == "completed"]
    if len(done):
        best = done.sort_values("eval_loss").iloc[0]
        line += (
            f"; best eval loss {best['eval_loss']:.4f} ({best['trial_id']}: {best['variant']} r={best['rank']}) "
            f"vs base {best['base_eval_loss']:.4f}"
        )
    return line


def objective_summary(frame: pd.DataFrame, objective: str, base_value: float, higher_is_better: bool) -> str:
    """The best completed trial on the primary golden metric against the base model's value."""
    scored = frame[(frame["status"] == "completed") & frame["objective"].notna()]
    if not len(scored):
        return f"{objective}: no completed trial was scored; base {base_value:.4f}"
    best = scored.sort_values("objective", ascending=not higher_is_better).iloc[0]
    gain = best["objective"] - base_value
    return (
        f"{objective}: best {best['objective']:.4f} ({best['trial_id']}: {best['variant']} r={best['rank']}) "
        f"vs base {base_value:.4f} ({gain:+.4f})"
    )
