"""Training data (lora_search/data.py): the row formats, the JSONL reader, TRL's prompt/completion form, the
train/eval split and the token-level check, on the tiny fixtures.

Run: python -m pytest tests/test_data.py   (CPU, seconds)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_search import data
from lora_search.config import Dataset

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Mood of: the cat joy runs"},
        {"role": "assistant", "content": "joy"},
    ]
}
INSTRUCTION = {"instruction": "Name the mood.", "input": "the dog fear sleeps", "output": "fear"}
PROMPT_COMPLETION = {"prompt": "Q: mood of 'calm'?\nA:", "completion": " calm"}


def test_format_prompt_with_and_without_input() -> None:
    assert data.format_prompt("Name the mood.", "the cat") == (
        "### Instruction:\nName the mood.\n### Input:\nthe cat\n### Response:\n"
    )
    assert data.format_prompt("Name the mood.") == "### Instruction:\nName the mood.\n### Response:\n"


@pytest.mark.parametrize("row", [CHAT, INSTRUCTION, PROMPT_COMPLETION, {"instruction": "Say hi.", "output": "hi"}])
def test_every_accepted_format_passes(row: dict) -> None:
    assert data.row_problem(row) is None


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0] needs a string 'content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role = 'bot'"),
        ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "last message"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "at least one message before"),
        ({"prompt": "p", "completion": "  "}, "missing or empty string field 'completion'"),
        ({"instruction": "i"}, "missing or empty string field 'output'"),
        ({"instruction": "i", "output": "o", "input": 5}, "'input' must be a string"),
        ({"text": "t"}, "unknown row format with keys ['text']"),
    ],
)
def test_row_problem_names_what_is_wrong(row: object, says: str) -> None:
    problem = data.row_problem(row)
    assert problem is not None and says in problem


def test_to_prompt_completion_for_each_format() -> None:
    chat = data.to_prompt_completion(CHAT)
    assert chat["prompt"] == CHAT["messages"][:2] and chat["completion"] == CHAT["messages"][2:]
    assert data.to_prompt_completion(PROMPT_COMPLETION) == PROMPT_COMPLETION
    assert data.to_prompt_completion(INSTRUCTION) == {
        "prompt": data.format_prompt("Name the mood.", "the dog fear sleeps"),
        "completion": "fear",
    }
    no_input = data.to_prompt_completion({"instruction": "Say hi.", "input": None, "output": "hi"})
    assert no_input["prompt"] == data.format_prompt("Say hi.")


def test_jsonl_lines_skip_blanks_and_name_unreadable_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"b": "caf\xe9"}\n{"c": 3}\n')
    lines = list(data.jsonl_lines(path))
    assert [n for n, _, _ in lines] == [1, 4, 5]
    assert lines[0] == (1, '{"a": 1}\n', None)
    assert lines[1][1] is None and lines[1][2] == "not UTF-8 (byte 0xe9 at column 11)"
    assert [row for row in data.iter_jsonl(path)] == [{"a": 1}, {"c": 3}]

    bom = tmp_path / "bom.jsonl"
    bom.write_text('\ufeff{"a": 1}\n{"b": 2}\n', encoding="utf-8")
    first, second = data.jsonl_lines(bom)
    assert first[1] is None and "byte-order mark" in (first[2] or "") and second[2] is None


def test_parse_line() -> None:
    assert data.parse_line('{"a": [1, 2]}') == ({"a": [1, 2]}, None)
    row, why = data.parse_line('{"a": ')
    assert row is None and why is not None and why.startswith("invalid JSON (")
    assert data.parse_line("[" * 100_000 + "]" * 100_000)[1] == "invalid JSON (nested too deeply)"


def test_check_jsonl_lists_bad_lines_at_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(INSTRUCTION), "not json", json.dumps({"text": "t"})]) + "\n")
    problems = data.check_jsonl(path)
    assert [p.field for p in problems] == [f"{path}:2", f"{path}:3"]
    assert data.check_jsonl(tmp_path / "missing.jsonl")[0].message == "file not found"


def test_load_splits_seeded_into_prompt_completion(tiny_jsonl: Path) -> None:
    dataset = Dataset(str(tiny_jsonl), eval_fraction=0.25)
    train, evaluation = data.load(dataset, seed=0)
    assert (len(train), len(evaluation)) == (90, 30)  # tiny_jsonl holds 120 rows
    assert train.column_names == evaluation.column_names == ["prompt", "completion"]
    assert train[0]["prompt"].startswith("### Instruction:\nName the mood.\n### Input:\n")
    again, _ = data.load(dataset, seed=0)
    other, _ = data.load(dataset, seed=1)
    assert list(again["prompt"]) == list(train["prompt"]) != list(other["prompt"])


def test_load_takes_eval_path_whole(tiny_jsonl: Path, tmp_path: Path) -> None:
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps(PROMPT_COMPLETION) + "\n" + json.dumps({"prompt": "p", "completion": " c"}) + "\n")
    train, evaluation = data.load(Dataset(str(tiny_jsonl), eval_path=str(held_out)), seed=0)
    assert len(train) == 120 and list(evaluation["completion"]) == [" calm", " c"]


def test_token_problems_refuse_a_cut_that_leaves_no_answer(tiny_model_dir: Path, tiny_jsonl: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert data.token_problems(Dataset(str(tiny_jsonl), max_length=256), tokenizer, seed=0, needed=4) == []
    problems = data.token_problems(Dataset(str(tiny_jsonl), max_length=8), tokenizer, seed=0, needed=4)
    assert {p.field for p in problems} == {"dataset.max_length"}
    assert len(problems) == 2  # the training rows and the held-out rows
    assert "have no answer token left after the cut" in problems[0].message
    assert problems[0].fix.startswith("max_length >= ")
