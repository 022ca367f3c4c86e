"""Reading the files a user hands lora_search (task YAML, JSON baselines and records, sweep files' text) so that a
broken one is a `Problem` at `file:line:column`, never a traceback: a byte that is not UTF-8, a YAML or JSON syntax
error, a missing file.

    text, problem = read_text(path)     # problem is None when the file reads as UTF-8
    config = load_yaml(path)            # raises ConfigError naming file:line:column

JSONL data and golden sets are read line by line instead (`lora_search.data.jsonl_lines`), so that each bad line is
named and the good ones still checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_search.problems import ConfigError, Problem


def read_text(path: str | Path, fix: str = "") -> tuple[str | None, Problem | None]:
    """(the file's text, None), or (None, the Problem: missing, unreadable, or not UTF-8 at file:line:column)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, Problem(str(path), None, "file not found", fix or "check the path")
    except OSError as e:
        return None, Problem(str(path), None, f"cannot be read ({e.strerror or e})", fix or "check its permissions")
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        byte = raw[e.start : e.start + 1].hex()
        why = f"not UTF-8 (byte 0x{byte} at column {column})"
        return None, Problem(f"{path}:{line}", None, why, "save the file as UTF-8")


def load_yaml(path: str | Path) -> Any:
    """The parsed YAML file; ConfigError at file:line:column when it cannot be read or parsed."""
    import yaml

    text, problem = read_text(path)
    if problem is not None:
        raise ConfigError([problem], header=f"cannot read {path}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([Problem(where, None, f"invalid YAML ({what})", "fix the YAML")], header="bad YAML") from e


def load_json(path: str | Path, fix: str = "") -> Any:
    """The parsed JSON file; ConfigError at file:line:column when it cannot be read or parsed."""
    text, problem = read_text(path, fix)
    if problem is not None:
        raise ConfigError([problem], header=f"cannot read {path}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = Problem(f"{path}:{e.lineno}:{e.colno}", None, f"invalid JSON ({e.msg})", fix or "fix the JSON")
        raise ConfigError([problem], header=f"cannot read {path}") from e
