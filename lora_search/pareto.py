"""The Pareto frontier of quality vs adapter size vs cost: pure functions, no Ray, no MLflow.

Each objective carries its direction (`higher_is_better`, as lm-eval declares it for the quality metric);
`to_minimise` flips the maximised ones once, and everything after it only minimises.

    points = to_minimise(rows, OBJECTIVES)      # rows: dicts with "objective", "adapter_bytes", "cost"
    front = non_dominated(points)               # boolean mask of the frontier
    hv = hypervolume(points[front], reference)  # reference: a point every counted trial must beat

`frontier` does all of it for a sweep, with the sweep's stable reference point:

    quality       the base model's own score: an adapter that does not beat its base adds nothing
    adapter size  the base model's weight bytes: an adapter as large as a full fine-tune adds nothing
    cost          `Pricing.reference_trial_hours` of one trial's devices (lora_search.cost.reference_cost)

None of the three depends on which trials ran, so hypervolumes of nightly runs of one sweep compare. The
hypervolume is measured in normalised units: quality gain over the base (in the metric's own units) x
fraction of the base's size saved x fraction of the reference cost saved. One trial with gain g, size
fraction s and cost fraction c alone has hypervolume g (1 - s) (1 - c).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Objective:
    key: str
    higher_is_better: bool


OBJECTIVES = (
    Objective("objective", higher_is_better=True),  # the sweep's primary golden metric
    Objective("adapter_bytes", higher_is_better=False),
    Objective("cost", higher_is_better=False),
)


def frontier(
    rows: Sequence[dict[str, Any]],
    quality: Objective,
    base_quality: float,
    base_bytes: float,
    reference_cost: float,
) -> Frontier:
    """The frontier of `rows` (each with `quality.key`, "adapter_bytes" and "cost") and its hypervolume."""
    objectives = (quality, OBJECTIVES[1], OBJECTIVES[2])
    points = to_minimise(rows, objectives)
    sign = -1.0 if quality.higher_is_better else 1.0
    # Normalised: quality relative to the base, size and cost as fractions of their references (all minimised).
    normalised = (points - np.array([sign * base_quality, 0.0, 0.0])) / np.array([1.0, base_bytes, reference_cost])
    mask = non_dominated(points) if len(points) else np.zeros(0, dtype=bool)
    names = [o.key for o in objectives]
    return Frontier(
        keys=tuple(names),
        mask=mask,
        projections=projections(points, names) if len(points) else {},
        hypervolume=hypervolume(normalised[mask], [0.0, 1.0, 1.0]),
        reference={quality.key: base_quality, "adapter_bytes": base_bytes, "cost": reference_cost},
    )


@dataclass(frozen=True)
class Frontier:
    keys: tuple[str, ...]
    """The objectives: the quality key ("objective" or "eval_loss"), "adapter_bytes", "cost"."""
    mask: np.ndarray
    """Over the rows given: True where no other row is at least as good in every objective and better in one."""
    projections: dict[tuple[str, str], np.ndarray]
    """The same over every pair of objectives (the 2-D frontiers a plot shows)."""
    hypervolume: float
    reference: dict[str, float]


def to_minimise(rows: Sequence[dict[str, Any]], objectives: Sequence[Objective] = OBJECTIVES) -> np.ndarray:
    """An (n, d) array of the rows' objective values, sign-flipped where higher is better."""
    signs = np.array([-1.0 if o.higher_is_better else 1.0 for o in objectives])
    values = np.array([[float(row[o.key]) for o in objectives] for row in rows], dtype=float).reshape(-1, len(signs))
    return values * signs


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the points no other point dominates (<= in every objective and < in one). Duplicates both stay.

    O(n^2 d): a sweep has at most thousands of trials, and this stays obviously correct.
    """
    points = np.asarray(points, dtype=float)
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        others = np.delete(points, i, axis=0)
        dominated = np.all(others <= points[i], axis=1) & np.any(others < points[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def projections(points: np.ndarray, names: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
    """The frontier of every pair of objectives: (name_a, name_b) -> mask over all points."""
    points = np.asarray(points, dtype=float)
    return {(names[a], names[b]): non_dominated(points[:, [a, b]]) for a, b in combinations(range(len(names)), 2)}


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by `points` and bounded by `reference` (all minimised). Points not strictly better than
    the reference in every objective add nothing. Exact, by slicing along the first objective (HSO)."""
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    pts = pts[np.all(pts < ref, axis=1)]
    return _hso(pts, ref)


def _hso(pts: np.ndarray, ref: np.ndarray) -> float:
    if len(pts) == 0:
        return 0.0
    if len(ref) == 1:
        return float(ref[0] - pts[:, 0].min())
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, 0] if i + 1 < len(pts) else ref[0]
        if upper > pts[i, 0]:
            volume += (upper - pts[i, 0]) * _hso(pts[: i + 1, 1:], ref[1:])
    return volume
