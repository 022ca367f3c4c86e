"""Per-worker LoRA training: what every Ray Train worker of a trial runs (or a warm trial's own process).

Loads the base model and tokenizer, attaches the trial's adapter (`lora_search.variants`), trains with
TRL's SFTTrainer (completion-only loss on prompt/completion data), and at every `budget.eval_every`
steps reports eval loss plus cost figures to Ray Train (and through it to Tune, whose ASHA may stop the
trial there) with a checkpoint: the adapter, and (DDP) the adapter's training state as a Trainer checkpoint, so a
trial whose worker, node or driver died trains on from there (lora_search.resume).

Run through `lora_search.trial`, never directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PrinterCallback, TrainerCallback
from trl import SFTTrainer

from lora_search import data, fastpath, results, resume, strategies, targets, trial, variants
from lora_search.config import BaseModel, Sweep
from lora_search.probe import PROBE_FILE, probe_batch, save_probe
from lora_search.results import GOLDEN_PREFIX
from lora_search.strategies import STRATEGIES, Strategy
from lora_search.variants import VARIANTS, Adapter

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

log = logging.getLogger("lora_search.train")


@dataclass(frozen=True)
class TrialParams:
    """The point of the search space one trial trains (Tune's sampled config, typed)."""

    variant: str
    rank: int
    alpha: float
    targets: str
    """`lora_search.targets.target_key` form: a preset name or names joined by '+'."""
    lr: float
    dropout: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialParams:
        return cls(**{k: config[k] for k in cls.__dataclass_fields__})


def load_base(base: BaseModel, quantized: bool, sharded: bool = False) -> torch.nn.Module:
    """The base model; 4-bit NF4 for quantized variants. Unsharded NF4 loads straight onto the worker's GPU; under a
    sharding strategy the trainer places it, and the 4-bit weights are stored as bf16 so FSDP/ZeRO-3 can shard
    them like the rest of the layer (bitsandbytes' `quant_storage`)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": base.revision,
        "trust_remote_code": base.trust_remote_code,
        "attn_implementation": base.attn_implementation,
    }
    if quantized:
        kwargs["quantization_config"] = variants.quantization_config(storage=torch.bfloat16 if sharded else None)
        if not sharded:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = "auto" if base.dtype == "auto" else getattr(torch, base.dtype)
    model = AutoModelForCausalLM.from_pretrained(base.name_or_path, **kwargs)
    model.config.use_cache = False  # the KV cache only costs memory while training
    return model


class BaseCache:
    """The base model a warm trial process keeps for its next trial (`Resources.reuse_workers`): loaded once, lent to
    each trial, and taken back without its adapter (`peft.PeftModel.unload`) when the trial ends or is stopped.

    Only bases that a trial leaves as it found them: not quantized (QLoRA, LoftQ load 4-bit layers that PEFT
    prepares in place) and not rewritten by the variant (PiSSA moves the principal part of every targeted weight
    into its adapter). A trial that raised gives its base up. A trial asking for another base (or a quantized one)
    frees the kept one before loading."""

    _key: tuple[Any, ...] | None = None
    _model: torch.nn.Module | None = None

    @staticmethod
    def key(base: BaseModel, variant: str) -> tuple[Any, ...] | None:
        """What a kept base must match to be lent to a trial of `variant`; None: this variant never keeps one."""
        v = VARIANTS[variant]
        if v.quantized or v.converts_on_save or v.after_init is not None:
            return None
        return (base.name_or_path, base.revision, base.dtype, base.attn_implementation, base.trust_remote_code)

    @classmethod
    def take(cls, key: tuple[Any, ...] | None) -> torch.nn.Module | None:
        """The kept base if it matches `key` (it is the caller's until `keep`); else frees it and returns None."""
        model, kept = cls._model, cls._key
        cls._model = cls._key = None
        if model is not None and key is not None and key == kept:
            return model
        del model
        trial.release_memory()
        return None

    @classmethod
    def keep(cls, key: tuple[Any, ...], peft_model: Any) -> None:
        """Take back the base of a trial's `peft_model`, as `load_base` returned it: adapter layers removed, training
        switches (gradient checkpointing, input gradients) off, every weight trainable again, eval mode."""
        model = peft_model.unload()
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
        for param in model.parameters():
            param.requires_grad_(True)
        model.eval()
        cls._key, cls._model = key, model


def build_adapter(model: torch.nn.Module, params: TrialParams, total_steps: int) -> Adapter:
    layers = targets.linear_layers(model)
    return Adapter(
        variant=params.variant,
        rank=params.rank,
        alpha=params.alpha,
        target_modules=targets.resolve(targets.targets_from_key(params.targets), layers),
        dropout=params.dropout,
        lr=params.lr,
        total_steps=total_steps,
    )


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory_bytes() -> tuple[int, str]:
    """Peak memory of this worker since `reset_peak_memory`: CUDA allocator peak on GPU, else the process's peak RSS
    (Linux's VmHWM; elsewhere the peak of the process's whole life, which a warm process carries across trials)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda"
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:", 1)[1].split()[0]) * 1024, "rss"
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def reset_peak_memory() -> None:
    """Start this trial's peak (`peak_memory_bytes`) afresh: a warm process has run trials before it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the process's VmHWM to its current RSS
    except OSError:
        pass


def device_name() -> str:
    """ "cpu", or the CUDA device's name ("NVIDIA H100 80GB HBM3"): what `Pricing` prices."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    return "cpu"


def gpu_memory_in_use() -> int:
    """Bytes in use on this worker's GPU by every process, read before the trial loads anything (0 on CPU). A figure
    above the bare CUDA context's few hundred MiB, and above the base a warm process keeps (`BaseCache`), means an
    earlier trial on this GPU has not given its memory back."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def optimizer_name(budget_optimizer: str, quantized: bool, on_gpu: bool, fsdp: bool = False) -> str:
    """`Budget.optimizer` resolved to a Transformers `optim` name for this trial. Under FSDP2 the adapter's parameters
    are DTensors, which bitsandbytes' 8-bit kernels refuse ("got mixed torch.Tensor and DTensor", seen on an H200
    with FSDP-QLoRA): there 4-bit variants get fused AdamW, whose state FSDP shards over the workers anyway."""
    if budget_optimizer != "auto":
        return budget_optimizer
    if not on_gpu:
        return "adamw_torch"
    return "paged_adamw_8bit" if quantized and not fsdp else "adamw_torch_fused"


@dataclass(frozen=True)
class MicroBatching:
    """How a trial runs its optimizer steps: `micro` sequences a forward/backward, `accum` of them a step (always
    `budget.batch_size * budget.grad_accum` sequences a step), and whether it recomputes activations in backward."""

    micro: int
    accum: int
    keep_activations: fastpath.Piece
    merge: fastpath.Piece


def micro_batching(sweep: Sweep, params: TrialParams, on_gpu: bool, liger: bool = False) -> MicroBatching:
    """The trial's micro-batch and gradient checkpointing, from the plan's memory estimate (`plan.trial_memory`)
    against what this worker holds: its share of the GPU (`gpus_per_worker` of the device's total) or, on CPU,
    `resources.memory_limit_gb` when set (host memory otherwise), of which `plan.USABLE_FRACTION` is counted.

    A step's `budget.grad_accum` micro-batches of `budget.batch_size` run as 1/k as many of k times the size, for the
    largest k dividing grad_accum that fits ("merge-micro-batches"): the same sequences per step and the same loss
    (the Trainer divides by the step's label tokens either way), with 1/k of the per-micro-batch CPU work. Without
    recompute ("keep-activations": `Budget.gradient_checkpointing` "off", or "auto" where even k=1 fits without it)
    the merge is sized without checkpointing; with it, with checkpointing. `liger`: the trial runs Liger's kernels,
    which keep less (`plan.LIGER_BLOCK_FACTOR`)."""
    import torch

    from lora_search import plan

    budget = sweep.budget
    arch = plan.read_architecture(sweep.base)
    target = targets.targets_from_key(params.targets)
    limit = sweep.resources.memory_limit_gb
    if on_gpu:
        have = torch.cuda.mem_get_info()[1] * min(sweep.resources.gpus_per_worker, 1.0)
        where = f"{min(sweep.resources.gpus_per_worker, 1.0):g} of this GPU"
    elif limit is not None:
        have, where = limit * 2**30, f"resources.memory_limit_gb={limit:g}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
    usable = plan.USABLE_FRACTION * have

    def need(checkpointing: bool, k: int) -> float:
        row = plan.trial_memory(
            sweep, arch, params.variant, params.rank, target, checkpointing, budget.batch_size * k, liger
        )
        return row.total

    choice = budget.gradient_checkpointing
    alone = need(False, 1)
    if choice == "auto":
        keep = alone <= usable
        verdict = "fits" if keep else "exceeds"
        why = (
            f"no recompute: {alone / 2**30:.1f} GiB estimated without checkpointing {verdict} "
            f"{usable / 2**30:.1f} GiB usable of {where}"
        )
    else:
        keep, why = choice == "off", f"budget.gradient_checkpointing={choice!r}"
    factors = [k for k in range(budget.grad_accum, 0, -1) if budget.grad_accum % k == 0]
    k = next((k for k in factors if need(not keep, k) <= usable), 1)
    micro, accum = budget.batch_size * k, budget.grad_accum // k
    if budget.grad_accum == 1:
        merge = fastpath.Piece(fastpath.MERGE_MICRO, False, "budget.grad_accum=1: one micro-batch a step already")
    elif k == 1:
        larger = budget.batch_size * factors[-2]
        merge = fastpath.Piece(
            fastpath.MERGE_MICRO,
            False,
            f"a micro-batch of {larger} ({need(not keep, factors[-2]) / 2**30:.1f} GiB estimated) exceeds "
            f"{usable / 2**30:.1f} GiB usable of {where}",
        )
    else:
        merge = fastpath.Piece(
            fastpath.MERGE_MICRO,
            True,
            f"{budget.grad_accum} micro-batches of {budget.batch_size} a step run as {accum} of {micro} "
            f"({need(not keep, k) / 2**30:.1f} GiB estimated)",
        )
    return MicroBatching(micro, accum, fastpath.Piece(fastpath.KEEP_ACTIVATIONS, keep, why), merge)


def worker_nodes() -> str:
    """The Ray node ids of this trial's workers, sorted and joined by ','; shows where a trial ran."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return node
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return ",".join(sorted({str(n) for n in nodes}))


class _OneProcess:
    """The world of a trial that trains in its own Tune process (`trial.warm`): rank 0 of 1."""

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. `config` holds the Sweep and the trial's sampled params."""
    import ray.train
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from trl import SFTConfig

    sweep: Sweep = config["sweep"]
    params = TrialParams.from_config(config)
    budget = sweep.budget
    warm = bool(config.get("warm"))  # training in the Tune trial process, as rank 0 of 1 (`trial.warm`)
    context = _OneProcess() if warm else ray.train.get_context()
    rank0 = context.get_world_rank() == 0
    variant = VARIANTS[params.variant]
    strategy = STRATEGIES[sweep.resources.strategy_for(params.variant)]
    gpu_in_use_at_start = gpu_memory_in_use()
    reset_peak_memory()
    start = time.perf_counter()
    # Seconds from the trial's Tune process starting its Ray Train run to this worker running: the worker group's
    # start (placement, process, torch.distributed) and its imports. A run retried after a lost worker counts from
    # its first attempt (`trial.run_trial` sets tune_run_start once).
    startup_s = max(0.0, time.time() - float(config["tune_run_start"]))
    # ...of which the worker's imports (torch, transformers, TRL, PEFT): what a worker kept across trials would save
    imports_s = max(0.0, time.time() - float(config.get("imports_start", time.time())))

    torch.manual_seed(sweep.seed)
    on_gpu = torch.cuda.is_available() and sweep.resources.gpus_per_worker > 0
    work = Path(tempfile.mkdtemp(prefix="lora_search_"))
    # Sharded strategies keep their optimizer state in per-rank shards that only rank 0's checkpoint would miss:
    # they restart from step 0. DDP resumes from the newest checkpoint Ray Train restored, if any.
    resumable = strategy.name == "ddp"
    run_dir = Path(config["run_dir"])
    registered = ray.train.get_checkpoint() if resumable and not warm else None
    found = resume.candidates(run_dir, registered.path if registered is not None else None) if resumable else []
    restored, source = _restored(found, work)
    earlier = resume.checkpoint_report(restored) if restored else {}
    tracker = resume.Tracker(Path(config["progress_file"]), config["tune_run"], config["tune_run_start"])
    progress = tracker.start(int(earlier.get("step", 0))) if rank0 else None
    reports_log = Path(config["progress_file"]).with_suffix(".reports.jsonl")
    if restored:
        # Report every step up to the one resumed from again, oldest first: Tune's restored state keeps no results of
        # a trial it reruns, and some never reached it (a worker whose driver died trains on for a few seconds). A
        # repeat is not logged twice; the restored ASHA decides on each as it did, or would have.
        for again in resume.reports_until(reports_log, int(earlier["step"])):
            again.update(_progress_fields(progress), replayed=True)
            if again["step"] == earlier["step"]:
                again["checkpoint_path"] = source
            trial.report(again, None, "", run_dir, warm)
        if earlier["step"] >= budget.max_steps:
            shutil.rmtree(work, ignore_errors=True)
            return
    model_config = AutoConfig.from_pretrained(
        sweep.base.name_or_path, revision=sweep.base.revision, trust_remote_code=sweep.base.trust_remote_code
    )
    # ZeRO-3 keeps tensors up to this size whole on every rank: the adapter's, never the base's
    adapter_numel = strategies.adapter_param_bound(model_config, params.rank) if strategy.deepspeed else 0
    path = fastpath.choose(on_gpu, model_config.model_type, sweep.base.attn_implementation)
    batching = micro_batching(sweep, params, on_gpu, liger=path.active("liger"))
    path = path.with_piece(batching.keep_activations).with_piece(batching.merge)
    # Built before the model loads: under ZeRO-3 it makes from_pretrained partition the weights as they load, under
    # FSDP it makes ranks > 0 load none (`strategies.trainer_kwargs`).
    args = SFTConfig(
        output_dir=str(work / "trainer"),
        max_steps=budget.max_steps,
        per_device_train_batch_size=batching.micro,
        per_device_eval_batch_size=budget.batch_size * 2,
        gradient_accumulation_steps=batching.accum,
        learning_rate=params.lr,
        lr_scheduler_type="linear",
        warmup_steps=budget.warmup_steps,
        eval_strategy="steps",
        eval_steps=budget.eval_every,
        # Step-0 eval: every variant starts as an exact (PiSSA: numerically exact) copy of the base, so this is the
        # base model's eval loss, the reference every trial's gain is measured against. Taken inside train(): a
        # separate evaluate() first would prepare the model for inference alone, which FSDP2 and DeepSpeed refuse
        # or cannot train from afterwards. A resumed trial has it from its checkpoint's report.
        eval_on_start=restored is None,
        logging_steps=budget.eval_every,
        # Saved with every report (DDP): the Trainer's checkpoint joins the adapter in Ray Train's checkpoint.
        save_strategy="steps" if resumable else "no",
        save_steps=budget.eval_every,
        report_to="none",
        seed=sweep.seed,
        data_seed=sweep.seed,
        max_length=sweep.dataset.max_length,
        use_cpu=not on_gpu,
        bf16=on_gpu and (sweep.base.dtype == "bfloat16" or variant.quantized),
        include_num_input_tokens_seen="non_padding",
        # a NaN micro-batch loss shows in the logged loss (the trial ends as diverged) instead of being averaged
        # away, and no step waits on the device for the check
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        optim=optimizer_name(budget.optimizer, variant.quantized, on_gpu, fsdp=strategy.fsdp),
        gradient_checkpointing=not path.active(fastpath.KEEP_ACTIVATIONS),
        **strategies.trainer_kwargs(strategy.name, adapter_numel),
        **path.trainer_args(),
    )
    tokenizer = AutoTokenizer.from_pretrained(
        sweep.base.name_or_path, revision=sweep.base.revision, trust_remote_code=sweep.base.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cache_key = BaseCache.key(sweep.base, params.variant) if warm and not strategy.shards_base else None
    model = BaseCache.take(cache_key)
    base_reused = model is not None
    if model is None:
        model = load_base(sweep.base, variant.quantized, sharded=strategy.shards_base)
    torch.manual_seed(sweep.seed)  # the adapter starts the same whether its base was loaded or kept
    adapter = build_adapter(model, params, budget.max_steps)
    init_dir = work / "init_adapter"
    model = variants.attach(model, adapter, init_dir)
    base_fp32 = model.get_base_model().dtype == torch.float32
    path = path.with_piece(fastpath.bf16_inputs(args.bf16))
    path = path.with_piece(fastpath.fused_add(strategy.name, args.bf16, base_fp32))
    path.prepare_model(model)
    n_trainable = trainable_parameters(model)
    train_ds, eval_ds = data.load(sweep.dataset, sweep.seed)
    load_s = time.perf_counter() - start
    log.info(
        "%s: %s r=%d on %s x %d worker(s), strategy %s, optimizer %s, fast path: %s",
        Path(config["progress_file"]).stem,  # trial_<id>: a warm process trains one trial after another
        params.variant,
        params.rank,
        device_name(),
        context.get_world_size(),
        strategy.name,
        args.optim,
        path.summary(),
    )

    probe = probe_batch(tokenizer, eval_ds)
    reporter = _Reporter(sweep, tokenizer, adapter, model, init_dir, work, rank0, n_trainable, load_s, probe)
    reporter.worker_nodes = worker_nodes()
    reporter.strategy = strategy
    reporter.fast_path = path.summary()
    reporter.gpu_in_use_at_start = gpu_in_use_at_start
    reporter.resumable, reporter.tracker, reporter.progress = resumable, tracker, progress
    reporter.run_dir, reporter.reports_log, reporter.warm = run_dir, reports_log, warm
    reporter.throughput.name = Path(config["progress_file"]).stem  # trial_<id>
    reporter.startup_s, reporter.imports_s, reporter.base_reused = startup_s, imports_s, base_reused
    reporter.trainer_built = time.perf_counter()
    if restored:
        reporter.base_eval_loss = float(earlier["base_eval_loss"])
        reporter.earlier_train_s = float(earlier["train_s"])
    callbacks: list[TrainerCallback] = [reporter.throughput, reporter]
    if variant.step_hook is not None:
        callbacks.append(_StepHook(model, variant.step_hook))
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=path.collator(tokenizer.pad_token_id),  # counts real tokens; `fastpath.NO_PAD_MASK`
        callbacks=callbacks,
        make_optimizer=(lambda m: variant.optimizer(m, adapter)) if variant.optimizer else None,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to Tune, not one dict per log line
    path.prepare()
    intact = False  # whether the base is as loaded (bar the adapter): kept for this process's next trial
    try:
        trainer.train(resume_from_checkpoint=str(restored / resume.TRAINER_DIR) if restored else None)
        intact = True
    except torch.cuda.OutOfMemoryError as e:
        peak, _ = peak_memory_bytes()
        raise results.infeasible("CUDA out of memory", peak, trainer.state.global_step) from e
    except SystemExit:  # Tune stopped the trial (ASHA) at a report, between two steps
        intact = True
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if intact and cache_key is not None:
            BaseCache.keep(cache_key, model)


LM_EVAL_RESULTS = "lm_eval_results.json"
TRAINER_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "scaler.pt")
TRAINER_FILES += ("trainer_state.json", "rng_state*.pth")
"""What a trial resumes from in a Trainer checkpoint: the adapter and its training state, not the tokenizer."""


def _restored(found: list[Path], work: Path) -> tuple[Path | None, str]:
    """The newest of the trial's complete checkpoints (`resume.candidates`), copied into `work`, and where it is in
    the run's storage; (None, "") when there is none."""
    for source in found:
        local = work / "restored"
        try:
            shutil.copytree(source, local)
        except OSError:  # removed meanwhile (Ray keeps the newest registered checkpoint only): take the next
            shutil.rmtree(local, ignore_errors=True)
            continue
        return local, str(source)
    return None, ""


def _progress_fields(progress: resume.Progress | None) -> dict[str, Any]:
    if progress is None:  # ranks > 0: rank 0's report is the one Tune sees
        return {}
    return {"restarts": progress.restarts, "steps_redone": progress.steps_redone, "prior_s": progress.prior_s}


class _Trainer(SFTTrainer):
    """SFTTrainer that builds a variant's own optimizer (LoRA+) when the Trainer builds optimizers: after FSDP or
    DeepSpeed has wrapped the model, where passing a ready optimizer is refused (or would hold stale parameters).

    Its loss is TRL's (the fused LM head's per-token log-probs, divided by the step's label tokens), with the
    per-micro-batch metrics kept on the device (`fastpath.FEW_SYNCS_WHY`): entropy and token accuracy are summed
    there and read once per log step, as token-weighted means over the steps logged; tokens seen come from the
    collator's CPU count (`fastpath.REAL_TOKENS`)."""

    def __init__(self, *args: Any, make_optimizer: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        self._make_optimizer = make_optimizer
        self._sums: dict[str, Any] = {}  # mode -> device tensor [label tokens, entropy, top-1 hits(, aux loss)]
        self._summed: dict[str, int] = {}  # mode -> micro-batches in it
        super().__init__(*args, **kwargs)
        parallel = self.accelerator.parallelism_config
        unsupported = {
            "compute_loss_func": self.compute_loss_func is not None,
            "label_smoothing_factor": self.label_smoother is not None,
            f"loss_type={self.args.loss_type!r}": self.args.loss_type != "nll",
            "sequence parallelism": parallel is not None and getattr(parallel, "sp_enabled", False),
        }
        if any(unsupported.values()):  # lora_search's own SFTConfig never sets these
            raise ValueError(f"the trial's trainer does not support {[k for k, v in unsupported.items() if v]}")

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None and self._make_optimizer is not None:
            self.optimizer = self._make_optimizer(self.model if model is None else model)
        return super().create_optimizer(model)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        import torch

        inputs.pop(fastpath.REAL_TOKENS, None)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_lm_head=True)
        tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages the gradients
        sums = [outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()]
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            sums.append(outputs.aux_loss.detach())
        with torch.no_grad():
            step = torch.stack([x.float() for x in sums])
            self._sums[mode] = step if mode not in self._sums else self._sums[mode] + step
            self._summed[mode] = self._summed.get(mode, 0) + 1
            if return_outputs:  # only asked for with compute_metrics: the logits, which the fused head never builds
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        real = inputs.get(fastpath.REAL_TOKENS)
        if real is None or self.args.include_num_input_tokens_seen == "no":
            super()._track_num_input_tokens(inputs)
            return
        if self.args.world_size > 1:  # every rank's count: a collective, as the Trainer's own
            import torch

            real = self.accelerator.gather(torch.as_tensor(real, device=self.args.device)).sum().item()
        self.state.num_input_tokens_seen += int(real)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums, n = self._sums.pop(mode, None), self._summed.pop(mode, 0)
        if sums is not None:
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            valid, entropy, correct, *aux = sums.tolist()  # the one read of the steps logged
            self._metrics[mode]["entropy"] = [entropy / valid if valid else 0.0]
            self._metrics[mode]["mean_token_accuracy"] = [correct / valid if valid else 0.0]
            if aux:
                self._metrics[mode]["aux_loss"] = [aux[0] / (n * self.accelerator.num_processes)]
        if mode == "train":
            self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        super().log(logs, start_time)


class _StepHook(TrainerCallback):
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
steps there, `trial_<id>_kernels.txt`, sorted by time. Off unless set; for finding where a trial's step goes."""


class _Throughput(TrainerCallback):
    """Steady-state tokens/s: tokens over wall seconds of training steps only, after `STEADY_AFTER_STEPS`, with the
    evaluations, saves and reports between them left out. The window is closed (device synchronised) at the end of
    each step that evaluates and reopened at the end of the next step, so eval and checkpoint time never count."""

    def __init__(self, name: str = "trial") -> None:
        self.name = name
        self.window: tuple[float, int] | None = None
        self.seconds, self.tokens = 0.0, 0
        self.profiler: Any = None

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @staticmethod
    def profiling() -> bool:
        return bool(os.environ.get(PROFILE_ENV))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiling() and state.global_step == STEADY_AFTER_STEPS and state.is_world_process_zero:
            import torch
            from torch.profiler import ProfilerActivity, profile

            cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self.profiler = profile(activities=[ProfilerActivity.CPU, *cuda])
            self.profiler.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step, tokens = int(state.global_step), int(state.num_input_tokens_seen)
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

    def first_step(self) -> int:
        """The step whose end opens the window: past the profiled steps when profiling, so they never count."""
        return STEADY_AFTER_STEPS + PROFILED_STEPS if self.profiling() else STEADY_AFTER_STEPS

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is not None:  # a trial shorter than the profiled steps: what it ran
            self._write_profile()

    def _write_profile(self) -> None:
        self._now()
        self.profiler.__exit__(None, None, None)
        out = Path(os.environ[PROFILE_ENV])
        table = self.profiler.key_averages().table(sort_by="self_device_time_total", row_limit=40)
        self.profiler = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{self.name}_kernels.txt").write_text(table)
        except OSError as e:  # a profile is for looking, never a reason to lose the trial
            log.warning("kernel profile not written: %s=%s: %s; set it to a writable dir", PROFILE_ENV, out, e)
            return
        log.info("kernel profile of steps %d-%d: %s", STEADY_AFTER_STEPS + 1, STEADY_AFTER_STEPS + PROFILED_STEPS, out)


class _Reporter(TrainerCallback):
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
        self.last_train_loss = float("nan")
        self.resumable = False
        self.warm = False
        self.tracker: resume.Tracker | None = None
        self.progress: resume.Progress | None = None
        self.earlier_train_s = 0.0
        """Training seconds of earlier attempts, up to the checkpoint this one resumed from."""
        self.pending: tuple[dict[str, Any], Path | None] | None = None
        self.throughput = _Throughput()
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
        self.prepare_s = self.train_start - self.trainer_built if self.trainer_built else 0.0

    def _golden_scores(self, adapter_dir: Path) -> dict[str, Any]:
        """Score the live adapted model on the golden sets (lm-eval); results JSON saved beside the adapter."""
        import json

        from lora_search import evals

        assert self.sweep.evals is not None
        start = time.perf_counter()
        evals.check_applied(self.model, self.probe[0])  # raises: a trial whose adapter does nothing gets no score
        scored = evals.score(self.model, self.tokenizer, self.sweep.evals, self.sweep.seed)
        if scored is None:  # a rank other than 0 of a sharded model: it took part, rank 0 reports
            return {}
        (adapter_dir / LM_EVAL_RESULTS).write_text(json.dumps(scored["results"], indent=1))
        out = {f"{GOLDEN_PREFIX}{k}": v for k, v in scored["metrics"].items()}
        out["objective"] = scored["objective"]
        out["objective_higher_is_better"] = scored["higher_is_better"]
        out["eval_s"] = time.perf_counter() - start
        return out

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        limit = self.sweep.resources.memory_limit_gb
        if limit is not None:
            peak, kind = peak_memory_bytes()
            if peak > limit * 2**30:
                raise results.infeasible(f"past resources.memory_limit_gb={limit:g} ({kind})", peak, state.global_step)
        if state.global_step >= state.max_steps:
            control.should_evaluate = True  # always report the final step, whatever eval_every is
        if self.rank0 and self.tracker is not None:
            self.tracker.step(int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            if not math.isfinite(self.last_train_loss):
                raise results.diverged("train_loss", self.last_train_loss, state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kw: Any) -> None:
        if state.global_step == 0:  # the base reference (eval_on_start); reported with every later result
            self.base_eval_loss = float(metrics["eval_loss"])
            self.base_eval_s = time.perf_counter() - self.train_start
            self.train_start = time.perf_counter()
            return

        if not math.isfinite(float(metrics["eval_loss"])):
            raise results.diverged("eval_loss", float(metrics["eval_loss"]), int(state.global_step))
        train_s = self.earlier_train_s + time.perf_counter() - self.train_start
        resources = self.sweep.resources
        per_worker_devices = resources.gpus_per_worker if resources.gpus_per_worker > 0 else resources.cpus_per_worker
        peak, peak_kind = peak_memory_bytes()
        step = int(state.global_step)
        report = {
            "step": step,
            "eval_loss": float(metrics["eval_loss"]),
            "base_eval_loss": self.base_eval_loss,
            "train_loss": self.last_train_loss,
            "trainable_params": self.n_trainable,
            "train_s": train_s,
            "load_s": self.load_s,
            # the rest of the cold start: see `_Reporter.startup_s`, `prepare_s`, `base_eval_s`
            "startup_s": self.startup_s,
            "imports_s": self.imports_s,
            "base_reused": self.base_reused,  # lent by this warm process's previous trial (`BaseCache`)
            "prepare_s": self.prepare_s,
            "base_eval_s": self.base_eval_s,
            # device-seconds: what a cloud bill counts (devices held x time), summed over the trial's workers
            "device_s": train_s * resources.workers * per_worker_devices,
            "tokens": int(state.num_input_tokens_seen),
            "tokens_per_s": state.num_input_tokens_seen / train_s if train_s > 0 else 0.0,
            "steady_tokens_per_s": self.throughput.per_s(),
            "peak_mem_bytes": peak,
            "peak_mem_kind": peak_kind,
            "device_name": device_name(),
            "worker_nodes": self.worker_nodes,
        }
        report["strategy"] = self.strategy.name
        report["fast_path"] = self.fast_path
        report["gpu_in_use_at_start_bytes"] = self.gpu_in_use_at_start
        report.update(_progress_fields(self.progress))
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
                report.update(self._golden_scores(out))
        log.info("step %d eval_loss %.4f", step, report["eval_loss"])
        self.pending = (report, out if self.rank0 or sharded else None)
        if not self.resumable:
            self._report()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Right after the Trainer saved its checkpoint of this step (DDP): it joins the adapter, then the report."""
        if self.pending is None:
            return
        report, out = self.pending
        if self.rank0 and out is not None:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (out / resume.TRAINER_DIR).mkdir()
            for pattern in TRAINER_FILES:
                for f in saved.glob(pattern):
                    f.replace(out / resume.TRAINER_DIR / f.name)
            shutil.rmtree(saved, ignore_errors=True)
        self._report()

    def _report(self) -> None:
        """Report the pending step (every rank takes part), with rank 0's checkpoint (`trial.report`)."""
        assert self.pending is not None
        (report, out), self.pending = self.pending, None
        checkpoint = None
        if self.rank0 and out is not None:
            (out / resume.REPORT_FILE).write_text(json.dumps(resume.json_safe(report)))
            checkpoint = out
            if self.resumable:  # before the upload: every checkpoint a restart may resume from has its line
                with self.reports_log.open("a") as f:
                    f.write(json.dumps(resume.json_safe(report)) + "\n")
        name = f"step_{report['step']:06d}"
        trial.report(report, checkpoint, name, self.run_dir, self.warm)
        if checkpoint is not None and self.resumable:
            (self.run_dir / name / resume.UPLOADED_FILE).touch()  # report() uploaded it (synchronously)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)  # Ray copied rank 0's into the sweep's storage
