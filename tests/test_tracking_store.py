"""A new embedded MLflow store is a copy of an empty, migrated one (`tracking._new_store`), and reads and writes as
the store MLflow creates itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_search import tracking


def test_a_new_store_is_a_copy_of_the_migrated_template_and_works_as_mlflows_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "cache"))
    seen = {}
    for name in ("first", "second", "own"):
        where = tmp_path / name
        where.mkdir()
        monkeypatch.chdir(where)  # MLflow puts the Default experiment's artifacts under the open's working dir
        if name == "own":  # the reference: the store MLflow creates itself, no template
            monkeypatch.setattr(tracking, "_new_store", lambda path: None)
        capfd.readouterr()
        client = tracking._open(f"sqlite:///{where / 'mlflow.db'}")
        seen[name] = capfd.readouterr().err.count("Creating initial MLflow database tables")  # MLflow's own log line
        default = client.get_experiment("0")
        assert default.name == "Default" and default.artifact_location.endswith(f"{name}/mlruns/0"), default
        run = client.create_run(client.create_experiment("sweep")).info.run_id
        client.log_metric(run, "eval_loss", 1.5, step=5)
        assert [(m.step, m.value) for m in client.get_metric_history(run, "eval_loss")] == [(5, 1.5)]
        assert client.get_experiment_by_name("sweep").experiment_id == "1"  # the ids MLflow's own store gives
    # MLflow migrated a new store twice: for the template, and for the reference; the second copy took none
    assert seen == {"first": 1, "second": 0, "own": 1}, seen
    assert [p.name for p in (tmp_path / "cache").glob("mlflow-store-*.db")] == [
        tracking.STORE_TEMPLATE.format(version=__import__("mlflow").__version__)
    ]


def test_a_store_that_exists_is_opened_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking._open(uri).create_experiment("kept")
    assert tracking._open(uri).get_experiment(experiment).name == "kept"
