"""What one trial is and what it reports, as typed records shared by the worker, the driver and the outputs.

- `TrialParams`: the point of the search space a trial trains; the one definition of the searched hyperparameters
  (`PARAMS` is its field names: Tune's config keys, MLflow params, the columns of trials.parquet). The variant
  builders' `variants.Adapter` and the driver's `results.TrialRecord` extend it.
- `StepReport`: what a trial reports at every evaluation (built by lora_search.callbacks, sent to Tune, saved in
  every checkpoint's report.json, read back by lora_search.results and lora_search.tracking);
- how a trial ends (`Status`): the errors a worker raises for a diverged or infeasible trial, and how the driver
  reads them back from the error's text (`stopped_status`, `stopped_figures`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Status = Literal["completed", "pruned", "failed", "diverged", "infeasible"]
GOLDEN_PREFIX = "golden/"
"""Report keys of golden-set metrics: `golden/<task>/<metric>`."""


@dataclass(frozen=True)
class TrialParams:
    """The point of the search space one trial trains (Tune's sampled config, typed)."""

    variant: str
    rank: int
    alpha: float
    targets: str
    """`lora_search.targets.target_key` form: a preset name or names joined by '+'."""
    lr: float
    dropout: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialParams:
        """From a sampled Tune config (`trial_params`), each value as its field's type."""
        values = trial_params(config)
        return TrialParams(**{f.name: _KINDS[f.type](values[f.name]) for f in fields(TrialParams)})


PARAMS = tuple(f.name for f in fields(TrialParams))
"""variant, rank, alpha, targets, lr, dropout."""
_KINDS = {"str": str, "int": int, "float": float}


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The `PARAMS` a sampled Tune config holds, as Tune sampled them; alpha resolved from `alpha_over_rank` when the
    space gives that instead (lora_search.space)."""
    values = {k: config[k] for k in PARAMS if k in config}
    if "alpha" not in values:
        values["alpha"] = float(config["alpha_over_rank"] * config["rank"])
    return values


NAN = float("nan")


@dataclass(frozen=True)
class StepReport:
    """One evaluation's report of a trial: Tune's result (ASHA decides on `eval_loss` at `step`) and the checkpoint's
    report.json. Every field has a default, so a report of an older run, or a history cell left empty, reads back."""

    step: int = 0
    eval_loss: float = NAN
    base_eval_loss: float = NAN
    """The base model's eval loss (the trial's step-0 eval), reported with every result."""
    train_loss: float = NAN
    trainable_params: int = 0
    train_s: float = 0.0
    """Training seconds, earlier attempts' included (up to the checkpoint resumed from)."""
    # Cold start, in order (`results.TrialRecord` says what each covers): startup_s (of which imports_s), load_s,
    # prepare_s, base_eval_s. A resumed trial reports its own attempt's figures.
    startup_s: float = 0.0
    imports_s: float = 0.0
    load_s: float = 0.0
    base_reused: bool = False
    prepare_s: float = 0.0
    base_eval_s: float = 0.0
    device_s: float = 0.0
    """Device-seconds of training: what a cloud bill counts (devices held x time), summed over the workers."""
    tokens: int = 0
    tokens_per_s: float = 0.0
    steady_tokens_per_s: float = NAN
    steady_train_device_s: float = 0.0
    """One worker's device-seconds for the tokens trained so far at its steady rate (`callbacks.device_clock`: CPU
    core-seconds, GPU busy seconds x its GPUs): what the configuration's training costs (lora_search.cost)."""
    eval_device_s: float = 0.0
    """One worker's device-seconds of the eval-loss evaluations after step 0."""
    eval_wall_s: float = 0.0
    """Wall seconds of those evaluations (the sweep's spend on them)."""
    peak_mem_bytes: int = 0
    peak_mem_kind: str = ""
    """"cuda" (the allocator's peak) or "rss" (the process's peak resident memory)."""
    device_name: str = ""
    worker_nodes: str = ""
    strategy: str = ""
    fast_path: str = ""
    gpu_in_use_at_start_bytes: int = 0
    restarts: int = 0
    steps_redone: int = 0
    prior_s: float = 0.0
    """Rank 0's progress across attempts (lora_search.checkpoints.Progress); 0 in other ranks' reports."""
    adapter_bytes: int = 0
    objective: float = NAN
    """The final step's primary golden metric (`Evals.objective`), when the sweep scores golden sets."""
    objective_higher_is_better: bool = True
    eval_s: float = 0.0
    golden_device_s: float = 0.0
    """One worker's device-seconds of the golden-set scoring (`eval_s` is its wall time)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Golden metrics, `task/metric` -> value; reported flat as `golden/task/metric`."""

    def metrics(self) -> dict[str, Any]:
        """The report as Tune and report.json take it: flat, golden scores under `GOLDEN_PREFIX`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scores"}
        out.update({f"{GOLDEN_PREFIX}{k}": v for k, v in self.scores.items()})
        return out

    @classmethod
    def from_metrics(cls, values: dict[str, Any]) -> StepReport:
        """A report back from Tune's result, a history row or report.json: missing, empty or NaN counts take the
        default, other keys (Tune's own, `checkpoint_path`, ...) are left out."""
        kept: dict[str, Any] = {}
        for f in fields(cls):
            value = values.get(f.name)
            if f.name == "scores" or value is None:
                continue
            kind = type(f.default)
            if kind is float:
                kept[f.name] = float(value)
            elif isinstance(value, int | float) and not math.isfinite(value):
                continue  # an int or str field a table left empty (NaN)
            else:
                kept[f.name] = kind(value)
        scores = {k.removeprefix(GOLDEN_PREFIX): float(v) for k, v in values.items() if k.startswith(GOLDEN_PREFIX)}
        return cls(**kept, scores=scores)


class LossDivergedError(RuntimeError):
    """A trial's train or eval loss became NaN or infinite. Raised by the worker at the report where it shows (ASHA
    never records the value, so its cutoffs stay finite); the trial ends as `diverged`, is never retried, and a
    searcher is told it errored, not that it scored. Build it with `diverged` (one message argument, so that it
    pickles across Ray processes)."""


class InfeasibleError(RuntimeError):
    """A trial ran out of device memory, or past `Resources.memory_limit_gb`. The trial ends as `infeasible` (its
    configuration cannot run on these devices: not retried, kept off the frontier), with the peak it reached. Build
    it with `infeasible`."""


def diverged(which: str, value: float, step: int) -> LossDivergedError:
    return LossDivergedError(f"{which}={value} at step {step}: the loss diverged (lower the learning rate)")


def infeasible(what: str, peak_bytes: int, step: int) -> InfeasibleError:
    return InfeasibleError(
        f"{what} at step {step}, peak_mem_bytes={peak_bytes} ({peak_bytes / 2**30:.2f} GiB): infeasible on these "
        "devices (a smaller micro-batch, rank or max_length, a 4-bit variant, or a sharding strategy may fit)"
    )


_STOPPED = {"diverged": LossDivergedError.__name__, "infeasible": InfeasibleError.__name__}
_DIVERGED = re.compile(r"(train_loss|eval_loss)=(\S+) at step (\d+)")
_PEAK = re.compile(r"at step (\d+), peak_mem_bytes=(\d+)")


def stopped_status(reason: str) -> Status:
    """The status of a trial that raised with `reason`: diverged, infeasible, or failed."""
    for status, name in _STOPPED.items():
        if name in reason:
            return status  # type: ignore[return-value]
    return "failed"


def stopped_figures(reason: str) -> dict[str, Any]:
    """What a diverged or infeasible trial's error says: the real loss value and its step, or the peak memory."""
    if m := _DIVERGED.search(reason):
        return {m.group(1): float(m.group(2)), "step": int(m.group(3))}
    if m := _PEAK.search(reason):
        return {"step": int(m.group(1)), "peak_mem_bytes": int(m.group(2))}
    return {}


def error_reason(error: BaseException | str | None) -> str:
    """The last meaningful line of a trial's error (Ray wraps the worker's traceback several times)."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~", "The above exception", "Traceback")):
            return line[:500]
    return type(error).__name__
