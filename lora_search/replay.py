"""Replay a sweep's scheduler and searcher over a recorded grid (a tabular benchmark): no training, a simulated clock.

    grid = replay.load_grid("benchmarks/grid_smollm2_h200_2026-12-05.parquet", grace_period=50, reduction_factor=3)
    run = replay.simulate(grid, searcher="random", scheduler="asha", workers=4, seed=0)
    run.hypervolume / run.grid_hypervolume, run.compute / run.grid_compute, run.trajectory

The grid (benchmarks/grid.py `table`) trained every configuration to the full budget and kept its eval loss at every
eval-every step. A replayed trial "trains" its configuration by reporting those recorded losses, one at each curve
step, at the simulated time its recorded seconds a step imply (`train_s` / last step on the clock, `device_s` / last
step as the compute spent). Each report goes to a real Ray Tune scheduler, driven as Tune's controller drives it
(`on_trial_add`, `on_trial_result`, `on_trial_complete` / `on_trial_error`), with the keys a real trial reports
(`records.StepReport`); on STOP the trial reports nothing more. A completed trial then has its recorded golden
objective, adapter bytes and cost, and the frontier of those (`lora_search.pareto`) is measured against the frontier
of every completed configuration of the grid. Deterministic for a seed.

Two simplifications: a configuration's device-seconds (golden scoring included) accrue evenly over its steps, so a
pruned trial pays its share of them; and the hypervolume's reference is the grid's own worst completed values pushed
10% out (`Grid.reference`), not the sweep's base model, whose golden score the table does not hold: ratios compare
replays of one grid, not a replay with a sweep's report.

`benchmarks/replay_measure.py` compares schedulers and searchers with it; `synthetic_grid` writes a made-up table in
the same format for tests and for trying the measurement before a GPU has recorded one.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lora_search import pareto
from lora_search.config import BaseModel, Budget, Dataset, Sweep
from lora_search.records import StepReport

if TYPE_CHECKING:
    import pandas as pd
    from ray.tune.schedulers import TrialScheduler

PARAMS = ("variant", "rank", "alpha", "targets", "lr")
"""The searched hyperparameters a grid row records (`records.PARAMS` less dropout, which the grid does not vary)."""
REQUIRED = ("config_id", *PARAMS, "status", "curve_step", "curve_eval_loss", "adapter_bytes", "train_s", "device_s")


class UnsupportedScheduler(ValueError):
    """A scheduler whose decisions the replay cannot follow (PAUSE: PBT, synchronous HyperBand)."""


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


def load_grid(path: str | Path, *, grace_period: int | None = None, reduction_factor: int | None = None) -> Grid:
    """The table benchmarks/grid.py writes, checked. The grid records a budget whose grace period is max_steps (it
    prunes nothing); `grace_period` and `reduction_factor` set the rungs ASHA replays (sweeps/smollm2.py: 50, 3).

    Raises GridError naming every missing column and every row that cannot be replayed."""
    import pandas as pd

    frame = pd.read_parquet(path)
    meta = frame.attrs.get("lora_search") or _sidecar(Path(path))
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


@dataclass(frozen=True)
class ReplayTrial:
    trial_id: str
    config_id: str
    params: dict[str, Any]
    status: str
    """"completed", "pruned" (the scheduler stopped it), or the configuration's own early end."""
    step: int
    device_s: float
    """Compute it spent: the configuration's device-seconds a step x the steps it ran."""
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Replay:
    searcher: str
    scheduler: str
    workers: int
    seed: int
    trials: tuple[ReplayTrial, ...]
    compute: float
    """Device-seconds spent, every trial's steps run."""
    grid_compute: float
    wall_s: float
    """Simulated seconds until the last trial ended."""
    frontier: tuple[str, ...]
    """config_ids of the completed trials on the frontier found."""
    hypervolume: float
    grid_hypervolume: float
    trajectory: tuple[tuple[float, float], ...]
    """(device-seconds spent so far, hypervolume found so far), from (0, 0) and at every completion that moved the
    frontier; the compute counts every running trial's progress at that moment."""

    def compute_to_hv(self, fraction: float) -> float:
        """Compute spent, as a fraction of the grid's, when the hypervolume found first reached `fraction` of the
        grid's; inf when it never did."""
        target = fraction * self.grid_hypervolume * (1 - 1e-12)  # 1.0 must match the grid's own rounding
        return next((c / self.grid_compute for c, hv in self.trajectory if hv >= target), math.inf)

    def hv_at_compute(self, fraction: float) -> float:
        """Hypervolume found, as a fraction of the grid's, once `fraction` of the grid's compute was spent."""
        budget = fraction * self.grid_compute * (1 + 1e-12)  # 1.0: the grid's compute, summed in another order
        return max(hv for c, hv in self.trajectory if c <= budget) / self.grid_hypervolume


class Searcher(Protocol):
    def suggest(self) -> str | None:
        """The config_id to try next; None when there is nothing left to try."""
        ...

    def observe(self, trial: ReplayTrial) -> None:
        """How a suggested configuration's trial ended."""
        ...


class RandomSearch:
    """Every configuration once, in a seeded random order (what a grid run in random order does)."""

    def __init__(self, grid: Grid, seed: int) -> None:
        ids = [c.config_id for c in grid.configurations]
        self._order = iter([ids[i] for i in np.random.default_rng(seed).permutation(len(ids))])

    def suggest(self) -> str | None:
        return next(self._order, None)

    def observe(self, trial: ReplayTrial) -> None:
        pass


class OptunaSearch:
    """Optuna's ask/tell over the grid's values of each hyperparameter: TPE on the objective, or NSGA-II on
    (objective, adapter bytes, cost). A completed trial is told its golden objective (and bytes and cost), a pruned
    one is told PRUNED, one that ended early FAIL.

    A configuration is trained once. When the sampler proposes one already tried, it is told what that one got (at
    no compute; FAIL for one still running or a combination the grid lacks), and the untried configuration nearest
    its proposal is enqueued and trained instead: nearest by the steps between their values of each hyperparameter
    (rank, alpha and lr in the grid's own order; variant and targets 0 or 1), ties in a seeded order. Asking again
    until the sampler proposes an untried one would cost thousands of asks on a grid of 120 (TPE keeps coming back
    to its favourites) and seconds a replay."""

    def __init__(self, grid: Grid, seed: int, multi_objective: bool) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        quality = "maximize" if grid.higher_is_better else "minimize"
        if multi_objective:
            sampler: Any = optuna.samplers.NSGAIISampler(seed=seed)
            self._study = optuna.create_study(directions=[quality, "minimize", "minimize"], sampler=sampler)
        else:
            self._study = optuna.create_study(direction=quality, sampler=optuna.samplers.TPESampler(seed=seed))
        self._multi = multi_objective
        self._grid = grid
        self._choices = {k: sorted({c.params[k] for c in grid.configurations}) for k in PARAMS}
        self._ids = {tuple(c.params[k] for k in PARAMS): c.config_id for c in grid.configurations}
        ids = [c.config_id for c in grid.configurations]
        self._order = {ids[i]: n for n, i in enumerate(np.random.default_rng(seed).permutation(len(ids)))}
        self._untried = set(ids)
        self._asked: dict[str, Any] = {}
        self._told: dict[str, tuple[Any, Any]] = {}  # config_id -> (values, state)

    def suggest(self) -> str | None:
        from optuna.trial import TrialState

        if not self._untried:
            return None
        trial = self._study.ask()
        proposal = {k: trial.suggest_categorical(k, self._choices[k]) for k in PARAMS}
        config_id = self._ids.get(tuple(proposal.values()))
        if config_id in self._untried:
            return self._take(config_id, trial)
        values, state = self._told.get(config_id or "", (None, TrialState.FAIL))
        self._study.tell(trial, values, state=state)
        nearest = min(self._untried, key=lambda i: (self._distance(proposal, i), self._order[i]))
        self._study.enqueue_trial(self._grid.by_id[nearest].params)
        trial = self._study.ask()
        for k in PARAMS:
            trial.suggest_categorical(k, self._choices[k])
        return self._take(nearest, trial)

    def _distance(self, proposal: dict[str, Any], config_id: str) -> int:
        params = self._grid.by_id[config_id].params
        ordered = ("rank", "alpha", "lr")
        return sum(
            abs(self._choices[k].index(proposal[k]) - self._choices[k].index(params[k]))
            if k in ordered
            else int(proposal[k] != params[k])
            for k in PARAMS
        )

    def _take(self, config_id: str, trial: Any) -> str:
        self._untried.discard(config_id)
        self._asked[config_id] = trial
        return config_id

    def observe(self, trial: ReplayTrial) -> None:
        from optuna.trial import TrialState

        c = self._grid.by_id[trial.config_id]
        values: Any = None
        if trial.status == "completed" and math.isfinite(c.objective):
            values = [c.objective, c.adapter_bytes, c.device_s] if self._multi else c.objective
            state = TrialState.COMPLETE
        else:
            state = TrialState.PRUNED if trial.status == "pruned" else TrialState.FAIL
        self._told[trial.config_id] = (values, state)
        self._study.tell(self._asked.pop(trial.config_id), values, state=state)


SEARCHERS: dict[str, Callable[[Grid, int], Searcher]] = {
    "random": RandomSearch,
    "tpe": lambda grid, seed: OptunaSearch(grid, seed, multi_objective=False),
    "nsga2": lambda grid, seed: OptunaSearch(grid, seed, multi_objective=True),
}


def asha(grid: Grid) -> TrialScheduler:
    """Ray's ASHA on eval loss at the grid's rungs, built by `space.scheduler` itself."""
    from lora_search import space

    return space.scheduler(_budget_sweep(grid.budget))


def rungs(grid: Grid) -> list[int]:
    """The steps ASHA decides at (`space.rungs`)."""
    from lora_search import space

    return space.rungs(_budget_sweep(grid.budget))


def _budget_sweep(budget: Budget) -> Sweep:
    # space.scheduler and space.rungs read a sweep's budget only; the rest is a placeholder that is never loaded.
    return Sweep(name="replay", base=BaseModel("replay"), dataset=Dataset("replay.jsonl"), budget=budget)


def _fifo(grid: Grid) -> TrialScheduler:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


SCHEDULERS: dict[str, Callable[[Grid], TrialScheduler]] = {"fifo": _fifo, "asha": asha}
"""By name; `simulate` also takes any fresh TrialScheduler (one replay's state must not leak into the next)."""


def simulate(
    grid: Grid,
    searcher: str | Searcher = "random",
    scheduler: str | TrialScheduler = "fifo",
    workers: int = 1,
    seed: int = 0,
) -> Replay:
    """Replay `searcher` (a SEARCHERS name, seeded with `seed`, or a Searcher) and `scheduler` (a SCHEDULERS name
    or a fresh TrialScheduler) over `grid` with `workers` trials at a time, until the searcher has nothing left.

    Raises UnsupportedScheduler for a scheduler that answers PAUSE (PBT, synchronous HyperBand)."""
    search = SEARCHERS[searcher](grid, seed) if isinstance(searcher, str) else searcher
    sched = SCHEDULERS[scheduler](grid) if isinstance(scheduler, str) else scheduler
    sched.set_search_properties("eval_loss", "min")  # what tune.TuneConfig(metric=, mode=) does in lora_search.sweep
    outer = np.random.get_state()
    np.random.seed(seed)  # ASHA draws each trial's bracket from numpy's global generator
    try:
        loop = _Loop(grid, search, sched)
        loop.run(workers)
    finally:
        np.random.set_state(outer)
    found = grid.scored([grid.by_id[t.config_id] for t in loop.trials if t.status == "completed"])
    front = grid.frontier(found)
    return Replay(
        searcher=searcher if isinstance(searcher, str) else type(searcher).__name__,
        scheduler=scheduler if isinstance(scheduler, str) else type(scheduler).__name__,
        workers=workers,
        seed=seed,
        trials=tuple(loop.trials),
        compute=loop.spent,
        grid_compute=grid.compute,
        wall_s=loop.now,
        frontier=tuple(c.config_id for c, on in zip(found, front.mask, strict=True) if on),
        hypervolume=float(front.hypervolume),
        grid_hypervolume=grid.hypervolume,
        trajectory=tuple(loop.trajectory),
    )


@dataclass
class _Trial:
    """What Tune's schedulers read of a trial (Ray's ASHA: trial_id; FIFO: nothing; others: config, status)."""

    trial_id: str
    config: dict[str, Any]
    status: str = "PENDING"
    last_result: dict[str, Any] = field(default_factory=dict)

    def is_finished(self) -> bool:
        return self.status in ("TERMINATED", "ERROR")

    def __str__(self) -> str:
        return self.trial_id


@dataclass
class _Running:
    trial: _Trial
    config: Configuration
    start: float
    index: int = 0  # the next report, into config.steps

    def seconds_at(self, step: int) -> float:
        return self.start + step * self.config.train_s / self.config.last_step

    def spent(self, now: float) -> float:
        """Device-seconds spent by `now`, training going on between reports."""
        c = self.config
        if not c.steps:
            return c.device_s
        done = min(max(now - self.start, 0.0) / c.train_s, 1.0)
        return done * c.device_s


class _Loop:
    """The event loop: (time, order) -> the running trial whose next report falls then."""

    def __init__(self, grid: Grid, searcher: Searcher, scheduler: TrialScheduler) -> None:
        self.grid, self.searcher, self.scheduler = grid, searcher, scheduler
        self.events: list[tuple[float, int, _Running]] = []
        self.running: list[_Running] = []
        self.trials: list[ReplayTrial] = []
        self.spent = 0.0  # by the trials that ended
        self.now = 0.0
        self.started = 0
        self.pushed = 0  # orders reports that fall at the same second: the order they were scheduled in
        self.front: list[Configuration] = []
        self.trajectory: list[tuple[float, float]] = [(0.0, 0.0)]

    def get_trials(self) -> list[_Trial]:  # the controller's view some schedulers read
        return [r.trial for r in self.running]

    def get_live_trials(self) -> list[_Trial]:
        return self.get_trials()

    def run(self, workers: int) -> None:
        free = workers
        while True:
            while free and self.start():
                free -= 1
            if not self.events:
                return
            self.now, _, running = heapq.heappop(self.events)
            free += self.report(running)

    def start(self) -> bool:
        config_id = self.searcher.suggest()
        if config_id is None:
            return False
        c = self.grid.by_id[config_id]
        trial = _Trial(f"{self.started:05d}", dict(c.params))
        self.started += 1
        self.scheduler.on_trial_add(self, trial)  # type: ignore[arg-type]  # the controller's two methods suffice
        trial.status = "RUNNING"
        running = _Running(trial, c, self.now)
        self.running.append(running)
        self._push(running.seconds_at(c.steps[0]) if c.steps else self.now, running)
        return True

    def _push(self, at: float, running: _Running) -> None:
        self.pushed += 1
        heapq.heappush(self.events, (at, self.pushed, running))

    def report(self, running: _Running) -> bool:
        """The running trial's next report; True when the trial has ended."""
        from ray.tune.schedulers import TrialScheduler

        c, trial, i = running.config, running.trial, running.index
        if not c.steps:  # it ended before its first eval
            return self.end(running, c.status, 0)
        last = i == len(c.steps) - 1
        trial.last_result = result = self.result(running, i, last)
        decision = self.scheduler.on_trial_result(self, trial, result)  # type: ignore[arg-type]
        if last and c.status == "completed":
            self.scheduler.on_trial_complete(self, trial, result)  # type: ignore[arg-type]
            return self.end(running, "completed", c.steps[i])
        if last:
            self.scheduler.on_trial_error(self, trial)  # type: ignore[arg-type]
            return self.end(running, c.status, c.steps[i])
        if decision == TrialScheduler.STOP:  # Tune's stop_trial: the scheduler hears on_trial_complete
            self.scheduler.on_trial_complete(self, trial, result)  # type: ignore[arg-type]
            return self.end(running, "pruned", c.steps[i])
        if decision != TrialScheduler.CONTINUE:
            raise UnsupportedScheduler(
                f"{type(self.scheduler).__name__} answered {decision!r}; the replay follows CONTINUE and STOP only "
                "(ASHA-like schedulers): replay a scheduler that never pauses a trial"
            )
        running.index += 1
        self._push(running.seconds_at(c.steps[i + 1]), running)
        return False

    def result(self, running: _Running, i: int, last: bool) -> dict[str, Any]:
        """What a real trial reports at this eval (callbacks.Reporter.on_evaluate), plus Tune's own keys."""
        c = running.config
        step = c.steps[i]
        scored = last and c.status == "completed"
        report = StepReport(
            step=step,
            eval_loss=c.losses[i],
            base_eval_loss=c.base_eval_loss,
            train_s=step * c.train_s / c.last_step,
            device_s=step * c.device_s / c.last_step,
            steady_train_device_s=step * c.device_s / c.last_step,
            steady_tokens_per_s=c.steady_tokens_per_s,
            adapter_bytes=c.adapter_bytes,
            objective=c.objective if scored else math.nan,
            objective_higher_is_better=self.grid.higher_is_better,
            scores=c.scores if scored else {},
        ).metrics()
        tune_keys = {"trial_id": running.trial.trial_id, "training_iteration": i + 1, "done": last}
        return {**report, **tune_keys, "time_total_s": self.now - running.start, "config": running.trial.config}

    def end(self, running: _Running, status: str, step: int) -> bool:
        c = running.config
        spent = c.device_s * step / c.last_step if c.last_step else c.device_s
        running.trial.status = "TERMINATED" if status in ("completed", "pruned") else "ERROR"
        self.running.remove(running)
        self.spent += spent
        trial = ReplayTrial(running.trial.trial_id, c.config_id, c.params, status, step, spent, running.start, self.now)
        self.trials.append(trial)
        self.searcher.observe(trial)
        if status == "completed" and self.grid.scored([c]):
            front = self.grid.frontier([*self.front, c])
            if front.hypervolume > self.trajectory[-1][1]:
                self.front = [f for f, on in zip(self.grid.scored([*self.front, c]), front.mask, strict=True) if on]
                compute = self.spent + sum(r.spent(self.now) for r in self.running)
                self.trajectory.append((compute, float(front.hypervolume)))
        return True


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
