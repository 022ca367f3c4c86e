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


def jsonl_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, why it cannot be read) for every non-blank line of a JSONL file: a line that is not
    UTF-8 comes with its reason and no text, so one bad byte names its line instead of failing the whole file."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = raw[e.start : e.start + 1].hex()
                yield lineno, None, f"not UTF-8 (byte 0x{byte} at column {e.start + 1})"
                continue
            if lineno == 1 and line.startswith("\ufeff"):
                yield lineno, None, "starts with a UTF-8 byte-order mark, which JSON readers refuse"
                continue
            if line.strip():
                yield lineno, line, None


def parse_line(line: str) -> tuple[Any, str | None]:
    """(the parsed row, None) or (None, why the line is not JSON)."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"


def check_jsonl(path: Path) -> list[Problem]:
    """Every unusable line of a JSONL file, as `file:line` problems."""
    if not path.is_file():
        return [Problem(str(path), None, "file not found", "check dataset.path / dataset.eval_path")]
    problems: list[Problem] = []
    bad = rows = 0
    first: dict[str, tuple[str, int]] = {}  # the row format, and each key's JSON kind: (what, line first seen)
    for lineno, line, unreadable in jsonl_lines(path):
        rows += 1
        row, why = (None, unreadable) if line is None else parse_line(line)
        why = why or row_problem(row) or consistency_problem(row, lineno, first)
        if why:
            bad += 1
            if bad <= MAX_REPORTED_PER_FILE:
                fix = "save the file as UTF-8" if unreadable else "fix or delete this line"
                problems.append(Problem(f"{path}:{lineno}", None, why, fix))
    if bad > MAX_REPORTED_PER_FILE:
        problems.append(Problem(str(path), None, f"{bad - MAX_REPORTED_PER_FILE} more bad lines not listed", ""))
    if rows == 0:
        problems.append(Problem(str(path), None, "has no rows", "add training examples, one JSON object per line"))
    return problems


def row_format(row: dict[str, Any]) -> str:
    """chat, prompt/completion or instruction: the formats `row_problem` accepts."""
    return "chat" if "messages" in row else "prompt/completion" if "prompt" in row else "instruction"


def _json_kind(value: Any) -> str | None:
    """The column type a JSON loader (Arrow) infers for `value`; None (null) fits any."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(type(value), "other")


def consistency_problem(
    row: dict[str, Any], lineno: int, first: dict[str, tuple[str, int]], formats: bool = True
) -> str | None:
    """Why `row` cannot share a file with the rows before it: a JSON loader reads one file as one table, so mixed row
    formats come out with empty columns (an instruction row with no prompt), and a key whose type changes from row to
    row is refused at load time, inside the trial. `formats`: also one row format per file (training data)."""
    what = row_format(row) if formats else "row"  # golden sets have no training format
    seen, at = first.setdefault("format", (what, lineno))
    if seen != what:
        return f"is a {what} row, but line {at} is {seen}: one format per file"
    for key, value in row.items():
        kind = _json_kind(value)
        if kind is None:
            continue
        seen, at = first.setdefault(f"key {key}", (kind, lineno))
        if seen != kind:
            return f"{key!r} is a {kind} here but a {seen} on line {at}: a column keeps one type"
    return None


def check(dataset: Dataset) -> list[Problem]:
    """Problems with the sweep's data, found without loading a model."""
    problems = []
    for field_name, location in (("dataset.path", dataset.path), ("dataset.eval_path", dataset.eval_path)):
        if location is None:
            continue
        path = Path(location)
        if path.suffix == ".jsonl":
            problems.extend(check_jsonl(path))
        else:
            try:
                rows = _load_source(location, dataset.split)
            except Exception as e:  # the datasets library raises many types for "not found"
                what = (
                    "a local dir that `datasets.load_from_disk` cannot read"
                    if path.is_dir()
                    else ("not a local .jsonl/dir and not loadable as a hub dataset")
                )
                problems.append(
                    Problem(
                        field_name,
                        location,
                        f"{what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
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
    """The rows of a JSONL file that `check_jsonl` passed."""
    for _, line, _ in jsonl_lines(path):
        if line is not None:
            yield json.loads(line)


def token_problems(dataset: Dataset, tokenizer: Any, seed: int, needed: int) -> list[Problem]:
    """Problems with the data as the trial's SFTTrainer sees it: each row tokenized with the base's tokenizer and
    chat template (TRL's prompt/completion path: the completion starts where prompt and prompt+completion diverge),
    then cut at `dataset.max_length` from the end. A row whose cut leaves no completion token trains nothing and TRL
    drops it. Refused: fewer than `needed` training rows left (a step's rows), or no eval row left (no eval loss)."""
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a check prints its problems, not the loader's bars
    try:
        train, evaluation = load(dataset, seed)
    except Exception as e:  # rows check_jsonl passed, but the datasets library may still refuse them
        return [Problem("dataset.path", dataset.path, f"cannot be loaded ({type(e).__name__}: {e})", "fix the data")]
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    problems = []
    for field_name, rows, least in (("dataset.path", train, needed), ("dataset.eval_path", evaluation, 1)):
        where = dataset.eval_path if field_name == "dataset.eval_path" else dataset.path
        if field_name == "dataset.eval_path" and dataset.eval_path is None:
            where = f"the held-out {dataset.eval_fraction:g} of {dataset.path}"
        try:
            lengths = [_token_lengths(tokenizer, row) for row in rows]
        except Exception as e:  # a tokenizer or chat template that cannot render the rows
            why = f"the base's tokenizer cannot tokenize these rows ({type(e).__name__}: {str(e).splitlines()[0]})"
            fix = "chat rows need a tokenizer with a chat template" if "chat_template" in str(e) else "fix the data"
            problems.append(Problem(field_name, where, why, fix))
            continue
        kept = sum(prompt < dataset.max_length for prompt, _ in lengths)
        if kept >= least:
            continue
        lost = len(lengths) - kept
        answer = max(prompt for prompt, _ in lengths) + 1
        whole = max(total for _, total in lengths)
        problems.append(
            Problem(
                "dataset.max_length",
                dataset.max_length,
                f"{lost} of {len(lengths)} rows of {where} have no answer token left after the cut (the prompt alone "
                f"fills max_length), so {kept} row(s) train; a step needs at least {least}",
                f"max_length >= {answer} keeps an answer token in every row, >= {whole} keeps every row whole; or "
                "shorten the prompts",
            )
        )
    return problems


def _token_lengths(tokenizer: Any, row: dict[str, Any]) -> tuple[int, int]:
    """(tokens before the completion starts, tokens of the whole row) as TRL's SFTTrainer tokenizes `row`."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational: the chat template renders both
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion + ("" if completion.endswith(eos) else eos))["input_ids"]
    common = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        common += 1
    return common, len(full_ids)
