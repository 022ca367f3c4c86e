"""What a sweep's pruning saved, and which pruned trials it may have been wrong about: from the sweep's own trials.

ASHA ranks the trials at a rung by eval loss alone, and the frontier has three axes. Two kinds of pruned trial are
worth a second look, and the report lists them:

- **close calls**: stopped at a rung with an eval loss within `CLOSE` (relative) of the worst trial that went on
  from that rung, or below it (asynchronous ASHA compares a trial with the ones that reached the rung before it);
  the next evaluation's noise could have ranked them the other way;
- **off the loss axis**: an adapter smaller, or a configuration cheaper per step, than every completed frontier
  trial's. Loss-only pruning cannot see that the frontier wants such a trial at a somewhat higher loss.

Neither is proof of a miss (the sweep never saw those trials' ends); they are where to look, and what a re-run with
a larger `grace_period` or a frontier-aware scheduler would change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

CLOSE = 0.10
"""A pruned trial within this relative eval-loss gap of the worst trial that went on from its rung is a close call."""

MISSED_COLUMNS = (
    "trial_id",
    "variant",
    "rank",
    "targets",
    "adapter_bytes",
    "rung",
    "eval_loss",
    "cutoff",
    "gap",
    "why",
)


@dataclass(frozen=True)
class Review:
    steps_run: int
    """Optimizer steps every trial trained, summed."""
    steps_full: int
    """What every trial at max_steps would have trained."""
    missed: pd.DataFrame
    """Pruned trials worth a second look (`MISSED_COLUMNS`), closest calls first."""


def review(trials: pd.DataFrame, history: pd.DataFrame | None, max_steps: int) -> Review:
    """`trials` (trials.parquet) and `history` (history.parquet: trial_id, step, eval_loss) of a finished sweep."""
    import pandas as pd

    steps_run = int(trials["step"].sum())
    missed: list[dict[str, object]] = []
    pruned = trials[trials["status"] == "pruned"]
    frontier = trials[trials["status"].eq("completed") & trials.get("pareto", False)]
    if len(pruned) and history is not None and len(history):
        smallest = frontier["adapter_bytes"].min() if len(frontier) else math.nan
        # training cost a step: the completed trials' golden scoring would make every pruned one look cheaper
        rate = trials["train_cost"] / trials["step"].where(trials["step"] > 0)
        cheapest = rate[frontier.index].min() if len(frontier) else math.nan
        final_step = dict(zip(trials["trial_id"], trials["step"], strict=True))
        at = history.dropna(subset=["eval_loss"]).drop_duplicates(["trial_id", "step"], keep="last")
        for i, trial in pruned.iterrows():
            rung = int(trial["step"])
            here = at[at["step"] == rung]
            went_on = here[here["trial_id"].map(final_step).fillna(0) > rung]
            own = here.loc[here["trial_id"] == trial["trial_id"], "eval_loss"]
            loss = float(own.iloc[-1]) if len(own) else float(trial["eval_loss"])
            cutoff = float(went_on["eval_loss"].max()) if len(went_on) else math.nan
            gap = (loss - cutoff) / cutoff if math.isfinite(cutoff) and cutoff > 0 else math.nan
            why = []
            if gap < 0:
                why.append(f"a lower loss than a trial that went on from step {rung}")
            elif gap <= CLOSE:
                why.append(f"close call: {gap:.1%} above the worst that went on")
            if trial["adapter_bytes"] < smallest:
                why.append("a smaller adapter than every frontier trial's")
            if rate[i] < cheapest:
                why.append("cheaper per step than every frontier trial")
            if why:
                missed.append(
                    {
                        **{k: trial[k] for k in ("trial_id", "variant", "rank", "targets", "adapter_bytes")},
                        "rung": rung,
                        "eval_loss": loss,
                        "cutoff": cutoff,
                        "gap": gap,
                        "why": "; ".join(why),
                    }
                )
    frame = pd.DataFrame(missed, columns=list(MISSED_COLUMNS))
    if len(frame):
        frame = frame.sort_values("gap", na_position="last").reset_index(drop=True)
    return Review(steps_run=steps_run, steps_full=int(len(trials) * max_steps), missed=frame)
