"""Nightly regression sweeps: rerun a pinned sweep, compare it with a baseline, fail loudly on a regression.

    lora-search nightly sweeps/nightly.py --baseline mlflow              # the last promoted nightly in MLflow
    lora-search nightly sweeps/nightly.py --baseline nightly.json        # or a baseline file
    lora-search nightly sweeps/nightly.py --baseline nightly.json --promote   # a passing run becomes the baseline

Exit 0 when every check passes, 1 on a regression (a verdict table says which and by how much). The sweep's
HTML report gains a "versus baseline" section. A run becomes the baseline only when asked (`--promote`) and
only when it passed.

The checks, each with a tolerance that comes from the data where the data has one:
- best primary golden score: a drop larger than Z x the combined lm-eval standard error of the two best
  scores, sqrt(se_baseline^2 + se_current^2), with Z = 1.96 (a two-sided 95% test);
- frontier hypervolume: a drop larger than that same quality tolerance. The hypervolume is measured in quality
  gain x fraction of size saved x fraction of cost saved (lora_search.pareto), with both fractions at most 1,
  so lowering every frontier quality by d lowers it by at most d;
- cost per completed trial and training tokens/s: worse by more than `timing_tolerance` (relative, default
  30%; `--timing-tolerance`). Timings have no standard error of their own; 30% is above the run-to-run jitter of
  a shared machine. The cost is the configurations' cost (lora_search.cost: device-seconds at each trial's steady
  rate, CPU time on CPU), which a busy machine barely moves;
- any failed trial.
The sweep's spend (every device-second it held, wall clock) is reported beside them and never fails a run: a slower or
busier machine is not a regression of the sweep.
Everything here is pure except `summarise` (reads the sweep dir), `load_baseline` and `record` (a baseline file, or
MLflow).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_search.config import ConfigError, Problem
from lora_search.layout import (
    BASE_SCORES_FILE,
    NIGHTLY_FILE,
    PROVENANCE_FILE,
    SWEEP_METRICS_FILE,
    TRACKING_FILE,
    TRIALS_FILE,
)
from lora_search.userfiles import load_json

Z = 1.96
"""Two-sided 95%: a drop of the best score beyond Z combined standard errors is not noise."""
TIMING_TOLERANCE = 0.30
"""How much worse (relative) cost per completed trial and tokens/s may get; `--timing-tolerance` sets another, e.g.
on a shared CI runner whose neighbours slow a run by more than 30%."""
BASELINE_TAG = "lora_search.nightly_baseline"
VERDICT_TAG = "lora_search.nightly"
SUMMARY_FILE = NIGHTLY_FILE


@dataclass(frozen=True)
class Summary:
    """What a nightly run is judged by, read from its sweep dir."""

    sweep: str
    quality_key: str
    """The primary golden metric (`task/metric`), or `eval_loss` for a sweep without golden sets."""
    higher_is_better: bool
    best: float
    best_stderr: float
    """lm-eval's standard error of the best trial's score (0 for eval loss, which has none)."""
    best_trial: str
    hypervolume: float
    cost_per_trial: float
    """Mean configuration cost of a completed trial (the same configs each night: seeds are pinned)."""
    tokens_per_s: float
    """Median training throughput of the completed trials."""
    trials: int
    failed: int
    failed_reasons: tuple[str, ...]
    git_commit: str
    created: float
    spend: float = math.nan
    """What the sweep spent (`sweep_metrics.json` `spend`): reported, never judged. NaN in older baselines."""


@dataclass(frozen=True)
class Verdict:
    check: str
    baseline: float | None
    current: float | None
    tolerance: float | None
    passed: bool
    reason: str


def summarise(sweep_dir: Path) -> Summary:
    """The Summary of a finished sweep dir (trials.parquet, sweep_metrics.json, provenance.json)."""
    import pandas as pd

    trials = pd.read_parquet(sweep_dir / TRIALS_FILE)
    metrics = json.loads((sweep_dir / SWEEP_METRICS_FILE).read_text())
    provenance = _read(sweep_dir / PROVENANCE_FILE)
    base = _read(sweep_dir / BASE_SCORES_FILE)
    key = str(metrics.get("quality_key", "eval_loss"))
    higher = bool(base.get("higher_is_better", True)) if key != "eval_loss" else False
    done = trials[trials["status"] == "completed"]
    best, stderr, best_trial = math.nan, 0.0, ""
    if len(done) and done[key].notna().any():
        row = done.loc[done[key].idxmax() if higher else done[key].idxmin()]
        best, best_trial = float(row[key]), str(row["trial_id"])
        stderr = float(row.get(f"{key}_stderr", 0.0) or 0.0)
    failed = trials[trials["status"].isin(("failed", "diverged", "infeasible"))]  # none is a result
    return Summary(
        sweep=sweep_dir.name,
        quality_key=key,
        higher_is_better=higher,
        best=best,
        best_stderr=stderr if math.isfinite(stderr) else 0.0,
        best_trial=best_trial,
        hypervolume=float(metrics.get("hypervolume", math.nan)),
        cost_per_trial=float(done["cost"].mean()) if len(done) else math.nan,
        tokens_per_s=float(done["tokens_per_s"].median()) if len(done) else math.nan,
        trials=len(trials),
        failed=len(failed),
        failed_reasons=tuple(sorted({str(r) for r in failed["reason"]})),
        git_commit=str(provenance.get("mlflow.source.git.commit", "unknown")),
        created=time.time(),
        spend=float(metrics.get("spend", math.nan)),
    )


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def compare(current: Summary, baseline: Summary, timing_tolerance: float = TIMING_TOLERANCE) -> list[Verdict]:
    """One verdict per check; the run regressed when any verdict did not pass."""
    out = []
    quality_tol = Z * math.hypot(current.best_stderr, baseline.best_stderr)
    sign = 1.0 if current.higher_is_better else -1.0
    drop = sign * (baseline.best - current.best)
    out.append(
        Verdict(
            f"best {current.quality_key}",
            baseline.best,
            current.best,
            quality_tol,
            passed=math.isfinite(current.best) and drop <= quality_tol,
            reason=(
                "no completed trial was scored"
                if not math.isfinite(current.best)
                else f"dropped by {drop:.4g}, beyond {Z} combined standard errors ({quality_tol:.4g})"
                if drop > quality_tol
                else f"within {quality_tol:.4g} ({Z} combined standard errors)"
            ),
        )
    )
    hv_drop = baseline.hypervolume - current.hypervolume
    hv_ok = not math.isfinite(baseline.hypervolume) or (math.isfinite(current.hypervolume) and hv_drop <= quality_tol)
    out.append(
        Verdict(
            "frontier hypervolume",
            baseline.hypervolume,
            current.hypervolume,
            quality_tol,
            passed=hv_ok,
            reason=f"dropped by {hv_drop:.4g}, beyond {quality_tol:.4g}" if not hv_ok else "within tolerance",
        )
    )
    for check, base_value, value, worse in (
        ("cost per completed trial", baseline.cost_per_trial, current.cost_per_trial, 1.0),
        ("tokens/s (median)", baseline.tokens_per_s, current.tokens_per_s, -1.0),
    ):
        change = worse * (value - base_value) / base_value if base_value else 0.0
        ok = not math.isfinite(base_value) or (math.isfinite(value) and change <= timing_tolerance)
        out.append(
            Verdict(
                check,
                base_value,
                value,
                timing_tolerance,
                passed=ok,
                reason=f"{change:+.0%} worse, beyond {timing_tolerance:.0%}" if not ok else f"{change:+.0%} worse",
            )
        )
    spend_change = (current.spend - baseline.spend) / baseline.spend if baseline.spend else math.nan
    out.append(
        Verdict(
            "sweep spend (reported, not judged)",
            baseline.spend,
            current.spend,
            None,
            passed=True,
            reason=f"{spend_change:+.0%}: wall clock x devices held, it moves with the machine"
            if math.isfinite(spend_change)
            else "no spend to compare",
        )
    )
    out.append(
        Verdict(
            "failed trials",
            float(baseline.failed),
            float(current.failed),
            0.0,
            passed=current.failed == 0,
            reason=("; ".join(current.failed_reasons))[:500] if current.failed else "none",
        )
    )
    return out


def passed(verdicts: list[Verdict]) -> bool:
    return all(v.passed for v in verdicts)


def table(verdicts: list[Verdict]) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None or not math.isfinite(x) else f"{x:.4g}"

    rows = [("check", "baseline", "current", "tolerance", "verdict", "why")]
    rows += [
        (v.check, num(v.baseline), num(v.current), num(v.tolerance), "pass" if v.passed else "REGRESSION", v.reason)
        for v in verdicts
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows)


def report_section(verdicts: list[Verdict], source: str) -> dict[str, Any]:
    """The `baseline` argument of lora_search.report.write_report."""
    return {"verdicts": [dataclasses.asdict(v) for v in verdicts], "baseline_source": source}


# --- baselines: a file, or the last promoted nightly in MLflow -----------------------------------------------


def timing_tolerance(text: str) -> float:
    """`--timing-tolerance`'s value: a fraction at least 0 (0.3: 30% worse passes)."""
    fix = f"a fraction at least 0, e.g. {TIMING_TOLERANCE} (30% worse passes; the default)"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError([Problem("--timing-tolerance", text, "is not a number", fix)]) from None
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError([Problem("--timing-tolerance", text, "must be a finite fraction at least 0", fix)])
    return value


def load_baseline(source: str, sweep: Any) -> Summary | None:
    """`source` is "mlflow" or a JSON file path; None when there is no baseline yet."""
    if source != "mlflow":
        path = Path(source)
        if not path.is_file():
            return None
        fix = "give a file written by `lora-search nightly ... --baseline FILE --promote`, or remove it"
        loaded = load_json(path, fix)  # a file that is not UTF-8 or not JSON: ConfigError at file:line:column
        try:
            return _from_dict(loaded)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                [
                    Problem(
                        "--baseline",
                        source,
                        f"is not a nightly summary ({type(e).__name__}: {e})",
                        fix,
                    )
                ]
            ) from e
    from mlflow import MlflowClient

    from lora_search.layout import tracking_uri

    client = MlflowClient(tracking_uri(sweep))
    experiment = client.get_experiment_by_name(sweep.name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{BASELINE_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    with_summary = client.download_artifacts(runs[0].info.run_id, SUMMARY_FILE)
    return _from_dict(json.loads(Path(with_summary).read_text())["summary"])


def _from_dict(data: dict[str, Any]) -> Summary:
    optional = {f.name for f in dataclasses.fields(Summary) if f.default is not dataclasses.MISSING}
    data = {k: data[k] for k in Summary.__dataclass_fields__ if k in data or k not in optional}
    data["failed_reasons"] = tuple(data["failed_reasons"])
    return Summary(**data)


def record(sweep: Any, sweep_dir: Path, summary: Summary, verdicts: list[Verdict], source: str, promote: bool) -> None:
    """nightly.json in the sweep dir; verdict tags and the summary on the sweep's MLflow parent run; promotion."""
    ok = passed(verdicts)
    payload = {
        "summary": dataclasses.asdict(summary),
        "verdicts": [dataclasses.asdict(v) for v in verdicts],
        "baseline_source": source,
        "passed": ok,
    }
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(payload, indent=1))
    state = _read(sweep_dir / TRACKING_FILE)
    if state:
        from mlflow import MlflowClient

        client = MlflowClient(state["tracking_uri"])
        client.set_tag(state["parent_run_id"], VERDICT_TAG, "pass" if ok else "fail")
        client.log_artifact(state["parent_run_id"], str(sweep_dir / SUMMARY_FILE))
        if promote and ok and source == "mlflow":
            client.set_tag(state["parent_run_id"], BASELINE_TAG, "true")
    if promote and ok and source != "mlflow":
        Path(source).write_text(json.dumps(dataclasses.asdict(summary), indent=1))
