"""Every field of every user-facing config dataclass, against malformed values drawn by Hypothesis.

The bad values are drawn from each field's annotation alone (its type, shape and `Range`), not from the checker's
code: wrong types, NaN, inf, values past a bound, huge numbers, empty and odd strings, lists where tuples belong,
tuples of the wrong length or with one bad item. For every such value, building the sweep and listing its problems
never raises, and some problem names the field. Any value at all (valid or not) never makes validation raise; and
a sweep drawn valid as a whole is accepted with no problem.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_search.checks import Range, annotations, conforms
from lora_search.config import (
    BaseModel,
    Budget,
    Dataset,
    Evals,
    Pricing,
    Resources,
    SearchSpace,
    Sweep,
    collecting_problems,
)
from lora_search.targets import PRESETS
from lora_search.variants import VARIANTS

EXAMPLES = 100
"""Drawn values per field and property: 52 fields x 2 properties x 100 = 10,400 sweeps checked."""

PARTS: dict[str, Any] = {
    "base": BaseModel("m"),
    "dataset": Dataset("d.jsonl"),
    "space": SearchSpace(),
    "budget": Budget(),
    "resources": Resources(),
    "evals": Evals(tasks=("t",), objective="t/acc"),
    "pricing": Pricing(),
}
SWEEP = Sweep(name="s", output_dir="out", **PARTS)
FIELDS = [(part, f.name) for part, config in PARTS.items() for f in dataclasses.fields(config)] + [
    ("", f.name) for f in dataclasses.fields(Sweep) if f.name not in PARTS
]


def _with(part: str, name: str, value: Any) -> Sweep:
    """SWEEP with one field set to `value`, built inside collecting_problems (so construction never raises on it)."""
    if part:
        return dataclasses.replace(SWEEP, **{part: dataclasses.replace(PARTS[part], **{name: value})})
    return dataclasses.replace(SWEEP, **{name: value})


def _annotation(part: str, name: str) -> Any:
    return annotations(type(PARTS[part]) if part else Sweep)[name]


def _split(tp: Any) -> tuple[Any, Range | None]:
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        return base, next((e for e in extras if isinstance(e, Range)), None)
    return tp, None


ANYTHING = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "\x00", "💥", "bfloat61", "lora", "all-linear", "1e-4", "nan", "-1"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=2)
    ),
    max_leaves=6,
)
"""Any value a sweep file could hold in a field."""


def _outside(rng: Range | None, kind: type) -> st.SearchStrategy[Any]:
    """Numbers of `kind` past one of the bounds of `rng`, and NaN/inf for floats."""
    options: list[st.SearchStrategy[Any]] = []
    if kind is float:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if rng is None:
        return st.one_of(options) if options else st.nothing()
    if kind is int:
        options += [st.integers(max_value=int(rng.ge) - 1)] if rng.ge is not None else []
        options += [st.integers(max_value=int(rng.gt))] if rng.gt is not None else []
        options += [st.integers(min_value=int(rng.le) + 1)] if rng.le is not None else []
        options += [st.integers(min_value=int(rng.lt))] if rng.lt is not None else []
    else:
        options += [st.floats(max_value=rng.ge, exclude_max=True)] if rng.ge is not None else []
        options += [st.floats(max_value=rng.gt)] if rng.gt is not None else []
        options += [st.floats(min_value=rng.le, exclude_min=True)] if rng.le is not None else []
        options += [st.floats(min_value=rng.lt)] if rng.lt is not None else []
    return st.one_of(options) if options else st.nothing()


def invalid(tp: Any) -> st.SearchStrategy[Any]:
    """Values that break the annotation `tp`: read from the annotation, not from lora_search.checks."""
    tp, rng = _split(tp)
    origin = get_origin(tp)
    not_a_number = st.text(max_size=6) | st.none() | st.booleans() | st.lists(st.integers(), max_size=2)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        optional = type(None) in get_args(tp)
        if len(members) == 1:
            return invalid(members[0]).filter(lambda v: not (optional and v is None))
        # str | tuple[str, ...] (target presets or module tuples): what is neither
        return st.integers() | st.floats() | st.just("") | st.just(()) | st.lists(st.text(min_size=1), min_size=1)
    if origin is Literal:
        allowed = get_args(tp)
        return st.text(max_size=10).filter(lambda v: v not in allowed) | st.integers() | st.none()
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            good = valid(args[0])
            one_bad = st.tuples(st.lists(good, max_size=2), invalid(args[0])).map(lambda t: tuple(t[0]) + (t[1],))
            return st.just(()) | st.lists(good, min_size=1, max_size=3) | one_bad | st.integers() | st.none()
        goods = [valid(a) for a in args]
        wrong_length = st.lists(goods[0], max_size=4).filter(lambda v: len(v) != len(args)).map(tuple)
        first_bad = st.tuples(invalid(args[0]), *goods[1:])
        return wrong_length | first_bad | st.lists(goods[0], min_size=len(args), max_size=len(args)) | st.none()
    if origin is dict:
        key, value = get_args(tp)
        return st.lists(st.text()) | st.text() | st.dictionaries(valid(key), invalid(value), min_size=1, max_size=2)
    if dataclasses.is_dataclass(tp):
        return st.text(max_size=8) | st.integers() | st.none() | st.just(Pricing())
    if tp is bool:
        return st.integers() | st.text(max_size=3) | st.none()
    if tp is int:
        return _outside(rng, int) | st.floats(allow_nan=True) | not_a_number
    if tp is float:
        return _outside(rng, float) | not_a_number
    if tp is str:
        empty = st.sampled_from(["", "   "]) if rng is not None and rng.ge else st.nothing()
        return empty | st.integers() | st.none() | st.lists(st.text(), max_size=2)
    raise AssertionError(f"no invalid-value strategy for {tp!r}")


def valid(tp: Any) -> st.SearchStrategy[Any]:
    """Values that satisfy the annotation `tp` (its type, shape and Range)."""
    tp, rng = _split(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of([valid(a) if a is not type(None) else st.none() for a in get_args(tp)])
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(valid(args[0]), min_size=1, max_size=3).map(tuple)
        return st.tuples(*(valid(a) for a in args))
    if origin is dict:
        return st.dictionaries(valid(get_args(tp)[0]), valid(get_args(tp)[1]), max_size=2)
    if tp is str:
        return st.text(min_size=1, max_size=8).filter(str.strip)
    if tp is bool:
        return st.booleans()
    low = next((b for b in (rng.ge, rng.gt) if b is not None), None) if rng else None
    high = next((b for b in (rng.le, rng.lt) if b is not None), None) if rng else None
    if tp is int:
        lo = None if low is None else int(low) + (rng.gt is not None)
        hi = None if high is None else int(high) - (rng.lt is not None)
        return st.integers(min_value=lo, max_value=hi)
    if tp is float:
        return st.floats(
            min_value=low,
            max_value=high,
            exclude_min=rng is not None and rng.gt is not None,
            exclude_max=rng is not None and rng.lt is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    raise AssertionError(f"no valid-value strategy for {tp!r}")


def _problems(part: str, name: str, value: Any) -> list:
    with collecting_problems() as construction:
        sweep = _with(part, name, value)
    return construction + sweep.problems()


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize(("part", "name"), FIELDS, ids=[f"{p}.{n}".lstrip(".") for p, n in FIELDS])
def test_a_malformed_value_is_a_problem_naming_its_field(part: str, name: str) -> None:
    where = f"{part}.{name}".lstrip(".")
    tp = _annotation(part, name)

    @SETTINGS
    @given(value=invalid(tp))
    def check(value: Any) -> None:
        assert not conforms(value, tp), f"the strategy drew a conforming value {value!r}"
        found = _problems(part, name, value)
        assert any(p.field == where or p.field.startswith((where + "[", where + ".", where + " ")) for p in found), (
            where,
            value,
            [str(p) for p in found],
        )

    check()


@pytest.mark.parametrize(("part", "name"), FIELDS, ids=[f"{p}.{n}".lstrip(".") for p, n in FIELDS])
def test_validation_never_raises_on_any_value(part: str, name: str) -> None:
    @SETTINGS
    @given(value=ANYTHING)
    def check(value: Any) -> None:
        for p in _problems(part, name, value):
            str(p)  # every problem renders

    check()


TRAINABLE = sorted(v for v, row in VARIANTS.items() if not row.quantized)


@st.composite
def valid_sweeps(draw: st.DrawFn) -> Sweep:
    """Whole sweeps that satisfy every field and every rule between fields."""
    max_steps = draw(st.integers(1, 10_000))
    eval_every = draw(st.integers(1, max_steps))
    grace = eval_every * draw(st.integers(1, max(1, max_steps // eval_every)))
    low = draw(st.floats(1e-7, 1e-2))
    tasks = tuple(draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True)))
    return Sweep(
        name=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True)),
        base=BaseModel(draw(valid(str)), dtype=draw(st.sampled_from(["float32", "bfloat16", "auto"]))),
        dataset=Dataset(draw(valid(str)), max_length=draw(st.integers(8, 1 << 20))),
        space=SearchSpace(
            ranks=tuple(draw(st.lists(st.integers(1, 4096), min_size=1, max_size=3))),
            targets=tuple(draw(st.lists(st.sampled_from(sorted(PRESETS)), min_size=1, max_size=2))),
            variants=tuple(draw(st.lists(st.sampled_from(TRAINABLE), min_size=1, max_size=3, unique=True))),
            lr=(low, low * draw(st.floats(1.01, 1e4))),
            dropout=tuple(draw(st.lists(st.floats(0.0, 0.99), min_size=1, max_size=2))),
        ),
        budget=Budget(
            max_steps=max_steps,
            eval_every=eval_every,
            grace_period=min(grace, max_steps),
            warmup_steps=draw(st.integers(0, max_steps - 1)),
            reduction_factor=draw(st.integers(2, 8)),
        ),
        resources=Resources(workers=draw(st.integers(1, 64)), gpus_per_worker=draw(st.sampled_from([0.0, 0.25, 1, 8]))),
        evals=Evals(tasks=tasks, objective=f"{draw(st.sampled_from(tasks))}/acc"),
        num_samples=draw(st.integers(1, 10_000)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_sweeps())
def test_a_valid_sweep_is_accepted(sweep: Sweep) -> None:
    assert sweep.problems() == []


def test_the_closed_sets_of_names_are_what_the_libraries_offer() -> None:
    """Each Literal a config field takes maps to something outside lora_search: every value must exist there."""
    import torch
    from ray.util.placement_group import VALID_PLACEMENT_GROUP_STRATEGIES
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from lora_search.config import ATTENTION, OPTIMIZERS, SCHEDULES, Dtype, Placement

    assert all(isinstance(getattr(torch, d), torch.dtype) for d in get_args(Dtype) if d != "auto")
    from lora_search import varlen

    varlen.register()  # "torch_varlen": lora_search's attention function, registered with transformers
    transformers_kernels = {k for key in ALL_ATTENTION_FUNCTIONS.valid_keys() for k in key.split("|")}
    ours = {"auto"}  # lora_search decides it per trial (`fastpath.resolve_attention`)
    assert set(ATTENTION) - ours <= transformers_kernels | {"eager"}, set(ATTENTION) - transformers_kernels - ours
    assert set(OPTIMIZERS) - {"auto"} <= {o.value for o in OptimizerNames}
    assert set(SCHEDULES) <= {s.value for s in SchedulerType}
    assert set(get_args(Placement)) <= set(VALID_PLACEMENT_GROUP_STRATEGIES)
