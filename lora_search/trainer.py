"""The trial's Trainer: TRL's SFTTrainer with a variant's own optimizer, per-step metrics kept on the device, and a
seeded length-grouped sampler.

The one subclass lora_search needs of a framework class (the Trainer builds optimizers and computes the loss itself;
both are hooks only a subclass reaches). Built by lora_search.train for every trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trl import SFTTrainer

from lora_search import fastpath, fused_lora


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
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            out[key] = value
        elif padded:
            out[key] = value.index_select(0, index.to(value.device))[:, :length]  # (a no-op where pinned above)
        else:
            out[key] = value[:, span]
    return out
