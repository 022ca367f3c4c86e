"""Where the device waited on the host: the idle gaps of a profiled window, each named by what the host did.

A trial's kernel profile (`lora_search.callbacks.PROFILE_ENV`) says how long each kernel ran; it cannot say why the
GPU sat idle between them. A step that is 86% busy (the 8B trial on an H100, benchmarks/NOTES.md 2026-12-05) loses
the rest to gaps, and which host work makes them decides the fix: a sync that empties the launch queue, an optimizer
step, the data pipeline, or launches slower than the kernels they start. This reads the profiler's Chrome trace
(`torch.profiler.profile.export_chrome_trace`, the format PyTorch's and Perfetto's viewers read) and names each gap
by the host's ops around it.

Our own code because torch's profiler has no idle attribution: `key_averages` sums kernels, and Holistic Trace
Analysis (`hta`, which has an idle-time breakdown) is not a dependency we carry onto the device."""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
"""Chrome-trace categories of work on the device."""
LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver"})
"""Categories of the host calls that start it (cudaLaunchKernel, cudaMemcpyAsync ...), linked by `correlation`."""
HOST_CATS = frozenset({"cpu_op", "user_annotation", "python_function"})
WAITS = frozenset(
    {
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "cudaEventSynchronize",
        "cudaMemcpy",
        "cuStreamSynchronize",
        "cuCtxSynchronize",
        "cuEventSynchronize",
    }
)
"""Host calls that wait for the device's queue to drain. Each one spends the lead the host had built (it launches
ahead of the kernels while they are long), so the host-bound stretches after it show as gaps: a wait is often the
cause of gaps the table puts elsewhere (benchmarks/NOTES.md change 33: transformers' packed-rows check waited 47-109 ms
before each forward of the 8B trial)."""


@dataclass(frozen=True)
class Span:
    name: str
    start: float  # microseconds
    end: float


@dataclass(frozen=True)
class Gap:
    start: float
    end: float
    next_kernel: str
    launched_by: str  # the host op stack (outermost > innermost) around the launch of the kernel that ended the gap
    host_at_start: str  # what the launching thread was in when the device ran dry (its op stack), else the op it
    # had ended last: a sync ("aten::item", "aten::nonzero") that the device had to finish first, an optimizer step
    launched_late: bool  # launched after the gap began: the host was elsewhere; else it waited on a stream or event

    @property
    def us(self) -> float:
        return self.end - self.start


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def gaps(trace: Mapping[str, Any], min_gap_us: float = 20.0) -> tuple[list[Gap], dict[str, float]]:
    """The idle gaps of at least `min_gap_us` between device work (any stream), and totals: the window from the first
    kernel's start to the last one's end, busy (the union of device work), idle, and idle in shorter gaps."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    device = sorted((e for e in events if str(e.get("cat", "")).lower() in DEVICE_CATS), key=lambda e: float(e["ts"]))
    totals = {"window_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "idle_short_us": 0.0, "device_events": len(device)}
    if not device:
        return [], totals
    launches = {
        (e.get("args") or {}).get("correlation"): e
        for e in events
        if str(e.get("cat", "")).lower() in LAUNCH_CATS and (e.get("args") or {}).get("correlation") is not None
    }
    host = _host_stacks(e for e in events if str(e.get("cat", "")).lower() in HOST_CATS)
    found: list[Gap] = []
    busy_end = float(device[0]["ts"])
    first = busy_end
    busy = 0.0
    for e in device:
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        if start > busy_end:
            idle = start - busy_end
            if idle >= min_gap_us:
                found.append(_gap(busy_end, start, e, launches, host))
            else:
                totals["idle_short_us"] += idle
        busy += max(0.0, end - max(start, busy_end))
        busy_end = max(busy_end, end)
    totals.update(window_us=busy_end - first, busy_us=busy, idle_us=busy_end - first - busy)
    return found, totals


def table(trace: Mapping[str, Any], min_gap_us: float = 20.0, rows: int = 25) -> str:
    """The idle gaps grouped by what the host did, largest total first, under a line of totals."""
    found, totals = gaps(trace, min_gap_us)
    if not totals["device_events"]:
        return "no device work in the trace (a CPU run, or a profiler without the CUDA activity)\n"
    window = totals["window_us"] or 1.0
    lines = [
        f"device window {totals['window_us'] / 1e3:.1f} ms: busy {totals['busy_us'] / 1e3:.1f} ms "
        f"({totals['busy_us'] / window:.1%}), idle {totals['idle_us'] / 1e3:.1f} ms in {len(found)} gaps of "
        f">= {min_gap_us:g} us and {totals['idle_short_us'] / 1e3:.1f} ms in shorter ones",
        "idle ms | gaps | launched late | host ops when the device ran dry | host ops that launched the next kernel",
    ]
    groups: dict[tuple[str, str], list[Gap]] = defaultdict(list)
    for g in found:
        groups[(g.host_at_start, g.launched_by)].append(g)
    ranked = sorted(groups.items(), key=lambda kv: -sum(g.us for g in kv[1]))
    for (at_start, launched), members in ranked[:rows]:
        late, ms = sum(g.launched_late for g in members), sum(g.us for g in members) / 1e3
        lines.append(f"{ms:8.2f} | {len(members):4d} | {late:4d} | {at_start[:100]} | {launched[:100]}")
    if len(ranked) > rows:
        rest = [g for _, members in ranked[rows:] for g in members]
        lines.append(f"{sum(g.us for g in rest) / 1e3:8.2f} | {len(rest):4d} |      | (the other groups)")
    largest = sorted(found, key=lambda g: -g.us)[:10]
    lines.append("largest gaps: " + "; ".join(f"{g.us / 1e3:.2f} ms before {g.next_kernel[:40]}" for g in largest))
    held = waits(trace)
    if held:
        by_ops: dict[str, list[float]] = defaultdict(list)
        for ops, us in held:
            by_ops[ops].append(us)
        ranked_waits = sorted(by_ops.items(), key=lambda kv: -sum(kv[1]))[:6]
        lines.append(
            f"host waits for the device (`WAITS`: each spends the host's lead): {len(held)}, "
            f"{sum(us for _, us in held) / 1e3:.1f} ms; "
            + "; ".join(f"{len(v)} x {sum(v) / 1e3:.1f} ms in {ops[:90]}" for ops, v in ranked_waits)
        )
    return "\n".join(lines) + "\n"


def waits(trace: Mapping[str, Any], min_us: float = 100.0) -> list[tuple[str, float]]:
    """The host's waits for the device (`WAITS`) of at least `min_us`, in order: (the host ops around it, microseconds
    waited)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    held = [e for e in events if e.get("name") in WAITS and float(e.get("dur", 0.0)) >= min_us]
    if not held:
        return []
    host = _host_stacks(e for e in events if str(e.get("cat", "")).lower() in HOST_CATS)
    out = []
    for e in sorted(held, key=lambda e: float(e["ts"])):
        stack = [s.name for s in host.enclosing((e.get("pid"), e.get("tid")), float(e["ts"]))]
        out.append((" > ".join(_short(stack)) or "(no op around it)", float(e["dur"])))
    return out


class _HostStacks:
    """Each host thread's ops as nested spans, for 'which ops enclose time t' and 'which op ended last before t'."""

    def __init__(self, by_thread: dict[Any, list[Span]], marks: dict[Any, list[Span]]) -> None:
        self.marks = marks  # annotations (record_function, Optimizer.step ...): few and long, searched whole
        self.by_thread = {t: sorted(s, key=lambda s: (s.start, -s.end)) for t, s in by_thread.items()}
        self.starts = {t: [s.start for s in spans] for t, spans in self.by_thread.items()}
        self.ends = {t: sorted(spans, key=lambda s: s.end) for t, spans in self.by_thread.items()}
        # an annotation can end before a gap too (an optimizer step), so it is a candidate for "ended before"
        for t, spans in marks.items():
            self.ends[t] = sorted([*self.ends.get(t, []), *spans], key=lambda s: s.end)
        self.end_keys = {t: [s.end for s in spans] for t, spans in self.ends.items()}

    def enclosing(self, thread: Any, t: float) -> list[Span]:
        spans = self.by_thread.get(thread, [])
        i = bisect.bisect_right(self.starts.get(thread, []), t)
        # the enclosing spans start before t; a linear walk back is bounded by the nesting of the ops near t
        near = [s for s in spans[max(0, i - 400) : i] if s.end >= t]
        marks = [s for s in self.marks.get(thread, []) if s.start <= t <= s.end]
        return sorted(marks + near, key=lambda s: (s.start, -s.end))

    def ended_before(self, thread: Any, t: float) -> Span | None:
        keys = self.end_keys.get(thread, [])
        i = bisect.bisect_right(keys, t)
        return self.ends[thread][i - 1] if i else None


def _host_stacks(events: Iterable[Mapping[str, Any]]) -> _HostStacks:
    by_thread: dict[Any, list[Span]] = defaultdict(list)
    marks: dict[Any, list[Span]] = defaultdict(list)
    for e in events:
        start = float(e["ts"])
        span = Span(str(e.get("name", "?")), start, start + float(e.get("dur", 0.0)))
        kind = marks if str(e.get("cat", "")).lower() == "user_annotation" else by_thread
        kind[(e.get("pid"), e.get("tid"))].append(span)
    return _HostStacks(by_thread, marks)


def _gap(start: float, end: float, kernel: Mapping[str, Any], launches: dict, host: _HostStacks) -> Gap:
    name = str(kernel.get("name", "?"))
    launch = launches.get((kernel.get("args") or {}).get("correlation"))
    if launch is None:
        return Gap(start, end, name, "(no launch event)", "", False)
    thread, at = (launch.get("pid"), launch.get("tid")), float(launch["ts"])
    stack = [s.name for s in host.enclosing(thread, at)]
    launched_by = " > ".join(_short(stack)) or str(launch.get("name", "?"))
    stack = [s.name for s in host.enclosing(thread, start)]
    if stack:
        at_start = " > ".join(_short(stack))
    else:
        before = host.ended_before(thread, start)
        at_start = f"(between ops; last ended: {before.name})" if before else "(before any op)"
    return Gap(start, end, name, launched_by, at_start, at > start)


def _short(stack: list[str]) -> list[str]:
    """The outermost op and the innermost two: what phase, and what launched."""
    return stack if len(stack) <= 3 else [stack[0], "...", *stack[-2:]]
