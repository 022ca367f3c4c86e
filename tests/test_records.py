"""The trial records (lora_search/records.py): the searched hyperparameters and a step's report, round-tripped."""

from __future__ import annotations

import math

from lora_search.records import (
    GOLDEN_PREFIX,
    PARAMS,
    StepReport,
    TrialParams,
    stopped_figures,
    stopped_status,
    trial_params,
)
from lora_search.results import TrialRecord
from lora_search.variants import Adapter


def test_params_are_one_definition() -> None:
    config = {"variant": "lora", "rank": 4, "alpha_over_rank": 2.0, "targets": "attention", "lr": 1e-3, "dropout": 0.0}
    params = TrialParams.from_config(config)
    assert params.alpha == 8.0 and PARAMS == ("variant", "rank", "alpha", "targets", "lr", "dropout")
    assert trial_params(config) == {k: getattr(params, k) for k in PARAMS}
    # every searched value is a trials.parquet column and reaches the variant builders, from this one definition
    assert issubclass(TrialRecord, TrialParams) and issubclass(Adapter, TrialParams)


def test_step_report_round_trips_and_reads_empty_cells() -> None:
    report = StepReport(step=25, eval_loss=1.5, restarts=1, scores={"tiny_mood/acc": 0.75}, worker_nodes="n1")
    metrics = report.metrics()
    assert metrics[f"{GOLDEN_PREFIX}tiny_mood/acc"] == 0.75 and "scores" not in metrics
    assert StepReport.from_metrics({**metrics, "time_total_s": 3.0, "checkpoint_path": "/x"}) == report
    # a history row of an older report: NaN where a count or a name was never reported
    old = StepReport.from_metrics({"step": 50.0, "eval_loss": 1.2, "restarts": math.nan, "worker_nodes": math.nan})
    assert (old.step, old.restarts, old.worker_nodes) == (50, 0, "")
    assert math.isnan(old.base_eval_loss)


def test_a_stopped_trials_error_says_how_it_ended() -> None:
    from lora_search.records import diverged, infeasible

    assert stopped_status(repr(diverged("eval_loss", math.inf, 7))) == "diverged"
    assert stopped_figures(str(diverged("eval_loss", math.inf, 7))) == {"eval_loss": math.inf, "step": 7}
    assert stopped_status(repr(infeasible("CUDA out of memory", 2**30, 3))) == "infeasible"
    assert stopped_status("ValueError: something else") == "failed"
