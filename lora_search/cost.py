"""What each trial cost, what the sweep cost, and what ASHA's pruning saved: pure functions over trial records.

    cost = device-seconds x price per device-hour / 3600        (lora_search.config.Pricing)

A trial holds `devices` devices (workers x GPUs per worker; on CPU, workers x cores per worker) from the start
of its Ray Train run to its last report. Training cost counts all of that time except golden-set scoring
(start-up and model loading are paid for too); eval cost counts the scoring.

Pruning savings are an estimate of what the pruned trials would have cost had ASHA let them run the full
budget: each pruned trial's measured seconds per optimizer step times the steps it did not run, plus the mean
golden-set scoring time of the completed trials (a pruned trial is never scored).
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


def trial_cost(trial_s: float, eval_s: float, devices: float, device_name: str, pricing: Pricing) -> TrialCost:
    """`trial_s`: wall seconds the trial held its devices (eval included); `eval_s`: of which golden scoring."""
    price = pricing.per_device_hour(device_name or "cpu")
    train_device_s = max(trial_s - eval_s, 0.0) * devices
    eval_device_s = eval_s * devices
    return TrialCost(train_device_s, eval_device_s, train_device_s * price / 3600, eval_device_s * price / 3600)


@dataclass(frozen=True)
class PrunedTrial:
    step: int
    """The optimizer step ASHA stopped it at."""
    train_s: float
    """Seconds of pure training up to `step` (no start-up, no loading)."""
    device_name: str


def pruning_savings(
    pruned: list[PrunedTrial], max_steps: int, mean_eval_s: float, devices: float, pricing: Pricing
) -> float:
    """Estimated cost the pruned trials would have added by running to `max_steps` and being scored."""
    saved = 0.0
    for t in pruned:
        if t.step <= 0:
            continue
        seconds = (max_steps - t.step) * t.train_s / t.step + mean_eval_s
        saved += seconds * devices * pricing.per_device_hour(t.device_name or "cpu") / 3600
    return saved


def reference_cost(resources: Resources, pricing: Pricing, device_name: str) -> float:
    """The hypervolume's cost reference: `pricing.reference_trial_hours` of one trial's devices."""
    hours = pricing.reference_trial_hours * devices_per_trial(resources)
    return hours * pricing.per_device_hour(device_name or "cpu")
