"""MLflow tracking: one parent run per sweep, a nested child run per trial, the Pareto frontier marked.

    python sweeps/tiny.py                  # tracks to the embedded store by default
    lora-search ui                         # MLflow UI for it on http://127.0.0.1:5000
    MLFLOW_TRACKING_URI=http://mlflow.internal:5000 python sweeps/tiny.py   # or Sweep(tracking_uri=...)

Where: `Sweep.tracking_uri`, else $MLFLOW_TRACKING_URI, else the embedded store: SQLite at
`<output_dir>/mlflow.db`, artifacts under `<output_dir>/mlartifacts`. The experiment is named after the sweep.

What:
- parent run `<sweep>`: the sweep's settings as params; at the end the sweep's cost, what ASHA's pruning saved,
  the frontier's hypervolume, `frontier.csv`, and the base model's golden scores.
- child run `trial_<id>` per trial: its hyperparameters as params, eval/train loss and throughput at every
  reported step, final golden scores, trainable params, adapter bytes, device-seconds and cost; completed trials
  log `adapter/` (a PEFT adapter dir) and `lm_eval_results.json`. Frontier trials are tagged `pareto=true`, their
  adapters logged as MLflow 3 LoggedModels of their runs with the golden scores linked to the golden sets
  (lora_search.logged_models: `mlflow.search_logged_models` ranks them), and registered as versions of the
  registered model `<sweep>-adapters`, tagged with the base's fingerprint (lora_search.registry refuses to load them
  onto another base).
- status, exactly Ray's trial state: completed -> FINISHED; pruned -> FINISHED with `lora_search.status=pruned`
  and `lora_search.stopped_at_step`; failed -> FAILED with `lora_search.failure_reason`; driver interrupted ->
  KILLED (a resumed sweep sets it again).
- provenance tags on every run: git commit and dirty flag, package versions, eval task versions, sweep name,
  base model id, revision and fingerprint; children also their Ray trial id.
- never a secret: every param and tag value passes `lora_search.provenance.redact` (the values of `SECRET_ENV`
  variables, anything shaped like a Hugging Face token, a URL's password become `***`), and a tracking URI with a
  password in it is refused by `problems` (MLflow and libpq read credentials from the environment instead).

Runs nest through MLflow's `mlflow.parentRunId` tag, the one `mlflow.start_run(nested=True)` sets; Ray's
MLflowLoggerCallback makes flat runs, so the driver logs through `MlflowClient` from a Tune callback. Resume
finds the parent through `<sweep dir>/tracking.json` and the children through their `lora_search.trial_id` tag.
A tracking failure never stops a sweep: it is printed once, live logging stops, and the results on disk stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_search import logged_models
from lora_search.config import Problem, Sweep
from lora_search.layout import (
    BASE_LM_EVAL_RESULTS,
    FRONTIER_FILE,
    LM_EVAL_RESULTS,
    MLFLOW_ARTIFACTS_DIR,
    TRACKING_FILE,
    default_cache_dir,
    default_tracking_uri,
    tracking_uri,
)
from lora_search.provenance import provenance, redact, redacted, sweep_params
from lora_search.records import StepReport, stopped_figures, trial_params

log = logging.getLogger("lora_search.tracking")

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from lora_search.results import TrialRecord

OFF = "off"


def step_metrics(report: StepReport) -> dict[str, float]:
    """What every reported step logs: the curves the MLflow UI draws."""
    return {
        "eval_loss": report.eval_loss,
        "train_loss": report.train_loss,
        "tokens_per_s": report.tokens_per_s,
        "tokens": report.tokens,
        "train_s": report.train_s,
        "peak_mem_bytes": report.peak_mem_bytes,
    }


STEP_METRICS = tuple(step_metrics(StepReport()))
"""The keys `step_metrics` logs."""
FINAL_METRICS = (
    "best_eval_loss",
    "base_eval_loss",
    "objective",
    "trainable_params",
    "adapter_bytes",
    "train_s",
    "eval_s",
    "trial_s",
    "device_s",
    "train_cost",
    "eval_cost",
    "cost",
    "spend_device_s",
    "spend",
    "peak_mem_bytes",
    "tokens_per_s",
    "steady_tokens_per_s",
)
BUDGET_PARAMS = ("max_steps", "batch_size", "grad_accum", "warmup_steps", "lr_schedule", "eval_every", "sampling")
MLFLOW_STATUS = {
    "completed": "FINISHED",
    "pruned": "FINISHED",
    "failed": "FAILED",
    "diverged": "FAILED",
    "infeasible": "FAILED",
    "interrupted": "KILLED",
}


def registered_model_name(sweep: Sweep) -> str:
    return f"{sweep.name}-adapters"


def trial_param_values(sweep: Sweep, config: dict[str, Any]) -> dict[str, str]:
    params = {k: str(v) for k, v in trial_params(config).items()}
    params.update({k: str(getattr(sweep.budget, k)) for k in BUDGET_PARAMS})
    params["seed"] = str(sweep.seed)
    return redacted(params)


def _step_metrics(result: dict[str, Any]) -> list[Any]:
    """A reported step's curves (`step_metrics`), read through its StepReport: those the report holds."""
    report = StepReport.from_metrics(result)
    return _metrics({k: v for k, v in step_metrics(report).items() if k in result}, STEP_METRICS, report.step)


def _metrics(values: dict[str, Any], keys: tuple[str, ...] | list[str], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for key in keys:
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out.append(Metric(_metric_key(key), float(value), now, step))
    return out


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, '_', '-', '.', ' ', '/'; lm-eval metric names may carry others."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def is_off(sweep: Sweep) -> bool:
    """`Sweep(tracking_uri="off")`: no MLflow at all (results stay in the sweep dir); for clusters without MLflow."""
    return sweep.tracking_uri == OFF


def problems(sweep: Sweep) -> list[Problem]:
    """Whether the tracking store can be reached and written, before any trial spends compute."""
    if is_off(sweep):
        return []
    uri = tracking_uri(sweep)
    field = (
        "tracking_uri"
        if sweep.tracking_uri
        else "MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "output_dir"
    )
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else "file"
    if redact(uri) != uri:  # a password in the URI would be recorded wherever the URI is (tracking.json, logs)
        where = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), which MLflow reads"
        if scheme.startswith("postgres"):
            where = "PGPASSWORD (or a ~/.pgpass line), which libpq reads"
        return [
            Problem(
                field,
                redact(uri),
                "holds a password or token, which would be recorded wherever the URI is (tracking.json, logs, report)",
                f"drop it from the URI and set {where} from the environment",
            )
        ]
    if scheme.startswith("http"):
        import urllib.error
        import urllib.request

        for attempt in range(3):  # a busy server (or machine) may answer late: a timeout is tried again, twice
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                    if response.status == 200:
                        return []
                    reason = f"answered HTTP {response.status} on /health"
                    break
            except (urllib.error.URLError, OSError) as e:
                reason = f"cannot be reached ({getattr(e, 'reason', e)})"
                if "timed out" not in str(getattr(e, "reason", e)) or attempt == 2:
                    break
        return [
            Problem(
                field, uri, f"the MLflow tracking server {reason}", "start it (`mlflow server ...`), or fix the URI"
            )
        ]
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        if not os.access(existing, os.W_OK):
            return [
                Problem(field, uri, f"{existing} is not writable", "point output_dir or the URI somewhere writable")
            ]
        return []
    if scheme in ("file", "postgresql", "mysql", "mssql", "databricks") or len(scheme) == 1:  # len 1: C:\ paths
        return []
    return [Problem(field, uri, f"unknown tracking URI scheme {scheme!r}", "use http(s)://, sqlite:///, postgresql://")]


def _open(uri: str) -> MlflowClient:
    """A client on `uri` with its store open. MLflow creates and migrates a new SQLite store on first open, unguarded:
    sixteen drivers opening one new `mlflow.db` at once left fifteen failing ('table ... already exists', 'duplicate
    column name'; tests/test_concurrency.py). A lock file beside the database makes them take turns at that open."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    from filelock import FileLock

    path = Path(uri.removeprefix("sqlite:///"))
    with FileLock(f"{path}.lock", timeout=300):
        if not path.exists():
            _new_store(path)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the open: creates and migrates the store when it is new
    return client


def server_env() -> dict[str, str]:
    """The environment of an `mlflow server` that lora_search starts (`lora-search ui`, the tests' servers): this
    process's, with MLflow's GenAI job runner off (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION`: 7 huey consumer processes,
    each importing MLflow, that no tracking request uses) unless the environment sets it. Measured on a 2-core
    machine: a server healthy after 12.9 s and 20 CPU-s without it, 16.9 s and 47 CPU-s with it."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


STORE_TEMPLATE = "mlflow-store-{version}.db"
"""An empty SQLite store that MLflow `version` created and migrated, kept in `$LORA_SEARCH_CACHE`."""


def _new_store(path: Path) -> None:
    """Put a copy of an empty, migrated store of this MLflow at `path` (where none is yet), from `STORE_TEMPLATE`,
    made at the first new store. MLflow creates a new SQLite store by running every schema migration (1.2 s on a
    2-core machine, MLflow 3.17, against 0.04 s for copying and opening the template), and each sweep in a new
    output dir opens one. The template has no "Default" experiment: MLflow makes it at the open, with its artifact
    location from the working directory of the open, as in a store of its own. Our own code, as MLflow keeps no
    such template. Where the template cannot be made or copied, MLflow creates the store itself."""
    import shutil
    import sqlite3

    import mlflow
    from mlflow import MlflowClient

    template = default_cache_dir() / STORE_TEMPLATE.format(version=mlflow.__version__)
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
                made = Path(tmp) / "store.db"
                MlflowClient(f"sqlite:///{made}").search_experiments(max_results=1)
                with contextlib.closing(sqlite3.connect(made)) as db:
                    with db:
                        db.execute("DELETE FROM experiments WHERE experiment_id = 0")  # remade at each open
                    db.execute("VACUUM")
                os.replace(made, template)  # whole or not at all, whichever driver makes it
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
    except (OSError, sqlite3.Error) as e:
        log.warning("a new MLflow store from its template failed (%s); MLflow creates it", e)
        path.unlink(missing_ok=True)


class Tracker:
    """The sweep's MLflow runs, from the driver. Every public method swallows tracking errors (printed once)."""

    def __init__(self, sweep: Sweep, out: Path, base_fingerprint: str) -> None:
        self.sweep, self.out, self.base_fingerprint = sweep, out, base_fingerprint
        self.uri = tracking_uri(sweep)
        Path(sweep.output_dir).mkdir(parents=True, exist_ok=True)
        self.client: MlflowClient = _open(self.uri)
        self.tags = provenance(sweep, base_fingerprint)
        self.children: dict[str, str] = {}
        self.broken = False
        self.experiment_id = self._experiment()
        self.parent_id = self._parent()

    # --- set-up -------------------------------------------------------------------------------------------------

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.sweep.name)
        if found is not None:
            return found.experiment_id
        location, tags = None, {"mlflow.experimentKind": "custom_model_development"}  # the UI's training-run view
        if self.uri == default_tracking_uri(self.sweep.output_dir):
            location = (Path(self.sweep.output_dir).resolve() / MLFLOW_ARTIFACTS_DIR).as_uri()
        try:
            return self.client.create_experiment(self.sweep.name, artifact_location=location, tags=tags)
        except MlflowException:  # created meanwhile by another driver
            found = self.client.get_experiment_by_name(self.sweep.name)
            if found is None:
                raise
            return found.experiment_id

    def _parent(self) -> str:
        state_file = self.out / TRACKING_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("tracking_uri") == self.uri:
                parent = state["parent_run_id"]
                self.client.update_run(parent, status="RUNNING")
                for run in self._child_runs(parent):
                    self.children[run.data.tags["lora_search.trial_id"]] = run.info.run_id
                return parent
        run = self.client.create_run(self.experiment_id, run_name=self.sweep.name, tags=self.tags)
        params = sweep_params(self.sweep)
        self._log(run.info.run_id, params=params)
        state = {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": run.info.run_id}
        state_file.write_text(json.dumps(state, indent=1))
        return run.info.run_id

    def _child_runs(self, parent: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=50000
        )

    def _log(self, run_id: str, params: dict[str, str] | None = None, metrics: list[Any] | None = None) -> None:
        from mlflow.entities import Param

        batch = [Param(k, redact(v)[:6000]) for k, v in (params or {}).items()]
        for i in range(0, max(len(batch), 1), 100):  # MLflow takes at most 100 params per batch
            if batch[i : i + 100]:
                self.client.log_batch(run_id, params=batch[i : i + 100])
        metrics = metrics or []
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def _guard(self, what: str, action: Any) -> Any:
        if self.broken:
            return None
        try:
            return action()
        except Exception as e:  # tracking must never take the sweep down
            self.broken = True
            print(
                f"MLflow tracking at {self.uri} failed while {what} ({type(e).__name__}: {str(e)[:300]}); "
                f"the sweep goes on untracked and its results stay in {self.out}",
                flush=True,
            )
            return None

    # --- live, from Tune callbacks --------------------------------------------------------------------------

    def child(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run, created (with its params) on first sight."""
        if trial_id in self.children:
            return self.children[trial_id]
        tags = {**self.tags, "mlflow.parentRunId": self.parent_id, "lora_search.trial_id": trial_id}
        run = self.client.create_run(self.experiment_id, run_name=f"trial_{trial_id}", tags=tags)
        self._log(run.info.run_id, params=trial_param_values(self.sweep, config))
        self.children[trial_id] = run.info.run_id
        return run.info.run_id

    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        def go() -> None:
            run_id = self.child(trial_id, config)
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "lora_search.status", "running")

        self._guard(f"starting trial {trial_id}", go)

    def trial_result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        self._guard(
            f"logging trial {trial_id}", lambda: self._log(self.child(trial_id, config), metrics=_step_metrics(result))
        )

    def trial_ended(self, trial_id: str, config: dict[str, Any], status: str, step: int, reason: str = "") -> None:
        self._guard(
            f"ending trial {trial_id}", lambda: self._set_status(self.child(trial_id, config), status, step, reason)
        )

    def _set_status(self, run_id: str, status: str, step: int, reason: str = "") -> None:
        reason = redact(reason)  # a traceback can quote a URL or a header
        self.client.set_tag(run_id, "lora_search.status", status)
        if status == "pruned":
            self.client.set_tag(run_id, "lora_search.stopped_at_step", str(step))
        if MLFLOW_STATUS[status] == "FAILED":
            self.client.set_tag(run_id, "lora_search.failure_reason", reason[:5000] or "unknown")
        info = self.client.get_run(run_id).info
        # Confirming a status the live callback already set keeps its end time (the trial's, not the sweep's end).
        end_time = info.end_time if info.status == MLFLOW_STATUS[status] else None
        self.client.set_terminated(run_id, MLFLOW_STATUS[status], end_time=end_time)

    def interrupted(self, unfinished: list[tuple[str, dict[str, Any]]]) -> None:
        """The driver stopped before these trials ended: their runs and the parent are KILLED until a resume."""

        def go() -> None:
            for trial_id, config in unfinished:
                self._set_status(self.child(trial_id, config), "interrupted", 0)
            self.client.set_tag(self.parent_id, "lora_search.status", "interrupted")
            self.client.set_terminated(self.parent_id, "KILLED")

        self._guard("marking the interrupted runs", go)

    # --- at the end ------------------------------------------------------------------------------------------

    def finish(
        self,
        records: list[TrialRecord],
        configs: dict[str, dict[str, Any]],
        histories: dict[str, list[dict[str, Any]]],
        sweep_metrics: dict[str, float],
        frontier_table: pd.DataFrame,
        base_results: dict[str, Any] | None,
        report: Path | None = None,
    ) -> None:
        """Final state of every run: figures, statuses, artifacts, frontier tags and registry versions."""
        self.broken = False  # a fresh try: the live logging may have failed on a server that is back
        self._guard("finishing the trials' runs", lambda: self._finish_trials(records, configs, histories))
        self._guard(
            "finishing the sweep's run",
            lambda: self._finish_parent(sweep_metrics, frontier_table, base_results, report),
        )

    def _finish_trials(
        self,
        records: list[TrialRecord],
        configs: dict[str, dict[str, Any]],
        histories: dict[str, list[dict[str, Any]]],
    ) -> None:
        frontier: list[logged_models.Frontier] = []
        for r in records:
            run_id = self.child(r.trial_id, configs[r.trial_id])
            self._backfill(run_id, histories.get(r.trial_id, []))
            values = dataclasses.asdict(r)
            scores = {f"golden/{k}": v for k, v in (r.scores or {}).items()}
            metrics = _metrics(values, FINAL_METRICS, r.step) + _metrics(scores, sorted(scores), r.step)
            if r.status == "diverged":  # the value itself, NaN or inf, where the curve ends: what the UI should show
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                for key, value in stopped_figures(r.reason).items():
                    if key != "step":
                        metrics.append(Metric(key, value, now, r.step))
            self._log(run_id, metrics=metrics)
            self.client.set_tag(run_id, "lora_search.device", r.device_name)
            self.client.set_tag(run_id, "lora_search.strategy", r.strategy)
            if r.fast_path:
                self.client.set_tag(run_id, "lora_search.fast_path", r.fast_path)
            self.client.set_tag(run_id, "pareto", str(r.pareto).lower())
            if r.adapter_path:
                self.client.set_tag(run_id, "lora_search.servable", r.servable or "none")
                self.client.set_tag(run_id, "lora_search.serving_notes", r.serving_notes[:5000])
            if r.status == "completed" and r.adapter_path:
                adapter = Path(r.adapter_path)
                with tempfile.TemporaryDirectory() as tmp:
                    staged = Path(tmp) / "adapter"  # the PEFT dir without the lm-eval JSON, which is logged apart
                    staged.mkdir()
                    for f in adapter.iterdir():
                        if f.is_file() and f.name != LM_EVAL_RESULTS:
                            (staged / f.name).write_bytes(f.read_bytes())
                    self.client.log_artifacts(run_id, str(staged), "adapter")
                if (adapter / LM_EVAL_RESULTS).is_file():
                    self.client.log_artifact(run_id, str(adapter / LM_EVAL_RESULTS))
            self._set_status(run_id, r.status, r.step, r.reason)
            if r.pareto and r.adapter_path:
                params = trial_param_values(self.sweep, configs[r.trial_id])
                frontier.append(logged_models.Frontier(r, run_id, params, metrics))
        models = logged_models.log_frontier(self, frontier)
        for entry in frontier:
            self._register(entry.record, entry.run_id, models.get(entry.record.trial_id))

    def _finish_parent(
        self,
        sweep_metrics: dict[str, float],
        frontier_table: pd.DataFrame,
        base_results: dict[str, Any] | None,
        report: Path | None,
    ) -> None:
        parent = self.parent_id
        if report is not None:
            self.client.log_artifact(parent, str(report))  # index.html: the MLflow UI shows it inline
        self._log(parent, metrics=_metrics(sweep_metrics, sorted(sweep_metrics), 0))
        with tempfile.TemporaryDirectory() as tmp:
            table = frontier_table.assign(run_id=[self.children.get(t, "") for t in frontier_table["trial_id"]])
            table.to_csv(Path(tmp) / FRONTIER_FILE, index=False)
            self.client.log_artifact(parent, str(Path(tmp) / FRONTIER_FILE))
            if base_results is not None:
                (Path(tmp) / BASE_LM_EVAL_RESULTS).write_text(json.dumps(base_results, indent=1))
                self.client.log_artifact(parent, str(Path(tmp) / BASE_LM_EVAL_RESULTS))
        self.client.set_tag(parent, "lora_search.status", "finished")
        self.client.set_terminated(parent, "FINISHED")

    def _backfill(self, run_id: str, history: list[dict[str, Any]]) -> None:
        """Log the step metrics the live callback missed (a resume, or a tracking outage); never twice."""
        logged = {(m.key, m.step) for key in STEP_METRICS for m in self.client.get_metric_history(run_id, key)}
        missing = [m for row in history for m in _step_metrics(row) if (m.key, m.step) not in logged]
        self._log(run_id, metrics=missing)

    def _register(self, r: TrialRecord, run_id: str, model_id: str | None) -> None:
        """A frontier adapter becomes a version of `<sweep>-adapters`, tagged with its base's fingerprint; with its
        LoggedModel (`lora_search.logged_models`), the version is that model's (its artifacts, its `model_id`)."""
        from mlflow.exceptions import MlflowException

        name = registered_model_name(self.sweep)
        try:
            self.client.create_registered_model(
                name, description=f"Pareto-frontier LoRA adapters of sweep {self.sweep.name!r} (lora_search)"
            )
        except MlflowException:
            pass  # it exists
        if self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return
        if model_id:
            source = self.client.get_logged_model(model_id).artifact_location
        else:
            source = f"{self.client.get_run(run_id).info.artifact_uri}/adapter"
        tags = {
            "lora_search.base": self.sweep.base.name_or_path,
            "lora_search.base_revision": self.sweep.base.revision or "",
            "lora_search.base_fingerprint": self.base_fingerprint,
            "lora_search.trial_id": r.trial_id,
            "variant": r.variant,
            "rank": str(r.rank),
            **({"lora_search.model_id": model_id} if model_id else {}),
        }
        version = self.client.create_model_version(name, source, run_id=run_id, tags=redacted(tags), model_id=model_id)
        if model_id:
            logged_models.link_version(self.client, model_id, name, version.version)
