"""A pack's numerics (issue 24, item 4): in fp32 on the CPU each packed adapter's loss curve is its solo PEFT run's.

Run: python -m pytest tests/test_pack.py --durations=0

Solo: `get_peft_model` on a fresh base with the variant's own PEFT config (lora_search.variants) and optimizer (LoRA+:
the variant's), a plain loop in the Trainer's order (forward with labels, backward, clip, step, schedule, zero). Packed:
the same init copied in, the same batches in the same order, three adapters of different ranks, alphas, learning rates,
schedules and targets (c's a subset of a's) in one base; after 4 steps b leaves and d joins, and a and c go on. The pack
scores its loss in chunks of `CHUNK` tokens (far fewer than a step's), so the curves go through the chunked loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_search import memory
from lora_search import pack as pack_module
from lora_search.memory import PLAIN_HEADS
from lora_search.pack import PACKED, SOLO, Pack, Training, packs, trained_weights
from lora_search.pack_layers import PackedLinear
from lora_search.problems import ConfigError
from lora_search.variants import VARIANTS, Adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOTAL = 6
ADAPTERS = {
    # name: (variant, rank, alpha, targets, lr, Training beyond lr and total_steps)
    "a": ("lora", 4, 8.0, ("q_proj", "v_proj"), 1e-2, {"warmup_steps": 2, "weight_decay": 0.01}),
    "b": ("rslora", 8, 4.0, ALL, 5e-3, {"schedule": "cosine", "max_grad_norm": 0.05}),
    "c": ("loraplus", 2, 4.0, ("v_proj",), 2e-3, {"max_grad_norm": None}),
    "d": ("lora", 6, 12.0, ("o_proj", "down_proj"), 1e-2, {"schedule": "constant"}),
    # PiSSA: its solo run writes W - s B0 A0 into the base; in the pack the base stays and a correction subtracts
    "e": ("pissa", 4, 4.0, ("q_proj", "v_proj", "up_proj"), 2e-2, {"warmup_steps": 1}),
}
SWAP = 4
STEPS = {"a": TOTAL, "b": SWAP, "c": TOTAL, "d": TOTAL - SWAP, "e": TOTAL}
"""Steps each adapter trains in the pack: a, b, c, e from the start; after SWAP steps b leaves and d joins."""
FIRST = "abce"
"""The adapters attached from the start."""
CHUNK = 7
"""Tokens a chunk of the pack's loss holds (`LOSS_CHUNK_LOGITS` set to 7 x the vocab): a step's 100-150 tokens make
15-22 chunks, whose edges fall inside rows and across adapters' blocks."""


def _adapter(name: str) -> Adapter:
    variant, rank, alpha, targets, lr, _ = ADAPTERS[name]
    return Adapter(
        variant=variant,
        rank=rank,
        alpha=alpha,
        targets="+".join(targets),
        lr=lr,
        dropout=0.0,
        total_steps=TOTAL,
        target_modules=targets,
    )


def _training(name: str) -> Training:
    ratio = 16.0 if ADAPTERS[name][0] == "loraplus" else None  # variants._loraplus_optimizer's
    return Training(lr=ADAPTERS[name][4], total_steps=TOTAL, loraplus_lr_ratio=ratio, **ADAPTERS[name][5])


def _batches(name: str, vocab: int) -> list[dict[str, torch.Tensor]]:
    """The adapter's own data order: right-padded micro-batches of its own row count and lengths, the first tokens of
    each row a prompt (labels -100), as the trial's collator gives them; tokens from a few of its own, so it learns."""
    g = torch.Generator().manual_seed(ord(name))
    rows = 2 + ord(name) % 3
    tokens = torch.randperm(vocab - 3, generator=g)[:6] + 3
    out = []
    for _ in range(STEPS[name]):
        lengths = torch.randint(6, 14 + 4 * (ord(name) % 2), (rows,), generator=g)
        width = int(lengths.max())
        ids = tokens[torch.randint(0, len(tokens), (rows, width), generator=g)]
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _base(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _solo(name: str, model_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    """(its initial adapter under PEFT's keys, its loss curve) trained alone, as a solo trial trains it."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import get_scheduler

    adapter, training = _adapter(name), _training(name)
    variant = VARIANTS[adapter.variant]
    base = _base(model_dir)
    torch.manual_seed(ord(name))
    model = get_peft_model(base, variant.peft_config(adapter))
    init = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    if variant.optimizer is not None:
        optimizer = variant.optimizer(model, adapter)
    else:
        optimizer = torch.optim.AdamW(params, lr=adapter.lr, weight_decay=training.weight_decay)
    schedule = get_scheduler(training.schedule, optimizer, training.warmup_steps, TOTAL)
    losses = []
    model.train()
    for batch in _batches(name, base.config.vocab_size):
        loss = model(**batch).loss
        loss.backward()
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return init, losses


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Ops this small run fastest on one thread; on a busy 2-core CI runner two threads wait on each other (a solo
    run: 0.15 s on one, 3-8 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def solo(tiny_model_dir: Path) -> dict[str, tuple[dict[str, torch.Tensor], list[float]]]:
    return {name: _solo(name, tiny_model_dir) for name in ADAPTERS}


@pytest.fixture(scope="module")
def packed(tiny_model_dir: Path, solo: dict) -> tuple[Pack, dict[str, list[float]]]:
    """The pack after its TOTAL steps (a, c and d attached) and every adapter's packed loss curve."""
    return _pack_run(tiny_model_dir, solo, checkpointing=False)


def _head_calls(pack: Pack) -> list[int]:
    """The LM head's forward calls from now on, one entry (its rows) a call: what shows the loss ran in chunks."""
    calls: list[int] = []
    pack.model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


def _chunks(batches: dict[str, dict[str, torch.Tensor]]) -> int:
    """Chunks of `CHUNK` tokens in the pack step over `batches`: their rows x the longest row."""
    tokens = sum(b["input_ids"].shape[0] for b in batches.values()) * max(
        b["input_ids"].shape[1] for b in batches.values()
    )
    return math.ceil(tokens / CHUNK)


def _pack_run(
    model_dir: Path, solo: dict, checkpointing: bool, micro_batches: int = 1, drop_mask: bool = False
) -> tuple[Pack, dict[str, list[float]]]:
    with pytest.MonkeyPatch.context() as patch:
        pack = Pack(_base(model_dir), checkpointing=checkpointing, drop_mask=drop_mask)
        patch.setattr(memory, "LOSS_CHUNK_LOGITS", CHUNK * pack.model.config.vocab_size)
        return _pack_steps(pack, solo, micro_batches)


def _pack_steps(pack: Pack, solo: dict, micro_batches: int = 1) -> tuple[Pack, dict[str, list[float]]]:
    vocab = pack.model.config.vocab_size
    calls, chunks = _head_calls(pack), 0
    data = {name: _batches(name, vocab) for name in ADAPTERS}
    for name in FIRST:
        pack.attach(
            name, VARIANTS[ADAPTERS[name][0]].peft_config(_adapter(name)), solo[name][0], training=_training(name)
        )
    curves: dict[str, list[float]] = {name: [] for name in ADAPTERS}
    for step in range(TOTAL):
        if step == SWAP:
            pack.detach("b")
            pack.attach("d", VARIANTS["lora"].peft_config(_adapter("d")), solo["d"][0], training=_training("d"))
        batches = {name: data[name][len(curves[name])] for name in pack.names}
        for name, loss in pack.step(batches, micro_batches).losses.items():
            curves[name].append(loss)
        chunks += _chunks(batches)
    # each chunk's head product runs in the forward and again in the backward's recompute (once, its gradient
    # computed in the forward, with pack.HEAD_LOSS "fused"), never the whole batch's
    assert pack.chunked_head() is not None and chunks > 10 * TOTAL
    assert max(calls) == CHUNK, calls
    if micro_batches == 1:
        assert len(calls) == (1 if pack_module.HEAD_LOSS == "fused" else 2) * chunks, calls
    return pack, curves


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_packed_curve_is_the_solo_curve(name: str, solo: dict, packed: tuple) -> None:
    """a, c: 6 steps, with b leaving and d joining after 4; b: 4 steps; d: 2 steps, joining a running pack."""
    got, want = packed[1][name], solo[name][1]
    assert len(got) == STEPS[name]
    assert got == pytest.approx(want, rel=1e-5, abs=0), f"{name}: packed {got} vs solo {want}"
    assert want[-1] < want[0] - 0.05, f"{name} did not learn: {want}"  # so the curves compared move


def test_saved_adapter_loads_in_peft_with_the_same_logits(tiny_model_dir: Path, packed: tuple, tmp_path: Path) -> None:
    from peft import PeftModel

    pack = packed[0]
    batches = {n: _batches(n, pack.model.config.vocab_size)[0] for n in ("a", "d", "e")}
    mine = pack.logits(batches)
    for name in ("a", "d", "e"):
        model = PeftModel.from_pretrained(_base(tiny_model_dir), pack.save(name, tmp_path / name)).eval()
        with torch.no_grad():
            theirs = model(input_ids=batches[name]["input_ids"], attention_mask=batches[name]["attention_mask"]).logits
        torch.testing.assert_close(theirs, mine[name], rtol=1e-5, atol=1e-5)
        # PiSSA is saved as PEFT saves it solo: plain LoRA of twice the rank on the base as loaded, the same scaling
        double = 2 if name == "e" else 1
        assert model.peft_config["default"].r == double * ADAPTERS[name][1]
        assert model.peft_config["default"].lora_alpha == double * ADAPTERS[name][2]
        assert model.peft_config["default"].init_lora_weights is True


def test_plain_copy_is_the_base_over_the_packs_own_weights(tiny_model_dir: Path, packed: tuple) -> None:
    """`Pack.plain_copy` (what a pack host scores adapters on): the base's logits from the pack's own weight tensors,
    no pack layer in it, the pack's layers untouched; and outside a step the pack's own model computes the base."""
    pack = packed[0]
    plain = pack.plain_copy().eval()
    ids = _batches("a", pack.model.config.vocab_size)[0]["input_ids"]
    with torch.no_grad():
        expected = _base(tiny_model_dir).eval()(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(pack.model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert sorted(pack.names) == ["a", "c", "d", "e"] and any(isinstance(m, PackedLinear) for m in pack.model.modules())
    own = {p.data_ptr() for p in pack.model.parameters()}
    assert all(p.data_ptr() in own for p in plain.parameters())


def test_default_init_is_peft_init_and_detaching_all_restores_the_base(tiny_model_dir: Path, solo: dict) -> None:
    """Under the same seed an adapter attached without init_state starts where get_peft_model starts it; with every
    adapter detached the model holds no pack layer and the base's weights as loaded."""
    pack = Pack(_base(tiny_model_dir))
    loaded = {k: v.clone() for k, v in pack.model.state_dict().items()}
    for name in ("b", "c", "e"):  # e: PiSSA's SVD, drawn as PEFT draws it
        torch.manual_seed(ord(name))
        pack.attach(name, VARIANTS[ADAPTERS[name][0]].peft_config(_adapter(name)), training=_training(name))
        torch.testing.assert_close(pack.state(name), solo[name][0], rtol=0, atol=0)
    pack.detach("b")
    pack.detach("c")
    pack.detach("e")
    assert not any(isinstance(m, PackedLinear) for m in pack.model.modules())
    torch.testing.assert_close(pack.model.state_dict(), loaded, rtol=0, atol=0)


def test_a_checkpointed_pack_trains_the_same_curves(tiny_model_dir: Path, solo: dict, packed: tuple) -> None:
    """Gradient checkpointing (what a pack runs where it fits only so) recomputes each layer in the backward with the
    rows still routed: every adapter's curve, b leaving and d joining included, is the plain pack's."""
    pack, curves = _pack_run(tiny_model_dir, solo, checkpointing=True)
    assert pack.model.is_gradient_checkpointing
    for name in ADAPTERS:
        assert curves[name] == pytest.approx(packed[1][name], rel=1e-5, abs=0), name


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_a_step_in_micro_batches_trains_the_same_curves(
    tiny_model_dir: Path, solo: dict, packed: tuple, micro_batches: int
) -> None:
    """A step's rows run in 2 or 3 micro-batches, the gradients summed (each adapter has 2-4 rows a step: with 3, an
    adapter of 2 rows sits the last micro-batch out): the one-batch pack's curves and final weights, to fp32 rounding
    of the sums, each micro-batch's loss counted against the adapter's label tokens in the whole step."""
    pack, curves = _pack_run(tiny_model_dir, solo, checkpointing=micro_batches == 3, micro_batches=micro_batches)
    for name in ADAPTERS:
        assert curves[name] == pytest.approx(packed[1][name], rel=1e-5, abs=0), name
    for name in pack.names:
        for key, value in pack.state(name).items():
            torch.testing.assert_close(value, packed[0].state(name)[key], rtol=1e-5, atol=1e-6, msg=key)


def _masks_seen(pack: Pack) -> list[bool]:
    """From now on, one entry a decoder forward: whether it got an attention mask."""
    seen: list[bool] = []

    def hook(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.append(kwargs.get("attention_mask") is not None)

    pack.model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_a_pack_without_the_pad_mask_trains_the_same_curves(tiny_model_dir: Path, solo: dict, packed: tuple) -> None:
    """`drop_mask` (the solo trial's no-pad-mask, which a pack's base runs on a GPU): right-padded rows of uneven
    lengths go through the base without their attention mask, and every curve and final weight is the masked pack's
    (causal attention: no real token sees a pad, and pads carry no loss)."""
    with pytest.MonkeyPatch.context() as patch:
        pack = Pack(_base(tiny_model_dir), drop_mask=True)
        seen = _masks_seen(pack)
        patch.setattr(memory, "LOSS_CHUNK_LOGITS", CHUNK * pack.model.config.vocab_size)
        pack, curves = _pack_steps(pack, solo)
    assert seen and not any(seen), seen  # the rows are padded (uneven lengths), and no forward took the mask
    for name in ADAPTERS:
        assert curves[name] == pytest.approx(packed[1][name], rel=1e-5, abs=0), name
    for name in pack.names:
        for key, value in pack.state(name).items():
            torch.testing.assert_close(value, packed[0].state(name)[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_left_padded_row_keeps_the_mask(tiny_model_dir: Path) -> None:
    """A step with one row padded on the left keeps its mask even with `drop_mask` (its pads come before its tokens,
    which causal attention alone would let them see): its evaluation equals a masked pack's, and differs from the
    same rows with the pads left unmasked."""
    config = VARIANTS["lora"].peft_config(_adapter("a"))
    right = _batches("a", 64)[0]
    left = {k: right[k].flip(1) for k in ("input_ids", "attention_mask")}  # each row's pads first
    left["labels"] = left["input_ids"].masked_fill(left["attention_mask"] == 0, -100)
    losses = {}
    for drop in (False, True):
        torch.manual_seed(0)
        pack = Pack(_base(tiny_model_dir), drop_mask=drop)
        pack.attach("a", config, training=_training("a"))
        seen = _masks_seen(pack)
        losses[drop] = pack.evaluate({"a": left})["a"]
        assert seen == [True]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    torch.manual_seed(0)
    pack = Pack(_base(tiny_model_dir))
    pack.attach("a", config, training=_training("a"))
    unmasked = {**left, "attention_mask": torch.ones_like(left["attention_mask"])}
    assert pack.evaluate({"a": unmasked})["a"] != pytest.approx(losses[False], rel=1e-4)


def test_a_step_refuses_fewer_than_one_micro_batch(packed: tuple) -> None:
    with pytest.raises(ValueError, match="micro_batches=0: give at least 1"):
        packed[0].step({}, micro_batches=0)


@pytest.mark.parametrize("head_loss", ["checkpointed", "fused"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_chunked_loss_is_the_whole_logits_loss(
    tiny_model_dir: Path, checkpointing: bool, head_loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 5 tokens (a step's ~130 make 27, across rows and adapters) against the whole batch's logits through the
    model's forward (what a base outside `PLAIN_HEADS` runs), on a base whose head is tied to its embedding: each step's
    losses, every adapter's gradients (as the backward leaves them, before the optimizer) and the evaluated losses
    agree to fp32 rounding."""
    from peft import LoraConfig

    monkeypatch.setattr(pack_module, "HEAD_LOSS", head_loss)
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": LoraConfig(r=8, lora_alpha=8, target_modules=list(ALL)),
        "c": LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"]),
    }
    drawn = Pack(_base(tiny_model_dir))
    torch.manual_seed(0)
    for name, config in configs.items():
        drawn.attach(name, config, training=Training(lr=1e-2, total_steps=3))
    # B drawn too (PEFT's init zeroes it), so that every gradient, A's included, is nonzero from the first step
    init = {
        n: {k: v if "lora_A" in k else 0.1 * torch.randn_like(v) for k, v in drawn.state(n).items()} for n in configs
    }

    def run(chunked: bool) -> tuple[list[dict[str, float]], list[dict[str, torch.Tensor]], dict[str, float], list]:
        base = _base(tiny_model_dir)
        base.lm_head.weight = base.model.embed_tokens.weight  # tied, as SmolLM2's
        pack = Pack(base, checkpointing=checkpointing)
        assert pack.model.get_output_embeddings().weight is pack.model.get_input_embeddings().weight
        for name, config in configs.items():
            pack.attach(name, config, init[name], training=Training(lr=1e-2, total_steps=3))
        trainable = {n: p for n, p in pack.model.named_parameters() if p.requires_grad}
        grads: list[dict[str, torch.Tensor]] = []
        for n, p in trainable.items():
            p.register_post_accumulate_grad_hook(lambda p, n=n: grads[-1].__setitem__(n, p.grad.clone()))
        calls, data = _head_calls(pack), {n: _batches(n, base.config.vocab_size) for n in ("a", "b", "c")}
        losses = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(memory, "LOSS_CHUNK_LOGITS", 5 * base.config.vocab_size)
            if not chunked:
                patch.setattr(memory, "PLAIN_HEADS", frozenset())
            for step in range(3):
                grads.append({})
                losses.append(pack.step({n: data[n][step] for n in configs}).losses)
                assert len(grads[-1]) == len(trainable)
            evaluated = pack.evaluate({n: data[n][0] for n in configs})
            assert (pack.chunked_head() is not None) == chunked
        return losses, grads, evaluated, calls

    whole, chunked = run(chunked=False), run(chunked=True)
    assert len(whole[3]) == 3 + 1 and len(chunked[3]) > 20 * 3  # the whole logits once a step; chunks, many
    for step in range(3):
        assert chunked[0][step] == pytest.approx(whole[0][step], rel=1e-6, abs=0), step
        # to fp32 rounding, against each tensor's largest element: the chunks' softmax gradient is computed in
        # their forward, in other float operations than autograd's log-softmax backward (under 1e-6 of the largest
        # at step 0); later steps start from weights AdamW moved by those differences divided by sqrt(v), which
        # grows them for the smallest elements (under 2e-5 measured)
        bar = 1e-5 if step == 0 else 1e-4
        for n, want in whole[1][step].items():
            torch.testing.assert_close(chunked[1][step][n], want, rtol=1e-5, atol=bar * want.abs().amax().item())
        assert all(g.abs().max() > 0 for g in whole[1][step].values())
    assert chunked[2] == pytest.approx(whole[2], rel=1e-6, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("trains", "head_loss"), [(False, "fused"), (False, "checkpointed"), (True, "fused")])
def test_the_chunked_loss_and_its_gradient_are_the_plain_ones(
    dtype: torch.dtype, trains: bool, head_loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_chunked_cross_entropy` (chunks of 7 of 40 tokens, a last short chunk, 9 tokens without a label) against
    `cross_entropy(head(hidden).float(), labels, reduction="none")` through autograd, under an uneven incoming
    gradient per token (each adapter's 1 / its label tokens, in a pack): each token's loss and its gradient to the
    hidden state; and to the head's weight where the head trains (the checkpointed chunks, whatever
    `pack.HEAD_LOSS`). A frozen head's chunks under "fused" compute their gradient in the forward: the head runs once
    a chunk, where the checkpointed chunks run it twice."""
    from lora_search.pack import _chunked_cross_entropy

    monkeypatch.setattr(pack_module, "HEAD_LOSS", head_loss)

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype).requires_grad_(trains)
    hidden = torch.randn(40, 16, dtype=dtype)
    labels = torch.randint(0, 50, (40,))
    labels[torch.randperm(40)[:9]] = -100
    upstream = torch.rand(40)
    calls = []
    head.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))

    def run(chunked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        if chunked:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(memory, "LOSS_CHUNK_LOGITS", 7 * 50)
                losses = _chunked_cross_entropy(head, h, labels)
        else:
            losses = torch.nn.functional.cross_entropy(head(h).float(), labels, reduction="none")
        (losses * upstream).sum().backward()
        return losses.detach(), h.grad, head.weight.grad

    plain = run(chunked=False)
    calls.clear()
    chunked = run(chunked=True)
    recomputed = trains or head_loss == "checkpointed"
    assert calls == [7] * 5 + [5] + ([5] + [7] * 5 if recomputed else []), calls  # a recompute: the last chunk first
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-6)  # fp32 either way
    assert (chunked[0][labels == -100] == 0).all() and (chunked[0][labels != -100] > 0).all()
    # to float rounding: bf16's, where the head's products and the gradients' casts round to 8 bits
    rounding = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(chunked[1:3] if trains else chunked[1:2], plain[1:3] if trains else plain[1:2], strict=True):
        torch.testing.assert_close(got, want, rtol=rounding, atol=rounding * want.abs().amax().item())
    assert (chunked[1][labels == -100] == 0).all() and chunked[1].abs().amax() > 0
    if not trains:
        assert chunked[2] is None and plain[2] is None


def test_only_plain_heads_are_chunked(tiny_model_dir: Path) -> None:
    """Every architecture in `PLAIN_HEADS` computes its logits as its head of its decoder's last hidden state (a tiny
    random build of each, Transformers as installed); Gemma-2's softcapping does not, and its pack takes the whole
    logits; so does a pack with an adapter on the head (its rows routed per adapter, which a chunk would not be)."""
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "pad_token_id": 0,
    }
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    for model_type in sorted(PLAIN_HEADS) + ["gemma2"]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small)).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            chunkable = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)
        assert torch.equal(logits, chunkable) == (model_type != "gemma2"), model_type
        assert (Pack(model).chunked_head() is not None) == (model_type != "gemma2"), model_type
    pack = Pack(_base(tiny_model_dir))
    assert pack.chunked_head() is pack.model.lm_head
    pack.attach("a", LoraConfig(r=2, target_modules=["lm_head"]), training=Training(lr=1e-3, total_steps=2))
    assert pack.chunked_head() is None


def test_a_checkpointed_pack_draws_the_same_dropout_masks_again(tiny_model_dir: Path) -> None:
    """With dropout the recompute must draw the forward's masks again (non-reentrant checkpointing keeps the random
    state): two adapters with dropout 0.3 train the same curves with and without checkpointing."""
    from peft import LoraConfig

    def curves(checkpointing: bool) -> dict[str, list[float]]:
        pack = Pack(_base(tiny_model_dir), checkpointing=checkpointing)
        vocab = pack.model.config.vocab_size
        torch.manual_seed(0)
        for name in "ab":
            config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"])
            pack.attach(name, config, training=Training(lr=1e-2, total_steps=4))
        data = {name: _batches(name, vocab) for name in "ab"}
        out: dict[str, list[float]] = {"a": [], "b": []}
        torch.manual_seed(1)  # the dropout draws
        for step in range(4):
            for name, loss in pack.step({n: data[n][step] for n in "ab"}).losses.items():
                out[name].append(loss)
        return out

    plain, checkpointed = curves(False), curves(True)
    for name in "ab":
        assert checkpointed[name] == pytest.approx(plain[name], rel=1e-5, abs=0), name
        assert plain[name][-1] < plain[name][0], plain[name]


@pytest.mark.parametrize("name", ["a", "c", "e"])
def test_an_adapter_resumed_from_its_training_state_goes_on_as_if_never_stopped(
    name: str, tiny_model_dir: Path, solo: dict, tmp_path: Path
) -> None:
    """a (warmup, weight decay), c (LoRA+: two parameter groups, unclipped) and e (PiSSA: its correction's A0 and B0
    in the state, its saved adapter converted) train 3 of their 6 steps, leave with their saved adapter and
    `training_state` (through torch.save and torch.load(weights_only=True), as a checkpoint keeps them), and join a
    fresh pack with `resume=`: the whole curve is the uninterrupted solo run's. The same weights
    without their training state start the optimizer and schedule afresh, and the curve leaves the solo one."""
    config = VARIANTS[ADAPTERS[name][0]].peft_config(_adapter(name))
    first = Pack(_base(tiny_model_dir))
    first.attach(name, config, solo[name][0], training=_training(name))
    data = _batches(name, first.model.config.vocab_size)
    curve = [first.step({name: b}).losses[name] for b in data[:3]]
    torch.save(first.training_state(name), tmp_path / "state.pt")
    saved_dir = first.save(name, tmp_path / "adapter")  # a checkpoint's adapter dir (PiSSA's converted)
    own = first.state(name)
    first.detach(name)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 3
    weights = trained_weights(load_file(str(saved_dir / "adapter_model.safetensors")), state)  # as pack_trial resumes
    torch.testing.assert_close(weights, own, rtol=0, atol=0)
    pack = Pack(_base(tiny_model_dir))
    pack.attach(name, config, weights, training=_training(name), resume=state)
    pack.attach("afresh", config, weights, training=_training(name))
    for b in data[3:]:
        losses = pack.step({name: b, "afresh": b}).losses
        curve.append(losses[name])
        afresh = losses["afresh"]
    assert curve == pytest.approx(solo[name][1], rel=1e-5, abs=0), f"{name}: resumed {curve} vs {solo[name][1]}"
    assert pack.training_state(name)["step"] == TOTAL
    assert afresh != pytest.approx(curve[-1], rel=1e-4), "the training state made no difference: the test shows nothing"


def test_attach_names_every_problem(tiny_model_dir: Path) -> None:
    from peft import LoraConfig

    pack = Pack(_base(tiny_model_dir))
    pack.attach("a", LoraConfig(r=2, target_modules=["q_proj"]), training=Training(lr=1e-3, total_steps=2))
    bad = LoraConfig(r=2, target_modules=["qproj"], use_dora=True, init_lora_weights="olora")
    with pytest.raises(ConfigError) as e:
        pack.attach("a", bad, training=Training(lr=1e-3, total_steps=2))
    for said in ("use_dora", "init_lora_weights", "matches no linear layer", "q_proj", "attached already"):
        assert said in str(e.value)
    with pytest.raises(ConfigError, match="lacks 4 tensor"):
        pack.attach("b", LoraConfig(r=2, target_modules=["k_proj"]), {}, training=Training(lr=1e-3, total_steps=2))
    kept = pack.training_state("a")
    with pytest.raises(ConfigError, match="without the adapter's weights"):
        pack.attach(
            "c", LoraConfig(r=2, target_modules=["q_proj"]), training=Training(lr=1e-3, total_steps=2), resume=kept
        )
    with pytest.raises(ConfigError, match="should have 8"):
        two = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        pack.attach("c", two, {}, training=Training(lr=1e-3, total_steps=2), resume=kept)
    with pytest.raises(ConfigError, match="warmup_steps"):
        Training(lr=1e-3, total_steps=2, warmup_steps=2)
    # a PiSSA adapter resumes with the A0, B0 it started from (its correction), whole and of its shapes
    pissa = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    pack.attach("p", pissa, training=Training(lr=1e-3, total_steps=2))
    weights, state = pack.state("p"), pack.training_state("p")
    assert set(state["pissa_init"]) == set(weights)
    with pytest.raises(ConfigError, match="has no pissa_init") as e:
        pack.attach("q", pissa, weights, training=Training(lr=1e-3, total_steps=2), resume=kept)
    assert "resume" in str(e.value)
    a_key = next(k for k in weights if ".lora_A." in k)
    short = {**state, "pissa_init": {a_key: state["pissa_init"][a_key][:1]}}
    with pytest.raises(ConfigError) as e:
        pack.attach("q", pissa, weights, training=Training(lr=1e-3, total_steps=2), resume=short)
    for said in ("resume.pissa_init", "lacks 3 tensor", "should have shape (2, "):
        assert said in str(e.value)
    assert "q" not in pack.names


def test_every_variant_packs_or_says_why_not() -> None:
    assert set(PACKED) | set(SOLO) == set(VARIANTS) and not set(PACKED) & set(SOLO)
    for name in VARIANTS:
        assert packs(name) is True if name in PACKED else packs(name) == SOLO[name]
    with pytest.raises(ValueError, match="known: lora"):
        packs("dorra")
