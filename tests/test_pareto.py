"""Pareto frontier and hypervolume against an independent implementation (Optuna's)."""

from __future__ import annotations

import numpy as np
import pytest

from lora_search.pareto import OBJECTIVES, hypervolume, non_dominated, projections, to_minimise


def test_direction_is_normalised_once() -> None:
    rows = [{"objective": 0.9, "adapter_bytes": 100, "cost": 2.0}]
    assert to_minimise(rows, OBJECTIVES).tolist() == [[-0.9, 100.0, 2.0]]


def test_small_frontier_by_hand() -> None:
    rows = [
        {"objective": 0.9, "adapter_bytes": 400, "cost": 4.0},  # best quality
        {"objective": 0.8, "adapter_bytes": 100, "cost": 1.0},  # small and cheap
        {"objective": 0.8, "adapter_bytes": 200, "cost": 2.0},  # dominated by the one above
        {"objective": 0.7, "adapter_bytes": 100, "cost": 1.0},  # dominated too
    ]
    assert non_dominated(to_minimise(rows)).tolist() == [True, True, False, False]
    proj = projections(to_minimise(rows), ["objective", "adapter_bytes", "cost"])
    assert proj[("adapter_bytes", "cost")].tolist() == [False, True, False, True]


def test_hypervolume_by_hand() -> None:
    # Two boxes in 2-D, reference (4, 4): [1,4]x[3,4] and [3,4]x[1,4] overlap in [3,4]x[3,4].
    assert hypervolume(np.array([[1.0, 3.0], [3.0, 1.0]]), [4.0, 4.0]) == pytest.approx(3 + 3 - 1)
    assert hypervolume(np.array([[5.0, 1.0]]), [4.0, 4.0]) == 0.0  # not better than the reference


@pytest.mark.parametrize("seed", range(5))
def test_matches_optuna_on_random_points(seed: int) -> None:
    from optuna._hypervolume import compute_hypervolume
    from optuna.study._multi_objective import _is_pareto_front

    rng = np.random.default_rng(seed)
    points = rng.random((40, 3))
    points[rng.integers(0, 40, 5)] = points[rng.integers(0, 40, 5)]  # some exact duplicates
    order = np.lexsort(points.T[::-1])
    lexsorted = points[order]
    expected = np.empty(len(points), dtype=bool)
    expected[order] = _is_pareto_front(lexsorted, assume_unique_lexsorted=False)
    assert non_dominated(points).tolist() == expected.tolist()
    reference = np.array([1.1, 1.1, 1.1])
    assert hypervolume(points, reference) == pytest.approx(compute_hypervolume(points, reference), rel=1e-12)


def test_sweep_frontier_hypervolume_by_hand() -> None:
    from lora_search.pareto import Objective, frontier

    quality = Objective("objective", higher_is_better=True)
    rows = [
        {"objective": 0.9, "adapter_bytes": 50, "cost": 2.0},  # gain 0.4, size 0.5, cost 0.2 of the references
        {"objective": 0.4, "adapter_bytes": 10, "cost": 1.0},  # worse than the base: on the frontier, adds nothing
    ]
    front = frontier(rows, quality, base_quality=0.5, base_bytes=100, reference_cost=10.0)
    assert front.mask.tolist() == [True, True]
    assert front.hypervolume == pytest.approx(0.4 * (1 - 0.5) * (1 - 0.2))
    assert front.reference == {"objective": 0.5, "adapter_bytes": 100, "cost": 10.0}
    # The reference is the sweep's, not its trials': adding a dominated trial changes nothing.
    more = frontier([*rows, {"objective": 0.8, "adapter_bytes": 60, "cost": 3.0}], quality, 0.5, 100, 10.0)
    assert more.mask.tolist() == [True, True, False] and more.hypervolume == pytest.approx(front.hypervolume)
    # Lower-is-better quality (eval loss) is flipped once, the same way.
    loss = frontier([{"eval_loss": 1.0, "adapter_bytes": 50, "cost": 5.0}], Objective("eval_loss", False), 3.0, 100, 10)
    assert loss.hypervolume == pytest.approx(2.0 * 0.5 * 0.5)
