"""Where a sweep keeps its files: every name in a sweep dir, a trial's Ray run dir and a checkpoint, in one place.

    <output_dir>/mlflow.db, mlartifacts/       the embedded MLflow store (lora_search.tracking)
    <output_dir>/<sweep>/                      `sweep_dir`
        trials.parquet  history.parquet  frontier.csv  sweep_metrics.json  base_scores.json
        base_lm_eval_results.json  provenance.json  tracking.json  sweep_source.json  index.html  nightly.json
        adapters/<trial_id>/                   a trial's newest adapter (PEFT dir, probe, lora_search.json)
        ray/                                   `RAY_DIR`: Ray Tune's storage
            <sweep>/                           Tune's experiment state (`Tuner.restore`)
            asha_state.json                    ASHA's rungs and stops (lora_search.resume)
            train/trial_<id>/                  `run_dir`: the trial's Ray Train run, its checkpoints step_NNNNNN/
            progress/trial_<id>.json           `progress_file`: the trial's progress across attempts

A checkpoint (`step_NNNNNN/`) holds the PEFT adapter, `REPORT_FILE`, `PROBE_FILE`, `TRAINER_DIR`, after the last
step `LM_EVAL_RESULTS`, and once uploaded `UPLOADED_FILE`. Pure: names and paths only, nothing is read or written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_search.config import Sweep

# --- a sweep dir ------------------------------------------------------------------------------------------------
TRIALS_FILE = "trials.parquet"
"""One row per trial (lora_search.results.TrialRecord); its presence means the sweep finished."""
HISTORY_FILE = "history.parquet"
"""Every reported step of every trial (results.HISTORY_COLUMNS): what ASHA saw."""
FRONTIER_FILE = "frontier.csv"
SWEEP_METRICS_FILE = "sweep_metrics.json"
BASE_SCORES_FILE = "base_scores.json"
BASE_LM_EVAL_RESULTS = "base_lm_eval_results.json"
PROVENANCE_FILE = "provenance.json"
PLAN_FILE = "plan.json"
"""What `lora_search.plan` predicted for the cluster the sweep ran on (`plan.for_run`): the report sets it beside the
measurement."""
TRACKING_FILE = "tracking.json"
"""MLflow tracking URI, experiment and parent run id (lora_search.tracking)."""
SOURCE_FILE = "sweep_source.json"
"""The sweep file a sweep was started from and its sha256 (`lora-search resume NAME` reloads it)."""
REPORT_HTML = "index.html"
NIGHTLY_FILE = "nightly.json"
ADAPTERS_DIR = "adapters"
RAY_DIR = "ray"
ASHA_STATE_FILE = "asha_state.json"

# --- the embedded MLflow store, in the output dir ---------------------------------------------------------------
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"

# --- a Hugging Face model dir (a base) and the cache dir (`default_cache_dir`) -------------------------------------
MODEL_CONFIG = "config.json"
"""A base's architecture (Transformers' CONFIG_NAME): what `lora-search plan` and the base fingerprint read."""
DEMO_BASE_RECORD = "basemodel.json"
"""Beside a built demo base (lora_search.demo_base): its recipe, losses and build time."""

# --- a PEFT adapter dir (an adapter in a checkpoint, in adapters/<trial_id>/, or exported) ------------------------
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
"""PEFT's SAFETENSORS_WEIGHTS_NAME: what every save writes."""

# --- a trial's Ray Train run dir and its checkpoints ------------------------------------------------------------
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of a run's reported checkpoints, in the run dir (ray.train.v2._internal.constants)."""
FAILED_FILE = ".failed.pkl"
"""In a warm trial's run dir: the error its training raised (pickled), so that Tune's retry, meant for a lost
process, raises it again at once."""
REPORT_FILE = "report.json"
"""Beside the adapter in every checkpoint: the metrics reported with it (JSON-safe values only)."""
TRAINER_DIR = "resume"
"""The Hugging Face Trainer checkpoint inside every reported checkpoint (`trainer.train(resume_from_checkpoint=)`)."""
TRAINER_STATE = "trainer_state.json"
"""The Trainer's step and logs, in `TRAINER_DIR`: written last, so its presence means the Trainer's save finished."""
TRAINER_FILES = (
    PEFT_WEIGHTS,
    PEFT_CONFIG,
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    TRAINER_STATE,
    "rng_state*.pth",
)
"""What `TRAINER_DIR` keeps of a Trainer checkpoint: the adapter and its training state, not the tokenizer."""
UPLOADED_FILE = ".uploaded"
"""Written by rank 0 into a checkpoint in the run dir once `ray.train.report` has uploaded it (a synchronous
upload; a warm trial's once it has copied the checkpoint there, `callbacks.report`): Ray Train registers a checkpoint
only when its controller next polls, so a worker or driver that dies in between leaves a complete checkpoint that
Ray's snapshot does not name yet."""
PROBE_FILE = "probe.safetensors"
"""The probe prompts and the trial's logits on them (lora_search.probe), beside every adapter."""
LM_EVAL_RESULTS = "lm_eval_results.json"
"""lm-eval's results for a completed trial's adapter, beside it."""


def sweep_dir(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir).resolve() / name


def ray_storage(sweep_dir: Path) -> Path:
    return sweep_dir / RAY_DIR


def run_dir(storage: str | Path, trial_id: str) -> Path:
    """The trial's Ray Train run dir (a warm trial keeps its checkpoints there too, under the same names)."""
    return Path(storage) / "train" / f"trial_{trial_id}"


def progress_file(storage: str | Path, trial_id: str) -> Path:
    return Path(storage) / "progress" / f"trial_{trial_id}.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def default_tracking_uri(output_dir: str | Path) -> str:
    """The MLflow store a sweep writes when no tracking URI is configured: a sqlite file in its output dir."""
    return f"sqlite:///{Path(output_dir).resolve() / MLFLOW_DB}"


def tracking_uri(sweep: Sweep) -> str:
    """Where the sweep is tracked: `Sweep.tracking_uri`, else $MLFLOW_TRACKING_URI, else the embedded store."""
    return sweep.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(sweep.output_dir)


def default_cache_dir() -> Path:
    """`$LORA_SEARCH_CACHE`, else ~/.cache/lora_search: the demo base's builds, the registry's fingerprints."""
    return Path(os.environ.get("LORA_SEARCH_CACHE", "~/.cache/lora_search")).expanduser()
