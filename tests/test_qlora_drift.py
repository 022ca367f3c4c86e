"""benchmarks/qlora_drift.py's export pick: closest to the unmerged scores, a tie going to the plain bf16 merge."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "qlora_drift", Path(__file__).parents[1] / "benchmarks" / "qlora_drift.py"
)
assert _spec is not None and _spec.loader is not None
drift = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drift)


def _ways(unmerged: float, dequant: float, bf16: float) -> dict:
    def g(v: float) -> dict:
        return {"golden": {"t/acc": {"value": v, "stderr": 0.05}}}

    return {"unmerged": g(unmerged), "merged_dequant": g(dequant), "merged_bf16": g(bf16)}


def test_pick_closest_and_tie_to_bf16() -> None:
    assert drift.pick(_ways(0.5, 0.5, 0.4))["pick"] == "merged_dequant"
    assert drift.pick(_ways(0.5, 0.3, 0.45))["pick"] == "merged_bf16"
    tied = drift.pick(_ways(0.5, 0.4, 0.6))
    assert tied["pick"] == "merged_bf16" and tied["tied"]


def test_pick_without_scores() -> None:
    assert drift.pick({"unmerged": {"error": "x"}})["pick"] is None
    only = _ways(0.5, 0.5, 0.5)
    del only["merged_dequant"]["golden"]
    assert drift.pick(only)["pick"] == "merged_bf16"
