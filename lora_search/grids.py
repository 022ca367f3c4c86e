"""A recorded grid (a tabular benchmark), as the replay reads it: every configuration of a grid trained to the full
budget, its eval loss at each eval-every step, its golden scores, adapter bytes and device-seconds.

    grid = grids.load_grid("benchmarks/grid_smollm2_h200_<date>.parquet", grace_period=50, reduction_factor=3)

benchmarks/grid.py records one on the GPU (`table` writes the parquet and a JSON sidecar with its budget and
versions); `synthetic_grid` writes a made-up one in the same format for tests and for trying the measurement before a
GPU has recorded one. `lora_search.replay` runs schedulers and searchers over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_search import pareto
from lora_search.config import Budget

if TYPE_CHECKING:
    import pandas as pd

PARAMS = ("variant", "rank", "alpha", "targets", "lr")
"""The searched hyperparameters a grid row records (`records.PARAMS` less dropout, which the grid does not vary)."""
REQUIRED = ("config_id", *PARAMS, "status", "curve_step", "curve_eval_loss", "adapter_bytes", "train_s", "device_s")


class GridError(ValueError):
    """A recorded grid this module cannot replay: every problem found, one a line."""


@dataclass(frozen=True)
class Configuration:
    """One row of the grid: a configuration trained to the full budget (or as far as it got)."""

    config_id: str
    params: dict[str, Any]
    status: str
    """As recorded: "completed", or how it ended early ("failed", "diverged", "infeasible", "unfinished")."""
    steps: tuple[int, ...]
    """The eval-every steps it reported, step 0 (the base's own eval, which a trial does not report) left out."""
    losses: tuple[float, ...]
    base_eval_loss: float
    adapter_bytes: int
    train_s: float
    device_s: float
    """Device-seconds of its training and evaluation at the steady rate: its cost on the frontier."""
    objective: float
    scores: dict[str, float]
    steady_tokens_per_s: float

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0


@dataclass(frozen=True)
class Grid:
    configurations: tuple[Configuration, ...]
    budget: Budget
    """The recorded budget, with the rungs to replay (`load_grid`'s grace_period and reduction_factor)."""
    objective: str
    """The golden metric column that is the frontier's quality (`Evals.objective`)."""
    higher_is_better: bool
    source: str
    by_id: dict[str, Configuration] = field(repr=False, compare=False)

    @cached_property
    def compute(self) -> float:
        """Device-seconds of the whole grid: what a sweep that prunes nothing and tries everything spends."""
        return sum(c.device_s for c in self.configurations)

    @cached_property
    def reference(self) -> tuple[float, float, float]:
        """The hypervolume's reference (quality, adapter bytes, cost): the worst completed configuration's value of
        each, pushed 10% of the grid's range beyond it so that the extreme configurations count too. It depends on
        the grid alone, so replays over one grid compare."""
        done = self.scored(list(self.configurations))
        quality = [c.objective for c in done]
        spread = (max(quality) - min(quality)) or 1.0
        worst = min(quality) - 0.1 * spread if self.higher_is_better else max(quality) + 0.1 * spread
        return worst, 1.1 * max(c.adapter_bytes for c in done), 1.1 * max(c.device_s for c in done)

    @staticmethod
    def scored(configurations: Sequence[Configuration]) -> list[Configuration]:
        return [c for c in configurations if c.status == "completed" and math.isfinite(c.objective)]

    @cached_property
    def hypervolume(self) -> float:
        """Of the frontier of every completed configuration: what a replay's frontier is measured against."""
        return float(self.frontier(self.configurations).hypervolume)

    def frontier(self, configurations: Sequence[Configuration]) -> pareto.Frontier:
        """`pareto.frontier` of the completed, scored ones among `configurations`, against `reference`."""
        rows = [
            {"objective": c.objective, "adapter_bytes": c.adapter_bytes, "cost": c.device_s}
            for c in self.scored(configurations)
        ]
        quality, size, cost = self.reference
        return pareto.frontier(rows, pareto.Objective("objective", self.higher_is_better), quality, size, cost)


def load_grid(
    path: str | Path,
    *,
    grace_period: int | None = None,
    reduction_factor: int | None = None,
    drop_unfinished: bool = False,
) -> Grid:
    """The table benchmarks/grid.py writes, checked. The grid records a budget whose grace period is max_steps (it
    prunes nothing); `grace_period` and `reduction_factor` set the rungs ASHA replays (sweeps/smollm2.py: 50, 3).
    `drop_unfinished`: leave out the configurations the recording cut short (status "unfinished": its time ran out,
    not the trial), so the replay is over the configurations that have a whole curve and a score.

    Raises GridError naming every missing column and every row that cannot be replayed."""
    import pandas as pd

    frame = pd.read_parquet(path)
    meta = frame.attrs.get("lora_search") or _sidecar(Path(path))
    if drop_unfinished and "status" in frame.columns:
        frame = frame[frame["status"] != "unfinished"].reset_index(drop=True)
    problems = [f"missing column {c!r}" for c in REQUIRED if c not in frame.columns]
    if "budget" not in meta or "objective" not in meta:
        problems.append(
            f"no 'budget' and 'objective' in the table's metadata (parquet attrs['lora_search'], or "
            f"{Path(path).with_suffix('.json').name} beside it): write the table with benchmarks/grid.py table"
        )
    elif meta["objective"] not in frame.columns:
        problems.append(f"missing column {meta['objective']!r} (the objective the metadata names)")
    if problems:
        raise GridError(f"{path}: cannot replay:\n  " + "\n  ".join(problems))
    known = {f.name for f in dataclasses.fields(Budget)}
    budget = Budget(**{k: v for k, v in meta["budget"].items() if k in known})
    budget = dataclasses.replace(
        budget,
        grace_period=grace_period or budget.grace_period,
        reduction_factor=reduction_factor or budget.reduction_factor,
    )
    rows = frame.to_dict("records")
    for i, row in enumerate(rows):
        if len(row["curve_step"]) != len(row["curve_eval_loss"]):
            problems.append(f"row {i} ({row['config_id']}): curve_step and curve_eval_loss differ in length")
    if problems:
        raise GridError(f"{path}: cannot replay:\n  " + "\n  ".join(problems))
    configurations = tuple(_configuration(row, meta["objective"]) for row in rows)
    for i, c in enumerate(configurations):
        problems += [f"row {i} ({c.config_id}): {p}" for p in _row_problems(c, budget.max_steps)]
    ids = [c.config_id for c in configurations]
    problems += [f"config_id {d!r} appears more than once" for d in sorted({i for i in ids if ids.count(i) > 1})]
    if not Grid.scored(configurations):
        problems.append(f"no completed configuration with a finite {meta['objective']!r}: no frontier to find")
    if problems:
        raise GridError(f"{path}: cannot replay:\n  " + "\n  ".join(problems))
    return Grid(
        configurations,
        budget,
        meta["objective"],
        bool(meta.get("objective_higher_is_better", True)),  # lm-eval's exact_match, acc: higher is better
        str(path),
        {c.config_id: c for c in configurations},
    )


def _sidecar(path: Path) -> dict[str, Any]:
    side = path.with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}


def _configuration(row: dict[str, Any], objective: str) -> Configuration:
    curve = [(int(s), float(v)) for s, v in zip(row["curve_step"], row["curve_eval_loss"], strict=True)]
    base = dict(curve).get(0, float(row.get("base_eval_loss", math.nan)))
    return Configuration(
        config_id=str(row["config_id"]),
        params={k: row[k] for k in PARAMS},
        status=str(row["status"]),
        steps=tuple(s for s, _ in curve if s > 0),
        losses=tuple(v for s, v in curve if s > 0),
        base_eval_loss=base,
        adapter_bytes=int(row["adapter_bytes"]),
        train_s=float(row["train_s"]),
        device_s=float(row["device_s"]),
        objective=float(row[objective]),
        scores={k: float(v) for k, v in row.items() if "/" in k and v is not None},
        steady_tokens_per_s=float(row.get("steady_tokens_per_s", math.nan)),
    )


def _row_problems(c: Configuration, max_steps: int) -> list[str]:
    out = []
    if list(c.steps) != sorted(set(c.steps)):
        out.append(f"curve_step {list(c.steps)} is not strictly increasing")
    if not all(math.isfinite(v) for v in c.losses):
        out.append("curve_eval_loss has a non-finite value")
    if c.last_step > max_steps:
        out.append(f"curve_step goes to {c.last_step}, past the budget's max_steps={max_steps}")
    if c.status == "completed" and c.last_step != max_steps:
        out.append(f"is completed but its curve ends at step {c.last_step}, not max_steps={max_steps}")
    if c.steps and not (c.train_s > 0 and c.device_s >= 0):
        out.append(f"train_s={c.train_s} and device_s={c.device_s}: need train_s > 0 and device_s >= 0")
    return out


def synthetic_grid(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """A made-up grid in benchmarks/grid.py's format, deterministic for `seed`: `n` configurations of 5 variants x
    ranks 4, 16, 64 x attention / all-linear x ceil(n / 30) learning rates (a seeded subset when n is not a multiple
    of 30), 300 steps with an eval every 25, a quarter of an H200 each (sweeps/smollm2.py's shape).

    Curves: loss(s) = floor + (base - floor) exp(-s / tau) + noise(0.01). A learning rate above the variant's best
    learns faster (smaller tau) to a higher floor, so curves cross and early losses mislead; rank, all-linear targets
    and DoRA lower the floor and cost bytes and seconds. The objective (exact match) is a logistic of the final loss
    plus noise(0.02); a few configurations diverge or fail partway."""
    import pandas as pd

    from lora_search.space import lr_grid

    rng = np.random.default_rng(seed)
    max_steps, every = 300, 25
    best_lr = {"lora": -3.4, "rslora": -3.6, "dora": -3.4, "pissa": -3.8, "loraplus": -3.9}
    bonus = {"lora": 0.0, "rslora": -0.01, "dora": -0.04, "pissa": -0.02, "loraplus": 0.0}
    slower = {"lora": 1.0, "rslora": 1.0, "dora": 1.45, "pissa": 1.05, "loraplus": 1.0}
    dims = {"attention": 1920, "all-linear": 10176}  # sum of in + out features of the targets, a SmolLM2-135M layer
    lrs = lr_grid(2e-5, 2e-3, max(1, math.ceil(n / 30)))
    combos = [(v, r, t, lr) for v in best_lr for r in (4, 16, 64) for t in dims for lr in lrs]
    keep = sorted(rng.permutation(len(combos))[:n])
    rows = []
    for v, rank, t, lr in (combos[i] for i in keep):
        gap = math.log10(lr) - best_lr[v] + rng.normal(0, 0.1)
        floor = 0.3 + 0.12 * gap**2 - 0.025 * math.log2(rank / 4) - (0.06 if t == "all-linear" else 0) + bonus[v]
        floor += rng.normal(0, 0.02)
        tau = float(np.clip(70 * 10 ** (-0.7 * gap), 8, 3000))
        steps = list(range(0, max_steps + 1, every))
        true = [2.0 if s == 0 else floor + (2.0 - floor) * math.exp(-s / tau) for s in steps]
        losses = [true[0]] + [x + rng.normal(0, 0.01) for x in true[1:]]
        status = "completed"
        if gap > 1.0 and v in ("dora", "loraplus") or rng.random() < 0.03:
            status = "diverged" if gap > 1.0 else "failed"
            cut = int(rng.integers(2, len(steps) - 1))
            steps, losses = steps[:cut], losses[:cut]
        sec_per_step = (0.16 if t == "attention" else 0.21) * (1 + rank / 256) * slower[v]
        train_s = steps[-1] * sec_per_step
        golden_device_s = 4.0 if status == "completed" else 0.0
        em = float(np.clip(1 / (1 + math.exp((true[-1] - 0.45) / 0.12)) + rng.normal(0, 0.02), 0, 1))
        em = em if status == "completed" else math.nan
        choice = float(np.clip(0.5 + 0.5 * em + rng.normal(0, 0.03), 0, 1)) if status == "completed" else math.nan
        row = {
            "config_id": f"{v}-r{rank}-{t}-lr{lr:.3g}",
            **{"variant": v, "rank": rank, "alpha": 2.0 * rank, "targets": t, "lr": lr, "status": status},
            "step": steps[-1],
            "curve_step": steps,
            "curve_eval_loss": losses,
            "base_eval_loss": 2.0,
            "eval_loss": losses[-1],
            "adapter_bytes": rank * dims[t] * 30 * 4 + (30 * 7 * 576 * 4 if v == "dora" else 0),
            "train_s": train_s,
            "device_s": train_s * 0.25 + golden_device_s,  # a quarter of the GPU
            "trial_s": train_s + 20.0,
            "steady_tokens_per_s": 2200 / sec_per_step,
            "smollm2_dates/exact_match": em,
            "smollm2_dates/exact_match_stderr": math.sqrt(em * (1 - em) / 300) if status == "completed" else math.nan,
            "smollm2_dates_choice/acc": choice,
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    budget = dataclasses.asdict(Budget(max_steps=max_steps, eval_every=every, grace_period=max_steps, batch_size=32))
    frame.attrs["lora_search"] = {
        "sweep": f"lora_search.replay.synthetic_grid(n={n}, seed={seed})",
        "budget": budget,
        "objective": "smollm2_dates/exact_match",
        "device": "synthetic",
        "seed": seed,
        "configurations": len(frame),
        "by_status": {k: int(v) for k, v in frame["status"].value_counts().items()},
    }
    return frame
