"""Replay a sweep's scheduler and searcher over a recorded grid (a tabular benchmark): no training, a simulated clock.

    grid = grids.load_grid("benchmarks/grid_smollm2_h200_2026-12-05.parquet", grace_period=50, reduction_factor=3)
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

`benchmarks/replay_measure.py` compares schedulers and searchers with it; the grid itself (loading, checking, a
synthetic one) is `lora_search.grids`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lora_search.config import BaseModel, Budget, Dataset, Scheduler, Sweep
from lora_search.grids import PARAMS, Configuration, Grid
from lora_search.records import StepReport

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler


class UnsupportedScheduler(ValueError):
    """A scheduler whose decisions the replay cannot follow (PAUSE: PBT, synchronous HyperBand)."""


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
    """ASHA on eval loss (Ray's ASHA's decisions) at the grid's rungs, built by `space.scheduler` itself
    (`Sweep(scheduler="asha")`)."""
    from lora_search import space

    return space.scheduler(_budget_sweep(grid.budget, "asha"))


def pareto_asha(grid: Grid) -> TrialScheduler:
    """`lora_search.pareto_asha` (a sweep's default scheduler) at the grid's rungs, built by `space.scheduler`."""
    from lora_search import space

    return space.scheduler(_budget_sweep(grid.budget, "pareto-asha"))


def rungs(grid: Grid) -> list[int]:
    """The steps ASHA decides at (`space.rungs`)."""
    from lora_search import space

    return space.rungs(_budget_sweep(grid.budget))


def _budget_sweep(budget: Budget, scheduler: Scheduler = "asha") -> Sweep:
    # space.scheduler and space.rungs read a sweep's budget and scheduler only; the rest is a placeholder that is
    # never loaded.
    return Sweep(
        name="replay", base=BaseModel("replay"), dataset=Dataset("replay.jsonl"), budget=budget, scheduler=scheduler
    )


def _fifo(grid: Grid) -> TrialScheduler:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


SCHEDULERS: dict[str, Callable[[Grid], TrialScheduler]] = {"fifo": _fifo, "asha": asha, "pareto-asha": pareto_asha}
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
