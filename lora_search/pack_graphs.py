"""A pack's training step as one CUDA graph per layout, replayed: the step's host work (Python, dispatch and thousands
of kernel launches, which a pack step on a small base waits on: benchmarks/NOTES.md, session 15) done once.

    pack = Pack(model, drop_mask=True, graphs=True)   # on a GPU
    pack.step(batches)   # a layout's first WARMUP_STEPS steps run as they come; the next is captured, then replayed

A layout is what a graph's shapes and branches depend on: which adapters step, in which order, with how many rows in
each micro-batch, and the tokens a row, rounded up to `BUCKET_TOKENS` (the rows are right-padded to it: under causal
attention without a mask no real token sees a pad, and the labels there are -100, so the losses and gradients are
those of the unpadded step, to float rounding). `Pack.device_step` is what is captured: the forwards and backwards, each
adapter's clip and AdamW step (torch's capturable AdamW, its rates device tensors) and the masked layers' stacks
recast. Outside the graph stay the copies of the step's batches into the graph's input buffers, the schedules'
steps (which write the next rates into those tensors) and the read of the losses.

Why not `torch.compile(mode="reduce-overhead")`: it graphs the forward and the backward but not the optimizers'
steps, recompiles per layout, and specialises on the layers' Python state (the rows each adapter owns), which this
captures as it runs. Torch's own `torch.cuda.graph` is what this uses.

A step runs as it comes, not from a graph, where:
- the pack recomputes activations (`Pack(checkpointing=True)`) and keeps the random state for it, which is read on
  the host: where an adapter or the base has dropout (without, the recompute reads no random state, and is
  captured with the rest);
- a row is padded on the left or the mask is kept (the attention mask's branches read the device);
- the layout has not run `WARMUP_STEPS` steps yet (kernels compile and the optimizers' states are made on the first
  steps, which a capture cannot do), or its capture failed (`Graphs.why` says why; every step then runs as it comes).

Each graph keeps its own memory pool (the step's activations, as the eager step's peak), so a pack keeps at most
`MAX_GRAPHS` (the least recently replayed goes first). A graph reads the adapters' weights, optimizer states, rates
and the layers' stacks and masks where they were at its capture; attaching or detaching an adapter changes them, and
forgets every graph. A step of another layout writes the same weights, so the stacks a graph reads are recast before
it replays where they are stale. On a CPU there is no graph: a layout's steps run `Pack.device_step` on the same input
buffers each time, which is what tests/test_pack_graphs.py holds to the step as it comes; the capture itself runs on
the GPU (its `gpu` test).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lora_search import pack_layers

Batch = Mapping[str, torch.Tensor]


class Pack(Protocol):
    """What a graph needs of `lora_search.pack.Pack` (named here, not imported: the pack imports this module)."""

    model: nn.Module
    pad_token_id: int

    def device_step(self, placed: list[Any], divisors: Mapping[str, Any]) -> dict[str, torch.Tensor]: ...

    def layers(self) -> list[pack_layers.PackedLinear]: ...

    def wrote(self, names: list[str]) -> None: ...


WARMUP_STEPS = 2
"""Steps a layout runs as it comes before its graph is captured: the first compiles kernels (Triton's, cuBLAS's
workspaces) and makes the optimizers' states; a capture may do neither."""
BUCKET_TOKENS = 128
"""A step's rows are right-padded to a multiple of this many tokens: real-length batches share few graphs (each
graph is one padded length) at the cost of up to this many pad tokens a row."""
MAX_GRAPHS = 2
"""Graphs a pack keeps; each holds its step's activations in its own pool (benchmarks/pack.py's `packed_peak_gb`)."""


@dataclass(frozen=True)
class Layout:
    """What one graph is captured for: per micro-batch, each adapter and its rows, in order; the tokens a row; and
    the settings the capture ran under (the layers' products, the autocast)."""

    parts: tuple[tuple[tuple[str, int], ...], ...]
    length: int
    settings: tuple[Any, ...]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(name for part in self.parts for name, _ in part))


@dataclass
class _Captured:
    layout: Layout
    inputs: list[tuple[torch.Tensor, torch.Tensor, dict[str, slice]]]
    """Per micro-batch: the input_ids and labels buffers the graph reads, and each adapter's rows."""
    divisors: torch.Tensor
    """Each adapter's label tokens in the step (`Layout.names`' order), which its loss is divided by."""
    graph: torch.cuda.CUDAGraph | None
    losses: torch.Tensor | None = None
    """The graph's output: each adapter's loss (`Layout.names`' order)."""
    stacks: list[Any] = field(default_factory=list)
    """The layers' stacks the graph reads: recast before a replay where an eager step wrote the weights since."""
    kept: list[Any] = field(default_factory=list)
    """Every tensor the graph reads that it did not allocate, kept alive with it (stacks, masks, scalings)."""

    def load(self, parts: list[Mapping[str, Batch]], tokens: Mapping[str, int], pad_token_id: int) -> None:
        """This step's batches into the input buffers, from pinned memory without a wait (`pack_layers.concat`)."""
        for (ids, labels, _), part in zip(self.inputs, parts, strict=True):
            new_ids, _, new_labels, _ = pack_layers.concat(part, pad_token_id, "cpu", self.layout.length)
            ids.copy_(_pinned(new_ids), non_blocking=True)
            labels.copy_(_pinned(new_labels), non_blocking=True)
        counts = torch.tensor([max(tokens[n], 1) for n in self.layout.names], dtype=self.divisors.dtype)
        self.divisors.copy_(_pinned(counts), non_blocking=True)

    def body(self, pack: Pack) -> torch.Tensor:
        placed = [(ids, None, labels, blocks) for ids, labels, blocks in self.inputs]
        divisors = dict(zip(self.layout.names, self.divisors.unbind(), strict=True))
        total = pack.device_step(placed, divisors)
        return torch.stack([total[n] for n in self.layout.names])


class Graphs:
    """A pack's captured steps, by layout (`Layout`). `enabled`: the pack was asked for graphs; they are captured on
    a CUDA device only (`capture`)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device_type = device.type
        self.capture = enabled and device.type == "cuda"
        self.why: str | None = None
        """Why no step replays a graph any more, where one was asked for: its capture failed (None: they do, or none
        was asked for)."""
        self._seen: Counter[Layout] = Counter()
        self._captured: OrderedDict[Layout, _Captured] = OrderedDict()
        self.captures = 0
        self.replays = 0

    def layout(
        self, parts: list[Mapping[str, Batch]], drop_mask: bool, random_recompute: bool = False
    ) -> Layout | None:
        """The step's layout, or None where it runs as it comes (graphs off or failed, a mask kept, a recompute that
        keeps the random state)."""
        if not self.enabled or self.why is not None or random_recompute:
            return None
        if not drop_mask or not all(pack_layers.right_padded(part) for part in parts):
            return None
        longest = max(b["input_ids"].shape[1] for part in parts for b in part.values())
        kind = self.device_type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        return Layout(
            parts=tuple(tuple((n, b["input_ids"].shape[0]) for n, b in part.items()) for part in parts),
            length=math.ceil(longest / BUCKET_TOKENS) * BUCKET_TOKENS,
            settings=(pack_layers.PRODUCTS, *autocast),
        )

    def replay(
        self, pack: Pack, layout: Layout, parts: list[Mapping[str, Batch]], tokens: Mapping[str, int]
    ) -> dict[str, float] | None:
        """The step from `layout`'s graph (captured here once the layout has run `WARMUP_STEPS` steps): each
        adapter's loss; None where the step is to run as it comes (and count towards the warm-up)."""
        captured = self._captured.get(layout)
        if captured is None:
            self._seen[layout] += 1
            if self._seen[layout] <= WARMUP_STEPS:
                return None
            captured = self._capture(pack, layout)
            if captured is None:
                return None
        self._captured.move_to_end(layout)
        captured.load(parts, tokens, pack.pad_token_id)
        pack_layers.refresh_stacks(captured.stacks)  # weights a step of another layout wrote since
        if captured.graph is None:
            losses = captured.body(pack)
        else:
            captured.graph.replay()
            losses = captured.losses
            # the replayed optimizer steps wrote the adapters' weights, and the graph recast the layout's stacks after
            # them: both said on the host, so another layout's stack of the same weights (an evaluation's) is stale
            pack.wrote(layout.names)
            pack_layers.mark_fresh(captured.stacks)
        self.replays += 1
        assert losses is not None
        return dict(zip(layout.names, losses.tolist(), strict=True))  # the step's one device sync

    def forget(self) -> None:
        """Drop every graph and warm-up count (an adapter attached or detached: the layers' layouts changed)."""
        self._captured.clear()
        self._seen.clear()

    def _capture(self, pack: Pack, layout: Layout) -> _Captured | None:
        device = pack.model.device
        inputs = []
        for part in layout.parts:
            rows = sum(n for _, n in part)
            blocks, start = {}, 0
            for name, n in part:
                blocks[name] = slice(start, start + n)
                start += n
            ids = torch.full((rows, layout.length), pack.pad_token_id, dtype=torch.long, device=device)
            inputs.append((ids, torch.full_like(ids, -100), blocks))
        divisors = torch.ones(len(layout.names), device=device)
        while len(self._captured) >= MAX_GRAPHS:
            self._captured.popitem(last=False)
        captured = _Captured(layout, inputs, divisors, graph=None)
        if self.capture:
            params = [p for layer in pack.layers() for p in layer.parameters() if p.requires_grad]
            graph = torch.cuda.CUDAGraph()
            enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
            torch.cuda.synchronize()
            try:
                # thread_local: the host's other threads may touch the GPU; autocast's cast cache cannot be captured
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                        captured.losses = captured.body(pack)
            except Exception as e:  # noqa: BLE001  (any failure: this pack's steps run as they come, said why)
                self.why = f"capture failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                try:
                    _release_generator(device)
                except Exception as again:  # noqa: BLE001  (said: later random draws on the device may fail)
                    self.why += f"; the device's generator stayed in capture mode: {type(again).__name__}: {again}"
                self._captured.clear()
                for layer in pack.layers():  # what the capture made is unfilled: it is made again as steps come
                    layer.forget_layouts()
                return None
            finally:
                for p in params:  # the graph writes its gradients in its own pool; an eager step starts from none
                    p.grad = None
            captured.graph = graph
            self.captures += 1
            # the warm-up steps' activations, cached free in the shared pool, back to the device: the graph has its own
            torch.cuda.empty_cache()
        layers = pack.layers()
        captured.stacks = [layer.last_stack for layer in layers if layer.last_stack is not None]
        captured.kept = [
            list(cache.values()) for layer in layers for cache in (layer._stacks, layer._masks, layer._scaling_cache)
        ]
        self._captured[layout] = captured
        return captured


def _release_generator(device: torch.device) -> None:
    """After a failed capture, the device's default generator out of capture mode. A capture that ends in an error
    never runs the generator's capture epilogue (`CUDAGraph.capture_end` raises first), so the generator stays in
    capture mode and every later random draw on the device raises "Offset increment outside graph capture
    encountered unexpectedly" (seen on the GPU: the next adapter's init in a pack host, `nn.Linear`'s
    kaiming_uniform_). A clone of its state (same seed and offset) is out of capture mode; it takes the old one's
    place."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else 0]
    generator.graphsafe_set_state(generator.clone_state())


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t
