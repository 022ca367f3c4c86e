"""Training data: checking it line by line before any trial runs, and turning it into TRL's format.

Accepted rows (local JSONL, one object per line):
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`, last message from the
  assistant; trained on the last assistant turn (TRL conversational prompt/completion).
- instruction: `{"instruction": "...", "input": "..." (optional), "output": "..."}`; the prompt is
  `format_prompt(instruction, input)` and the loss covers only the output.
- prompt/completion (TRL's own): `{"prompt": "...", "completion": "..."}`, for data that brings its own prompt
  format; the loss covers only the completion.
A directory written by `datasets.Dataset.save_to_disk`, or a hub dataset id, with the same columns, works too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_search.config import Dataset, Problem

if TYPE_CHECKING:
    import datasets

MAX_REPORTED_PER_FILE = 20
"""Past this many bad lines in one file the rest are counted, not listed: the fix is usually the same."""

ROLES = ("system", "user", "assistant")


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt an instruction row is trained on. Golden-set evaluation builds the same prompt."""
    if input:
        return f"### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
    return f"### Instruction:\n{instruction}\n### Response:\n"


def row_problem(row: Any) -> str | None:
    """Why `row` is not a usable training example, or None if it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"messages[{i}] needs a string 'content'"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role = {m.get('role')!r}; expected one of {', '.join(ROLES)}"
        if messages[-1]["role"] != "assistant":
            return "the last message must be from the assistant (it is what the adapter learns to say)"
        if len(messages) < 2:
            return "needs at least one message before the assistant's answer"
        return None
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                return f"missing or empty string field {key!r}"
        return None
    if "instruction" in row or "output" in row:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                return f"missing or empty string field {key!r}"
        if not isinstance(row.get("input", ""), str):
            return "'input' must be a string"
        return None
    return (
        f"unknown row format with keys {sorted(row)}; need 'messages' (chat), 'instruction'+'output', "
        "or 'prompt'+'completion'"
    )


def check_jsonl(path: Path) -> list[Problem]:
    """Every unusable line of a JSONL file, as `file:line` problems."""
    if not path.is_file():
        return [Problem(str(path), None, "file not found", "check dataset.path / dataset.eval_path")]
    problems: list[Problem] = []
    bad = rows = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                why = row_problem(json.loads(line))
            except json.JSONDecodeError as e:
                why = f"invalid JSON ({e.msg} at column {e.colno})"
            if why:
                bad += 1
                if bad <= MAX_REPORTED_PER_FILE:
                    problems.append(Problem(f"{path}:{lineno}", None, why, "fix or delete this line"))
    if bad > MAX_REPORTED_PER_FILE:
        problems.append(Problem(str(path), None, f"{bad - MAX_REPORTED_PER_FILE} more bad lines not listed", ""))
    if rows == 0:
        problems.append(Problem(str(path), None, "has no rows", "add training examples, one JSON object per line"))
    return problems


def check(dataset: Dataset) -> list[Problem]:
    """Problems with the sweep's data, found without loading a model."""
    problems = []
    for field_name, location in (("dataset.path", dataset.path), ("dataset.eval_path", dataset.eval_path)):
        if location is None:
            continue
        path = Path(location)
        if path.suffix == ".jsonl":
            problems.extend(check_jsonl(path))
        elif path.is_dir():
            problems.extend(_check_rows(field_name, location, _load_source(location, dataset.split)))
        else:
            try:
                rows = _load_source(location, dataset.split)
            except Exception as e:  # noqa: BLE001 - the datasets library raises many types for "not found"
                problems.append(
                    Problem(
                        field_name,
                        location,
                        f"not a local .jsonl/dir and not loadable as a hub dataset ({e})",
                        "give an existing .jsonl file, a save_to_disk dir, or a reachable hub id",
                    )
                )
                continue
            problems.extend(_check_rows(field_name, location, rows))
    return problems


def _check_rows(field_name: str, location: str, rows: datasets.Dataset) -> list[Problem]:
    problems = []
    if len(rows) == 0:
        return [Problem(field_name, location, "has no rows", "")]
    for i, row in enumerate(rows):
        why = row_problem(row)
        if why:
            problems.append(Problem(f"{location}[row {i}]", None, why, "fix the dataset"))
            if len(problems) >= MAX_REPORTED_PER_FILE:
                break
    return problems


def _load_source(location: str, split: str) -> datasets.Dataset:
    import datasets

    path = Path(location)
    if path.suffix == ".jsonl":
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(location, split=split)


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """One row in TRL's prompt/completion form (completion-only loss)."""
    if "messages" in row:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if "prompt" in row:
        return {"prompt": row["prompt"], "completion": row["completion"]}
    return {"prompt": format_prompt(row["instruction"], row.get("input") or ""), "completion": row["output"]}


def load(dataset: Dataset, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) in prompt/completion form; eval is `eval_path` or a seeded `eval_fraction` split."""
    train = _load_source(dataset.path, dataset.split)
    if dataset.eval_path is not None:
        evaluation = _load_source(dataset.eval_path, dataset.split)
    else:
        split = train.train_test_split(test_size=dataset.eval_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    train = train.map(to_prompt_completion, remove_columns=train.column_names)
    evaluation = evaluation.map(to_prompt_completion, remove_columns=evaluation.column_names)
    return train, evaluation


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
