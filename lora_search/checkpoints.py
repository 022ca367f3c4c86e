"""A trial's checkpoints and progress in its run dir: which checkpoint a restarted trial resumes from, what it
reported before, and how many steps each restart redid. Read and written by the trial's workers.

Every report of a trial (lora_search.callbacks) carries a checkpoint: the PEFT adapter, `layout.REPORT_FILE` (the
metrics reported with it) and `layout.TRAINER_DIR`, a Hugging Face Trainer checkpoint of the adapter's training
state: adapter weights, optimizer, LR scheduler, trainer state (step, tokens seen) and RNG, never the base. A trial
restarts from its newest checkpoint through Ray Train's own restore (`ray.train.get_checkpoint()` in the new
workers):

- a worker process or a whole node died: lora_search.trial sees the lost workers and fits the same Ray Train run
  again (at most `trial.WORKER_LOSSES` times); application errors (failed, diverged, infeasible) are never retried;
- the driver died: Tune restores the sweep and runs the trial again into the same Ray Train run dir (`usable_run`
  checks its snapshot first; a run dir whose snapshot is broken starts over from step 0).

`progress.json` (one per trial under the sweep's Ray storage, `layout.progress_file`, written by rank 0 after every
optimizer step) holds the last step any attempt reached: a restart from step s after progress p redid p - s steps,
at most `budget.eval_every` since every report checkpoints. It also carries the wall time of earlier Tune runs of
the trial (Tune restarts `time_total_s` from 0 when it reruns a trial after the driver died), so a resumed trial's
cost counts all the time it held its devices.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_search.layout import FAILED_FILE, REPORT_FILE, SNAPSHOT_FILE, TRAINER_DIR, TRAINER_STATE, UPLOADED_FILE

KEEP_CHECKPOINTS = 3
"""Checkpoints a trial's Ray Train run keeps. Tune may stop a pruned trial on a result its run is up to two reports
past (one waits in the queue to Tune, one in the report callback that feeds it), so keeping 3 keeps the checkpoint
of the result Tune stopped on (`results.newest_checkpoint` covers a run that got further still)."""


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint a trial can resume from: its report and the trainer state are there."""
    return (checkpoint / REPORT_FILE).is_file() and (checkpoint / TRAINER_DIR / TRAINER_STATE).is_file()


def checkpoint_report(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / REPORT_FILE).read_text())


def usable_run(run_dir: Path) -> bool:
    """Whether Ray Train can restore this run dir: its snapshot parses and every checkpoint it names is complete.

    A driver killed mid-write can leave a truncated snapshot, or one naming a checkpoint that was never fully
    written; Ray would refuse to start from it (or resume from half a checkpoint)."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return False
    try:
        state = json.loads(snapshot.read_text())
        names = [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
        if state.get("latest_checkpoint_result"):
            names.append(state["latest_checkpoint_result"]["checkpoint_dir_name"])
    except (ValueError, KeyError, TypeError):
        return False
    return bool(names) and all(is_complete(run_dir / name) for name in names)


def candidates(run_dir: Path, registered: str | None) -> list[Path]:
    """The checkpoints a restarted trial can resume from, newest step first: every uploaded one in the run dir, and the
    one Ray Train restored (`registered`, its path)."""
    found = [d for d in run_dir.glob("step_*") if (d / UPLOADED_FILE).is_file() and is_complete(d)]
    if registered and is_complete(Path(registered)) and Path(registered) not in found:
        found.append(Path(registered))
    return sorted(found, key=lambda d: checkpoint_report(d)["step"], reverse=True)


def reports_until(log: Path, step: int) -> list[dict[str, Any]]:
    """The trial's reports (`<progress>.reports.jsonl`, one JSON line per report) up to `step`, oldest first, the
    newest of each step; a line cut short by a killed writer is skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if report.get("step", step + 1) <= step:
            by_step[int(report["step"])] = report
    return [by_step[s] for s in sorted(by_step)]


def json_safe(report: dict[str, Any]) -> dict[str, Any]:
    """The report's values that JSON keeps exactly (numbers, strings, bools); NaN stays NaN (Python's JSON)."""
    return {k: v for k, v in report.items() if isinstance(v, str | int | float | bool)}


@dataclass
class Progress:
    """One trial's progress across attempts (`progress.json`)."""

    step: int = 0
    """The last optimizer step any attempt finished."""
    restarts: int = 0
    """Times the trial started again after an attempt ended early (a lost worker or node, a killed driver)."""
    steps_redone: int = 0
    """Steps trained again because an attempt ended after its last checkpoint: sum over restarts of step - resumed."""
    prior_s: float = 0.0
    """Wall seconds of earlier Tune runs of this trial (their `time_total_s`, lost when Tune reran the trial)."""
    tune_run: str = ""
    """Which Tune run of the trial wrote this (lora_search.trial makes one id per call of `run_trial`)."""
    tune_run_s: float = 0.0
    """Seconds since that Tune run started, at the last write."""

    @classmethod
    def read(cls, path: Path) -> Progress | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Atomic: a process killed while writing leaves the previous state."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)


class ProgressTracker:
    """Rank 0's progress bookkeeping for one attempt: `start` once the resumed step is known, `step` after each step."""

    def __init__(self, path: Path, tune_run: str, tune_run_start: float) -> None:
        self.path, self.tune_run, self.tune_run_start = path, tune_run, tune_run_start
        self.progress = Progress(tune_run=tune_run)

    def start(self, resumed_step: int) -> Progress:
        """Count this attempt: a restart when an earlier attempt left progress, with the steps it must redo."""
        earlier = Progress.read(self.path)
        if earlier is not None:
            prior_s = earlier.prior_s + (earlier.tune_run_s if earlier.tune_run != self.tune_run else 0.0)
            self.progress = Progress(
                step=resumed_step,
                restarts=earlier.restarts + 1,
                steps_redone=earlier.steps_redone + max(0, earlier.step - resumed_step),
                prior_s=prior_s,
                tune_run=self.tune_run,
            )
        self.step(resumed_step)
        return self.progress

    def step(self, step: int) -> None:
        self.progress.step = step
        self.progress.tune_run_s = time.time() - self.tune_run_start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.progress.write(self.path)


def kept_error(run_dir: Path) -> BaseException | None:
    """The error an earlier attempt of this trial raised in its own process (`keep_error`), for Tune's retry to raise
    again instead of training a second time; None if there is none."""
    path = run_dir / FAILED_FILE
    if not path.is_file():
        return None
    try:
        error = pickle.loads(path.read_bytes())
    except Exception as e:
        return RuntimeError(f"the trial failed before; its error ({path}) could not be read: {e}")
    return error if isinstance(error, BaseException) else RuntimeError(str(error))


def keep_error(run_dir: Path, error: Exception) -> None:
    """Keep the error a trial's training raised in its run dir (`kept_error`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        (run_dir / FAILED_FILE).write_bytes(pickle.dumps(error))
    except Exception:  # an error that does not pickle: its text, which is what results read
        (run_dir / FAILED_FILE).write_bytes(pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}")))
