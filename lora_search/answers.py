"""What each adapter answers: the golden rows side by side (`answers.html`), and one prompt on several adapters.

    lora-search report tiny                 # also writes reports/tiny/answers.html, linked from index.html
    lora-search compare TRIAL_OR_RUN_ID [TRIAL_OR_RUN_ID ...] --prompt "Question: ...\\nAnswer:"

The page sets, for every golden row the frontier adapters were scored on, the prompt, the reference, the base's answer
and each frontier adapter's answer side by side, marked right or wrong: lm-eval's samples as lora_search.evals keeps
them (`evals.SAMPLES_KEY` in the results JSON beside each adapter and the base's). A row is a disagreement when the
frontier adapters' answers differ (with one frontier adapter: when its answer differs from the base's); only those
show at first, and a text filter narrows the rows further. Inline CSS and JavaScript, no network, every string escaped.

`compare` loads the adapters' base once, generates greedily from it, then hot-swaps each adapter onto it (PEFT
`load_adapter` / `set_adapter`) and generates again: a quick look, not a score.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_search.config import BaseModel, ConfigError, Problem
from lora_search.evals import SAMPLES_KEY
from lora_search.layout import (
    ADAPTERS_DIR,
    BASE_LM_EVAL_RESULTS,
    LM_EVAL_RESULTS,
    PEFT_CONFIG,
    REPORT_HTML,
    TRIALS_FILE,
)

ANSWERS_HTML = "answers.html"
"""Beside the report (`layout.REPORT_HTML`), in the sweep dir."""
MAX_LISTED = 20
"""Known ids an unknown-id error lists at most."""

Key = tuple[str, Any, Any]
"""A golden row: (task, doc_id, filter)."""


@dataclass(frozen=True)
class Column:
    """One model's answers: `label` heads its column; `rows` maps each golden row to its kept sample."""

    label: str
    rows: dict[Key, dict[str, Any]]


@dataclass(frozen=True)
class Answers:
    """What the page shows of one sweep dir (`load`)."""

    name: str
    base: Column | None
    frontier: list[Column]
    missing: list[str]
    """Frontier trials whose results hold no samples (scored before lora_search kept them, or unreadable)."""


def _samples(path: Path) -> dict[Key, dict[str, Any]] | None:
    """The kept samples of a results JSON by golden row; None when it has none (or cannot be read)."""
    try:
        rows = json.loads(path.read_text()).get(SAMPLES_KEY)
        return {(r["task"], r["doc_id"], r["filter"]): r for r in rows} if isinstance(rows, list) else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # missing, or not what evals writes
        return None


def _label(row: dict[str, Any]) -> str:
    return f"{row['trial_id']} ({row.get('variant', '?')} r={row.get('rank', '?')})"


def load(sweep_dir: Path) -> Answers:
    """The base's and the frontier trials' kept samples. Raises ConfigError when the sweep dir has no trials.parquet."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / TRIALS_FILE).is_file():
        fix = "run the sweep first (lora-search run sweeps/NAME.py)"
        raise ConfigError([Problem("sweep dir", str(sweep_dir), "has no trials.parquet", fix)], header="no answers")
    trials = pd.read_parquet(sweep_dir / TRIALS_FILE)
    on_front = trials["pareto"].astype(bool) if "pareto" in trials else pd.Series(False, index=trials.index)
    frontier, missing = [], []
    for row in trials[on_front & (trials["status"] == "completed")].to_dict("records"):
        found = _samples(sweep_dir / ADAPTERS_DIR / row["trial_id"] / LM_EVAL_RESULTS)
        if found is None:
            missing.append(str(row["trial_id"]))
        else:
            frontier.append(Column(_label(row), found))
    base = _samples(sweep_dir / BASE_LM_EVAL_RESULTS)
    return Answers(sweep_dir.name, Column("base", base) if base is not None else None, frontier, missing)


def disagree(key: Key, a: Answers) -> bool:
    """Whether the frontier adapters answer the row differently (with one of them: differently from the base)."""
    columns = a.frontier if len(a.frontier) > 1 else [*a.frontier, *([a.base] if a.base else [])]
    answers = {str(c.rows[key]["answer"]).strip() for c in columns if key in c.rows}
    return len(answers) > 1


def render(a: Answers) -> str:
    """The whole page as a string."""
    title = html.escape(f"What the frontier adapters of {a.name} answer")
    back = f"<p class='note'><a href='{REPORT_HTML}'>Back to the sweep report</a></p>"
    body = _table(a) if a.frontier else _note(_why_empty(a))
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
        f"</head>\n<body><h1>{title}</h1>\n{back}\n{body}\n<script>{FILTER_JS}</script></body></html>\n"
    )


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _why_empty(a: Answers) -> str:
    if a.missing:
        return (
            f"No golden samples for the frontier trial(s) {', '.join(a.missing)}: their results were written before "
            "lora_search kept lm-eval's samples. A sweep run now keeps them."
        )
    return "No completed frontier trial was scored on golden sets: there are no answers to set side by side."


def _table(a: Answers) -> str:
    columns = [*([a.base] if a.base else []), *a.frontier]
    keys = sorted({k for c in a.frontier for k in c.rows}, key=lambda k: (k[0], str(k[2]), str(k[1]).zfill(12)))
    flagged = {k for k in keys if disagree(k, a)}
    heads = "".join(f"<th>{html.escape(c.label)}</th>" for c in columns)
    rows = []
    for key in keys:
        first = next(c.rows[key] for c in a.frontier if key in c.rows)
        where = f"{key[0]} #{key[1]}" + (f" {first['id']}" if first.get("id") not in (None, "") else "")
        cells = [f"<td>{html.escape(where)}</td>", f"<td class='text'>{html.escape(str(first['prompt']))}</td>"]
        cells.append(f"<td class='text'>{html.escape(str(first['reference']))}</td>")
        cells += [_answer_cell(c.rows.get(key)) for c in columns]
        rows.append(f"<tr data-disagree='{int(key in flagged)}'>{''.join(cells)}</tr>")
    table = (
        f"<table id='answers'><thead><tr><th>golden row</th><th>prompt</th><th>reference</th>{heads}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    controls = (
        "<p><input id='filter' type='search' placeholder='filter rows: any text in them' size='40'> "
        "<label><input id='only-disagreements' type='checkbox' checked> only disagreements</label> "
        f"<span class='note'><span id='shown'>{len(rows)}</span> of {len(rows)} row(s) shown</span></p>"
    )
    missing = _note(f"Not shown, no samples kept: {', '.join(a.missing)}.") if a.missing else ""
    return _summary(a, keys, flagged) + missing + controls + table


def _summary(a: Answers, keys: list[Key], flagged: set[Key]) -> str:
    """Per task: rows, disagreements and each model's right answers."""
    columns = [*([a.base] if a.base else []), *a.frontier]
    heads = "".join(f"<th>{html.escape(c.label)} right</th>" for c in columns)
    rows = []
    for task in sorted({k[0] for k in keys}):
        mine = [k for k in keys if k[0] == task]
        right = [sum(c.rows.get(k, {}).get("correct") is True for k in mine) for c in columns]
        cells = [task, len(mine), sum(k in flagged for k in mine), *right]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>")
    table = f"<table><tr><th>task</th><th>rows</th><th>disagreements</th>{heads}</tr>{''.join(rows)}</table>"
    how = (
        f"{len(a.frontier)} frontier adapter(s). A disagreement: the frontier adapters' answers differ"
        + (" (one adapter: its answer differs from the base's)" if len(a.frontier) == 1 else "")
        + ". Multiple-choice answers are the choice the model ranked first; generated ones are after the task's "
        "filter. ✓ right, ✗ wrong, by the row's first metric."
    )
    return table + _note(how)


def _answer_cell(sample: dict[str, Any] | None) -> str:
    if sample is None:
        return "<td class='none'>–</td>"
    cls, mark = {True: ("ok", "✓ "), False: ("bad", "✗ ")}.get(sample.get("correct"), ("", ""))
    return f"<td class='text {cls}'>{mark}{html.escape(str(sample['answer']))}</td>"


def write(sweep_dir: Path) -> Path:
    """Write `sweep_dir/answers.html` atomically and return its path. Raises ConfigError without trials.parquet."""
    out = Path(sweep_dir) / ANSWERS_HTML
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(render(load(Path(sweep_dir))), encoding="utf-8")
    tmp.replace(out)
    return out


# --- `lora-search compare` ---------------------------------------------------------------------------------------


def find_adapters(ids: list[str], output_dir: Path) -> list[tuple[str, Path]]:
    """(label, adapter dir) for each id, a trial id or its MLflow run id, from the trials.parquet of every sweep under
    `output_dir` (or of `output_dir` itself, a sweep dir). Raises ConfigError naming every id that is unknown,
    ambiguous or has no saved adapter, with the ids that have one."""
    import pandas as pd

    output_dir = Path(output_dir)
    parquets = [output_dir / TRIALS_FILE] if (output_dir / TRIALS_FILE).is_file() else []
    parquets = parquets or sorted(output_dir.glob(f"*/{TRIALS_FILE}"))
    known: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for parquet in parquets:
        for row in pd.read_parquet(parquet).to_dict("records"):
            for key in {str(row["trial_id"]), str(row.get("mlflow_run_id") or "")} - {""}:
                known.setdefault(key, []).append((parquet.parent / ADAPTERS_DIR / str(row["trial_id"]), row))
    found, problems = [], []
    for given in ids:
        matches = known.get(given, [])
        if len(matches) == 1 and (matches[0][0] / PEFT_CONFIG).is_file():
            found.append((_label(matches[0][1]), matches[0][0]))
        elif len(matches) > 1:
            where = ", ".join(str(m[0].parent.parent) for m in matches)
            problems.append(Problem("id", given, f"names trials of several sweeps ({where})", "use --output-dir DIR"))
        elif matches:
            status = matches[0][1].get("status", "?")
            problems.append(Problem("id", given, f"the trial ({status}) saved no adapter", _listing(known)))
        else:
            where = f"the sweeps under {output_dir}" if parquets else f"{output_dir}, which holds no finished sweep"
            problems.append(Problem("id", given, f"no trial or MLflow run with this id in {where}", _listing(known)))
    if problems:
        raise ConfigError(problems, header="cannot compare")
    return found


def _listing(known: dict[str, list[tuple[Path, dict[str, Any]]]]) -> str:
    rows = [(d, r) for matches in known.values() for d, r in matches]
    saved = sorted(
        {(str(r["trial_id"]), str(r.get("mlflow_run_id") or "")) for d, r in rows if (d / PEFT_CONFIG).is_file()}
    )
    if not saved:
        return "run a sweep first, or pass --output-dir where one ran"
    shown = ", ".join(f"{t} (run {r})" if r else t for t, r in saved[:MAX_LISTED])
    more = f" and {len(saved) - MAX_LISTED} more" if len(saved) > MAX_LISTED else ""
    return f"use a trial id or MLflow run id with a saved adapter: {shown}{more}"


def compare(adapters: list[tuple[str, Path]], prompt: str, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy answers to `prompt`, the base's first, then each adapter's, on one load of the base they were trained on
    (fingerprints checked, lora_search.registry). Raises ConfigError when the adapters' bases differ."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search.registry import check_base, check_safetensors, read_meta

    metas = [read_meta(d) for _, d in adapters]
    if len({m["base_fingerprint"] for m in metas}) > 1:
        problems = [
            Problem(label, m["base_name_or_path"], f"trained on {m['base_fingerprint']}")
            for (label, _), m in zip(adapters, metas, strict=True)
        ]
        header = "adapters trained on different bases (one base load serves one base): compare them separately"
        raise ConfigError(problems, header=header)
    for _, adapter_dir in adapters:
        check_safetensors(adapter_dir)
    base = BaseModel(metas[0]["base_name_or_path"], revision=metas[0]["base_revision"], dtype="auto")
    check_base(adapters[0][1], base)
    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path, revision=base.revision)
    model: Any = AutoModelForCausalLM.from_pretrained(
        base.name_or_path,
        revision=base.revision,
        dtype="auto",
        device_map="auto" if torch.cuda.is_available() else None,
    ).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

    answers = [("base", generate())]
    for i, (label, adapter_dir) in enumerate(adapters):
        name = f"a{i}"
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
        elif PeftConfig.from_pretrained(str(adapter_dir)).peft_type != model.active_peft_config.peft_type:
            # PEFT holds adapters of one type at once (VeRA beside LoRA is refused): unwrap, then wrap in the new one
            model = PeftModel.from_pretrained(model.unload(), str(adapter_dir), adapter_name=name)
        else:
            model.load_adapter(str(adapter_dir), adapter_name=name)
            model.set_adapter(name)
            model.delete_adapter(f"a{i - 1}")
        model.eval()
        answers.append((label, generate()))
    return answers


def table(answers: list[tuple[str, str]]) -> str:
    """One line per model: its label, then its answer as a JSON string (spaces and newlines visible)."""
    width = max(len(label) for label, _ in answers)
    return "\n".join(f"{label:<{width}}  {json.dumps(answer, ensure_ascii=False)}" for label, answer in answers)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.text { white-space: pre-wrap; max-width: 28em; }
td.ok { background: #e6f4ea; } td.bad { background: #fde2e2; } td.none { color: #999; }
.note { color: #555; font-size: 14px; }
"""

# Hide the rows that do not hold the filter's text, and, with the toggle on, the rows the adapters agree on.
FILTER_JS = """
const box = document.getElementById("filter"), only = document.getElementById("only-disagreements");
function apply() {
  const q = box.value.toLowerCase();
  let shown = 0;
  document.querySelectorAll("#answers tbody tr").forEach(tr => {
    tr.hidden = (only.checked && tr.dataset.disagree !== "1") || !tr.textContent.toLowerCase().includes(q);
    shown += !tr.hidden;
  });
  document.getElementById("shown").textContent = shown;
}
if (box) { box.addEventListener("input", apply); only.addEventListener("change", apply); apply(); }
"""
