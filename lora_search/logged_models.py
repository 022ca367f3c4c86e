"""MLflow 3 LoggedModels: every frontier adapter a model of its trial's run, ranked and compared by MLflow itself.

    python sweeps/tiny.py              # at the end of the sweep, one LoggedModel per frontier adapter
    lora-search ui                     # the experiment's models page, /#/experiments/<id>/models, compares them
    mlflow.search_logged_models(experiment_ids=[EXPERIMENT_ID],
                                order_by=[{"field_name": "metrics.objective", "ascending": False}])

Each completed trial on the Pareto frontier (`TrialRecord.pareto`) becomes the LoggedModel `trial_<id>`, of type
`MODEL_TYPE`, whose source run is the trial's child run (which lists it among its outputs):
- params: the trial's hyperparameters, as on its run;
- artifacts: its PEFT adapter dir at the model's root (the run's `adapter/`), so `models:/<model_id>` downloads a
  dir `PeftModel.from_pretrained` loads;
- tags: `variant`, `rank`, `targets`, `adapter_bytes`, `servable` (the engines that load it, or "none") and
  `lora_search.serving_notes`, the run's provenance (base fingerprint included), `lora_search.trial_id` and
  `lora_search.parent_run_id` (a `--fresh` rerun of a sweep adds its models to the same experiment);
- metrics: the run's final points relinked, not new ones: `golden/<task>/<metric>` and `objective` tied to the golden
  set they were scored on, and the frontier's other axes `adapter_bytes` and `cost`. A golden set is an MLflow dataset
  input of the run: the rows lm-eval scored (the first `Evals.limit` when set), named after the task, with the
  digest MLflow computes from them.

The registry's version of a frontier adapter (`lora_search.tracking`) points at its model's artifacts and carries its
`model_id`. A store without LoggedModels (an MLflow 2 server) gets a warning and the sweep goes on: the runs and the
registry versions are as before.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from lora_search.layout import LM_EVAL_RESULTS
from lora_search.provenance import redacted
from lora_search.records import GOLDEN_PREFIX

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, Metric

    from lora_search.config import Evals, Sweep
    from lora_search.results import TrialRecord


class Tracker(Protocol):
    """What this module reads of `lora_search.tracking.Tracker` (a Protocol, so the two modules import one way)."""

    sweep: Sweep
    uri: str
    client: MlflowClient
    experiment_id: str
    parent_id: str
    tags: dict[str, str]


MODEL_TYPE = "peft-adapter"
AXES = ("objective", "adapter_bytes", "cost")
"""The frontier's axes (quality, adapter bytes, cost) among a trial's final metrics; with `golden/*`, the model's."""


class Frontier(NamedTuple):
    """A frontier trial as its run logged it: `metrics` are the Metric points already on the run."""

    record: TrialRecord
    run_id: str
    params: dict[str, str]
    metrics: list[Metric]


def golden_datasets(evals: Evals) -> dict[str, Dataset]:
    """task -> the golden rows lm-eval scores for it (its test split; the first `limit` when set), as an MLflow
    dataset (`mlflow.data.from_pandas`: its digest, schema and profile) named after the task, its source the data
    file."""
    import mlflow.data
    import pandas as pd

    from lora_search.evals import task_configs

    out = {}
    for config in task_configs(evals):
        files = config["dataset_kwargs"]["data_files"]
        path = files.get(config.get("test_split", "test")) or next(iter(files.values()))
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        frame = pd.DataFrame(rows[: evals.limit])
        # MLflow warns about itself here: its local-file dataset source is registered twice ("can be interpreted in
        # multiple ways"), and schema inference hints at integer columns, which matters for model inputs, not here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(frame, source=str(path), name=config["task"])
            out[config["task"]] = dataset._to_mlflow_entity()
    return out


def log_frontier(tracker: Tracker, frontier: list[Frontier]) -> dict[str, str]:
    """Log each frontier trial's LoggedModel (one a run already has is kept); trial id -> model id. Never raises: a
    store without LoggedModels, or any failure, is one warning and the rest are skipped."""
    if not frontier:
        return {}
    done: dict[str, str] = {}
    try:
        evals = tracker.sweep.evals
        datasets = golden_datasets(evals) if evals is not None else {}
        for entry in frontier:
            done[entry.record.trial_id] = _log_model(tracker, entry, datasets)
    except Exception as e:  # tracking never takes the sweep down
        from mlflow.exceptions import MlflowException

        unsupported = isinstance(e, NotImplementedError) or (
            isinstance(e, MlflowException) and e.error_code in ("ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED")
        )
        what = (
            "does not support LoggedModels (an MLflow 3 store or server does)"
            if unsupported
            else f"failed while logging them ({type(e).__name__}: {str(e)[:300]})"
        )
        warnings.warn(
            f"MLflow at {tracker.uri} {what}: {len(frontier) - len(done)} frontier adapter(s) are not LoggedModels; "
            "their runs, adapters and registry versions are logged as before",
            stacklevel=2,
        )
    return done


def _log_model(tracker: Tracker, entry: Frontier, datasets: dict[str, Dataset]) -> str:
    from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, Metric

    client, r = tracker.client, entry.record
    found = client.search_logged_models(
        [tracker.experiment_id], filter_string=f"source_run_id = '{entry.run_id}'", max_results=1
    )
    if found and found[0].status == LoggedModelStatus.READY:  # finished again (after a tracking outage): kept
        return found[0].model_id
    tags = {
        **tracker.tags,
        "variant": r.variant,
        "rank": str(r.rank),
        "targets": r.targets,
        "adapter_bytes": str(r.adapter_bytes),
        "servable": r.servable or "none",
        "lora_search.serving_notes": r.serving_notes[:5000],
        "lora_search.trial_id": r.trial_id,
        "lora_search.parent_run_id": tracker.parent_id,
    }
    if found:  # one a failed finish left PENDING: completed now
        model = found[0]
    else:
        model = client.create_logged_model(
            tracker.experiment_id,
            name=f"trial_{r.trial_id}",
            source_run_id=entry.run_id,
            tags=redacted(tags),
            params=entry.params,
            model_type=MODEL_TYPE,
        )
    for f in sorted(Path(r.adapter_path).iterdir()):  # the PEFT dir; the lm-eval JSON stays the run's
        if f.is_file() and f.name != LM_EVAL_RESULTS:
            client.log_model_artifact(model.model_id, str(f))

    objective_task = tracker.sweep.evals.objective.partition("/")[0] if tracker.sweep.evals else ""
    linked: list[Metric] = []
    used: dict[str, Dataset] = {}
    for m in entry.metrics:
        golden = m.key.startswith(GOLDEN_PREFIX)
        if m.key not in AXES and not golden:
            continue
        task = m.key.split("/")[1] if golden else objective_task if m.key == "objective" else ""
        dataset = datasets.get(task)
        if dataset is not None:
            used[task] = dataset
        # The run's own point (same key, value, step, timestamp): the store keeps it once on the run, and links it.
        linked.append(
            Metric(
                m.key,
                m.value,
                m.timestamp,
                m.step,
                model_id=model.model_id,
                dataset_name=dataset.name if dataset is not None else None,
                dataset_digest=dataset.digest if dataset is not None else None,
            )
        )
    context = [InputTag("mlflow.data.context", "eval")]
    client.log_inputs(entry.run_id, datasets=[DatasetInput(d, context) for d in used.values()])
    client.log_batch(entry.run_id, metrics=linked)
    client.log_outputs(entry.run_id, [LoggedModelOutput(model.model_id, r.step)])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def link_version(client: MlflowClient, model_id: str, name: str, version: str | int) -> None:
    """Record a registry version on its LoggedModel (`mlflow.modelVersions`, which the UI's model page lists). A
    tracking server does this itself when the version is created with `model_id`; a direct store does not."""
    model = client.get_logged_model(model_id)
    versions: list[dict[str, Any]] = json.loads(model.tags.get("mlflow.modelVersions", "[]"))
    entry = {"name": name, "version": str(version)}
    if entry not in [{"name": v["name"], "version": str(v["version"])} for v in versions]:
        client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps([*versions, entry])})
