"""Resume and failures, with real processes killed by real signals: the driver (SIGKILL, twice, then
`lora-search run` / `lora-search resume` again) and the process training one trial (a warm trial's own); a whole
worker node of a localhost `ray start` cluster is killed in test_multinode, which starts that cluster. Truth comes
from Ray's own experiment state, MLflow through MlflowClient, and an uninterrupted run of the same seeded sweep.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from lora_search import pareto
from lora_search.cli import main

CLI = [sys.executable, "-m", "lora_search.cli"]
PARAMS = ["variant", "rank", "alpha", "targets", "lr", "dropout"]
MAX_STEPS = 30
"""The killed-driver sweep's budget: rungs at 10 and 20, so its 4 trials end both pruned and completed."""

KILLS = 2
"""Driver stops in the resume test: a SIGKILL while `run` drives, then a Ctrl+C (SIGINT) while `resume` does."""


def _sweep_file(tmp: Path, name: str, model: Path, data: Path, out: Path, **fields: str) -> Path:
    """A sweep file; `fields` replace Sweep keyword arguments (as source text)."""
    args = {
        "name": repr(name),
        "base": f"BaseModel({str(model)!r})",
        "dataset": f"Dataset({str(data)!r}, eval_fraction=0.2, max_length=96)",
        "space": 'SearchSpace(ranks=(2, 4), targets=("attention", "all-linear"), variants=("lora", "dora"), '
        "lr=(1e-3, 1e-2))",
        "budget": f"Budget(max_steps={MAX_STEPS}, eval_every=5, grace_period=10, reduction_factor=2, batch_size=4)",
        "num_samples": "4",
        "max_concurrent_trials": "1",
        "seed": "0",
        "output_dir": repr(str(out)),
        **fields,
    }
    path = tmp / f"{name}_{out.name}.py"
    body = ",\n    ".join(f"{k}={v}" for k, v in args.items())
    path.write_text(
        "from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep, main\n"
        f"SWEEP = Sweep(\n    {body},\n)\n"
        'if __name__ == "__main__":\n    main(SWEEP)\n'
    )
    return path


def _ray_trials(out: Path, name: str) -> dict[str, tuple[str, int]]:
    """trial id -> (Ray's status, last step), from Ray Tune's experiment state on disk."""
    from ray.tune import ExperimentAnalysis

    return {
        t.trial_id: (t.status, int((t.last_result or {}).get("step", 0)))
        for t in ExperimentAnalysis(str(out / name / "ray" / name)).trials
    }


def _params(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials keyed by their sampled params (trial ids differ between runs)."""
    keyed = frame.assign(lr=frame["lr"].round(12))
    return keyed.set_index([p for p in PARAMS if p in frame]).sort_index()


def _session_processes(sid: int) -> list[psutil.Process]:
    """Processes of the session a driver was started in (start_new_session): its local Ray, its workers."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""Per-node helpers of Ray that outlive a SIGKILLed driver's raylet; they run no trial and write nothing."""


def one_trial_driver(
    tmp_path: Path, name: str, model_dir: Path, data: Path, out: Path, env: dict[str, str]
) -> subprocess.Popen:
    """`lora-search run` of a one-trial sweep (lora r4 on q,v; 30 steps, a checkpoint every 10, nothing pruned) in
    the background, its output piped: the sweep the lost-worker and lost-node tests kill a part of."""
    sweep_file = _sweep_file(
        tmp_path,
        name,
        model_dir,
        data,
        out,
        space='SearchSpace(ranks=(4,), targets=("attention",), variants=("lora",), lr=(2e-3, 4e-3))',
        budget="Budget(max_steps=30, eval_every=10, grace_period=30, batch_size=4)",
        num_samples="1",
    )
    return subprocess.Popen(
        [*CLI, "run", str(sweep_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _wait_session_gone(sid: int, timeout: float = 60) -> int:
    """Wait until the killed driver's Ray has gone (Ray shares the driver's fate: its trials' processes die within
    seconds), then end its leftover agents. Returns how many other processes outlived `timeout` (and were killed)."""
    deadline = time.monotonic() + timeout

    def working() -> list[psutil.Process]:
        out = []
        for p in _session_processes(sid):
            try:
                if not " ".join(p.cmdline()).startswith(AGENTS):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    while (left := working()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in _session_processes(sid):
        p.kill()
    return len(left)


@pytest.mark.slow
def test_driver_killed_then_interrupted_resumes_to_the_uninterrupted_sweep(
    tiny_model_dir, tiny_jsonl, tmp_path
) -> None:
    """Stop the driver at two seeded random points: SIGKILL a `run`, then Ctrl+C (SIGINT) the `resume` (exit 130,
    "run the same command again"; the parent and the unfinished child runs KILLED, the cut-short trials tagged
    interrupted). A last `run` brings the sweep to the same end as an uninterrupted run with the same seed: the same
    trials (by params), statuses and eval losses, the same frontier (the 3-D one up to measured cost: wall time), one
    MLflow child run per Ray trial with a truthful status, all under the parent the first `run` opened."""
    import ray
    from mlflow import MlflowClient

    ray.shutdown()  # the drivers below start their own local Ray
    name = "killed"
    env = {**os.environ, "RAY_ADDRESS": ""}

    plain_file = _sweep_file(tmp_path, name, tiny_model_dir, tiny_jsonl, tmp_path / "plain")
    start = time.monotonic()
    plain_driver = subprocess.Popen(
        [*CLI, "run", str(plain_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    first_report_s, lines = math.inf, []
    for line in plain_driver.stdout:  # how long a driver takes from its start to a trial's first report
        lines.append(line)
        if " step " in line and math.isinf(first_report_s):
            first_report_s = time.monotonic() - start
    assert plain_driver.wait(timeout=600) == 0, "".join(lines)[-3000:]
    uninterrupted_s = time.monotonic() - start

    killed_file = _sweep_file(tmp_path, name, tiny_model_dir, tiny_jsonl, tmp_path / "killed")
    # Kill points: seeded random points of the sweep's training (the steps all its trials train, as the uninterrupted
    # run's progress files count them), each a random fraction of a second into its step.
    rng = random.Random(0)
    plain_steps = sum(
        json.loads(f.read_text())["step"] for f in (tmp_path / "plain" / name).glob("ray/progress/*.json")
    )
    targets = sorted(rng.uniform(0.1, 0.9) * plain_steps for _ in range(KILLS))
    progress = tmp_path / "killed" / name / "ray" / "progress"
    kills, outlived, log, interrupted_parent = 0, 0, [], None
    start = time.monotonic()
    while True:
        if kills % 2 == 0:
            command = [*CLI, "run", str(killed_file)]
        else:
            command = [*CLI, "resume", name, "--output-dir", str(tmp_path / "killed")]
        driver_log = tmp_path / f"driver_{kills}.log"
        with driver_log.open("w") as sink:
            driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if kills == KILLS:
            returncode = driver.wait(timeout=600)
            output = driver_log.read_text()
            assert returncode == 0, output[-3000:]
            break
        driver_start = time.monotonic()
        interrupt = kills == KILLS - 1  # the last stop is a Ctrl+C, the ones before a SIGKILL
        while True:
            done_steps = sum(json.loads(f.read_text())["step"] for f in progress.glob("*.json"))
            if done_steps >= targets[kills] and (not interrupt or _mid_trial(progress)):
                break
            if driver.poll() is not None or time.monotonic() - driver_start > 600:
                driver.kill()
                pytest.fail(f"the driver ended before its kill: {driver_log.read_text()[-3000:]}")
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 0.1))
        os.kill(driver.pid, signal.SIGINT if interrupt else signal.SIGKILL)
        try:
            returncode = driver.wait(timeout=180)
        except subprocess.TimeoutExpired:
            _wait_session_gone(driver.pid, timeout=0)
            pytest.fail(f"the driver did not end within 180 s of Ctrl+C: {driver_log.read_text()[-3000:]}")
        kills += 1
        log.append(
            f"{'SIGINT' if interrupt else 'SIGKILL'} {kills} at step {done_steps} of {plain_steps}, "
            f"{time.monotonic() - driver_start:.0f}s into `{command[3]}`"
        )
        outlived += _wait_session_gone(driver.pid)
        if interrupt:
            interrupted_parent = _check_interrupted(returncode, driver_log.read_text(), tmp_path / "killed", name)
    total_s = time.monotonic() - start
    if kills:
        assert "resuming sweep" in output, output[-3000:]

    plain = pd.read_parquet(tmp_path / "plain" / name / "trials.parquet")
    resumed = pd.read_parquet(tmp_path / "killed" / name / "trials.parquet")
    a, b = _params(plain), _params(resumed)
    print(
        f"\n{log}; uninterrupted {uninterrupted_s:.0f}s (first report at {first_report_s:.0f}s), "
        f"killed {KILLS}x and resumed {total_s:.0f}s "
        f"(x{total_s / uninterrupted_s:.2f}); Ray processes that outlived their driver: {outlived}"
    )
    print(resumed[["trial_id", "status", "step", "restarts", "steps_redone", "eval_loss", "trial_s"]].to_string())

    # The same trials (the seeded searcher's state survived), ending the same way (ASHA's rungs survived).
    assert list(a.index) == list(b.index), (list(a.index), list(b.index))
    assert list(a["status"]) == list(b["status"]), pd.concat([a["status"], b["status"]], axis=1)
    assert set(b["status"]) == {"completed", "pruned"}, b["status"]
    pd.testing.assert_series_equal(a["step"], b["step"])
    # A resumed trial continues its optimizer, schedule, data order and RNG: its losses are the uninterrupted ones.
    assert (a["eval_loss"] - b["eval_loss"]).abs().max() < 1e-4, pd.concat([a["eval_loss"], b["eval_loss"]], axis=1)
    assert b["restarts"].sum() >= 1  # a kill landed inside a trial at least once...
    eval_every = 5
    assert (b["steps_redone"] <= b["restarts"] * eval_every).all()  # ...and redid less than one checkpoint interval

    # Frontier: quality vs adapter bytes is the same; the 3-D one only differs through measured cost (wall time).
    fa = pd.read_csv(tmp_path / "plain" / name / "frontier.csv").pipe(_params)
    fb = pd.read_csv(tmp_path / "killed" / name / "frontier.csv").pipe(_params)
    two_d = "pareto_eval_loss_vs_adapter_bytes"
    assert list(fa.index[fa[two_d]]) == list(fb.index[fb[two_d]])
    with_plain_costs = fb.assign(cost=fa["cost"])
    metrics = json.loads((tmp_path / "plain" / name / "sweep_metrics.json").read_text())
    recomputed = pareto.frontier(
        with_plain_costs.reset_index().to_dict("records"),
        pareto.Objective("eval_loss", higher_is_better=False),
        metrics["base_eval_loss"],
        metrics["base_weight_bytes"],
        metrics["reference_cost"],
    )
    assert list(recomputed.mask) == list(fa["pareto"]), (list(fb["pareto"]), list(fa["pareto"]))

    # MLflow: one child run per Ray trial, no duplicates, no orphans, statuses as Ray's.
    truth = _ray_trials(tmp_path / "killed", name)
    client = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    parents, children = _mlflow_runs(tmp_path / "killed", name)
    ids = [c.data.tags["lora_search.trial_id"] for c in children]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == interrupted_parent  # the one the Ctrl+C left KILLED, resumed
    assert sorted(ids) == sorted(truth) == sorted(resumed["trial_id"]), (ids, truth)
    rows = resumed.set_index("trial_id")
    for child in children:
        trial_id = child.data.tags["lora_search.trial_id"]
        ray_status, step = truth[trial_id]
        assert ray_status == "TERMINATED", (trial_id, ray_status)
        ours = "completed" if step >= MAX_STEPS else "pruned"
        assert rows.loc[trial_id, "status"] == ours == child.data.tags["lora_search.status"]
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "eval_loss"))
        assert steps == list(range(5, step + 1, 5)), (trial_id, steps)  # every reported step, once

    # A trial's cost counts all the time it held its devices, the attempts before each kill too.
    assert (b["trial_s"] > 0).all()
    # What a kill costs: a new driver and a restarted trial, plus under one checkpoint interval of redone steps. The
    # wall time is printed above (x uninterrupted), not asserted: the suite runs two test files at once, so the
    # uninterrupted and the killed runs meet different loads (3.0x was seen with a busy neighbour file), and
    # timings belong in benchmarks. The two ways a resume could waste time are asserted without a clock: no trial
    # retrained more than one checkpoint interval (steps_redone, above), and no killed driver left a Ray running
    # that a resume would wait on or share the machine with.
    assert outlived == 0, f"{outlived} process(es) of a killed driver's Ray outlived it by 60 s: {log}"


def _mid_trial(progress: Path) -> bool:
    """A trial is training between two rungs (10, 20, 30): the newest progress file's step is past a rung and short
    of the next, so a trial is surely running and not between trials."""
    files = sorted(progress.glob("*.json"), key=lambda f: f.stat().st_mtime)
    return bool(files) and json.loads(files[-1].read_text())["step"] % 10 not in (0, 9)


def _mlflow_runs(out: Path, name: str) -> tuple[list, list]:
    """(parent runs, child runs) of the sweep in its embedded store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags], children


def _check_interrupted(returncode: int, output: str, out: Path, name: str) -> str:
    """What a Ctrl+C on the driver leaves: exit 130 and how to resume; in MLflow the parent and every unfinished
    child run KILLED, each tagged "interrupted" (at least the trial cut short). Returns the parent's run id."""
    assert returncode == 130, output[-3000:]
    assert "Run the same command again to resume" in output, output[-3000:]
    parents, children = _mlflow_runs(out, name)
    assert [p.info.status for p in parents] == ["KILLED"]
    killed = [c for c in children if c.info.status == "KILLED"]
    assert killed and all(c.data.tags["lora_search.status"] == "interrupted" for c in killed), [
        (c.info.status, c.data.tags.get("lora_search.status")) for c in children
    ]
    return parents[0].info.run_id


def _trial_worker(driver: psutil.Process) -> psutil.Process | None:
    """The process that trains a running trial, among the processes of this driver's local Ray: its Ray Train
    worker, or the Tune trial process itself for a warm trial (`lora_search.trial.warm`)."""
    found: dict[str, psutil.Process] = {}
    for p in driver.children(recursive=True):
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for kind in ("RayTrainWorker", "ImplicitFunc"):
            if kind in line:
                found.setdefault(kind, p)
    return found.get("RayTrainWorker") or found.get("ImplicitFunc")


def _wait_progress(progress: Path, at_least: int, driver: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while True:
        files = list(progress.glob("trial_*.json"))
        if files:
            step = json.loads(files[0].read_text())["step"]
            if step >= at_least:
                return step
        if driver.poll() is not None or time.monotonic() > deadline:
            driver.kill()
            pytest.fail(f"the sweep ended before the kill: {driver.communicate()[0][-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_process_trains_on_from_its_checkpoint(tiny_model_dir, tiny_jsonl, tmp_path) -> None:
    """SIGKILL a trial's Ray Train worker process after its first checkpoint: the trial trains on from that
    checkpoint (steps redone < the checkpoint interval), completes, and the sweep loses no trial."""
    import ray

    ray.shutdown()
    out = tmp_path / "reports"
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = one_trial_driver(tmp_path, "worker_loss", tiny_model_dir, tiny_jsonl, out, env)
    killed_at = _wait_progress(out / "worker_loss" / "ray" / "progress", 13, driver)
    worker = _trial_worker(psutil.Process(driver.pid))
    assert worker is not None
    worker.send_signal(signal.SIGKILL)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    row = pd.read_parquet(out / "worker_loss" / "trials.parquet").iloc[0]
    print(f"\nworker killed after step {killed_at}: restarts {row.restarts}, steps redone {row.steps_redone}")
    assert row.status == "completed" and row.step == 30, row.reason
    # At most one checkpoint interval (eval_every 10), the driver-kill test's bound: a loss just before a checkpoint
    # is written redoes all 10.
    assert row.restarts == 1 and 1 <= row.steps_redone <= 10, (row.restarts, row.steps_redone)
    history = pd.read_parquet(out / "worker_loss" / "history.parquet")
    assert list(history["step"]) == [10, 20, 30]  # trained on from step 10: no step reported twice
    assert math.isfinite(row.eval_loss) and row.eval_loss < row.base_eval_loss


def test_resume_names_the_missing_state_and_the_fix(tmp_path, capsys) -> None:
    """`lora-search resume NAME` without saved state refuses (exit 2) with the path it looked in and the fix."""
    with pytest.raises(SystemExit) as exit_:
        main(["resume", "nosuch", "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nosuch" / "ray" / "nosuch") in err and "lora-search run" in err and "--output-dir" in err


def test_a_stopped_trial_run_again_replays_up_to_its_stop_and_stops_there(tmp_path) -> None:
    """ASHA's saved stops keep their step: a trial that ended (pruned at 20, or at max_steps 30) after Tune last saved
    its state runs again from its first report on resume; its replayed reports go on up to that step and stop there."""
    from types import SimpleNamespace

    from lora_search.pareto_asha import ParetoASHA
    from lora_search.resume import restorable

    def asha():  # Sweep(scheduler="asha")'s
        base = ParetoASHA(
            time_attr="step", metric="eval_loss", mode="min", max_t=30, grace_period=10, reduction_factor=2,
            quality_only=True,
        )  # fmt: skip
        return restorable(base, tmp_path / "asha_state.json")

    before = asha()
    pruned, done = SimpleNamespace(trial_id="pruned"), SimpleNamespace(trial_id="done")
    for t in (done, pruned):
        before.on_trial_add(None, t)
    losses = {"done": [5.0, 4.5, 4.0], "pruned": [4.9, 5.2, 5.1]}
    decisions = {t.trial_id: [] for t in (done, pruned)}
    for t in (done, pruned):
        for step, loss in zip((10, 20, 30), losses[t.trial_id], strict=True):
            decisions[t.trial_id].append(before.on_trial_result(None, t, {"step": step, "eval_loss": loss}))
            if decisions[t.trial_id][-1] == before.STOP:
                break
    assert decisions == {"done": ["CONTINUE", "CONTINUE", "STOP"], "pruned": ["CONTINUE", "STOP"]}

    after = asha()  # the resumed driver's scheduler: state from the file only
    for t in (done, pruned):
        after.on_trial_add(None, t)
    replay = {
        t.trial_id: [after.on_trial_result(None, t, {"step": s, "eval_loss": 9.0}) for s in (5, 10, 15, 20, 30)]
        for t in (done, pruned)
    }
    assert replay["done"] == ["CONTINUE", "CONTINUE", "CONTINUE", "CONTINUE", "STOP"]
    assert replay["pruned"] == ["CONTINUE", "CONTINUE", "CONTINUE", "STOP", "STOP"]
