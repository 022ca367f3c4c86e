"""What a trial worker runs on, and what it has used: device name, peak memory, memory in use, its nodes.

Each reads the live process (torch's CUDA state, Linux's /proc) and is cheap enough to call at every report.
"""

from __future__ import annotations

import resource
from pathlib import Path


def peak_memory_bytes() -> tuple[int, str]:
    """Peak memory of this worker since `reset_peak_memory`: CUDA allocator peak on GPU, else the process's peak RSS
    (Linux's VmHWM; elsewhere the peak of the process's whole life, which a warm process carries across trials)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda"
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:", 1)[1].split()[0]) * 1024, "rss"
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def reset_peak_memory() -> None:
    """Start this trial's peak (`peak_memory_bytes`) afresh: a warm process has run trials before it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the process's VmHWM to its current RSS
    except OSError:
        pass


def device_name() -> str:
    """ "cpu", or the CUDA device's name ("NVIDIA H100 80GB HBM3"): what `Pricing` prices."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    return "cpu"


def gpu_memory_in_use() -> int:
    """Bytes in use on this worker's GPU by every process, read before the trial loads anything (0 on CPU). A figure
    above the bare CUDA context's few hundred MiB, and above the base a warm process keeps (`BaseCache`), means an
    earlier trial on this GPU has not given its memory back."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def worker_nodes() -> str:
    """The Ray node ids of this trial's workers, sorted and joined by ','; shows where a trial ran."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return node
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return ",".join(sorted({str(n) for n in nodes}))


def release_memory() -> None:
    """Free what the trial left for the next one in this process: its model, optimizer and cached device blocks."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
