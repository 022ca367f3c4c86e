"""The trial's Trainer (lora_search/trainer.py): TRL's curve, metrics and token counts, with the fast path's collators
(the runs themselves: tests/test_fastpath.py's `_run`)."""

from __future__ import annotations

from pathlib import Path

from lora_search import fastpath
from tests.test_fastpath import _pieces, _rows, _run, _same


def test_trial_trainer_without_the_pad_mask_trains_trls_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The trial's trainer (metrics kept on the device, tokens counted by the collator) on right-padded batches
    without their attention mask trains TRL's own curve on the masked batches, and counts the same tokens."""
    from transformers import AutoTokenizer

    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    trl, trl_logs, trl_state = _run(tiny_model_dir, train, evaluation, None, "sdpa")
    masked, logs, masked_state = _run(tiny_model_dir, train, evaluation, _pieces().collator(pad_id), "sdpa", ours=True)
    unmasked, unmasked_logs, state = _run(
        tiny_model_dir, train, evaluation, _pieces(fastpath.NO_PAD_MASK).collator(pad_id), "sdpa", ours=True
    )
    _same(trl, masked, "TRL vs the trial's trainer")
    _same(trl, unmasked, "TRL vs the trial's trainer without the pad mask")
    assert state.num_input_tokens_seen == masked_state.num_input_tokens_seen == trl_state.num_input_tokens_seen
    # TRL's per-step metrics still reach the logs, read at log steps: token accuracy, entropy, tokens seen
    train_logs = [x for x in logs if "loss" in x]
    trl_train = [x for x in trl_logs if "loss" in x]
    assert len(train_logs) == 12
    for ours, theirs in zip(train_logs, trl_train, strict=True):
        assert 0 <= ours["mean_token_accuracy"] <= 1 and ours["entropy"] > 0
        assert ours["num_tokens"] == theirs["num_tokens"]
        # the same batches and kernels, one micro-batch a step: TRL's mean of per-batch means is the token-weighted mean
        assert abs(ours["mean_token_accuracy"] - theirs["mean_token_accuracy"]) < 1e-4
        assert abs(ours["entropy"] - theirs["entropy"]) < 1e-3 * theirs["entropy"]
    assert any("eval_mean_token_accuracy" in x for x in logs)
    # without the mask SDPA takes another kernel: the same figures to rounding (a near-tie's top-1 may flip)
    unmasked_train = [x for x in unmasked_logs if "loss" in x]
    assert [x["num_tokens"] for x in unmasked_train] == [x["num_tokens"] for x in trl_train]
    assert all(0 <= x["mean_token_accuracy"] <= 1 and x["entropy"] > 0 for x in unmasked_train)


def test_merged_micro_batches_train_the_accumulated_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """4 micro-batches of 2 a step, accumulated, and 1 of 8: the same sequences a step, the same curve. Step 1's loss
    agrees to 1e-6; after that AdamW's normalised update turns rounding-level gradient differences (other shapes,
    other padding) into ~1e-4 of the loss, inside the tolerance."""
    from transformers import AutoTokenizer

    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    collator = _pieces(fastpath.NO_PAD_MASK).collator(AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id)
    accumulated, _, a = _run(tiny_model_dir, train, evaluation, collator, "sdpa", ours=True, batch=2, accum=4)
    merged, _, b = _run(tiny_model_dir, train, evaluation, collator, "sdpa", ours=True, batch=8, accum=1)
    _same(accumulated, merged, "2 x 4 accumulated vs 8 merged")
    assert a.num_input_tokens_seen == b.num_input_tokens_seen > 0
