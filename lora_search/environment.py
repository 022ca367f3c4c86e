"""The LORA_SEARCH_* switches a sweep's processes read from their environment, each with its reader: one table, so
that the module that reads a switch and `lora_search.preflight` (which checks the driver's environment before any
compute, every bad value at once) agree on what a value means.

Ray's workers on a local cluster inherit the driver's environment, so a value checked here is the value a trial
reads; on a multi-node cluster set them on every node (`ray start` inherits the shell's environment)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_search.problems import Problem

LORA_ONE_NODE = "LORA_SEARCH_LORA_ONE_NODE"
LORA_GROUPS = "LORA_SEARCH_LORA_GROUPS"
PROFILE_TRACE = "LORA_SEARCH_PROFILE_TRACE"
PACK_IDLE_S = "LORA_SEARCH_PACK_IDLE_S"
PACK_GRAPHS = "LORA_SEARCH_PACK_GRAPHS"
LOADER_WORKERS = "LORA_SEARCH_LOADER_WORKERS"


def switch(name: str, on: str, off: str) -> Callable[[str], bool]:
    """A 0/1 switch's reader: True for 1, False for 0, else a ValueError naming the variable, its value and the fix."""

    def read(value: str) -> bool:
        if value not in ("0", "1"):
            raise ValueError(f"{name}={value!r}: give 1 ({on}) or 0 ({off})")
        return value == "1"

    return read


def seconds(name: str, example: str) -> Callable[[str], float]:
    """A duration's reader: seconds >= 0, else a ValueError naming the variable, its value and the fix."""

    def read(value: str) -> float:
        try:
            s = float(value)
        except ValueError:
            s = math.nan
        if not 0 <= s < math.inf:
            raise ValueError(f"{name}={value!r}: give seconds >= 0, e.g. {name}={example}")
        return s

    return read


def loader_workers(value: str) -> int | None:
    """`LOADER_WORKERS`'s reader: "auto" (None: the trial decides, 1 on a GPU and 0 on a CPU) or a count >= 0."""
    if value == "auto":
        return None
    if not value.isdigit():
        raise ValueError(
            f"{LOADER_WORKERS}={value!r}: give auto (one loader process on a GPU, none on a CPU, the default) or a "
            f"count of processes, e.g. {LOADER_WORKERS}=1"
        )
    return int(value)


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    read: Callable[[str], Any]
    reader: str  # the module that reads it, for the docs and the error


VARIABLES = {
    v.name: v
    for v in (
        Variable(
            LORA_ONE_NODE,
            "1",
            switch(LORA_ONE_NODE, "one autograd node, the default", "autograd's graph"),
            "lora_search.fused_lora",
        ),
        Variable(
            LORA_GROUPS,
            "1",
            switch(LORA_GROUPS, "q/k/v and gate/up adapters as one node each, the default", "each layer alone"),
            "lora_search.fused_lora",
        ),
        Variable(
            PROFILE_TRACE,
            "0",
            switch(PROFILE_TRACE, "keep the profiled steps' Chrome trace", "do not, the default"),
            "lora_search.callbacks",
        ),
        Variable(PACK_IDLE_S, "15", seconds(PACK_IDLE_S, "15"), "lora_search.pack_host"),
        Variable(
            PACK_GRAPHS,
            "1",
            switch(PACK_GRAPHS, "a GPU pack's steps captured as CUDA graphs, the default", "every step as it comes"),
            "lora_search.pack_host",
        ),
        Variable(LOADER_WORKERS, "auto", loader_workers, "lora_search.train"),
    )
}


def value(name: str) -> Any:
    """The variable `name` read from this process's environment (its default where unset)."""
    variable = VARIABLES[name]
    return variable.read(os.environ.get(name, variable.default))


def problems(environ: dict[str, str] | None = None) -> list[Problem]:
    """Every set variable whose value its reader refuses, with the reader's fix."""
    environ = os.environ if environ is None else environ
    out = []
    for variable in VARIABLES.values():
        if variable.name not in environ:
            continue
        try:
            variable.read(environ[variable.name])
        except ValueError as e:
            out.append(
                Problem(
                    f"environment {variable.name}", environ[variable.name], f"{variable.reader} cannot read it", str(e)
                )
            )
    return out
