"""The nightly's cluster schedule (cluster/), checked offline: every manifest against the vendored schemas, the two
schedules against each other, and both shell scripts run against stand-ins for kubectl and ray.

Run: pytest tests/test_cluster.py

Schemas (cluster/schemas/, sources in cluster/README.md): Kubernetes v1.30 kinds from kubernetes-validate's strict
JSON schema (unknown fields rejected), and the KubeRay v1 RayJob CRD schema, closed here the same way: the API
server would reject a misspelled RayJob field only when the CronJob creates it at 02:00, or, without field
validation, drop it silently (a dropped `shutdownAfterJobFinishes` leaves a Ray cluster running all day).
"""

from __future__ import annotations

import ast
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
K8S = "k8s-v1.30.0-strict.json"
RAYJOB = "rayjob.ray.io_v1.json"

# (apiVersion, kind) -> its definition in the vendored Kubernetes schema. A kind missing here has no schema yet: add
# it (and re-vendor the schema with its definitions if they are not in the file; see cluster/README.md).
CORE_KINDS = {
    ("v1", "ServiceAccount"): "io.k8s.api.core.v1.ServiceAccount",
    ("v1", "ConfigMap"): "io.k8s.api.core.v1.ConfigMap",
    ("rbac.authorization.k8s.io/v1", "Role"): "io.k8s.api.rbac.v1.Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "io.k8s.api.rbac.v1.RoleBinding",
    ("batch/v1", "CronJob"): "io.k8s.api.batch.v1.CronJob",
}
RAYJOB_KIND = ("ray.io/v1", "RayJob")


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
    return validators


def problems(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one Kubernetes object, as 'field.path: message'."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    validator = _validators().get(key)
    if validator is None:
        known = ", ".join(f"{a} {k}" for a, k in _validators())
        return [f"no schema for {key}; known: {known}. Add it to CORE_KINDS in tests/test_cluster.py"]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# --- the files --------------------------------------------------------------------------------------------------


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:  # a leading comment block parses as an empty document
                docs.append((f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
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
    assert "Add it to CORE_KINDS" in problems({"apiVersion": "v1", "kind": "Secret"})[0]


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
    monkeypatch.setattr(cli, "_nightly", lambda sweep, _, source, promote: calls.append((sweep, source, promote)))
    with pytest.raises(SystemExit):
        cli.main(argv[1:])
    assert calls == [("sweeps/nightly.py", "mlflow", True)]


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
