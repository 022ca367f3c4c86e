"""lora_search.idle: the device's idle gaps named by the host's ops, read from a profiler's Chrome trace."""

from __future__ import annotations

import pytest
import torch

from lora_search import idle
from lora_search.callbacks import PROFILE_TRACE_ENV, idle_table

HOST, DEVICE = {"pid": 10, "tid": 1}, {"pid": 0, "tid": 7}


def _op(name: str, ts: float, dur: float, cat: str = "cpu_op", **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **HOST, "args": args}


def _kernel(name: str, ts: float, dur: float, correlation: int, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **DEVICE, "args": {"correlation": correlation}}


def _launch(ts: float, correlation: int, name: str = "cudaLaunchKernel") -> dict:
    return _op(name, ts, 1.0, cat="cuda_runtime", correlation=correlation)


def _trace() -> dict:
    """A forward mm, then a sync (`aten::item`) that waits for it, 60 us of host work, an add the host launches
    late; in the backward an mm whose kernel waits 30 us after a launch made early (a stream dependency), and an
    optimizer step whose first kernel comes 200 us after the last one; 5 us gaps that count as short."""
    events = [
        _op("Optimizer.step#AdamW.step", 600.0, 300.0, cat="user_annotation"),
        _op("aten::mm", 0.0, 10.0),
        _launch(2.0, 1),
        _kernel("gemm_fwd", 5.0, 95.0, 1),  # busy 5-100
        _op("aten::item", 12.0, 89.5),
        _op("aten::_local_scalar_dense", 13.0, 88.0),
        _launch(14.0, 2, "cudaMemcpyAsync"),
        _kernel("Memcpy DtoH", 100.0, 1.0, 2, cat="gpu_memcpy"),  # busy to 101
        _op("aten::add", 160.0, 10.0),
        _launch(161.0, 3),
        _kernel("add_kernel", 165.0, 100.0, 3),  # 64 us gap from 101: launched late, host was between ops
        _op("autograd::engine::evaluate_function: MmBackward0", 200.0, 40.0),
        _op("aten::mm", 210.0, 20.0),
        _launch(215.0, 4),
        _kernel("gemm_bwd", 295.0, 200.0, 4),  # 30 us gap from 265: launched at 215, before the gap
        _kernel("tiny", 500.0, 5.0, 5),  # 5 us gap: short
        _launch(640.0, 6),
        _kernel("adam_kernel", 705.0, 10.0, 6),  # 200 us gap from 505: the host was in the optimizer step
    ]
    return {"traceEvents": events}


def test_gaps_are_named_by_what_the_host_did() -> None:
    found, totals = idle.gaps(_trace(), min_gap_us=20.0)
    assert [(g.start, g.end, g.next_kernel) for g in found] == [
        (101.0, 165.0, "add_kernel"),
        (265.0, 295.0, "gemm_bwd"),
        (505.0, 705.0, "adam_kernel"),
    ]
    add, bwd, adam = found
    assert add.launched_late and add.launched_by == "aten::add"
    assert add.host_at_start == "aten::item > aten::_local_scalar_dense"  # the sync still returning at 101
    assert not bwd.launched_late  # launched at 215, before the gap: it waited on the device, not on the host
    assert bwd.launched_by == "autograd::engine::evaluate_function: MmBackward0 > aten::mm"
    assert adam.launched_late and adam.launched_by == "Optimizer.step#AdamW.step"
    assert adam.host_at_start == "(between ops; last ended: autograd::engine::evaluate_function: MmBackward0)"
    assert totals["window_us"] == pytest.approx(715.0 - 5.0)
    assert totals["busy_us"] == pytest.approx(95 + 1 + 100 + 200 + 5 + 10)
    assert totals["idle_us"] == pytest.approx(64 + 30 + 5 + 200)
    assert totals["idle_short_us"] == pytest.approx(5.0)


def test_the_table_ranks_groups_by_idle_time() -> None:
    text = idle.table(_trace(), min_gap_us=20.0)
    lines = text.splitlines()
    assert lines[0].startswith("device window 0.7 ms: busy 0.4 ms (57.9%), idle 0.3 ms in 3 gaps")
    assert lines[2].split(" | ")[:2] == ["    0.20", "   1"] and "Optimizer.step" in lines[2]
    assert "aten::item" in lines[3] and "0.06" in lines[3]
    assert lines[-1].startswith("largest gaps: 0.20 ms before adam_kernel; 0.06 ms before add_kernel")


def test_overlapping_streams_count_once_and_a_missing_launch_is_said() -> None:
    events = [
        _kernel("a", 0.0, 100.0, 1),
        {**_kernel("b", 50.0, 100.0, 2), "tid": 8},  # another stream, overlapping: busy 0-150
        _kernel("c", 200.0, 10.0, 3),  # no launch event for correlation 3
    ]
    found, totals = idle.gaps({"traceEvents": events})
    assert totals["busy_us"] == pytest.approx(160.0) and totals["idle_us"] == pytest.approx(50.0)
    assert [(g.start, g.end, g.launched_by) for g in found] == [(150.0, 200.0, "(no launch event)")]


def test_a_trace_without_device_work_says_so() -> None:
    events = [_op("aten::mm", 0.0, 10.0)]
    assert idle.gaps({"traceEvents": events})[0] == []
    assert idle.table({"traceEvents": events}).startswith("no device work in the trace")


def test_a_real_profiler_trace_is_read_and_removed_unless_kept(tmp_path, monkeypatch) -> None:
    """torch's own export on this CPU (no device work): the table says so, and the trace goes unless kept."""
    from torch.profiler import ProfilerActivity, profile

    def profiled() -> profile:  # a profile exports once
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.mm(torch.randn(8, 8), torch.randn(8, 8)).sum()
        return prof

    trace = tmp_path / "t_trace.json"
    monkeypatch.delenv(PROFILE_TRACE_ENV, raising=False)
    assert idle_table(profiled(), trace).startswith("no device work in the trace")
    assert not trace.exists()
    monkeypatch.setenv(PROFILE_TRACE_ENV, "1")
    idle_table(profiled(), trace)
    events = idle.load(trace)["traceEvents"]
    assert any(e.get("name") == "aten::mm" and e.get("cat") == "cpu_op" for e in events)  # the format idle reads


def test_garbage_collections_are_named_in_the_profile(tmp_path) -> None:
    """A profiled trial labels each Python collection (`callbacks.label_collections`, a `gc.callbacks` hook): the
    profiler records no Python frames, so a collection's pause would otherwise be a gap with no op in it. Here the
    hook runs around a forced full collection and a step's work, as a trial registers it, and the range is in the
    trace as an annotation the idle table reads as a host op."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    from lora_search.callbacks import GC_LABEL, label_collections

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gc.callbacks.append(label_collections)
        try:
            torch.mm(torch.randn(8, 8), torch.randn(8, 8))
            gc.collect(2)
            torch.mm(torch.randn(8, 8), torch.randn(8, 8))
        finally:
            gc.callbacks.remove(label_collections)
    trace = tmp_path / "gc_trace.json"
    prof.export_chrome_trace(str(trace))
    events = idle.load(trace)["traceEvents"]
    labels = [e for e in events if e.get("name") == f"{GC_LABEL} (generation 2)"]
    assert len(labels) == 1 and labels[0].get("cat") in idle.HOST_CATS, labels
    mms = sorted(e["ts"] for e in events if e.get("name") == "aten::mm")
    assert mms[0] < labels[0]["ts"] < mms[-1]  # between the two products, where it ran


def test_the_table_names_the_hosts_waits_for_the_device() -> None:
    """A sync the host waited in (`idle.WAITS`) is listed with the ops around it and how long it waited: the cause of
    the gaps after it, which the gap rows name by what the host did then. Short waits and launch calls are not."""
    events = [
        *_trace()["traceEvents"],
        _op("aten::is_nonzero", 1000.0, 400.0),  # after the trace's optimizer step
        _op("aten::item", 1001.0, 398.0),
        _op("cudaStreamSynchronize", 1002.0, 300.0, cat="cuda_runtime"),
        _op("cudaStreamSynchronize", 1500.0, 20.0, cat="cuda_runtime"),  # under 100 us: not listed
    ]
    assert idle.waits({"traceEvents": events}) == [("aten::is_nonzero > aten::item", 300.0)]
    assert idle.waits({"traceEvents": events}, min_us=10.0)[1] == ("(no op around it)", 20.0)
    last = idle.table({"traceEvents": events}).splitlines()[-1]
    assert last == (
        "host waits for the device (`WAITS`: each spends the host's lead): 1, 0.3 ms; "
        "1 x 0.3 ms in aten::is_nonzero > aten::item"
    ), last
    assert idle.waits(_trace()) == [] and idle.table(_trace()).splitlines()[-1].startswith("largest gaps")
