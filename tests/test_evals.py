"""Golden-set scoring with lm-eval: held-out data, the adapter-applied guard, the CLI cross-check, validation."""

from __future__ import annotations

import dataclasses
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


def _key_inputs(tasks_dir: Path, **changes) -> tuple:
    from types import SimpleNamespace

    from lora_search import BaseModel

    evals = Evals(tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(tasks_dir), limit=8)
    sweep = SimpleNamespace(evals=evals, base=BaseModel("some/base"), seed=0)
    for name, value in changes.items():
        if name in ("limit", "batch_size"):
            sweep.evals = dataclasses.replace(evals, **{name: value})
        elif name == "dtype":
            sweep.base = dataclasses.replace(sweep.base, dtype=value)
        else:
            setattr(sweep, name, value)
    return sweep, changes.get("fingerprint", "sha256:base"), changes.get("device", "cpu")


def test_a_base_score_is_kept_under_everything_it_depends_on(tmp_path) -> None:
    """The key of the kept base scores: the same golden sets anywhere give the same key; a changed golden row, task
    code file, limit, batch size, seed, base, dtype or device kind gives another. A kept entry is read back whole,
    and an entry whose stored key is not the asked one (or is not JSON) is no hit."""
    from lora_search.evals import BaseScoresCache, base_scores_key

    project = tmp_path / "project"
    shutil.copytree(REPO / "evals", project / "evals")
    tasks = project / "evals" / "tasks"

    def key(**changes) -> dict:
        sweep, fingerprint, device = _key_inputs(tasks, **changes)
        return base_scores_key(sweep, fingerprint, device)

    first = key()
    assert first == base_scores_key(*_key_inputs(TASKS))  # the shipped golden sets, copied: the same key
    others = {
        "limit": key(limit=9),
        "batch_size": key(batch_size=4),
        "seed": key(seed=1),
        "fingerprint": key(fingerprint="sha256:other"),
        "dtype": key(dtype="bfloat16"),
        "device": key(device="H100"),
    }
    golden = project / "evals" / "golden" / "tiny_mood.jsonl"
    golden.write_text(golden.read_text().replace("joy", "calm", 1))
    others["golden row"] = key()
    (tasks / "utils.py").write_text("def process(doc):\n    return doc\n")
    others["task code"] = key()
    for what, other in others.items():
        assert other != first, what
    assert len({json.dumps(k, sort_keys=True) for k in others.values()}) == len(others)

    scores = {"metrics": {"tiny_mood/acc": 0.25}, "objective": 0.25, "higher_is_better": True, "results": {"a": 1}}
    kept = BaseScoresCache(first, tmp_path / "cache")
    assert kept.read() is None
    kept.write(scores, "nightly")
    again = BaseScoresCache(json.loads(json.dumps(first)), tmp_path / "cache").read()
    assert {k: v for k, v in again.items() if k != "reused_from"} == scores
    assert again["reused_from"]["sweep"] == "nightly" and again["reused_from"]["path"] == str(kept.path)
    assert BaseScoresCache(others["seed"], tmp_path / "cache").read() is None
    entry = json.loads(kept.path.read_text())
    entry["key"]["seed"] = 1  # the file named for one key holding another's
    kept.path.write_text(json.dumps(entry))
    assert kept.read() is None
    kept.path.write_text("{not json")
    assert kept.read() is None
