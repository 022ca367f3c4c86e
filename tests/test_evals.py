"""Golden-set scoring with lm-eval: held-out data, the adapter-applied guard, the CLI cross-check, validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_search.evals import AdapterNotAppliedError, Evals, check, check_applied, score

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "evals" / "tasks"
EVALS = Evals(tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(TASKS), limit=40)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_golden_sets_are_held_out_from_training_data() -> None:
    def sentence(row: dict) -> str:
        return row["messages"][0]["content"].split("\n", 1)[1]

    trained = {sentence(r) for name in ("train", "eval") for r in _rows(REPO / "data" / "tiny" / f"{name}.jsonl")}
    for name in ("tiny_mood", "tiny_antonym"):
        golden = _rows(REPO / "evals" / "golden" / f"{name}.jsonl")
        assert len(golden) >= 100
        assert not {g["text"] for g in golden} & trained, name


def _adapter(model_dir: Path, out: Path, zero: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        # init_lora_weights=False draws B at random too: a non-zero adapter without training.
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=zero),
    )
    model.save_pretrained(out)
    return out


def test_zero_adapter_is_refused_by_the_guard(tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 6, 7]])
    zero = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        str(_adapter(tiny_model_dir, tmp_path / "zero", zero=True)),
    )
    with pytest.raises(AdapterNotAppliedError, match="does not change the model's outputs"):
        check_applied(zero, ids)
    live = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        str(_adapter(tiny_model_dir, tmp_path / "live", zero=False)),
    )
    assert check_applied(live, ids) > 1e-4


def test_scores_equal_the_lm_eval_cli(tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", zero=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    ours = score(model, AutoTokenizer.from_pretrained(tiny_model_dir), EVALS, seed=0)["metrics"]

    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_model_dir},peft={adapter},dtype=float32",
            "--tasks",
            "tiny_mood,tiny_antonym",
            "--include_path",
            str(TASKS),
            "--limit",
            "40",
            "--batch_size",
            "16",
            "--seed",
            "0",
            "--output_path",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    cli = json.loads(next(out.rglob("results*.json")).read_text())["results"]
    assert ours["tiny_mood/acc"] == cli["tiny_mood"]["acc,none"]  # loglikelihood: identical
    assert ours["tiny_antonym/exact_match"] == cli["tiny_antonym"]["exact_match,strip"]  # greedy generation


def test_shipped_golden_sets_validate() -> None:
    assert check(EVALS) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows.__setitem__(2, "{not json"), ":3: invalid JSON"),
        (
            lambda rows: rows.__setitem__(1, json.dumps({"id": "x", "choices": ["a"], "label": 0})),
            ":2: missing field(s) prompt",
        ),
        (lambda rows: rows.__setitem__(3, rows[0]), ":4 = 'golden_mood-0000': duplicate id (first on line 1)"),
        (
            lambda rows: rows.__setitem__(0, json.dumps({**json.loads(rows[0]), "label": 7})),
            ":1 = 7: label out of range for 4 choices",
        ),
        (lambda rows: rows.clear(), "golden set is empty"),
    ],
)
def test_malformed_golden_sets_get_their_own_clear_error(tmp_path, edit, message: str) -> None:
    tasks = tmp_path / "evals" / "tasks"
    shutil.copytree(TASKS, tasks)
    golden = tmp_path / "evals" / "golden"
    golden.mkdir()
    rows = (REPO / "evals" / "golden" / "tiny_mood.jsonl").read_text().splitlines()[:10]
    edit(rows)
    (golden / "tiny_mood.jsonl").write_text("\n".join(rows) + ("\n" if rows else ""))
    problems = check(Evals(tasks=("tiny_mood",), objective="tiny_mood/acc", tasks_dir=str(tasks)))
    assert any(message in str(p) for p in problems), [str(p) for p in problems]


def test_missing_golden_file_and_task(tmp_path) -> None:
    tasks = tmp_path / "evals" / "tasks"
    shutil.copytree(TASKS, tasks)
    problems = check(Evals(tasks=("tiny_mood",), objective="tiny_mood/acc", tasks_dir=str(tasks)))
    assert "golden data file not found" in str(problems[0])
    problems = check(Evals(tasks=("nope",), objective="nope/acc", tasks_dir=str(tasks)))
    assert "no task YAML" in str(problems[0])


def test_task_yaml_that_lm_eval_rejects(tmp_path) -> None:
    tasks = tmp_path / "evals" / "tasks"
    shutil.copytree(TASKS, tasks)
    shutil.copytree(REPO / "evals" / "golden", tmp_path / "evals" / "golden")
    bad = (tasks / "tiny_mood.yaml").read_text().replace("output_type: multiple_choice", "output_type: guess")
    (tasks / "tiny_mood.yaml").write_text(bad)
    problems = check(Evals(tasks=("tiny_mood",), objective="tiny_mood/acc", tasks_dir=str(tasks)))
    assert problems and "lm-eval rejects the task YAML" in str(problems[0]), [str(p) for p in problems]
