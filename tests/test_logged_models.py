"""Frontier adapters as MLflow 3 LoggedModels (lora_search.logged_models), read back through MlflowClient.

    pytest tests/test_logged_models.py

No sweep of its own: the tracking server and the sweep it tracked are conftest's (mlflow_server, shared_sweep); the
embedded store (SQLite, the demo's) gets the same sweep's results finished again by a Tracker of its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lora_search import logged_models, registry
from lora_search.layout import FRONTIER_FILE, LM_EVAL_RESULTS, TRACKING_FILE, default_tracking_uri, sweep_dir
from lora_search.records import PARAMS
from lora_search.results import TrialRecord

pytestmark = pytest.mark.slow
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", registry.META_FILE}


@pytest.fixture(scope="module", autouse=True)
def _one_ray_for_this_module():
    yield
    import ray

    ray.shutdown()


def check_models(client: Any, experiment_id: str, sweep: Any, frame: pd.DataFrame, runs: dict[str, str]) -> list:
    """The experiment's LoggedModels are exactly the frontier's, as the module docstring of logged_models says;
    `runs`: trial id -> its run in this store. Returns them, best objective first."""
    models = client.search_logged_models(
        [experiment_id], order_by=[{"field_name": "metrics.objective", "ascending": False}]
    )
    front = frame[frame["pareto"]].set_index("trial_id")
    assert len(front) >= 1
    assert sorted(m.source_run_id for m in models) == sorted(runs[t] for t in front.index)
    objectives = [{x.key: x.value for x in m.metrics}["objective"] for m in models]
    assert objectives == sorted(objectives, reverse=True)
    by_golden = client.search_logged_models(
        [experiment_id], order_by=[{"field_name": "metrics.golden/tiny_mood/acc", "ascending": True}]
    )
    accuracies = [{x.key: x.value for x in m.metrics}["golden/tiny_mood/acc"] for m in by_golden]
    assert accuracies == sorted(objectives)

    digests = {task: d.digest for task, d in logged_models.golden_datasets(sweep.evals).items()}
    fingerprint = registry.fingerprint(sweep.base)
    for m in models:
        row = front.loc[m.tags["lora_search.trial_id"]]
        assert (m.name, m.status, m.model_type) == (f"trial_{row.name}", "READY", logged_models.MODEL_TYPE)
        assert m.tags["variant"] == row["variant"] and m.tags["rank"] == str(row["rank"])
        assert m.tags["targets"] == row["targets"] and m.tags["adapter_bytes"] == str(row["adapter_bytes"])
        assert m.tags["servable"] == (row["servable"] or "none")
        assert m.tags["lora_search.base_fingerprint"] == fingerprint
        assert m.params == client.get_run(m.source_run_id).data.params

        metrics = {x.key: x for x in m.metrics}
        golden = {k for k in metrics if k.startswith("golden/")}
        assert golden == {f"golden/{c}" for c in front.columns if "/" in c and pd.notna(row[c])}, golden
        for key in golden:
            task = key.split("/")[1]
            assert metrics[key].value == pytest.approx(row[key.removeprefix("golden/")])
            assert (metrics[key].dataset_name, metrics[key].dataset_digest) == (task, digests[task])
        assert (metrics["objective"].dataset_name, metrics["objective"].dataset_digest) == (
            "tiny_mood",
            digests["tiny_mood"],
        )
        assert metrics["objective"].value == pytest.approx(row["objective"])
        for key in ("adapter_bytes", "cost"):
            assert metrics[key].value == pytest.approx(row[key]) and metrics[key].dataset_name is None
        assert {x.run_id for x in m.metrics} == {m.source_run_id}

        run = client.get_run(m.source_run_id)
        assert {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs} == set(digests.items())
        assert [o.model_id for o in run.outputs.model_outputs] == [m.model_id]
        assert len(client.get_metric_history(m.source_run_id, "objective")) == 1  # relinked, not logged twice
        files = {a.path for a in client.list_logged_model_artifacts(m.model_id)}
        assert ADAPTER_FILES <= files and LM_EVAL_RESULTS not in files

    # The registry's versions are the models': their artifacts, their id, the base's fingerprint kept.
    versions = client.search_model_versions(f"name = '{sweep.name}-adapters'")
    by_run = {m.source_run_id: m for m in models}
    assert sorted(v.run_id for v in versions) == sorted(by_run)
    for v in versions:
        model = by_run[v.run_id]
        assert v.tags["lora_search.model_id"] == model.model_id
        assert v.tags["lora_search.base_fingerprint"] == fingerprint
        assert v.source == model.artifact_location
        linked = json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"])
        assert [(x["name"], str(x["version"])) for x in linked] == [(v.name, str(v.version))]

    # The golden set filters them: every frontier model has metrics on tiny_mood at this digest.
    on_golden = client.search_logged_models(
        [experiment_id],
        filter_string="metrics.objective >= 0",
        datasets=[{"dataset_name": "tiny_mood", "dataset_digest": digests["tiny_mood"]}],
    )
    assert {m.model_id for m in on_golden} == {m.model_id for m in models}
    return models


def test_frontier_adapters_are_logged_models_on_the_tracking_server(shared_sweep, mlflow_server) -> None:
    from mlflow import MlflowClient

    sweep, frame, out = shared_sweep
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(sweep.name)
    runs = dict(zip(frame["trial_id"], frame["mlflow_run_id"], strict=True))
    models = check_models(client, experiment.experiment_id, sweep, frame, runs)
    parent = json.loads((sweep_dir(out, sweep.name) / TRACKING_FILE).read_text())["parent_run_id"]
    assert {m.tags["lora_search.parent_run_id"] for m in models} == {parent}


def _refinish(sweep: Any, frame: pd.DataFrame, out: Path, store: Path, name: str) -> Any:
    """A Tracker on the embedded store under `store`, finishing the shared sweep's trials again as sweep `name`."""
    from lora_search.tracking import Tracker

    fields = {f.name for f in dataclasses.fields(TrialRecord)}
    records = [
        TrialRecord(**{k: v for k, v in row.items() if k in fields}, scores={k: v for k, v in row.items() if "/" in k})
        for row in frame.to_dict("records")
    ]
    configs = {r.trial_id: {k: getattr(r, k) for k in PARAMS} for r in records}
    mine = sweep.replace(name=name, output_dir=str(store), tracking_uri=None)
    (store / name).mkdir(parents=True, exist_ok=True)
    tracker = Tracker(mine, store / name, registry.fingerprint(sweep.base))
    assert tracker.uri == default_tracking_uri(store)
    table = pd.read_csv(sweep_dir(out, sweep.name) / FRONTIER_FILE)
    tracker.finish(records, configs, {}, {}, table, None)
    assert not tracker.broken
    return tracker


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for this module's tests (a new store takes seconds to create)."""
    return tmp_path_factory.mktemp("embedded")


def test_frontier_adapters_are_logged_models_in_the_embedded_store(shared_sweep, embedded_store, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep, frame, out = shared_sweep
    frame = frame.assign(pareto=frame["status"] == "completed")  # a wider frontier: more than one model to rank
    assert frame["pareto"].sum() >= 2
    tracker = _refinish(sweep, frame, out, embedded_store, "embedded")
    models = check_models(tracker.client, tracker.experiment_id, tracker.sweep, frame, tracker.children)
    for m in models:  # the artifacts are files under the store's own artifact root
        assert m.artifact_location.startswith((embedded_store / "mlartifacts").resolve().as_uri())
        assert ADAPTER_FILES <= {p.name for p in Path(m.artifact_location.removeprefix("file://")).iterdir()}


def test_a_store_without_logged_models_warns_and_registers_as_before(shared_sweep, embedded_store, monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND

    def missing(*args: Any, **kwargs: Any) -> None:  # what an MLflow 2 server answers
        raise MlflowException("API request to endpoint /api/2.0/mlflow/logged-models failed", ENDPOINT_NOT_FOUND)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(MlflowClient, "search_logged_models", missing)
    monkeypatch.setattr(MlflowClient, "create_logged_model", missing)
    sweep, frame, out = shared_sweep
    with pytest.warns(UserWarning, match="does not support LoggedModels"):
        tracker = _refinish(sweep, frame, out, embedded_store, "no_models")
    versions = tracker.client.search_model_versions("name = 'no_models-adapters'")
    front = frame.loc[frame["pareto"], "trial_id"]
    assert sorted(v.run_id for v in versions) == sorted(tracker.children[t] for t in front)
    for v in versions:
        assert v.source.endswith("/adapter") and "lora_search.model_id" not in v.tags
        assert v.tags["lora_search.base_fingerprint"] == registry.fingerprint(sweep.base)
