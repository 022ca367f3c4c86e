"""A real three-node Ray cluster on localhost (`ray start`: one head, two workers with their own node resources):
every trial spans two workers on two different nodes (DDP, and DeepSpeed ZeRO-3, over gloo on CPU)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

from lora_search.probe import check_reload

if TYPE_CHECKING:
    from tests.conftest import LocalRay

pytestmark = pytest.mark.slow

NODES = (
    "import json, ray; ray.init(logging_level='ERROR'); "
    "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # every interface: a port that another process holds on the node IP is not free
        return s.getsockname()[1]


@pytest.fixture
def three_nodes(local_ray: LocalRay) -> LocalRay:
    """Head (no CPUs: trials' workers never land there) + two 2-CPU workers, of this test's own (local_ray stops
    them, and nothing else). `.env` reaches the cluster: its address and token."""
    gcs, dashboard = _free_port(), _free_port()
    address = f"127.0.0.1:{gcs}"
    local_ray.start(
        "--head", f"--port={gcs}", "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--resources", '{"head": 1}',
    )  # fmt: skip
    for name in ("node_a", "node_b"):
        local_ray.start(f"--address={address}", "--num-cpus=2", "--resources", f'{{"{name}": 1}}')
    local_ray.env["RAY_ADDRESS"] = address
    return local_ray


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
