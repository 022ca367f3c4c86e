"""Sweeps tracked on a real `mlflow server` process, read back through MlflowClient; the UI in headless Chromium.

What Ray says about each trial (its experiment state on disk) is the truth the MLflow statuses must match. The server
(mlflow_server) and the sweeps most tests here read (shared_sweep, failed_sweep) are conftest's, run once a session.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_search import Sweep, pareto, registry

pytestmark = pytest.mark.slow
PACKAGES = ("torch", "transformers", "peft", "trl", "ray", "lm_eval")


@pytest.fixture(scope="module", autouse=True)
def _one_ray_for_this_module():
    yield
    import ray

    ray.shutdown()


def _ray_truth(out: Path, name: str, max_steps: int) -> dict[str, tuple[str, int]]:
    """trial id -> (our status, last step) from Ray Tune's own experiment state."""
    from ray.tune import ExperimentAnalysis

    truth = {}
    for trial in ExperimentAnalysis(str(out / name / "ray" / name)).trials:
        step = int((trial.last_result or {}).get("step", 0))
        if trial.status == "ERROR":
            truth[trial.trial_id] = ("failed", step)
        else:
            assert trial.status == "TERMINATED", trial.status
            truth[trial.trial_id] = ("completed" if step >= max_steps else "pruned", step)
    return truth


def _runs(client, sweep: Sweep):
    experiment = client.get_experiment_by_name(sweep.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return experiment, parents, children


def test_runs_nest_and_statuses_match_ray(shared_sweep, mlflow_server) -> None:
    from mlflow import MlflowClient

    sweep, frame, out = shared_sweep
    client = MlflowClient(mlflow_server)
    _, parents, children = _runs(client, sweep)
    assert len(parents) == 1 and parents[0].info.run_name == sweep.name and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}

    truth = _ray_truth(out, sweep.name, sweep.budget.max_steps)
    assert {c.data.tags["lora_search.trial_id"] for c in children} == set(truth) == set(frame["trial_id"])
    assert {s for s, _ in truth.values()} >= {"completed", "pruned"}, truth  # the sweep shows both
    expected = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}
    for child in children:
        status, step = truth[child.data.tags["lora_search.trial_id"]]
        assert child.info.status == expected[status]
        assert child.data.tags["lora_search.status"] == status
        if status == "pruned":
            assert child.data.tags["lora_search.stopped_at_step"] == str(step)


def test_child_runs_hold_params_metrics_and_provenance(shared_sweep, mlflow_server) -> None:
    from mlflow import MlflowClient

    sweep, frame, out = shared_sweep
    client = MlflowClient(mlflow_server)
    _, parents, children = _runs(client, sweep)
    rows = frame.set_index("trial_id")
    fingerprint = registry.fingerprint(sweep.base)
    for run_ in [*parents, *children]:
        tags = run_.data.tags
        assert len(tags["mlflow.source.git.commit"]) in (40, 7), tags["mlflow.source.git.commit"]  # or "unknown"
        assert tags["lora_search.git_dirty"] in ("true", "false")
        assert tags["lora_search.base_fingerprint"] == fingerprint
        assert tags["lora_search.base"] == str(sweep.base.name_or_path)
        assert tags["lora_search.sweep"] == sweep.name
        assert tags["lora_search.eval_task_version.tiny_mood"] == "1.0"
        for package in PACKAGES:
            assert tags[f"lora_search.version.{package}"][0].isdigit(), (
                package,
                tags[f"lora_search.version.{package}"],
            )
    assert parents[0].data.params["budget.max_steps"] == "20"

    for child in children:
        row = rows.loc[child.data.tags["lora_search.trial_id"]]
        p, m = child.data.params, child.data.metrics
        assert (p["variant"], p["rank"], p["targets"]) == (row["variant"], str(row["rank"]), row["targets"])
        assert float(p["lr"]) == pytest.approx(row["lr"]) and float(p["alpha"]) == pytest.approx(row["alpha"])
        assert p["max_steps"] == "20" and p["batch_size"] == "8"
        history = client.get_metric_history(child.info.run_id, "eval_loss")
        steps = sorted(h.step for h in history)
        assert steps == list(range(5, int(row["step"]) + 1, 5)), steps  # every reported step, once
        assert sorted(history, key=lambda h: h.step)[-1].value == pytest.approx(row["eval_loss"])
        for key in ("adapter_bytes", "trainable_params", "cost", "device_s"):
            assert m[key] == pytest.approx(row[key]) and m[key] > 0, key
        if row["status"] == "completed":
            assert m["golden/tiny_mood/acc"] == pytest.approx(row["tiny_mood/acc"])
            assert m["objective"] == pytest.approx(row["objective"])
            adapter = {a.path for a in client.list_artifacts(child.info.run_id, "adapter")}
            assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter
            assert "adapter/lora_search.json" in adapter
            results = client.download_artifacts(child.info.run_id, "lm_eval_results.json", str(out / "dl"))
            assert "tiny_mood" in json.loads(Path(results).read_text())["results"]
        else:
            assert not client.list_artifacts(child.info.run_id, "adapter")


def test_frontier_tags_match_ours_and_optuna(shared_sweep, mlflow_server) -> None:
    from mlflow import MlflowClient
    from optuna.study._multi_objective import _is_pareto_front

    sweep, frame, out = shared_sweep
    client = MlflowClient(mlflow_server)
    _, parents, children = _runs(client, sweep)
    done = [c for c in children if c.data.tags["lora_search.status"] == "completed"]
    assert all(c.data.tags["pareto"] == "false" for c in children if c not in done)
    rows = [{k: c.data.metrics[k] for k in ("objective", "adapter_bytes", "cost")} for c in done]
    points = pareto.to_minimise(rows)
    tagged = [c.data.tags["pareto"] == "true" for c in done]
    assert tagged == pareto.non_dominated(points).tolist()
    order = np.lexsort(points.T[::-1])
    independent = np.empty(len(points), dtype=bool)
    independent[order] = _is_pareto_front(points[order], assume_unique_lexsorted=False)
    assert tagged == independent.tolist() and any(tagged)

    # The parent holds the frontier table and its hypervolume, recomputed here from the table itself.
    parent = parents[0]
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "frontier.csv", str(out / "dl_parent")))
    assert set(table.loc[table["pareto"], "run_id"]) == {c.info.run_id for c, t in zip(done, tagged, strict=True) if t}
    m = parent.data.metrics
    front = pareto.frontier(
        table.to_dict("records"),
        pareto.Objective("objective", higher_is_better=True),
        m["base_objective"],
        m["base_weight_bytes"],
        m["reference_cost"],
    )
    assert m["hypervolume"] == pytest.approx(front.hypervolume)
    assert m["sweep_cost"] == pytest.approx(sum(c.data.metrics["cost"] for c in children))
    assert m["asha_saved_cost"] > 0  # the sweep pruned trials, so pruning saved something

    # Frontier adapters are registered with their base's fingerprint; one loads onto its base and no other.
    versions = client.search_model_versions(f"name = '{sweep.name}-adapters'")
    assert {v.run_id for v in versions} == {c.info.run_id for c, t in zip(done, tagged, strict=True) if t}
    assert {v.tags["lora_search.base_fingerprint"] for v in versions} == {registry.fingerprint(sweep.base)}


def test_export_merge_from_the_tracking_server(shared_sweep, mlflow_server, tiny_model_dir, tmp_path) -> None:
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_search.cli import main
    from lora_search.probe import PROBE_FILE

    sweep, frame, out = shared_sweep
    client = MlflowClient(mlflow_server)
    _, _, children = _runs(client, sweep)
    run_id = next(c.info.run_id for c in children if c.data.tags["pareto"] == "true")
    with pytest.raises(SystemExit) as exit_:
        main(["export", run_id, "--merge", "--tracking-uri", mlflow_server, "--output", str(tmp_path / "merged")])
    assert exit_.value.code == 0
    adapter = registry.download_run_adapter(run_id, mlflow_server, tmp_path / "adapter")
    unmerged = registry.load_adapter(str(tiny_model_dir), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = load_file(str(adapter / PROBE_FILE))["input_ids_0"][None]
    with torch.no_grad():
        expected, got = unmerged(input_ids=ids).logits, merged(input_ids=ids).logits
        with unmerged.disable_adapter():
            base = unmerged(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter matters, so a merge that drops it would show
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    # The same adapter onto a different base is refused before any weight loads.
    other = tmp_path / "other_base"
    shutil.copytree(tiny_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(other)
    with pytest.raises(registry.BaseMismatchError, match="--base"):
        registry.load_adapter(str(other), adapter)


def test_failed_trial_is_a_failed_run_with_its_reason(failed_sweep, mlflow_server) -> None:
    from mlflow import MlflowClient

    sweep, frame = failed_sweep
    assert list(frame["status"]) == ["failed", "failed"]
    _, parents, children = _runs(MlflowClient(mlflow_server), sweep)
    assert [c.info.status for c in children] == ["FAILED", "FAILED"] and parents[0].info.status == "FINISHED"
    reasons = frame.set_index("trial_id")["reason"]
    for child in children:
        assert child.data.tags["lora_search.failure_reason"] == reasons[child.data.tags["lora_search.trial_id"]] != ""


def test_mlflow_ui_renders_the_sweep_in_headless_chromium(shared_sweep, mlflow_server, tmp_path) -> None:
    """The real MLflow UI in a real browser: the experiment lists the sweep; comparing its trials shows their
    params and metrics; its models page lists the frontier's LoggedModels. LORA_SEARCH_SCREENSHOTS=DIR keeps the
    screenshots."""
    import urllib.parse

    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no Chromium: `make browser` installs Debian's package (apt-get install chromium)"
    sweep, frame, _ = shared_sweep
    experiment, parents, children = _runs(MlflowClient(mlflow_server), sweep)
    keep = Path(os.environ.get("LORA_SEARCH_SCREENSHOTS", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.goto(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs")
        page.get_by_text(f"{len(children) + 1} matching runs").wait_for(timeout=90_000)  # the parent + its children
        page.get_by_role("button", name="Close").click()  # the assistant side panel, for a readable screenshot
        assert page.get_by_text(sweep.name, exact=True).count() >= 1
        page.screenshot(path=str(keep / "mlflow_experiment.png"))

        ids = urllib.parse.quote(json.dumps([c.info.run_id for c in children]))
        experiments = urllib.parse.quote(json.dumps([experiment.experiment_id]))
        page.goto(f"{mlflow_server}/#/compare-runs?runs={ids}&experiments={experiments}")
        page.get_by_text(f"Comparing {len(children)} Runs").wait_for(timeout=90_000)
        page.get_by_text("golden/tiny_mood/acc").first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        page.screenshot(path=str(keep / "mlflow_compare.png"), full_page=True)

        # The experiment's models page: the frontier adapters as LoggedModels (lora_search.logged_models).
        front = frame.loc[frame["pareto"], "trial_id"]
        page.goto(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/models")
        page.get_by_text(f"trial_{front.iloc[0]}", exact=True).first.wait_for(timeout=60_000)
        models_text = page.inner_text("body")
        page.screenshot(path=str(keep / "mlflow_models.png"), full_page=True)
        browser.close()
    for trial_id in front:
        assert f"trial_{trial_id}" in models_text
    assert f"{sweep.name}-adapters" in models_text and "tiny_mood" in models_text  # its registry version, golden set
    for child in children:
        assert child.info.run_name in text
    for name in ("variant", "rank", "alpha", "targets", "lr", "max_steps"):
        assert f"\n{name}\t" in text, name  # a row of the parameters table
    for name in ("eval_loss", "adapter_bytes", "cost", "device_s", "golden/tiny_mood/acc"):
        assert name in text, name
    for row in frame.itertuples():
        assert f"{row.lr}" in text  # each trial's sampled learning rate, as logged
    assert (keep / "mlflow_compare.png").stat().st_size > 20_000
