"""16 concurrent trial writers against MLflow: 0 lost metric rows on SQLite and on a PostgreSQL-backed server.

    .venv/bin/python -m pytest tests/test_concurrency.py -q -s      # -s prints the figures

Each writer is an OS process acting like a trial: its own child run under the sweep's one parent, its params and
tags, then STEPS reports of the step metrics, then its final status, all through lora_search's own `Tracker` (the
object the driver's Tune callback logs through: within one sweep only the driver writes to MLflow). Sixteen of
them at once is what sixteen drivers sharing one store do (sweeps on one machine share `reports/mlflow.db`; a
cluster shares one server). Afterwards every (run, metric, step) is read back through
`MlflowClient.get_metric_history` and must be there exactly once, with its value.

Stores: the embedded SQLite file used directly by all sixteen processes (lora_search's default), a real
`mlflow server` on a SQLite file, and a real `mlflow server` on PostgreSQL. PostgreSQL is Debian's package,
installed here with apt-get when missing, run as a throwaway cluster (initdb in a temp dir, owned by the
`postgres` user, on a free 127.0.0.1 port) and removed at the end.

What is counted besides the rows: writers whose tracking gave up (any MLflow call that raised: a Tracker stops
live logging at its first error), and, on the servers, the requests answered 5xx and the "database is locked"
errors in the server's log (MLflow's client retries 5xx by itself, so only the log shows them). What failed on
SQLite was opening a new store: sixteen drivers at once on a `mlflow.db` none had created left fifteen failing in
MLflow's schema migration, until `tracking._open` made them take turns; that case has its own test.
"""

from __future__ import annotations

import collections
import glob
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# serial: 16 writer processes, the MLflow server and PostgreSQL need the machine to themselves; beside another test
# file (make test's two workers) the server's database connections waited out SQLAlchemy's 30 s pool timeout, and 5
# writers' tracking gave up (seen in a fresh-clone CI run).
pytestmark = [pytest.mark.slow, pytest.mark.serial]
WRITERS = 16
STEPS = 50
METRICS = ("eval_loss", "train_loss", "tokens_per_s")
"""Three of tracking.STEP_METRICS, logged at every step: 16 x 50 x 3 = 2,400 metric rows per store."""
CONFIG = {"variant": "lora", "rank": 8, "alpha_over_rank": 2.0, "targets": "attention", "dropout": 0.0, "lr": 1e-3}
FINGERPRINT = "concurrency-test-base"
FRESH_STEPS = 20
"""The new-store case is about opening it: fewer steps each."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _value(metric: str, index: int, step: int) -> float:
    """A distinct value per (writer, metric, step), so a row written to the wrong run or step would show."""
    return {
        "eval_loss": 10.0 / (step + index),
        "train_loss": index + step / 1000,
        "tokens_per_s": 1000.0 * index + step,
    }[metric]


def _sweep(out: str, uri: str | None) -> Any:
    from lora_search import BaseModel, Budget, Dataset, SearchSpace, Sweep

    return Sweep(
        name="concurrency",
        base=BaseModel("concurrency/tiny-base"),
        dataset=Dataset("data/tiny/train.jsonl"),
        space=SearchSpace(ranks=(8,), targets=("attention",), variants=("lora",)),
        budget=Budget(max_steps=STEPS, eval_every=1, grace_period=STEPS),
        output_dir=out,
        tracking_uri=uri,
    )


# --- the writers: one OS process each -------------------------------------------------------------------------------


def _tracker_writer(
    out: str, uri: str | None, index: int, steps: int, own_sweep: bool, barrier: Any, results: Any
) -> None:
    """One trial as lora_search logs it, through a Tracker opened once all writers are ready: start, every step's
    result, end. By default the trial is one of the sweep `concurrency`, whose parent run the Tracker finds in
    tracking.json; `own_sweep`: the writer is the driver of a sweep of its own (`driver_<index>`) instead."""
    from lora_search import tracking

    report: dict[str, Any] = {"index": index, "steps": steps, "error": "", "run_id": "", "broken": False}
    try:
        name = f"driver_{index:02d}" if own_sweep else "concurrency"
        (Path(out) / name).mkdir(exist_ok=True)
        barrier.wait(timeout=120)
        tracker = tracking.Tracker(_sweep(out, uri).replace(name=name), Path(out) / name, FINGERPRINT)
        trial_id = f"writer_{index:02d}"
        tracker.trial_started(trial_id, CONFIG)
        for step in range(1, steps + 1):
            tracker.trial_result(trial_id, CONFIG, {"step": step, **{m: _value(m, index, step) for m in METRICS}})
        tracker.trial_ended(trial_id, CONFIG, "completed", steps)
        report.update(run_id=tracker.children.get(trial_id, ""), parent_id=tracker.parent_id, broken=tracker.broken)
    except Exception as e:  # reported to the test, which fails on it
        report["error"] = f"{type(e).__name__}: {e}"[:500]
    results.put(report)


def _run_writers(out: Path, uri: str | None, steps: int = STEPS, own_sweep: bool = False) -> list[dict[str, Any]]:
    """WRITERS processes released together by a barrier; their reports, each with the seconds it all took."""
    # forkserver: each writer is a fresh process forked from one that has imported MLflow (16 imports of it on 2
    # cores would take longer than the writing), and none inherits this process's MLflow client or DB connections.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlflow", "lora_search.tracking"])
    barrier, results = context.Barrier(WRITERS + 1), context.Queue()
    procs = [
        context.Process(target=_tracker_writer, args=(str(out), uri, i, steps, own_sweep, barrier, results))
        for i in range(WRITERS)
    ]
    try:
        for p in procs:
            p.start()
        barrier.wait(timeout=120)
        start = time.monotonic()
        reports = [results.get(timeout=300) for _ in procs]
        elapsed = time.monotonic() - start
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0, f"writer pid {p.pid} exited with {p.exitcode}"
    finally:
        for p in procs:  # a writer stuck past the timeouts is ended with the test, not left behind
            if p.pid is not None and p.exitcode is None:
                p.kill()
                p.join(timeout=10)
    return [dict(r, elapsed=elapsed) for r in sorted(reports, key=lambda r: r["index"])]


def _parent(out: Path, uri: str | None) -> str:
    """The sweep's parent run, created once by a Tracker as the driver does; the writers find it in tracking.json."""
    from lora_search import tracking

    (out / "concurrency").mkdir(parents=True)
    return tracking.Tracker(_sweep(str(out), uri), out / "concurrency", FINGERPRINT).parent_id


def _count(uri: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Every (run, metric, step) read back: how many rows are there, missing, duplicated, or hold a wrong value."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    seen: collections.Counter[tuple[str, str, int]] = collections.Counter()
    wrong = 0
    for r in reports:
        for metric in METRICS:
            for m in client.get_metric_history(r["run_id"], metric):
                seen[(r["run_id"], metric, m.step)] += 1
                wrong += not math.isclose(m.value, _value(metric, r["index"], m.step), rel_tol=1e-12)
    expected = {(r["run_id"], m, s) for r in reports for m in METRICS for s in range(1, r["steps"] + 1)}
    return {
        "runs": [client.get_run(r["run_id"]) for r in reports],
        "expected": len(expected),
        "found": sum(seen.values()),
        "lost": sorted(expected - set(seen)),
        "duplicated": sorted(k for k, n in seen.items() if n > 1),
        "unexpected": sorted(set(seen) - expected),
        "wrong_values": wrong,
    }


def _check(store: str, uri: str, reports: list[dict[str, Any]], server_log: Path | None = None) -> dict[str, Any]:
    """Print the figures; assert that every writer finished and every row is there exactly once."""
    errors = collections.Counter(r["error"].splitlines()[0][:200] for r in reports if r["error"])
    assert not errors, f"{sum(errors.values())} of {WRITERS} writers failed: {dict(errors)}"
    figures = _count(uri, reports)
    seen = ""
    if server_log is not None:  # MLflow's client retries 5xx answers itself: the server's log shows what it hid
        log = server_log.read_text()
        failed = len(re.findall(r'HTTP/1\.1" 5\d\d', log))
        seen = f"; the server answered {failed} request(s) with an error, {log.count('database is locked')} locked"
    print(
        f"\n[{store}] {WRITERS} writers x {reports[0]['steps']} steps x {len(METRICS)} metrics in "
        f"{reports[0]['elapsed']:.1f}s: {figures['expected']} rows expected, {figures['found']} found, "
        f"{len(figures['lost'])} lost, {len(figures['duplicated'])} duplicated, {figures['wrong_values']} wrong "
        f"values; {sum(r['broken'] for r in reports)} writer(s) whose tracking gave up{seen}",
        flush=True,
    )
    assert not [r["index"] for r in reports if r["broken"]], "a writer's tracking failed (printed above)"
    assert figures["expected"] == WRITERS * reports[0]["steps"] * len(METRICS) and len(figures["runs"]) == WRITERS
    assert figures["found"] == figures["expected"]
    assert not figures["lost"] and not figures["duplicated"] and not figures["unexpected"]
    assert figures["wrong_values"] == 0
    for run in figures["runs"]:  # params, tags and the final status of every trial
        assert run.info.status == "FINISHED" and run.data.tags["lora_search.status"] == "completed"
        assert run.data.params["rank"] == "8" and run.data.params["max_steps"] == str(STEPS)
        assert run.data.tags["lora_search.base_fingerprint"] == FINGERPRINT
        assert run.data.tags["mlflow.parentRunId"] == next(
            r["parent_id"] for r in reports if r["run_id"] == run.info.run_id
        )
    return figures


# --- the stores --------------------------------------------------------------------------------------------------


def _wait_healthy(uri: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@contextmanager
def _mlflow_server(backend_uri: str, root: Path) -> Iterator[str]:
    """A real `mlflow server` (its default 4 uvicorn workers) on a free 127.0.0.1 port; stopped at the end. Its GenAI
    job runner (7 huey consumer processes, ~27 CPU-s to start) is off: no tracking request goes through it."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts")]
    log = root / "server.log"
    from lora_search import tracking

    env = tracking.server_env()
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, server, log)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _install_postgres() -> Path:
    """Debian's `postgresql` package, installed when missing; skipped (with the reason) only where apt can't run."""
    if (bin_dir := _postgres_bin()) is not None:
        return bin_dir
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(
            "PostgreSQL is not installed and cannot be installed here: this test installs Debian's `postgresql` "
            f"with apt-get, which needs apt-get and root (apt-get: {shutil.which('apt-get')}, uid {os.geteuid()}). "
            "Install it (apt-get install postgresql) and run again."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}"
    bin_dir = _postgres_bin()
    assert bin_dir is not None, "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb exists"
    return bin_dir


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port with a database `mlflow`; its SQLAlchemy URI.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user (runuser). Its dir
    is directly under the system temp dir: pytest's own temp dirs are root-only (0700), closed to that user.
    """
    import importlib.util

    # SQLAlchemy 2.1 reads postgresql:// URIs with psycopg (3), as cluster/mlflow.yaml's server does.
    assert importlib.util.find_spec("psycopg"), "no psycopg: it is in the dev extra (pip install -e '.[dev]')"
    bin_dir = _install_postgres()
    as_root = os.geteuid() == 0
    data = Path(tempfile.mkdtemp(prefix="lora_search_pg_"))
    if as_root:
        shutil.chown(data, "postgres", "postgres")

    def pg(*args: str, timeout: float = 120) -> None:
        command = [str(bin_dir / args[0]), *args[1:]]
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *command] if as_root else command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=data,
        )
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}"

    port = _free_port()
    cluster = data / "cluster"
    pg("initdb", "-D", str(cluster), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    pg("pg_ctl", "-D", str(cluster), "-l", str(data / "postgres.log"), "-o", options, "-w", "-t", "60", "start")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        pg("pg_ctl", "-D", str(cluster), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(data, ignore_errors=True)


# --- the tests ---------------------------------------------------------------------------------------------------


def _trial_writers(store: str, out: Path, uri: str | None, read_uri: str, server_log: Path | None = None) -> None:
    """One sweep's parent; its sixteen trials write at once, each its own child run."""
    parent_id = _parent(out, uri)
    reports = _run_writers(out, uri)
    _check(store, read_uri, reports, server_log)
    assert {r["parent_id"] for r in reports} == {parent_id}


def test_16_trial_writers_on_the_embedded_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lora_search's default, `sqlite:///<output_dir>/mlflow.db`, opened directly by all sixteen processes."""
    from lora_search import layout

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _trial_writers("sqlite file", tmp_path, None, layout.default_tracking_uri(str(tmp_path)))


def test_16_drivers_open_one_new_embedded_sqlite_store_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sixteen sweeps started together on one machine share `reports/mlflow.db`, which none has created yet: each
    driver opens it (MLflow creates and migrates the schema on first open), then logs its one trial."""
    from lora_search import layout

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reports = _run_writers(tmp_path, None, steps=FRESH_STEPS, own_sweep=True)
    _check("new sqlite file, 16 drivers", layout.default_tracking_uri(str(tmp_path)), reports)
    assert len({r["parent_id"] for r in reports}) == WRITERS


def test_16_trial_writers_on_a_sqlite_backed_server(tmp_path: Path) -> None:
    with _mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as uri:
        _trial_writers("sqlite server", tmp_path, uri, uri, tmp_path / "server.log")


def test_16_trial_writers_on_a_postgres_backed_server(tmp_path: Path, postgres: str) -> None:
    with _mlflow_server(postgres, tmp_path) as uri:
        _trial_writers("postgres server", tmp_path, uri, uri, tmp_path / "server.log")
