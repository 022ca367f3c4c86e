"""Security defaults, each checked on the real parts: what listens where, that no secret is recorded, that adapters
are read from safetensors only, and that a checkpoint's own code runs only when its model opts in.

Run: python -m pytest tests/test_security.py

- Binding: `lora-search ui` (a real `mlflow server`) and the local Ray a sweep starts (its dashboard, which is also
  Ray's job server) listen on 127.0.0.1 only; `--host 0.0.0.0` is the explicit opt-in; every 0.0.0.0 in cluster/
  is marked as one.
- Secrets: a real sweep (Ray Tune + Ray Train + lm-eval + MLflow's SQLite store) runs with a canary token in
  HF_TOKEN, HUGGING_FACE_HUB_TOKEN and MLFLOW_TRACKING_TOKEN; then every file of the sweep's output dir (results,
  provenance.json, the HTML report, Tune's and Train's state, the MLflow db and artifacts), every file of that
  Ray session's dir (logs included) and the driver's own output are searched for it: 0 hits.
- Pickle adapters (`adapter_model.bin`) are refused by load_adapter, export and `lora-search eval`, unless opted in.
- `trust_remote_code`: a model dir that ships modelling code which, when imported, writes a marker file.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from lora_search import BaseModel, Budget, Dataset, Evals, SearchSpace, Sweep, layout, provenance, registry, tracking
from lora_search.cli import main

REPO = Path(__file__).resolve().parents[1]
CANARY = "hf_" + secrets.token_hex(17)  # shaped like a Hugging Face token: hf_ + 34 characters
CANARY_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_TOKEN")
ALL_INTERFACES = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])")  # 0.0.0.0, not 10.0.0.0/16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """The addresses something on this machine listens on at `port` (TCP)."""
    import psutil

    return {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == port}


def _outside_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except OSError:
        return True


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "cache"))  # fingerprints: never ~/.cache


# --- binding ---------------------------------------------------------------------------------------------------


def test_ui_listens_on_localhost_only_by_default(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # an existing (empty) store
    port = _free_port()
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen(
        [sys.executable, "-m", "lora_search.cli", "ui", "--output-dir", str(tmp_path), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert ui.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
        assert _listening(port) == {"127.0.0.1"}
        outside = _outside_address()
        if outside is not None:
            assert _refused(outside, port), f"the UI answers on {outside}:{port}"
        assert "warning" not in (tmp_path / "ui.log").read_text()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_ui_beyond_localhost_is_an_opt_in_that_says_what_it_exposes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mlflow.db").touch()
    executed: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda _exe, argv, env: executed.append((argv, env)))  # what would replace it
    with pytest.raises(SystemExit) as done:
        main(["ui", "--output-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "5123"])
    assert done.value.code == 0
    ((argv, env),) = executed
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "5123"
    assert "warning: --host 0.0.0.0" in capsys.readouterr().err
    # a one-user UI: one worker, no GenAI job runner, unless the user's environment asks for it
    assert argv[argv.index("--workers") + 1] == "1" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION" not in os.environ
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    with pytest.raises(SystemExit):
        main(["ui", "--output-dir", str(tmp_path), "--port", "5123"])
    assert executed[-1][1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"

    with pytest.raises(SystemExit) as done:
        main(["ui", "--output-dir", str(tmp_path), "--host", " "])
    assert done.value.code == 2 and "--host" in capsys.readouterr().err and len(executed) == 2


def _cluster_lines() -> list[tuple[str, int, str, str]]:
    """(file, line number, line, the comment block right above it) for every line of cluster/ that binds all
    interfaces."""
    out = []
    for path in sorted([*(REPO / "cluster").glob("*.yaml"), REPO / "cluster" / "nightly.cron"]):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if ALL_INTERFACES.search(line) and not line.lstrip().startswith("#"):
                above = i
                while above > 0 and lines[above - 1].lstrip().startswith("#"):
                    above -= 1
                out.append((path.name, i + 1, line, "\n".join(lines[above:i])))
    return out


def test_cluster_files_bind_to_all_interfaces_only_as_a_marked_opt_in() -> None:
    launcher = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    head = " ".join(launcher["head_start_ray_commands"])
    # `ray up`: the dashboard and job server stay on the head's loopback; `ray dashboard` tunnels to them over ssh.
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    found = _cluster_lines()
    # KubeRay reaches the head's dashboard through its Service, and MLflow serves its pods: those bind 0.0.0.0.
    assert {f for f, *_ in found} >= {"raycluster.yaml", "rayjob-llama70b.yaml", "nightly-cronjob.yaml", "mlflow.yaml"}
    for file, number, line, comment in found:
        assert "opt-in" in line or "opt-in" in comment, (
            f"cluster/{file}:{number} binds 0.0.0.0 unmarked: {line.strip()}"
        )
    # What those bind is reached through Services that stay inside: ClusterIP (KubeRay's head Service by default,
    # `serviceType` unset), or a load balancer that is internal and admits one CIDR.
    services = []
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            services += [(path.name, "head", t) for t in _find(doc, "serviceType")]
            if isinstance(doc, dict) and doc.get("kind") == "Service":
                services.append((path.name, doc["metadata"]["name"], doc["spec"].get("type", "ClusterIP")))
                if doc["spec"].get("type") == "LoadBalancer":
                    annotations = doc["metadata"].get("annotations", {})
                    assert annotations.get("service.beta.kubernetes.io/aws-load-balancer-scheme") == "internal"
                    assert doc["spec"]["loadBalancerSourceRanges"], doc["metadata"]["name"]
    assert ("mlflow.yaml", "mlflow-vpc", "LoadBalancer") in services
    assert {t for *_, t in services} <= {"ClusterIP", "LoadBalancer"}, services


def _find(doc: object, key: str) -> list[object]:
    if isinstance(doc, dict):
        return [v for k, v in doc.items() if k == key] + [x for v in doc.values() for x in _find(v, key)]
    if isinstance(doc, list):
        return [x for v in doc for x in _find(v, key)]
    return []


def test_the_readme_has_a_security_section_naming_every_opt_in() -> None:
    readme = (REPO / "README.md").read_text()
    (section,) = re.findall(r"^## Security\n(.*?)(?=^## )", readme, re.M | re.S)
    for needle in ("--dashboard-host", "--host 0.0.0.0", "--allow-pickle", "trust_remote_code", "HF_TOKEN"):
        assert needle in section, needle


# --- secrets ---------------------------------------------------------------------------------------------------


def _hits(root: Path, needle: bytes) -> tuple[int, list[str]]:
    """(files scanned, files holding `needle`) under `root`, every file, binary ones too."""
    scanned, hits = 0, []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # a socket or a file Ray removed meanwhile
                scanned -= 1
    return scanned, hits


@pytest.mark.slow
def test_no_secret_reaches_any_record_of_a_sweep(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    import ray
    from mlflow import MlflowClient

    from lora_search.sweep import run

    ray.shutdown()  # a fresh local Ray, started by the sweep with the canary in its environment
    for name in CANARY_ENV:
        monkeypatch.setenv(name, CANARY)
    out = tmp_path / "reports"
    sweep = Sweep(
        name="canary",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset(str(tiny_jsonl), eval_fraction=0.2, max_length=64),
        space=SearchSpace(ranks=(2, 4), targets=("attention",), variants=("lora",), lr=(1e-3, 1e-2)),
        budget=Budget(max_steps=10, eval_every=5, grace_period=5, reduction_factor=2, batch_size=8),
        num_samples=2,
        output_dir=str(out),
        evals=Evals(tasks=("tiny_mood",), objective="tiny_mood/acc", tasks_dir=str(REPO / "evals/tasks"), limit=8),
    )
    try:
        frame = run(sweep)
        node = ray._private.worker._global_node
        session = Path(node.get_session_dir_path())
        # The local Ray's dashboard, which also serves `ray job submit`, listens on loopback only.
        dashboard = node.address_info["webui_url"]
        host, port = dashboard.rsplit(":", 1)
        assert host == "127.0.0.1" and _listening(int(port)) == {"127.0.0.1"}, dashboard
        assert not _refused("127.0.0.1", int(port))
        # The secret was there to leak: Ray's workers, where trials run, inherit the driver's environment.
        assert ray.get(ray.remote(lambda: os.environ.get("HF_TOKEN")).remote()) == CANARY
        outside = _outside_address()
        if outside is not None:
            assert _refused(outside, int(port)), f"Ray's dashboard answers on {outside}:{port}"
    finally:
        ray.shutdown()  # flushes and closes the session's logs before they are read
    driver_output = capfd.readouterr()
    assert (frame["status"] == "completed").any() and (out / "canary" / "index.html").is_file()

    needle = CANARY.encode()
    scanned_out, hits_out = _hits(out, needle)  # results, provenance.json, report, ray/ state, mlflow.db, mlartifacts
    scanned_ray, hits_ray = _hits(session, needle)
    hits_driver = [
        name for name, text in (("stdout", driver_output.out), ("stderr", driver_output.err)) if CANARY in text
    ]
    report = (out / "canary" / "index.html").read_text()
    hits = hits_out + hits_ray + hits_driver + (["index.html"] if CANARY in report else [])
    print(f"canary: {scanned_out + scanned_ray} files scanned ({scanned_ray} in {session}), {len(hits)} hits")
    assert hits == []
    # The search finds what is there: the base's path (a param, a tag) in the MLflow db, a trial's id in Ray's logs.
    assert str(out / "mlflow.db") in _hits(out, str(tiny_model_dir).encode())[1]
    assert _hits(session / "logs", f"trial_{frame['trial_id'].iloc[0]}".encode())[1]
    # The search covered what it is meant to: the MLflow store, the Tune results, the Ray logs, the adapters.
    assert (out / "mlflow.db").is_file() and list((out / "mlartifacts").rglob("adapter_model.safetensors"))
    assert list((out / "canary" / "ray").rglob("result.json")) and list((session / "logs").glob("*.err"))
    assert (out / "canary" / "provenance.json").is_file() and scanned_ray > 20

    # Through MLflow itself: no param or tag value of any run holds it (the db could be compressed, this cannot).
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("canary").experiment_id])
    assert len(runs) == 3
    for r in runs:
        assert not [k for k, v in {**r.data.params, **r.data.tags}.items() if CANARY in v], r.info.run_id

    # Safetensors on every save: each adapter dir and each logged adapter, and no pickle adapter anywhere.
    for adapter in (Path(p) for p in frame["adapter_path"] if p):
        assert (adapter / layout.PEFT_WEIGHTS).is_file()
    assert not [p for root in (out, session) for p in root.rglob(registry.PICKLE_WEIGHTS)]


def test_a_tracking_uri_holding_a_password_is_refused_without_echoing_it(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_file = tmp_path / "leaky.py"
    sweep_file.write_text(
        textwrap.dedent(
            f"""
            from lora_search import BaseModel, Dataset, Sweep
            SWEEP = Sweep(
                name="leaky",
                base=BaseModel({str(tiny_model_dir)!r}),
                dataset=Dataset({str(tiny_jsonl)!r}, max_length=64),
                output_dir={str(tmp_path)!r},
                tracking_uri="https://lora:{CANARY}@mlflow.internal:5000",
            )
            """
        )
    )
    with pytest.raises(SystemExit) as done:
        main(["validate", str(sweep_file)])
    said = capsys.readouterr()
    assert done.value.code == 2
    assert "tracking_uri = 'https://lora:***@mlflow.internal:5000'" in said.err
    assert "MLFLOW_TRACKING_PASSWORD" in said.err and CANARY not in said.out + said.err
    pg = Sweep(
        name="pg",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset(str(tiny_jsonl)),
        tracking_uri=f"postgresql://mlflow:{CANARY}@db/mlflow",
    )
    (problem,) = tracking.problems(pg)
    assert "PGPASSWORD" in problem.fix and CANARY not in str(problem)


def test_a_token_in_any_setting_is_masked_in_params_tags_and_the_report(
    tiny_model_dir: Path, tiny_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_secret = secrets.token_urlsafe(12)  # not token-shaped: masked because it is HF_TOKEN's value
    monkeypatch.setenv("HF_TOKEN", env_secret)
    sweep = Sweep(
        name="masked",
        base=BaseModel(str(tiny_model_dir), revision=CANARY),
        dataset=Dataset(f"{tiny_jsonl}?token={env_secret}"),
    )
    recorded = {
        **provenance.sweep_params(sweep),  # the parent run's params and the report's provenance
        **provenance.provenance(sweep, "sha256:0"),  # every run's tags
        **tracking.trial_param_values(sweep, {"variant": "lora", "rank": 2, "alpha": 4.0, "targets": CANARY}),
    }
    leaked = {k: v for k, v in recorded.items() if CANARY in v or env_secret in v}
    assert leaked == {}
    assert recorded["base.revision"] == recorded["lora_search.base_revision"] == provenance.MASK
    assert provenance.redact("https://u:pw@h:1/p and http://h:2/ and sqlite:///a:b@c") == (
        "https://u:***@h:1/p and http://h:2/ and sqlite:///a:b@c"
    )


# --- safetensors only ------------------------------------------------------------------------------------------


def _adapter(base_dir: Path, out: Path, *, pickle: bool) -> Path:
    """A PEFT LoRA adapter with nonzero lora_B and its lora_search meta, saved as safetensors or as a pickle."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(str(out), safe_serialization=not pickle)
    registry.write_meta(out, registry.base_meta(BaseModel(str(base_dir))))
    return out


def test_a_pickle_adapter_is_refused_by_load_export_and_eval_unless_opted_in(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = _adapter(tiny_model_dir, tmp_path / "pickled", pickle=True)
    safe = _adapter(tiny_model_dir, tmp_path / "safe", pickle=False)
    assert {p.name for p in pickled.iterdir()} >= {registry.PICKLE_WEIGHTS} and not (
        pickled / layout.PEFT_WEIGHTS
    ).exists()

    with pytest.raises(registry.PickleAdapterError) as refused:
        registry.load_adapter(str(tiny_model_dir), pickled)
    message = str(refused.value)
    assert str(pickled / registry.PICKLE_WEIGHTS) in message and "--allow-pickle" in message
    assert "save_pretrained" in message  # how to convert it
    with pytest.raises(registry.PickleAdapterError):
        registry.export(pickled, tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written

    # Opted in, it loads, and computes what the same weights from safetensors compute.
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        a = registry.load_adapter(str(tiny_model_dir), pickled, allow_pickle=True)(input_ids=ids).logits
        b = registry.load_adapter(str(tiny_model_dir), safe)(input_ids=ids).logits
    assert torch.equal(a, b)

    with pytest.raises(SystemExit) as done:
        main(["export", str(pickled), "--output", str(tmp_path / "cli_out")])
    assert done.value.code == 2 and registry.PICKLE_WEIGHTS in capsys.readouterr().err
    assert not (tmp_path / "cli_out").exists()
    with pytest.raises(SystemExit) as done:
        main(["export", str(pickled), "--output", str(tmp_path / "cli_out"), "--allow-pickle"])
    assert done.value.code == 0 and (tmp_path / "cli_out" / registry.PICKLE_WEIGHTS).is_file()
    capsys.readouterr()

    # `lora-search eval` refuses every pickle adapter it was given, by name, before the base loads.
    sweep_file = tmp_path / "scored.py"
    sweep_file.write_text(
        textwrap.dedent(
            f"""
            from lora_search import BaseModel, Dataset, Evals, Sweep
            SWEEP = Sweep(
                name="scored",
                base=BaseModel({str(tiny_model_dir)!r}),
                dataset=Dataset({str(tiny_jsonl)!r}, max_length=64),
                output_dir={str(tmp_path)!r},
                evals=Evals(tasks=("tiny_mood",), objective="tiny_mood/acc", tasks_dir={str(REPO / "evals/tasks")!r}),
            )
            """
        )
    )
    with pytest.raises(SystemExit) as done:
        main(["eval", str(sweep_file), "--adapters", str(safe), str(pickled)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "pickle adapter refused: 1 problem(s)" in err
    assert str(pickled / registry.PICKLE_WEIGHTS) in err and str(safe) not in err


def test_a_merged_export_writes_safetensors_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    safe = _adapter(tiny_model_dir, tmp_path / "safe", pickle=False)
    merged = registry.export(safe, tmp_path / "merged", merge=True)
    weights = [p.name for p in merged.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl")]
    assert weights == ["model.safetensors"]


# --- trust_remote_code -----------------------------------------------------------------------------------------

REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class CanaryConfig(LlamaConfig):
    model_type = "canary_llama"
class CanaryForCausalLM(LlamaForCausalLM):
    config_class = CanaryConfig
"""


@pytest.fixture
def remote_code_model(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config.json maps to modelling code shipped in the dir; importing it writes
    `marker`. (model_type stays llama, so without trust_remote_code transformers builds its own Llama.)"""
    model = tmp_path / "remote_code_model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote_code_ran"
    (model / "canary_modeling.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "canary_modeling.CanaryConfig",
        "AutoModelForCausalLM": "canary_modeling.CanaryForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_a_checkpoints_code_runs_only_when_its_model_opts_in(
    remote_code_model: tuple[Path, Path], tmp_path: Path
) -> None:
    from lora_search import preflight

    model, marker = remote_code_model
    assert BaseModel(str(model)).trust_remote_code is False
    preflight.meta_model(BaseModel(str(model)))  # what `validate` and `run` read first
    assert not marker.exists()
    adapter = _adapter(model, tmp_path / "adapter", pickle=False)  # loads the model as the tests do: no remote code
    registry.load_adapter(str(model), adapter)
    assert not marker.exists()

    # Opted in for this model, the code runs (in a fresh process: transformers caches the imported module).
    opted_in = "from lora_search import BaseModel, preflight; "
    opted_in += f"preflight.meta_model(BaseModel({str(model)!r}, trust_remote_code=True))"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", opted_in], check=True, env=env, capture_output=True, timeout=120)
    assert marker.read_text() == "the checkpoint's own code ran"


def test_no_code_path_turns_trust_remote_code_on() -> None:
    """Every trust_remote_code= in lora_search passes the model's own setting, never a constant True."""
    passed = []
    for path in sorted((REPO / "lora_search").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            for kw in getattr(node, "keywords", []) if isinstance(node, ast.Call) else []:
                if kw.arg == "trust_remote_code":
                    passed.append((path.name, node.lineno, ast.unparse(kw.value)))
    assert len(passed) >= 10
    bad = [p for p in passed if not p[2].endswith("trust_remote_code")]
    assert bad == []
