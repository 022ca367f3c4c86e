"""What a trial's Trainer calls back into: the report at every evaluation, steady throughput, a variant's step hook.

`Reporter` is where a trial's numbers leave the worker: at every `budget.eval_every` steps it saves the adapter
(and, DDP, the Trainer's checkpoint) and reports eval loss and cost figures to Ray Train, or straight to Tune for a
warm trial (`report`), where ASHA may stop the trial.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from lora_search import environment, strategies, variants
from lora_search.checkpoints import KEEP_CHECKPOINTS, Progress, ProgressTracker, json_safe, reports_until
from lora_search.config import Sweep
from lora_search.devices import device_name, peak_memory_bytes
from lora_search.layout import (
    LM_EVAL_RESULTS,
    PROBE_FILE,
    REPORT_FILE,
    TRAINER_DIR,
    TRAINER_FILES,
    UPLOADED_FILE,
    checkpoint_name,
)
from lora_search.probe import save_probe
from lora_search.records import GOLDEN_PREFIX, StepReport, diverged, infeasible
from lora_search.strategies import STRATEGIES, Strategy
from lora_search.variants import Adapter

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

log = logging.getLogger("lora_search.callbacks")


class StepHook(TrainerCallback):
    """Calls a variant's per-step hook after the optimizer step, while gradients still exist."""

    def __init__(self, model: PeftModel, hook: Any) -> None:
        self.model, self.hook = model, hook

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hook(self.model, state.global_step)


STEADY_AFTER_STEPS = 3
"""Steps a trial's steady-state throughput leaves out: the first ones pay CUDA/Triton kernel selection and
allocator warm-up, a one-off cost that `tokens_per_s` (the whole trial's) keeps and `steady_tokens_per_s` drops."""

PROFILED_STEPS = 2
"""Steps a kernel profile covers: the ones right after `STEADY_AFTER_STEPS`."""

PROFILE_ENV = "LORA_SEARCH_PROFILE_DIR"
"""Set (on the cluster's workers) to a directory: rank 0 of every trial writes a CUDA kernel profile of two steady
steps there, `trial_<id>_kernels.txt`, sorted by time, and `trial_<id>_idle.txt`, the gaps where the device waited
on the host named by the host's ops (`lora_search.idle`). Off unless set; for finding where a trial's step goes."""
PROFILE_TRACE_ENV = environment.PROFILE_TRACE
"""1: keep the profiled steps' Chrome trace beside the tables, `trial_<id>_trace.json` (Perfetto or chrome://tracing
open it)."""


def device_clock() -> float:
    """Seconds of work this worker's device did so far, a clock that a busy machine barely moves.

    CPU: the training thread's CPU time x torch's intra-op threads (core-seconds of its thread team): time the thread
    was not running, because another process had the core, does not count, where it would stretch wall time. The
    thread's, not the process's: a Ray worker's own threads (gRPC, metrics, the Tune session) run beside it and spin
    more on a busy machine. GPU: wall time with the device synchronised; the trial's GPUs are its own (Ray reserves
    them), so that is the time they were busy with its steps."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.thread_time() * torch.get_num_threads()


def _mark() -> Any:
    """A point on the `device_clock` that costs the step nothing: on GPU a CUDA event on the current stream (read
    later, `_elapsed`; no synchronisation between steps), on CPU the clock's value."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return device_clock()


def _elapsed(start: Any, end: Any) -> float:
    """Device seconds between two `_mark`s."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000  # milliseconds


class Throughput(TrainerCallback):
    """Steady-state tokens/s: tokens over wall seconds of training steps only, after `STEADY_AFTER_STEPS`, with the
    evaluations, saves and reports between them left out. The window is closed (device synchronised) at the end of
    each step that evaluates and reopened at the end of the next step, so eval and checkpoint time never count.

    Each steady step is also timed on its own on the `device_clock` (`device_s_per_token`): the configuration's cost is
    its tokens at the lower-quartile step's rate (`lora_search.cost.configuration_cost`): another process on the machine
    only ever adds time, and to some steps more than others, so the faster steps are the configuration's own rate.
    The evaluations between steps (`evaluated`) are timed on both clocks."""

    def __init__(self, name: str = "trial") -> None:
        self.name = name
        self.window: tuple[float, int] | None = None
        self.seconds, self.tokens = 0.0, 0
        self.step_start: Any = None
        self.step_tokens = 0
        self.steps: list[tuple[Any, Any, int]] = []
        """Each steady step's start and end marks (`_mark`) and its tokens."""
        self.eval_mark: tuple[float, float] | None = None
        self.eval_wall_s = self.eval_device_s = 0.0
        """Wall and device seconds of the eval-loss evaluations after step 0 (the base's reference eval is not the
        configuration's)."""
        self.profiler: Any = None

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def evaluated(self) -> None:
        """Called at the start of a report: the evaluation since the step's end was timed."""
        if self.eval_mark is not None:
            wall, device = self.eval_mark
            self.eval_wall_s += self._now() - wall
            self.eval_device_s += device_clock() - device
            self.eval_mark = None

    def per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @staticmethod
    def profiling() -> bool:
        return bool(os.environ.get(PROFILE_ENV))

    def device_s_per_token(self) -> float:
        """The lower-quartile steady step's device-seconds per token; NaN for a trial too short to have steady
        steps."""
        rates = sorted(_elapsed(start, end) / tokens for start, end, tokens in self.steps)
        return rates[len(rates) // 4] if rates else math.nan

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_start = _mark() if int(state.global_step) >= self.first_step() else None
        if self.profiling() and state.global_step == STEADY_AFTER_STEPS and state.is_world_process_zero:
            import torch
            from torch.profiler import ProfilerActivity, profile

            cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self.profiler = profile(activities=[ProfilerActivity.CPU, *cuda])
            self.profiler.__enter__()
            gc.callbacks.append(label_collections)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step, tokens = int(state.global_step), int(state.num_input_tokens_seen)
        if self.step_start is not None and tokens > self.step_tokens:
            self.steps.append((self.step_start, _mark(), tokens - self.step_tokens))
        self.step_start, self.step_tokens = None, tokens
        if self.profiler is not None and step == STEADY_AFTER_STEPS + PROFILED_STEPS:
            self._write_profile()
        evaluates = control.should_evaluate or step >= state.max_steps
        if self.window is not None and evaluates:
            start, start_tokens = self.window
            self.seconds += self._now() - start
            self.tokens += tokens - start_tokens
            self.window = None
        elif self.window is None and step >= self.first_step() and not evaluates:
            self.window = (self._now(), tokens)
        if evaluates:
            self.eval_mark = (self._now(), device_clock())
            if self.profiling() and state.is_world_process_zero and self.steps:
                self._write_steps()

    def first_step(self) -> int:
        """The step whose end opens the window: past the profiled steps when profiling, so they never count."""
        return STEADY_AFTER_STEPS + PROFILED_STEPS if self.profiling() else STEADY_AFTER_STEPS

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is not None:  # a trial shorter than the profiled steps: what it ran
            self._write_profile()

    def _write_steps(self) -> None:
        """Each steady step's device time so far beside the profile, `trial_<id>_steps.txt`: whether the profiled
        steps are like the rest. Written at every evaluation (a trial's last report may end its process)."""
        lines = [f"{i} {_elapsed(a, b) * 1000:.1f} ms {n} tokens" for i, (a, b, n) in enumerate(self.steps)]
        try:
            (Path(os.environ[PROFILE_ENV]) / f"{self.name}_steps.txt").write_text("\n".join(lines) + "\n")
        except OSError as e:
            log.warning("step times not written: %s", e)

    def _write_profile(self) -> None:
        self._now()
        if label_collections in gc.callbacks:
            gc.callbacks.remove(label_collections)
        self.profiler.__exit__(None, None, None)
        out = Path(os.environ[PROFILE_ENV])
        table = self.profiler.key_averages().table(sort_by="self_device_time_total", row_limit=40)
        profiler, self.profiler = self.profiler, None
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{self.name}_kernels.txt").write_text(table)
            try:
                gaps = idle_table(profiler, out / f"{self.name}_trace.json")
            except Exception as e:  # the idle table is a reading of the trace; the kernel table above stands alone
                gaps = f"idle gaps not read: {type(e).__name__}: {e}\n"
            (out / f"{self.name}_idle.txt").write_text(gaps)
        except OSError as e:  # a profile is for looking, never a reason to lose the trial
            log.warning("kernel profile not written: %s=%s: %s; set it to a writable dir", PROFILE_ENV, out, e)
            return
        log.info("kernel profile of steps %d-%d: %s", STEADY_AFTER_STEPS + 1, STEADY_AFTER_STEPS + PROFILED_STEPS, out)


GC_LABEL = "python.gc"
_collecting: list[Any] = []  # the open label of the collection running, if any


def label_collections(phase: str, info: dict[str, int]) -> None:
    """A `gc.callbacks` hook: each Python garbage collection as a profiler range, `python.gc (generation N)`, on the
    thread it ran on, so that an idle table names the gaps a collection made (`lora_search.idle`): the profiler itself
    records no Python frames, and a full collection is a pause of 100 ms and more with no op in it
    (benchmarks/NOTES.md change 29). Registered while a trial's steps are profiled."""
    import torch

    if phase == "start":
        label = torch.profiler.record_function(f"{GC_LABEL} (generation {info['generation']})")
        label.__enter__()
        _collecting.append(label)
    elif _collecting:
        _collecting.pop().__exit__(None, None, None)


def idle_table(profiler: Any, trace: Path) -> str:
    """The profiled steps' device idle gaps named by the host's ops (`lora_search.idle`), from the profiler's Chrome
    trace written to `trace`; the trace is kept only where `PROFILE_TRACE_ENV` is 1 (an 8B step's is ~100 MB)."""
    from lora_search import idle

    profiler.export_chrome_trace(str(trace))
    try:
        return idle.table(idle.load(trace))
    finally:
        if not environment.value(PROFILE_TRACE_ENV):
            trace.unlink(missing_ok=True)


class Reporter(TrainerCallback):
    """At each evaluation: save the adapter, report metrics + checkpoint to Ray Train (ASHA decides there)."""

    def __init__(
        self,
        sweep: Sweep,
        tokenizer: Any,
        adapter: Adapter,
        model: PeftModel,
        init_dir: Path,
        work: Path,
        rank0: bool,
        n_trainable: int,
        load_s: float,
        probe: list[torch.Tensor],
    ) -> None:
        self.sweep, self.tokenizer, self.adapter, self.model = sweep, tokenizer, adapter, model
        self.init_dir, self.work, self.rank0 = init_dir, work, rank0
        self.n_trainable, self.load_s, self.probe = n_trainable, load_s, probe
        self.worker_nodes = ""
        self.strategy: Strategy = STRATEGIES["ddp"]
        self.fast_path = ""
        self.gpu_in_use_at_start = 0
        self.base_eval_loss = float("nan")
        self.train_start = 0.0
        self.train_start_device = 0.0
        self.last_train_loss = float("nan")
        self.resumable = False
        self.warm = False
        self.tracker: ProgressTracker | None = None
        self.progress: Progress | None = None
        self.earlier_train_s = 0.0
        """Training seconds of earlier attempts, up to the checkpoint this one resumed from."""
        self.pending: tuple[dict[str, Any], Path | None] | None = None
        self.throughput = Throughput()
        # Cold start, in order: the worker group's start and imports (startup_s), base + adapter + data (load_s), the
        # Trainer's construction, dataset tokenisation included, and its prepare (prepare_s), the step-0 eval of the
        # base (base_eval_s). A resumed trial reports its own attempt's figures.
        self.startup_s = self.imports_s = self.prepare_s = self.base_eval_s = 0.0
        self.trainer_built = 0.0
        self.base_reused = False
        self.run_dir = Path()
        self.reports_log = Path()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_start = time.perf_counter()
        self.train_start_device = device_clock()
        self.prepare_s = self.train_start - self.trainer_built if self.trainer_built else 0.0

    def _golden_scores(self, adapter_dir: Path, bf16: bool) -> dict[str, Any]:
        """Score the live adapted model on the golden sets (lm-eval), under the trial's autocast (`bf16`,
        `fastpath.autocast`); results JSON saved beside the adapter."""
        import json

        from lora_search import evals, fastpath

        assert self.sweep.evals is not None
        start, start_device = time.perf_counter(), device_clock()
        with fastpath.inference_attention(self.model):
            evals.check_applied(self.model, self.probe[0])  # raises: a trial whose adapter does nothing gets no score
        with fastpath.autocast(self.model, bf16), fastpath.inference_attention(self.model):
            scored = evals.score(self.model, self.tokenizer, self.sweep.evals, self.sweep.seed, autocast_bf16=bf16)
        if scored is None:  # a rank other than 0 of a sharded model: it took part, rank 0 reports
            return {}
        (adapter_dir / LM_EVAL_RESULTS).write_text(json.dumps(scored["results"], indent=1))
        out = {f"{GOLDEN_PREFIX}{k}": v for k, v in scored["metrics"].items()}
        out["objective"] = scored["objective"]
        out["objective_higher_is_better"] = scored["higher_is_better"]
        out["eval_s"] = time.perf_counter() - start
        out["golden_device_s"] = (device_clock() - start_device) * self._devices_per_clock()
        return out

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        limit = self.sweep.resources.memory_limit_gb
        if limit is not None:
            peak, kind = peak_memory_bytes()
            if peak > limit * 2**30:
                raise infeasible(f"past resources.memory_limit_gb={limit:g} ({kind})", peak, state.global_step)
        if state.global_step >= state.max_steps:
            control.should_evaluate = True  # always report the final step, whatever eval_every is
        if self.rank0 and self.tracker is not None:
            self.tracker.step(int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            if not math.isfinite(self.last_train_loss):
                raise diverged("train_loss", self.last_train_loss, state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kw: Any) -> None:
        if state.global_step == 0:  # the base reference (eval_on_start); reported with every later result
            self.base_eval_loss = float(metrics["eval_loss"])
            self.base_eval_s = time.perf_counter() - self.train_start
            self.train_start, self.train_start_device = time.perf_counter(), device_clock()
            return
        self.throughput.evaluated()

        if not math.isfinite(float(metrics["eval_loss"])):
            raise diverged("eval_loss", float(metrics["eval_loss"]), int(state.global_step))
        train_s = self.earlier_train_s + time.perf_counter() - self.train_start
        resources = self.sweep.resources
        per_worker_devices = resources.gpus_per_worker if resources.gpus_per_worker > 0 else resources.cpus_per_worker
        peak, peak_kind = peak_memory_bytes()
        step = int(state.global_step)
        report = StepReport(
            step=step,
            eval_loss=float(metrics["eval_loss"]),
            base_eval_loss=self.base_eval_loss,
            train_loss=self.last_train_loss,
            trainable_params=self.n_trainable,
            train_s=train_s,
            load_s=self.load_s,
            # the rest of the cold start: see `Reporter.startup_s`, `prepare_s`, `base_eval_s`
            startup_s=self.startup_s,
            imports_s=self.imports_s,
            base_reused=self.base_reused,  # lent by this warm process's previous trial (`BaseCache`)
            prepare_s=self.prepare_s,
            base_eval_s=self.base_eval_s,
            device_s=train_s * resources.workers * per_worker_devices,
            tokens=int(state.num_input_tokens_seen),
            tokens_per_s=state.num_input_tokens_seen / train_s if train_s > 0 else 0.0,
            steady_tokens_per_s=self.throughput.per_s(),
            steady_train_device_s=self._steady_train_device_s(int(state.num_input_tokens_seen)),
            eval_device_s=self.throughput.eval_device_s * self._devices_per_clock(),
            eval_wall_s=self.throughput.eval_wall_s,
            peak_mem_bytes=peak,
            peak_mem_kind=peak_kind,
            device_name=device_name(),
            worker_nodes=self.worker_nodes,
            strategy=self.strategy.name,
            fast_path=self.fast_path,
            gpu_in_use_at_start_bytes=self.gpu_in_use_at_start,
            **progress_fields(self.progress),
        ).metrics()  # adapter_bytes and, at the last step, the golden scores are filled in below
        # A sharded strategy gathers the adapter with a collective, and a forward pass through a sharded base needs
        # every rank's shard: then every rank saves, probes and scores (each into its own scratch dir), in step.
        sharded = self.strategy.shards_base
        if self.rank0 or sharded:
            out = self.work / f"adapter_step{step}"
            state_dict = strategies.full_adapter_state_dict(self.model) if sharded else None
            report["adapter_bytes"] = variants.save(
                self.model, self.adapter, out, self.init_dir, state_dict=state_dict, sharded=sharded
            )
            save_probe(self.model, self.probe, out / PROBE_FILE)
            if step >= state.max_steps and self.sweep.evals is not None:
                report.update(self._golden_scores(out, bool(args.bf16)))
        log.info("step %d eval_loss %.4f", step, report["eval_loss"])
        self.pending = (report, out if self.rank0 or sharded else None)
        if not self.resumable:
            self._report()

    def _devices_per_clock(self) -> float:
        """Devices one second of this worker's `device_clock` stands for: its GPUs; on CPU the clock already counts
        core-seconds."""
        return self.sweep.resources.gpus_per_worker if device_name() != "cpu" else 1.0

    def _steady_train_device_s(self, tokens: int) -> float:
        """This worker's device-seconds for the `tokens` trained so far at its steady rate
        (`Throughput.device_s_per_token`): warm-up steps, evaluations, saves, waiting and other processes' load left
        out. A trial too short for steady steps counts its training so far, evaluations left out."""
        tp = self.throughput
        if tp.steps:
            seconds = tokens * tp.device_s_per_token()
        else:
            seconds = max(device_clock() - self.train_start_device - tp.eval_device_s, 0.0)
        return seconds * self._devices_per_clock()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Right after the Trainer saved its checkpoint of this step (DDP): it joins the adapter, then the report."""
        if self.pending is None:
            return
        report, out = self.pending
        if self.rank0 and out is not None:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (out / TRAINER_DIR).mkdir()
            for pattern in TRAINER_FILES:
                for f in saved.glob(pattern):
                    f.replace(out / TRAINER_DIR / f.name)
            shutil.rmtree(saved, ignore_errors=True)
        self._report()

    def _report(self) -> None:
        """Report the pending step (every rank takes part), with rank 0's checkpoint (`report`)."""
        assert self.pending is not None
        (report, out), self.pending = self.pending, None
        checkpoint = None
        if self.rank0 and out is not None:
            (out / REPORT_FILE).write_text(json.dumps(json_safe(report)))
            checkpoint = out
            if self.resumable:  # before the upload: every checkpoint a restart may resume from has its line
                with self.reports_log.open("a") as f:
                    f.write(json.dumps(json_safe(report)) + "\n")
        name = checkpoint_name(report["step"])
        report_result(report, checkpoint, name, self.run_dir, self.warm)
        if checkpoint is not None and self.resumable:
            (self.run_dir / name / UPLOADED_FILE).touch()  # report() uploaded it (synchronously)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)  # Ray copied rank 0's into the sweep's storage


def progress_fields(progress: Progress | None) -> dict[str, Any]:
    if progress is None:  # ranks > 0: rank 0's report is the one Tune sees
        return {}
    return {"restarts": progress.restarts, "steps_redone": progress.steps_redone, "prior_s": progress.prior_s}


def replay_reports(
    reports_log: Path, step: int, checkpoint: str, progress: Progress | None, run_dir: Path, warm: bool
) -> None:
    """Report every result of a resumed trial up to its checkpoint's `step` again, oldest first, the last with its
    `checkpoint` path: Tune's restored state keeps no results of a trial it reruns, and some never reached it (a
    worker whose driver died trains on for a few seconds). A repeat is not logged twice; the restored scheduler
    decides on each as it did, or would have. Solo and packed trials alike (`train.py`, `pack_trial.py`)."""
    for again in reports_until(reports_log, step):
        again.update(progress_fields(progress), replayed=True)
        if again["step"] == step:
            again["checkpoint_path"] = checkpoint
        report_result(again, None, "", run_dir, warm)


def report_result(metrics: dict[str, Any], checkpoint: Path | None, name: str, run_dir: Path, warm: bool) -> None:
    """Report one result of a trial, with rank 0's checkpoint dir (or None), stored in the run dir as `name`.

    Ray Train run: `ray.train.report` (every rank takes part; Ray uploads the checkpoint and forwards the result to
    Tune). Warm trial: the checkpoint is copied into the run dir here, the newest `KEEP_CHECKPOINTS` are kept, and
    the result goes to Tune with its `checkpoint_path`, as Ray Train's Tune callback sends it."""
    if not warm:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        return
    import ray.tune

    metrics = dict(metrics)
    if checkpoint is not None:
        target = run_dir / name
        partial = run_dir / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(checkpoint, partial)
        # Marked complete before the report: Tune may stop the trial inside `ray.tune.report` (ASHA, or its last
        # step), and a trial Tune runs again after a killed driver resumes from the newest marked checkpoint.
        (partial / UPLOADED_FILE).touch()
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # whole or absent: a killed process never leaves half a checkpoint under its name
        for old in sorted(run_dir.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        metrics["checkpoint_path"] = str(target)
    ray.tune.report(metrics)
