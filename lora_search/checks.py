"""Every field of every user-facing config dataclass, checked against its annotation before anything else runs.

A field's annotation is its contract: `int`, `float`, `str`, `bool`, `Literal[...]`, `tuple[X, ...]`,
`tuple[X, Y]`, `dict[K, V]`, `X | None`, a nested config dataclass, and an optional `Range` (through
`typing.Annotated`) for its documented bounds:

    max_length: Annotated[int, Range(ge=8)] = 512

`field_problems(sweep)` walks the whole config tree and returns one `Problem` per wrong field (dotted path, the
value, what was expected, an example fix), never raising on any value a sweep file can hold: a string where an int
belongs, NaN, inf, a list where a tuple belongs, a nested tuple of the wrong depth. The config classes' own
`problems()` methods then check what no annotation can say (one field against another, names against the
variant/preset/strategy tables); they run only on parts whose fields all conform, so they can compare numbers
without guarding against strings.

Pure: no torch, no Ray. Hand-written rather than pydantic because the config classes are plain frozen dataclasses
that travel to Ray workers, and the messages are lora_search's Problem form (field, value, fix).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from lora_search.problems import Problem


@dataclass(frozen=True)
class Range:
    """Documented bounds of a number: `ge`/`gt` below, `le`/`lt` above. NaN and inf never pass."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    example: str = ""
    """An example of a good value, shown in the fix."""

    def why_not(self, value: float) -> str | None:
        """What `value` breaks, or None if it is inside."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        high_ok = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not (low_ok and high_ok):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        low = f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None else ""
        high = f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}" if self.lt is not None else ""
        return " and ".join(p for p in (low, high) if p) or "finite"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


Positive = Range(ge=1)
"""Whole counts: steps, rows, workers."""


def field_problems(config: Any, prefix: str) -> list[Problem]:
    """Every field of the dataclass `config` (and of the config dataclasses inside it) that does not conform to its
    annotation, as Problems named `prefix.field`. Never raises for any field value."""
    out: list[Problem] = []
    hints = annotations(type(config))
    for f in dataclasses.fields(config):
        if f.name not in hints:
            continue
        value = getattr(config, f.name)
        where = f"{prefix}.{f.name}" if prefix else f.name
        out.extend(_check(value, hints[f.name], where))
    return out


def conforms(value: Any, annotation: Any) -> bool:
    """Whether `value` passes `annotation` (types and ranges), for callers outside a config tree."""
    return not _check(value, annotation, "value")


@functools.cache
def annotations(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass, `Annotated` ranges kept."""
    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, globalns=vars(module), include_extras=True)


def _check(value: Any, tp: Any, where: str) -> list[Problem]:
    """Problems of `value` against the annotation `tp` at `where`."""
    rng: Range | None = None
    if get_origin(tp) is Annotated:
        tp, *extras = get_args(tp)
        rng = next((e for e in extras if isinstance(e, Range)), None)
    origin = get_origin(tp)
    if tp is Any:
        return []
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return []
        real = [o for o in options if o is not type(None)]
        for option in real:
            if not _shape_mismatch(value, option):
                return _check(value, option, where)
        return [_wrong(value, tp, where)]
    if origin is Literal:
        allowed = get_args(tp)
        if any(type(value) is type(a) and value == a for a in allowed):
            return []
        known = ", ".join(repr(a) for a in allowed)
        return [Problem(where, _short(value), f"must be one of {known}", _nearest(value, allowed))]
    if origin is tuple:
        if not isinstance(value, tuple):
            fix = f"write a tuple, e.g. {_example(tp)}"
            args = get_args(tp)
            if isinstance(value, list):
                fix = f"write it as a tuple: {tuple(value)!r}"
            elif len(args) == 2 and args[1] is Ellipsis and not _check(value, args[0], where):
                fix = f"write it as a one-item tuple: ({value!r},)"  # ranks=8, targets="all-linear"
            return [Problem(where, _short(value), f"must be {_describe(tp)}", fix)]
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            out = [p for i, v in enumerate(value) for p in _check(v, args[0], f"{where}[{i}]")]
            if not value:
                out.append(Problem(where, value, "is empty", f"give at least one value, e.g. {_example(tp)}"))
            return out
        if len(value) != len(args):
            return [Problem(where, value, f"must be {_describe(tp)}", f"e.g. {_example(tp)}")]
        return [p for i, (v, a) in enumerate(zip(value, args, strict=True)) for p in _check(v, a, f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [_wrong(value, tp, where)]
        key_tp, value_tp = get_args(tp)
        out = []
        for k, v in value.items():
            key_problems = _check(k, key_tp, f"{where} key")
            out.extend(key_problems)
            if not key_problems:
                out.extend(_check(v, value_tp, f"{where}[{k!r}]"))
        return out
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, tp):
            shown = repr(value) if isinstance(value, str) else "..."
            return [Problem(where, _short(value), f"must be a {tp.__name__}", f"e.g. {where}={tp.__name__}({shown})")]
        return field_problems(value, where)
    if tp is bool:
        return [] if isinstance(value, bool) else [_wrong(value, tp, where, rng)]
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return [_wrong(value, tp, where, rng)]
        return _range(value, rng, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [_wrong(value, tp, where, rng)]
        return _range(value, rng or Range(), where)
    if tp is str:
        if not isinstance(value, str):
            return [_wrong(value, tp, where, rng)]
        if rng is not None and rng.ge is not None and len(value.strip()) < rng.ge:
            return [Problem(where, value, "is empty", f"e.g. {rng.example}" if rng.example else "")]
        return []
    raise TypeError(f"lora_search.checks has no rule for the annotation {tp!r} of {where}")  # a bug of ours


def _nearest(value: Any, allowed: tuple[Any, ...]) -> str:
    """`did you mean ...` for a near-miss string, else an example."""
    import difflib

    if isinstance(value, str):
        by_case = [a for a in allowed if str(a).lower() == value.strip().lower()]
        close = by_case or difflib.get_close_matches(value, [str(a) for a in allowed], n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]!r}?"
    return f"e.g. {allowed[0]!r}"


def _range(value: float, rng: Range | None, where: str) -> list[Problem]:
    if rng is None:
        return []
    why = rng.why_not(value)
    if why is None:
        return []
    return [Problem(where, value, why, f"e.g. {rng.example}" if rng.example else "")]


def _shape_mismatch(value: Any, tp: Any) -> bool:
    """Whether `value` is clearly not of the union member `tp` (so the next member is tried)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin = get_origin(tp) or tp
    if origin is Literal:
        return not any(type(value) is type(a) and value == a for a in get_args(tp))
    if origin is tuple:
        return not isinstance(value, tuple | list)
    if origin is float:
        return isinstance(value, bool) or not isinstance(value, int | float)
    if origin is int:
        return isinstance(value, bool) or not isinstance(value, int)
    if isinstance(origin, type):
        return not isinstance(value, origin)
    return False


def _wrong(value: Any, tp: Any, where: str, rng: Range | None = None) -> Problem:
    expected = _describe(tp) + (f" {rng.describe()}" if rng is not None else "")
    hint = f"e.g. {rng.example}" if rng is not None and rng.example else f"e.g. {_example(tp)}"
    if isinstance(value, str) and tp in (int, float):
        try:
            float(value)
            hint = f"drop the quotes: {value.strip()}"
        except ValueError:
            pass
    elif isinstance(value, float) and tp is int and value.is_integer():
        hint = f"write it as an int: {int(value)}"  # max_steps=1e3
    return Problem(where, _short(value), f"must be {expected}, not {type(value).__name__}", hint)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple (each item {_describe(args[0])})"
        return "a tuple (" + ", ".join(_describe(a) for a in args) + ")"
    if origin is dict:
        k, v = get_args(tp)
        return f"a dict of {_describe(k)} to {_describe(v)}"
    if tp is type(None):
        return "None"
    return {int: "an int", float: "a number", str: "a string", bool: "True or False"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _example(tp: Any) -> str:
    rng = None
    if get_origin(tp) is Annotated:
        tp, *extras = get_args(tp)
        rng = next((e for e in extras if isinstance(e, Range)), None)
    if rng is not None and rng.example:
        return rng.example
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _example(next(a for a in get_args(tp) if a is not type(None)))
    if origin is Literal:
        return repr(get_args(tp)[0])
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"({_example(args[0])},)"
        return "(" + ", ".join(_example(a) for a in args) + ")"
    if origin is dict:
        return "{}"
    return {int: "1", float: "0.1", str: "'name'", bool: "True"}.get(tp, "...")


def _short(value: Any) -> Any:
    """The value as shown in a message: long reprs cut."""
    text = repr(value)
    return value if len(text) <= 80 else _Cut(text[:77] + "...")


class _Cut(str):
    def __repr__(self) -> str:
        return str(self)
