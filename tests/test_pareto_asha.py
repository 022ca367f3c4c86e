"""Pareto ASHA (lora_search.pareto_asha): its rung decisions, fed made-up results as Ray's AsyncHyperBand tests do.

Run: python -m pytest tests/test_pareto_asha.py   (CPU, no Ray cluster: the scheduler's hooks are called directly)
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from types import SimpleNamespace
from typing import Any, get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_search import space
from lora_search.config import BaseModel, Budget, ConfigError, Dataset, Scheduler, Sweep
from lora_search.pareto_asha import COST_KEY, SIZE_KEY, ParetoASHA, Rungs, keeps, positions
from lora_search.resume import restorable

MB = 1_000_000


def _pareto(**kw: Any) -> Any:
    args = {"time_attr": "step", "metric": "eval_loss", "mode": "min", "max_t": 90, "grace_period": 10}
    return ParetoASHA(**{**args, "reduction_factor": 3, **kw})


def _asha(**kw: Any) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    args = {"time_attr": "step", "metric": "eval_loss", "mode": "min", "max_t": 90, "grace_period": 10}
    return ASHAScheduler(**{**args, "reduction_factor": 3, **kw})


def _result(step: int, loss: float, size: float | None = None, rate: float | None = None) -> dict[str, Any]:
    """A trial's report: eval loss, adapter bytes, and steady device-seconds at `rate` a step."""
    out: dict[str, Any] = {"step": step, "eval_loss": loss}
    if size is not None:
        out[SIZE_KEY] = size
    if rate is not None:
        out[COST_KEY] = rate * step
    return out


def _report(scheduler: Any, trial_id: str, result: dict[str, Any]) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, result)


def test_a_new_trial_that_dominates_every_stored_one_goes_on() -> None:
    """MOASHA's failure: four trials at a rung, each better than the next, then one better than all of them. Sorted
    together, the new one is first and goes on. (Syne Tune reads the order `nondominated_sort` returns, [4, 0, 1, 2,
    3], as per-trial ranks: the new trial, index 4, gets rank 3 of 5, and is stopped.)"""
    scheduler = _pareto()
    stored = [(0.25, 30 * MB, 1.5), (0.30, 40 * MB, 2.0), (0.35, 50 * MB, 2.5), (0.40, 60 * MB, 3.0)]
    for i, (loss, size, rate) in enumerate(stored):
        _report(scheduler, f"t{i}", _result(10, loss, size, rate))
    assert _report(scheduler, "new", _result(10, 0.20, 10 * MB, 1.0)) == "CONTINUE"
    assert list(positions(np.array([*stored, (0.20, 10 * MB, 1.0)]))) == [1, 2, 3, 4, 0]
    assert list(scheduler.rungs.recorded[10]) == ["t0", "t1", "t2", "t3", "new"]


RUNG = [(loss, 80 * MB, 2.0) for loss in (0.100, 0.103, 0.105, 0.107)] + [
    (loss, 40 * MB, 1.5) for loss in (0.101, 0.104, 0.106, 0.108)
]
"""Eight trials at the first rung: ranks of 80 and 40 MB adapters, at 2.0 and 1.5 device-seconds a step."""
SMALL = (0.109, 5 * MB, 1.5)
"""A rank-1 adapter, as slow a step as the 40 MB ones (the base's forward dominates), a little behind on loss."""


def _decisions(scheduler: Any, trials: list[tuple[float, float | None, float]], unit: float = 1.0) -> list[str]:
    out = []
    for i, (loss, size, rate) in enumerate(trials):
        out.append(_report(scheduler, f"t{i}", _result(10, loss, None if size is None else size * unit, rate)))
    return out


def test_bytes_in_tens_of_millions_do_not_swamp_a_loss_gap() -> None:
    """Losses near 0.1, adapters of 5-90 MB. The small adapter with the worst loss so far goes on, where Ray's ASHA on
    loss alone stops it; a trial worse than others on every axis stops. Counting bytes in MiB changes no decision."""
    trials = [*RUNG, SMALL, (0.110, 90 * MB, 2.5)]
    pareto = _decisions(_pareto(), trials)
    assert pareto[8:] == ["CONTINUE", "STOP"]
    assert _decisions(_asha(), trials)[8:] == ["STOP", "STOP"]
    assert _decisions(_pareto(), trials, unit=2.0**-20) == pareto


def test_cost_rates_within_the_tolerance_tie() -> None:
    """Trials that differ only in learning rate (same adapter, step times a few percent apart) are judged on loss,
    as Ray's ASHA judges them; a configuration far cheaper a step with a worse loss goes on."""
    stored = [(0.100, 1.00), (0.101, 1.02), (0.102, 0.99), (0.103, 1.01)]
    for new_rate, expected in ((0.98, "STOP"), (0.60, "CONTINUE")):
        scheduler = _pareto()
        for i, (loss, rate) in enumerate(stored):
            _report(scheduler, f"t{i}", _result(10, loss, 8 * MB, rate))
        assert _report(scheduler, "new", _result(10, 0.104, 8 * MB, new_rate)) == expected, new_rate


def test_an_axis_a_trial_did_not_report_is_left_out_of_its_rung() -> None:
    """The same rung, with one trial's adapter_bytes missing: the rung compares on loss and cost alone, where the small
    adapter is behind the 40 MB ones, and it stops as under Ray's ASHA."""
    unsized = [(RUNG[0][0], None, RUNG[0][2]), *RUNG[1:]]
    assert _decisions(_pareto(), [*unsized, SMALL])[8] == "STOP"
    assert _decisions(_pareto(), [*RUNG, SMALL])[8] == "CONTINUE"


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_about_one_in_reduction_factor_go_on_from_a_rung(factor: int) -> None:
    """300 trials of random loss, rank (adapter size) and step cost reach the first rung one after another: about
    1/factor go on, as under Ray's ASHA on the same stream."""
    rng = np.random.default_rng(factor)
    pareto, asha = _pareto(reduction_factor=factor), _asha(reduction_factor=factor)
    went_on = {"pareto": 0, "asha": 0}
    for i in range(300):
        size = float(rng.choice([4, 8, 16, 32]) * MB)
        result = _result(10, float(rng.normal(0.1, 0.01)), size, float(rng.uniform(0.5, 2.0)))
        went_on["pareto"] += _report(pareto, f"t{i}", result) == "CONTINUE"
        went_on["asha"] += _report(asha, f"t{i}", result) == "CONTINUE"
    fraction = went_on["pareto"] / 300
    assert abs(fraction - 1 / factor) < 0.07, went_on
    assert abs(fraction - went_on["asha"] / 300) < 0.06, went_on


def _replay_both(stream: list[tuple[int, int, float]], mode: str, size: float | None, rate: float | None) -> int:
    """Feed `stream` (trial, steps on, loss) to Ray's ASHA and to Pareto ASHA with every trial's size and step cost
    the same, and to the quality-only one (`scheduler="asha"`) with sizes and costs that differ by trial, which it
    must ignore; assert all three decide alike; return how many trials were stopped before max_t."""
    ray_asha, pareto, ours = _asha(mode=mode), _pareto(mode=mode), _pareto(mode=mode, quality_only=True)
    assert pareto.rungs.milestones == tuple(sorted(m for m, _ in ray_asha._brackets[0]._rungs))
    steps: dict[str, int] = {}
    pruned = 0
    for i, (trial, more, loss) in enumerate(stream):
        trial_id = f"t{trial}"
        if steps.get(trial_id, 0) < 0:
            continue  # stopped
        steps[trial_id] = steps.get(trial_id, 0) + more
        result = _result(steps[trial_id], loss, size, rate)
        a, b = _report(ray_asha, trial_id, result), _report(pareto, trial_id, result)
        c = _report(ours, trial_id, _result(steps[trial_id], loss, (1 + trial) * MB, 1.0 + trial))
        assert a == b == c, f"report {i} ({trial_id}, {result}): Ray's ASHA {a}, Pareto ASHA {b}, quality-only {c}"
        if a == "STOP":
            pruned += steps[trial_id] < 90
            steps[trial_id] = -1
    return pruned


def test_with_one_axis_it_decides_as_ray_asha() -> None:
    """Adapter size and step cost the same for every trial, or not reported: every decision is Ray ASHA's, over
    random streams of 40 trials reporting at uneven steps."""
    pruned = 0
    for seed in range(12):
        rng = random.Random(seed)
        stream = [(rng.randrange(40), rng.choice((5, 10, 15)), rng.random()) for _ in range(400)]
        size, rate = [(8 * MB, 1.5), (None, None), (8 * MB, None)][seed % 3]
        pruned += _replay_both(stream, "min" if seed % 2 else "max", size, rate)
    assert pruned > 50  # the streams reach the rungs, and both stop trials there


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from((5, 10, 20, 30)), st.sampled_from((0.1, 0.2, 0.2, 0.3, 0.5))),
        max_size=80,
    ),
    st.sampled_from(("min", "max")),
)
def test_with_one_axis_it_decides_as_ray_asha_on_tied_losses(stream: list[tuple[int, int, float]], mode: str) -> None:
    """The same, for streams Hypothesis draws: few trials and few loss values, so losses tie with Ray's cutoff."""
    _replay_both(stream, mode, 8 * MB, 2.0)


POINT = st.tuples(
    st.floats(0.01, 10.0),
    st.one_of(st.none(), st.integers(1, 10**8).map(float)),
    st.one_of(st.none(), st.floats(0.01, 100.0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(POINT, max_size=25), st.data(), st.sampled_from((2, 3, 4)))
def test_a_trial_that_dominates_its_rung_is_never_stopped(earlier: list, data: Any, factor: int) -> None:
    """Whatever came before at the rung (sizes or costs unreported included), a trial no worse than each of them on
    every axis they report goes on; so does it with the earlier trials in any order."""
    best = [min((p[a] for p in earlier if p[a] is not None), default=1.0) for a in range(3)]
    new = tuple(b * data.draw(st.sampled_from((0.5, 1.0))) for b in best)
    assert keeps(earlier, new, factor)
    assert keeps(data.draw(st.permutations(earlier)), new, factor)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.05, 0.2), st.integers(1, 64), st.floats(0.5, 4.0)), min_size=1, max_size=20),
    st.tuples(st.floats(0.05, 0.2), st.integers(1, 64), st.floats(0.5, 4.0)),
    st.tuples(st.integers(-30, 30), st.integers(-30, 30), st.integers(-30, 30)),
)
def test_no_unit_swamps_another(earlier: list, new: tuple, exponents: tuple) -> None:
    """Each axis is normalised over its rung: the decisions and the ordering are the same whatever unit each axis is
    counted in (powers of two, which floating point scales exactly: bytes or MiB, seconds or 1024ths of them)."""
    scale = np.array([2.0**e for e in exponents])
    points = [(loss, rank * 2**20 * 1.0, rate) for loss, rank, rate in earlier]
    at = (new[0], new[1] * 2**20 * 1.0, new[2])
    rescaled = [tuple(np.array(p) * scale) for p in points]
    assert keeps(points, at, 3) == keeps(rescaled, tuple(np.array(at) * scale), 3)
    assert list(positions(np.array([*points, at]))) == list(positions(np.array([*rescaled, np.array(at) * scale])))


def test_state_survives_a_killed_driver(tmp_path) -> None:
    """The state file holds the rungs and stops after every result. A scheduler built afresh on it (the resumed
    driver's) decides the rest of the stream as the one that never died; a trial stopped at a rung before the driver
    died replays its reports and stops at that step again; one that ended at max_t stops at max_t."""
    state = tmp_path / "asha_state.json"
    rng = random.Random(7)
    stream = [
        (f"t{rng.randrange(12)}", rng.random(), 30 * rng.randrange(1, 4) * MB, rng.uniform(1, 3)) for _ in range(60)
    ]
    before = _pareto(max_t=30, grace_period=10, reduction_factor=2, state_file=state)
    steps: dict[str, int] = {}

    def feed(scheduler: Any, reports: list) -> list[str]:
        out = []
        for trial_id, loss, size, rate in reports:
            if steps.get(trial_id, 0) >= 0:
                steps[trial_id] = steps.get(trial_id, 0) + 10
                out.append(_report(scheduler, trial_id, _result(steps[trial_id], loss, size, rate)))
                if out[-1] == "STOP":
                    steps[trial_id] = -steps[trial_id]
        return out

    feed(before, stream[:30])
    saved = json.loads(state.read_text())
    assert Rungs.from_json(saved) == before.rungs and saved["stopped"] == before.rungs.stopped
    pruned = {t: -s for t, s in steps.items() if -30 < s < 0}
    done = {t for t, s in steps.items() if s == -30}
    assert pruned and done, steps

    resumed = tmp_path / "resumed.json"
    shutil.copy(state, resumed)  # the file as the driver left it (the one that never died goes on writing its own)
    after = _pareto(max_t=30, grace_period=10, reduction_factor=2, state_file=resumed)
    resumed_steps = dict(steps)
    survivor = pickle.loads(pickle.dumps(before))  # as Tune pickles the scheduler with the Tuner: the same class
    assert type(survivor) is type(before) and survivor.rungs == before.rungs
    rest_before = feed(before, stream[30:])
    steps.clear()
    steps.update(resumed_steps)
    assert feed(after, stream[30:]) == rest_before
    assert after.rungs == before.rungs

    replayed = _pareto(max_t=30, grace_period=10, reduction_factor=2, state_file=state)
    for trial_id, stopped_at in pruned.items():
        replay = [_report(replayed, trial_id, _result(s, 9.0, MB, 1.0)) for s in (5, 10, 20, 30)]
        assert replay == ["CONTINUE" if s < stopped_at else "STOP" for s in (5, 10, 20, 30)], trial_id
    for trial_id in done:
        assert [_report(replayed, trial_id, _result(s, 9.0, MB, 1.0)) for s in (20, 30)] == ["CONTINUE", "STOP"]


def test_a_state_file_not_its_own_is_refused(tmp_path) -> None:
    state = tmp_path / "asha_state.json"
    state.write_text(json.dumps({"rungs": [[{}, {}]], "stopped": {}}))  # Ray ASHA's, through resume.restorable
    with pytest.raises(ValueError, match="changed its scheduler or budget.*--fresh"):
        _report(_pareto(state_file=state), "t0", _result(10, 0.1))


def _sweep(**fields: Any) -> Sweep:
    budget = Budget(max_steps=200, eval_every=25, grace_period=50, reduction_factor=3)
    return Sweep(name="s", base=BaseModel("m"), dataset=Dataset("d.jsonl"), budget=budget, **fields)


def test_the_sweep_chooses_its_scheduler(tmp_path) -> None:
    """`Sweep(scheduler=...)`: every value builds a Tune scheduler with the sweep's rungs; both resume through their
    own state file; a name not in the table is a problem naming the field and the choices."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    assert set(space.SCHEDULERS) == set(get_args(Scheduler))
    assert _sweep().scheduler == "pareto-asha" and _sweep(scheduler="asha").problems() == []
    for name in space.SCHEDULERS:
        assert isinstance(space.scheduler(_sweep(scheduler=name)), TrialScheduler)
    pareto = space.scheduler(_sweep(scheduler="pareto-asha"))
    assert isinstance(pareto, ParetoASHA) and list(pareto.rungs.milestones) == space.rungs(_sweep())
    state = tmp_path / "asha_state.json"
    assert restorable(pareto, state) is pareto and pareto.state_file == state
    asha = restorable(space.scheduler(_sweep(scheduler="asha")), state)
    assert isinstance(asha, ParetoASHA) and asha.quality_only and asha.state_file == state
    assert list(asha.rungs.milestones) == space.rungs(_sweep())
    with pytest.raises(TypeError, match="keeps no state across a resume"):  # Ray's own: no private internals edited
        restorable(ASHAScheduler(time_attr="step", max_t=200, grace_period=50, reduction_factor=3), state)

    with pytest.raises(ConfigError) as error:
        _sweep(scheduler="moasha")
    [problem] = error.value.problems
    assert problem.field == "scheduler" and problem.value == "moasha"
    assert "'asha', 'pareto-asha'" in problem.message
