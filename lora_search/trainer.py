"""The trial's Trainer: TRL's SFTTrainer with a variant's own optimizer, per-step metrics kept on the device, and a
seeded length-grouped sampler.

The one subclass lora_search needs of a framework class (the Trainer builds optimizers and computes the loss itself;
both are hooks only a subclass reaches). Built by lora_search.train for every trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trl import SFTTrainer

from lora_search import fastpath, fused_lora, varlen


class TrialTrainer(SFTTrainer):
    """SFTTrainer that builds a variant's own optimizer (LoRA+) when the Trainer builds optimizers: after FSDP or
    DeepSpeed has wrapped the model, where passing a ready optimizer is refused (or would hold stale parameters).

    Its loss is TRL's (the fused LM head's per-token log-probs, divided by the step's label tokens), with the
    per-micro-batch metrics kept on the device (`fastpath.FEW_SYNCS_WHY`): entropy and token accuracy are summed
    there and read once per log step, as token-weighted means over the steps logged; tokens seen come from the
    collator's CPU count (`fastpath.REAL_TOKENS`)."""

    def __init__(
        self,
        *args: Any,
        make_optimizer: Callable[[Any], Any] | None = None,
        token_budget: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._make_optimizer = make_optimizer
        self.token_budget = token_budget  # split each step's batch into micro-batches of this many tokens at most
        self._micro_batches = 0  # of the step being split
        self._sums: dict[str, Any] = {}  # mode -> device tensor [label tokens, entropy, top-1 hits(, aux loss)]
        self._summed: dict[str, int] = {}  # mode -> micro-batches in it
        self._flop_params: int | None = None  # `floating_point_ops`'s parameter count, counted once
        self._clipped: list[Any] | None = None  # `_clip_grad_norm`'s parameters: the trainable ones
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
        # None: the head takes `label_index` where batches carry `fastpath.LABEL_MASK`; else why it cannot
        self.label_index_off: str | None = indexed_lm_head(self.model)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None and self._make_optimizer is not None:
            self.optimizer = self._make_optimizer(self.model if model is None else model)
        optimizer = super().create_optimizer(model)
        # The one-node LoRA layers' cached casts (`fused_lora.Casts`) recast after every step, a few foreach kernels
        # for all of them; without the hook each layer would recast its own in the next forward (found by version).
        register = getattr(optimizer, "register_step_post_hook", None)  # a torch optimizer (not DeepSpeed's stand-in)
        if register is not None and not getattr(optimizer, "_lora_search_refreshes_casts", False):
            layers = fastpath.plain_lora_layers(self.model)
            register(lambda *_: fused_lora.refresh_casts(layers))
            optimizer._lora_search_refreshes_casts = True
        return optimizer

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """`Budget.sampling="group_by_length"`: Transformers' `LengthGroupedSampler` over the step's rows, drawn from
        a generator of its own seeded with the sweep's data seed. The Trainer's draws from torch's global generator
        wherever it stands when the sampler is made (a resumed trial has restored its checkpoint's), so a trial could
        see other rows a step than its sweep's others; the Trainer's random order is seeded already."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            dataset=self.train_dataset if train_dataset is None else train_dataset,
            model_input_name="input_ids",
            generator=torch.Generator().manual_seed(seed),
        )

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        """With a `token_budget`, the step's rows (one batch: the collator's `ROW_TOKENS` list them) run as
        micro-batches of at most that many tokens (`fastpath.TOKEN_BUDGET_WHY`), each a forward and backward whose
        loss is divided by the step's label tokens (`num_items_in_batch`); returns their sum, the step's loss."""
        rows = inputs.pop(fastpath.ROW_TOKENS, None)
        if self.token_budget is None or rows is None:
            return super().training_step(model, inputs, num_items_in_batch)
        padded = self._padded_batches()
        chunks = fastpath.token_chunks(rows, self.token_budget, padded)
        loss, self._micro_batches = None, len(chunks)
        try:
            for i, chunk in enumerate(chunks):
                part = _rows_of(inputs, chunk, rows, padded)
                if i == 1:  # the Trainer's `model.train()` once a step, not once a micro-batch (`_train_mode_kept`)
                    model.__dict__["train"] = _train_mode_kept(model)
                step = super().training_step(model, part, num_items_in_batch)
                loss = step if loss is None else loss + step
        finally:
            self._micro_batches = 0
            model.__dict__.pop("train", None)
        return loss

    def _padded_batches(self) -> bool:
        """Whether the collator pads rows (one sequence each) rather than packing them padding-free."""
        return not getattr(self.data_collator, "padding_free", False)

    # Host time between steps (benchmarks/NOTES.md change 31): the GPU waits while the host walks the model's modules
    # and parameters. The 8B shape with its adapters has 2,665 modules and 739 parameters: `model.train()` took 6.4 ms
    # and `num_parameters()` 5.5 ms on this project's CPU, each step, in the Trainer's loop.

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's count (6 x tokens x non-embedding parameters) with the parameters counted once: it walks
        every parameter of the model on every step, and the count cannot change while the trial trains."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_params

    def _clip_grad_norm(self, model: Any) -> Any:
        """The Trainer's clip over the trainable parameters alone where one process trains unsharded: the norm and the
        clip are the same (frozen parameters have no gradients), without filtering 739 parameters for the few with
        one each step. Sharded and distributed trials clip as the Trainer does."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.NO:
            return super()._clip_grad_norm(model)
        if self._clipped is None:
            self._clipped = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._clipped, self.args.max_grad_norm)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        import torch

        inputs.pop(fastpath.REAL_TOKENS, None)
        inputs.pop(fastpath.ROW_TOKENS, None)  # eval batches list their rows too; they run whole
        counted = inputs.pop(fastpath.LABEL_MASK, None)
        lengths = inputs.pop(fastpath.SEQ_LENGTHS, None)
        if lengths is not None:  # a padding-free row: its sequences for varlen kernels, without a device read
            inputs.update(varlen.cu_lengths(lengths, inputs["input_ids"].shape[1], inputs["input_ids"].device))
        # (an all-masked micro-batch goes to TRL's head, as does every batch where the indexed head is not there)
        if counted is not None and self.label_index_off is None and counted[:, 1:].any():
            inputs["label_index"] = _label_positions(counted, inputs["labels"].device)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        # The forward under its own name in a profile (`lora_search.idle` names a gap by the host ops around it; the
        # backward's ops carry autograd's names and the optimizer step torch's): about 1 us when no profiler runs.
        with (
            torch.profiler.record_function(f"lora_search.{mode}_forward"),
            fastpath.inference_attention(model, enabled=mode == "eval"),  # step-0 and rung evals
            fastpath.rows_unpacked(enabled=self._padded_batches()),
        ):
            outputs = model(**inputs, fused_lm_head=True)
        tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages the gradients
        sums = [outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()]
        if self.aux_loss_enabled:
            accumulated = self._micro_batches or self.current_gradient_accumulation_steps
            steps = accumulated if num_items_in_batch is not None else 1
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


def _train_mode_kept(model: Any) -> Callable[..., Any]:
    """`model.train` for the later micro-batches of one step: the first's call set every module to training mode and
    nothing between them evaluates, so the call returns at once instead of walking every module again. Any other
    mode asked for still walks them (`nn.Module.train`)."""

    def train(mode: bool = True) -> Any:
        return model if mode else type(model).train(model, mode)

    return train


def _rows_of(inputs: dict[str, Any], chunk: list[int], rows: list[int], padded: bool) -> dict[str, Any]:
    """The micro-batch of `inputs` holding the rows `chunk`: padded (rows x tokens), those rows cut to the longest of
    them; padding-free (one packed row), the span of their tokens."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}
    if padded:
        index = torch.tensor(chunk)
        # pinned and copied without waiting: a plain copy from pageable memory waits for the device's whole queue
        # (the last micro-batch's backward) before the next forward is launched
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if device is not None and device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
        length = max(rows[i] for i in chunk)
    else:
        start = sum(rows[: chunk[0]])
        span = slice(start, start + sum(rows[i] for i in chunk))
    for key, value in inputs.items():
        if isinstance(value, np.ndarray) and value.ndim >= 2:  # `fastpath.LABEL_MASK`, cut as the labels are
            out[key] = value[chunk, :length] if padded else value[:, span]
        elif key == fastpath.SEQ_LENGTHS:  # a padding-free row's sequences: those of the chunk's rows
            out[key] = value[chunk]
        elif not isinstance(value, torch.Tensor) or value.dim() < 2:
            out[key] = value
        elif padded:
            out[key] = value.index_select(0, index.to(value.device))[:, :length]  # (a no-op where pinned above)
        else:
            out[key] = value[:, span]
    return out


def _label_positions(counted: Any, device: Any) -> Any:
    """The flat positions (row x tokens) whose next label counts, from `counted` (`fastpath.LABEL_MASK`, NumPy),
    on `device`: copied from pinned memory without a wait on CUDA (`fastpath.LABEL_INDEX_WHY`)."""
    import numpy as np
    import torch

    scored = np.zeros_like(counted)
    scored[:, :-1] = counted[:, 1:]  # position t predicts label t + 1 (TRL's shift)
    positions = torch.from_numpy(np.flatnonzero(scored))
    if device.type == "cuda":
        return positions.pin_memory().to(device, non_blocking=True)
    return positions.to(device)


LM_HEAD_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
"""Text-config fields by which TRL's fused head scales or caps the logits (`add_fused_lm_head`): a base with any of
them set keeps TRL's head, which applies them; `indexed_lm_head` scores plain logits."""


def indexed_lm_head(model: Any) -> str | None:
    """Let the causal LM under `model` (TRL's fused LM head already added, as SFTTrainer does) take `label_index`:
    the flat positions (rows x tokens, `_label_positions`) to score, known on the CPU, in place of TRL's boolean mask
    of the labels on the device, which waits for the device twice a micro-batch (`fastpath.LABEL_INDEX_WHY`). The
    rows go to TRL's own kernel (`trl.kernels.ChunkedLogProbFunction`) with the arguments TRL's head gives it, and
    the output is TRL's `FusedCausalLMOutput`; without `label_index`, TRL's head runs. Ours because TRL's head has no
    way to be told the positions. Returns None where it was added (or was there), else why not: a base whose logits
    TRL scales or caps (`LM_HEAD_SCALES`), or one without TRL's head."""
    import functools
    import types

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = getattr(base, "forward", None)
    if getattr(fused, "_lora_search_label_index", False):
        return None
    text = base.config.get_text_config()
    # TRL's forward carries the model's name (`functools.wraps`); its code keeps its own
    code = getattr(getattr(fused, "__func__", None), "__code__", None)
    if not isinstance(fused, types.MethodType) or code is None or code.co_name != "_fused_forward":
        return "the model has no TRL fused LM head to index"
    scaled = [name for name in LM_HEAD_SCALES if getattr(text, name, None) is not None]
    if scaled:
        return f"the base's logits are scaled or capped ({', '.join(scaled)}): TRL's head applies it"
    routed = bool(getattr(text, "output_router_logits", False))  # a mixture of experts' aux loss: TRL's head adds it

    @functools.wraps(fused)
    def forward(self: Any, *args: Any, label_index: Any = None, **kwargs: Any) -> Any:
        trl_only = kwargs.get("shift_labels") is not None or kwargs.get("output_router_logits") or routed
        if label_index is None or not kwargs.get("fused_lm_head") or trl_only:  # TRL's head: its aux loss, its shift
            return fused(*args, **kwargs)
        return _indexed_forward(self, label_index, args, kwargs)

    forward._lora_search_label_index = True  # type: ignore[attr-defined]
    base.forward = types.MethodType(forward, base)
    return None


HEAD_OUTPUTS = ("log_probs", "entropy", "is_top1")
"""The per-token fields SFTTrainer asks TRL's fused head for (its `add_fused_lm_head(outputs=...)`)."""


def _indexed_forward(model: Any, label_index: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """TRL's fused head (`add_fused_lm_head`'s forward, compact path) over the positions `label_index`."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    kwargs.pop("fused_lm_head")
    labels = kwargs.pop("labels")
    kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state
    head = model.get_output_embeddings()
    rows, length = labels.shape
    label_index = label_index.to(hidden.device)
    flat = hidden.reshape(rows * length, hidden.size(-1)).index_select(0, label_index)
    targets = labels.to(hidden.device).reshape(-1).index_select(0, label_index + 1)
    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    per_token = ChunkedLogProbFunction.apply(
        flat, head.weight, head.bias, targets, 1.0, chunk, None, 1.0, HEAD_OUTPUTS
    )  # temperature 1, no softcap, logit scale 1: SFTTrainer's head on a base without `LM_HEAD_SCALES`

    def spread(x: Any) -> Any:  # back to (rows, length - 1), zero where no label counts, as TRL's masked_scatter
        if x is None:
            return None
        return x.new_zeros(rows * length).index_copy(0, label_index, x).view(rows, length)[:, :-1]

    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (spread(x) for x in per_token)
    mask = labels[:, 1:] != -100
    tokens = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return trl_utils.FusedCausalLMOutput(
        loss=-log_probs.sum() / tokens,
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
        aux_loss=None,
    )
