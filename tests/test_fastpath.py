"""The fast trial path: which pieces turn on where, and that padding-free batches train the same curve as padded ones
(a real TRL SFTTrainer run on CPU, completion-only loss, rows of very different lengths)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import pytest

from lora_search import fastpath
from lora_search.config import Dataset

WORDS = "the a cat dog bird red blue green big small runs eats sleeps".split()


def test_choose_names_every_piece_and_why() -> None:
    cpu = fastpath.choose(on_gpu=False, model_type="llama", attn="sdpa")
    assert [p.name for p in cpu.pieces] == ["liger", "padding-free", "attention"]
    assert not cpu.active("liger") and "no CUDA" in cpu.summary()
    # SDPA has no varlen kernel: padding-free would cost T^2 attention, so it stays off and says so
    assert not cpu.active("padding-free") and "no varlen kernel" in cpu.summary()
    assert cpu.active("attention") and cpu.collator(0) is None and cpu.trainer_args() == {}

    varlen = fastpath.choose(on_gpu=False, model_type="llama", attn="flash_attention_2")
    assert varlen.active("padding-free") and varlen.collator(0).padding_free is True

    unknown = fastpath.choose(on_gpu=False, model_type="gpt2", attn="flash_attention_2")
    assert not unknown.active("padding-free") and "'gpt2' is not known" in unknown.summary()
    assert not fastpath.choose(on_gpu=False, model_type="llama", attn="eager").active("attention")


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


def _curve(model_dir: Path, train: Path, evaluation: Path, collator: object | None, attn: str) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_search import data

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_log(self, args, state, control, logs=None, **kw) -> None:  # noqa: ANN001
            for key in ("loss", "eval_loss"):
                if logs and key in logs:
                    self.values.append(float(logs[key]))

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    train_ds, eval_ds = data.load(Dataset(str(train), eval_path=str(evaluation), max_length=64), seed=0)
    losses = Losses()
    args = SFTConfig(
        output_dir=str(train.parent / f"out_{attn}_{collator is not None}"),
        max_steps=12,
        per_device_train_batch_size=8,
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
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[losses],
    )
    trainer.train()
    return losses.values


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_trains_the_same_curve(tiny_model_dir: Path, tmp_path: Path, attn: str) -> None:
    """12 steps of LoRA on rows of 2..40 words: every training and eval loss of the padding-free run equals the
    padded run's to float32 rounding (the same tokens count, each sequence sees only itself)."""
    from transformers import AutoTokenizer

    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    padded = _curve(tiny_model_dir, train, evaluation, None, attn)
    free = _curve(
        tiny_model_dir,
        train,
        evaluation,
        fastpath.FastPath((fastpath.Piece("padding-free", True, "test"),)).collator(pad_id),
        attn,
    )
    assert len(padded) == len(free) == 12 + 2  # 12 training losses, 2 eval losses
    assert min(padded) < padded[0] - 0.3, f"the run must learn for the comparison to mean anything: {padded}"
    print(
        f"\n{attn}: max |padded - padding-free| over {len(padded)} losses: "
        f"{max(abs(a - b) for a, b in zip(padded, free, strict=True)):.2e}"
    )
    for step, (a, b) in enumerate(zip(padded, free, strict=True)):
        assert abs(a - b) <= 2e-4 * max(1.0, abs(a)), f"entry {step}: padded {a} vs padding-free {b}"


def _steps(meter, evals_at: set[int], max_steps: int, step_s: float, eval_s: float, tokens_per_step: int) -> None:
    """Drive a `_Throughput` as the Trainer does: on_step_begin, the step (a matrix product and a wait),
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
    from lora_search.train import PROFILE_ENV, STEADY_AFTER_STEPS, _Throughput

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    meter = _Throughput()
    _steps(meter, {5, 10}, max_steps=10, step_s=0.02, eval_s=0.3, tokens_per_step=100)
    # windows: end of step 3 -> end of step 5 (2 steps), end of step 6 -> end of step 10 (4 steps)
    assert meter.tokens == 600
    assert 6 * 0.02 <= meter.seconds < 6 * 0.02 + 0.1  # the 0.6 s of evaluations are not in it
    assert 100 / 0.03 < meter.per_s() <= 100 / 0.02
    assert STEADY_AFTER_STEPS == 3

    too_short = _Throughput()
    _steps(too_short, {3}, max_steps=3, step_s=0.0, eval_s=0.0, tokens_per_step=100)
    assert math.isnan(too_short.per_s())


def test_kernel_profile_is_written_and_kept_out_of_the_steady_window(tmp_path, monkeypatch) -> None:
    from lora_search.train import PROFILE_ENV, _Throughput

    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profiles"))
    meter = _Throughput(name="trial_abc")
    _steps(meter, {8}, max_steps=8, step_s=0.01, eval_s=0.0, tokens_per_step=10)
    table = (tmp_path / "profiles" / "trial_abc_kernels.txt").read_text()
    assert "aten::mm" in table and "# of Calls" in table
    assert meter.tokens == 30  # window from the end of step 5 (after the profiled steps 4-5) to the end of step 8


def test_unwritable_profile_dir_warns_and_training_goes_on(tmp_path, monkeypatch, caplog) -> None:
    from lora_search.train import PROFILE_ENV, _Throughput

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(PROFILE_ENV, str(blocker / "profiles"))  # a dir under a file: mkdir fails
    meter = _Throughput(name="trial_abc")
    with caplog.at_level("WARNING", logger="lora_search.train"):
        _steps(meter, {8}, max_steps=8, step_s=0.0, eval_s=0.0, tokens_per_step=10)
    assert meter.tokens == 30 and meter.profiler is None
    assert PROFILE_ENV in caplog.text and "writable" in caplog.text


def _trial_sweep(model_dir: Path, data: Path, **budget):
    from lora_search import BaseModel, Budget, Resources, SearchSpace, Sweep
    from lora_search.config import Dataset as Data

    return Sweep(
        name="gc",
        base=BaseModel(str(model_dir)),
        dataset=Data(str(data), eval_fraction=0.2, max_length=96),
        space=SearchSpace(ranks=(4,), targets=("all-linear",), variants=("lora",), lr=(1e-3, 1e-2)),
        budget=Budget(max_steps=4, eval_every=2, grace_period=2, batch_size=8, **budget),
        resources=Resources(workers=1, cpus_per_worker=1),
    )


def test_gradient_checkpointing_off_where_the_activations_fit(tiny_model_dir, tiny_jsonl) -> None:
    from lora_search.train import TrialParams, gradient_checkpointing

    params = TrialParams(variant="lora", rank=4, alpha=8.0, targets="all-linear", lr=1e-3, dropout=0.0)
    sweep = _trial_sweep(tiny_model_dir, tiny_jsonl)
    piece = gradient_checkpointing(sweep, params, on_gpu=False)
    assert piece.name == "keep-activations" and piece.active, piece.why
    assert "fits" in piece.why and "host memory" in piece.why

    # a limit below the estimate (the tiny model needs a few MiB at 8 x 96 tokens): checkpointing stays on
    tight = sweep.replace(resources=dataclasses.replace(sweep.resources, memory_limit_gb=0.001))
    piece = gradient_checkpointing(tight, params, on_gpu=False)
    assert not piece.active and "exceeds" in piece.why and "memory_limit_gb=0.001" in piece.why

    for choice, active in (("on", False), ("off", True)):
        forced = _trial_sweep(tiny_model_dir, tiny_jsonl, gradient_checkpointing=choice)
        assert gradient_checkpointing(forced, params, on_gpu=False).active is active


def test_unknown_gradient_checkpointing_setting_is_refused() -> None:
    from lora_search import Budget

    problems = Budget(gradient_checkpointing="sometimes").problems()
    assert [(p.field, p.value) for p in problems] == [("budget.gradient_checkpointing", "sometimes")]
    assert "auto, on, off" in problems[0].fix
