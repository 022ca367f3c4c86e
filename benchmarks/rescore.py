"""Rescoring benchmark: `lora-search eval` (one base load, PEFT adapter swaps) against the lm-eval CLI run once
per adapter (`lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER`), end to end, same adapters, same
tasks. Prints both times, the ratio, and whether every score is equal; writes benchmarks/rescore.json.

Run (after `make demo`, which leaves adapters in reports/tiny/adapters):
    python benchmarks/rescore.py --k 5
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = ROOT / "sweeps" / "tiny.py"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=5, help="adapters to score")
    args = parser.parse_args()

    from lora_search.cli import load_sweep

    sweep, _ = load_sweep(SWEEP_FILE)
    trials = pd.read_parquet(ROOT / "reports" / sweep.name / "trials.parquet")
    adapters = [p for p in trials.sort_values("eval_loss")["adapter_path"] if p][: args.k]
    if len(adapters) < args.k:
        sys.exit(f"need {args.k} adapters in reports/{sweep.name}; run `make demo` first")
    tasks = ",".join(sweep.evals.tasks)
    tmp = Path(tempfile.mkdtemp())

    start = time.perf_counter()
    ours_json = tmp / "ours.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_search.cli",
            "eval",
            str(SWEEP_FILE),
            "--adapters",
            *adapters,
            "--output",
            str(ours_json),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    ours_s = time.perf_counter() - start
    ours = json.loads(ours_json.read_text())

    start = time.perf_counter()
    cli = []
    for i, adapter in enumerate(adapters):
        out = tmp / f"cli{i}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "hf",
                "--model_args",
                f"pretrained={sweep.base.name_or_path},peft={adapter},dtype={sweep.base.dtype}",
                "--tasks",
                tasks,
                "--include_path",
                sweep.evals.tasks_dir,
                "--batch_size",
                str(sweep.evals.batch_size),
                "--seed",
                str(sweep.seed),
                "--output_path",
                str(out),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        cli.append(json.loads(next(out.rglob("results*.json")).read_text())["results"])
    cli_s = time.perf_counter() - start

    equal = all(
        row["tiny_mood/acc"] == res["tiny_mood"]["acc,none"]
        and row["tiny_antonym/exact_match"] == res["tiny_antonym"]["exact_match,strip"]
        for row, res in zip(ours, cli, strict=True)
    )
    result = {
        "k": args.k,
        "lora_search_eval_s": round(ours_s, 2),
        "lm_eval_cli_per_adapter_s": round(cli_s, 2),
        "speedup": round(cli_s / ours_s, 2),
        "scores_equal": equal,
        "scores": [
            {
                "adapter": Path(r["adapter"]).name,
                "tiny_mood/acc": r["tiny_mood/acc"],
                "tiny_antonym/exact_match": r["tiny_antonym/exact_match"],
            }
            for r in ours
        ],
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
    }
    (ROOT / "benchmarks" / "rescore.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"k={args.k} adapters: lora-search eval {ours_s:.1f}s, lm_eval CLI per adapter {cli_s:.1f}s, "
        f"speedup {cli_s / ours_s:.2f}x, scores equal: {equal}"
    )


if __name__ == "__main__":
    main()
