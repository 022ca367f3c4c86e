"""The trial's Trainer (lora_search/trainer.py): TRL's curve, metrics and token counts, with the fast path's collators
(the runs themselves: tests/test_fastpath.py's `_run`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_search import fastpath
from tests.test_fastpath import _pieces, _rows, _run, _same, torch_varlen_on_cpu


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


@pytest.mark.parametrize("layout", ["padded", "padding-free", "padding-free torch_varlen"])
def test_token_budget_micro_batches_train_the_accumulated_curve(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """A step's 8 rows handed over at once and cut into micro-batches of at most 96 tokens (`fastpath.TOKEN_BUDGET`)
    train the curve of 4 accumulated micro-batches of 2 rows: the same rows a step, each micro-batch's loss over the
    step's label tokens. Padded micro-batches take the rows longest first; padding-free ones are spans of one row,
    and on torch_varlen each span's attention gets the sequence lengths of its own rows (`torch_varlen_on_cpu`).
    The padded run reads its batches in a loader process (what a GPU trial does): the same rows, the same curve. The
    Trainer's `model.train()` runs once a step, and every step after the step-6 eval trains in training mode."""
    from transformers import AutoTokenizer

    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    collator = _pieces(fastpath.NO_PAD_MASK).collator(pad_id)
    accumulated, _, a = _run(tiny_model_dir, train, evaluation, collator, "sdpa", ours=True, batch=2, accum=4)

    cuts: list[tuple[list[int], list[list[int]]]] = []
    real = fastpath.token_chunks

    def seen(lengths, budget, padded):  # type: ignore[no-untyped-def]
        assert padded == (layout == "padded")
        chunks = real(lengths, budget, padded)
        cuts.append((list(lengths), chunks))
        return chunks

    monkeypatch.setattr(fastpath, "token_chunks", seen)
    attn = "sdpa"
    if layout.endswith("torch_varlen"):
        attn, calls = "torch_varlen", torch_varlen_on_cpu(monkeypatch)
    pieces = (fastpath.NO_PAD_MASK,) if layout == "padded" else ("padding-free",)
    by_tokens = _pieces(*pieces, fastpath.TOKEN_BUDGET).collator(pad_id)
    loaders = 1 if layout == "padded" else 0
    cut, _, b = _run(
        tiny_model_dir,
        train,
        evaluation,
        by_tokens,
        attn,
        ours=True,
        batch=8,
        accum=1,
        token_budget=96,
        loaders=loaders,
    )
    tolerance = 4e-4 if attn == "torch_varlen" else 2e-4  # the stand-in kernel's own rounding (test_fastpath's why)
    what = f"2 x 4 accumulated vs 8 rows cut at 96 tokens, {layout}, {loaders} loader process(es)"
    _same(accumulated, cut, what, tolerance)
    if attn == "torch_varlen":  # every micro-batch's forward and recompute, 2 layers each
        assert len(calls) == 2 * 2 * sum(len(chunks) for _, chunks in cuts)
    assert a.num_input_tokens_seen == b.num_input_tokens_seen > 0
    assert b.train_modes == [True] * 12
    assert len(cuts) == 12  # one cut a step
    for lengths, chunks in cuts:
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))  # every row of the step, once
        cost = [
            len(c) * max(lengths[i] for i in c) if layout == "padded" else sum(lengths[i] for i in c) for c in chunks
        ]
        assert all(x <= 96 or len(c) == 1 for x, c in zip(cost, chunks, strict=True))
    assert max(len(chunks) for _, chunks in cuts) > 1  # steps were really cut


def test_the_flops_count_walks_the_parameters_once_and_gives_the_trainers_figure() -> None:
    """`TrialTrainer.floating_point_ops` is the Trainer's 6 x tokens x non-embedding parameters, the parameters counted
    on the first step only (the Trainer walks all of them every step)."""
    import torch
    from transformers import Trainer

    from lora_search.trainer import TrialTrainer

    class Model:
        main_input_name = "input_ids"
        calls = 0

        def num_parameters(self, exclude_embeddings: bool = False) -> int:
            assert exclude_embeddings
            Model.calls += 1
            return 1234

    trainer = TrialTrainer.__new__(TrialTrainer)
    trainer.model, trainer._flop_params = Model(), None
    for rows in (4, 8, 2):
        inputs = {"input_ids": torch.zeros(rows, 64, dtype=torch.long)}
        assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) == 6 * rows * 64 * 1234
    assert Model.calls == 1 + 3  # ours once; the Trainer's own (called above for the comparison) each time
    assert trainer.floating_point_ops({"labels": torch.zeros(2, 2)}) == 0  # no input ids: the Trainer's answer


def test_token_chunks_cut_by_tokens() -> None:
    # padded: longest first, n rows cost n x the longest
    assert fastpath.token_chunks([10, 50, 20, 40], 100, padded=True) == [[1, 3], [2, 0]]
    # padding-free: in order, a chunk costs its rows' sum
    assert fastpath.token_chunks([10, 50, 20, 40], 80, padded=False) == [[0, 1, 2], [3]]
    assert fastpath.token_chunks([120, 10], 100, padded=False) == [[0], [1]]  # a row past the budget goes alone
    assert fastpath.token_budget(2, 4, 512, 1).active and "1024 tokens" in fastpath.token_budget(2, 4, 512, 1).why
    assert not fastpath.token_budget(8, 1, 512, 1).active and not fastpath.token_budget(2, 4, 512, 2).active


def test_a_trial_whose_step_does_not_fit_one_micro_batch_cuts_it_by_tokens(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole trial path (`train.train_loop`, warm, in this process) when the memory estimate keeps a step's 4
    micro-batches apart: the Trainer gets each step's 16 rows at once, the trial's trainer cuts them at 2 x 96
    tokens, and the fast path summary says so."""
    import time

    import ray.tune

    from lora_search import BaseModel, Budget, Resources, SearchSpace, Sweep, memory, train
    from lora_search.config import Dataset

    sweep = Sweep(
        name="by_tokens",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset(str(tiny_jsonl), eval_fraction=0.2, max_length=96),
        space=SearchSpace(ranks=(4,), targets=("all-linear",), variants=("lora",), lr=(1e-3, 1e-2)),
        budget=Budget(max_steps=4, eval_every=2, grace_period=2, batch_size=4, grad_accum=4),
        resources=Resources(workers=1, cpus_per_worker=1),
    )
    kept_apart = memory.MicroBatching(
        4,
        4,
        fastpath.Piece(fastpath.KEEP_ACTIVATIONS, True, "test"),
        fastpath.Piece(fastpath.MERGE_MICRO, False, "test"),
    )
    monkeypatch.setattr(train, "micro_batching", lambda *a, **k: kept_apart)
    monkeypatch.setattr(train, "worker_nodes", lambda: ["here"])  # no Ray cluster: nothing else asks one
    reports: list[dict] = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: reports.append(dict(metrics)))
    cuts: list[list[list[int]]] = []
    real = fastpath.token_chunks
    monkeypatch.setattr(fastpath, "token_chunks", lambda *a: cuts.append(real(*a)) or cuts[-1])
    config = {
        "sweep": sweep,
        "variant": "lora",
        "rank": 4,
        "alpha": 8.0,
        "targets": "all-linear",
        "lr": 1e-3,
        "dropout": 0.0,
        "warm": True,
        "run_dir": str(tmp_path / "run"),
        "progress_file": str(tmp_path / "trial_x.progress.json"),
        "tune_run": "r",
        "tune_run_start": time.time(),
    }
    train.train_loop(config)
    assert [r["step"] for r in reports if "eval_loss" in r][-2:] == [2, 4]
    assert "token-budget on (a step's rows as micro-batches of up to 384 tokens" in reports[-1]["fast_path"]
    assert len(cuts) == 4 and all(sum(len(c) for c in chunks) == 16 for chunks in cuts)


def test_length_grouped_steps_pad_less_and_every_trial_sees_the_same_rows(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Budget(sampling="group_by_length")` through the whole trial path (as the token-budget test above: each step's
    16 rows reach the trial's trainer at once, so their lengths show): its steps' rows pad less than the random
    order's, and two trials of other ranks, whose adapters draw other random numbers, see the same rows a step."""
    import json
    import random
    import time

    import ray.tune

    from lora_search import BaseModel, Budget, Resources, SearchSpace, Sweep, memory, train
    from lora_search.config import Dataset

    rng, rows = random.Random(0), tmp_path / "varied.jsonl"  # rows of 1 to 20 words, as real SFT rows vary
    words = ("calm", "bright", "the", "a", "sunny", "dark", "quiet", "storm")
    with rows.open("w") as f:
        for i in range(500):  # 400 to train: LengthGroupedSampler sorts groups of 6 steps (it takes 50 where it can)
            said = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
            row = {"id": f"r{i}", "instruction": "Name the mood.", "input": said, "output": "calm"}
            f.write(json.dumps(row) + "\n")
    kept_apart = memory.MicroBatching(
        4,
        4,
        fastpath.Piece(fastpath.KEEP_ACTIVATIONS, True, "test"),
        fastpath.Piece(fastpath.MERGE_MICRO, False, "test"),
    )
    monkeypatch.setattr(train, "micro_batching", lambda *a, **k: kept_apart)
    monkeypatch.setattr(train, "worker_nodes", lambda: ["here"])
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: None)
    steps: list[list[int]] = []
    real = fastpath.token_chunks
    monkeypatch.setattr(fastpath, "token_chunks", lambda lengths, *a: steps.append(list(lengths)) or real(lengths, *a))

    def lengths_a_step(sampling: str, rank: int) -> list[list[int]]:
        sweep = Sweep(
            name=f"sampling_{sampling}_{rank}",
            base=BaseModel(str(tiny_model_dir)),
            dataset=Dataset(str(rows), eval_fraction=0.2, max_length=96),
            space=SearchSpace(ranks=(rank,), targets=("all-linear",), variants=("lora",), lr=(1e-3, 1e-2)),
            budget=Budget(max_steps=3, eval_every=3, grace_period=3, batch_size=4, grad_accum=4, sampling=sampling),
            resources=Resources(workers=1, cpus_per_worker=1),
        )
        steps.clear()
        train.train_loop(
            {
                "sweep": sweep,
                "variant": "lora",
                "rank": rank,
                "alpha": 8.0,
                "targets": "all-linear",
                "lr": 1e-3,
                "dropout": 0.0,
                "warm": True,
                "run_dir": str(tmp_path / sweep.name),
                "progress_file": str(tmp_path / f"trial_{sweep.name}.progress.json"),
                "tune_run": "r",
                "tune_run_start": time.time(),
            }
        )
        assert len(steps) == 3 and all(len(rows) == 16 for rows in steps), steps
        return [list(rows) for rows in steps]

    def padding(steps: list[list[int]]) -> int:
        return sum(len(rows) * max(rows) - sum(rows) for rows in steps)

    shuffled, grouped = lengths_a_step("random", 4), lengths_a_step("group_by_length", 4)
    assert padding(grouped) < padding(shuffled) / 2, (grouped, shuffled)
    # Another rank, and torch's global generator somewhere else when the sampler is made (as a resumed trial restores
    # its checkpoint's): the same rows a step, the order drawn from the sweep's seed alone.
    import torch

    from lora_search.trainer import TrialTrainer

    made = TrialTrainer._get_train_sampler
    monkeypatch.setattr(TrialTrainer, "_get_train_sampler", lambda self, *a: torch.manual_seed(123) and made(self, *a))
    assert lengths_a_step("group_by_length", 8) == grouped
    assert lengths_a_step("random", 8) == shuffled


@pytest.mark.parametrize("layout", ["padded", "padding-free"])
def test_the_lm_head_scores_the_positions_the_cpu_labels_name_and_trains_trls_curve(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """With `fastpath.LABEL_INDEX` the trial's LM head takes the positions it scores from the collator's CPU labels
    (`LABEL_MASK`, cut with the batch by the token budget; padded, read through a loader process) and trains TRL's
    curve: TRL's head on its compact path, the one it takes on a GPU (a boolean index of the hidden states by the
    labels). Every training micro-batch and every eval batch goes through the indexed head."""
    from transformers import AutoTokenizer
    from trl.trainer import utils as trl_utils

    from lora_search import trainer as trial_trainer

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)  # TRL's GPU path: score the valid rows only
    calls = []
    real = trial_trainer._indexed_forward

    def spy(model, label_index, args, kwargs):  # type: ignore[no-untyped-def]
        calls.append(int(label_index.numel()))
        return real(model, label_index, args, kwargs)

    monkeypatch.setattr(trial_trainer, "_indexed_forward", spy)
    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    trl, trl_logs, trl_state = _run(tiny_model_dir, train, evaluation, None, "sdpa")
    pieces = (fastpath.NO_PAD_MASK,) if layout == "padded" else ("padding-free",)
    collator = _pieces(*pieces, fastpath.TOKEN_BUDGET, fastpath.LABEL_INDEX).collator(pad_id)
    loaders = 1 if layout == "padded" else 0  # the NumPy mask through a loader process too, as on a GPU
    ours, logs, state = _run(
        tiny_model_dir,
        train,
        evaluation,
        collator,
        "sdpa",
        ours=True,
        batch=8,
        accum=1,
        token_budget=96,
        loaders=loaders,
    )
    _same(trl, ours, f"TRL's head vs the indexed head, {layout}, cut at 96 tokens, {loaders} loader process(es)")
    assert state.num_input_tokens_seen == trl_state.num_input_tokens_seen
    train_logs, trl_train = [x for x in logs if "loss" in x], [x for x in trl_logs if "loss" in x]
    for x, y in zip(train_logs, trl_train, strict=True):
        assert abs(x["mean_token_accuracy"] - y["mean_token_accuracy"]) < 0.02
        assert abs(x["entropy"] - y["entropy"]) < 1e-3 * y["entropy"]
    eval_batches = 2 * 3  # two evals of 24 rows in batches of 8
    assert len(calls) > 12 + eval_batches and all(n > 0 for n in calls)  # steps were cut: more micro-batches than steps


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_indexed_lm_head_matches_trls_and_never_asks_the_device_how_many_labels_count(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """One forward and backward of the indexed head (`trainer.indexed_lm_head`) gives TRL's compact head's per-token
    log-probs, entropy, top-1 hits, label mask and adapter gradients, and runs no op whose output size depends on the
    device's data (`aten::nonzero`, `masked_select`, `masked_scatter`: each waits for the device on a GPU). TRL's
    head runs them: the check can fail. On the GPU both run TRL's Triton kernel."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils as trl_utils

    from lora_search.trainer import _label_positions, indexed_lm_head

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu":
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)  # the compact path, as on a GPU
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    assert indexed_lm_head(model) is None and indexed_lm_head(model) is None  # once: a second call finds it there
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: give the gradients of A something to carry
    ids = torch.randint(3, 300, (3, 20), device=device)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, 12:] = -100  # padding
    labels[2, :] = -100
    labels[2, 7:9] = ids[2, 7:9]

    def run(**extra):  # type: ignore[no-untyped-def]
        model.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # host ops
            out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False, **extra)
            (-out.log_probs.sum() / out.label_mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads, {e.name for e in prof.events()}

    theirs, their_grads, their_ops = run()
    index = _label_positions((labels != -100).cpu().numpy(), ids.device)
    assert index.tolist() == [i * 20 + t for i in range(3) for t in range(19) if labels[i, t + 1] != -100]
    ours, our_grads, our_ops = run(label_index=index)
    waiting = {"aten::nonzero", "aten::masked_select", "aten::masked_scatter"}
    assert waiting & their_ops, "TRL's compact head should index by a device mask"
    assert not waiting & our_ops, waiting & our_ops
    assert torch.equal(ours.label_mask, theirs.label_mask)
    close = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 1e-3, "atol": 1e-5}  # TF32 products
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), **close)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=close["rtol"] * 10, atol=close["atol"] / 10)
    assert np.isclose(float(ours.loss.detach()), float(theirs.loss.detach()), rtol=1e-6)


def test_a_base_whose_logits_are_capped_keeps_trls_head_and_trains_its_curve(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base with `final_logit_softcapping` (Gemma 2's kind): the indexed head, which scores plain logits, is not
    added (`trainer.indexed_lm_head` says why), and batches carrying `LABEL_MASK` train on TRL's head, which caps
    them: TRL's own curve, never the indexed forward (which would score uncapped logits)."""
    from transformers import AutoTokenizer
    from trl.trainer import utils as trl_utils

    from lora_search import trainer as trial_trainer

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    calls: list[int] = []
    monkeypatch.setattr(trial_trainer, "_indexed_forward", lambda *a: calls.append(1))

    def capped(model: object) -> None:
        model.config.final_logit_softcapping = 1.0  # type: ignore[attr-defined]  # low: it changes the curve

    train, evaluation = _rows(tmp_path / "train.jsonl", 120, 0), _rows(tmp_path / "eval.jsonl", 24, 1)
    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    plain, _, _ = _run(tiny_model_dir, train, evaluation, None, "sdpa")
    trl, _, _ = _run(tiny_model_dir, train, evaluation, None, "sdpa", configure=capped)
    collator = _pieces(fastpath.NO_PAD_MASK, fastpath.LABEL_INDEX).collator(pad_id)
    ours, _, _ = _run(tiny_model_dir, train, evaluation, collator, "sdpa", ours=True, configure=capped)
    assert max(abs(x - y) for x, y in zip(trl, plain, strict=True)) > 0.05  # the cap is applied: another curve
    _same(trl, ours, "TRL's head vs the trial's, capped logits")
    assert calls == []


def test_the_indexed_head_says_why_it_is_not_added(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils as trl_utils

    from lora_search.trainer import indexed_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert indexed_lm_head(model) == "the model has no TRL fused LM head to index"
    model.config.final_logit_softcapping = 30.0
    trl_utils.add_fused_lm_head(model)
    assert "final_logit_softcapping" in (indexed_lm_head(model) or "")
