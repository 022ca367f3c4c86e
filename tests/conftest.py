"""Shared fixtures: a tiny random Llama with a real tokenizer, and small data files, all built offline; a real MLflow
server and the real sweeps that several tests only read, each run once a session; Ray nodes that a test starts and
stops itself."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import pandas as pd

    from lora_search import Sweep

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog bird red blue green big small runs eats sleeps joy anger fear calm happy sad".split()
LABELS = ("joy", "anger", "fear", "calm")


SHARED_SWEEP_FILES = frozenset(
    {"test_answers.py", "test_logged_models.py", "test_serving.py", "test_sweep.py", "test_tracking.py"}
)
"""The test files whose tests read the session's real sweeps (`shared_sweep`, `failed_sweep`: a minute or two each of
a 2-core machine). tests/test_ci_layout.py checks that the list names every such file and no other."""


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test`'s two workers (`--dist loadfile`) take whole files, except that the `SHARED_SWEEP_FILES` go to one
    worker together: a session fixture runs once per worker, so split over two workers those sweeps ran twice (about
    150 s of a CI run). A scheduler of our own because `--dist loadgroup` does not group on pytest 9.2
    (pytest-dev/pytest-xdist#1386: the `xdist_group` suffix it writes into a test's id no longer takes).

    The units keep xdist's order (most tests first). Heaviest first was tried and measured worse (parallel part
    1,024 s against 924 s), likely because xdist hands each worker two units at the start: the worker of the shared
    sweeps then also holds the third heaviest file."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedSweepsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "shared-sweeps" if Path(path).name in SHARED_SWEEP_FILES else path

    return SharedSweepsTogether(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random LlamaForCausalLM (hidden 64) + byte-level BPE tokenizer, saved as a HF model dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lora_search.strategies import deepspeed_when_used

    deepspeed_when_used()  # save_pretrained below would import DeepSpeed into this test process
    out = tmp_path_factory.mktemp("tiny_model")
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,  # >= every max_length the tests use (preflight refuses a longer one)
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_instruction_rows(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = rng.choice(LABELS)
            sentence = f"the {rng.choice(WORDS[3:6])} {label} {rng.choice(WORDS[9:13])}"
            f.write(json.dumps({"id": f"r{i}", "instruction": "Name the mood.", "input": sentence, "output": label}))
            f.write("\n")
    return path


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_instruction_rows(tmp_path_factory.mktemp("data") / "train.jsonl", 120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tracking server: SQLite backend, proxied artifact store, on a free localhost port."""
    from lora_search import tracking

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]
    log = (root / "server.log").open("w")
    # One worker, no GenAI job runner (as `lora-search ui` starts it): the driver is the server's one writer, and
    # MLflow's defaults cost 47 CPU-s against 8 on this 2-core machine.
    command += ["--workers", "1"]
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=tracking.server_env()
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def tracked_sweep(model_dir: Path, data: Path, out: Path, uri: str, **changes: object) -> Sweep:
    """The shared sweep's settings: 4 seeded trials of LoRA/DoRA, ASHA rungs at steps 5 and 10 of 20, scored on both
    golden sets, tracked on `uri`. Ray's ASHA on eval loss: the tests that read it need a pruned trial beside the
    completed ones, and Pareto ASHA (the default) lets all 4 of these go on, each being best on some axis at its
    rung (its own decisions are tested in test_pareto_asha and by the other sweeps)."""
    from lora_search import BaseModel, Budget, Dataset, Evals, SearchSpace, Sweep

    sweep = Sweep(
        name="tracked",
        base=BaseModel(str(model_dir)),
        dataset=Dataset(str(data), eval_fraction=0.2, max_length=96),
        space=SearchSpace(
            ranks=(2, 8), targets=("attention", "all-linear"), variants=("lora", "dora"), lr=(3e-3, 1e-2)
        ),
        budget=Budget(max_steps=20, eval_every=5, grace_period=5, reduction_factor=2, batch_size=8),
        num_samples=4,
        seed=3,
        output_dir=str(out),
        evals=Evals(
            tasks=("tiny_mood", "tiny_antonym"),
            objective="tiny_mood/acc",
            tasks_dir=str(REPO / "evals" / "tasks"),
            limit=16,
        ),
        tracking_uri=uri,
        scheduler="asha",
    )
    return sweep.replace(**changes)


@pytest.fixture(scope="session")
def shared_sweep(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_server: str
) -> tuple[Sweep, pd.DataFrame, Path]:
    """(sweep, trials, output dir) of one real sweep, run once a session and read by the tests that only read a
    sweep's results: test_sweep (results on disk, adapters, scores) and test_tracking (MLflow runs, frontier tags,
    export, the UI). Nothing may write into it: a test that changes a sweep dir works on a copy."""
    from lora_search.sweep import run

    out = tmp_path_factory.mktemp("shared_sweep")
    # One trial at a time: ASHA's decisions then follow from the seeded trials alone (3 completed, 1 pruned), not from
    # which of two concurrent trials reaches a rung first; and the trials are warm (one process, imports done once).
    sweep = tracked_sweep(tiny_model_dir, tiny_jsonl, out, mlflow_server, max_concurrent_trials=1)
    return sweep, run(sweep), out


@pytest.fixture(scope="session")
def failed_sweep(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_server: str
) -> tuple[Sweep, pd.DataFrame]:
    """(sweep, trials) of a real sweep whose 2 trials both fail (weights that are not safetensors), tracked on
    mlflow_server; read by test_sweep (the sweep goes on) and test_tracking (failed runs with their reason)."""
    from lora_search.sweep import run

    out = tmp_path_factory.mktemp("failed_sweep")
    broken = out / "broken_model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # config is fine; weights are not
    sweep = tracked_sweep(broken, tiny_jsonl, out, mlflow_server, name="tracked_fail", num_samples=2)
    return sweep, run(sweep)


RAY = str(Path(sys.executable).with_name("ray"))


class LocalRay:
    """Ray nodes on this machine that one test starts (`ray start --block`, each in a session of its own) and stops
    by ending those sessions. Never `ray stop`: it stops every Ray on the machine, a user's own cluster too.

    The nodes share a temp dir of their own (session files and `ray_current_cluster` stay out of /tmp/ray, so a
    user's `ray.init()` never joins them) and a token of their own (nothing read from or written to ~/.ray)."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it (sun_path holds 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray"))
        self.env = {
            **os.environ,
            # As a user starts it, from an activated venv: a job's `python` is this venv's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "RAY_ADDRESS": "",
            "RAY_AUTH_MODE": "token",  # Ray >= 2.59 turns token auth on for a head; every client then needs it
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        self.nodes: list[subprocess.Popen] = []

    def start(self, *args: str, timeout: float = 180) -> None:
        """`ray start --block ARGS`; returns once the node is up (the CLI's own `--block` message)."""
        log = self.temp_dir / f"node_{len(self.nodes)}.log"
        with log.open("w") as sink:
            node = subprocess.Popen(
                [RAY, "start", "--block", f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *args],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while "block forever" not in log.read_text():
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to each `ray start --block`, which stops the processes it started; what is left in those sessions
        after a short grace (a worker of a killed raylet; a head that has run a job takes ~30 s to stop on its own) is
        killed. Nothing outside them is touched."""
        # Last started first: a worker node whose head has gone waits ~30 s for its GCS before it stops.
        for node in reversed(self.nodes):
            node.terminate()
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_session(node.pid)
                node.wait(timeout=30)
            _kill_session(node.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session `sid` (a session this test started)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (OSError, psutil.Error):
            continue


@pytest.fixture
def local_ray() -> Iterator[LocalRay]:
    """Ray nodes this test starts (`local_ray.start("--head", ...)`), stopped with the test, and only those."""
    nodes = LocalRay()
    try:
        yield nodes
    finally:
        nodes.stop()
