"""The fast trial path: which pieces turn on where, and that padding-free batches train the same curve as padded ones
(a real TRL SFTTrainer run on CPU, completion-only loss, rows of very different lengths)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora_search import fastpath
from lora_search.config import Dataset

WORDS = "the a cat dog bird red blue green big small runs eats sleeps".split()


def test_choose_names_every_piece_and_why() -> None:
    cpu = fastpath.choose(on_gpu=False, model_type="llama", attn="sdpa")
    assert [p.name for p in cpu.pieces] == ["liger", "padding-free", "attention", "no-pad-mask", "few-syncs"]
    assert not cpu.active("liger") and "no CUDA" in cpu.summary()
    # SDPA has no varlen kernel: padding-free would cost T^2 attention, so it stays off and says so
    assert not cpu.active("padding-free") and "no varlen kernel" in cpu.summary()
    assert cpu.active("attention") and cpu.trainer_args() == {}
    # padded rows, right-padded, without their mask; every collator counts the real tokens on the CPU
    assert cpu.active("no-pad-mask") and cpu.active("few-syncs")
    batch = cpu.collator(0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert "attention_mask" not in batch and batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch[fastpath.REAL_TOKENS] == 4 and batch["labels"].tolist()[1] == [8, -100, -100]

    varlen = fastpath.choose(on_gpu=False, model_type="llama", attn="flash_attention_2")
    assert varlen.active("padding-free") and varlen.collator(0).padding_free is True
    assert not varlen.active("no-pad-mask") and "have no padding" in varlen.summary()

    unknown = fastpath.choose(on_gpu=False, model_type="gpt2", attn="flash_attention_2")
    assert not unknown.active("padding-free") and "'gpt2' is not known" in unknown.summary()
    assert not unknown.active("no-pad-mask") and "'gpt2' is not known to build its causal mask" in unknown.summary()
    kept = unknown.collator(0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert kept["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and kept[fastpath.REAL_TOKENS] == 4
    eager = fastpath.choose(on_gpu=False, model_type="llama", attn="eager")
    assert not eager.active("attention") and not eager.active("no-pad-mask")


def test_liger_falls_back_piece_by_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(fastpath.importlib.util, "find_spec", lambda name: None if name == "triton" else real(name))
    assert "liger off (no Triton)" in fastpath.choose(on_gpu=True, model_type="llama", attn="sdpa").summary()
    monkeypatch.setattr(
        fastpath.importlib.util, "find_spec", lambda name: object() if name == "triton" else None
    )  # Triton present, liger-kernel not
    assert "liger-kernel not installed" in fastpath.choose(on_gpu=True, model_type="llama", attn="sdpa").summary()
    monkeypatch.setattr(fastpath.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(fastpath, "_liger_models", lambda: frozenset({"llama"}))
    on = fastpath.choose(on_gpu=True, model_type="llama", attn="sdpa")
    assert on.active("liger") and on.trainer_args() == {"use_liger_kernel": True}
    assert "no kernels for 'gpt2'" in fastpath.choose(on_gpu=True, model_type="gpt2", attn="sdpa").summary()


def test_a_packs_base_runs_the_solo_trials_base_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack's base (`pack_path`) takes the pieces of a solo trial's path that belong to the base, each on or off as
    the solo trial's on the same device, architecture and kernel; not the Trainer's or PEFT's layers' pieces."""
    monkeypatch.setattr(fastpath.importlib.util, "find_spec", lambda name: object())  # Triton and Liger "present"
    monkeypatch.setattr(fastpath, "_liger_models", lambda: frozenset({"llama"}))
    gpu = fastpath.pack_path(on_gpu=True, model_type="llama", attn="sdpa")
    assert [p.name for p in gpu.pieces] == ["liger", "attention", "no-pad-mask", "no-cudnn-sdpa"]
    assert all(p.active for p in gpu.pieces)
    assert "liger on (rms_norm, swiglu, rope on the shared base; the pack scores" in gpu.summary()
    assert fastpath.PACK_LIGER["fused_linear_cross_entropy"] is False and fastpath.PACK_LIGER["cross_entropy"] is False
    cpu = fastpath.pack_path(on_gpu=False, model_type="llama", attn="sdpa")
    assert cpu.summary().startswith("liger off (no CUDA device)") and cpu.active("no-pad-mask")
    assert not cpu.active(fastpath.CUDNN_OFF)
    eager = fastpath.pack_path(on_gpu=True, model_type="gpt2", attn="eager")
    assert not eager.active("liger") and not eager.active("no-pad-mask") and "no kernels for 'gpt2'" in eager.summary()


def test_gpu_sdpa_trials_keep_off_cudnn_attention() -> None:
    import torch

    gpu = fastpath.choose(on_gpu=True, model_type="llama", attn="sdpa")
    assert gpu.active(fastpath.CUDNN_OFF) and "20 ms of CPU" in gpu.summary()
    # not on CPU, nor with a kernel other than SDPA
    assert not fastpath.choose(on_gpu=False, model_type="llama", attn="sdpa").active(fastpath.CUDNN_OFF)
    assert not fastpath.choose(on_gpu=True, model_type="llama", attn="flash_attention_2").active(fastpath.CUDNN_OFF)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        fastpath.choose(on_gpu=False, model_type="llama", attn="sdpa").prepare()
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU trial leaves the switch alone
        gpu.prepare()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _rows(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))  # 2..40 words: lots of padding
            f.write(
                json.dumps(
                    {"id": f"r{i}", "instruction": "Repeat the last word.", "input": words, "output": words.split()[-1]}
                )
                + "\n"
            )
    return path


def _run(
    model_dir: Path,
    train: Path,
    evaluation: Path,
    collator: object | None,
    attn: str,
    ours: bool = False,
    batch: int = 8,
    accum: int = 1,
    token_budget: int | None = None,
    loaders: int = 0,
    configure: Callable[[object], None] | None = None,
) -> tuple[list[float], list[dict], object]:
    """12 steps of LoRA through TRL's SFTTrainer (or, `ours`, the trial's `lora_search.trainer.TrialTrainer`): the
    training and eval losses in order, every log, and the Trainer's state; `loaders` processes read the batches. The
    state's `train_modes` holds, for each step's end, whether every module was in training mode and the model had no
    `train` of its own left (`lora_search.trainer._train_mode_kept`). `configure` changes the base first."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_search import data
    from lora_search.trainer import TrialTrainer

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []
            self.logs: list[dict] = []

        def on_step_end(self, args, state, control, model=None, **kw) -> None:
            modes = getattr(state, "train_modes", [])
            state.train_modes = [*modes, all(m.training for m in model.modules()) and "train" not in model.__dict__]

        def on_log(self, args, state, control, logs=None, **kw) -> None:
            self.logs.append(dict(logs or {}))
            for key in ("loss", "eval_loss"):
                if logs and key in logs:
                    self.values.append(float(logs[key]))

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    if configure is not None:  # changes to the base before its adapter
        configure(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    train_ds, eval_ds = data.load(Dataset(str(train), eval_path=str(evaluation), max_length=64), seed=0)
    losses = Losses()
    args = SFTConfig(
        output_dir=str(
            train.parent / f"out_{attn}_{collator is not None}_{ours}_{batch}x{accum}_{token_budget}_{loaders}"
        ),
        max_steps=12,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=6,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=loaders,
        dataloader_persistent_workers=loaders > 0,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=not ours,
    )
    trainer = (TrialTrainer if ours else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[losses],
        **({"token_budget": token_budget} if ours else {}),
    )
    trainer.train()
    return losses.values, losses.logs, trainer.state


def _curve(model_dir: Path, train: Path, evaluation: Path, collator: object | None, attn: str) -> list[float]:
    return _run(model_dir, train, evaluation, collator, attn)[0]


def _pieces(*names: str) -> fastpath.FastPath:
    return fastpath.FastPath(tuple(fastpath.Piece(n, True, "test") for n in names))


def _same(a: list[float], b: list[float], what: str, tolerance: float = 2e-4) -> None:
    assert len(a) == len(b) == 12 + 2, (len(a), len(b))  # 12 training losses, 2 eval losses
    assert min(a) < a[0] - 0.3, f"the run must learn for the comparison to mean anything: {a}"
    print(f"\n{what}: max |difference| over {len(a)} losses: {max(abs(x - y) for x, y in zip(a, b, strict=True)):.2e}")
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(x - y) <= tolerance * max(1.0, abs(x)), f"{what}, entry {step}: {x} vs {y}"


def torch_varlen_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Train on "torch_varlen" on the CPU: torch's varlen kernel is CUDA only, so causal SDPA on each sequence alone
    stands in for it (`varlen.varlen`), in training forwards only. What runs for real is lora_search's part around
    the kernel: the collator's sequence lengths (`fastpath.SEQ_LENGTHS`), cut with each micro-batch, handed to every
    attention call as cumulative lengths, and the layouts in and out. Each call checks its lengths against the
    position ids the model got (a sequence starts where they restart) and that they came from the collator, not from
    the device. The kernel itself is checked against SDPA on the GPU (tests/test_varlen.py). Returns the sequences of
    each call."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface

    from lora_search import varlen

    calls: list[int] = []

    def kernel(q: Any, k: Any, v: Any, cu: Any, longest: int, scale: float | None) -> Any:
        parts = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            assert end - start <= longest
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            parts.append(out[0].transpose(0, 1))
        return torch.cat(parts)

    def checked(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        cu = kwargs["cu_seq_lens_q"]
        starts = torch.nonzero(kwargs["position_ids"].reshape(-1) == 0).reshape(-1)
        assert cu[:-1].tolist() == starts.tolist() and int(cu[-1]) == query.shape[2], (cu, starts)
        assert kwargs["max_length_q"] == int(cu.diff().max())
        assert module.training  # inference forwards (the evals) run on SDPA
        calls.append(len(cu) - 1)
        return varlen.attention(module, query, key, value, attention_mask, **kwargs)

    def never(*args: Any) -> Any:
        raise AssertionError("the sequences were looked for on the device: the collator's lengths did not arrive")

    monkeypatch.setattr(varlen, "varlen", kernel)
    monkeypatch.setattr(varlen, "sequences", never)
    monkeypatch.setitem(AttentionInterface._global_mapping, varlen.NAME, checked)
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager", "torch_varlen"])
def test_padding_free_trains_the_same_curve(
    tiny_model_dir: Path, tmp_path: Path, attn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 steps of LoRA on rows of 2..40 words: every training and eval loss of the padding-free run equals the
    padded run's to float32 rounding (the same tokens count, each sequence sees only itself). torch_varlen trains
    through lora_search's attention function (`torch_varlen_on_cpu`) against padded SDPA, its evals on SDPA."""
    from transformers import AutoTokenizer

    calls = torch_varlen_on_cpu(monkeypatch) if attn == "torch_varlen" else []
    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    padded = _curve(tiny_model_dir, train, evaluation, None, "sdpa" if attn == "torch_varlen" else attn)
    free, _, _ = _run(tiny_model_dir, train, evaluation, _pieces("padding-free").collator(pad_id), attn, ours=True)
    # The stand-in kernel sums in another order than padded SDPA. AdamW's first steps move a weight by about the
    # learning rate whatever its gradient's size, so float32 rounding in near-zero gradients grows into the curve:
    # padding-free SDPA already differs by up to 1e-4 of the loss here. One step is checked to 1e-5 in test_varlen.
    _same(padded, free, f"{attn}: padded vs padding-free", tolerance=4e-4 if attn == "torch_varlen" else 2e-4)
    if attn == "torch_varlen":  # each step's forward and its recompute in backward (TRL checkpoints), every layer
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
        assert len(calls) == 2 * 12 * layers and max(calls) == 8 and min(calls) > 1


def test_unknown_gradient_checkpointing_setting_is_refused() -> None:
    from lora_search import Budget
    from lora_search.checks import field_problems

    problems = field_problems(Budget(gradient_checkpointing="sometimes"), "budget")
    assert [(p.field, p.value) for p in problems] == [("budget.gradient_checkpointing", "sometimes")]
    assert "'auto', 'on', 'off'" in problems[0].message


def test_adapter_inputs_stay_bf16_under_autocast_with_the_same_loss_and_gradients(tiny_model_dir: Path) -> None:
    """A bf16 base with fp32 LoRA weights under bf16 autocast (a GPU trial's setting, here on the CPU's autocast):
    without PEFT's fp32 copy of each layer's input the loss and every adapter gradient are the same, DoRA's
    layers keep the cast, and off autocast the piece says why it is off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    seen: list[torch.dtype] = []  # the dtype each run's first lora_A layer is given

    def run(config: LoraConfig, keep: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        model = get_peft_model(base, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a trained adapter: B != 0, so the inputs' path reaches the loss
                torch.nn.init.normal_(param, std=0.02)
        kept = fastpath.keep_input_dtype(model) if keep else 0
        first = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
        first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
        x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        loss = loss.detach()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
        return float(loss), grads, kept

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    cast_loss, cast_grads, _ = run(lora, keep=False)
    kept_loss, kept_grads, kept = run(lora, keep=True)
    assert kept == 2 * 7  # 2 layers x 7 projections
    assert seen == [torch.float32, torch.bfloat16]  # PEFT's cast, then none
    assert kept_loss == cast_loss
    for name, grad in cast_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    dora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, use_dora=True)
    assert run(dora, keep=True)[2] == 0 and seen[-1] == torch.float32

    assert fastpath.bf16_inputs(True).active
    off = fastpath.bf16_inputs(False)
    assert not off.active and "no bf16 autocast" in off.why


def test_golden_scoring_runs_on_fast_path_layers_under_the_trials_autocast(tiny_model_dir: Path) -> None:
    """Golden scoring generates through the base model's forward, outside Accelerate's autocast wrapper, and lm-eval
    wraps its forwards in an autocast of its own: the fast path's layers (bf16 inputs to fp32 adapter weights) raise
    there unless the trial's scoring asks lm-eval for bf16 too (`autocast_bf16`, as the GPU trial does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search.config import Evals
    from lora_search.evals import score

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    assert fastpath.keep_input_dtype(model) == fastpath.fuse_lora_add(model) == 2 * 7
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = str(Path(__file__).resolve().parents[1] / "evals" / "tasks")
    golden = Evals(tasks=("tiny_antonym", "tiny_mood"), objective="tiny_mood/acc", tasks_dir=tasks, limit=4)
    with pytest.raises(RuntimeError, match="dtype"), fastpath.autocast(model, bf16=True):
        score(model, tokenizer, golden, seed=0)  # lm-eval's own autocast(enabled=False) turns the outer one off
    with fastpath.autocast(model, bf16=True):
        scored = score(model, tokenizer, golden, seed=0, autocast_bf16=True)
    assert {"tiny_antonym/exact_match", "tiny_mood/acc"} <= set(scored["metrics"])


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "fp32-mixed-ranks"])
def test_fused_lora_add_gives_peft_outputs_and_gradients(
    tiny_model_dir: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused forward (scaling on the rank-r intermediate, the update accumulated by addmm) against PEFT's own,
    with dropout off: the same logits and adapter gradients, in fp32 (to 1e-5) and under bf16 autocast (to bf16
    rounding), and with siblings of different ranks and scalings (PEFT's rank and alpha patterns); merged or disabled
    adapters fall back to PEFT's forward."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    nodes: dict[str, int] = {}

    def run(fused: bool, mode: str = "groups") -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        model = _tiny_lora(tiny_model_dir, dtype, alpha=16, patterns=precision == "fp32-mixed-ranks")
        if fused:
            assert fastpath.fuse_lora_add(model) == 2 * 7
        x = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            out = model(input_ids=x, labels=x)
        nodes[mode if fused else "peft"] = (
            _graph_nodes(out.loss, "LoraLinearBackward"),
            _graph_nodes(out.loss, "LoraGroupBackward"),
        )
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach().float(), grads, (model, x)

    from lora_search import fused_lora

    peft_logits, peft_grads, _ = run(fused=False)
    fused_logits, fused_grads, (model, x) = run(fused=True)
    monkeypatch.setenv(fused_lora.LORA_GROUPS, "0")  # speed.py's +ungrouped: every layer its own node
    alone_logits, alone_grads, _ = run(fused=True, mode="alone")
    monkeypatch.setenv(fused_lora.ONE_NODE_ENV, "0")  # speed.py's +two-node: the fused add on autograd's graph
    two_node_logits, two_node_grads, _ = run(fused=True, mode="two-node")
    monkeypatch.setenv(fused_lora.ONE_NODE_ENV, "off")  # not a value it takes: said with the fix
    with pytest.raises(ValueError, match="LORA_SEARCH_LORA_ONE_NODE='off': give 1 .* or 0"):
        run(fused=True)
    monkeypatch.delenv(fused_lora.ONE_NODE_ENV)
    monkeypatch.delenv(fused_lora.LORA_GROUPS)
    # each decoder layer: q/k/v and gate/up as one group node each, o and down one node each (no dropout); with the
    # groups off all 7 one node each; with one node off, autograd's graph; PEFT's its own graph
    assert nodes == {"groups": (2 * 2, 2 * 2), "alone": (2 * 7, 0), "two-node": (0, 0), "peft": (0, 0)}
    tol = {"rtol": 2e-2, "atol": 2e-2} if precision == "bf16-autocast" else {"rtol": 1e-5, "atol": 1e-5}
    for logits in (fused_logits, alone_logits, two_node_logits):
        torch.testing.assert_close(logits, peft_logits, **tol)
    for name, grad in peft_grads.items():
        assert grad.abs().max() > 0, name
        for grads in (fused_grads, alone_grads, two_node_grads):
            torch.testing.assert_close(grads[name].float(), grad.float(), **tol, msg=name)

    # PEFT's forward where the fused one does not apply: adapters off give the base alone, merged the same logits
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        with model.disable_adapter():
            base_logits = model(input_ids=x).logits.float()
        model.merge_adapter()
        merged_logits = model(input_ids=x).logits.float()
    assert (base_logits - fused_logits).abs().max() > 1e-3  # the adapter changes the output...
    torch.testing.assert_close(merged_logits, fused_logits, **{**tol, "atol": max(tol["atol"], 1e-4)})

    assert fastpath.fused_add("ddp", True, False).active and fastpath.fused_add("ddp", False, True).active
    assert "gathers weights" in fastpath.fused_add("deepspeed-zero3", True, False).why
    assert not fastpath.fused_add("ddp", False, False).active


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_cached_adapter_casts_train_as_peft_does_and_follow_every_weight_change(
    tiny_model_dir: Path, precision: str
) -> None:
    """The one-node layers read their adapter as cached casts (`fused_lora.Casts`: scaling * A and B in the products'
    dtype). Three AdamW steps give PEFT's own weights, whether the casts are refreshed by the optimizer's post-step hook
    (`refresh_casts`, what a trial registers) or found stale by their versions; a checkpoint-style load in place is
    caught by the version too."""
    import torch

    from lora_search import fused_lora

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    x = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(2))

    def train(mode: str) -> tuple[dict[str, torch.Tensor], object]:
        model = _tiny_lora(tiny_model_dir, dtype, alpha=12)
        layers = fastpath.plain_lora_layers(model)
        if mode != "peft":
            fastpath.fuse_lora_add(model)
        # bf16: Adam turns a rounding-level gradient difference into a whole step (lr) either way, so a small lr
        lr = 1e-2 if precision == "fp32" else 1e-4
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        if mode == "hook":
            opt.register_step_post_hook(lambda *_: fused_lora.refresh_casts(layers))
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
                model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, (model, layers)

    peft, _ = train("peft")
    hooked, (model, layers) = train("hook")
    lazy, _ = train("versions")
    # bf16: PEFT's own graph and lora_search's one node round differently; 3 Adam steps of 1e-4 bound the drift (the
    # two-node path drifts as far: 5.8e-4 against this path's 5.7e-4, measured when this test was written)
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 0.0, "atol": 1e-3}
    for name, weight in peft.items():
        torch.testing.assert_close(hooked[name], weight, **tol, msg=name)
        torch.testing.assert_close(lazy[name], hooked[name], rtol=0, atol=0, msg=name)  # the same casts, bit for bit

    # after the hook's refresh every cast is current: a forward finds them valid and casts nothing new
    layer = layers[0]
    (entry,) = layer.__dict__[fused_lora.CASTS].values()
    a = layer.lora_A["default"].weight
    cast_dtype = entry.a.dtype
    torch.testing.assert_close(entry.a, (a.detach() * entry.scaling).to(cast_dtype), rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        model(input_ids=x)
    assert layer.__dict__[fused_lora.CASTS]["default"] is entry
    # a load in place (as a checkpoint restore writes the weights) bumps the version: the next forward recasts
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        a.copy_(torch.zeros_like(a))
        model(input_ids=x)
    fresh = layer.__dict__[fused_lora.CASTS]["default"]
    assert fresh is not entry and not fresh.a.any()


@pytest.mark.gpu
def test_grouped_lora_layers_match_peft_on_the_gpu(tiny_model_dir: Path) -> None:
    """On CUDA under bf16 autocast, with siblings of different ranks and scalings: the grouped and one-node layers give
    PEFT's logits and adapter gradients (fp32, as the adapter's weights) to bf16 rounding."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = _tiny_lora(tiny_model_dir, torch.float32, alpha=16, patterns=True).cuda()
        if fused:
            fastpath.fuse_lora_add(model)
        x = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(2)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x)
        assert _graph_nodes(out.loss, "LoraGroupBackward") == (2 * 2 if fused else 0)
        out.loss.backward()
        return out.logits.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    peft_logits, peft_grads = run(fused=False)
    logits, grads = run(fused=True)
    torch.testing.assert_close(logits, peft_logits, rtol=2e-2, atol=2e-2)
    for name, grad in peft_grads.items():
        assert grads[name].dtype == torch.float32 and grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=2e-2, atol=2e-2, msg=name)


def _tiny_lora(tiny_model_dir: Path, dtype: object, alpha: float, patterns: bool = False) -> Any:
    """The tiny model with an r4 all-linear LoRA adapter (dropout off) whose B is nonzero, seeded; `patterns`: k_proj
    and up_proj at other ranks and v_proj at another alpha, so siblings differ in rank and scaling."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    more = {"rank_pattern": {"k_proj": 2, "up_proj": 8}, "alpha_pattern": {"v_proj": 4}} if patterns else {}
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, **more)
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _graph_nodes(tensor: object, name: str) -> int:
    """How many nodes called `name` the autograd graph behind `tensor` has."""
    seen, todo, count = set(), [tensor.grad_fn], 0  # type: ignore[attr-defined]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        todo.extend(next_node for next_node, _ in node.next_functions)
    return count


def _uncompiled_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flex attention as torch runs it unfused, with block masks built uncompiled: the kernel's own math in about a
    second on CPU, where Inductor's compile of it takes about 30."""
    import transformers.integrations.flex_attention as flex
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    build = masking.create_block_mask
    monkeypatch.setattr(masking, "create_block_mask", lambda *a, **k: build(*a, **{**k, "_compile": False}))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_inference_forwards_leave_flex_attention_for_sdpa(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_search.probe import probe_logits

    _uncompiled_flex(monkeypatch)
    monkeypatch.setattr(fastpath, "_switch_logged", set())
    flex = fastpath.choose(on_gpu=True, model_type="llama", attn="flex_attention")
    assert flex.active("padding-free") and flex.active(fastpath.INFERENCE_ATTN)
    assert not fastpath.choose(on_gpu=True, model_type="llama", attn="sdpa").active(fastpath.INFERENCE_ATTN)

    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="flex_attention"
    )
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    seen: list[str] = []
    base.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    ids = torch.randint(3, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding, as TRL pads
    with torch.no_grad():
        on_flex = model(input_ids=ids, attention_mask=mask).logits
        with caplog.at_level(logging.INFO, logger="lora_search.fastpath"):
            with fastpath.inference_attention(model):
                with fastpath.inference_attention(model):  # nested: a no-op
                    on_sdpa = model(input_ids=ids, attention_mask=mask).logits
            with fastpath.inference_attention(model, enabled=False):  # a training forward of a shared call site
                model(input_ids=ids[:1, :4])
            probe_logits(model, [ids[:1, :5], ids[1:, :3]])  # the short forwards that failed on the GPU
    assert seen == ["flex_attention", "sdpa", "flex_attention", "sdpa", "sdpa"]
    assert base.config._attn_implementation == "flex_attention"  # the training kernel is back
    real = mask.bool()
    torch.testing.assert_close(on_sdpa[real], on_flex[real], rtol=1e-5, atol=1e-5)
    switches = [r.getMessage() for r in caplog.records if "inference forwards run on sdpa" in r.getMessage()]
    assert len(switches) == 1 and "NoValidChoicesError" in switches[0]  # once, with its reason


def test_auto_attention_is_padding_free_where_flex_trains_and_says_why_where_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    llama = SimpleNamespace(model_type="llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    assert fastpath.resolve_attention("sdpa", True, llama) == ("sdpa", "set in base.attn_implementation")
    attn, why = fastpath.resolve_attention("auto", False, llama)
    assert attn == "sdpa" and "no CUDA device" in why
    attn, why = fastpath.resolve_attention("auto", True, SimpleNamespace(model_type="gpt2"))
    assert attn == "sdpa" and "'gpt2' is not known to mask packed rows" in why

    from lora_search import varlen

    # torch's varlen kernel first: no compile, so it is asked whether padding-free pays with none
    varlen_tried: list[object] = []
    monkeypatch.setattr(varlen, "failure", lambda config: varlen_tried.append(config) or None)
    asked: list[float] = []
    attn, why = fastpath.resolve_attention("auto", True, llama, lambda s: asked.append(s) or (True, "it pays"))
    assert (attn, varlen_tried, asked) == ("torch_varlen", [llama], [0.0])
    assert why == "auto: torch's varlen flash kernel matched SDPA here on packed rows; it pays"
    path = fastpath.choose(True, "llama", attn, why)
    assert path.active("padding-free") and path.active(fastpath.INFERENCE_ATTN) and path.active(fastpath.CUDNN_OFF)
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping[varlen.NAME] is varlen.attention  # registered as it was chosen

    # where it does not run, flex attention, asked with its compile (not yet compiled in this process)
    monkeypatch.setattr(varlen, "failure", lambda config: "RuntimeError: no kernel image")
    monkeypatch.setattr(fastpath, "flex_compiled", lambda config: False)
    tried: list[object] = []
    monkeypatch.setattr(fastpath, "flex_failure", lambda config: tried.append(config) or None)
    asked.clear()
    attn, why = fastpath.resolve_attention("auto", True, llama, lambda s: asked.append(s) or (True, ""))
    assert (attn, tried, asked) == ("flex_attention", [llama], [0.0, fastpath.FLEX_COMPILE_S])
    assert "ran a packed row's forward and backward" in why and "torch's varlen kernel: RuntimeError" in why
    path = fastpath.choose(True, "llama", attn, why)
    assert path.active("padding-free") and path.active(fastpath.INFERENCE_ATTN)
    assert "attention on (flex_attention: auto: flex attention ran" in path.summary()

    attn, why = fastpath.resolve_attention("auto", True, llama, lambda s: (False, "auto: padded batches pay here"))
    assert attn == "sdpa" and why == "auto: padded batches pay here" and len(tried) == 1  # flex not even tried
    paid = fastpath.resolve_attention("auto", True, llama, lambda s: (s == 0, f"pays at {s:.0f} s"))
    assert paid == ("sdpa", "pays at 41 s (torch's varlen kernel: RuntimeError: no kernel image)")
    assert len(tried) == 1  # the compile would not pay: flex not tried

    monkeypatch.setattr(fastpath, "flex_failure", lambda config: "LoweringException: NoValidChoicesError")
    attn, why = fastpath.resolve_attention("auto", True, llama)
    assert attn == "sdpa" and "neither varlen kernel trains here" in why and "NoValidChoicesError" in why
    path = fastpath.choose(True, "llama", attn, why)
    assert not path.active("padding-free") and "NoValidChoicesError" in path.summary()


def test_padding_free_is_chosen_where_the_padding_it_saves_outweighs_the_compile() -> None:
    # the measured case (speed_varlen_h200_2026-12-04.json): 8B, micro-batches of 8 chat rows, 23% padding
    share, pad_tokens = fastpath.padding_fraction([100, 300] * 4, rows=8)
    assert share == pytest.approx(0.5 * 8 * 200 / (8 * 300)) and pad_tokens == 800  # one batch: 4 rows of 200 pad
    assert fastpath.padding_fraction([64] * 40, rows=8) == (0.0, 0.0)  # fixed-length rows: nothing to save

    rng = __import__("random").Random(0)
    chat = [int(rng.lognormvariate(6.0, 0.7)) for _ in range(2000)]
    h200 = 989.4
    short, why_short = fastpath.padding_free_pays(chat, 8, 16, 8_000_000_000, h200, compile_s=fastpath.FLEX_COMPILE_S)
    assert not short and "against 41 s of compile" in why_short  # a 16-step trial: the compile wins
    # and it names the lever that needs no compile, with the padding it would leave
    grouped_share = fastpath.padding_fraction(chat, 8, grouped=True)[0]
    assert why_short.endswith(
        f"; Budget(sampling='group_by_length') would pad {grouped_share:.0%} (it ran 1.73x the random order's real "
        "tokens/s on the 8B variable-length rows, H100, benchmarks/NOTES.md change 22)"
    )
    long, why_long = fastpath.padding_free_pays(chat, 8, 2000, 8_000_000_000, h200, compile_s=fastpath.FLEX_COMPILE_S)
    assert long and why_long.startswith("padding-free pays")
    small, _ = fastpath.padding_free_pays(chat, 8, 2000, 135_000_000, h200, compile_s=fastpath.FLEX_COMPILE_S)
    assert not small  # a 135M model's padding costs less than the compile
    assert fastpath.padding_free_pays(chat, 8, 16, 135_000_000, h200, compile_s=0.0)[0]  # no compile: any saving pays
    fixed, why_fixed = fastpath.padding_free_pays([512] * 64, 8, 2000, 8_000_000_000, h200, compile_s=0.0)
    assert not fixed and "0% of its padded batches' tokens would be padding" in why_fixed
    # steps grouped by length (Budget.sampling) pad a fraction as much: less for padding-free to save
    assert fastpath.padding_fraction(chat, 8, grouped=True)[0] < fastpath.padding_fraction(chat, 8)[0] / 4
    grouped, why_grouped = fastpath.padding_free_pays(chat, 8, 400, 8_000_000_000, h200, 41.0, grouped=True)
    assert (
        fastpath.padding_free_pays(chat, 8, 400, 8_000_000_000, h200, compile_s=fastpath.FLEX_COMPILE_S)[0]
        and not grouped
    )
    assert why_grouped.startswith("auto: padded batches pay here")


def test_an_auto_trial_decides_on_its_tokenized_rows_and_switches_kernel_and_collator(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trial's decision on a CUDA device (`train.auto_fast_path`), here with the device's answers stood in: the
    GPU's name, whether torch's varlen kernel trains here (no compile: any padding saved pays), flex already
    compiled in the process (so any padding saved pays), and flex's trial run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lora_search import data, train
    from lora_search.trainer import TrialTrainer

    monkeypatch.setattr(train, "device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(fastpath, "flex_compiled", lambda config: True)
    monkeypatch.setattr(fastpath.importlib.util, "find_spec", lambda name: None)  # no Triton: liger off, as on CPU
    config = AutoConfig.from_pretrained(tiny_model_dir)
    rows = _rows(tmp_path / "train.jsonl", 48, 0)

    def trainer_on_sdpa() -> tuple[TrialTrainer, fastpath.FastPath]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        train_ds, eval_ds = data.load(Dataset(str(rows), max_length=512), seed=0)  # none cut: lengths differ
        args = SFTConfig(str(tmp_path / "out"), max_length=512, use_cpu=True, report_to="none", max_steps=4)
        chosen = fastpath.choose(True, "llama", "sdpa", "auto: until the rows are tokenized")
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        trainer = TrialTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            data_collator=chosen.collator(tokenizer.pad_token_id),
        )
        return trainer, chosen.with_piece(fastpath.Piece(fastpath.MERGE_MICRO, True, "kept"))

    from lora_search import varlen

    monkeypatch.setattr(varlen, "failure", lambda config: None)  # torch's varlen kernel trains here: no compile
    monkeypatch.setattr(fastpath, "flex_compiled", lambda config: False)
    trainer, before = trainer_on_sdpa()
    path = train.auto_fast_path(trainer, config, 8, 4, before, fastpath.choose(True, "llama", "sdpa"))
    assert path.active("padding-free") and path.active(fastpath.INFERENCE_ATTN) and "against 0 s" in path.summary()
    assert trainer.data_collator.padding_free and trainer.data_collator.seq_lengths
    assert fastpath.pretrained_model(trainer.model).config._attn_implementation == "torch_varlen"

    monkeypatch.setattr(varlen, "failure", lambda config: "RuntimeError: no kernel image")
    monkeypatch.setattr(fastpath, "flex_compiled", lambda config: True)
    monkeypatch.setattr(fastpath, "flex_failure", lambda config: None)
    monkeypatch.setattr(train, "LENGTHS_SAMPLED", 16)  # a large dataset's lengths are sampled, evenly spaced
    trainer, before = trainer_on_sdpa()
    assert not trainer.data_collator.padding_free
    path = train.auto_fast_path(trainer, config, 8, 4, before, fastpath.choose(True, "llama", "sdpa"))
    assert path.active("padding-free") and path.active(fastpath.INFERENCE_ATTN) and path.active(fastpath.MERGE_MICRO)
    assert (
        "padding-free pays" in path.summary() and "% of its padded batches' tokens would be padding" in path.summary()
    )
    assert trainer.data_collator.padding_free and fastpath.pretrained_model(
        trainer.model
    ).config._attn_implementation == ("flex_attention")
    assert [p.name for p in path.pieces].count("attention") == 1  # chosen again, not added twice

    monkeypatch.setattr(fastpath, "flex_failure", lambda config: "LoweringException: NoValidChoicesError")
    trainer, before = trainer_on_sdpa()
    path = train.auto_fast_path(trainer, config, 8, 4, before, fastpath.choose(True, "llama", "sdpa"))
    assert (
        not path.active("padding-free") and path.active(fastpath.NO_PAD_MASK) and not trainer.data_collator.padding_free
    )
    assert "NoValidChoicesError" in path.summary()
    assert fastpath.pretrained_model(trainer.model).config._attn_implementation == "sdpa"


@pytest.mark.gpu
def test_flex_attention_trains_on_this_gpu_and_the_verdict_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flex attention as auto's second choice: where torch's varlen kernel is refused (stood in here), auto trains on
    flex if it runs on this GPU."""
    from types import SimpleNamespace

    import torch

    from lora_search import varlen

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run with -m gpu on the device machine)")

    llama = SimpleNamespace(model_type="llama", num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    assert fastpath.flex_failure(llama) is None
    monkeypatch.setattr(varlen, "failure", lambda config: "refused here for this test")
    assert fastpath.resolve_attention("auto", True, llama)[0] == "flex_attention"
    assert list(fastpath._flex_tried.values()) == [None]  # tried once, kept for the process's next trial


def test_training_runs_with_the_heap_frozen_out_of_full_collections() -> None:
    """`fastpath.frozen_heap` (what a trial's `trainer.train()` runs under): the objects alive when it starts are frozen
    (Python's full collections skip them), garbage made before it is collected rather than frozen, objects made inside
    are collected as usual, and leaving unfreezes, so a warm process's next trial can collect what this one left."""
    import gc

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    # From an unfrozen heap: a PackHost built in this process by another test (tests/test_pack_tune.py) froze it and
    # never unfreezes (a host's process ends with the host), and leaving the block unfreezes that too.
    gc.unfreeze()
    before = gc.get_freeze_count()
    kept = Cycle()
    Cycle()  # garbage already: collected, not frozen
    with fastpath.frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > before and gc.is_tracked(kept)
        assert sum(type(o) is Cycle for o in gc.get_objects()) == 0  # the live one is frozen, the dead one gone
        Cycle()
        assert gc.collect() >= 1  # a cycle made while frozen is still collected
        # and nothing more is frozen (fewer may be: a frozen object whose last reference goes is freed, which a busy
        # test process does now and then)
        assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == before
    assert sum(type(o) is Cycle for o in gc.get_objects()) == 1  # back in the collector's view


def test_padded_forwards_skip_the_packed_rows_check_and_give_the_same_logits(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fastpath.rows_unpacked` (the trial's forwards on padded batches): without an attention mask every forward asks
    transformers whether its rows are packed, a device read (`UNPACKED_WHY`); inside, that check is not run, the logits
    are the same, and it is back afterwards. Packed rows (position ids that restart) are what the check finds, so
    padding-free batches keep it."""
    import torch
    from transformers import AutoModelForCausalLM, masking_utils

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    x = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    real = masking_utils.find_packed_sequence_indices
    calls: list[object] = []

    def counted(position_ids: torch.Tensor) -> object:
        calls.append(position_ids)
        return real(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counted)
    with torch.no_grad():
        checked = model(input_ids=x, use_cache=False).logits  # as a trial calls it: no cache
        assert len(calls) == 1 and counted(calls[0]) is None  # rows of one sequence each: the check says so
        with fastpath.rows_unpacked():
            skipped = model(input_ids=x, use_cache=False).logits
        assert len(calls) == 2  # only the call above: the forward inside did not check
        with fastpath.rows_unpacked(enabled=False):
            model(input_ids=x, use_cache=False)
    assert len(calls) == 3 and masking_utils.find_packed_sequence_indices is counted
    torch.testing.assert_close(skipped, checked, rtol=0, atol=0)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two sequences in one row: the padding-free layout
    assert real(packed).tolist() == [[0, 0, 0, 1, 1, 1, 1]]
