"""What pruning saved and which pruned trials it may have been wrong about (lora_search.pruning, in the report)."""

from __future__ import annotations

import math

import pandas as pd

from lora_search import pruning


def _sweep() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rung at step 10 of 30. `a` and `f` went on (worst loss there 0.50); `b` was a close call, `c` a smaller adapter
    than the frontier's, `d` a lower loss than one that went on, `e` neither."""
    rows = [
        # trial, status, step, loss at 10, bytes, train_cost, pareto
        ("a", "completed", 30, 0.40, 4000, 3.0, True),
        ("f", "completed", 30, 0.50, 8000, 3.0, False),
        ("b", "pruned", 10, 0.53, 5000, 1.0, False),
        ("c", "pruned", 10, 0.90, 1000, 1.0, False),
        ("d", "pruned", 10, 0.45, 9000, 1.0, False),
        ("e", "pruned", 10, 0.95, 9000, 1.0, False),
    ]
    trials = pd.DataFrame(
        [
            {
                "trial_id": t,
                "status": s,
                "step": step,
                "eval_loss": loss,
                "adapter_bytes": b,
                "train_cost": c,
                "cost": c + (1.0 if s == "completed" else 0.0),
                "pareto": p,
                "variant": "lora",
                "rank": 4,
                "targets": "q_proj+v_proj",
            }  # fmt: skip
            for t, s, step, loss, b, c, p in rows
        ]
    )
    history = pd.DataFrame(
        [{"trial_id": t, "step": 10, "eval_loss": loss} for t, _, _, loss, *_ in rows]
        + [{"trial_id": t, "step": 30, "eval_loss": loss - 0.1} for t, s, _, loss, *_ in rows if s == "completed"]
    )
    return trials, history


def test_review_counts_the_steps_and_lists_the_trials_worth_a_second_look() -> None:
    trials, history = _sweep()
    found = pruning.review(trials, history, max_steps=30)
    assert (found.steps_run, found.steps_full) == (2 * 30 + 4 * 10, 6 * 30)
    why = dict(zip(found.missed["trial_id"], found.missed["why"], strict=True))
    assert set(why) == {"b", "c", "d"}  # e: far behind, and no smaller or cheaper than the frontier's `a`
    assert why["b"].startswith("close call: 6.0%")
    assert "smaller adapter" in why["c"] and "close call" not in why["c"]
    assert "lower loss than a trial that went on" in why["d"]
    assert list(found.missed["trial_id"]) == ["d", "b", "c"]  # closest first
    cutoff = found.missed.set_index("trial_id")["cutoff"]
    assert math.isclose(cutoff["b"], 0.50)


def test_a_cheaper_configuration_is_listed_and_no_pruning_lists_nothing() -> None:
    trials, history = _sweep()
    trials.loc[trials["trial_id"] == "e", "train_cost"] = 0.05  # 0.005 a step; the frontier's `a`: 0.1
    assert "cheaper per step" in pruning.review(trials, history, 30).missed.set_index("trial_id").loc["e", "why"]
    done = trials[trials["status"] == "completed"]
    assert pruning.review(done, history, 30).missed.empty
    assert pruning.review(trials, None, 30).missed.empty  # no history: nothing to compare at the rung
