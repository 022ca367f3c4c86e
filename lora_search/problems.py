"""What is wrong with a sweep, in one form everywhere: `Problem` (field or file:line, value, what, fix), and
`ConfigError`, which carries every problem found at once.

Imported by every layer, so it imports nothing of lora_search's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a sweep: where (`field`, or `file:line` for data), what was given, how to fix it."""

    field: str
    value: Any
    message: str
    fix: str = ""

    def __str__(self) -> str:
        shown = "" if self.value is None else f" = {self.value!r}"
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.field}{shown}: {self.message}.{fix}"


class ConfigError(ValueError):
    """A sweep that cannot run. `problems` holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem], header: str = "invalid sweep") -> None:
        self.problems = list(problems)
        lines = [f"{header}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


_collected: contextvars.ContextVar[list[Problem] | None] = contextvars.ContextVar("collected", default=None)


@contextlib.contextmanager
def collecting_problems() -> Iterator[list[Problem]]:
    """Within this block a `Sweep` with problems is still built and its problems land in the yielded list.

    `lora-search validate` and `run` use it so that construction problems and pre-flight problems
    (missing modules, broken data lines) are reported together in one message.
    """
    problems: list[Problem] = []
    token = _collected.set(problems)
    try:
        yield problems
    finally:
        _collected.reset(token)


def collecting() -> bool:
    """Whether a `collecting_problems()` block is open."""
    return _collected.get() is not None


def collect_or_raise(problems: list[Problem], header: str) -> None:
    """Inside `collecting_problems()` add `problems` to its list; elsewhere raise them as one ConfigError."""
    if not problems:
        return
    collected = _collected.get()
    if collected is None:
        raise ConfigError(problems, header=header)
    collected.extend(problems)
