"""torch's varlen flash kernel as the attention implementation "torch_varlen" (`lora_search.varlen`): the lengths
handed to it, the kernel's keyword arguments across torch releases, one step's loss and gradients against padded
SDPA, what preflight says of it, and (on the GPU) the kernel itself against SDPA."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lora_search import varlen
from tests.test_fastpath import torch_varlen_on_cpu


def test_the_cumulative_lengths_cover_the_row_and_the_tail_is_a_sequence_of_its_own() -> None:
    import numpy as np

    got = varlen.cu_lengths(np.array([3, 5, 2]), 10, "cpu")
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 8, 10] and got["cu_seq_lens_k"] is got["cu_seq_lens_q"]
    assert got["max_length_q"] == got["max_length_k"] == 5 and str(got["cu_seq_lens_q"].dtype) == "torch.int32"
    # a row longer than its sequences (padding at its end): the pad tokens attend among themselves, never to a sequence
    assert varlen.cu_lengths([3, 5], 12, "cpu")["cu_seq_lens_q"].tolist() == [0, 3, 8, 12]


def test_without_lengths_the_sequences_are_found_where_the_position_ids_restart() -> None:
    import torch

    cu, longest = varlen.sequences(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]), 1, 9, "cpu")
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
    cu, longest = varlen.sequences(None, 2, 6, "cpu")  # no position ids: one sequence a row
    assert cu.tolist() == [0, 6, 12] and longest == 6
    cu, _ = varlen.sequences(torch.tensor([[4, 5, 0, 1]]), 1, 4, "cpu")  # a row starting mid-sequence
    assert cu.tolist() == [0, 2, 4]


@pytest.mark.parametrize("release", ["is_causal", "window_size", "window_size+enable_gqa", "heads must match"])
def test_the_kernel_is_asked_for_causal_grouped_attention_in_each_torch_releases_terms(
    monkeypatch: pytest.MonkeyPatch, release: str
) -> None:
    """`varlen_attn`'s keywords differ across torch releases; each is asked for causal attention over grouped
    key/value heads in its own terms, and one that refuses fewer key/value heads gets them repeated (once noticed,
    for every later call). fp32 inputs go to the kernel in bf16 and come back fp32."""
    import inspect

    import torch

    seen: list[dict[str, Any]] = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({"heads": (q.shape[1], k.shape[1]), "dtype": q.dtype, **kwargs})
        if release == "heads must match" and q.shape[1] != k.shape[1]:
            raise ValueError("Expect query and key/value to have the same number of heads")
        return q.clone()

    names = {
        "is_causal": "is_causal scale",
        "window_size": "window_size scale",
        "window_size+enable_gqa": "window_size scale enable_gqa",
        "heads must match": "window_size scale",
    }[release].split()
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    kernel.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in "q k v cu_q cu_k max_q max_k".split()]
        + params
    )
    monkeypatch.setattr(varlen, "_kernel", lambda: (kernel, frozenset(inspect.signature(kernel).parameters)))
    monkeypatch.setattr(varlen, "_repeat_kv", False)
    q, k = torch.randn(10, 4, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = varlen.varlen(q, k, k, cu, 6, 0.125)
    assert out.shape == q.shape and out.dtype == torch.float32
    causal = {"is_causal": True} if release == "is_causal" else {"window_size": (-1, 0)}
    gqa = {"enable_gqa": True} if "enable_gqa" in names else {}
    assert seen[0] == {"heads": (4, 2), "dtype": torch.bfloat16, "scale": 0.125, **causal, **gqa}
    if release == "heads must match":
        assert [s["heads"] for s in seen] == [(4, 2), (4, 4)] and varlen._repeat_kv
        varlen.varlen(q, k, k, cu, 6, 0.125)
        assert seen[-1]["heads"] == (4, 4) and len(seen) == 3  # repeated at once from then on
    else:
        assert len(seen) == 1


def _one_step(model_dir: Path, attn: str, lengths: list[int], device: str) -> tuple[float, dict[str, Any]]:
    """One forward and backward of LoRA (random A and B) on rows of `lengths` random tokens: padded with a mask on
    SDPA, or packed into one row with per-sequence position ids and `varlen.cu_lengths` on "torch_varlen"; fp32 on
    the CPU, bf16 on CUDA. The loss and every adapter gradient (fp32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).to(device) for n in lengths]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).train()
    if attn == "sdpa":
        batch = torch.zeros(len(ids), max(lengths), dtype=torch.long, device=device)
        labels, mask = torch.full_like(batch, -100), torch.zeros_like(batch)
        for i, row in enumerate(ids):
            batch[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = row, row, 1
        out = model(input_ids=batch, attention_mask=mask, labels=labels)
    else:
        packed = torch.cat(ids)[None]
        labels = packed.clone()
        labels[0, [sum(lengths[:i]) for i in range(len(lengths))]] = -100  # no sequence predicts the next one's start
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        kwargs = varlen.cu_lengths(lengths, packed.shape[1], device)
        out = model(input_ids=packed, position_ids=positions, labels=labels, **kwargs)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_one_step_on_packed_rows_gives_padded_sdpas_loss_and_gradients(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One forward and backward of LoRA on four rows of different lengths: padded on SDPA, and packed into one row on
    "torch_varlen" with the cumulative lengths the trainer hands it (`varlen.cu_lengths`; the kernel stood in on the
    CPU, `torch_varlen_on_cpu`). The loss and every adapter gradient agree to float32 rounding."""
    import torch

    calls = torch_varlen_on_cpu(monkeypatch)
    lengths = [5, 17, 9, 30]
    padded_loss, padded_grads = _one_step(tiny_model_dir, "sdpa", lengths, "cpu")
    packed_loss, packed_grads = _one_step(tiny_model_dir, "torch_varlen", lengths, "cpu")
    assert calls == [len(lengths)] * 2  # both layers, on the four sequences
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_a_model_whose_attention_the_kernel_does_not_compute_is_named() -> None:
    assert varlen.unsupported(SimpleNamespace(model_type="llama")) is None
    assert "sliding window of 4096" in varlen.unsupported(SimpleNamespace(sliding_window=4096))
    # Qwen2 carries a window it does not use
    assert varlen.unsupported(SimpleNamespace(sliding_window=4096, use_sliding_window=False)) is None
    assert "soft-capping" in varlen.unsupported(SimpleNamespace(attn_logit_softcapping=50.0))


def test_the_attention_function_refuses_what_it_does_not_compute() -> None:
    import torch

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="not an attention mask"):
        varlen.attention(None, q, q, q, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="no attention dropout"):
        varlen.attention(None, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="no sliding window"):
        varlen.attention(None, q, q, q, None, sliding_window=2)


def test_preflight_names_what_torch_varlen_needs_before_any_compute(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep naming "torch_varlen" gets, at once: CPU-only workers, a torch without the kernel, and a base whose
    attention has a sliding window, each with the field, the value and a fix; any kernel with no CPU implementation
    on CPU-only workers is named the same way."""
    import dataclasses
    import json
    import shutil

    from lora_search import preflight
    from lora_search.config import BaseModel, Dataset, Resources, SearchSpace, Sweep
    from tests.conftest import write_instruction_rows

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(varlen, "available", lambda: False)
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    rows = write_instruction_rows(tmp_path / "rows.jsonl", 40)
    sweep = Sweep(
        name="varlen-checks",
        base=BaseModel(str(base), attn_implementation="torch_varlen"),
        dataset=Dataset(str(rows), max_length=64),
        space=SearchSpace(variants=("lora",), ranks=(4,)),
        resources=Resources(gpus_per_worker=0),
        output_dir=str(tmp_path / "out"),
        tracking_uri=str(tmp_path / "mlruns"),
    )
    found = [p for p in preflight.problems(sweep) if p.field == "base.attn_implementation"]
    texts = [f"{p.value}: {p.message} ({p.fix})" for p in found]
    assert len(found) == 3, texts
    assert any("torch_varlen runs on CUDA GPUs only, but resources.gpus_per_worker = 0" in t for t in texts)
    assert any("has no torch.nn.attention.varlen" in t and "torch>=2.10" in t for t in texts)
    assert any("a sliding window of 64 tokens" in t and "'flex_attention'" in t for t in texts)
    assert all(p.value == "torch_varlen" for p in found)
    # the class: every kernel with no CPU implementation, on CPU-only workers
    for kernel in ("flash_attention_2", "flash_attention_3"):
        named = dataclasses.replace(sweep, base=dataclasses.replace(sweep.base, attn_implementation=kernel))
        cpu = [p for p in preflight.problems(named) if "CUDA GPUs only" in p.message]
        assert [(p.field, p.value) for p in cpu] == [("base.attn_implementation", kernel)], cpu


@pytest.mark.gpu
def test_torch_varlen_matches_sdpa_on_this_gpu_and_auto_takes_it() -> None:
    """On the device: the kernel trains the 8B shape's attention (32 query heads, 8 key/value heads, 128 wide) and
    matches SDPA on each sequence (`varlen.failure`), once a process; "auto" then trains on it."""
    import torch

    from lora_search import fastpath

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run with -m gpu on the device machine)")
    llama = SimpleNamespace(model_type="llama", num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    assert varlen.failure(llama) is None
    assert fastpath.resolve_attention("auto", True, llama)[0] == "torch_varlen"
    assert list(varlen._tried.values()) == [None]  # tried once, kept for the process's next trial


@pytest.mark.gpu
def test_a_bf16_step_on_torch_varlen_matches_padded_sdpa_on_the_gpu(tiny_model_dir: Path) -> None:
    """The loss and adapter gradients of one bf16 step on the real kernel, packed, against padded SDPA, on CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run with -m gpu on the device machine)")
    varlen.register()
    lengths = [5, 17, 9, 30, 64, 3]
    padded_loss, padded_grads = _one_step(tiny_model_dir, "sdpa", lengths, "cuda")
    packed_loss, packed_grads = _one_step(tiny_model_dir, "torch_varlen", lengths, "cuda")
    assert packed_loss == pytest.approx(padded_loss, rel=1e-2)
    for name, grad in padded_grads.items():
        scale = float(grad.abs().max()) or 1.0
        assert float((packed_grads[name] - grad).abs().max()) <= 5e-2 * scale, name
