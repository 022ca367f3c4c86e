"""The trial's Trainer callbacks (lora_search/callbacks.py): steady throughput and the kernel profile, driven as the
Trainer drives them."""

from __future__ import annotations

import gc
import math
import time


def _steps(meter, evals_at: set[int], max_steps: int, step_s: float, eval_s: float, tokens_per_step: int) -> None:
    """Drive a `Throughput` as the Trainer does: on_step_begin, the step (a matrix product and a wait),
    on_step_end, then any evaluation."""
    from types import SimpleNamespace

    import torch

    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0, max_steps=max_steps, is_world_process_zero=True)
    for step in range(1, max_steps + 1):
        control = SimpleNamespace(should_evaluate=step in evals_at)
        meter.on_step_begin(None, state, control)
        torch.ones(16, 16) @ torch.ones(16, 16)
        time.sleep(step_s)
        state.global_step, state.num_input_tokens_seen = step, state.num_input_tokens_seen + tokens_per_step
        meter.on_step_end(None, state, control)
        if control.should_evaluate:
            time.sleep(eval_s)
    meter.on_train_end(None, state, None)


def test_steady_throughput_leaves_out_warm_up_and_evaluations(tmp_path, monkeypatch) -> None:
    from lora_search.callbacks import PROFILE_ENV, STEADY_AFTER_STEPS, Throughput

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    meter = Throughput()
    _steps(meter, {5, 10}, max_steps=10, step_s=0.02, eval_s=0.3, tokens_per_step=100)
    # windows: end of step 3 -> end of step 5 (2 steps), end of step 6 -> end of step 10 (4 steps)
    assert meter.tokens == 600
    assert 6 * 0.02 <= meter.seconds < 6 * 0.02 + 0.1  # the 0.6 s of evaluations are not in it
    assert 100 / 0.03 < meter.per_s() <= 100 / 0.02
    assert STEADY_AFTER_STEPS == 3

    too_short = Throughput()
    _steps(too_short, {3}, max_steps=3, step_s=0.0, eval_s=0.0, tokens_per_step=100)
    assert math.isnan(too_short.per_s())


def test_cost_clock_counts_work_not_waiting(monkeypatch) -> None:
    """On CPU the configuration's cost clock (`device_clock`) is the training thread's CPU time: a step that waits
    (here it sleeps; on a busy machine another process has the core) costs no more; evaluations are timed apart."""
    from lora_search.callbacks import PROFILE_ENV, Throughput

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    meter = Throughput()
    _steps(meter, {5, 8}, max_steps=8, step_s=0.05, eval_s=0.1, tokens_per_step=100)
    assert meter.seconds >= 4 * 0.05  # steps 4-5, 7-8
    assert len(meter.steps) == 5 and 0 < meter.device_s_per_token() < 0.5 * 0.05 / 100  # steps 4-8
    meter.evaluated()  # the report of the last step: its evaluation (a 0.1 s wait) was timed on both clocks
    assert meter.eval_wall_s >= 0.1 and meter.eval_device_s < 0.05
    meter.evaluated()  # nothing pending: nothing added
    assert meter.eval_wall_s < 0.2


def test_kernel_profile_is_written_and_kept_out_of_the_steady_window(tmp_path, monkeypatch) -> None:
    from lora_search.callbacks import PROFILE_ENV, Throughput

    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profiles"))
    meter = Throughput(name="trial_abc")
    _steps(meter, {8}, max_steps=8, step_s=0.01, eval_s=0.0, tokens_per_step=10)
    table = (tmp_path / "profiles" / "trial_abc_kernels.txt").read_text()
    assert "aten::mm" in table and "# of Calls" in table
    # the idle table beside it (this CPU has no device work to find gaps in); the trace is not kept by default
    assert (tmp_path / "profiles" / "trial_abc_idle.txt").read_text().startswith("no device work in the trace")
    assert not (tmp_path / "profiles" / "trial_abc_trace.json").exists()
    assert meter.tokens == 30  # window from the end of step 5 (after the profiled steps 4-5) to the end of step 8
    from lora_search.callbacks import label_collections

    assert label_collections not in gc.callbacks  # collections were labelled while profiling, and only then


def test_unwritable_profile_dir_warns_and_training_goes_on(tmp_path, monkeypatch, caplog) -> None:
    from lora_search.callbacks import PROFILE_ENV, Throughput

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(PROFILE_ENV, str(blocker / "profiles"))  # a dir under a file: mkdir fails
    meter = Throughput(name="trial_abc")
    with caplog.at_level("WARNING", logger="lora_search.callbacks"):
        _steps(meter, {8}, max_steps=8, step_s=0.0, eval_s=0.0, tokens_per_step=10)
    assert meter.tokens == 30 and meter.profiler is None
    assert PROFILE_ENV in caplog.text and "writable" in caplog.text
