"""`ray job submit --working-dir . -- python sweeps/NAME.py` against a real local head node (Ray Jobs CLI)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

if TYPE_CHECKING:
    from tests.conftest import LocalRay

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # every interface: a port that another process holds on the node IP is not free
        return s.getsockname()[1]


@pytest.fixture
def head_node(local_ray: LocalRay) -> str:
    """A real `ray start --head` on localhost, of this test's own; stopped with it (local_ray), and nothing else."""
    dashboard = _free_port()
    # The job agent's HTTP port is 52365 by default: another Ray node on this machine (a test running beside this one,
    # or the user's own cluster) may hold it, and then no agent takes the job ("No available agent to submit job").
    local_ray.start(
        "--head", f"--port={_free_port()}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={_free_port()}",
    )  # fmt: skip
    return f"http://127.0.0.1:{dashboard}"


def test_ray_job_submit_runs_a_sweep(head_node, local_ray, tiny_model_dir, tiny_jsonl, tmp_path) -> None:
    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    (work / "sweeps").mkdir(parents=True)
    shutil.copytree(repo / "lora_search", work / "lora_search", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "sweeps" / "job.py").write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Budget, Dataset, SearchSpace, Sweep, main
        SWEEP = Sweep(
            name="job",
            base=BaseModel({str(tiny_model_dir)!r}),
            dataset=Dataset({str(tiny_jsonl)!r}, eval_fraction=0.2, max_length=96),
            space=SearchSpace(ranks=(2, 4), variants=("lora", "rslora")),
            budget=Budget(max_steps=10, eval_every=5, grace_period=5, reduction_factor=2, batch_size=8),
            num_samples=2,
        )
        if __name__ == "__main__":
            main(SWEEP)
    """)
    )
    out = tmp_path / "reports"
    runtime_env = {"env_vars": {"LORA_SEARCH_OUTPUT_DIR": str(out)}}
    # The head's job agent can come up after its dashboard answers (seen under load: "No available agent to submit
    # job, please try again later"); Ray says to try again, so the submission is retried on that message alone.
    deadline = time.monotonic() + 120
    while True:
        job = _submit(head_node, work, runtime_env, local_ray.env)
        if "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "2 trials:" in job.stdout
    frame = pd.read_parquet(out / "job" / "trials.parquet")
    assert len(frame) == 2 and set(frame["status"]) <= {"completed", "pruned"}


def test_a_tests_ray_stops_alone(local_ray: LocalRay) -> None:
    """What a LocalRay stops is the nodes it started: another Ray on the machine (here a second head, standing for a
    user's own cluster) keeps running."""
    import psutil

    def processes(nodes: LocalRay) -> set[int]:
        sessions = {n.pid for n in nodes.nodes}
        return {p.pid for p in psutil.process_iter() if _sid(p.pid) in sessions}

    theirs, mine = local_ray, type(local_ray)()
    try:
        for nodes in (theirs, mine):
            nodes.start("--head", f"--port={_free_port()}", "--num-cpus=0", "--include-dashboard=false")
        before = processes(theirs)
        assert before and processes(mine)
        mine.stop()
        assert not processes(mine) and not mine.temp_dir.exists()
        assert before <= processes(theirs) and all(n.poll() is None for n in theirs.nodes)
    finally:
        mine.stop()


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _submit(head_node: str, work: Path, runtime_env: dict, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            head_node,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "sweeps/job.py",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,  # the head's token
    )
