"""Per-worker LoRA training: what every Ray Train worker of a trial runs (or a warm trial's own process).

Loads the base model and tokenizer (or takes the one a warm process kept, `BaseCache`), attaches the trial's adapter
(`lora_search.variants`), sizes its micro-batches (`lora_search.memory`), and trains with the trial's Trainer
(`lora_search.trainer`: TRL's SFTTrainer, completion-only loss on prompt/completion data). At every
`budget.eval_every` steps `lora_search.callbacks.Reporter` reports eval loss plus cost figures to Ray Train (and
through it to Tune, whose ASHA may stop the trial there) with a checkpoint: the adapter, and (DDP) the adapter's
training state as a Trainer checkpoint, so a trial whose worker, node or driver died trains on from there
(lora_search.checkpoints).

Run through `lora_search.trial`, never directly.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PrinterCallback, TrainerCallback

from lora_search import checkpoints, compiled_layers, data, environment, fastpath, strategies, targets, variants, varlen
from lora_search.callbacks import Reporter, StepHook, replay_reports
from lora_search.config import BaseModel, Sweep
from lora_search.devices import (
    device_name,
    gpu_memory_in_use,
    peak_memory_bytes,
    release_memory,
    reset_peak_memory,
    worker_nodes,
)
from lora_search.layout import TRAINER_DIR
from lora_search.memory import micro_batching
from lora_search.probe import probe_batch
from lora_search.records import TrialParams, infeasible
from lora_search.strategies import STRATEGIES
from lora_search.trainer import TrialTrainer
from lora_search.variants import VARIANTS, Adapter

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lora_search.train")


def load_base(base: BaseModel, quantized: bool, sharded: bool = False, attn: str | None = None) -> torch.nn.Module:
    """The base model; 4-bit NF4 for quantized variants. Unsharded NF4 loads straight onto the worker's GPU; under a
    sharding strategy the trainer places it, and the 4-bit weights are stored as bf16 so FSDP/ZeRO-3 can shard
    them like the rest of the layer (bitsandbytes' `quant_storage`). `attn`: the kernel a trial resolved
    (`fastpath.resolve_attention`); by default the base's own, with "auto" loading on SDPA."""
    import torch
    from transformers import AutoModelForCausalLM

    if attn is None:
        auto = base.attn_implementation == fastpath.AUTO_ATTENTION
        attn = fastpath.AUTO_FALLBACK if auto else base.attn_implementation
    if attn == varlen.NAME:
        varlen.register()
    kwargs: dict[str, Any] = {
        "revision": base.revision,
        "trust_remote_code": base.trust_remote_code,
        "attn_implementation": attn,
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
        if VARIANTS[variant].changes_base:
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
        release_memory()
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
        **dataclasses.asdict(params),
        target_modules=targets.resolve(targets.targets_from_key(params.targets), layers),
        total_steps=total_steps,
    )


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_name(budget_optimizer: str, quantized: bool, on_gpu: bool, fsdp: bool = False) -> str:
    """`Budget.optimizer` resolved to a Transformers `optim` name for this trial. Under FSDP2 the adapter's parameters
    are DTensors, which bitsandbytes' 8-bit kernels refuse ("got mixed torch.Tensor and DTensor", seen on an H200
    with FSDP-QLoRA): there 4-bit variants get fused AdamW, whose state FSDP shards over the workers anyway."""
    if budget_optimizer != "auto":
        return budget_optimizer
    if not on_gpu:
        return "adamw_torch"
    return "paged_adamw_8bit" if quantized and not fsdp else "adamw_torch_fused"


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

    strategies.deepspeed_when_used()
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
    found = checkpoints.candidates(run_dir, registered.path if registered is not None else None) if resumable else []
    restored, source = _restored(found, work)
    earlier = checkpoints.checkpoint_report(restored) if restored else {}
    tracker = checkpoints.ProgressTracker(Path(config["progress_file"]), config["tune_run"], config["tune_run_start"])
    progress = tracker.start(int(earlier.get("step", 0))) if rank0 else None
    reports_log = Path(config["progress_file"]).with_suffix(".reports.jsonl")
    if restored:
        replay_reports(reports_log, int(earlier["step"]), source, progress, run_dir, warm)
        if earlier["step"] >= budget.max_steps:
            shutil.rmtree(work, ignore_errors=True)
            return
    model_config = AutoConfig.from_pretrained(
        sweep.base.name_or_path, revision=sweep.base.revision, trust_remote_code=sweep.base.trust_remote_code
    )
    # ZeRO-3 keeps tensors up to this size whole on every rank: the adapter's, never the base's
    adapter_numel = strategies.adapter_param_bound(model_config, params.rank) if strategy.deepspeed else 0
    if strategy.deepspeed and not on_gpu:
        strategies.skip_cpu_shm_all_reduce()  # before the SFTConfig below starts DeepSpeed's backend
    # "auto" trains padded on SDPA until the rows are tokenized, then decides (`_auto_attention`)
    auto = sweep.base.attn_implementation == fastpath.AUTO_ATTENTION
    attn, attn_why = fastpath.resolve_attention(
        sweep.base.attn_implementation, on_gpu, model_config, lambda compile_s: (False, "")
    )
    attn_why = attn_why or "auto: until the rows are tokenized"
    chosen = fastpath.choose(on_gpu, model_config.model_type, attn, attn_why)
    path = chosen
    batching = micro_batching(sweep, params, on_gpu, liger=path.active("liger"))
    path = path.with_piece(batching.keep_activations).with_piece(batching.merge)
    world = context.get_world_size()
    path = path.with_piece(fastpath.token_budget(batching.micro, batching.accum, sweep.dataset.max_length, world))
    path = path.with_piece(fastpath.label_index(on_gpu, strategy.shards_base))
    # by tokens: the Trainer hands over a step's rows at once and the trial's trainer cuts them (`TOKEN_BUDGET_WHY`)
    by_tokens = path.active(fastpath.TOKEN_BUDGET)
    rows_a_batch, batches_a_step = (
        (budget.batch_size * budget.grad_accum, 1) if by_tokens else (batching.micro, batching.accum)
    )
    loaders = environment.value(environment.LOADER_WORKERS)
    loaders = int(on_gpu) if loaders is None else loaders
    # Built before the model loads: under ZeRO-3 it makes from_pretrained partition the weights as they load, under
    # FSDP it makes ranks > 0 load none (`strategies.trainer_kwargs`).
    args = SFTConfig(
        output_dir=str(work / "trainer"),
        max_steps=budget.max_steps,
        per_device_train_batch_size=rows_a_batch,
        per_device_eval_batch_size=budget.batch_size * 2,
        gradient_accumulation_steps=batches_a_step,
        learning_rate=params.lr,
        lr_scheduler_type=budget.lr_schedule,
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
        # A GPU trial's batches are read and collated by a loader process while the step before runs: in the
        # trial's own process that is ~10 ms a step (8 x 2,048 tokens) with the GPU idle (benchmarks/NOTES.md
        # change 31). A CPU trial keeps the cores for its products. `LORA_SEARCH_LOADER_WORKERS` sets the count.
        dataloader_num_workers=loaders,
        dataloader_persistent_workers=loaders > 0,
        # batches to the GPU from pinned memory without waiting for the device's queue to drain (Accelerate's
        # `non_blocking`; a copy from pageable memory waits for every kernel launched before it)
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": on_gpu},
        dataset_num_proc=None,
        optim=optimizer_name(budget.optimizer, variant.quantized, on_gpu, fsdp=strategy.fsdp),
        gradient_checkpointing=not path.active(fastpath.KEEP_ACTIVATIONS),
        # the rows of one optimizer step grouped by length where asked (`Budget.sampling`): a sampler group is
        # rows_a_batch x batches_a_step, the step's rows, whether the Trainer or the token budget cuts them
        train_sampling_strategy=budget.sampling,
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
        model = load_base(sweep.base, variant.quantized, sharded=strategy.shards_base, attn=attn)
    elif auto:  # a kept base may have trained its last trial padding-free
        fastpath.pretrained_model(model).set_attn_implementation(attn)
    torch.manual_seed(sweep.seed)  # the adapter starts the same whether its base was loaded or kept
    adapter = build_adapter(model, params, budget.max_steps)
    init_dir = work / "init_adapter"
    model = variants.attach(model, adapter, init_dir)
    base_fp32 = model.get_base_model().dtype == torch.float32
    path = path.with_piece(fastpath.bf16_inputs(args.bf16))
    path = path.with_piece(fastpath.fused_add(strategy.name, args.bf16, base_fp32))
    keep = path.active(fastpath.KEEP_ACTIVATIONS)
    path = path.with_piece(compiled_layers.piece(sweep.base.compile_layers, strategy.name, keep, variant.quantized))
    path.prepare_model(model)
    if path.active(compiled_layers.COMPILED_LAYERS):  # last: the layers compile what the pieces above made them
        compiled_layers.compile_layers(model)
    n_trainable = trainable_parameters(model)
    train_ds, eval_ds = data.load(sweep.dataset, sweep.seed)
    load_s = time.perf_counter() - start

    probe = probe_batch(tokenizer, eval_ds)
    reporter = Reporter(sweep, tokenizer, adapter, model, init_dir, work, rank0, n_trainable, load_s, probe)
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
        callbacks.append(StepHook(model, variant.step_hook))
    trainer = TrialTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=path.collator(tokenizer.pad_token_id),  # counts real tokens; `fastpath.NO_PAD_MASK`
        callbacks=callbacks,
        make_optimizer=(lambda m: variant.optimizer(m, adapter)) if variant.optimizer else None,
        token_budget=batching.micro * sweep.dataset.max_length if by_tokens else None,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to Tune, not one dict per log line
    if path.active(fastpath.LABEL_INDEX) and trainer.label_index_off:  # the head cannot take the positions
        path = path.with_piece(fastpath.Piece(fastpath.LABEL_INDEX, False, trainer.label_index_off))
        trainer.data_collator = path.collator(tokenizer.pad_token_id)
    if auto and on_gpu:  # the rows are tokenized now: padding-free where a varlen kernel works and pays
        micro_batches = budget.max_steps * batching.accum
        path = auto_fast_path(trainer, model_config, batching.micro, micro_batches, path, chosen)
    path = path.with_piece(fastpath.FROZEN_HEAP_PIECE)
    reporter.fast_path = path.summary()
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
    path.prepare()
    intact = False  # whether the base is as loaded (bar the adapter): kept for this process's next trial
    try:
        with fastpath.frozen_heap():  # `fastpath.FROZEN_HEAP_WHY`
            trainer.train(resume_from_checkpoint=str(restored / TRAINER_DIR) if restored else None)
        intact = True
    except torch.cuda.OutOfMemoryError as e:
        peak, _ = peak_memory_bytes()
        raise infeasible("CUDA out of memory", peak, trainer.state.global_step) from e
    except SystemExit:  # Tune stopped the trial (ASHA) at a report, between two steps
        intact = True
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if intact and cache_key is not None:
            BaseCache.keep(cache_key, model)


LENGTHS_SAMPLED = 20_000
"""Rows whose lengths `auto_fast_path` reads at most: a large dataset's whole column would cost seconds a trial."""


def auto_fast_path(
    trainer: Any, model_config: Any, rows: int, micro_batches: int, path: fastpath.FastPath, chosen: fastpath.FastPath
) -> fastpath.FastPath:
    """`attn_implementation="auto"` on a CUDA device, decided on the trial's tokenized rows (`trainer.train_dataset`):
    their lengths as the Trainer batches them (`rows` a micro-batch, `micro_batches` in the trial), the base's size
    and the GPU's peak (`memory.GPUS`; a GPU not listed counts as an H100, which can only make padding-free look
    less worth it) (`fastpath.padding_free_pays`, `resolve_attention`). Padding-free: the model trains on torch's
    varlen kernel (or flex attention) and the trainer's collator packs each micro-batch into one row. Returns `path`
    with `chosen`'s pieces (what `fastpath.choose` decided on SDPA) chosen again."""
    from lora_search.memory import GPUS

    model = trainer.model
    rows_seen = trainer.train_dataset
    if len(rows_seen) > LENGTHS_SAMPLED:  # evenly spaced: the padding estimate needs the spread, not every row
        rows_seen = rows_seen.select(range(0, len(rows_seen), -(-len(rows_seen) // LENGTHS_SAMPLED)))
    lengths = [len(ids) for ids in rows_seen["input_ids"]]
    name = device_name()
    peak = next((gpu.bf16_tflops for kind, gpu in GPUS.items() if kind.lower() in name.lower()), None)
    peak = peak or GPUS["H100"].bf16_tflops
    params = sum(p.numel() for p in model.parameters())
    grouped = trainer.args.train_sampling_strategy == "group_by_length"  # `Budget.sampling`: less padding to save

    def pays(compile_s: float) -> tuple[bool, str]:
        return fastpath.padding_free_pays(lengths, rows, micro_batches, params, peak, compile_s, grouped)

    attn, why = fastpath.resolve_attention(fastpath.AUTO_ATTENTION, True, model_config, pays)
    if attn != fastpath.AUTO_FALLBACK:
        fastpath.pretrained_model(model).set_attn_implementation(attn)
    again = {p.name for p in chosen.pieces}  # choose's pieces, chosen again; the batching and layer ones stay
    chosen = fastpath.choose(True, model_config.model_type, attn, why)
    path = fastpath.FastPath(chosen.pieces + tuple(p for p in path.pieces if p.name not in again))
    trainer.data_collator = path.collator(trainer.processing_class.pad_token_id)
    return path


def _restored(found: list[Path], work: Path) -> tuple[Path | None, str]:
    """The newest of the trial's complete checkpoints (`checkpoints.candidates`), copied into `work`, and where it is in
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
