"""Regenerate k8s-v1.30.0-strict.json: the Kubernetes definitions that cluster/*.yaml uses, from kubernetes-validate.

Run (from the repo root; needs network once, for the wheel; the package is not a dependency of lora_search):
    pip download kubernetes-validate==1.37.0 --no-deps -d /tmp/kv
    python cluster/schemas/extract_k8s.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl

It reads `kubernetes-json-schema/v1.30.0-local-strict/_definitions.json` from the wheel (every object already
closed with `additionalProperties: false`), keeps the definitions reachable through `$ref` from ROOTS below,
drops the `description` annotations (they are most of the 4 MB; the API reference has them), and writes the rest
unchanged, definitions sorted by name. A new kind in cluster/*.yaml: add its definition to ROOTS, rerun, and add it
to CORE_KINDS in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

VERSION = "v1.30.0"
PACKAGE = "kubernetes-validate 1.37.0"
MEMBER = f"kubernetes_validate/kubernetes-json-schema/{VERSION}-local-strict/_definitions.json"
OUT = Path(__file__).with_name(f"k8s-{VERSION}-strict.json")

# The kinds cluster/*.yaml holds, plus PodSpec and ObjectMeta: the RayJob schema $refs those two (KubeRay's pod
# templates and every object's metadata are checked as the API server checks them).
ROOTS = {
    "nightly-cronjob.yaml": [
        "io.k8s.api.batch.v1.CronJob",
        "io.k8s.api.core.v1.ServiceAccount",
        "io.k8s.api.rbac.v1.Role",
        "io.k8s.api.rbac.v1.RoleBinding",
        "io.k8s.api.core.v1.ConfigMap",
    ],
    "rayjob.ray.io_v1.json": ["io.k8s.api.core.v1.PodSpec", "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"],
    "mlflow.yaml": [
        "io.k8s.api.core.v1.Namespace",
        "io.k8s.api.core.v1.Secret",
        "io.k8s.api.core.v1.Service",
        "io.k8s.api.apps.v1.StatefulSet",
        "io.k8s.api.apps.v1.Deployment",
        "io.k8s.api.core.v1.PersistentVolumeClaim",
    ],
}
REF = "#/$defs/"


def _refs(schema: Any) -> set[str]:
    if isinstance(schema, list):
        return set().union(*map(_refs, schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    found = {schema["$ref"].removeprefix(REF)} if "$ref" in schema else set()
    return found.union(*map(_refs, schema.values()))


def _without_descriptions(schema: Any, in_properties: bool = False) -> Any:
    """Drop the `description` keyword, not a property that happens to be called description."""
    if isinstance(schema, list):
        return [_without_descriptions(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        k: _without_descriptions(v, in_properties=(k == "properties" and not in_properties))
        for k, v in schema.items()
        if in_properties or k != "description"
    }


def extract(definitions: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    """The definitions reachable from `roots`, descriptions dropped, sorted by name."""
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        if name not in definitions:
            raise SystemExit(f"{name} is not a definition in {MEMBER}")
        keep.add(name)
        todo.extend(_refs(definitions[name]) - keep)
    return {name: _without_descriptions(definitions[name]) for name in sorted(keep)}


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        source = json.loads(z.read(MEMBER))
    roots = [r for rs in ROOTS.values() for r in rs]
    kinds = ", ".join(r.rsplit(".", 1)[1] for r in roots)
    out = {
        "$schema": source["$schema"],
        "$comment": (
            f"Kubernetes {VERSION} API object schemas, strict (additionalProperties: false), as shipped in the PyPI "
            f"package {PACKAGE} ({MEMBER}, generated from the Kubernetes OpenAPI spec). Vendored by lora_search with "
            f"cluster/schemas/extract_k8s.py: pruned to the definitions reachable from {kinds}, descriptions "
            "removed; nothing else changed. See cluster/README.md."
        ),
        "$defs": extract(source["$defs"], roots),
    }
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(out['$defs'])} definitions")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
