"""Everything in cluster/, checked offline: every manifest against the vendored schemas, the Ray cluster launcher
config through Ray's own checks, the addresses and paths the files share against each other, the nightly's two
schedules against each other, and both of its shell scripts run against stand-ins for kubectl and ray.

Run: pytest tests/test_cluster.py

Schemas (cluster/schemas/, sources in cluster/README.md): Kubernetes v1.30 kinds from kubernetes-validate's strict
JSON schema (unknown fields rejected), and the KubeRay v1 RayJob CRD schema, closed here the same way: the API
server would reject a misspelled RayJob field only when the CronJob creates it at 02:00, or, without field
validation, drop it silently (a dropped `shutdownAfterJobFinishes` leaves a Ray cluster running all day). A
RayCluster's spec is checked with the RayJob's rayClusterSpec (one Go type in KubeRay). The launcher config
(`ray up`) goes through Ray's own schema and config checks, and its AWS node_configs through botocore's model of
EC2 RunInstances, closed the same way.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from croniter import croniter
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCHEMAS = CLUSTER / "schemas"
MANIFEST = CLUSTER / "nightly-cronjob.yaml"
CRONTAB = CLUSTER / "nightly.cron"
LAUNCHER_CONFIG = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "raycluster.yaml"
RAYJOB_70B = CLUSTER / "rayjob-llama70b.yaml"
MLFLOW = CLUSTER / "mlflow.yaml"
STORAGE = CLUSTER / "storage.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
K8S = "k8s-v1.30.0-strict.json"
RAYJOB = "rayjob.ray.io_v1.json"
EC2 = "aws-ec2-run-instances.json"

# (apiVersion, kind) -> its definition in the vendored Kubernetes schema. A kind missing here has no schema yet: add
# it (and re-vendor the schema with its definitions if they are not in the file; see cluster/README.md).
CORE_KINDS = {
    ("v1", "ServiceAccount"): "io.k8s.api.core.v1.ServiceAccount",
    ("v1", "ConfigMap"): "io.k8s.api.core.v1.ConfigMap",
    ("rbac.authorization.k8s.io/v1", "Role"): "io.k8s.api.rbac.v1.Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "io.k8s.api.rbac.v1.RoleBinding",
    ("batch/v1", "CronJob"): "io.k8s.api.batch.v1.CronJob",
    ("v1", "Namespace"): "io.k8s.api.core.v1.Namespace",
    ("v1", "Secret"): "io.k8s.api.core.v1.Secret",
    ("v1", "Service"): "io.k8s.api.core.v1.Service",
    ("v1", "PersistentVolumeClaim"): "io.k8s.api.core.v1.PersistentVolumeClaim",
    ("apps/v1", "StatefulSet"): "io.k8s.api.apps.v1.StatefulSet",
    ("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment",
}
RAYJOB_KIND = ("ray.io/v1", "RayJob")
RAYCLUSTER_KIND = ("ray.io/v1", "RayCluster")
# A Ray cluster launcher config (`ray up`) has no apiVersion nor kind; it is told apart by its cluster_name.
LAUNCHER = ("ray up", "cluster config")


# --- validation -------------------------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The CRD schema with every object that lists its `properties` closed to other keys (what `kubectl apply
    --validate=strict` enforces), except where the schema preserves unknown fields. Free-form maps are untouched:
    they declare `additionalProperties` themselves."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return schema
    out = {k: ({n: _closed(s) for n, s in v.items()} if k == "properties" else _closed(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def _validators() -> dict[tuple[str, str], Draft202012Validator]:
    k8s = json.loads((SCHEMAS / K8S).read_text())
    registry: Registry = Registry().with_resource(K8S, Resource.from_contents(k8s))
    validators = {
        key: Draft202012Validator({"$ref": f"{K8S}#/$defs/{name}"}, registry=registry)
        for key, name in CORE_KINDS.items()
    }
    rayjob = _closed(json.loads((SCHEMAS / RAYJOB).read_text()))
    # The CRD leaves `metadata` open because the API server checks it as ObjectMeta for every kind: so do we.
    rayjob["properties"]["metadata"] = {"$ref": f"{K8S}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    validators[RAYJOB_KIND] = Draft202012Validator(rayjob, registry=registry)
    # KubeRay generates the RayCluster CRD's spec and the RayJob's rayClusterSpec from one Go type, RayClusterSpec.
    raycluster = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": RAYCLUSTER_KIND[0]},
            "kind": {"const": RAYCLUSTER_KIND[1]},
            "metadata": rayjob["properties"]["metadata"],
            "spec": rayjob["properties"]["spec"]["properties"]["rayClusterSpec"],
        },
        "additionalProperties": False,
    }
    validators[RAYCLUSTER_KIND] = Draft202012Validator(raycluster, registry=registry)
    return validators


@functools.cache
def _launcher_validators() -> tuple[Any, Draft202012Validator]:
    """Ray's launcher schema as installed with Ray (what `ray up` checks first), and EC2 RunInstances' input."""
    import ray.autoscaler
    from jsonschema.validators import validator_for

    ray_schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    ec2 = Draft202012Validator(json.loads((SCHEMAS / EC2).read_text()))
    return validator_for(ray_schema)(ray_schema), ec2


def _messages(errors: Any, prefix: str = "") -> list[str]:
    errors = sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    return [
        f"{'.'.join([*filter(None, [prefix]), *map(str, e.absolute_path)]) or '<root>'}: {e.message}" for e in errors
    ]


def _launcher_problems(config: dict[str, Any]) -> list[str]:
    """A `ray up` config the way Ray checks it before launching anything: its schema (closed at the top and in
    docker, auth and every node type), then Ray's defaults merged and the whole checked again with the node types
    against each other (prepare_config, validate_config). Then each AWS node_config as Ray hands it to boto3's
    create_instances: Ray adds MinCount and MaxCount and turns SubnetIds into SubnetId."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    ray_schema, ec2 = _launcher_validators()
    if out := _messages(ray_schema.iter_errors(config)):
        return out
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # whatever Ray raises is what `ray up` would stop with
        return [f"<root>: `ray up` refuses it: {type(e).__name__}: {e}"]
    if config["provider"]["type"] == "aws":
        for name, node_type in config["available_node_types"].items():
            call = {**copy.deepcopy(node_type["node_config"]), "MinCount": 1, "MaxCount": 1}
            if subnets := call.pop("SubnetIds", None):
                call["SubnetId"] = subnets[0]
            out += _messages(ec2.iter_errors(call), f"available_node_types.{name}.node_config")
    return out


def _kind(doc: dict[str, Any]) -> tuple[Any, Any]:
    if "apiVersion" not in doc and "kind" not in doc and "cluster_name" in doc:
        return LAUNCHER
    return doc.get("apiVersion"), doc.get("kind")


def problems(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one Kubernetes object or Ray launcher config, as 'field.path: message'."""
    key = _kind(doc)
    if key == LAUNCHER:
        return _launcher_problems(doc)
    validator = _validators().get(key)
    if validator is None:
        known = ", ".join(f"{a} {k}" for a, k in [*_validators(), LAUNCHER])
        return [f"no schema for {key}; known: {known}. Add it to CORE_KINDS in tests/test_cluster.py"]
    return _messages(validator.iter_errors(doc))


# --- the files --------------------------------------------------------------------------------------------------


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:  # a leading comment block parses as an empty document
                name = doc.get("metadata", {}).get("name") or doc.get("cluster_name")
                docs.append((f"{path.name}:{doc.get('kind', 'ray up')}/{name}", doc))
    return docs


def _manifest() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind is expected in nightly-cronjob.yaml"
    return by_kind


def _template_key() -> str:
    (key,) = _manifest()["ConfigMap"]["data"]
    return key


def _rayjob() -> dict[str, Any]:
    return yaml.safe_load(_manifest()["ConfigMap"]["data"][_template_key()])


def _waiter() -> dict[str, Any]:
    (container,) = _manifest()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def _crontab() -> tuple[dict[str, str], list[str], str]:
    """(environment lines, the 5 schedule fields, the command) of the one entry in nightly.cron."""
    env, entries = {}, []
    for line in CRONTAB.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line):
            env[m[1]] = m[2]
        else:
            entries.append(line)
    assert len(entries) == 1, f"nightly.cron should hold exactly one entry, found {entries}"
    *schedule, command = entries[0].split(None, 5)
    return env, schedule, command


def _ray_job_submit(command: str) -> list[str]:
    """The argv of the `ray job submit` in a cron command line, up to the first shell operator."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    start = tokens.index("ray")
    end = next(i for i, t in enumerate(tokens[start:], start) if set(t) <= set("();<>|&"))
    return tokens[start:end]


# --- every document is valid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [d for _, d in _documents()], ids=[i for i, _ in _documents()])
def test_every_cluster_manifest_matches_its_schema(doc: dict[str, Any]) -> None:
    assert problems(doc) == []


def test_the_rayjob_template_matches_the_kuberay_crd() -> None:
    assert problems(_rayjob()) == []


def test_the_vendored_schemas_name_their_source() -> None:
    for name in (K8S, RAYJOB):
        assert "cluster/README.md" in json.loads((SCHEMAS / name).read_text())["$comment"]


# --- the validators reject what the API server would --------------------------------------------------------------


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    doc[last] = value


def _rename(doc: dict[str, Any], path: str, new: str) -> None:
    *parents, last = path.split(".")
    for p in parents:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    doc[new] = doc.pop(last)


HEAD_POD = "spec.rayClusterSpec.headGroupSpec.template.spec"
CRON_POD = "spec.jobTemplate.spec.template.spec"


@pytest.mark.parametrize(
    "kind, path, new_name",
    [
        ("CronJob", "spec.schedule", "schedul"),
        ("CronJob", "spec.concurrencyPolicy", "concurrency"),
        ("CronJob", f"{CRON_POD}.containers.0.volumeMounts", "volumeMount"),
        ("Role", "rules.0.verbs", "verb"),
        ("RayJob", "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        ("RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", "maxReplica"),
        ("RayJob", f"{HEAD_POD}.containers.0.resources", "resource"),  # inside the delegated core PodSpec
        ("RayJob", "spec.rayClusterSpec.headGroupSpec.template.spec", "specs"),
    ],
)
def test_a_misspelled_field_is_rejected(kind: str, path: str, new_name: str) -> None:
    doc = _rayjob() if kind == "RayJob" else _manifest()[kind]
    _rename(doc, path, new_name)
    assert any(repr(new_name) in p for p in problems(doc)), problems(doc)


@pytest.mark.parametrize(
    "kind, path, value, expected",
    [
        ("CronJob", "spec.startingDeadlineSeconds", "an hour", "is not of type"),
        ("CronJob", "spec.suspend", "no", "is not of type"),
        ("Role", "rules.0.verbs", "create", "is not of type"),
        ("CronJob", f"{CRON_POD}.containers.0.env.0.value", 7, "is not of type"),
        ("RayJob", "spec.backoffLimit", "none", "is not of type"),
        ("RayJob", "spec.shutdownAfterJobFinishes", "yes", "is not of type"),
        ("RayJob", "spec.rayClusterSpec.autoscalerOptions", {"upscalingMode": "Sometimes"}, "is not one of"),
        ("RayJob", f"{HEAD_POD}.containers.0.resources.limits.cpu", [2], "is not valid under any of the given"),
    ],
)
def test_a_wrong_type_or_enum_value_is_rejected(kind: str, path: str, value: Any, expected: str) -> None:
    doc = _rayjob() if kind == "RayJob" else _manifest()[kind]
    _set(doc, path, value)
    assert any(expected in p for p in problems(doc)), problems(doc)


def test_a_missing_required_field_and_an_unknown_kind_are_rejected() -> None:
    rayjob = _rayjob()
    del rayjob["spec"]["entrypoint"]
    assert any("'entrypoint' is a required property" in p for p in problems(rayjob))
    assert "Add it to CORE_KINDS" in problems({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"})[0]


# --- the RayJob runs the nightly --------------------------------------------------------------------------------


def test_the_rayjob_runs_the_nightly_command_of_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entrypoint goes through lora-search's real argument parser to `nightly` with these arguments."""
    from lora_search import cli

    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:3] == ["lora-search", "nightly", "sweeps/nightly.py"]
    (script,) = entry_points(group="console_scripts", name="lora-search")
    assert script.value == "lora_search.cli:main"
    calls = []
    monkeypatch.setattr(cli, "load_sweep", lambda path: (path, []))  # the path stands in for the Sweep
    monkeypatch.setattr(
        cli, "_nightly", lambda sweep, _, source, promote, tolerance: calls.append((sweep, source, promote, tolerance))
    )
    with pytest.raises(SystemExit):
        cli.main(argv[1:])
    assert calls == [("sweeps/nightly.py", "mlflow", True, "0.3")]  # the default timing tolerance


def test_the_nightly_sweep_file_defines_the_sweep_the_cluster_is_sized_for() -> None:
    """Read without running it (that would build the base model): SWEEP = Sweep(name="nightly", ...), and the
    worker group holds all its trials at once, so their cost is measured alike every night."""
    from lora_search.config import Resources

    tree = ast.parse((REPO / "sweeps" / "nightly.py").read_text())
    (sweep,) = [
        n.value for n in tree.body if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["SWEEP"]
    ]
    assert isinstance(sweep, ast.Call) and ast.unparse(sweep.func) == "Sweep"
    kwargs = {k.arg: k.value for k in sweep.keywords}
    assert ast.literal_eval(kwargs["name"]) == "nightly"
    resources_call = kwargs["resources"]
    assert isinstance(resources_call, ast.Call)
    resources = Resources(**{k.arg: ast.literal_eval(k.value) for k in resources_call.keywords})
    trials_cpus = ast.literal_eval(kwargs["num_samples"]) * resources.workers * resources.cpus_per_worker
    groups = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pods = [(g["replicas"], c) for g in groups for c in g["template"]["spec"]["containers"]]
    cluster_cpus = sum(replicas * float(c["resources"]["limits"]["cpu"]) for replicas, c in pods)
    assert cluster_cpus >= trials_cpus


def test_the_rayjob_cleans_up_and_writes_to_the_shared_volume() -> None:
    spec = _rayjob()["spec"]
    assert _rayjob()["metadata"]["generateName"].endswith("-")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0
    waiter_deadline = _manifest()["CronJob"]["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert spec["activeDeadlineSeconds"] < waiter_deadline  # KubeRay's verdict comes first, the pod reports it
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert env["LORA_SEARCH_OUTPUT_DIR"] == "/shared/reports"
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert len(groups) == 2
    for group in groups:  # every Ray pod sees the same /shared: the driver writes reports, the trials adapters
        pod = group["template"]["spec"]
        claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim")}
        for container in pod["containers"]:
            assert "limits" in container["resources"] and "requests" in container["resources"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/shared") in claims
            for value in (env["LORA_SEARCH_OUTPUT_DIR"], env["LORA_SEARCH_CACHE"]):
                assert value.startswith("/shared/")


# --- the CronJob drives it --------------------------------------------------------------------------------------


def test_the_cronjob_pod_is_wired_to_its_account_role_and_template() -> None:
    m = _manifest()
    namespaces = {d["metadata"]["namespace"] for d in m.values()} | {_rayjob()["metadata"]["namespace"]}
    assert len(namespaces) == 1
    cron = m["CronJob"]["spec"]
    job = cron["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == m["ServiceAccount"]["metadata"]["name"]
    binding = m["RoleBinding"]
    role = m["Role"]["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}
    account = {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": namespaces.pop()}
    assert account in binding["subjects"]
    rules = [r for r in m["Role"]["rules"] if r["apiGroups"] == ["ray.io"] and "rayjobs" in r["resources"]]
    verbs = {v for r in rules for v in r["verbs"]}
    assert {"create", "get", "list", "watch", "delete"} <= verbs
    waiter = _waiter()
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", waiter["image"]), "pin the kubectl image to a version tag"
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    (mount,) = [mt for mt in waiter["volumeMounts"] if mt["name"] == volume["name"]]
    env = {e["name"]: e["value"] for e in waiter["env"]}
    assert env["RAYJOB_TEMPLATE"] == f"{mount['mountPath']}/{_template_key()}"


FAKE_KUBECTL = """#!{python}
# kubectl's stand-in: records each call and answers as the API server would for a RayJob KubeRay is running.
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["get", "rayjobs"]:  # the pruning listing, oldest first
    print("\\n".join(f"rayjob.ray.io/lora-search-nightly-old{{i}}" for i in range(9)))
elif args[0] == "create":
    print("lora-search-nightly-x7k2p", end="")
elif args[:2] == ["get", "rayjob"] and "jobDeploymentStatus" in args[-1]:
    polls = sum("jobDeploymentStatus" in line for line in open(os.environ["FAKE_CALLS"]))
    print("Running" if polls < 3 else os.environ["FAKE_DEPLOYMENT"], end="")
elif args[:2] == ["get", "rayjob"]:
    print(os.environ["FAKE_JOB"], end="")
elif args[0] == "logs":
    print("nightly REGRESSED" if os.environ["FAKE_JOB"] == "FAILED" else "nightly PASSED")
"""


@pytest.mark.parametrize(
    "deployment, job, exit_code",
    [("Complete", "SUCCEEDED", 0), ("Complete", "FAILED", 1), ("Complete", "STOPPED", 1), ("Failed", "", 1)],
)
def test_the_cronjob_script_waits_and_fails_with_the_rayjob(
    tmp_path: Path, deployment: str, job: str, exit_code: int
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    waiter = _waiter()
    env = {e["name"]: e["value"] for e in waiter["env"]}
    env.update(POLL_SECONDS="0", FAKE_CALLS=str(calls), FAKE_DEPLOYMENT=deployment, FAKE_JOB=job)
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"  # the fake first; bash, head, xargs after it
    (script,) = waiter["args"]
    result = subprocess.run([*waiter["command"], script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == exit_code, result.stdout + result.stderr
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert ["create", "-f", env["RAYJOB_TEMPLATE"], "-o", "jsonpath={.metadata.name}"] in made
    deleted = [c for c in made if c[0] == "delete"]
    assert deleted == [["delete", "rayjob.ray.io/lora-search-nightly-old0", "rayjob.ray.io/lora-search-nightly-old1"]]
    assert sum("jobDeploymentStatus" in c[-1] for c in made) == 3  # polled until KubeRay was done, then stopped
    assert "rayjob/lora-search-nightly-x7k2p" in result.stdout


# --- the crontab says the same thing -------------------------------------------------------------------------------


def test_both_schedules_are_the_same_valid_five_field_cron_expression() -> None:
    _, fields, _ = _crontab()
    schedule = _manifest()["CronJob"]["spec"]["schedule"]
    assert len(schedule.split()) == 5 and croniter.is_valid(schedule)
    assert " ".join(fields) == schedule


def test_the_crontab_submits_the_same_entrypoint_and_environment() -> None:
    env, _, command = _crontab()
    assert env["RAY_ADDRESS"].startswith("http") and env["SHELL"] == "/bin/bash"
    assert shlex.split(command)[:2] == ["cd", "$LORA_SEARCH_REPO"]  # --working-dir . is the checkout
    argv = _ray_job_submit(command)
    dashdash = argv.index("--")
    assert argv[:3] == ["ray", "job", "submit"]
    options = dict(zip(argv[3:dashdash:2], argv[4:dashdash:2], strict=True))
    assert options.keys() == {"--working-dir", "--runtime-env-json"} and options["--working-dir"] == "."
    assert argv[dashdash + 1 :] == shlex.split(_rayjob()["spec"]["entrypoint"])
    cron_env = json.loads(options["--runtime-env-json"])["env_vars"]
    rayjob_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]
    assert cron_env.keys() == rayjob_env.keys()
    assert cron_env["LORA_SEARCH_OUTPUT_DIR"] == rayjob_env["LORA_SEARCH_OUTPUT_DIR"]


@pytest.mark.parametrize("ray_exit", [0, 1])
def test_the_crontab_line_logs_and_exits_with_the_jobs_status(tmp_path: Path, ray_exit: int) -> None:
    env, _, command = _crontab()
    bin_dir, repo, log = tmp_path / "bin", tmp_path / "repo", tmp_path / "nightly.log"
    bin_dir.mkdir()
    repo.mkdir()
    ray = bin_dir / "ray"
    ray.write_text('#!/bin/bash\necho "ray $* in $PWD"\nexit "$FAKE_RAY_EXIT"\n')
    ray.chmod(0o755)
    env.update(LORA_SEARCH_REPO=str(repo), LORA_SEARCH_LOG=str(log), FAKE_RAY_EXIT=str(ray_exit))
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    result = subprocess.run([env["SHELL"], "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == ray_exit, result.stdout + result.stderr
    text = log.read_text()
    assert f"sweeps/nightly.py --baseline mlflow --promote in {repo}" in text
    assert f"nightly exit {ray_exit}" in text


# --- the GPU cluster: `ray up`, KubeRay, the shared volume, MLflow ---------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, what: str) -> dict[str, Any]:
    """The one document of kind `what` ("Kind" or "Kind/name") in a cluster file; the launcher config for "ray up"."""
    kind, _, name = what.partition("/")
    (doc,) = [
        d
        for d in _docs(path)
        if (d.get("kind") == kind or (kind == "ray up" and _kind(d) == LAUNCHER))
        and name in ("", d.get("metadata", {}).get("name"))
    ]
    return doc


def _cluster_specs() -> dict[str, dict[str, Any]]:
    """Every KubeRay RayClusterSpec in cluster/: the standalone cluster, the 70B RayJob's, the nightly RayJob's."""
    return {
        "raycluster.yaml": _one(RAYCLUSTER, "RayCluster")["spec"],
        "rayjob-llama70b.yaml": _one(RAYJOB_70B, "RayJob")["spec"]["rayClusterSpec"],
        "nightly-cronjob.yaml": _rayjob()["spec"]["rayClusterSpec"],
    }


def _groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _docker_options(config: dict[str, Any], *flags: str) -> list[str]:
    """The values of `flags` (e.g. --env, -e) in the launcher's docker run_options."""
    tokens = [t for option in config["docker"]["run_options"] for t in shlex.split(option)]
    return [value for flag, value in zip(tokens, tokens[1:], strict=False) if flag in flags]


def _launcher_env() -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in _docker_options(_one(LAUNCHER_CONFIG, "ray up"), "--env", "-e"))


def _tracking_uris() -> dict[str, str]:
    """Where each cluster file points MLflow: pod env, runtime env, or the launcher's docker env."""
    uris = {}
    for name, spec in _cluster_specs().items():
        for group in _groups(spec):
            for container in group["template"]["spec"]["containers"]:
                if uri := _env(container).get("MLFLOW_TRACKING_URI"):
                    uris[f"{name}:{container['name']}"] = uri
    for name, rayjob in [("rayjob-llama70b.yaml", _one(RAYJOB_70B, "RayJob")), ("nightly-cronjob.yaml", _rayjob())]:
        env = yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML", "{}")).get("env_vars", {})
        if "MLFLOW_TRACKING_URI" in env:
            uris[f"{name}:runtimeEnvYAML"] = env["MLFLOW_TRACKING_URI"]
    uris["ray-cluster.yaml"] = _launcher_env()["MLFLOW_TRACKING_URI"]
    return uris


def _mlflow_server_options() -> dict[str, Any]:
    """The Deployment's `mlflow server` arguments through mlflow's own option parser (an unknown option raises)."""
    from mlflow.cli import server

    (container,) = _one(MLFLOW, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    return server.make_context("mlflow server", list(container["args"])).params


WORKER_POD = "spec.rayClusterSpec.workerGroupSpecs.0.template.spec"
H100_NODE = "available_node_types.h100.node_config"


def test_every_yaml_file_in_cluster_is_checked() -> None:
    """A file that parsed to no document would be no parametrized case above, and pass unseen."""
    checked = {case.split(":")[0] for case, _ in _documents()}
    assert checked == {p.name for p in CLUSTER.glob("*.yaml")}
    assert {"ray-cluster.yaml", "raycluster.yaml", "rayjob-llama70b.yaml", "mlflow.yaml", "storage.yaml"} <= checked


@pytest.mark.parametrize(
    "file, what, field, new_name",
    [
        ("ray-cluster.yaml", "ray up", "max_workers", "max_worker"),
        ("ray-cluster.yaml", "ray up", "docker.run_options", "run_option"),
        ("ray-cluster.yaml", "ray up", "auth.ssh_user", "ssh_usr"),
        ("ray-cluster.yaml", "ray up", "available_node_types.h100.min_workers", "min_worker"),
        ("ray-cluster.yaml", "ray up", f"{H100_NODE}.InstanceType", "InstanceTyp"),  # EC2's
        ("ray-cluster.yaml", "ray up", "available_node_types.head.node_config.BlockDeviceMappings.0.Ebs", "EBS"),
        ("raycluster.yaml", "RayCluster", "spec.rayVersion", "rayversion"),
        ("raycluster.yaml", "RayCluster", "metadata.namespace", "namepsace"),
        ("raycluster.yaml", "RayCluster", "spec.workerGroupSpecs.0.maxReplicas", "maxReplica"),
        ("raycluster.yaml", "RayCluster", "spec.workerGroupSpecs.0.template.spec.tolerations", "toleration"),
        ("raycluster.yaml", "RayCluster", "spec.headGroupSpec.template.spec.containers.0.volumeMounts", "volumeMount"),
        ("rayjob-llama70b.yaml", "RayJob", "spec.entrypoint", "entryPoint"),
        ("rayjob-llama70b.yaml", "RayJob", "spec.ttlSecondsAfterFinished", "ttlSecondAfterFinished"),
        ("rayjob-llama70b.yaml", "RayJob", f"{WORKER_POD}.nodeSelector", "nodeSelecter"),
        ("mlflow.yaml", "Namespace", "metadata.labels", "label"),
        ("mlflow.yaml", "Secret", "stringData", "stringdata"),
        ("mlflow.yaml", "ServiceAccount", "metadata.annotations", "annotation"),
        ("mlflow.yaml", "Service/postgres", "spec.clusterIP", "clusterIp"),
        ("mlflow.yaml", "Service/mlflow-vpc", "spec.loadBalancerSourceRanges", "loadBalancerSourceRange"),
        ("mlflow.yaml", "StatefulSet", "spec.volumeClaimTemplates", "volumeClaimTemplate"),
        ("mlflow.yaml", "StatefulSet", "spec.template.spec.containers.0.readinessProbe.exec", "exe"),
        ("mlflow.yaml", "Deployment", "spec.template.spec.initContainers", "initContainer"),
        ("mlflow.yaml", "Deployment", "spec.template.spec.containers.0.livenessProbe", "livenesProbe"),
        ("storage.yaml", "PersistentVolumeClaim", "spec.accessModes", "accessMode"),
        ("storage.yaml", "Namespace", "metadata.name", "nam"),
    ],
)
def test_a_misspelled_field_in_the_gpu_cluster_files_is_rejected(
    file: str, what: str, field: str, new_name: str
) -> None:
    doc = _one(CLUSTER / file, what)
    assert problems(doc) == []
    _rename(doc, field, new_name)
    assert any(repr(new_name) in p for p in problems(doc)), problems(doc)


@pytest.mark.parametrize(
    "file, what, field, value, expected",
    [
        ("ray-cluster.yaml", "ray up", "available_node_types.h100.resources.GPU", "8", "is not of type"),
        ("ray-cluster.yaml", "ray up", "max_workers", -1, "less than the minimum"),
        ("ray-cluster.yaml", "ray up", "head_node_type", "gpu", "must be one of `available_node_types`"),
        ("ray-cluster.yaml", "ray up", f"{H100_NODE}.InstanceType", "p5.48xl", "is not one of"),
        ("raycluster.yaml", "RayCluster", "spec.workerGroupSpecs.0.replicas", "2", "is not of type"),
        ("raycluster.yaml", "RayCluster", "spec.enableInTreeAutoscaling", "yes", "is not of type"),
        ("rayjob-llama70b.yaml", "RayJob", "spec.backoffLimit", "never", "is not of type"),
        ("mlflow.yaml", "Service/mlflow", "spec.ports.0.port", "5000", "is not of type"),
        ("mlflow.yaml", "Deployment", "spec.replicas", "one", "is not of type"),
        ("mlflow.yaml", "Secret", "stringData.password", 1234, "is not of type"),
        ("storage.yaml", "PersistentVolumeClaim", "spec.resources.requests.storage", [2], "is not valid under any"),
    ],
)
def test_a_wrong_value_in_the_gpu_cluster_files_is_rejected(
    file: str, what: str, field: str, value: Any, expected: str
) -> None:
    doc = _one(CLUSTER / file, what)
    _set(doc, field, value)
    assert any(expected in p for p in problems(doc)), problems(doc)


def test_the_rayjob_runs_the_70b_sweep_on_the_standalone_clusters_spec() -> None:
    rayjob = _one(RAYJOB_70B, "RayJob")
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv == ["python", "sweeps/llama70b.py"]
    # Hard on purpose: the RayJob is shipped for that sweep, so a missing sweep file is a broken RayJob.
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist: the RayJob in {RAYJOB_70B.name} runs it"
    # One cluster definition, two ways to run it: they must not drift apart.
    assert spec["rayClusterSpec"] == _one(RAYCLUSTER, "RayCluster")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["submissionMode"] == "K8sJobMode"


def test_one_70b_trial_fits_on_one_gpu_worker_of_either_cluster() -> None:
    """Read without importing it (no torch, no hub): SWEEP = Sweep(..., resources=Resources(...)). With PACK a
    trial's workers share one node, so one worker node must hold a whole trial's GPUs and CPUs, or no trial starts."""
    from lora_search.config import Resources

    tree = ast.parse((REPO / "sweeps" / "llama70b.py").read_text())
    (sweep,) = [
        n.value for n in tree.body if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["SWEEP"]
    ]
    assert isinstance(sweep, ast.Call)
    (call,) = [k.value for k in sweep.keywords if k.arg == "resources"]
    assert isinstance(call, ast.Call) and ast.unparse(call.func) == "Resources"
    r = Resources(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})
    assert r.placement == "PACK"
    gpus, cpus = r.workers * r.gpus_per_worker, r.workers * r.cpus_per_worker
    (group,) = _one(RAYCLUSTER, "RayCluster")["spec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    assert float(limits["nvidia.com/gpu"]) >= gpus and float(limits["cpu"]) >= cpus, (limits, r)
    config = _one(LAUNCHER_CONFIG, "ray up")
    (gpu_type,) = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_type["resources"]["GPU"] >= gpus and gpu_type["resources"]["CPU"] >= cpus, (gpu_type, r)


def test_the_gpu_workers_are_whole_8_gpu_nodes_and_the_head_runs_no_trial() -> None:
    spec = _one(RAYCLUSTER, "RayCluster")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"] == worker["resources"]["requests"]  # Guaranteed QoS
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = {m["name"] for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert any(v["name"] in shm and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])

    config = _one(LAUNCHER_CONFIG, "ray up")
    types = config["available_node_types"]
    head_type = types[config["head_node_type"]]
    assert head_type["resources"].get("CPU") == 0 and "GPU" not in head_type["resources"]
    (gpu_type,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_type["resources"]["GPU"] == 8
    assert gpu_type["min_workers"] == 0 < gpu_type["max_workers"] <= config["max_workers"]
    # The same machine on both paths: what KubeRay's worker pods are pinned to is what `ray up` launches.
    assert gpu_type["node_config"]["InstanceType"] == pod["nodeSelector"]["node.kubernetes.io/instance-type"]


def test_every_ray_pod_and_node_writes_to_the_one_shared_volume() -> None:
    storage = {d["kind"]: d for d in _docs(STORAGE)}
    claim = storage["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node of a cluster writes there at once
    namespace = storage["Namespace"]["metadata"]["name"]
    assert claim["metadata"]["namespace"] == namespace
    assert _one(RAYCLUSTER, "RayCluster")["metadata"]["namespace"] == namespace
    assert _one(RAYJOB_70B, "RayJob")["metadata"]["namespace"] == namespace
    assert _rayjob()["metadata"]["namespace"] == namespace

    output_dirs = {}
    for name, spec in _cluster_specs().items():
        for group in _groups(spec):
            pod = group["template"]["spec"]
            claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")}
            assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] in claims} == {
                claim["metadata"]["name"]
            }
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts.get("/shared") in claims, f"{name}: {container['name']} does not mount /shared"
                env = _env(container)
                if "LORA_SEARCH_OUTPUT_DIR" in env:
                    output_dirs[f"{name}:{container['name']}"] = env["LORA_SEARCH_OUTPUT_DIR"]
                for var in ("LORA_SEARCH_OUTPUT_DIR", "LORA_SEARCH_CACHE", "HF_HOME"):
                    assert env.get(var, "/shared/").startswith("/shared/"), f"{name}: {var}={env[var]}"
    # The nightly sets it in its runtime env (and nightly.cron the same: checked with the crontab above).
    output_dirs["nightly-cronjob.yaml"] = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])["env_vars"][
        "LORA_SEARCH_OUTPUT_DIR"
    ]

    config = _one(LAUNCHER_CONFIG, "ray up")
    env = _launcher_env()
    output_dirs["ray-cluster.yaml"] = env["LORA_SEARCH_OUTPUT_DIR"]
    assert set(output_dirs.values()) == {"/shared/reports"}, output_dirs
    # `ray up`: EFS is mounted on each host at /shared, and that is what every container sees at /shared.
    assert "/shared:/shared" in _docker_options(config, "--volume", "-v")
    assert any("mount -t nfs4" in c and c.split()[-1] == "/shared" for c in config["initialization_commands"])
    for var in ("LORA_SEARCH_OUTPUT_DIR", "LORA_SEARCH_CACHE", "HF_HOME"):
        assert env[var].startswith("/shared/")


def test_every_mlflow_uri_names_the_mlflow_service_and_the_server_answers_to_it() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    services = {d["metadata"]["name"]: d for d in _docs(MLFLOW) if d["kind"] == "Service"}
    service = services["mlflow"]
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    in_cluster = f"http://mlflow.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    uris = _tracking_uris()
    # Set on every pod of the GPU clusters (so any job submitted there tracks to it), in the nightly's runtime env.
    pods = [
        f"{name}:{container['name']}"
        for name in ("raycluster.yaml", "rayjob-llama70b.yaml")
        for group in _groups(_cluster_specs()[name])
        for container in group["template"]["spec"]["containers"]
    ]
    assert {*pods, "nightly-cronjob.yaml:runtimeEnvYAML"} <= uris.keys()
    for where, uri in uris.items():
        if where != "ray-cluster.yaml":
            assert uri == in_cluster, f"{where}: {uri}, but the Service in mlflow.yaml is {in_cluster}"
    # `ray up` nodes are outside Kubernetes: they reach the server through its load-balanced Service, same port.
    outside = urlsplit(uris["ray-cluster.yaml"])
    (lb,) = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    assert outside.scheme == "http" and outside.port == lb["spec"]["ports"][0]["port"]

    # Every Service reaches the server's port, and the server accepts every Host header the clients send
    # (MLflow's DNS-rebinding check, with MLflow's own matcher).
    options = _mlflow_server_options()
    pod = _one(MLFLOW, "Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for s in (service, lb):
        assert s["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert ports[s["spec"]["ports"][0]["targetPort"]] == options["port"]
    assert options["host"] == "0.0.0.0"
    allowed = [h.strip() for h in options["allowed_hosts"].split(",")]
    for where, uri in uris.items():
        assert is_allowed_host_header(allowed, urlsplit(uri).netloc), f"{where}: {uri} is not in --allowed-hosts"


def test_the_mlflow_server_stores_runs_in_its_postgres_and_serves_artifacts() -> None:
    docs = _docs(MLFLOW)
    options = _mlflow_server_options()
    assert options["serve_artifacts"] and options["artifacts_destination"].startswith("s3://")
    backend = urlsplit(options["backend_store_uri"])
    (db_service,) = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    statefulset = _one(MLFLOW, "StatefulSet")
    assert statefulset["spec"]["serviceName"] == db_service["metadata"]["name"] == backend.hostname
    assert [p["port"] for p in db_service["spec"]["ports"]] == [backend.port]
    (postgres,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"]), "pin PostgreSQL's major version: its on-disk format"
    assert backend.path == "/" + _env(postgres)["POSTGRES_DB"], (backend.path, "POSTGRES_DB of the StatefulSet")
    assert "pg_isready" in " ".join(postgres["readinessProbe"]["exec"]["command"])
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    data = {m["name"]: m["mountPath"] for m in postgres["volumeMounts"]}[template["metadata"]["name"]]
    assert _env(postgres)["PGDATA"].startswith(data + "/")  # a subdirectory of the volume, as initdb wants

    # User and password: Kubernetes substitutes $(VAR) from the container's env, which reads the Secret, the same
    # keys as PostgreSQL's own.
    (mlflow_container,) = _one(MLFLOW, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert (backend.username, backend.password) == ("$(POSTGRES_USER)", "$(POSTGRES_PASSWORD)")
    secret = _one(MLFLOW, "Secret")
    for container in (postgres, mlflow_container):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        for var in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
            assert refs[var]["name"] == secret["metadata"]["name"] and refs[var]["key"] in secret["stringData"]
    assert re.fullmatch(r"ghcr\.io/mlflow/mlflow:v\d+\.\d+\.\d+-full", mlflow_container["image"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow_container[probe]["httpGet"]["path"] == "/health"
    assert (
        _one(MLFLOW, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == _one(MLFLOW, "ServiceAccount")["metadata"]["name"]
    )
    namespace = _one(MLFLOW, "Namespace")["metadata"]["name"]
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {namespace}


def test_the_launcher_config_runs_the_checkout_with_token_auth() -> None:
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    config = _one(LAUNCHER_CONFIG, "ray up")
    assert _launcher_env()["RAY_AUTH_MODE"] == "token"
    # Every node gets the token `ray get-auth-token --generate` wrote where Ray looks for it, on both sides.
    token = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert config["file_mounts"][token] == token
    (checkout,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(f'pip install --no-cache-dir "{checkout}[' in c for c in config["setup_commands"])
    # Ray's defaults.yaml would otherwise fill these in, a nightly wheel's install among them.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in config
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(config["head_start_ray_commands"])
    assert ".venv/" in (REPO / ".gitignore").read_text().split() and config["rsync_filter"] == [".gitignore"]
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value]
    for command in commands:  # Ray runs each through bash on the node
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"


def test_every_cluster_file_runs_the_same_ray_and_the_image_holds_the_working_dir() -> None:
    versions = {name: spec["rayVersion"] for name, spec in _cluster_specs().items()}
    image = _one(LAUNCHER_CONFIG, "ray up")["docker"]["image"]
    launcher = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", image)
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$", dockerfile, re.M)
    assert launcher and base, (image, "the ARG BASE of cluster/Dockerfile")
    versions["ray-cluster.yaml"], versions["Dockerfile"] = launcher[1], base[1]
    assert len(set(versions.values())) == 1, versions
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)
    assert re.search(rf"^COPY .* \. {re.escape(workdir)}$", dockerfile, re.M)
    for rayjob in (_one(RAYJOB_70B, "RayJob"), _rayjob()):
        assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    ignored = set((CLUSTER / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", "reports"} <= ignored  # kept out of the build context


def test_the_vendored_schemas_cover_every_kind_and_name_how_to_regenerate_them() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_k8s", SCHEMAS / "extract_k8s.py")
    assert spec is not None and spec.loader is not None
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    roots = {r for rs in extract.ROOTS.values() for r in rs}
    assert set(CORE_KINDS.values()) <= roots
    k8s = json.loads((SCHEMAS / K8S).read_text())
    assert roots <= k8s["$defs"].keys() and "extract_k8s.py" in k8s["$comment"]
    ec2 = json.loads((SCHEMAS / EC2).read_text())
    assert "cluster/README.md" in ec2["$comment"] and "extract_ec2.py" in ec2["$comment"]
    assert "p5.48xlarge" in ec2["$defs"]["InstanceType"]["enum"]
