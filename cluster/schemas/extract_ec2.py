"""Regenerate aws-ec2-run-instances.json: what EC2 RunInstances accepts, the `node_config` of cluster/ray-cluster.yaml.

Ray's launcher schema leaves `node_config` open (it is the provider's), and on AWS Ray passes it to boto3's
`ec2.create_instances(**node_config)`: a misspelled key fails only when a node is launched, for a worker type long
after `ray up` returned. This translates botocore's model of that call's input into a closed JSON schema.

Run (from the repo root; needs network once, for the wheel; botocore is not a dependency of lora_search):
    pip download botocore==1.44.5 --no-deps -d /tmp/bc
    python cluster/schemas/extract_ec2.py /tmp/bc/botocore-1.44.5-py3-none-any.whl

Each botocore shape reachable from RunInstancesRequest becomes one definition, by its botocore name: a structure is
an object closed to other members, with its required ones; a list an array; a string keeps its enum (instance types
among them) and minimum length; documentation is dropped. Nothing is added or loosened here: tests/test_cluster.py
states what Ray adds to the call (MinCount, MaxCount; SubnetIds, which Ray turns into SubnetId).
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "botocore 1.44.5"
MEMBER = "botocore/data/ec2/2016-11-15/service-2.json.gz"
ROOT = "RunInstancesRequest"
OUT = Path(__file__).with_name("aws-ec2-run-instances.json")
REF = "#/$defs/"


def _schema(shape: dict[str, Any]) -> dict[str, Any]:
    kind = shape["type"]
    if kind == "structure":
        out: dict[str, Any] = {
            "type": "object",
            "properties": {name: {"$ref": REF + m["shape"]} for name, m in shape["members"].items()},
            "additionalProperties": False,
        }
        if shape.get("required"):
            out["required"] = shape["required"]
        return out
    if kind == "list":
        return {"type": "array", "items": {"$ref": REF + shape["member"]["shape"]}}
    if kind == "map":
        return {"type": "object", "additionalProperties": {"$ref": REF + shape["value"]["shape"]}}
    if kind in ("string", "blob"):
        out = {"type": "string"}
        if "enum" in shape:
            out["enum"] = shape["enum"]
        if "min" in shape:
            out["minLength"] = shape["min"]
        return out
    if kind in ("integer", "long"):
        return {"type": "integer", **({"minimum": shape["min"]} if "min" in shape else {})}
    if kind in ("float", "double"):
        return {"type": "number"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "timestamp":  # boto3 takes a datetime, an ISO 8601 string or epoch seconds
        return {"type": ["string", "number"]}
    raise SystemExit(f"unknown botocore shape type {kind!r}")


def _children(shape: dict[str, Any]) -> list[str]:
    names = [m["shape"] for m in shape.get("members", {}).values()]
    return names + [shape[k]["shape"] for k in ("member", "key", "value") if k in shape]


def extract(shapes: dict[str, Any]) -> dict[str, Any]:
    keep: set[str] = set()
    todo = [ROOT]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(_children(shapes[name]))
    return {name: _schema(shapes[name]) for name in sorted(keep)}


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        model = json.loads(gzip.decompress(z.read(MEMBER)))
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"The input of EC2 RunInstances (boto3 ec2.create_instances), from the model in the PyPI package "
            f"{PACKAGE} ({MEMBER}, API {model['metadata']['apiVersion']}), translated by "
            "cluster/schemas/extract_ec2.py: every botocore shape reachable from RunInstancesRequest, structures "
            "closed to unknown members, documentation removed. See cluster/README.md."
        ),
        "$ref": REF + ROOT,
        "$defs": extract(model["shapes"]),
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{OUT}: {len(out['$defs'])} definitions")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
