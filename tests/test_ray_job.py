"""`ray job submit --working-dir . -- python sweeps/NAME.py` against a real local head node (Ray Jobs CLI)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A real `ray start --head` on localhost; stopped (with everything it started) at the end."""
    import ray

    ray.shutdown()  # no in-process Ray from other tests may be running when `ray stop` sweeps the machine
    gcs, dashboard = _free_port(), _free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        # Started from an activated venv, as a user would: the job's `python` is this venv's.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_ray_job_submit_runs_a_sweep(head_node, tiny_model_dir, tiny_jsonl, tmp_path) -> None:
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
    job = subprocess.run(
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
        env={
            **os.environ,
            "RAY_ADDRESS": "",
            "RAY_AUTH_MODE": "token",  # the head enables token auth (Ray >= 2.59); its token is in ~/.ray
        },
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "2 trials:" in job.stdout
    frame = pd.read_parquet(out / "job" / "trials.parquet")
    assert len(frame) == 2 and set(frame["status"]) <= {"completed", "pruned"}
