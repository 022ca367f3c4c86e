"""The base's own golden scores for sweeps/smollm2.py: SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized) on the full
golden sets, scored the way a sweep scores it (`lora_search.evals.score_base`), before any adaptation.

Run: python benchmarks/smollm2_base.py [--limit N]   (CUDA: the sweep's bf16, the full sets in seconds; CPU: float32,
     about 30 s a generated example on 2 busy cores, so `--limit 64` scores the first 64 of each set)

Writes benchmarks/smollm2_base_<cpu|gpu name>_<date>.json: every metric with its stderr, the examples scored, the
device, seconds, the GGUF's sha256 and the converted base's fingerprint.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="score the first N examples of each set (default: all)")
    args = parser.parse_args()
    import torch

    from lora_search import gguf, registry
    from lora_search.cli import load_sweep
    from lora_search.evals import score_base

    sweep, problems = load_sweep(ROOT / "sweeps" / "smollm2.py")
    assert not problems, problems
    assert sweep.evals is not None
    source = sweep.base.name_or_path
    base = gguf.resolve(sweep.base)
    sweep = sweep.replace(base=base, evals=dataclasses.replace(sweep.evals, limit=args.limit))
    start = time.perf_counter()
    scored = score_base(sweep)
    seconds = time.perf_counter() - start
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    n = {task: r.get("effective") for task, r in scored["results"].get("n-samples", {}).items()}
    converted = json.loads((Path(base.name_or_path) / gguf.SOURCE_FILE).read_text())
    record = {
        "what": "the base's golden scores before adaptation, sweeps/smollm2.py's golden sets, "
        + ("every example" if args.limit is None else f"the first {args.limit} examples of each"),
        "base": source,
        "gguf_sha256": converted["sha256"],
        "base_fingerprint": registry.fingerprint(base),
        "dtype": base.dtype,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "metrics": scored["metrics"],
        "examples": n,
        "limit": args.limit,
        "seconds": round(seconds, 1),
        "versions": converted["versions"],
        "date": dt.date.today().isoformat(),
    }
    tag = "cpu" if device == "cpu" else device.split()[-1].lower()
    out = ROOT / "benchmarks" / f"smollm2_base_{tag}_{record['date']}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    for key, value in scored["metrics"].items():
        if not key.endswith("_stderr"):
            print(f"{key:36s} {value:.4f} ± {scored['metrics'].get(key + '_stderr', float('nan')):.4f}")
    print(f"{seconds:.0f}s on {device}; wrote {out}")


if __name__ == "__main__":
    main()
