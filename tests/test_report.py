"""The sweep report on a synthetic sweep dir (no Ray): its sections, offline-ness, and the page in headless Chromium.

LORA_SEARCH_SCREENSHOTS=DIR keeps the browser test's full-page screenshot as DIR/report.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_search import pareto
from lora_search.cli import main
from lora_search.report import TABLE_COLUMNS, write_report

MAX_STEPS, EVAL_EVERY = 20, 5
EVIL = '<script>alert("pwned")</script> & CUDA out of memory'
# trial id -> (status, variant, rank, alpha, targets, lr, last step); rungs at steps 5 and 10 of 20.
TRIALS = {
    "a0001": ("completed", "lora", 8, 16.0, "attention", 3e-3, 20),
    "a0002": ("completed", "dora", 16, 32.0, "all-linear", 1e-3, 20),
    "a0003": ("completed", "lora", 2, 4.0, "attention", 1e-2, 20),
    "a0004": ("completed", "dora", 4, 4.0, "all-linear", 5e-3, 20),
    "a0005": ("completed", "lora", 16, 16.0, "all-linear", 2e-4, 20),
    "a0006": ("pruned", "lora", 2, 2.0, "attention", 1e-4, 5),
    "a0007": ("pruned", "dora", 8, 8.0, "attention", 2e-4, 5),
    "a0008": ("pruned", "lora", 4, 8.0, "all-linear", 5e-4, 10),
    "a0009": ("failed", "dora", 16, 16.0, "all-linear", 1e-2, 5),  # failed after one report: dashed history
    "a0010": ("failed", "lora", 8, 8.0, "attention", 3e-3, 0),  # failed before any report: no history
}
STEPS = {tid: list(range(EVAL_EVERY, step + 1, EVAL_EVERY)) for tid, (_, *_, step) in TRIALS.items()}
BASE_LOSS, BASE_ACC = 2.0, 0.25


def make_sweep_dir(
    tmp_path: Path, *, golden: bool = True, statuses: dict[str, str] | None = None, history: bool = True
) -> Path:
    """Every file a finished sweep writes (lora_search.sweep), built by hand: 10 trials, completed/pruned/failed."""
    out = tmp_path / "synthetic"
    out.mkdir()
    rng = np.random.default_rng(0)
    rows, hist = [], []
    for i, (tid, (status, variant, rank, alpha, targets, lr, step)) in enumerate(TRIALS.items()):
        status = (statuses or {}).get(tid, status)
        rate = 0.02 * (1 + i % 3) * (0.5 + rng.random())
        losses = [BASE_LOSS * math.exp(-rate * s) + 0.05 * rng.random() for s in STEPS[tid]]
        hist += [{"trial_id": tid, "step": s, "eval_loss": loss, "train_loss": loss + 0.1, "tokens_per_s": 900.0,
                  "time_total_s": 2.0 * s} for s, loss in zip(STEPS[tid], losses, strict=True)]  # fmt: skip
        scored = golden and status == "completed"
        acc = 0.3 + 0.05 * i if scored else math.nan
        cost = 1e-4 * (step + 5) * (1 + rank / 16)
        rows.append({
            "trial_id": tid, "status": status, "variant": variant, "rank": rank, "alpha": alpha, "targets": targets,
            "lr": lr, "dropout": 0.05, "step": step, "eval_loss": losses[-1] if losses else math.nan,
            "best_eval_loss": min(losses) if losses else math.nan, "base_eval_loss": BASE_LOSS,
            "train_loss": math.nan, "trainable_params": rank * 1000, "adapter_bytes": rank * 4096 * (2 if
            targets == "all-linear" else 1), "train_s": 2.0 * step, "device_s": 2.0 * step + 3, "trial_s": 2.0 * step
            + 3, "tokens_per_s": 900.0, "peak_mem_bytes": 10**8, "adapter_path": "", "reason": EVIL if status ==
            "failed" else "", "objective": acc, "eval_s": 1.0 if scored else 0.0, "device_name": "cpu",
            "train_cost": cost, "eval_cost": 0.0, "cost": cost, "mlflow_run_id": f"run{i:04d}" * 4, "pareto": False,
            **({"tiny_mood/acc": acc, "tiny_mood/acc_stderr": 0.05} if golden else {}),
        })  # fmt: skip
    trials = pd.DataFrame(rows)
    quality = "objective" if golden else "eval_loss"
    done = trials[(trials["status"] == "completed") & trials[quality].notna()]
    sign = -1.0 if golden else 1.0
    mask = pareto.non_dominated(np.column_stack([sign * done[quality], done["adapter_bytes"], done["cost"]]))
    trials.loc[done.index[mask], "pareto"] = True
    trials.to_parquet(out / "trials.parquet", index=False)
    if history:
        pd.DataFrame(hist).to_parquet(out / "history.parquet", index=False)
    done.assign(pareto=mask)[["trial_id", "variant", "rank", "targets", "lr", quality, "adapter_bytes", "cost",
                              "pareto"]].to_csv(out / "frontier.csv", index=False)  # fmt: skip
    counts = trials["status"].value_counts()
    metrics = {"sweep_cost": trials["cost"].sum(), "sweep_device_hours": trials["device_s"].sum() / 3600,
               "asha_saved_cost": 0.004, "full_budget_cost": trials["cost"].sum() + 0.004, "hypervolume": 0.123,
               "frontier_size": float(mask.sum()), "reference_cost": 0.04, "base_weight_bytes": 4e6,
               f"base_{quality}": BASE_ACC if golden else BASE_LOSS,
               **{f"trials_{s}": float(counts.get(s, 0)) for s in ("completed", "pruned", "failed")}}  # fmt: skip
    (out / "sweep_metrics.json").write_text(json.dumps(metrics))
    if golden:
        base = {"metrics": {"tiny_mood/acc": BASE_ACC, "tiny_mood/acc_stderr": 0.05}, "objective": BASE_ACC,
                "higher_is_better": True}  # fmt: skip
        (out / "base_scores.json").write_text(json.dumps(base))
    provenance = {"mlflow.source.git.commit": "0123abcd", "lora_search.git_dirty": "true",
                  "lora_search.version.peft": "0.17.1", "lora_search.eval_task_version.tiny_mood": "1.0",
                  "lora_search.sweep": "synthetic", "lora_search.base": "tiny-llama", "lora_search.base_revision": "",
                  "lora_search.base_fingerprint": "sha256:feedbeef"}  # fmt: skip
    (out / "provenance.json").write_text(json.dumps(provenance))
    (out / "tracking.json").write_text(json.dumps({"tracking_uri": "sqlite:///x.db", "experiment_id": "1",
                                                   "parent_run_id": "parent0001"}))  # fmt: skip
    return out


BASELINE = {
    "baseline_source": "reports/nightly/baseline.json",
    "verdicts": [
        {"check": "hypervolume", "baseline": 0.2, "current": 0.123, "tolerance": 0.05, "passed": False,
         "reason": "hypervolume fell by 38% (more than 5%)"},
        {"check": "best objective", "baseline": 0.5, "current": 0.6, "tolerance": 0.02, "passed": True, "reason": ""},
        {"check": "base fingerprint", "baseline": None, "current": None, "tolerance": None, "passed": True,
         "reason": "same base"},
    ],
}  # fmt: skip
HEADINGS = ("Headline", "Pareto frontier", "ASHA: eval loss per step", "Hyperparameters", "Variants", "All trials")
FIGURES = ("fig-pareto", "fig-asha", "fig-params", "fig-params-strip", "fig-variants")


def test_report_has_every_section_escapes_strings_and_needs_no_network(tmp_path: Path) -> None:
    page = write_report(make_sweep_dir(tmp_path), extra_provenance={"seed": "1234"}).read_text()
    for heading in (*HEADINGS, "Provenance"):
        assert f"<h2>{heading}</h2>" in page
    for tid in TRIALS:
        assert tid in page
    for figure in FIGURES:
        assert f'id="{figure}"' in page
    assert "Versus baseline" not in page  # only with a baseline
    assert EVIL not in page and "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; CUDA" in page
    assert "<script src" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert page.count("plotly.js v") == 1 and page.count("Plotly.newPlot(") == len(FIGURES)
    assert "sha256:feedbeef" in page and "1234" in page and "parent0001" in page
    assert "tiny_mood/acc" in page and "USD" in page
    assert not list(tmp_path.rglob("*.tmp"))


def test_baseline_section_highlights_the_failing_verdict(tmp_path: Path) -> None:
    page = write_report(make_sweep_dir(tmp_path), baseline=BASELINE).read_text()
    section = page[page.index("<h2>Versus baseline</h2>") :]
    assert "2 of 3 check(s) passed" in section and "reports/nightly/baseline.json" in section
    failing = re.findall(r"<tr class='fail'>(.*?)</tr>", section)
    assert len(failing) == 1 and "hypervolume fell by 38%" in failing[0] and "FAIL" in failing[0]
    assert len(re.findall(r"<tr class='pass'>", section)) == 2


@pytest.mark.parametrize(
    ("case", "kwargs", "notes"),
    [
        ("no golden sets", {"golden": False}, ["quality is eval loss"]),
        ("no history", {"history": False}, ["No history.parquet"]),
        ("nothing completed", {"statuses": {t: "pruned" for t in TRIALS}}, ["No completed, scored trial"]),
        ("all failed", {"statuses": {t: "failed" for t in TRIALS}},
         ["No completed, scored trial", "No trial finished training", "No completed or pruned trial"]),
    ],
)  # fmt: skip
def test_missing_results_are_said_not_crashed_on(tmp_path: Path, case: str, kwargs: dict, notes: list[str]) -> None:
    page = write_report(make_sweep_dir(tmp_path, **kwargs)).read_text()
    for note in notes:
        assert note in page, case
    assert "<h2>All trials</h2>" in page


def test_report_without_base_scores_or_provenance(tmp_path: Path) -> None:
    sweep = make_sweep_dir(tmp_path)
    (sweep / "base_scores.json").write_text(json.dumps({"error": "lm-eval blew up"}))
    (sweep / "provenance.json").unlink()
    page = write_report(sweep).read_text()
    assert "lm-eval blew up" in page and "No provenance.json" in page


def test_report_of_an_older_sweep_without_the_later_columns(tmp_path: Path) -> None:
    sweep = make_sweep_dir(tmp_path)
    trials = pd.read_parquet(sweep / "trials.parquet")
    trials.drop(columns=["mlflow_run_id", "pareto"]).to_parquet(sweep / "trials.parquet", index=False)
    page = write_report(sweep).read_text()
    assert all(tid in page for tid in TRIALS) and 'id="fig-pareto"' in page


def test_cli_report_writes_the_page_and_names_a_missing_sweep(tmp_path: Path, capsys, monkeypatch) -> None:
    sweep = make_sweep_dir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["report", "synthetic", "--output-dir", str(tmp_path)])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == str(sweep / "index.html") and (sweep / "index.html").is_file()
    monkeypatch.setenv("LORA_SEARCH_OUTPUT_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as done:
        main(["report", "nosuch"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nosuch") in err and "run the sweep first" in err


def write_samples(sweep_dir: Path, rows: int = 4) -> None:
    """Kept golden samples (lora_search.evals) for the synthetic frontier: its adapters agree on the first half."""
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    for n, tid in enumerate(trials.loc[trials["pareto"], "trial_id"]):
        samples = []
        for i in range(rows):
            right = i < rows // 2
            samples.append({"task": "tiny_mood", "doc_id": i, "id": f"g{i}", "filter": "none", "prompt": f"prompt {i}",
                            "reference": "joy", "answer": "joy" if right else f"answer {n}",
                            "metrics": {"acc": float(right)}, "correct": right})  # fmt: skip
        (sweep_dir / "adapters" / tid).mkdir(parents=True)
        (sweep_dir / "adapters" / tid / "lm_eval_results.json").write_text(json.dumps({"golden_samples": samples}))


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Offline (every non-file request aborted and recorded), no console or page errors, every figure drawn
    with the synthetic data's points, the table sorts on a click, and a full-page screenshot; the answers page it
    links to shows the disagreements first, and its filter hides rows."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no Chromium: `make browser` installs Debian's package (apt-get install chromium)"
    write_samples(sweep_dir := make_sweep_dir(tmp_path))
    page_path = write_report(sweep_dir, baseline=BASELINE)
    trials = pd.read_parquet(page_path.parent / "trials.parquet")
    keep = Path(os.environ.get("LORA_SEARCH_SCREENSHOTS", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    requested: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            requested.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        # SwiftShader: the parallel-coordinates plot draws with WebGL, which a GPU-less headless Chromium lacks.
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/*", route)
        page.goto(page_path.as_uri())
        page.wait_for_function("ids => ids.every(id => document.getElementById(id)?._fullLayout)", arg=list(FIGURES))
        traces = page.evaluate(
            """ids => Object.fromEntries(ids.map(id => [id, document.getElementById(id).data.map(t => ({
                name: t.name, n: (t.x || t.y || t.dimensions || []).length, x: t.x || null,
                dims: (t.dimensions || []).map(d => d.values.length), symbols: t.marker && t.marker.symbol}))]))""",
            list(FIGURES),
        )
        drawn = page.evaluate("document.querySelectorAll('#fig-pareto .scatterlayer .trace:first-child .point').length")

        column = TABLE_COLUMNS.index("eval_loss") + 1
        cells = f"Array.from(document.querySelectorAll('#trials tbody td:nth-child({column})')).map(td => td.dataset.v)"
        before = page.evaluate(cells)
        page.click("#trials th:text-is('eval_loss')")
        ascending = page.evaluate(cells)
        page.click("#trials th:text-is('eval_loss')")
        descending = page.evaluate(cells)
        shot = keep / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        page.click("a[href='answers.html']")
        shown = "Array.from(document.querySelectorAll('#answers tbody tr')).filter(tr => !tr.hidden).length"
        disagreements = page.evaluate(shown)
        page.fill("#filter", "prompt 3")
        filtered = page.evaluate(shown)
        page.fill("#filter", "")
        page.uncheck("#only-disagreements")
        every = page.evaluate(shown)
        browser.close()

    assert not requested, f"the report asked the network for {requested}"
    assert not errors, errors
    scored = trials[(trials["status"] == "completed") & trials["objective"].notna()]
    pareto_traces = {t["name"]: t for t in traces["fig-pareto"]}
    assert pareto_traces["trials"]["n"] == len(scored) == drawn
    assert 1 <= pareto_traces["frontier: quality vs size"]["n"] <= len(scored)

    with_history = {tid: steps for tid, steps in STEPS.items() if steps}
    asha = {t["name"].split(" ")[0]: t for t in traces["fig-asha"]}
    assert set(asha) == set(with_history)
    for tid, trace in asha.items():
        assert trace["x"] == with_history[tid]
        status = TRIALS[tid][0]
        assert (trace["symbols"][-1] == "x") == (status == "pruned")
    assert {asha[t]["x"][-1] for t in asha if TRIALS[t][0] == "pruned"} == {5, 10}  # the rungs

    ran = trials[trials["status"] != "failed"]
    (parcoords,) = traces["fig-params"]
    assert parcoords["dims"] == [len(ran)] * 6
    assert sum(t["n"] for t in traces["fig-params-strip"]) == 2 * len(ran)
    assert {t["name"] for t in traces["fig-variants"]} == set(ran["variant"])
    assert sum(t["n"] for t in traces["fig-variants"]) == len(ran)

    losses = [float(v) for v in ascending if v]
    assert ascending != before and losses == sorted(losses) and ascending[-1] == ""  # the never-reported trial last
    assert [float(v) for v in descending if v] == sorted(losses, reverse=True)
    assert shot.stat().st_size > 20_000
    assert (disagreements, filtered, every) == (2, 1, 4)


PLAN = {"gpu": "H200", "mfu": 0.35, "step_s": 0.02, "trials": 10, "concurrent": 4, "gpus_per_trial": 0.25,
        "trial_steps": 400.0, "device_hours": 0.0005, "cost": 0.00175, "wall_hours": 0.0006,
        "spend_device_hours": 0.0006, "currency": "USD"}  # fmt: skip


def test_plan_section_sets_the_prediction_against_the_measurement(tmp_path: Path) -> None:
    """plan.json (what `plan.for_run` predicted) beside the measured figures, with their ratio and the MFU the
    trials reached; a sweep the planner could not plan says why; an older sweep has no section."""
    from lora_search.report import load

    out = make_sweep_dir(tmp_path)
    metrics = json.loads((out / "sweep_metrics.json").read_text())
    (out / "sweep_metrics.json").write_text(json.dumps({**metrics, "wall_hours": 0.0012, "spend_device_hours": 0.003}))
    (out / "plan.json").write_text(json.dumps(PLAN))
    page = write_report(out).read_text()
    section = page[page.index("<h2>Plan vs measured</h2>") :].split("</section>")[0]
    trials = load(out).trials
    steps = float(trials["step"].sum())
    assert f"<td>{steps:.0f}</td>" in section and "<td>400</td>" in section
    measured_h = metrics["sweep_device_hours"]
    assert f"<td>{measured_h:.3g}</td>" in section and f"<td>{measured_h / 0.0005:.3g}</td>" in section
    assert "<td>2</td>" in section  # wall hours: 0.0012 / 0.0006
    train_s = (trials["device_s"] * trials["train_cost"] / trials["cost"]).sum()
    step_s = train_s / 0.25 / steps
    assert f"<td>{step_s:.3g}</td>" in section
    assert f"reached about {0.35 * 0.02 / step_s:.2g}" in section

    (out / "plan.json").write_text(json.dumps({"error": "the planner plans GPU sweeps; this one trains on CPUs"}))
    page = write_report(out).read_text()
    assert "No prediction: the planner plans GPU sweeps" in page
    (out / "plan.json").unlink()
    assert "Plan vs measured" not in write_report(out).read_text()


def test_for_run_plans_the_running_cluster_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_search import plan
    from lora_search.cli import load_sweep

    monkeypatch.setenv("SMOLLM2_MODE", "gpu")
    sweep, _ = load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "smollm2.py")
    config_dir = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "smollm2-135m-instruct"
    got = plan.for_run(sweep, {"GPU": 1.0, "CPU": 16.0, "accelerator_type:H200": 1.0}, config_dir)
    assert got["gpu"] == "H200" and got["concurrent"] == 4 and got["trials"] == 24
    assert got["device_hours"] == pytest.approx(got["trial_steps"] * got["step_s"] * 0.25 / 3600)
    assert "unknown" not in json.dumps(got) and "error" not in got
    assert "GPU type" in plan.for_run(sweep, {"GPU": 1.0, "accelerator_type:A10G": 1.0}, config_dir)["error"]
    cpu = sweep.replace(resources=dataclasses.replace(sweep.resources, gpus_per_worker=0.0))
    assert "CPUs" in plan.for_run(cpu, {"CPU": 2.0})["error"]


def test_pruning_section_lists_the_second_looks(tmp_path: Path) -> None:
    from lora_search import pruning
    from lora_search.report import load

    out = make_sweep_dir(tmp_path)
    r = load(out)
    completed = r.trials.loc[r.trials["status"] == "completed", "step"].max()
    found = pruning.review(r.trials, r.history, int(completed))
    page = write_report(out).read_text()
    section = page[page.index("<h2>Pruning: saved and possibly missed</h2>") :].split("</section>")[0]
    assert f"{found.steps_run:,} of the {found.steps_full:,}" in section
    assert f"<td>{len(found.missed)}</td>" in section
    for trial_id in found.missed["trial_id"]:
        assert f"<td>{trial_id}</td>" in section
