"""A pack: several LoRA adapters training at once over one frozen base, each with its own rows, optimizer and schedule.

    from lora_search.pack import Pack, Training, packs
    pack = Pack(AutoModelForCausalLM.from_pretrained(base_dir))      # the base, loaded once
    pack.attach("t1", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), training=Training(lr=1e-3,
                total_steps=300))
    pack.attach("t2", LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["v_proj"]), training=...)
    step = pack.step({"t1": batch_1, "t2": batch_2})   # step.losses["t1"] is t1's loss, as a solo run computes it
    pack.save("t1", out_dir)      # a plain PEFT adapter dir: PeftModel.from_pretrained(base, out_dir) loads it
    kept = pack.state("t1"), pack.training_state("t1")     # its weights; its optimizer, schedule and step
    pack.detach("t2")             # e.g. ASHA stopped t2; the base stays loaded for the next adapter
    pack.attach("t1", config, kept[0], training=..., resume=kept[1])   # later, in this pack or another: t1 goes on

One step concatenates the adapters' micro-batches (right-padded to one length: pad token, attention mask 0, labels
-100), runs the base once, and in every targeted linear layer adds each adapter's update into its own rows only
(`pack_layers.PackedLinear`). Each adapter's loss is the mean over its own label tokens, as Transformers' causal-LM
loss computes it for a solo batch. The loss runs through the LM head a chunk of tokens at a time
(`memory.LOSS_CHUNK_LOGITS`), each chunk's gradient taken in its forward (`HEAD_LOSS`), so a step never holds the whole
batch's logits (32 rows x 2048 tokens of Llama-3's vocabulary would be 100 GB); bases whose forward does more than
`lm_head(hidden)` compute them whole (`memory.PLAIN_HEADS`). The backward runs on the sum of the losses: rows never
mix in a decoder (attention is within a row, norms are per token) and adapters share no parameters, so each adapter's
gradient is its solo gradient. Then each adapter clips its own gradients and steps its own AdamW and learning-rate
schedule, in the order the Transformers Trainer does. An adapter without a batch in a step sits that step out.

An adapter continues where it was (`training_state`, then `attach(..., init_state=its weights, resume=that state)`):
its AdamW moments and step count, its learning-rate schedule's position and its step, so its next step is the step an
uninterrupted run would take on the same batch. Not its dropout masks: `nn.Dropout` draws from the process's global
torch RNG, which every adapter of the pack shares (and whose draws depend on which adapters step together), so with
dropout > 0 the masks after a resume differ from those the uninterrupted run drew; with dropout 0 the run goes on
exactly.

Which variants pack is `packs(variant)`; the others train solo, for the reasons in `SOLO`.
tests/test_pack.py checks each packed adapter's loss curve against its solo PEFT run (fp32, CPU), a resumed one's too,
and the saved adapter against `PeftModel.from_pretrained`; benchmarks/pack.py measures packed against solo
trial-steps per second.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_search import fastpath, memory, pack_graphs, pack_layers
from lora_search.config import Schedule
from lora_search.pack_layers import PackedLinear, Rows, concat, config_problems, is_pissa, right_padded
from lora_search.problems import ConfigError, Problem
from lora_search.variants import VARIANTS

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel

Batch = Mapping[str, torch.Tensor]
"""One adapter's micro-batch as a collator gives it: input_ids and labels (rows x tokens), attention_mask optional."""
Placed = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, slice]]
"""A micro-batch of the pack on its device: (input_ids, attention_mask or None, labels, each adapter's rows)."""

PACKED = frozenset({"lora", "rslora", "loraplus", "pissa"})
"""Variants that differ from plain LoRA only in scaling (rsLoRA: alpha/sqrt(r)), optimizer (LoRA+: B's lr ratio) or
init (PiSSA: the base weight's top singular vectors, with a frozen correction in place of PEFT's write into the shared
base weight, `pack_layers.PackedLinear.correct`)."""

SOLO: dict[str, str] = {
    "dora": "DoRA rescales each output column by m / ||W + sBA||: a norm of the whole weight plus its update, per "
    "adapter and step (weight-sized work each), and with dropout a base product of its own on the dropped input; "
    "PackedLinear adds only low-rank products (it could share the base product, but is not built for it)",
    "adalora": "AdaLoRA trains an SVD form (P, singular values, Q), adds an orthogonality term to the loss and prunes "
    "ranks across all its modules after every step (a step hook): a different layer, loss and optimizer loop",
    "vera": "VeRA shares frozen random projections across all layers of an adapter and trains only scaling vectors: "
    "a different layer (its product is low-rank, so it could pack, but PackedLinear does not implement it)",
    "qlora": "QLoRA trains on an NF4 base (bitsandbytes' Linear4bit, CUDA only, norms cast to fp32 by "
    "prepare_model_for_kbit_training): it could pack only with other 4-bit adapters on one NF4 base; left out for now "
    "(PackedLinear wraps nn.Linear, and the CPU numerics test cannot cover it)",
    "loftq": "LoftQ is QLoRA with an init that only sets A and B (replace_lora_weights_loftq leaves the NF4 base as "
    "is): it would pack with QLoRA on one NF4 base, which is left out for now (see qlora)",
}
"""Why each other variant trains solo, one sentence each: for the plan and the log."""


def packs(variant: str) -> Literal[True] | str:
    """True when `variant` trains in a pack; otherwise why it trains solo. Raises ValueError for an unknown variant."""
    if variant not in VARIANTS:
        known = ", ".join(VARIANTS)
        raise ValueError(f"unknown variant {variant!r}; known: {known}; add new ones to VARIANTS in variants.py")
    unchecked = f"{variant} is not checked for packing yet: add it to PACKED or SOLO in lora_search/pack.py"
    return True if variant in PACKED else SOLO.get(variant, unchecked)


@dataclass(frozen=True, kw_only=True)
class Training:
    """One adapter's optimizer and schedule: AdamW (torch's betas and eps, as the Trainer's `adamw_torch`), clipped,
    its learning rate following a Transformers schedule (`get_scheduler`)."""

    lr: float
    total_steps: int
    """The schedule's length (`Budget.max_steps`): a pruned trial saw the rates a finished one saw up to there."""
    warmup_steps: int = 0
    schedule: Schedule = "linear"
    weight_decay: float = 0.0
    """On A and B alike (the Trainer decays every LoRA matrix); 0 is the Trainer's default and the sweeps'."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter's own gradient norm (the Trainer's default 1.0); None: no clipping."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: B's learning rate is this times A's, as PEFT's `create_loraplus_optimizer` groups them (variants.py
    uses 16). None: one learning rate."""

    def __post_init__(self) -> None:
        positive = "must be positive"
        checks = [
            ("lr", self.lr > 0, positive, "e.g. lr=1e-4"),
            ("total_steps", self.total_steps >= 1, "must be at least 1", "give the budget's max_steps"),
            ("warmup_steps", 0 <= self.warmup_steps < self.total_steps, "must be in [0, total_steps)", ""),
            ("weight_decay", self.weight_decay >= 0, "must not be negative", "0 turns it off"),
            ("max_grad_norm", (self.max_grad_norm or 1) > 0, positive, "None turns clipping off"),
            ("loraplus_lr_ratio", (self.loraplus_lr_ratio or 1) > 0, positive, "16 is LoRA+'s"),
        ]
        problems = [Problem(f, getattr(self, f), why, fix) for f, ok, why, fix in checks if not ok]
        if problems:
            raise ConfigError(problems, header="invalid Training")


@dataclass(frozen=True)
class PackStep:
    """What one pack step did, per adapter that took part."""

    losses: dict[str, float]
    """Each adapter's loss on its own micro-batch: the mean over its label tokens."""
    tokens: dict[str, int]
    """Label tokens each adapter's loss counts: its share of the step, to split the step's cost by."""
    seconds: float


@dataclass
class _Attached:
    config: LoraConfig
    modules: tuple[str, ...]
    """The base's module names it targets, in the base's order."""
    training: Training
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler

    def apply(self) -> None:
        """Clip and step as the Trainer does (clip_grad_norm_, optimizer.step()): the device work of an update, which
        a CUDA graph of the step captures (`pack_graphs`)."""
        if self.training.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.training.max_grad_norm)
        self.optimizer.step()
        self.wrote()

    def wrote(self) -> None:
        """Say the weights were written in place: bump their version counters, which the masked layers' stacks read
        to know they are stale (`pack_layers._Stack`). Torch's fused AdamW (the CUDA default, `_optimizer`) writes
        them without a bump, and a graph's replayed step (`pack_graphs`) writes them without the host seeing it."""
        torch.autograd.graph.increment_version(self.params)

    def advance(self) -> None:
        """Then the schedule's step and zero_grad, on the host: the learning rate for the next step (written into
        the optimizer's rate tensors where the step is a graph's)."""
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


class Pack:
    """The frozen base, held once, and the adapters attached to it. `pad_token_id` pads the concatenated batch
    (default: the base config's). The base's linear layers are wrapped in place as adapters target them.
    `checkpointing`: the decoder layers recompute their activations in the backward (Transformers' gradient
    checkpointing, non-reentrant; where an adapter or the base draws random numbers (dropout) the random state is kept,
    so the recompute draws the same masks again, and otherwise it is not read at all): the same gradients
    for a step's activations of one layer's size instead of every layer's (`memory.pack_fit` says when a pack needs
    it). The rows stay routed through the backward (`_routed`), so a recomputed layer adds each update to its rows.
    `drop_mask`: training and evaluation forwards go without the attention mask where every row is padded on the right
    (a solo trial's `fastpath.NO_PAD_MASK`: no real token sees a pad under causal attention, and SDPA runs causal
    flash); a step with a row padded on the left keeps its mask.
    `graphs`: on a GPU, a layout's steps (which adapters, their rows, the tokens a row rounded up) are captured as one
    CUDA graph once the layout has run `pack_graphs.WARMUP_STEPS` steps, and replayed: the step's thousands of
    launches become one (`pack_graphs` says what it needs and when it falls back)."""

    def __init__(
        self,
        model: PreTrainedModel,
        pad_token_id: int | None = None,
        checkpointing: bool = False,
        drop_mask: bool = False,
        graphs: bool = False,
    ) -> None:
        model.requires_grad_(False)
        self.checkpointing = checkpointing
        self._keeps_rng: bool | None = None  # what the recompute was last set to (`_recompute`)
        self.drop_mask = drop_mask
        pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            raise ValueError("the base has no pad_token_id: pass Pack(model, pad_token_id=tokenizer.pad_token_id)")
        self.model = model
        self.pad_token_id: int = pad
        self._rows = Rows()
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._packed: dict[str, PackedLinear] = {}
        self._adapters: dict[str, _Attached] = {}
        self.graphs = pack_graphs.Graphs(graphs, model.device)
        self._recompute()
        # a graph replays the optimizers' steps: their step counts and rates are device tensors (capturable)
        self._capturable = self.graphs.capture

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def attach(
        self,
        name: str,
        config: LoraConfig,
        init_state: Mapping[str, torch.Tensor] | None = None,
        *,
        training: Training,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        """Add adapter `name`: a LoRA of `config` (rank, alpha, dropout, target modules, rsLoRA) on the modules it
        targets, with its own optimizer and schedule. `init_state`: its starting A and B under PEFT's key names
        (`get_peft_model_state_dict`, an adapter_model.safetensors, a checkpoint); None draws PEFT's init from torch's
        RNG. `resume`: a `training_state` of this adapter (same config and `training`), with `init_state` its weights
        at that step: it goes on from there (its optimizer and schedule as they were). Raises ConfigError naming every
        problem (a variant the pack cannot compute, a target that matches no linear layer, missing or misshapen init
        tensors, a resume without its weights or of another adapter's optimizer)."""
        config = copy.deepcopy(config)
        modules = [m for m in self._linears if _targets(config, m)]
        problems = self._problems(name, config, modules, init_state)
        if resume is not None:
            problems += _resume_problems(resume, init_state, 2 * len(modules))
            if is_pissa(config.init_lora_weights) and modules:
                problems += _pissa_resume_problems(resume, self._shapes(config, tuple(modules)))
        if problems:
            raise ConfigError(problems, header=f"adapter {name!r} cannot join the pack")
        scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)  # PEFT's
        for module in modules:
            layer = self._packed[module] if module in self._packed else self._wrap(module)
            # PEFT's autocast_adapter_dtype: a half-precision base trains fp32 adapter weights.
            dtype = layer.base_layer.weight.dtype
            dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            layer.add(
                name,
                r=config.r,
                scaling=scaling,
                dropout=config.lora_dropout,
                dtype=dtype,
                init=config.init_lora_weights if init_state is None else False,
                config=config,
            )
        keyed = self._keyed(name, tuple(modules))
        if init_state is not None:
            with torch.no_grad():
                for key, param in keyed.items():
                    param.copy_(init_state[key])
            if is_pissa(config.init_lora_weights):  # its correction: the weights it started from
                initial = init_state if resume is None else resume["pissa_init"]
                for m in modules:
                    self._packed[m].correct(name, initial[_key(m, "lora_A")], initial[_key(m, "lora_B")])
        optimizer = _optimizer(keyed, training, self._capturable)
        from transformers import get_scheduler

        schedule = get_scheduler(training.schedule, optimizer, training.warmup_steps, training.total_steps)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])  # its moments, step counts and rates, on the params' device
            schedule.load_state_dict(resume["schedule"])
            _rates_as(optimizer, self._capturable)
        self._adapters[name] = _Attached(config, tuple(modules), training, list(keyed.values()), optimizer, schedule)
        self.graphs.forget()  # every layer's layouts changed
        self._recompute()

    def detach(self, name: str) -> None:
        """Remove adapter `name`, its optimizer state with it. A layer left with no adapter is unwrapped: with every
        adapter detached the model is the base as loaded."""
        attached = self._adapters.pop(self._known(name))
        self.graphs.forget()
        self._recompute()
        for module in attached.modules:
            layer = self._packed[module]
            layer.remove(name)
            if not layer.adapters:
                parent, _, child = module.rpartition(".")
                setattr(self.model.get_submodule(parent), child, layer.base_layer)
                del self._packed[module]

    def step(self, batches: Mapping[str, Batch], micro_batches: int = 1) -> PackStep:
        """One optimizer step of every adapter in `batches` (name -> its rows for the step), through one forward and
        one backward of the base, or `micro_batches` of them: each adapter's rows cut into that many nearly equal
        runs (`torch.tensor_split`), the i-th of every adapter's run through the base together, the gradients summed
        before the adapters step. Each micro-batch's loss is divided by the adapter's label tokens in the whole step,
        as Transformers divides an accumulated step's (`num_items_in_batch`), so the gradients are the one-batch
        step's to float rounding (dropout draws other masks). `memory.pack_fit` says how many a pack needs."""
        start = time.perf_counter()
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches}: give at least 1")
        if not self.model.training:  # train() walks every module: not once a step
            self.model.train()
        for n in batches:
            self._known(n)
        # in the order the adapters attached, whatever order their batches came in (a host's trials send theirs as
        # they come): one step's layout, stacks and graph for the same adapters, not one per arrival order
        batches = {n: batches[n] for n in self._adapters if n in batches}
        tokens = {n: int((_shifted(b["labels"]) != -100).sum()) for n, b in batches.items()}
        runs = {n: _runs(b, micro_batches) for n, b in batches.items()}
        parts = [{n: r[i] for n, r in runs.items() if i < len(r)} for i in range(micro_batches)]
        parts = [part for part in parts if part]
        # None: this step runs as it comes (a recompute that keeps the random state reads it on the host)
        random_recompute = self.checkpointing and bool(self._keeps_rng)
        layout = self.graphs.layout(parts, self.drop_mask, random_recompute)
        losses = self.graphs.replay(self, layout, parts, tokens) if layout is not None else None
        if losses is None:
            length = layout.length if layout is not None else None  # a layout's warm-up steps run its graph's shape
            placed = [self._placed(part, self.drop_mask, length) for part in parts]
            total = self.device_step(placed, {n: max(t, 1) for n, t in tokens.items()})
            values = torch.stack(list(total.values())).tolist()  # the step's one device sync
            losses = dict(zip(total, values, strict=True))
        for name in batches:
            self._adapters[name].advance()
        return PackStep(
            losses=losses,
            tokens={n: int(t) for n, t in tokens.items()},
            seconds=time.perf_counter() - start,
        )

    def device_step(
        self, placed: list[Placed], divisors: Mapping[str, float | torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A step's device work: each placed micro-batch (`_placed`) through the base forward and backward, each
        adapter's loss its rows' token losses summed over `divisors[name]` (its label tokens in the whole step: a
        number, or a device tensor a graph reads), then every adapter's clip and optimizer step (`_Attached.apply`)
        and the masked layers' stacks recast. Returns each adapter's loss summed over the micro-batches, on the
        device. What `pack_graphs` captures; the schedules' steps come after (`_Attached.advance`)."""
        total: dict[str, torch.Tensor] = {}
        for ids, mask, labels, blocks in placed:
            self._rows.blocks = blocks
            try:
                per_token = self._per_token(ids, mask, labels)
                losses = {n: per_token[rows].sum() / divisors[n] for n, rows in blocks.items()}
                torch.stack(list(losses.values())).sum().backward()
            finally:
                self._rows.blocks = {}
            for n, loss in losses.items():
                total[n] = total[n] + loss.detach() if n in total else loss.detach()
        for name in total:
            self._adapters[name].apply()
        # the masked products' stacked weights, recast from the updated ones in a few kernels for every layer
        pack_layers.refresh_stacks([layer.last_stack for layer in self._packed.values()])
        return total

    def draws_random(self) -> bool:
        """Whether a training step draws random numbers: an attached adapter's dropout, or the base's own (any
        dropout probability in its config above 0)."""
        config = self.model.config.to_dict()
        base = any(isinstance(v, float) and v > 0 for k, v in config.items() if "dropout" in k)
        return base or any(a.config.lora_dropout > 0 for a in self._adapters.values())

    def _recompute(self) -> None:
        """With `checkpointing`, (re)set the decoder layers' recompute: the random state kept only where a step draws
        random numbers (`draws_random`), so a pack without dropout reads no RNG state on the host and its steps can
        be captured (`pack_graphs`)."""
        if not self.checkpointing or self._keeps_rng == (keep := self.draws_random()):
            return
        import warnings

        with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable; both take this
            warnings.simplefilter("ignore", FutureWarning)
            kwargs = {"use_reentrant": False, "preserve_rng_state": keep}
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._keeps_rng = keep

    def layers(self) -> list[PackedLinear]:
        """The base's wrapped linear layers, in the base's order."""
        return list(self._packed.values())

    def wrote(self, names: list[str]) -> None:
        """The named adapters' weights were written where the host did not see it (a graph's replayed step):
        `_Attached.wrote` for each."""
        for name in names:
            self._adapters[name].wrote()

    @torch.no_grad()
    def evaluate(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        """Each adapter's loss on its batch, without dropout or gradients; the logits a chunk at a time, as a step
        computes them (an evaluation's batch need not fit whole logits either)."""
        self.model.eval()
        with self._routed(batches, self.drop_mask) as (ids, mask, labels, blocks):
            losses = _losses(labels, self._per_token(ids, mask, labels), blocks)
        return dict(zip(losses, torch.stack(list(losses.values())).tolist(), strict=True))

    @torch.no_grad()
    def logits(self, batches: Mapping[str, Batch]) -> dict[str, torch.Tensor]:
        """Each adapter's logits on its batch (eval mode), cut back to the batch's own length: whole, through the
        model's own forward (what is asked for is all of them)."""
        self.model.eval()
        with self._routed(batches) as (ids, mask, _, blocks):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return {n: logits[rows, : batches[n]["input_ids"].shape[1]] for n, rows in blocks.items()}

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s A and B under PEFT's key names (what `get_peft_model_state_dict` gives), copied."""
        attached = self._adapters[self._known(name)]
        return {k: p.detach().clone() for k, p in self._keyed(name, attached.modules).items()}

    def steps(self, name: str) -> int:
        """The optimizer steps adapter `name` has taken (from its resumed step on, if it was resumed)."""
        return int(self._adapters[self._known(name)].schedule.last_epoch)  # one schedule step per optimizer step

    def training_state(self, name: str) -> dict[str, Any]:
        """What adapter `name` continues from besides its weights (`state`), for `attach(..., resume=)`: its step (the
        optimizer steps it took), its optimizer's state dict (AdamW's moments and step count per parameter, its
        groups' rates) and its schedule's; for PiSSA, "pissa_init": the A0 and B0 it started from under PEFT's keys
        (its correction's, which a resume must keep: a second SVD would draw others). Copied onto the CPU: it saves
        with `torch.save` and loads with `torch.load(weights_only=True)`, and travels to a process without the pack's
        device."""
        attached = self._adapters[self._known(name)]
        initial = self._initial(name)
        return {
            "step": self.steps(name),
            "optimizer": _on_cpu(_rates_plain(attached.optimizer.state_dict())),
            "schedule": _rates_plain(copy.deepcopy(attached.schedule.state_dict())),
            **({"pissa_init": _on_cpu(initial)} if initial is not None else {}),
        }

    def save(self, name: str, out_dir: Path | str) -> Path:
        """Write adapter `name` as a standard PEFT dir (adapter_config.json, adapter_model.safetensors) that
        `PeftModel.from_pretrained(base, out_dir)` loads onto the base as loaded. A PiSSA adapter is saved as PEFT
        saves a solo one (`save_pretrained(path_initial_model_for_weight_conversion=)`): plain LoRA of twice the
        rank, A' = [A; A0] and B' = [B | -B0], alpha doubled (x sqrt 2 under rsLoRA) so the scaling stays."""
        from peft.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self._adapters[self._known(name)].config)
        config.base_model_name_or_path = config.base_model_name_or_path or self.model.config._name_or_path
        config.inference_mode = True
        config.init_lora_weights = True  # the saved weights are what counts; reloading re-runs no data-driven init
        tensors = self.state(name)
        if (initial := self._initial(name)) is not None:  # PEFT's `subtract_mutated_init`, and its config change
            for key, t in tensors.items():
                tensors[key] = torch.cat([t, initial[key]]) if ".lora_A." in key else torch.cat([t, -initial[key]], 1)
            config.r *= 2
            config.lora_alpha *= 2**0.5 if config.use_rslora else 2
        config.save_pretrained(str(out))
        save_file(
            {k: t.contiguous() for k, t in tensors.items()},
            str(out / SAFETENSORS_WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        return out

    def plain_copy(self) -> PreTrainedModel:
        """The base as loaded, without any adapter layer: a second module tree over this pack's own weight tensors
        (no copy of any weight: it costs no device memory), for running PEFT on beside the pack, as
        `PeftModel.from_pretrained(pack.plain_copy(), adapter_dir)` to score a saved adapter.

        The weights are frozen and shared: whatever uses the copy must never write into them (PEFT's LoRA does
        not; PiSSA-style inits and merges would, and never run on it). The copy's modules, training mode and
        config are its own."""
        model = self.model
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}  # deepcopy's memo: kept, not copied
        copy_ = copy.deepcopy(model, shared)
        for module in [n for n, m in copy_.named_modules() if isinstance(m, PackedLinear)]:
            parent, _, child = module.rpartition(".")
            setattr(copy_.get_submodule(parent), child, copy_.get_submodule(module).base_layer)
        return copy_

    def _problems(
        self, name: str, config: LoraConfig, modules: list[str], init_state: Mapping[str, torch.Tensor] | None
    ) -> list[Problem]:
        problems = config_problems(config, init_given=init_state is not None)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            problems.append(Problem("name", name, "is not a plain name", "use letters, digits, _ and - (no dots)"))
        if name in self._adapters:
            problems.append(Problem("name", name, "is attached already", f"detach it first; attached: {self.names}"))
        if not modules and config.target_modules != "all-linear":
            suffixes = sorted({m.rsplit(".", 1)[-1] for m in self._linears})
            problems.append(
                Problem(
                    "config.target_modules",
                    config.target_modules,
                    "matches no linear layer",
                    f"name some of {suffixes}",
                )
            )
        if init_state is not None and modules and not problems:
            problems += _init_problems(init_state, self._shapes(config, tuple(modules)))
        return problems

    def _shapes(self, config: LoraConfig, modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        shapes = {}
        for m in modules:
            layer = self._linears[m]
            shapes[_key(m, "lora_A")] = (config.r, layer.in_features)
            shapes[_key(m, "lora_B")] = (layer.out_features, config.r)
        return shapes

    def _wrap(self, module: str) -> PackedLinear:
        layer = PackedLinear(self._linears[module], self._rows)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent), child, layer)
        self._packed[module] = layer
        return layer

    def _initial(self, name: str) -> dict[str, torch.Tensor] | None:
        """A PiSSA adapter's A0 and B0 (its correction's, `PackedLinear.correct`) under PEFT's keys; None for others."""
        out = {}
        for m in self._adapters[self._known(name)].modules:
            if (ab := self._packed[m].correction(name)) is None:
                return None
            out[_key(m, "lora_A")], out[_key(m, "lora_B")] = ab
        return out or None

    def _keyed(self, name: str, modules: tuple[str, ...]) -> dict[str, nn.Parameter]:
        """PEFT key -> parameter, A then B per module, in the base's module order."""
        out = {}
        for m in modules:
            out[_key(m, "lora_A")] = self._packed[m].lora_A[name].weight
            out[_key(m, "lora_B")] = self._packed[m].lora_B[name].weight
        return out

    def _known(self, name: str) -> str:
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r} in the pack; attached: {self.names}")
        return name

    def chunked_head(self) -> nn.Linear | None:
        """The LM head when a step computes its loss a chunk of tokens at a time from the decoder's output (a base in
        `memory.PLAIN_HEADS`, its head a plain nn.Linear, tied to the input embedding or not); None where the logits
        are computed whole through the model's forward (another architecture, or an adapter on the head, whose rows a
        chunk would not route)."""
        head = self.model.get_output_embeddings()
        plain = self.model.config.model_type in memory.PLAIN_HEADS and type(head) is nn.Linear
        return head if plain else None

    def _per_token(self, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Run the base once on the packed batch: the cross-entropy of each token (rows x tokens; each row's labels
        shifted one left, 0 where the label is -100), on the fp32-upcast logits as Transformers' causal-LM loss
        computes it. Through the decoder and then the head a chunk at a time (`_chunked_cross_entropy`) where
        `chunked_head` allows, else through the model's forward on the whole batch's logits."""
        shifted = _shifted(labels)
        head = self.chunked_head()
        # without a mask the rows are right-padded, one sequence each: no device read to ask (`fastpath.UNPACKED_WHY`)
        with fastpath.rows_unpacked(enabled=mask is None), fastpath.causal_when_capturing(enabled=mask is None):
            if head is None:
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                flat = nn.functional.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), reduction="none")
            else:
                decoder = self.model.get_decoder()
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                flat = _chunked_cross_entropy(head, hidden.flatten(0, 1), shifted.flatten())
        return flat.view_as(shifted)

    @contextmanager
    def _routed(
        self, batches: Mapping[str, Batch], drop_mask: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, slice]]]:
        """Concatenate the batches and route each adapter to its rows; yield the packed (input_ids, attention_mask,
        labels) and each adapter's rows; with `drop_mask`, the mask is None where every row is padded on the right
        (`Pack` says why). The routing stays set until the block ends, so the base's forward and a backward inside
        it (and any recompute of a checkpointed layer) see the same rows."""
        ids, mask, labels, blocks = self._placed(batches, drop_mask)
        self._rows.blocks = blocks
        try:
            yield ids, mask, labels, blocks
        finally:
            self._rows.blocks = {}

    def _placed(self, batches: Mapping[str, Batch], drop_mask: bool = False, length: int | None = None) -> Placed:
        """The batches concatenated on the base's device (`concat`, right-padded to their longest or to `length`)
        with each adapter's rows; with `drop_mask`, the mask None where every row is padded on the right."""
        for n in batches:
            self._known(n)
        ids, mask, labels, blocks = concat(batches, self.pad_token_id, self.model.device, length)
        # concat pads on the right, so the packed rows are right-padded where each batch's are; read on the batches'
        # own masks (the CPU's) rather than the packed one on the GPU, a device read before every forward
        return ids, None if drop_mask and right_padded(batches) else mask, labels, blocks


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """Each row's labels shifted one left (the token each position predicts), -100 after the last."""
    return nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


def _runs(batch: Batch, n: int) -> list[Batch]:
    """The batch's rows cut into `n` nearly equal runs (`torch.tensor_split`), the empty ones (fewer rows than runs)
    left out."""
    split = {key: value.tensor_split(n) for key, value in batch.items()}
    return [{key: parts[i] for key, parts in split.items()} for i in range(n) if split["input_ids"][i].shape[0]]


def _losses(labels: torch.Tensor, per_token: torch.Tensor, blocks: dict[str, slice]) -> dict[str, torch.Tensor]:
    """Each adapter's loss: the mean cross-entropy over its own label tokens (`per_token`: `Pack._per_token`), as
    Transformers' causal-LM loss computes it for a solo batch. The cross-entropy runs once over the packed batch, and
    each adapter sums its rows of it: a cut of the logits per adapter would cost a logits-sized gradient per adapter
    (or one concatenation of them) in the backward."""
    shifted = _shifted(labels)
    return {n: per_token[rows].sum() / (shifted[rows] != -100).sum() for n, rows in blocks.items()}


HEAD_LOSS: Literal["fused", "checkpointed"] = "fused"
"""How a step's chunked loss takes its gradient where the head is frozen (`_chunked_cross_entropy`): "fused", each
chunk's gradient computed in its forward (`_HeadCrossEntropy`), or "checkpointed", each chunk recomputed in the
backward (what a head that trains runs). benchmarks/pack.py's `--head-loss checkpointed` times the other in the same
run: on an H100, "fused" ran 6% faster captured on the 135M shape at k = 4, 2.6% on the 1.1B shape
(benchmarks/NOTES.md, change 46)."""


def _chunked_cross_entropy(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`cross_entropy(head(hidden).float(), labels, reduction="none")` (hidden: tokens x hidden size), computed
    `memory.loss_chunk_tokens` tokens at a time, so the forward and the backward each hold one chunk's logits.

    With gradients on, the head frozen (a pack's base is; an adapter on the head turns chunking off,
    `Pack.chunked_head`) and `HEAD_LOSS` "fused", each chunk's gradient to `hidden` is computed in the forward
    (`_HeadCrossEntropy`): one head product a chunk in the forward and one in its gradient, and no recompute.
    Otherwise each chunk is checkpointed (non-reentrant: it keeps only its slice of `hidden`, a view, and recomputes
    its logits when the backward reaches it); the head draws no random numbers, so no RNG state is kept for the
    recompute."""
    size = max(1, memory.LOSS_CHUNK_LOGITS // head.out_features)  # as memory.loss_chunk_tokens counts it

    def chunk(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(head(h).float(), y, reduction="none")

    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return torch.cat([chunk(h, y) for h, y in zip(hidden.split(size), labels.split(size), strict=True)])
    if HEAD_LOSS == "fused" and not any(p.requires_grad for p in head.parameters()):
        return _HeadCrossEntropy.apply(head, hidden, labels, size)
    parts = [
        checkpoint(chunk, h, y, use_reentrant=False, preserve_rng_state=False)
        for h, y in zip(hidden.split(size), labels.split(size), strict=True)
    ]
    return torch.cat(parts)


class _HeadCrossEntropy(torch.autograd.Function):
    """Each token's cross-entropy of a frozen head's fp32-upcast logits (-100: no label, loss 0), with its gradient
    to the hidden state computed in the forward, a chunk of tokens at a time: softmax minus the label's one-hot, cast
    to the head's dtype, times the head's weight, as the autograd of `chunk` in `_chunked_cross_entropy` computes it.
    The backward only scales each token's row by its incoming gradient (each token's loss depends on its own row
    alone), so no chunk's logits are recomputed: one head product less a chunk than a checkpointed chunk, and the
    softmax's forward and backward in one pass.

    Liger's fused linear cross-entropy does this (and a head's weight gradient) in Triton, but reads the count of
    labelled tokens back to the host (`.item()`, linkedin/Liger-Kernel#1292, open), which a CUDA graph cannot
    capture, so the pack's captured steps could not use it. Ours is plain torch: no host read, captured with the
    rest of a step (`pack_graphs`)."""

    @staticmethod
    def forward(ctx: Any, head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
        # written a chunk at a time: the gradient (one hidden state's size, the one extra tensor a step holds from
        # its loss's forward to its backward) is never held twice, as a concatenation of chunks would
        losses = hidden.new_empty(labels.shape, dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], size):
            h, y = hidden[start : start + size], labels[start : start + size]
            logits = head(h).float()
            lse = logits.logsumexp(-1)
            keep = y != -100
            label = y.masked_fill(~keep, 0)[:, None]
            losses[start : start + size] = torch.where(keep, lse - logits.gather(1, label).squeeze(1), 0.0)
            softmax = logits.sub_(lse[:, None]).exp_()  # in place: the fp32 logits are not needed again
            softmax.scatter_add_(1, label, -keep[:, None].to(softmax.dtype))
            # unlabelled tokens zeroed on the product (tokens x hidden), not on the softmax (tokens x vocab)
            grad[start : start + size] = (softmax.to(head.weight.dtype) @ head.weight) * keep[:, None]
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return None, (grad.float() * grad_losses[:, None]).to(grad.dtype), None, None


def _key(module: str, matrix: str) -> str:
    """PEFT's saved key of a LoRA matrix (PeftModel prefix, no adapter name)."""
    return f"base_model.model.{module}.{matrix}.weight"


def _targets(config: LoraConfig, module: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, module))  # an excluded module is falsy


def _init_problems(init_state: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> list[Problem]:
    fix = "give the state dict of an adapter of the same LoraConfig (rank, target modules)"
    problems = [
        Problem("init_state", sorted(keys)[:3], f"{why.format(len(keys))}", fix)
        for keys, why in (
            (set(shapes) - set(init_state), "lacks {} tensor(s) the config targets"),
            (set(init_state) - set(shapes), "has {} tensor(s) the config does not target"),
        )
        if keys
    ]
    for k, shape in shapes.items():
        if k in init_state and tuple(init_state[k].shape) != shape:
            problems.append(Problem(k, tuple(init_state[k].shape), f"should have shape {shape}", fix))
    return problems


def _resume_problems(
    resume: Mapping[str, Any], init_state: Mapping[str, torch.Tensor] | None, n_params: int
) -> list[Problem]:
    problems = []
    if init_state is None:
        why = "comes without the adapter's weights"
        problems.append(Problem("resume", resume.get("step"), why, "pass init_state: its weights at that step"))
    try:
        given = sum(len(g["params"]) for g in resume["optimizer"]["param_groups"])
        ok = "schedule" in resume and given == n_params
    except (KeyError, TypeError):
        given, ok = -1, False
    if not ok:
        fix = "give the `Pack.training_state` of an adapter of the same LoraConfig (rank, target modules)"
        problems.append(Problem("resume", f"{given} optimizer parameters", f"should have {n_params}", fix))
    return problems


def trained_weights(saved: Mapping[str, torch.Tensor], training: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An adapter's own A and B (`Pack.state`'s, what `attach(init_state=)` resumes from) out of what `Pack.save` wrote
    (adapter_model.safetensors, loaded) and its `training_state`. Those are the same tensors, but for PiSSA's: saved
    converted ([A; A0] and [B | -B0], `Pack.save`), its own are the first rows of A' and columns of B', as many as
    its A0 in "pissa_init" has rows."""
    initial = training.get("pissa_init")
    if initial is None:
        return dict(saved)
    return {k: t[: initial[k].shape[0]] if ".lora_A." in k else t[:, : initial[k].shape[1]] for k, t in saved.items()}


def _pissa_resume_problems(resume: Mapping[str, Any], shapes: dict[str, tuple[int, int]]) -> list[Problem]:
    """A PiSSA adapter resumes with the A0 and B0 it started from (`Pack.training_state`'s "pissa_init")."""
    initial = resume.get("pissa_init") if isinstance(resume, Mapping) else None
    if not isinstance(initial, Mapping):
        why = "has no pissa_init: the A0 and B0 a PiSSA adapter started from (its correction)"
        return [Problem("resume", sorted(resume)[:4], why, "give the `Pack.training_state` of this PiSSA adapter")]
    named = {"init_state": "resume.pissa_init"}
    return [
        Problem(named.get(p.field, f"resume.pissa_init[{p.field!r}]"), p.value, p.message, p.fix)
        for p in _init_problems(initial, shapes)
    ]


def _on_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_on_cpu(v) for v in state)
    return state


def _optimizer(params: dict[str, nn.Parameter], training: Training, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW over the adapter's A and B; with LoRA+, B in a group of its own at `loraplus_lr_ratio` times the rate
    (PEFT's `create_loraplus_optimizer` puts "lora_B" parameters there). Fused on CUDA (one multi-tensor kernel a
    group), as a solo GPU trial's "adamw_torch_fused" (`train.optimizer_name`); torch's default on a CPU, as a solo
    CPU trial's "adamw_torch". `capturable`: a CUDA graph replays its step (`pack_graphs`), so its step counts live
    on the device and its rates are device tensors the schedule writes into (torch's capturable AdamW)."""
    ratio = training.loraplus_lr_ratio
    if ratio is None:
        groups: list[dict[str, Any]] = [{"params": list(params.values())}]
    else:
        a = [p for k, p in params.items() if "lora_B" not in k]
        b = [p for k, p in params.items() if "lora_B" in k]
        groups = [{"params": a}, {"params": b, "lr": training.lr * ratio}]
    fused = all(p.is_cuda for p in params.values())
    optimizer = torch.optim.AdamW(
        groups, lr=training.lr, weight_decay=training.weight_decay, fused=fused or None, capturable=capturable
    )
    return _rates_as(optimizer, capturable)


def _rates_as(optimizer: torch.optim.Optimizer, tensors: bool) -> torch.optim.Optimizer:
    """Each group's rate ("lr", "initial_lr") as a 0-d tensor on its parameters' device (`tensors`: a captured step
    reads it there, and the schedule fills it in place) or as a float; `optimizer`, changed in place."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        for key in ("lr", "initial_lr"):
            if key not in group:
                continue
            value = group[key]
            if tensors and not isinstance(value, torch.Tensor):
                group[key] = torch.tensor(float(value), device=device)
            elif tensors:
                group[key] = value.to(device)
            elif isinstance(value, torch.Tensor):
                group[key] = float(value)
    return optimizer


def _rates_plain(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or schedule's state dict with its rates as floats (a capturable optimizer's are device
    tensors): a checkpoint that resumes on any device and optimizer kind. `state`, changed in place."""
    for group in state.get("param_groups", []):
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
    for key in ("base_lrs", "_last_lr"):
        if key in state:
            state[key] = [float(v) if isinstance(v, torch.Tensor) else v for v in state[key]]
    return state
