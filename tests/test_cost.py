"""Cost arithmetic and pricing: pure functions, made-up trials."""

from __future__ import annotations

import pytest

from lora_search.config import ConfigError, Pricing, Resources
from lora_search.cost import (
    SPEND_PARTS,
    PrunedTrial,
    configuration_cost,
    devices_per_trial,
    pruning_savings,
    reference_cost,
    spend_line,
    sweep_spend,
    trial_spend,
)


def test_price_lookup_by_device_name() -> None:
    pricing = Pricing(gpu_hour={"H100": 2.5, "H100 NVL": 3.0}, default_gpu_hour=1.0, cpu_core_hour=0.04)
    assert pricing.per_device_hour("NVIDIA H100 80GB HBM3") == 2.5
    assert pricing.per_device_hour("NVIDIA H100 NVL") == 3.0  # the longest matching key wins
    assert pricing.per_device_hour("NVIDIA GeForce RTX 4090") == 1.0
    assert pricing.per_device_hour("cpu") == 0.04


def test_configuration_cost_prices_each_workers_device_seconds() -> None:
    pricing = Pricing(gpu_hour={"H100": 2.5})
    assert devices_per_trial(Resources(workers=2, gpus_per_worker=4)) == 8
    # each of 2 workers: 4 GPUs x 24 min steady training, 4 x 6 min evaluation, at $2.50 per device-hour
    cost = configuration_cost(4 * 1440.0, 4 * 360.0, 2, "NVIDIA H100 80GB HBM3", pricing)
    assert cost.train_cost == pytest.approx(8 * 0.4 * 2.5) and cost.eval_cost == pytest.approx(8 * 0.1 * 2.5)
    assert cost.cost == pytest.approx(10.0) and cost.device_s == pytest.approx(8 * 1800)
    assert devices_per_trial(Resources(workers=1, cpus_per_worker=2)) == 2  # CPU trials hold cores


def test_trial_spend_sums_to_what_the_trial_held() -> None:
    parts = trial_spend(100.0, 2, startup_s=10.0, load_s=5.0, eval_s=15.0, train_s=60.0, restart_s=0.0)
    assert set(parts) == set(SPEND_PARTS)
    assert parts["training"] == 120.0 and parts["evaluation"] == 30.0 and parts["idle"] == pytest.approx(20.0)
    assert sum(parts.values()) == pytest.approx(200.0)
    # parts that overlap past the held time are scaled down to it: the sum stays the wall-clock truth
    over = trial_spend(50.0, 1, startup_s=10.0, load_s=10.0, eval_s=10.0, train_s=70.0, restart_s=0.0)
    assert sum(over.values()) == pytest.approx(50.0) and over["idle"] == pytest.approx(0.0)
    assert over["training"] == pytest.approx(35.0)


def test_packed_trials_spend_their_share_of_the_device() -> None:
    """Two trials packed on one GPU for the same 100 s, each with half of every step: one GPU's 100 s between them,
    every part halved; a share outside (0, 1], as from a report that lost it, counts the device whole."""
    figures = {"startup_s": 10.0, "load_s": 5.0, "eval_s": 15.0, "train_s": 60.0, "restart_s": 0.0}
    whole = trial_spend(100.0, 1, **figures)
    half = trial_spend(100.0, 1, **figures, share=0.5)
    assert {k: 2 * v for k, v in half.items()} == pytest.approx(whole)
    assert sum(half.values()) == pytest.approx(50.0) and half["idle"] == pytest.approx(5.0)
    packed = [trial_spend(100.0, 1, **figures, share=s) for s in (0.5, 0.5)]
    assert sum(sweep_spend(packed, wall_s=100.0, devices_held=1).values()) == pytest.approx(100.0)
    assert sweep_spend(packed, wall_s=100.0, devices_held=1)["waiting"] == 0.0
    for lost in (0.0, -1.0, 1.5):
        assert trial_spend(100.0, 1, **figures, share=lost) == whole


def test_sweep_spend_adds_the_devices_no_trial_held() -> None:
    a = trial_spend(100.0, 1, startup_s=10.0, load_s=0.0, eval_s=10.0, train_s=70.0, restart_s=0.0)
    b = trial_spend(50.0, 1, startup_s=5.0, load_s=0.0, eval_s=5.0, train_s=40.0, restart_s=0.0)
    spend = sweep_spend([a, b], wall_s=120.0, devices_held=2)  # 2 cores for 120 s, trials held 150 core-s
    assert spend["waiting"] == pytest.approx(90.0) and sum(spend.values()) == pytest.approx(240.0)
    assert spend["training"] == pytest.approx(110.0)
    figures = {"spend": 1.0, "spend_device_hours": 240 / 3600} | {
        f"spend_{k}_device_hours": v / 3600 for k, v in spend.items()
    }
    assert spend_line(figures, "USD").startswith("1 USD for 0.0667 device-hours: training 46%")


def test_pruning_savings_extrapolates_the_steps_not_run() -> None:
    pruned = [PrunedTrial(step=50, train_cost=0.02), PrunedTrial(step=150, train_cost=0.06), PrunedTrial(0, 0.0)]
    # (200-50) x 0.0004 + 0.01 eval = 0.07; (200-150) x 0.0004 + 0.01 = 0.03; a trial stopped at step 0 adds nothing
    assert pruning_savings(pruned, 200, 0.01) == pytest.approx(0.07 + 0.03)
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
