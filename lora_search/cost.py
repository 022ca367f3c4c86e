"""What a configuration costs, what the sweep spent, and what ASHA's pruning saved: pure functions over trial records.

    cost = device-seconds x price per device-hour / 3600        (lora_search.config.Pricing)

Two figures, never mixed:
- **A configuration's cost** (`configuration_cost`; the frontier's cost axis, MLflow's `cost`): the device-seconds
  its training and evaluation take at the trial's own steady rate, for the tokens it trained. On CPU the clock is the
  worker process's CPU time (core-seconds), on GPU the time its devices were busy (`callbacks.device_clock`). Start-up,
  imports, loading the base, waiting, retries and whatever else the machine runs are not in it: it is what one more
  run of this configuration at this budget costs, the same on a busy and an idle machine.
- **The sweep's spend** (`trial_spend`, `sweep_spend`): every device-second the sweep held, wall clock x devices,
  broken down into `SPEND_PARTS`; the parts sum to the wall-clock truth. A slower or busier machine spends more; the
  configurations do not cost more. A packed trial (`Resources.pack`) held only its share of its device
  (`DEVICE_SHARE`), so that the trials of one pack together spend the device once, not once each.

Pruning savings are an estimate of what the pruned trials would have cost had ASHA let them run the full
budget: each pruned trial's configuration cost per optimizer step times the steps it did not run, plus the mean
evaluation cost of the completed trials (a pruned trial is never scored).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_search.config import Pricing, Resources


def devices_per_trial(resources: Resources) -> float:
    per_worker = resources.gpus_per_worker if resources.gpus_per_worker > 0 else resources.cpus_per_worker
    return resources.workers * per_worker


@dataclass(frozen=True)
class TrialCost:
    train_device_s: float
    eval_device_s: float
    train_cost: float
    eval_cost: float

    @property
    def cost(self) -> float:
        return self.train_cost + self.eval_cost

    @property
    def device_s(self) -> float:
        return self.train_device_s + self.eval_device_s


def configuration_cost(
    train_device_s: float, eval_device_s: float, workers: int, device_name: str, pricing: Pricing
) -> TrialCost:
    """A configuration's cost from one worker's device-seconds of steady training and of evaluation (eval-loss
    evaluations and golden scoring), for `workers` workers (each does the same work)."""
    price = pricing.per_device_hour(device_name or "cpu")
    train, evaluation = train_device_s * workers, eval_device_s * workers
    return TrialCost(train, evaluation, train * price / 3600, evaluation * price / 3600)


SPEND_PARTS = ("training", "evaluation", "startup", "base_load", "restarts", "idle")
"""Where a trial's held device-seconds went: training steps; evaluation (the base's step-0 eval, eval-loss evaluations,
golden scoring); start-up (worker group, imports, the Trainer's construction and prepare); base_load (base, adapter,
data); restarts (what earlier attempts held, and the steps a restart trained again); idle (held, none of the above:
reporting, checkpoint uploads, Ray's own bookkeeping). The sweep adds `waiting`: devices it held with no trial on
them (`sweep_spend`)."""


DEVICE_SHARE = "device_share"
"""The report key of the fraction of its devices a trial held, in (0, 1]: a packed trial's share of the pack steps it
took part in (its real tokens over the step's, weighted by each step's time: `pack_host`), which `trial_spend` holds
it to. Trials without it (solo ones, older sweeps) held their devices whole. E.g. two adapters of equal batches
training together for 100 s on one GPU: 0.5 each, 50 GPU-seconds each, 100 together. The share is applied to the
trial's whole wall time: its start-up, its evaluations and its wait while the host scores another trial count at it
too, so the trials of a pack split the device's time between them in about the proportion they used its steps."""


def trial_spend(
    held_s: float,
    devices: float,
    *,
    startup_s: float,
    load_s: float,
    eval_s: float,
    train_s: float,
    restart_s: float,
    share: float = 1.0,
) -> dict[str, float]:
    """Device-seconds per `SPEND_PARTS` of a trial that held `share` (`DEVICE_SHARE`) of `devices` for `held_s` wall
    seconds; they sum to held_s x devices x share. `train_s` is training wall time with its evaluations (`eval_s` of
    which are evaluations) and the other figures are wall seconds. Parts measured with some overlap that exceed the
    held time are scaled down to it, so the sum stays the wall-clock truth. A share outside (0, 1] (a report that
    lost it) counts as 1."""
    devices *= share if 0 < share <= 1 else 1.0
    parts = {
        "training": max(train_s, 0.0),
        "evaluation": max(eval_s, 0.0),
        "startup": max(startup_s, 0.0),
        "base_load": max(load_s, 0.0),
        "restarts": max(restart_s, 0.0),
    }
    known = sum(parts.values())
    held_s = max(held_s, 0.0)
    scale = held_s / known if known > held_s else 1.0
    out = {k: v * scale * devices for k, v in parts.items()}
    out["idle"] = (held_s - known * scale) * devices
    return out


def sweep_spend(trials: list[dict[str, float]], wall_s: float, devices_held: float) -> dict[str, float]:
    """The sweep's spend, device-seconds per part: its trials' `trial_spend` summed, plus `waiting`, the devices the
    sweep held (`devices_held` for `wall_s`) that no trial held. The parts sum to wall_s x devices_held, or to the
    trials' sum where that is larger (trials Tune ran in an earlier driver, before a resume)."""
    out = {k: sum(t.get(k, 0.0) for t in trials) for k in SPEND_PARTS}
    out["waiting"] = max(wall_s * devices_held - sum(out.values()), 0.0)
    return out


@dataclass(frozen=True)
class PrunedTrial:
    step: int
    """The optimizer step ASHA stopped it at."""
    train_cost: float
    """The configuration cost of its training up to `step` (`configuration_cost`)."""


def pruning_savings(pruned: list[PrunedTrial], max_steps: int, mean_eval_cost: float) -> float:
    """Estimated configuration cost the pruned trials would have added by running to `max_steps` and being scored:
    each one's training cost per step x the steps it did not run, plus `mean_eval_cost` (the completed trials')."""
    return sum((max_steps - t.step) * t.train_cost / t.step + mean_eval_cost for t in pruned if t.step > 0)


def reference_cost(resources: Resources, pricing: Pricing, device_name: str) -> float:
    """The hypervolume's cost reference: `pricing.reference_trial_hours` of one trial's devices."""
    hours = pricing.reference_trial_hours * devices_per_trial(resources)
    return hours * pricing.per_device_hour(device_name or "cpu")


def spend_line(figures: dict[str, float], currency: str) -> str:
    """The sweep's spend and where it went, from its figures (`spend`, `spend_device_hours`, `spend_<part>_...`)."""
    total = figures.get("spend_device_hours", 0.0)
    parts = [(k, figures.get(f"spend_{k}_device_hours", 0.0)) for k in (*SPEND_PARTS, "waiting")]
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts) if total > 0 else "nothing measured"
    return f"{figures.get('spend', 0.0):.4g} {currency} for {total:.3g} device-hours: {shares}"
