"""A real three-node Ray cluster on localhost (`ray start`: one head, two workers with their own node resources),
started once for this module: every trial spans two workers on two different nodes (DDP, and DeepSpeed ZeRO-3, over
gloo on CPU); a whole worker node killed under a training trial (SIGKILL to its raylet and every process under it)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

from lora_search.probe import check_reload
from tests.conftest import LocalRay
from tests.test_resume import _trial_worker, _wait_progress, one_trial_driver

pytestmark = pytest.mark.slow

NODES = (
    "import json, ray; ray.init(logging_level='ERROR'); "
    "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # every interface: a port that another process holds on the node IP is not free
        return s.getsockname()[1]


WORKERS = ("node_a", "node_b")


@pytest.fixture(scope="module")
def _cluster() -> Iterator[tuple[LocalRay, dict[str, subprocess.Popen]]]:
    """Head (no CPUs: trials' workers never land there) + two 2-CPU workers, started once for this module's tests
    (starting and stopping a cluster costs ~35 s on a 2-core machine) and stopped after the last one, and nothing
    else. Yields the nodes and each worker's `ray start --block` process by its resource name."""
    nodes = LocalRay()
    try:
        gcs, dashboard = _free_port(), _free_port()
        nodes.start(
            "--head", f"--port={gcs}", "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--resources", '{"head": 1}',
        )  # fmt: skip
        nodes.env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        yield nodes, {}
    finally:
        nodes.stop()


@pytest.fixture
def three_nodes(_cluster: tuple[LocalRay, dict[str, subprocess.Popen]]) -> LocalRay:
    """The module's cluster with both worker nodes up: a worker a test killed (its `ray start --block` exits when its
    raylet dies) is started again, so each test gets the same three live nodes whatever ran before it. `.env`
    reaches the cluster: its address and token."""
    nodes, workers = _cluster
    for name in WORKERS:
        if name not in workers or workers[name].poll() is not None:
            nodes.start(f"--address={nodes.env['RAY_ADDRESS']}", "--num-cpus=2", "--resources", f'{{"{name}": 1}}')
            workers[name] = nodes.nodes[-1]
    return nodes


def test_two_worker_trials_spread_over_two_nodes(three_nodes, tiny_model_dir, tiny_jsonl, tmp_path) -> None:
    sweep_file = tmp_path / "multinode.py"
    sweep_file.write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep, main
        SWEEP = Sweep(
            name="multinode",
            base=BaseModel({str(tiny_model_dir)!r}),
            dataset=Dataset({str(tiny_jsonl)!r}, eval_fraction=0.2, max_length=96),
            space=SearchSpace(ranks=(4,), targets=("attention",), variants=("lora", "dora"), lr=(1e-3, 2e-3),
                              lr_grid_points=1),
            budget=Budget(max_steps=10, eval_every=5, grace_period=10, batch_size=4),
            # Two workers per trial, never on the same node: lora's replicate the model (DDP), dora's shard it
            # (DeepSpeed ZeRO-3 over gloo: each node holds half the base and must gather the adapter to save it).
            resources=Resources(workers=2, cpus_per_worker=1, placement="STRICT_SPREAD",
                                strategy_by_variant={{"dora": "deepspeed-zero3"}}),
            search="grid", num_samples=1, seed=0, output_dir={str(tmp_path / "reports")!r},
        )
        if __name__ == "__main__":
            main(SWEEP)
        """)
    )
    driver = subprocess.run(
        [sys.executable, str(sweep_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env=three_nodes.env,
    )
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    listing = subprocess.run(
        [sys.executable, "-c", NODES],
        capture_output=True,
        text=True,
        timeout=120,
        env=three_nodes.env,
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    nodes = json.loads(listing.stdout.strip().splitlines()[-1])
    workers = {node for node, resources in nodes.items() if "node_a" in resources or "node_b" in resources}
    assert len(nodes) == 3 and len(workers) == 2

    frame = pd.read_parquet(tmp_path / "reports" / "multinode" / "trials.parquet")
    assert list(frame["status"]) == ["completed", "completed"], frame[["status", "reason"]]
    assert dict(zip(frame["variant"], frame["strategy"], strict=True)) == {"lora": "ddp", "dora": "deepspeed-zero3"}
    for row in frame.itertuples():
        used = set(row.worker_nodes.split(","))
        assert used == workers, (used, workers)  # both workers of the trial, one on each worker node
        assert row.device_s > 0 and row.trainable_params > 0
        assert check_reload(Path(row.adapter_path)) < 1e-5  # whole adapters, though dora's was sharded over 2 nodes


def _raylets(gcs: str) -> list[psutil.Process]:
    """The raylet processes of the cluster whose GCS listens on `gcs` (one per node)."""
    found = []
    for p in psutil.process_iter():
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "raylet/raylet" in line and re.search(rf"--gcs-address=\S*:{gcs.rsplit(':', 1)[1]}\b", line):
            found.append(p)
    return found


def test_lost_worker_node_trains_on_from_its_checkpoint(three_nodes, tiny_model_dir, tiny_jsonl, tmp_path) -> None:
    """Kill the whole worker node (its raylet and every process under it) that a trial is training on, after the
    trial's first checkpoint: the trial trains on, on the node that is left, from that checkpoint."""
    out = tmp_path / "reports"
    driver = one_trial_driver(tmp_path, "node_loss", tiny_model_dir, tiny_jsonl, out, three_nodes.env)
    killed_at = _wait_progress(out / "node_loss" / "ray" / "progress", 13, driver)
    node = next(r for r in _raylets(three_nodes.env["RAY_ADDRESS"]) if _trial_worker(r) is not None)
    doomed = [node, *node.children(recursive=True)]
    for p in doomed:
        p.kill()
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    row = pd.read_parquet(out / "node_loss" / "trials.parquet").iloc[0]
    print(
        f"\nnode killed after step {killed_at}: restarts {row.restarts}, steps redone {row.steps_redone}, "
        f"ran on {row.worker_nodes}"
    )
    assert row.status == "completed" and row.step == 30, row.reason
    assert row.restarts == 1 and 1 <= row.steps_redone <= 10, (
        row.restarts,
        row.steps_redone,
    )  # at most one checkpoint interval
    history = pd.read_parquet(out / "node_loss" / "history.parquet")
    assert list(history["step"]) == [10, 20, 30]
