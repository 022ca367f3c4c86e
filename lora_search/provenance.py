"""What produced a sweep's results, and the secrets kept out of every record of it.

- `provenance`: the git commit and dirty flag, package versions, eval task versions, the sweep and its base
  (provenance.json in the sweep dir, tags on every MLflow run); `sweep_params`: the sweep's settings, flat (the parent
  run's params, the HTML report's provenance).
- `redact`: every value recorded (params, tags, failure reasons, URIs) with the values of `SECRET_ENV` variables,
  anything shaped like a Hugging Face token and a URL's password masked as `MASK`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_search.config import Sweep

PACKAGES = ("lora_search", "torch", "transformers", "peft", "trl", "ray", "lm_eval", "mlflow")
"""Whose versions `provenance` records."""
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "PGPASSWORD",
    "RAY_AUTH_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
)
"""Environment variables whose values `redact` masks wherever they would be recorded."""
_TOKEN_SHAPED = re.compile(r"\bhf_[A-Za-z0-9]{20,}|(?<=://)([^/@\s:]*):[^/@\s]+(?=@)")
"""A Hugging Face token (hf_ + 34 letters and digits) or the password of scheme://user:password@host."""
MASK = "***"


def redact(text: str) -> str:
    """`text` with every secret masked: values of the `SECRET_ENV` variables set now (8 characters or more: shorter
    ones would mask ordinary words), Hugging Face tokens, and URL passwords (`https://user:***@host`)."""
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, MASK)
    return _TOKEN_SHAPED.sub(lambda m: f"{m[1]}:{MASK}" if m[1] is not None else MASK, text)


def redacted(values: dict[str, str]) -> dict[str, str]:
    return {k: redact(v) for k, v in values.items()}


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def provenance(sweep: Sweep, base_fingerprint: str) -> dict[str, str]:
    """Tags that say exactly what produced a run (redacted)."""
    tags = {
        "mlflow.source.git.commit": _git("rev-parse", "HEAD") or "unknown",
        "lora_search.git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "lora_search.sweep": sweep.name,
        "lora_search.base": sweep.base.name_or_path,
        "lora_search.base_revision": sweep.base.revision or "",
        "lora_search.base_fingerprint": base_fingerprint,
    }
    for package in PACKAGES:
        try:
            tags[f"lora_search.version.{package}"] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            tags[f"lora_search.version.{package}"] = "not installed"
    if sweep.evals is not None:
        from lora_search.evals import task_versions

        for task, version in task_versions(sweep.evals).items():
            tags[f"lora_search.eval_task_version.{task}"] = str(version)
    return redacted(tags)


def sweep_params(sweep: Sweep) -> dict[str, str]:
    """The sweep's settings flattened to `part.field` params (MLflow params are strings), redacted: they are also
    the HTML report's provenance."""
    out = {"search": sweep.search, "num_samples": str(sweep.num_samples), "seed": str(sweep.seed)}
    for part in ("base", "dataset", "space", "budget", "resources", "evals"):
        value = getattr(sweep, part)
        if value is not None:
            out.update({f"{part}.{k}": str(v) for k, v in dataclasses.asdict(value).items()})
    return redacted(out)
