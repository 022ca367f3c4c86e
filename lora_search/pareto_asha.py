"""Pareto ASHA: asynchronous successive halving that ranks a rung's trials on quality, adapter size and cost.

Run: `Sweep(..., scheduler="pareto-asha")` (`lora_search.space.scheduler` builds it); the algorithm alone:
`python -m pytest tests/test_pareto_asha.py`.

Ray's ASHA keeps a trial at a rung when its eval loss is at least as good as Ray's cutoff over the trials recorded
there before it. The sweep's frontier has three axes, so a rank-8 adapter a little behind on loss is stopped though
it would be on the frontier. This scheduler keeps Ray's structure (rungs at grace_period x reduction_factor^k up to
max_t, one bracket, asynchronous promotion, a stop at max_t) and changes what a trial is judged on:

1. **The point.** From each result, three values to minimise (`Point`): the quality (`metric`, negated for
   mode "max"), `adapter_bytes` and the cost rate `steady_train_device_s / step` (one worker's steady device-seconds
   a step, `records.StepReport`: the configuration's cost per step, as `lora_search.cost` prices it). A missing,
   non-finite or non-positive size or cost is None, and an axis that any trial at the rung lacks is left out of
   that rung's comparison; so is an axis on which they all tie. Cost rates within `COST_TOLERANCE` of each other tie:
   identical configurations measure a few percent apart, and that noise must not outrank a loss gap.
2. **The ordering.** The rung's trials *with the new one among them* are sorted into non-dominated fronts; within a
   front, the larger crowding distance (NSGA-II) first, measured on each axis min-max normalised over the rung, so
   bytes in the tens of millions do not swamp a loss near 0.1. Remaining ties: normalised quality, then size, then
   cost; trials at the same point share a position. (Crowding makes each axis's extremes in a front infinite, so in
   the small fronts of a rung most ties fall to quality, the sweep's first objective.) The new trial's position
   comes from this sort of the set that holds it, never from an order computed without it (Syne Tune's MOASHA reads
   the order `nondominated_sort` returns as scores, and stops a new trial that dominates every stored one).
3. **The cutoff.** Ray's, not a top ceil(n / reduction_factor): a trial's score is minus its position, and it goes
   on unless its score is below the (1 - 1/reduction_factor) percentile (`np.nanpercentile`, linear) of the scores
   of the trials recorded before it: about the best 1/reduction_factor go on. With one informative axis the score is
   that axis's value itself (Ray's reward), so the decisions are exactly Ray's ASHA on that value.

The scheduler keeps its state (rungs with each trial's point, stops with their step) as JSON in `state_file`,
rewritten after every result and read back before the first decision, so a sweep resumed after its driver died
judges new trials against the old ones and stops a trial where it was stopped before (`lora_search.resume`).

Everything but `ParetoASHA` is pure (no Ray). `ParetoASHA` subclasses Ray's FIFOScheduler; since `lora_search.space`
(core, which imports no Ray at module level) builds it, the class is made on first use (`__getattr__` below).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SIZE_KEY = "adapter_bytes"
COST_KEY = "steady_train_device_s"
"""Cumulative device-seconds of steady training; divided by the result's step it is the cost rate."""
COST_TOLERANCE = 0.05
"""Cost rates within 5% of the smallest of their group are one cost (`_tied_costs`): the lower-quartile step time of
one configuration varies by a few percent between runs on a shared machine."""
QUALITY, SIZE, COST = 0, 1, 2

Point = tuple[float | None, float | None, float | None]
"""A trial's (quality, adapter bytes, device-seconds a step) at a rung, each to minimise; None where unreported."""


def point(result: dict[str, Any], metric: str, mode: str, time_attr: str, quality_only: bool = False) -> Point:
    """The point a Tune result puts at a rung. Quality is the metric, negated for mode "max" (Ray's reward negated,
    bit for bit). `quality_only`: size and cost left out (None), so the rung judges on quality alone."""
    value = _finite(result.get(metric))
    quality = None if value is None else (value if mode == "min" else -value)
    if quality_only:
        return quality, None, None
    size, spent, step = (_positive(result.get(k)) for k in (SIZE_KEY, COST_KEY, time_attr))
    rate = spent / step if spent is not None and step is not None else None
    return quality, size, rate


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _positive(value: Any) -> float | None:
    value = _finite(value)
    return value if value is not None and value > 0 else None  # StepReport's 0: not measured


def keeps(earlier: Sequence[Point], new: Point, reduction_factor: float) -> bool:
    """Whether the trial at `new` goes on from a rung where `earlier` were recorded before it (module docstring)."""
    pool = [p for p in earlier if p[QUALITY] is not None]  # as Ray's nanpercentile leaves a NaN reward out
    if new[QUALITY] is None or not pool:
        return True
    columns = _informative_columns([*pool, new])
    if len(columns) > 1:
        scores = -positions(np.column_stack(columns)).astype(float)
    else:  # Ray's ASHA: the reward itself
        values = columns[0] if columns else np.array([p[QUALITY] for p in (*pool, new)], dtype=float)
        scores = -values
    cutoff = np.nanpercentile(scores[:-1], (1 - 1 / reduction_factor) * 100)
    return not scores[-1] < cutoff


def _informative_columns(points: Sequence[Point]) -> list[np.ndarray]:
    """The axes the rung compares on: those every point has, on which not all of them tie."""
    out = []
    for axis in (QUALITY, SIZE, COST):
        values = [p[axis] for p in points]
        if any(v is None for v in values):
            continue
        column = np.array(_tied_costs(values) if axis == COST else values, dtype=float)
        if column.max() > column.min():
            out.append(column)
    return out


def _tied_costs(rates: list[float]) -> list[float]:
    """Each rate replaced by the smallest of its group: in ascending order, a rate within `COST_TOLERANCE` above the
    first of the current group joins it."""
    first, group = 0.0, {}
    for rate in sorted(set(rates)):
        if not group or rate > first * (1 + COST_TOLERANCE):
            first = rate
        group[rate] = first
    return [group[r] for r in rates]


def positions(points: np.ndarray) -> np.ndarray:
    """Each row's position (0: best) in the Pareto ordering of all rows (n points x k axes, each to minimise):
    non-dominated front, then crowding distance (larger first), then the normalised values in axis order. Rows at
    the same point share a position (the number of rows strictly ahead of them)."""
    front = fronts(points)
    span = points.max(axis=0) - points.min(axis=0)
    scaled = (points - points.min(axis=0)) / np.where(span > 0, span, 1.0)
    crowding = np.zeros(len(points))
    for k in range(front.max() + 1):
        members = np.flatnonzero(front == k)
        crowding[members] = crowding_distance(scaled[members])
    keys = np.column_stack([front, -crowding, scaled])
    order = np.lexsort(keys.T[::-1])  # by the first column, then the next, ...
    ranked = keys[order]
    new = np.r_[True, (ranked[1:] != ranked[:-1]).any(axis=1)]
    out = np.empty(len(points), dtype=int)
    out[order] = np.maximum.accumulate(np.where(new, np.arange(len(points)), 0))
    return out


def fronts(points: np.ndarray) -> np.ndarray:
    """Each row's non-dominated front (0: dominated by no row), by repeatedly peeling the rows that no remaining row
    dominates. Row i dominates row j when it is no worse on every axis and better on one."""
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
    better = (points[:, None, :] < points[None, :, :]).any(axis=2)
    dominates = no_worse & better
    dominated_by = dominates.sum(axis=0)  # by how many rows not yet peeled
    front = np.full(len(points), -1)
    k = 0
    while (current := (front < 0) & (dominated_by == 0)).any():
        front[current] = k
        dominated_by -= dominates[current].sum(axis=0)
        k += 1
    return front


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row of one front (axes already on a common scale): the extremes of each
    axis are infinite, the others sum the gap between their neighbours on every axis. Rows at the same point get the
    same distance, and each axis's order breaks ties by the other axes, so the result does not depend on row order."""
    unique, back = np.unique(points, axis=0, return_inverse=True)
    distance = np.zeros(len(unique))
    if len(unique) <= 2:
        distance[:] = math.inf
    else:
        for axis in range(unique.shape[1]):
            others = [unique[:, a] for a in reversed(range(unique.shape[1])) if a != axis]
            order = np.lexsort((*others, unique[:, axis]))
            distance[order[[0, -1]]] = math.inf
            distance[order[1:-1]] += unique[order[2:], axis] - unique[order[:-2], axis]
    return distance[back.reshape(-1)]


def milestones(grace_period: float, max_t: float, reduction_factor: float) -> tuple[float, ...]:
    """Rung steps, ascending: grace_period x reduction_factor^k up to max_t (`space.rungs` for a sweep)."""
    out, t = [], grace_period
    while t <= max_t:
        out.append(t)
        t *= reduction_factor
    return tuple(out)


@dataclass
class Rungs:
    """The scheduler's whole state, plain data: each rung's points in arrival order, each stop with its step."""

    milestones: tuple[float, ...]
    reduction_factor: float
    recorded: dict[float, dict[str, Point]] = field(default_factory=dict)
    stopped: dict[str, float] = field(default_factory=dict)
    scheduler: str = "pareto-asha"
    """Which `Sweep.scheduler` keeps this state: "pareto-asha", or "asha" (quality alone)."""

    def __post_init__(self) -> None:
        for m in self.milestones:
            self.recorded.setdefault(m, {})

    def on_result(self, trial_id: str, t: float, at: Point) -> bool:
        """Ray's `_Bracket.on_result`: judge the trial at the highest rung at or below `t` that has not recorded it
        (recording it there); True (go on) if there is none."""
        for milestone in reversed(self.milestones):
            recorded = self.recorded[milestone]
            if t < milestone or trial_id in recorded:
                continue
            keep = keeps(list(recorded.values()), at, self.reduction_factor)
            recorded[trial_id] = at
            return keep
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "milestones": list(self.milestones),
            "reduction_factor": self.reduction_factor,
            "rungs": [[m, {t: list(p) for t, p in self.recorded[m].items()}] for m in self.milestones],
            "stopped": self.stopped,
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Rungs:
        recorded = {m: {t: tuple(p) for t, p in at.items()} for m, at in state["rungs"]}
        milestones, factor, stopped = tuple(state["milestones"]), state["reduction_factor"], dict(state["stopped"])
        return cls(milestones, factor, recorded, stopped, state.get("scheduler", "pareto-asha"))

    def save(self, path: Path) -> None:
        """Write the state to `path` whole or not at all (a driver killed mid-write leaves the previous file)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, expected: Rungs) -> Rungs:
        """The state saved in `path`; raises ValueError if it is not this scheduler's (another scheduler's file, or
        other rungs)."""
        state = json.loads(path.read_text())
        if state.get("scheduler") != expected.scheduler or tuple(state["milestones"]) != expected.milestones:
            raise ValueError(
                f"{path} is not the state of a {expected.scheduler} with rungs at {list(expected.milestones)}: the "
                "sweep changed its scheduler or budget since it started; run it under a new name, or with --fresh"
            )
        return cls.from_json(state)


def __getattr__(name: str) -> Any:
    """`ParetoASHA`, made on first use (it needs Ray); pickle finds the class again through here."""
    if name == "ParetoASHA":
        return _scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _scheduler_class() -> type:
    from ray.tune.result import DEFAULT_METRIC
    from ray.tune.schedulers import FIFOScheduler

    class ParetoASHA(FIFOScheduler):
        """Pareto ASHA as a Ray Tune scheduler: Ray's ASHAScheduler arguments (one bracket; trials stop at max_t), and
        `state_file`, where the state is kept across a killed driver (None: in memory only). `quality_only`: ASHA on
        the metric alone, whose decisions are Ray's ASHAScheduler's (tests/test_pareto_asha.py replays both), with
        the same kept state: `Sweep(scheduler="asha")`."""

        def __init__(
            self,
            time_attr: str = "training_iteration",
            metric: str | None = None,
            mode: str | None = None,
            max_t: float = 100,
            grace_period: float = 1,
            reduction_factor: float = 4,
            state_file: Path | None = None,
            quality_only: bool = False,
        ) -> None:
            if not 0 < grace_period <= max_t or reduction_factor <= 1 or mode not in (None, "min", "max"):
                raise ValueError(
                    f"need 0 < grace_period <= max_t, reduction_factor > 1, mode 'min' or 'max'; got "
                    f"grace_period={grace_period}, max_t={max_t}, reduction_factor={reduction_factor}, mode={mode!r}"
                )
            super().__init__()
            self._time_attr, self._metric, self._mode, self._max_t = time_attr, metric, mode, max_t
            name = "asha" if quality_only else "pareto-asha"
            self.rungs = Rungs(milestones(grace_period, max_t, reduction_factor), reduction_factor, scheduler=name)
            self.quality_only = quality_only
            self.state_file = state_file
            self._loaded = False
            self._num_stopped = 0

        def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
            if self._metric and metric or self._mode and mode:
                return False
            self._metric, self._mode = self._metric or metric, self._mode or mode
            if self._metric is None and self._mode:
                self._metric = DEFAULT_METRIC
            return True

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            if not self._metric or self._mode not in ("min", "max"):
                raise ValueError(
                    f"ParetoASHA has no metric ({self._metric}) or mode ({self._mode}): pass them to it or to "
                    "tune.TuneConfig()"
                )

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            self._load()
            if self._time_attr not in result or self._metric not in result:
                return self.CONTINUE
            t = result[self._time_attr]
            if trial.trial_id in self.rungs.stopped:  # stopped before the driver died: this run repeats its reports
                return self.STOP if t >= self.rungs.stopped[trial.trial_id] else self.CONTINUE
            at = point(result, self._metric, self._mode, self._time_attr, self.quality_only)
            if t >= self._max_t or not self.rungs.on_result(trial.trial_id, t, at):
                self.rungs.stopped[trial.trial_id] = t
                self._num_stopped += 1
                self._save()
                return self.STOP
            self._save()
            return self.CONTINUE

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
            self._load()
            if self._time_attr in result and self._metric in result:  # recorded, as Ray's ASHA does
                at = point(result, self._metric, self._mode, self._time_attr, self.quality_only)
                self.rungs.on_result(trial.trial_id, result[self._time_attr], at)
                self._save()

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state, _loaded=False)  # a copy unpickled by a resumed driver reads state_file again

        def debug_string(self) -> str:
            sizes = ", ".join(f"{m}: {len(self.rungs.recorded[m])}" for m in self.rungs.milestones)
            name = "ASHA" if self.quality_only else "ParetoASHA"
            return f"Using {name}: num_stopped={self._num_stopped}; trials at each rung: {sizes}"

        def save(self, checkpoint_path: str) -> None:
            self.rungs.save(Path(checkpoint_path))

        def restore(self, checkpoint_path: str) -> None:
            self.rungs = Rungs.load(Path(checkpoint_path), self.rungs)
            self._loaded = True

        def _load(self) -> None:
            """Before the first decision: the state `state_file` holds, if any (a resumed sweep's)."""
            if not self._loaded and self.state_file is not None and Path(self.state_file).is_file():
                self.restore(str(self.state_file))
            self._loaded = True

        def _save(self) -> None:
            if self.state_file is not None:
                self.rungs.save(Path(self.state_file))

    ParetoASHA.__qualname__ = "ParetoASHA"  # pickled by reference: lora_search.pareto_asha.ParetoASHA
    return ParetoASHA
