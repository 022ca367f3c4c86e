"""Cost arithmetic and pricing: pure functions, made-up trials."""

from __future__ import annotations

import pytest

from lora_search.config import ConfigError, Pricing, Resources
from lora_search.cost import PrunedTrial, devices_per_trial, pruning_savings, reference_cost, trial_cost


def test_price_lookup_by_device_name() -> None:
    pricing = Pricing(gpu_hour={"H100": 2.5, "H100 NVL": 3.0}, default_gpu_hour=1.0, cpu_core_hour=0.04)
    assert pricing.per_device_hour("NVIDIA H100 80GB HBM3") == 2.5
    assert pricing.per_device_hour("NVIDIA H100 NVL") == 3.0  # the longest matching key wins
    assert pricing.per_device_hour("NVIDIA GeForce RTX 4090") == 1.0
    assert pricing.per_device_hour("cpu") == 0.04


def test_trial_cost_counts_every_device_for_the_whole_trial() -> None:
    pricing = Pricing(gpu_hour={"H100": 2.5})
    devices = devices_per_trial(Resources(workers=2, gpus_per_worker=4))
    assert devices == 8
    # 30 min held, of which 6 min golden scoring: 8 x 24 min training, 8 x 6 min eval, at $2.50 per device-hour.
    cost = trial_cost(1800.0, 360.0, devices, "NVIDIA H100 80GB HBM3", pricing)
    assert cost.train_cost == pytest.approx(8 * 0.4 * 2.5) and cost.eval_cost == pytest.approx(8 * 0.1 * 2.5)
    assert cost.cost == pytest.approx(10.0) and cost.device_s == pytest.approx(8 * 1800)
    assert devices_per_trial(Resources(workers=1, cpus_per_worker=2)) == 2  # CPU trials pay per core


def test_pruning_savings_extrapolates_the_steps_not_run() -> None:
    pricing = Pricing(cpu_core_hour=3.6)  # 0.001 per core-second
    pruned = [
        PrunedTrial(step=50, train_s=10.0, device_name="cpu"),
        PrunedTrial(step=150, train_s=30.0, device_name="cpu"),
    ]
    # (200-50) x 0.2 s + 5 s eval = 35 s; (200-150) x 0.2 s + 5 s = 15 s; 2 cores.
    assert pruning_savings(pruned, 200, 5.0, 2, pricing) == pytest.approx((35 + 15) * 2 * 0.001)
    assert reference_cost(Resources(workers=1, cpus_per_worker=2), Pricing(cpu_core_hour=0.5), "cpu") == 1.0


def test_bad_prices_are_reported_with_the_field(tmp_path) -> None:
    from lora_search import BaseModel, Dataset, Sweep

    with pytest.raises(ConfigError) as e:
        Sweep(
            name="s",
            base=BaseModel("m"),
            dataset=Dataset(str(tmp_path / "d.jsonl")),
            pricing=Pricing(gpu_hour={"H100": -1.0}, reference_trial_hours=0),
        )
    text = str(e.value)
    assert "pricing.gpu_hour['H100'] = -1.0: must be >= 0" in text
    assert "pricing.reference_trial_hours = 0: must be > 0" in text
