"""Nightly regression verdicts: pure checks on made-up summaries, then whole nightly runs against a baseline."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from lora_search.nightly import Summary, compare, passed, table

REPO = Path(__file__).resolve().parents[1]


def _summary(**changes) -> Summary:
    base = Summary(
        sweep="nightly",
        quality_key="tiny_mood/acc",
        higher_is_better=True,
        best=0.90,
        best_stderr=0.03,
        best_trial="t1",
        hypervolume=0.50,
        cost_per_trial=0.010,
        tokens_per_s=1000.0,
        trials=4,
        failed=0,
        failed_reasons=(),
        git_commit="abc",
        created=0.0,
    )
    return dataclasses.replace(base, **changes)


def test_the_same_run_twice_passes() -> None:
    verdicts = compare(_summary(), _summary())
    assert passed(verdicts) and len(verdicts) == 5
    assert "REGRESSION" not in table(verdicts)


def test_quality_tolerance_comes_from_lm_eval_stderr() -> None:
    tolerance = 1.96 * math.hypot(0.03, 0.03)  # 0.083
    within = compare(_summary(best=0.90 - 0.08), _summary())
    assert passed(within) and within[0].tolerance == pytest.approx(tolerance)
    beyond = compare(_summary(best=0.90 - 0.09), _summary())
    assert not beyond[0].passed and "beyond 1.96 combined standard errors" in beyond[0].reason
    # A noisier golden set (larger stderr) tolerates a larger drop: the tolerance is the data's, not a constant.
    assert passed(compare(_summary(best=0.81, best_stderr=0.06), _summary(best_stderr=0.06)))
    # Lower-is-better quality (eval loss) regresses when it rises.
    loss = dict(quality_key="eval_loss", higher_is_better=False, best_stderr=0.0)
    assert not compare(_summary(best=0.5, **loss), _summary(best=0.4, **loss))[0].passed


def test_hypervolume_cost_throughput_and_failures() -> None:
    verdicts = {v.check: v for v in compare(_summary(hypervolume=0.3), _summary())}
    assert not verdicts["frontier hypervolume"].passed and verdicts["best tiny_mood/acc"].passed
    slow = {v.check: v for v in compare(_summary(cost_per_trial=0.014, tokens_per_s=650.0), _summary())}
    assert (
        not slow["cost per completed trial"].passed
        and "+40% worse, beyond 30%" in slow["cost per completed trial"].reason
    )
    assert not slow["tokens/s (median)"].passed
    assert passed(compare(_summary(cost_per_trial=0.012, tokens_per_s=800.0), _summary()))  # 20%: jitter
    failed = compare(_summary(failed=1, failed_reasons=("adapter does not change the model's outputs",)), _summary())
    assert [v.check for v in failed if not v.passed] == ["failed trials"]
    assert "does not change the model's outputs" in failed[-1].reason
    nothing = compare(_summary(best=math.nan, hypervolume=math.nan), _summary())
    assert not nothing[0].passed and nothing[0].reason == "no completed trial was scored"
