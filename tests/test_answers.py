"""What each adapter answers: lm-eval's samples kept per trial, the answers page, `lora-search compare`; all read the
shared sweep (tests/conftest.py), none starts one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lora_search import answers
from lora_search.cli import main
from lora_search.evals import SAMPLES_KEY

REPO = Path(__file__).resolve().parents[1]
EVIL = '<script>alert("pwned")</script> & </td>'
PROMPT = "Question: What is the mood of this sentence?\nThe grey bear was happy.\nAnswer:"


def _golden_rows(task: str) -> dict[str, dict]:
    path = REPO / "evals" / "golden" / f"{task}.jsonl"
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_completed_trials_and_the_base_keep_their_golden_samples(shared_sweep) -> None:
    sweep, _, out = shared_sweep
    trials = pd.read_parquet(out / sweep.name / "trials.parquet")
    done = trials[trials["status"] == "completed"]
    results = {tid: out / sweep.name / "adapters" / tid / "lm_eval_results.json" for tid in done["trial_id"]}
    results["base"] = out / sweep.name / "base_lm_eval_results.json"
    golden = {task: _golden_rows(task) for task in sweep.evals.tasks}
    for who, path in results.items():
        samples = json.loads(path.read_text())[SAMPLES_KEY]
        assert len(samples) == sweep.evals.limit * len(sweep.evals.tasks), who  # the rows scored, no more
        for s in samples:
            row = golden[s["task"]][s["id"]]
            assert s["prompt"] == row["prompt"]
            reference = row["choices"][row["label"]] if "choices" in row else row["answer"]
            assert s["reference"] == reference and isinstance(s["answer"], str)
            (value,) = s["metrics"].values()
            assert s["correct"] is (value == 1.0)
            if "choices" in row:
                assert s["answer"] in row["choices"]
        # the per-row metric averages to the trial's score
        mood = [s["metrics"]["acc"] for s in samples if s["task"] == "tiny_mood"]
        score = done.set_index("trial_id")["tiny_mood/acc"].get(who)
        if score is not None:
            assert sum(mood) / len(mood) == pytest.approx(score)


def _copy_answers_files(sweep_dir: Path, to: Path) -> Path:
    """What the answers page reads of a sweep dir, copied (the shared sweep is never written to)."""
    to.mkdir()
    for name in ("trials.parquet", "base_lm_eval_results.json"):
        shutil.copy(sweep_dir / name, to / name)
    for results in sweep_dir.glob("adapters/*/lm_eval_results.json"):
        (to / "adapters" / results.parent.name).mkdir(parents=True)
        shutil.copy(results, to / "adapters" / results.parent.name / results.name)
    return to


def _rows(page: str) -> list[str]:
    return re.findall(r"<tr data-disagree='[01]'>.*?</tr>", page, re.S)


def test_answers_page_sets_the_frontier_side_by_side_and_escapes(shared_sweep, tmp_path: Path) -> None:
    sweep, _, out = shared_sweep
    sweep_dir = out / sweep.name
    page = (sweep_dir / "answers.html").read_text()  # written with the sweep's report, which links to it
    assert "href='answers.html'" in (sweep_dir / "index.html").read_text()
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    frontier = trials[trials["pareto"] & (trials["status"] == "completed")]
    assert len(frontier) >= 1
    assert len(_rows(page)) == sweep.evals.limit * len(sweep.evals.tasks)
    for tid in frontier["trial_id"]:
        assert f"<th>{tid} (" in page
    assert "<th>base</th>" in page and "<script src" not in page.lower()

    # One frontier adapter answers a row with a hostile string: that row is a disagreement, and escaped.
    copy = _copy_answers_files(sweep_dir, tmp_path / "copy")
    first = frontier["trial_id"].iloc[0]
    results_path = copy / "adapters" / first / "lm_eval_results.json"
    results = json.loads(results_path.read_text())
    changed = results[SAMPLES_KEY][3]
    changed.update(answer=EVIL, prompt=EVIL + " prompt", reference=EVIL + " reference")
    results_path.write_text(json.dumps(results))
    trials.loc[trials["trial_id"] == first, "variant"] = EVIL
    trials.to_parquet(copy / "trials.parquet", index=False)
    page = answers.write(copy).read_text()
    assert (
        EVIL not in page and page.count("&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;/td&gt;") >= 4
    )
    flagged = [r for r in _rows(page) if "data-disagree='1'" in r]
    assert any("alert" in r for r in flagged)
    expected = {k for k in answers.load(copy).frontier[0].rows if answers.disagree(k, answers.load(copy))}
    assert len(flagged) == len(expected) >= 1


def test_answers_page_of_a_sweep_without_samples_says_so(shared_sweep, tmp_path: Path) -> None:
    sweep, _, out = shared_sweep
    copy = _copy_answers_files(out / sweep.name, tmp_path / "older")
    for path in copy.rglob("*lm_eval_results.json"):
        results = json.loads(path.read_text())
        del results[SAMPLES_KEY]
        path.write_text(json.dumps(results))
    page = answers.write(copy).read_text()
    assert "No golden samples for the frontier trial(s)" in page and not _rows(page)


def test_compare_prints_the_base_and_each_adapter_on_one_base_load(shared_sweep, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sweep, _, out = shared_sweep
    trials = pd.read_parquet(out / sweep.name / "trials.parquet")
    done = trials[trials["status"] == "completed"]
    ids = [done["trial_id"].iloc[0], *done["mlflow_run_id"].iloc[1:]]  # a trial id, then MLflow run ids
    with pytest.raises(SystemExit) as ended:
        main(["compare", *ids, "--prompt", PROMPT, "--max-new-tokens", "8", "--output-dir", str(out)])
    assert ended.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(done) and lines[0].startswith("base ")
    for line, tid in zip(lines[1:], done["trial_id"], strict=True):
        assert line.startswith(f"{tid} (")

    # the last adapter, hot-swapped in after the others, answers as it does loaded alone
    last = Path(done["adapter_path"].iloc[-1])
    tokenizer = AutoTokenizer.from_pretrained(sweep.base.name_or_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sweep.base.name_or_path), str(last))
    ids_in = tokenizer(PROMPT, return_tensors="pt")
    alone = model.eval().generate(**ids_in, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(alone[0, ids_in["input_ids"].shape[1] :], skip_special_tokens=True)
    assert lines[-1].endswith("  " + json.dumps(text, ensure_ascii=False))


def test_compare_names_an_unknown_id_and_lists_the_known(shared_sweep, capsys) -> None:
    sweep, trials, out = shared_sweep
    with pytest.raises(SystemExit) as ended:
        main(["compare", "nosuch", "--prompt", "x", "--output-dir", str(out)])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "id = 'nosuch'" in err and "no trial or MLflow run with this id" in err and "Fix:" in err
    first = trials.iloc[0]
    assert first["trial_id"] in err and first["mlflow_run_id"] in err
