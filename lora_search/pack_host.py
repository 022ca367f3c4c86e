"""Packed trials in a sweep: one `PackHost` actor per device holds the base once (`lora_search.pack.Pack`), and each
packed configuration is still an ordinary Tune trial that attaches its adapter to a host and trains through it
(`lora_search.pack_trial`, in the trial's own process).

Turned on by `Resources(pack=N)` with N > 1: a trial whose variant packs (`pack.packs`) runs
`pack_trial.run_packed_trial` (from `lora_search.trial.run_trial`) in a small CPU-only Tune process
(`trial_resources`); the others train solo as before. A host (`start_host`) loads its base in the background and
answers at once whether it has room, so the hosts that a sweep's trials start load side by side. The trial finds a
host with room (`host_for`), attaches its adapter (`PackHost.attach`), sends its rows for each step
(`PackHost.step`), asks for its eval loss, its saved adapter and, at its last step, its golden scores, and detaches.
A trial Tune stops leaves in its `finally` (`PackHost.detach`); one whose process was killed is detached after
`STALE_S` without a step.

A host holds its device (its Ray GPU) while it lives. Where the sweep also has variants that train solo, a host left
without trials for `IDLE_S` leaves (journal "leave"), so that the solo trials waiting for that device get it (on one
GPU they would wait for ever); the next packed trial starts a host again.

The host runs a step once every adapter that took part in the previous step has sent its batch, or `GATHER_S` after the
first batch came (the late ones sit that step out); an adapter whose trial is reporting (after `save`) is not waited
for. A trial sends each batch with its step number and, between two reports, sends the next step's batch before the
answer to this one comes (`pack_trial`): the host finds it queued when the step ends and runs the next step at once,
instead of waiting for every trial's answer, its Python and its next request to come round. A step's wall time is
split over its adapters by their real tokens: that is each packed trial's device-seconds.
Every load, attach (with `resumed_from`: the step a resumed trial's checkpoint holds) and detach is a line in the host's
journal, `<sweep>/ray/pack_host_<i>.jsonl`.

Golden sets: the host scores a packed trial that trains its whole budget (`PackHost.golden`: the trial's process has
no base, the host has the base and the device), with `evals.score` on a PEFT model of the saved adapter. While a host
scores, the other adapters' steps wait.

A step holds each trial's batch_size x grad_accum rows. At its load a host decides, for a full pack of the sweep's
most demanding packable shape and as a solo trial decides for itself (`memory.pack_host_fit`; the "load" line says
which and why): whether its base's layers recompute their activations in the backward, and in how many micro-batches
a step runs, the fewest n dividing grad_accum that fit: each 1/n of every adapter's rows, the gradients summed
to the one-micro-batch step's (`Pack.step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lora_search import environment
from lora_search.config import Sweep
from lora_search.records import TrialParams

log = logging.getLogger("lora_search.pack_host")

GATHER_S = 0.5
"""How long a step waits for adapters of the previous step that have not sent their batch (at an eval, say), and for
a newly attached adapter's first batch (its trial runs its step-0 eval first): without that wait, a trial that
attached while another was stepping trailed it by a step or more, and on a small base (steps of milliseconds) the
two never shared a step."""
STALE_S = 60.0
"""An adapter that sent nothing for this long is detached: its trial was stopped and its process killed."""


IDLE_S = environment.PACK_IDLE_S
"""(The variable, read in the host's process as it starts: `lora_search.preflight` checks the driver's value first.)
A host with no trial attached for this long leaves, giving its device back, when the sweep has variants that train
solo: on a one-GPU machine they wait for the device the host holds (its Ray GPU), and would wait for ever. The next
packed trial starts a new host (one base load more). Long enough for ASHA's next trial to tokenize and attach; where
a base loads slowly, set LORA_SEARCH_PACK_IDLE_S (seconds) on the cluster's nodes."""
DETACH_S = 30.0
"""How long a trial waits for its host to detach it (a host scoring another trial's golden sets holds its lock for
minutes); past that the host detaches it after `STALE_S` anyway."""
PACKED_TRIAL_CPU = 0.1
"""What a packed trial's own process reserves: it tokenizes and waits on its host, which holds the device."""


def packed(sweep: Sweep, variant: str) -> bool:
    """Whether a trial of `variant` trains in a pack in this sweep."""
    if sweep.resources.pack <= 1:
        return False
    from lora_search.pack import packs

    return packs(variant) is True


def solo_reasons(sweep: Sweep) -> dict[str, str]:
    """Variant -> why it trains solo, for the sweep's variants that do not pack (empty when packing is off)."""
    if sweep.resources.pack <= 1:
        return {}
    from lora_search.pack import packs

    return {v: why for v in sweep.space.variants if (why := packs(v)) is not True}


def trial_resources(sweep: Sweep, variant: str, solo: dict[str, float]) -> dict[str, float]:
    """What a trial of `variant` reserves: a packed one a little CPU (its host holds the device), others `solo`."""
    return {"CPU": PACKED_TRIAL_CPU} if packed(sweep, variant) else solo


NAMESPACE = "lora_search"
"""Ray namespace of the hosts: the same for every driver, so a resumed sweep's trials find the hosts its first driver
started (on a cluster that outlived it) instead of loading the base again beside them."""


def host_name(sweep: Sweep, index: int) -> str:
    return f"lora_search-pack-{sweep.name}-{index}"


def host_cpus(sweep: Sweep, trials: int) -> float:
    """CPUs a pack host takes with `trials` packed trials beside it: its own `cpus_per_worker`, and
    `PACKED_TRIAL_CPU` for each trial's process."""
    return sweep.resources.cpus_per_worker + trials * PACKED_TRIAL_CPU


def hosts(sweep: Sweep, cluster: dict[str, float]) -> int:
    """Hosts the cluster holds at most: one per device a trial would get, and no more than its CPUs place with their
    trials (a host reserves `cpus_per_worker`, each of its `pack` trials `PACKED_TRIAL_CPU`). A host beyond that
    could not be placed, and the trials attaching to it would wait for it for ever; with the count right, a trial
    that finds every placeable host full fails with `host_for`'s error instead (seen on a 2-CPU machine: two hosts
    of 1 CPU and 2 trials each, the second host pending while its two trials waited, the sweep never ending)."""
    r = sweep.resources
    by_cpu = math.floor(cluster.get("CPU", 0) / host_cpus(sweep, r.pack) + 1e-9)
    by_device = math.floor(cluster.get("GPU", 0) / r.gpus_per_worker + 1e-9) if r.gpus_per_worker > 0 else by_cpu
    return max(1, min(by_device, by_cpu))


def journal(storage_path: str | Path, index: int) -> Path:
    return Path(storage_path) / f"pack_host_{index}.jsonl"


class PackHost:
    """The pack of one device, as a threaded Ray actor (`host_for` creates it). Each method is called by a packed
    trial; `step` blocks until the step its batch went into has run."""

    def __init__(
        self,
        sweep: Sweep,
        journal_path: str,
        stale_s: float = STALE_S,
        idle_s: float | None = None,
        requested_at: float | None = None,
        started_by: str = "trial",
    ) -> None:
        """Returns at once: the base loads in a thread of its own (`_load`), so the host answers `attach` from the
        start. A trial that finds its place waits for the base there, and one that finds the host full hears so at
        once and starts the next host, whose base then loads beside this one's (session 17's sweep: with the
        answer only after the load, a sweep's 4 hosts started one after another, 24 s apart)."""
        self.sweep = sweep
        self.journal = Path(journal_path)
        self.requested_at = requested_at
        """When `start_host` asked Ray for this actor (time.time()): the "load" line says how long the actor took to
        start, apart from its imports and its base's load."""
        self.created_at = time.time()
        self.started_by = started_by
        """"sweep": the driver started it before Tune's first trials (`start_hosts`); "trial": a trial found none."""
        self.stale_s = stale_s
        self.cond = threading.Condition()
        self.turns = threading.Lock()
        self.callers = 0
        """Calls other than steps waiting for `cond` (`_turn`)."""
        self.claimed: set[str] = set()
        """Trials with a place here: attached, or waiting for the base to attach (what `attach`'s room counts)."""
        self.leaving = False
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        threading.Thread(target=self._load, args=(idle_s,), daemon=True).start()

    def _load(self, idle_s: float | None) -> None:
        """The base on the device, the pack over it and the host's state, then its reaper; a failure is kept for every
        call to raise (`_ready`)."""
        try:
            self._load_base(idle_s)
        except BaseException as e:  # noqa: BLE001  (whatever it was, each trial waiting here hears it)
            self.load_error = e
            self._log("load_failed", why=f"{type(e).__name__}: {e}"[:500])
        finally:
            self.loaded.set()

    def _ready(self) -> None:
        """Wait for the base (`_load`); raise its failure."""
        self.loaded.wait()
        if self.load_error is not None:
            raise RuntimeError(f"the pack host could not load its base: {self.load_error}") from self.load_error

    def _load_base(self, idle_s: float | None) -> None:
        imports_start = time.perf_counter()
        import torch
        from transformers import AutoTokenizer

        from lora_search import fastpath, targets
        from lora_search.devices import device_name
        from lora_search.memory import pack_host_fit, worker_memory
        from lora_search.pack import Pack, packs
        from lora_search.train import load_base

        sweep = self.sweep
        start = time.perf_counter()
        imports_s = start - imports_start
        model = load_base(sweep.base, quantized=False)
        on_gpu = torch.cuda.is_available() and sweep.resources.gpus_per_worker > 0
        if on_gpu:
            model.to("cuda")
        tokenizer = AutoTokenizer.from_pretrained(
            sweep.base.name_or_path, revision=sweep.base.revision, trust_remote_code=sweep.base.trust_remote_code
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as the solo trial's (train.py): lm-eval pads with it
        self.tokenizer = tokenizer
        self.layers = targets.linear_layers(model)  # before the pack wraps any
        usable, where = worker_memory(sweep, on_gpu)
        packable = [v for v in sweep.space.variants if packs(v) is True]
        self.fit, fit_why = pack_host_fit(sweep, packable, usable, where)
        """Whether the pack checkpoints and how many micro-batches each step runs in (`memory.PackFit`)."""
        # the base kernels and attention switches a solo trial of this sweep runs on this device (`fastpath.pack_path`)
        self.fast_path = fastpath.pack_path(on_gpu, model.config.model_type, model.config._attn_implementation)
        self.fast_path = self.fast_path.with_piece(fastpath.FROZEN_HEAP_PIECE)
        fastpath.prepare_pack(self.fast_path, model)
        self.pack = Pack(
            model,
            pad_token_id=tokenizer.pad_token_id,
            checkpointing=self.fit.checkpointing,
            drop_mask=self.fast_path.active(fastpath.NO_PAD_MASK),
            graphs=on_gpu and environment.value(environment.PACK_GRAPHS),  # `pack_graphs`
        )
        self.graphs_why: str | None = None  # why the pack's graphs stopped, logged once (`_run`)
        self.scorer: Any = None
        """The plain base golden scoring puts each adapter on (`Pack.plain_copy`), made at the first scoring."""
        # The autocast a solo trial of a packing variant trains and is scored under (train.py's SFTConfig bf16).
        self.bf16 = on_gpu and sweep.base.dtype == "bfloat16"
        self.device = device_name()
        # One second of a step stands for this many devices: the host's GPU (or its share of one), or on CPU the
        # cores torch computes on.
        self.units = float(sweep.resources.gpus_per_worker) if on_gpu else float(torch.get_num_threads())
        self.load_s = time.perf_counter() - start
        self.loads = 1
        self.steps = 0
        self.step_s = 0.0  # the steps' own seconds (`Pack.step`), summed
        self.replayed_s = 0.0  # of which the steps that replayed a captured graph (`pack_graphs`)
        self.between_s = 0.0  # seconds from a step's end to the next one's start: the host waiting for batches
        self.sent_ahead = 0  # batches that came before their adapter's previous step had ended (`step`'s `at`)
        self.last_end: float | None = None
        self.attaches = 0
        self.stepper = ThreadPoolExecutor(1, thread_name_prefix="pack-step")
        """The one thread every pack step runs on, warm-up, capture and replays alike (Ray runs each call on any
        thread of the actor's pool). One H100 sweep with batches sent ahead (more request threads) lost its graphs at
        its first capture: "operation failed due to a previous error during capture". The likely cause, not
        confirmed: a capture on a thread that had never run a step, which makes that thread's cuBLAS handle and
        workspace inside the capture."""
        self.pending: dict[str, dict[int, Any]] = {}
        """Each adapter's queued batches by the step they are for (only adapters with one)."""
        self.outcomes: dict[tuple[str, int], dict[str, Any]] = {}
        self.failed: tuple[dict[str, int], str] | None = None
        """A pack step that raised: its adapters' steps and why (`_run` on the stepper thread; `_step_failed`)."""
        self.previous: set[str] = set()
        self.joining: set[str] = set()
        """Adapters attached that have sent no batch yet: the next step waits `GATHER_S` for them too."""
        self.away: set[str] = set()
        """Adapters whose trial has its checkpoint saved and is reporting (`save`, `golden`): a step does not wait
        for them, as it waits `GATHER_S` for one that is merely late; their next batch brings them back."""
        self.seen: dict[str, float] = {}
        idle_s = environment.value(IDLE_S) if idle_s is None else idle_s
        self.idle_s = idle_s if solo_reasons(sweep) else None
        """Seconds empty after which the host leaves (`IDLE_S`, or the `idle_s` given); None: it stays (no trial of the
        sweep trains solo)."""
        with self._turn():  # a trial waiting for the base to attach keeps it from counting as empty
            self.empty_since: float | None = None if self.claimed else time.monotonic()
        self._log(
            "load",
            load_s=round(self.load_s, 3),
            # where a host's start went before its load: Ray starting the actor's process, then the libraries' imports
            actor_start_s=None if self.requested_at is None else round(self.created_at - self.requested_at, 3),
            imports_s=round(imports_s, 3),
            started_by=self.started_by,
            device=self.device,
            checkpointing=self.fit.checkpointing,
            micro_batches=self.fit.micro_batches,
            checkpointing_why=fit_why,
            fast_path=self.fast_path.summary(),
            graphs=self.pack.graphs.capture,
        )
        # the base and the libraries out of Python's full collections while the host lives (`fastpath.FROZEN_HEAP_WHY`)
        gc.collect()
        gc.freeze()
        threading.Thread(target=self._reap, daemon=True).start()

    def attach(
        self, name: str, params: TrialParams, room: int, resume: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Attach trial `name`'s adapter (PEFT's init under the sweep's seed, as a solo trial's); None when the pack
        already holds `room` adapters. `resume`: the trial's checkpoint, {"weights": its adapter's tensors under PEFT's
        keys, "training": its `Pack.training_state`}: the adapter goes on from that step (`Pack.attach`'s resume).

        An adapter of the same name still attached is an earlier process of the same trial that died without
        detaching (Tune retries a trial in a new process): it leaves first, so the retry finds its place."""
        with self._turn():
            if self.leaving:  # it gave its device back: `host_for` starts a new host
                return {"leaving": True}
            if name not in self.claimed and len(self.claimed) >= room:
                return None  # at once, the base loaded or not: the trial goes on to the next host
            self.claimed.add(name)
        try:
            self._ready()
            # imported once the base has loaded: Transformers' and TRL's lazy modules resolve their names unguarded,
            # and an import racing the loading thread's can fail ("cannot import name 'SFTConfig' from 'trl'")
            import torch

            from lora_search.pack import Training
            from lora_search.targets import resolve, targets_from_key
            from lora_search.variants import LORAPLUS_LR_RATIO, VARIANTS, Adapter

            budget = self.sweep.budget
            adapter = Adapter(
                **dataclasses.asdict(params),
                target_modules=resolve(targets_from_key(params.targets), self.layers),
                total_steps=budget.max_steps,
            )
            training = Training(
                lr=params.lr,
                total_steps=budget.max_steps,
                warmup_steps=budget.warmup_steps,
                schedule=budget.lr_schedule,
                loraplus_lr_ratio=LORAPLUS_LR_RATIO if params.variant == "loraplus" else None,
            )
            with self._turn():
                if self.leaving:
                    self.claimed.discard(name)
                    return {"leaving": True}
                if name in self.pack.names:
                    self._detach(name, "attached again: its trial started in a new process")
                    self.claimed.add(name)
                torch.manual_seed(self.sweep.seed)  # train.py seeds the same before its adapter's init
                config = VARIANTS[params.variant].peft_config(adapter)
                if resume is None:
                    self.pack.attach(name, config, training=training)
                else:
                    self.pack.attach(name, config, resume["weights"], training=training, resume=resume["training"])
                step = 0 if resume is None else int(resume["training"]["step"])
                self.seen[name] = time.monotonic()
                self.joining.add(name)
                self.empty_since = None
                self.attaches += 1
                self._log("attach", name=name, **({"resumed_from": step} if resume is not None else {}))
                trainable = sum(t.numel() for t in self.pack.state(name).values())
        except BaseException:  # its place goes back: the load failed, or the adapter did not attach
            with self._turn():
                if self.load_error is not None or name not in self.pack.names:
                    self.claimed.discard(name)
            raise
        # base_reused: the base was loaded for an earlier trial (as `StepReport.base_reused` says of a warm process)
        return {"trainable_params": trainable, "base_reused": self.attaches > 1, "device": self.device}

    def step(self, name: str, batch: dict[str, Any], at: int | None = None) -> dict[str, Any]:
        """Train `name` one step on `batch` with whichever adapters step with it; its loss, real tokens, its share of
        the step's device-seconds (`device_s`, by real tokens), the step's device-seconds (`step_s`) and the pack's
        size in that step.

        `at`: the adapter's step this batch is for (its first is 1), so that a trial may send the next step's batch
        while this one's is still queued (Ray runs a threaded actor's calls in any order); None: the step after the
        batches already queued. The call answers once its own step has run."""
        arrived = time.monotonic()
        with self.cond:
            self._attached(name)
            queued = self.pending.get(name, {})
            at = self.pack.steps(name) + 1 + len(queued) if at is None else at
            if at <= self.pack.steps(name) or at in queued:
                raise RuntimeError(f"trial {name}: a batch for its step {at} came twice")
            # sent ahead: it came before its adapter's previous step had ended (queued, or waiting on the lock)
            ran_since = self.last_end is not None and arrived < self.last_end and name in self.previous
            self.sent_ahead += at > self.pack.steps(name) + 1 or ran_since
            self.pending[name] = {**queued, at: batch}
            self.joining.discard(name)
            self.away.discard(name)
            self.seen[name] = time.monotonic()
            self.cond.notify_all()
            deadline = None  # GATHER_S from when this batch is the adapter's next one
            while (name, at) not in self.outcomes:
                self._attached(name)  # detached while it waited: its trial has gone
                if self.callers:  # another call waits for the lock (`_turn`): it goes first
                    self.cond.wait(0.005)
                    continue
                if self.pack.steps(name) + 1 == at:
                    deadline = time.monotonic() + GATHER_S if deadline is None else deadline
                    waiting = (self.previous | self.joining) & set(self.pack.names)
                    waiting_for = waiting - self._next_ready() - self.away
                    if not waiting_for or time.monotonic() >= deadline:
                        self.joining -= waiting_for  # waited for once: a slow newcomer joins when its batch comes
                        self.stepper.submit(self._run).result()  # holding the lock: the stepper's run is ours
                        if self.failed is not None:
                            self._step_failed(*self.failed)
                            self.failed = None
                        self.cond.notify_all()
                        continue
                    self.cond.wait(max(deadline - time.monotonic(), 0.01))
                else:
                    self.cond.wait(1.0)
            out = self.outcomes.pop((name, at))
            if "error" in out:
                raise RuntimeError(out["error"])
            return out

    def _next_ready(self) -> set[str]:
        """The adapters whose next step's batch is queued."""
        return {n for n, queued in self.pending.items() if self.pack.steps(n) + 1 in queued}

    def evaluate(self, name: str, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """`name`'s loss on each batch (the mean over its label tokens) and the device-seconds it took."""
        with self._turn():
            self._attached(name)
            start = time.perf_counter()
            with self._autocast():
                losses = [self.pack.evaluate({name: b})[name] for b in batches]
            self.seen[name] = time.monotonic()
            return {"losses": losses, "device_s": (time.perf_counter() - start) * self.units}

    def save(self, name: str, probe: list[Any]) -> dict[str, Any]:
        """`name`'s adapter as a PEFT dir's files (name -> bytes; `pack.save`), its training state
        (`Pack.training_state`, on the CPU) and its last-position logits on the `probe` prompts (`lora_search.probe`),
        with the host's peak memory."""
        import tempfile

        import torch

        from lora_search.devices import peak_memory_bytes

        with self._turn():
            self._attached(name)
            with tempfile.TemporaryDirectory() as tmp:
                self.pack.save(name, tmp)
                files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
            training = self.pack.training_state(name)
            with self._autocast():
                logits = [
                    self.pack.logits({name: {"input_ids": ids, "labels": ids}})[name][0, -1].float().cpu()
                    for ids in probe
                ]
            self.seen[name] = time.monotonic()
            self.away.add(name)  # its trial writes the checkpoint and reports now: the others step without it
            self.cond.notify_all()
        peak, kind = peak_memory_bytes()
        return {"files": files, "training": training, "logits": torch.stack(logits), "peak": peak, "peak_kind": kind}

    def golden(self, name: str, probe_ids: Any) -> dict[str, Any]:
        """`name`'s scores on the sweep's golden sets, as a solo trial at its last step gets them: `evals.score`'s
        dict (metrics, objective, higher_is_better, lm-eval's results JSON), with the scoring's wall seconds and
        device-seconds. Raises `evals.AdapterNotAppliedError` when the adapter does not change the logits of
        `probe_ids` (as a solo trial's scoring does).

        How: the adapter is saved (`Pack.save`, the plain PEFT dir the trial reports) and loaded with
        `PeftModel.from_pretrained` onto a plain copy of the base (`Pack.plain_copy`: built at the first scoring
        and kept, sharing the pack's weights, so it costs no second base in memory), scored, and unloaded again.
        So the scored model is exactly what a solo trial scores: PEFT's own LoRA layers, generation with its KV
        cache, under the solo trial's autocast and inference attention. Scoring through the pack's own
        `PackedLinear` rows would need a routing mode for any batch size and cached generation in the pack's layer,
        and then a proof that it computes what PEFT does; this needs neither.

        It holds the host's lock: the other adapters' steps wait until it is done (minutes for a large golden set,
        once per completed trial), and no adapter counts that wait as silence (`STALE_S`)."""
        import tempfile

        from peft import PeftModel

        from lora_search import evals, fastpath

        assert self.sweep.evals is not None
        with self._turn():
            self._attached(name)
            start = time.perf_counter()
            if self.scorer is None:
                self.scorer = self.pack.plain_copy()
            model = None
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    self.pack.save(name, tmp)
                    model = PeftModel.from_pretrained(self.scorer, tmp)
                with fastpath.inference_attention(model):
                    evals.check_applied(model, probe_ids)
                with fastpath.autocast(model, self.bf16), fastpath.inference_attention(model):
                    scored = evals.score(model, self.tokenizer, self.sweep.evals, self.sweep.seed, self.bf16)
            finally:
                # The plain base again for the next adapter; after a failed load, a fresh copy (it may hold layers).
                self.scorer = model.unload() if model is not None else None
            seconds = time.perf_counter() - start
            for other in self.seen:  # they were waiting on this lock, not silent
                self.seen[other] += seconds
            self._log("golden", name=name, seconds=round(seconds, 3))
        assert scored is not None  # one process: lm-eval hands it the results
        return {**scored, "seconds": seconds, "device_s": seconds * self.units}

    def detach(self, name: str, why: str) -> None:
        self._ready()
        with self._turn():
            if name in self.pack.names:
                self._detach(name, why)

    def close(self) -> list[str]:
        """Detach every adapter still attached as the sweep ends; their names. Tune ends a trial's process once its
        last report is in, sometimes before the trial's own `finally` detaches it: such an adapter that took the
        sweep's every step left as "finished", any other as "sweep ended at step N"."""
        self._ready()
        with self._turn():
            names = list(self.pack.names)
            for name in names:
                steps = self.pack.steps(name)
                why = "finished" if steps >= self.sweep.budget.max_steps else f"sweep ended at step {steps}"
                self._detach(name, why)
            gc.unfreeze()  # what the host froze at its start may now be collected (an in-process host: the tests')
            return names

    def status(self) -> dict[str, Any]:
        self._ready()
        return {"names": self.pack.names, "loads": self.loads, "steps": self.steps}

    def _run(self) -> None:
        """One pack step of each adapter's next queued batch, on the stepper thread while a `step` call holds the
        lock and waits for it."""
        ready = self._next_ready()
        batches = {n: self.pending[n].pop(self.pack.steps(n) + 1) for n in self.pack.names if n in ready}
        self.pending = {n: queued for n, queued in self.pending.items() if queued}
        if self.last_end is not None:
            self.between_s += time.monotonic() - self.last_end
        replays = self.pack.graphs.replays
        ats = {n: self.pack.steps(n) + 1 for n in batches}
        try:
            with self._autocast():
                done = self.pack.step(batches, self.fit.micro_batches)
        except Exception as e:  # noqa: BLE001  (whatever it was, every trial in the step hears it, none waits on)
            self.failed = (ats, f"{type(e).__name__}: {str(e).strip()[:400]}")  # `step`'s caller, holding the lock
            return
        self.step_s += done.seconds
        if self.pack.graphs.replays > replays:
            self.replayed_s += done.seconds
        real = {n: int(b["attention_mask"].sum()) for n, b in batches.items()}
        total = max(sum(real.values()), 1)
        step_s = done.seconds * self.units
        now = time.monotonic()
        for n in batches:
            self.seen[n] = now  # its silence counts from its step's end: a slow step is not a silent trial
            share = step_s * real[n] / total
            out = {"loss": done.losses[n], "tokens": real[n], "device_s": share, "step_s": step_s, "pack": len(batches)}
            self.outcomes[(n, self.pack.steps(n))] = out
        self.previous = set(batches)
        self.steps += 1
        if self.pack.graphs.why != self.graphs_why:  # its capture failed: every step runs as it comes from now on
            self.graphs_why = self.pack.graphs.why
            self._log("graphs_off", why=self.graphs_why)
        self.last_end = time.monotonic()

    def _step_failed(self, ats: dict[str, int], why: str) -> None:
        """A pack step raised: each adapter in it leaves the pack (its weights and optimizer state may be half
        stepped; its trial restarts from its newest checkpoint, as after any failure) and its waiting `step` call
        raises `why`. Without this the other adapters' calls waited for an answer that never came."""
        self._log("step_failed", names=sorted(ats), why=why)
        for name, at in ats.items():
            try:
                self._detach(name, f"its pack step {at} failed")
            except Exception as e:  # noqa: BLE001  (a broken device: the answer below still goes out)
                self.pending.pop(name, None)
                self._log("detach_failed", name=name, why=f"{type(e).__name__}: {e}"[:300])
            self.outcomes[(name, at)] = {"error": f"trial {name}: its pack step {at} failed on the host: {why}"}
        self.previous = set()
        self.last_end = time.monotonic()

    def _autocast(self) -> Any:
        """The bf16 autocast a solo trial of the same sweep trains, evaluates and probes under (train.py's SFTConfig
        bf16; `fastpath.autocast`), around every forward of the pack: the adapters' fp32 weights then meet bf16
        activations in bf16 products, as in the solo trial and in benchmarks/pack.py's packed runs."""
        from lora_search import fastpath

        return fastpath.autocast(self.pack.model, self.bf16)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """The host's lock for a call that is not a step (attach, evaluate, save, golden, detach, the reaper). Steps
        yield to it (`step` waits while `callers` > 0): a trial that sends its next batch ahead always has a step
        call waiting for the lock, and the lock is not fair, so a trial attaching beside it waited for the stepping
        trial's next report (seen on the CPU: a second trial's attach held back until the first had taken all its
        10 steps alone)."""
        with self.turns:
            self.callers += 1
        try:
            self.cond.acquire()
        finally:
            with self.turns:
                self.callers -= 1
        try:
            yield
        finally:
            self.cond.release()

    def _attached(self, name: str) -> None:
        if name not in self.pack.names:
            raise RuntimeError(f"trial {name} is not attached to this pack host (detached after {self.stale_s:g}s)")

    def _detach(self, name: str, why: str) -> None:
        self.pack.detach(name)
        self.claimed.discard(name)
        self.seen.pop(name, None)
        self.pending.pop(name, None)
        for key in [k for k in self.outcomes if k[0] == name]:  # steps that ran after its trial's process was killed
            del self.outcomes[key]
        self.previous.discard(name)
        self.joining.discard(name)
        self.away.discard(name)
        if not self.claimed:
            self.empty_since = time.monotonic()
        self._log("detach", name=name, why=why)
        self.cond.notify_all()

    def _reap(self) -> None:
        while True:
            time.sleep(min(1.0, self.stale_s / 4))
            with self._turn():
                now = time.monotonic()
                for name in [n for n in self.pack.names if n not in self.pending]:
                    if now - self.seen.get(name, now) > self.stale_s:
                        self._detach(name, f"no step for {self.stale_s:g}s")
                idle = self.empty_since is not None and now - self.empty_since
                if self.idle_s is not None and idle and idle > self.idle_s and not self.leaving:
                    self.leaving = True
                    self._log("leave", why=f"no trial for {self.idle_s:g}s: the device goes back to the solo trials")
                    self._leave()
                    return

    def _leave(self) -> None:
        """End this host's actor (in a Ray actor; in-process, `leaving` is all): its device goes back to Ray."""
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _log(self, event: str, **fields: Any) -> None:
        pack = getattr(self, "pack", None)  # None: the base has not loaded (`load_failed`)
        line = {"t": time.time(), "event": event, **fields}
        line.update(attached=pack.names if pack else [], loads=getattr(self, "loads", 0))
        # where a pack's time goes: its steps, and the waits for its trials' next batches between them
        if getattr(self, "steps", 0):
            line.update(steps=self.steps, step_s=round(self.step_s, 3), between_steps_s=round(self.between_s, 3))
            line.update(graph_replays=self.pack.graphs.replays, replayed_step_s=round(self.replayed_s, 3))
            line.update(sent_ahead=self.sent_ahead)
        with self.journal.open("a") as f:
            f.write(json.dumps(line) + "\n")


class Blocking:
    """A host actor's handle whose calls wait for their answer: `host.step(name, batch)` is
    `ray.get(actor.step.remote(name, batch))`, so a packed trial reads the same whether its host is an actor or (in
    a test) a `PackHost` in its own process. `detach` waits `DETACH_S` at most."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, method: str) -> Any:
        import ray

        remote = getattr(self.actor, method).remote
        timeout = DETACH_S if method == "detach" else None
        return lambda *args: ray.get(remote(*args), timeout=timeout)

    def send_step(self, name: str, batch: dict[str, Any], at: int) -> Any:
        """`PackHost.step` without waiting: a callable that waits for its answer. A trial sends its next step's batch
        this way before it waits for this one's (`pack_trial`)."""
        import ray

        ref = self.actor.step.remote(name, batch, at)
        return lambda: ray.get(ref)


def host_for(
    sweep: Sweep, storage_path: str, name: str, params: TrialParams, resume: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """(host, attach info) for trial `name` (`PackHost.attach`, `resume` with it): the first of the sweep's hosts with
    room, created when the trial finds none there (`get_if_exists`: two trials creating the same host get the one
    actor). The host comes as a `Blocking` handle."""
    import ray

    r = sweep.resources
    for _ in range(LEAVING_RETRIES):
        leaving = False
        for index in range(hosts(sweep, ray.cluster_resources())):
            host = start_host(sweep, storage_path, index)
            try:
                info = ray.get(host.attach.remote(name, params, r.pack, resume))
            except ray.exceptions.RayActorError:  # it left (`IDLE_S`) between the lookup and the attach
                info = {"leaving": True}
            if info is not None and info.get("leaving"):
                leaving = True
                continue
            if info is not None:
                return Blocking(host), info
        if not leaving:
            break
        time.sleep(1.0)  # a leaving host's name is free once its actor has ended
    raise RuntimeError(f"every pack host of sweep {sweep.name!r} is full; lower max_concurrent_trials")


def start_hosts(sweep: Sweep, storage_path: str, trials_at_once: int, cluster: dict[str, float]) -> int:
    """Start the hosts the sweep's first `trials_at_once` trials attach to, before Tune starts them; how many. Only
    where every variant of the space packs (`solo_reasons` empty): a host then stays for the whole sweep, while one
    started for a sweep with solo trials could hold a device they wait for, until `IDLE_S` without a trial.

    A host a trial starts begins after that trial's own process start, imports and tokenizing, and Ray's start of
    the host's actor and the host's imports come after them (session 21, 8B shape on an H100: the base began to load
    40 s after the first trial started). Started by the driver, that work overlaps Tune's start of the trials (the
    same sweep: the host loading 12 s after the driver asked for it, its actor 2.0 s and its imports 9.9 s of it)."""
    if solo_reasons(sweep):
        return 0
    n = min(hosts(sweep, cluster), math.ceil(min(sweep.num_samples, trials_at_once) / sweep.resources.pack))
    for index in range(n):
        start_host(sweep, storage_path, index, started_by="sweep")
    return n


def start_host(sweep: Sweep, storage_path: str, index: int, started_by: str = "trial") -> Any:
    """The sweep's host `index` (its actor handle), started where it is not running (`get_if_exists`: two trials
    starting the same host get the one actor). Returns at once: the host loads its base in the background
    (`PackHost._load`). `started_by`: who asked (the host's "load" line says)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    try:
        return ray.get_actor(host_name(sweep, index), namespace=NAMESPACE)
    except ValueError:
        pass
    r = sweep.resources
    options: dict[str, Any] = {
        "name": host_name(sweep, index),
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "num_cpus": r.cpus_per_worker,
        "max_concurrency": 2 * r.pack + 2,  # each trial's step and its next one (`step`'s `at`), and two more
        "lifetime": "detached",  # it outlives the trial that created it; `stop_hosts` ends it
        # out of the trial's placement group (Tune's, of PACKED_TRIAL_CPU): the host reserves its own device
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
    }
    if r.gpus_per_worker > 0:
        options["num_gpus"] = r.gpus_per_worker  # a whole GPU, or a worker's share of one beside other trials
    return (
        ray.remote(PackHost)
        .options(**options)
        .remote(sweep, str(journal(storage_path, index)), requested_at=time.time(), started_by=started_by)
    )


LEAVING_RETRIES = 30
"""Rounds `host_for` tries the sweep's hosts while one of them is leaving (a second apart)."""


def stop_hosts(sweep: Sweep, cluster: dict[str, float]) -> None:
    """End the sweep's hosts (detached actors: they outlive the trials that created them)."""
    import ray

    for index in range(hosts(sweep, cluster)):
        try:
            actor = ray.get_actor(host_name(sweep, index), namespace=NAMESPACE)
        except ValueError:
            continue
        try:  # its journal says how every adapter left, also one whose trial's process ended first
            ray.get(actor.close.remote(), timeout=30)
        except Exception as e:  # a host that died or hangs is killed all the same
            log.warning("pack host %d: closing it failed: %s", index, e)
        ray.kill(actor)
