"""The pack's layer computes its adapters' products batched ("bmm", "masked") exactly as one adapter at a time
("loop"): outputs and every gradient, in fp32 on a CPU (lora_search/pack_layers.py).

Run: python -m pytest -q tests/test_pack_layers.py   (seconds)

tests/test_pack.py holds the pack to PEFT's solo curves; this file holds each batched path to the one-at-a-time path,
on a layer alone and on a whole pack, and pins which path `products` picks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_search import pack_layers
from lora_search.pack_layers import CORRECTION, PackedLinear, Rows, Step, products

MIXED = {"a": 2, "b": 8, "c": 4, "d": 8}
EQUAL = {"a": 4, "b": 4, "c": 4, "d": 4}
EVEN = {"a": slice(0, 3), "b": slice(3, 6), "c": slice(6, 9), "d": slice(9, 12)}
UNEVEN = {"a": slice(0, 2), "b": slice(2, 5), "c": slice(5, 9)}
LONE = {"b": slice(0, 4)}  # one adapter in the step (the pack's others sat it out or left)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The path each PackedLinear forward took, in order."""
    paths: list[str] = []

    def recorded(how: str, step: Step, peak: float | None) -> str:
        paths.append(products(how, step, peak))
        return paths[-1]

    monkeypatch.setattr(pack_layers, "products", recorded)
    yield paths


@pytest.fixture
def how(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Sets `pack_layers.PRODUCTS` for the test; monkeypatch puts the default back."""

    def set_to(value: str) -> None:
        monkeypatch.setattr(pack_layers, "PRODUCTS", value)

    yield set_to


def _layer(ranks: dict[str, int], dropout: float = 0.0, skip: str = "") -> tuple[PackedLinear, Rows]:
    torch.manual_seed(0)
    rows = Rows()
    layer = PackedLinear(nn.Linear(24, 40, bias=False), rows)
    for name, r in ranks.items():
        if name == skip:  # an adapter of the pack that does not target this layer
            continue
        layer.add(name, r=r, scaling=16 / r, dropout=dropout, dtype=torch.float32)
        nn.init.normal_(layer.lora_B[name].weight)  # a live update (PEFT's init leaves B at zero)
    layer.base_layer.weight.requires_grad_(False)
    return layer, rows


def _run(layer: PackedLinear, rows: Rows, blocks: dict[str, slice]) -> dict[str, torch.Tensor]:
    """The layer's output and its gradients (input, every A and B) for one fixed input and output gradient."""
    x = torch.randn(blocks[list(blocks)[-1]].stop, 5, 24, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    rows.blocks = blocks
    try:
        torch.manual_seed(2)  # dropout's draws
        out = layer(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    finally:
        rows.blocks = {}
    got = {"out": out.detach(), "x.grad": x.grad}
    for name in [n for n in layer.adapters if n in blocks]:
        got[f"{name}.A.grad"] = layer.lora_A[name].weight.grad.clone()
        got[f"{name}.B.grad"] = layer.lora_B[name].weight.grad.clone()
        layer.lora_A[name].weight.grad = layer.lora_B[name].weight.grad = None
    return got


@pytest.mark.parametrize(
    ("asked", "ranks", "dropout", "skip", "blocks", "path"),
    [
        ("masked", MIXED, 0.0, "", EVEN, "masked"),
        ("masked", MIXED, 0.0, "b", EVEN, "masked"),  # an adapter between two others targets another layer
        ("masked", MIXED, 0.0, "", UNEVEN, "masked"),  # rows of different counts, one adapter without rows
        ("masked", MIXED, 0.0, "", LONE, "masked"),  # one adapter: its own weights, no stacking
        ("masked", MIXED, 0.3, "", EVEN, "loop"),  # dropout draws per adapter: not masked
        ("bmm", EQUAL, 0.0, "", EVEN, "bmm"),
        ("bmm", EQUAL, 0.3, "", EVEN, "bmm"),  # each adapter's mask drawn in the loop's order
        ("bmm", EQUAL, 0.0, "b", EVEN, "bmm"),  # not one contiguous run: stacked inputs
        ("bmm", MIXED, 0.0, "", EVEN, "loop"),  # ranks differ: not bmm
        ("bmm", EQUAL, 0.0, "", UNEVEN, "loop"),  # rows differ: not bmm
    ],
)
def test_batched_products_equal_one_adapter_at_a_time(
    asked: str,
    ranks: dict[str, int],
    dropout: float,
    skip: str,
    blocks: dict[str, slice],
    path: str,
    how: object,
    taken: list[str],
) -> None:
    layer, rows = _layer(ranks, dropout, skip)
    how("loop")
    loop = _run(layer, rows, blocks)
    how(asked)
    batched = _run(layer, rows, blocks)
    assert taken == ["loop", path]
    targeting = set(blocks) & set(layer.adapters)
    assert set(loop) == set(batched) and len(loop) == 2 + 2 * len(targeting)
    for key in loop:
        torch.testing.assert_close(batched[key], loop[key], rtol=1e-5, atol=1e-5, msg=f"{asked} {path}: {key}")
    assert all(loop[f"{n}.B.grad"].abs().sum() > 0 for n in targeting)  # every adapter's update reached its rows


@pytest.mark.parametrize(
    ("asked", "ranks", "dropout", "blocks", "path"),
    [
        ("masked", MIXED, 0.0, EVEN, "masked"),
        ("masked", MIXED, 0.0, UNEVEN, "masked"),
        ("masked", MIXED, 0.3, EVEN, "loop"),
        ("bmm", EQUAL, 0.0, EVEN, "bmm"),
        ("bmm", EQUAL, 0.3, EVEN, "bmm"),
    ],
)
def test_a_correction_is_its_adapters_frozen_negative_product_on_every_path(
    asked: str, ranks: dict[str, int], dropout: float, blocks: dict[str, slice], path: str, how: object, taken: list
) -> None:
    """PiSSA's correction (`PackedLinear.correct`) on a and c: their rows get -s B0 A0 x on top of s B A dropout(x)
    (no dropout on the correction: it stands for the base weight PEFT rewrites), on every path as one adapter at a
    time; A0 and B0 get no gradient and stay as given; the adapters' own gradients are those without a correction
    (a frozen product adds to the output, not to their gradients)."""
    layer, rows = _layer(ranks, dropout)
    g = torch.Generator().manual_seed(5)
    given = {n: (torch.randn(ranks[n], 24, generator=g), torch.randn(40, ranks[n], generator=g)) for n in "ac"}
    how("loop")
    plain = _run(layer, rows, blocks)
    for name, (a0, b0) in given.items():
        layer.correct(name, a0, b0)
    assert layer.adapters == list(ranks) and layer.correction("a") is not None and layer.correction("b") is None
    loop = _run(layer, rows, blocks)
    how(asked)
    batched = _run(layer, rows, blocks)
    assert taken == ["loop", "loop", path]
    x = torch.randn(blocks[list(blocks)[-1]].stop, 5, 24, generator=torch.Generator().manual_seed(1))  # _run's
    g_out = torch.randn(plain["out"].shape, generator=torch.Generator().manual_seed(3))  # _run's output gradient
    want = {"out": plain["out"].clone(), "x.grad": plain["x.grad"].clone()}
    for name, (a0, b0) in given.items():
        if name in blocks:
            s, rows_of = layer.scaling[name], blocks[name]
            want["out"][rows_of] -= s * x[rows_of] @ a0.t() @ b0.t()
            want["x.grad"][rows_of] -= s * g_out[rows_of] @ b0 @ a0
    for key in loop:
        torch.testing.assert_close(batched[key], loop[key], rtol=1e-5, atol=1e-5, msg=f"{asked} {path}: {key}")
        torch.testing.assert_close(loop[key], want.get(key, plain[key]), rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.equal(want["out"], plain["out"]) and not torch.equal(want["x.grad"], plain["x.grad"])
    for name, (a0, b0) in given.items():
        frozen = layer.lora_A[name + CORRECTION].weight, layer.lora_B[name + CORRECTION].weight
        assert all(w.grad is None and not w.requires_grad for w in frozen)
        kept = layer.correction(name)
        assert kept is not None and torch.equal(kept[0], a0) and torch.equal(kept[1], b0)
    layer.remove("a")
    assert "a" + CORRECTION not in layer.scaling and layer.adapters == [n for n in ranks if n != "a"]


def test_masked_products_run_as_one_autograd_node_with_the_base(how: object) -> None:
    """The masked path computes the base and every adapter's update as one node (`fused_lora.LoraLinear`), whose
    backward adds the adapters' input gradient into the base's: the input gets one gradient from the layer, not two
    (what the equality with the loop above holds to the loop's numbers). A base that trains keeps autograd's graph."""
    layer, rows = _layer(MIXED)
    x = torch.randn(12, 5, 24, requires_grad=True)
    how("masked")
    rows.blocks = EVEN
    try:
        out = layer(x)
        layer.base_layer.weight.requires_grad_(True)
        trained = layer(x)
    finally:
        rows.blocks = {}
    node = out.grad_fn.next_functions[0][0]  # under the view back to (rows, tokens, out)
    assert type(node).__name__ == "MaskedLoraLinearBackward"
    edges = [type(n).__name__ for n, _ in node.next_functions if n is not None]
    # x's rows, one edge; then each adapter's A and B straight to its own weight (no cat of them in the graph)
    assert edges == ["ViewBackward0"] + ["AccumulateGrad"] * 2 * len(MIXED)
    assert "MaskedLoraLinearBackward" not in {type(n).__name__ for n, _ in trained.grad_fn.next_functions}


def test_masked_products_read_weights_written_since_the_last_forward(how: object) -> None:
    """The stacked, scaled weights are kept between forwards (`_Stack`) and recast where an adapter's weights were
    written in place since (an optimizer step, a checkpoint load): by `refresh_stacks` for a whole pack at once, or
    by the next forward that finds its stack stale. Either way the output is the one-at-a-time path's."""
    layer, rows = _layer(MIXED)
    x = torch.randn(12, 5, 24)

    def out(path: str) -> torch.Tensor:
        how(path)
        rows.blocks = EVEN
        try:
            with torch.no_grad():
                return layer(x)
        finally:
            rows.blocks = {}

    first = out("masked")
    stack = layer.last_stack
    assert stack is not None and not stack.stale()
    with torch.no_grad():
        layer.lora_B["c"].weight.mul_(3.0)  # an in-place write bumps the version (the pack bumps a fused AdamW's)
    assert stack.stale()
    assert pack_layers.refresh_stacks([stack, None]) == 1 and not stack.stale()
    assert pack_layers.refresh_stacks([stack]) == 0  # nothing written since
    torch.testing.assert_close(out("masked"), out("loop"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out("masked"), first)
    with torch.no_grad():
        layer.lora_A["a"].weight.mul_(-2.0)  # no refresh: the forward recasts its own stack
    torch.testing.assert_close(out("masked"), out("loop"), rtol=1e-5, atol=1e-5)
    assert layer.last_stack is stack  # the same layout's stack, kept


@pytest.mark.parametrize("asked", ["masked", "bmm"])
def test_batched_products_keep_a_bf16_product_bf16_under_autocast(asked: str, how: object, taken: list[str]) -> None:
    """As the one-at-a-time path does (its scaling is a Python float): the update is added in the output's dtype."""
    layer, rows = _layer(EQUAL)
    x = torch.randn(12, 5, 24)
    rows.blocks = EVEN
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            how(asked)
            batched = layer(x)
            how("loop")
            loop = layer(x)
    finally:
        rows.blocks = {}
    assert taken == [asked, "loop"]
    assert batched.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(batched.float(), loop.float(), rtol=2e-2, atol=5e-2)


def test_auto_masks_on_a_gpu_where_the_saved_launches_outweigh_the_extra_flops() -> None:
    def step(ranks: tuple[int, ...], features: tuple[int, int], tokens: int, dropout: bool = False) -> Step:
        rows = 8
        return Step((rows,) * len(ranks), ranks, dropout, 1, features, batch=rows * len(ranks), tokens=tokens)

    h100 = 989.4
    # SmolLM2's 576-wide layers, ranks 16/8/4/32, 8 rows of 512 tokens each: every row computes 60 ranks where it
    # needs its own (15 on average): 5.1 GFLOP more, ~17 us at 30% of the peak, against 4 x 12 - 9 launches saved
    small = step((16, 8, 4, 32), (576, 576), 512)
    assert small.masked_extra_flops() == 6 * 512 * 1152 * (32 * 60 - 8 * 60)
    assert products("auto", small, h100) == "masked"
    # an 8B MLP layer (4096 -> 14336), ranks up to 64, 2048-token rows: the extra products cost more than launches
    big = step((64, 8, 32, 16), (4096, 14336), 2048)
    assert not big.masked_pays(h100) and products("auto", big, h100) == "loop"
    assert products("auto", step((64,) * 4, (4096, 14336), 2048), h100) == "bmm"
    assert products("auto", step((4, 8), (576, 576), 512, dropout=True), h100) == "loop"  # dropout: not masked
    assert products("auto", step((4, 4), (576, 576), 512, dropout=True), h100) == "bmm"
    # one adapter: masked launches fewer kernels than the loop (measured faster on an H100 at k=1, NOTES change 32)
    assert products("auto", step((4,), (576, 576), 512), h100) == "masked"
    lone = Step((8,), (64,), False, 1, (4096, 14336), batch=32, tokens=2048)  # one adapter's 8 of a pack's 32 rows
    assert not lone.masked_pays(h100) and products("auto", lone, h100) == "loop"  # its product on 24 rows: too dear
    assert products("auto", step((4,), (576, 576), 512, dropout=True), h100) == "loop"
    assert products("auto", small, None) == "loop"  # a CPU: a kernel is cheap there, a FLOP is not
    assert products("loop", small, h100) == "loop" and products("masked", big, None) == "masked"


@pytest.mark.parametrize(("asked", "ranks"), [("masked", (2, 8, 4)), ("bmm", (4, 4, 4)), ("auto", (2, 8, 4))])
def test_a_pack_with_batched_products_trains_as_one_adapter_at_a_time(
    asked: str,
    ranks: tuple[int, ...],
    tiny_model_dir: Path,
    how: object,
    taken: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three adapters of one row count (overlapping targets; LoRA, rsLoRA, LoRA+) over a real tiny base: the same loss
    curves, to fp32 rounding, with batched products as one adapter at a time (test_pack.py holds the latter to
    PEFT's solo curves). "auto" decides as it would on an H100 (the products still run on this CPU)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from lora_search.pack import Pack, Training

    targets = {"a": ["q_proj", "v_proj", "up_proj"], "b": ["q_proj", "k_proj", "v_proj"], "c": ["v_proj", "up_proj"]}
    configs = {  # a: PiSSA, whose correction runs on every path too
        name: LoraConfig(
            r=r,
            lora_alpha=8,
            use_rslora=name == "b",
            target_modules=targets[name],
            init_lora_weights="pissa" if name == "a" else True,
        )
        for name, r in zip("abc", ranks, strict=True)
    }
    trainings = {
        "a": Training(lr=1e-2, total_steps=5),
        "b": Training(lr=5e-3, total_steps=5, schedule="cosine"),
        "c": Training(lr=2e-3, total_steps=5, loraplus_lr_ratio=16.0),
    }
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(5):
        ids = torch.tensor([5, 9, 14, 22, 31, 40])[torch.randint(0, 6, (9, 12), generator=g)]  # learnable
        data.append(
            {n: {"input_ids": ids[i * 3 : i * 3 + 3], "labels": ids[i * 3 : i * 3 + 3]} for i, n in enumerate("abc")}
        )

    def curves() -> dict[str, list[float]]:
        pack = Pack(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
        for name, config in configs.items():
            torch.manual_seed(ord(name))
            pack.attach(name, config, training=trainings[name])
        live = torch.Generator().manual_seed(4)  # live B: every adapter's product matters from the first step
        with torch.no_grad():
            for layer in (m for m in pack.model.modules() if isinstance(m, PackedLinear)):
                for key, b in layer.lora_B.items():
                    if not key.endswith(CORRECTION):
                        b.weight.copy_(torch.randn(b.weight.shape, generator=live) * 0.02)
        out: dict[str, list[float]] = {n: [] for n in configs}
        for batches in data:
            for name, loss in pack.step(batches).losses.items():
                out[name].append(loss)
        return out

    monkeypatch.setattr(pack_layers, "device_peak_tflops", lambda device: 989.4)
    how("loop")
    loop = curves()
    assert set(taken) == {"loop"}
    taken.clear()
    how(asked)
    batched = curves()
    assert {"masked" if asked == "auto" else asked} <= set(taken), f"{asked}: the pack's layers took {set(taken)}"
    for name in configs:
        assert batched[name] == pytest.approx(loop[name], rel=1e-5, abs=0), name
        assert loop[name][-1] < loop[name][0], f"{name} did not move: {loop[name]}"
