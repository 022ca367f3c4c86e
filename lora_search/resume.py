"""Resuming a sweep after its driver died: the scheduler's rungs and stop decisions kept across the restart.

Tune restores the trials and the searcher itself (`Tuner.restore`, lora_search.sweep); a trial cut short trains on
from its newest checkpoint (lora_search.checkpoints). What Tune does not restore is the scheduler's state: both of
the sweep's schedulers (`lora_search.pareto_asha.ParetoASHA`, on quality alone for `scheduler="asha"`) keep it
themselves in `layout.ASHA_STATE_FILE`; `restorable` hands them the file. Nothing here reaches into Ray's private
scheduler internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def restorable(scheduler: Any, state_file: Path) -> Any:
    """The sweep's scheduler (`lora_search.space.scheduler`) keeping its rungs and stop decisions in `state_file`
    (JSON, rewritten after each result), so that they survive a killed driver.

    Tune restores trials and the searcher, but a restored sweep gets the scheduler as it was created: empty rungs.
    Then the trials still to come are judged against no one, and a trial stopped just before the driver died (its
    stop not yet in Tune's saved state) trains on. This one reloads both before its first decision.

    A stop is kept with its step. A trial Tune runs again after the driver died (it ended, pruned or at max_steps,
    after Tune last saved its state) replays its reports from the start (`reports_until`): the replay goes on up to
    that step and stops there, so the trial ends where it ended, not at its first replayed report."""
    from lora_search.pareto_asha import ParetoASHA

    if not isinstance(scheduler, ParetoASHA):
        raise TypeError(
            f"{type(scheduler).__name__} keeps no state across a resume: build the sweep's scheduler with "
            "lora_search.space.scheduler (ASHA or Pareto ASHA, lora_search.pareto_asha)"
        )
    scheduler.state_file = state_file
    return scheduler
