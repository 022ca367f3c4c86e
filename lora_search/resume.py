"""Resuming a sweep after its driver died: the scheduler's rungs and stop decisions kept across the restart.

Tune restores the trials and the searcher itself (`Tuner.restore`, lora_search.sweep); a trial cut short trains on
from its newest checkpoint (lora_search.checkpoints). What Tune does not restore is the scheduler's state:
`restorable` keeps it in `layout.ASHA_STATE_FILE`, for Ray's ASHA by reaching into its brackets, for Pareto ASHA
through its own `state_file`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def restorable(asha: Any, state_file: Path) -> Any:
    """ASHA (Ray's, or `lora_search.pareto_asha.ParetoASHA`) whose rungs and stop decisions survive a killed driver, in
    `state_file` (JSON, rewritten after each result). Pareto ASHA keeps its own state: it is handed the file.

    Tune restores trials and the searcher, but a restored sweep gets the scheduler as it was created: empty rungs.
    Then the trials still to come are judged against no one, and a trial stopped just before the driver died (its
    stop not yet in Tune's saved state) trains on. This one reloads both before its first decision.

    A stop is kept with its step. A trial Tune runs again after the driver died (it ended, pruned or at max_steps,
    after Tune last saved its state) replays its reports from the start (`reports_until`): the replay goes on up to
    that step and stops there, so the trial ends where it ended, not at its first replayed report."""
    from ray.tune.schedulers import ASHAScheduler

    from lora_search.pareto_asha import ParetoASHA

    if isinstance(asha, ParetoASHA):
        asha.state_file = state_file
        return asha

    class RestorableASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            self._load()
            step = int(result.get(self._time_attr, 0))
            if trial.trial_id in self._stopped:  # stopped before the driver died: this run only repeats its reports
                return self.STOP if step >= self._stopped[trial.trial_id] else self.CONTINUE
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == self.STOP:
                self._stopped[trial.trial_id] = step
            self._save()
            return decision

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
            self._load()
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

        def _load(self) -> None:
            if self._loaded:
                return
            self._loaded = True
            if not self._state_file.is_file():
                return
            state = json.loads(self._state_file.read_text())
            for bracket, rungs in zip(self._brackets, state["rungs"], strict=True):
                for (_, recorded), saved in zip(bracket._rungs, rungs, strict=True):
                    recorded.update(saved)
            stopped = state["stopped"]  # {trial id: step}; a list (no steps): stop at the first report
            self._stopped.update(stopped if isinstance(stopped, dict) else dict.fromkeys(stopped, 0))

        def _save(self) -> None:
            rungs = [[{k: float(v) for k, v in recorded.items()} for _, recorded in b._rungs] for b in self._brackets]
            tmp = self._state_file.with_name(f".{self._state_file.name}.tmp")
            tmp.write_text(json.dumps({"rungs": rungs, "stopped": self._stopped}))
            tmp.replace(self._state_file)

    scheduler = RestorableASHA.__new__(RestorableASHA)
    scheduler.__dict__.update(asha.__dict__)
    scheduler._state_file, scheduler._loaded, scheduler._stopped = state_file, False, {}
    return scheduler
