"""The fast trial path: which pieces turn on where, and that padding-free batches train the same curve as padded ones
(a real TRL SFTTrainer run on CPU, completion-only loss, rows of very different lengths)."""

from __future__ import annotations

import json
import random
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
