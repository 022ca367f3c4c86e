"""Golden-set scoring of adapters with lm-evaluation-harness.

Golden sets are lm-eval tasks: YAML under `evals/tasks/`, data under `evals/golden/`. Relative `data_files`
in a task YAML are relative to the project root (the folder holding `evals/`), as when running the lm-eval
CLI from there: `lm_eval --include_path evals/tasks --tasks tiny_mood ...`.

    lora-search eval sweeps/tiny.py                      # rescore every saved adapter of the sweep
    lora-search eval sweeps/tiny.py --adapters DIR [DIR] # or these adapter dirs, on the sweep's base

Scores come from `lm_eval.simple_evaluate` over an in-memory `HFLM`: a trial scores its live PEFT model
(no reload), and rescoring loads the base once and swaps adapters. Before any score, `check_applied` makes
sure the adapter changes the model's outputs: a zero or wrongly loaded adapter never produces a score.

lm-eval's per-row samples are kept, trimmed to what a reader compares (`golden_samples`): the results JSON written
beside each trial's adapter (`lm_eval_results.json`) and the base's (`base_lm_eval_results.json`) carry them under
`SAMPLES_KEY`, one row per golden row scored: prompt, reference, the model's answer (the filtered response; for a
multiple-choice task the choice it ranked first), the row's metrics and whether it was right. lora_search.answers shows
them side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_search.config import ConfigError, Evals, Problem
from lora_search.data import consistency_problem, jsonl_lines, parse_line
from lora_search.gguf import resolve
from lora_search.layout import default_cache_dir
from lora_search.userfiles import load_yaml

if TYPE_CHECKING:
    import torch

SAMPLES_KEY = "golden_samples"
"""The key of the kept samples in a results JSON; older sweeps' results have none."""
APPLIED_ATOL = 1e-6
"""Max |logit difference| between adapter on and off below which the adapter counts as not applied."""


class AdapterNotAppliedError(RuntimeError):
    """The adapter leaves the model's outputs unchanged (all-zero, or loaded onto nothing)."""


def project_root(evals: Evals) -> Path:
    return Path(evals.tasks_dir).resolve().parent.parent


def task_configs(evals: Evals) -> list[dict[str, Any]]:
    """The named tasks' YAML configs with relative data files made absolute (workers may run anywhere)."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    unreadable: list[Problem] = []
    for path in sorted(Path(evals.tasks_dir).glob("*.yaml")):
        try:
            config = load_yaml(path)
        except ConfigError as e:  # reported only if a task the sweep names may be in it
            unreadable.extend(e.problems)
            continue
        if isinstance(config, dict) and "task" in config:
            found[str(config["task"])] = (path, config)
    missing = [t for t in evals.tasks if t not in found]
    if missing:
        fix = f"add the task YAML under {evals.tasks_dir}" + (", or fix the unreadable one(s) below" * bool(unreadable))
        problem = Problem("evals.tasks", missing, f"no task YAML in {evals.tasks_dir} defines them", fix)
        raise ConfigError([problem, *unreadable], header="golden sets not found")
    root = project_root(evals)
    out, malformed = [], []
    for name in evals.tasks:
        path, config = found[name][0], copy.deepcopy(found[name][1])
        kwargs = config.get("dataset_kwargs", {})
        files = kwargs.get("data_files", {}) if isinstance(kwargs, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            fix = "e.g. dataset_kwargs: {data_files: {test: evals/golden/NAME.jsonl}}"
            malformed.append(Problem(str(path), None, "dataset_kwargs.data_files must map split names to paths", fix))
            continue
        for split, value in list(files.items()):
            files[split] = str(root / value) if not Path(value).is_absolute() else value
        out.append(config)
    if malformed:
        raise ConfigError(malformed, header="golden sets not readable")
    return out


def task_versions(evals: Evals) -> dict[str, Any]:
    return {c["task"]: c.get("metadata", {}).get("version") for c in task_configs(evals)}


def check_applied(model: Any, input_ids: torch.Tensor) -> float:
    """Max |logits(adapter on) - logits(adapter off)| on a probe batch; raises AdapterNotAppliedError if ~0."""
    import torch

    was_training = model.training
    model.eval()
    ids = input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        on = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            off = model(input_ids=ids).logits.float()
    model.train(was_training)
    diff = float((on - off).abs().max())
    if not diff > APPLIED_ATOL:
        raise AdapterNotAppliedError(
            f"the adapter does not change the model's outputs (max |logit diff| = {diff:.2e} on the probe batch): "
            "it is all-zero or was not loaded onto the model's layers; refusing to score it as if it were trained"
        )
    return diff


def score(model: Any, tokenizer: Any, evals: Evals, seed: int, autocast_bf16: bool = False) -> dict[str, Any] | None:
    """Score an in-memory model on the golden sets. Returns flat metrics (`task/metric`, `task/metric_stderr`),
    the objective's value and direction, and lm-eval's own results JSON (`results`).

    Every rank of a sharded model runs it in step (each forward needs every rank's shard); lm-eval hands the results
    to the process with LOCAL_RANK 0 only, and None to the others."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lora_search.strategies import deepspeed_when_used

    deepspeed_when_used()  # HFLM unwraps the model through Accelerate too

    # `autocast_bf16`: a trial that trains under bf16 autocast is scored under it (`fastpath.autocast`). lm-eval
    # wraps its own forwards in `torch.autocast(enabled=mixed_precision_dtype is not None)`, which turns an outer
    # autocast off, so it is asked for here.
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=evals.batch_size,
        mixed_precision_dtype="bfloat16" if autocast_bf16 else None,
    )
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_configs(evals),
        task_manager=TaskManager(include_defaults=False),
        limit=evals.limit,
        log_samples=True,  # the rows already scored: keeping them costs ~0.3 kB a row, no compute
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    return None if output is None else flatten(output, evals)


def flatten(output: dict[str, Any], evals: Evals) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or "," not in key:  # "acc,none"; skips sample_len, alias
                continue
            metric, _, filter_name = key.partition(",")
            metrics[f"{task}/{metric}"] = float(value)
    task, _, metric = evals.objective.partition("/")
    higher = output.get("higher_is_better", {}).get(task, {}).get(metric, True)
    objective = metrics.get(evals.objective, math.nan)
    results = json.loads(json.dumps({k: v for k, v in output.items() if k != "samples"}, default=str))
    results[SAMPLES_KEY] = golden_samples(output)
    return {"metrics": metrics, "objective": objective, "higher_is_better": bool(higher), "results": results}


def golden_samples(output: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's logged samples (`simple_evaluate(log_samples=True)`), one JSON-safe row per scored golden row:
    `task`, `doc_id`, `id` (the row's own, if any), `filter`, `prompt`, `reference`, `answer`, `metrics` and `correct`
    (None unless the row's first metric is 0 or 1, as acc and exact_match are)."""
    rows = []
    for task, samples in (output.get("samples") or {}).items():
        kind = output.get("configs", {}).get(task, {}).get("output_type")
        directions = output.get("higher_is_better", {}).get(task, {})
        for s in samples:
            args = [a if isinstance(a, (list, tuple)) else (a,) for a in s["arguments"]]
            answer, reference = _answer(kind, args, s["filtered_resps"], s["target"])
            metrics = {m: s.get(m) for m in s.get("metrics", [])}
            first = next(iter(metrics), "")
            value = metrics.get(first)
            binary = isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1)
            doc = s.get("doc")
            rows.append(
                {
                    "task": task,
                    "doc_id": s.get("doc_id"),
                    "id": doc.get("id") if isinstance(doc, dict) else None,
                    "filter": s.get("filter"),
                    "prompt": str(args[0][0]) if args else "",
                    "reference": reference,
                    "answer": answer,
                    "metrics": metrics,
                    "correct": bool(value == int(directions.get(first, True))) if binary else None,
                }
            )
    return json.loads(json.dumps(rows, default=str))


def _answer(kind: str | None, args: list[Any], responses: list[Any], target: Any) -> tuple[str, str]:
    """(the model's answer, the reference) of one sample. Multiple choice: the choice with the highest loglikelihood
    (what `acc` scores) and the target's choice text; otherwise the first filtered response and the target."""
    if kind != "multiple_choice":
        first = responses[0] if responses else ""
        return str(first[0] if isinstance(first, (list, tuple)) and first else first), str(target)
    choices = [str(a[1]).strip() for a in args]  # (context, continuation) per choice
    scores = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in responses]
    answer = choices[max(range(len(scores)), key=scores.__getitem__)] if scores else ""
    picked = target if isinstance(target, list) else [target]
    index = [int(t) if isinstance(t, numbers.Integral) and 0 <= int(t) < len(choices) else None for t in picked]
    return answer, " | ".join(choices[i] if i is not None else str(t) for i, t in zip(index, picked, strict=True))


def score_base(sweep: Any) -> dict[str, Any]:
    """The base model's golden scores: the reference every adapter's gain is shown against (once per sweep)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert sweep.evals is not None
    base = resolve(sweep.base)  # a GGUF base: its converted dir
    tokenizer = AutoTokenizer.from_pretrained(
        base.name_or_path, revision=base.revision, trust_remote_code=base.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        base.name_or_path,
        revision=base.revision,
        trust_remote_code=base.trust_remote_code,
        dtype="auto" if base.dtype == "auto" else getattr(torch, base.dtype),
        device_map="auto" if torch.cuda.is_available() else None,
    )
    return score(model, tokenizer, sweep.evals, sweep.seed)


BASE_SCORES_DIR = "base_scores"
"""Under `$LORA_SEARCH_CACHE`: one JSON file per way of scoring a base (`BaseScoresCache`)."""
SCORED_WITH = ("torch", "transformers", "tokenizers", "accelerate", "lm_eval")
"""The libraries whose versions are part of a base score's key: a new version may score differently."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_digest() -> str:
    """One digest of lora_search's own sources: a change to how anything is loaded or scored misses the cache."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def base_scores_key(sweep: Any, fingerprint: str, device: str) -> dict[str, Any]:
    """Everything the base's golden scores depend on (the key of `BaseScoresCache`): the base's weights
    (`registry.fingerprint`), dtype and code switch; each golden task's YAML, its data files by digest and the code
    files beside the YAMLs; limit, batch size and seed; the kind of device (`device`: "cpu", or the cluster's
    accelerator types); the scoring libraries' versions and lora_search's own sources."""
    from importlib.metadata import PackageNotFoundError, version

    evals = sweep.evals
    configs = task_configs(evals)
    for config in configs:  # data files by content: the same golden set anywhere, a changed row misses
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: _sha256(Path(f)) for split, f in files.items()}
    versions = {}
    for name in SCORED_WITH:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return json.loads(
        json.dumps(
            {
                "base": fingerprint,
                "dtype": sweep.base.dtype,
                "trust_remote_code": sweep.base.trust_remote_code,
                "tasks": configs,
                "task_code": {p.name: _sha256(p) for p in sorted(Path(evals.tasks_dir).glob("*.py"))},
                "limit": evals.limit,
                "batch_size": evals.batch_size,
                "seed": sweep.seed,
                "device": device,
                "versions": versions,
                "lora_search": _source_digest(),
            },
            sort_keys=True,
            default=str,
        )
    )


@dataclasses.dataclass(frozen=True)
class BaseScoresCache:
    """The base's golden scores kept from the sweep that computed them, for the next sweep that would compute the
    same (`Evals.reuse_base_scores`). Our own: lm-eval's `use_cache` keeps each request's answer, but the base would
    still be loaded and every task built in a worker of its own; here a hit costs one file read. The whole key is
    stored and compared on read, so neither a digest collision nor an edited file passes for another key."""

    key: dict[str, Any]
    root: Path

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        return self.root / BASE_SCORES_DIR / f"{digest[:32]}.json"

    def read(self) -> dict[str, Any] | None:
        """The kept scores (with `reused_from`: when and by which sweep they were computed), or None."""
        try:
            entry = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != self.key or not isinstance(entry.get("scores"), dict):
            return None
        return {**entry["scores"], "reused_from": {k: entry.get(k) for k in ("sweep", "scored_at", "path")}}

    def write(self, scores: dict[str, Any], sweep_name: str) -> None:
        """Keep `scores` (written whole, then renamed: a reader never sees half a file)."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "sweep": sweep_name,
            "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "path": str(path),
            "key": self.key,
            "scores": {k: v for k, v in scores.items() if k != "reused_from"},
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)


def base_scores_cache(sweep: Any, fingerprint: str, device: str, root: Path | None = None) -> BaseScoresCache:
    return BaseScoresCache(base_scores_key(sweep, fingerprint, device), root or default_cache_dir())


def _probe_ids(adapter_dir: Path, tokenizer: Any) -> torch.Tensor:
    from lora_search.probe import PROBE_FILE

    probe = adapter_dir / PROBE_FILE
    if probe.is_file():
        from safetensors.torch import load_file

        return load_file(str(probe))["input_ids_0"][None]
    return tokenizer("A probe sentence to see whether the adapter changes anything.", return_tensors="pt")["input_ids"]


def rescore(
    sweep: Any, adapter_dirs: list[Path], *, log: Any = print, allow_pickle: bool = False
) -> list[dict[str, Any]]:
    """Score saved adapters on the sweep's golden sets with one base load: PEFT load_adapter / set_adapter /
    delete_adapter swap them on the same in-memory base. Returns one dict per adapter (metrics, objective, seconds).
    Raises ConfigError, before the base loads, naming every adapter whose weights are a pickle (adapter_model.bin)
    unless `allow_pickle`.
    """
    import time

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_search.registry import check_safetensors

    assert sweep.evals is not None
    refused = []
    for adapter_dir in adapter_dirs:
        try:
            check_safetensors(Path(adapter_dir), allow_pickle=allow_pickle)
        except ConfigError as e:
            refused.extend(e.problems)
    if refused:
        raise ConfigError(refused, header="pickle adapter refused")
    base = resolve(sweep.base)  # a GGUF base: its converted dir, the base its adapters were trained on
    tokenizer = AutoTokenizer.from_pretrained(
        base.name_or_path, revision=base.revision, trust_remote_code=base.trust_remote_code
    )
    model: Any = AutoModelForCausalLM.from_pretrained(
        base.name_or_path,
        revision=base.revision,
        trust_remote_code=base.trust_remote_code,
        dtype="auto" if base.dtype == "auto" else getattr(torch, base.dtype),
    )
    out = []
    previous = None
    for i, adapter_dir in enumerate(adapter_dirs):
        start = time.perf_counter()
        name = f"a{i}"
        if previous is None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
        else:
            model.load_adapter(str(adapter_dir), adapter_name=name)
        model.set_adapter(name)
        if previous is not None:
            model.delete_adapter(previous)
        previous = name
        check_applied(model, _probe_ids(Path(adapter_dir), tokenizer))
        scored = score(model, tokenizer, sweep.evals, sweep.seed)
        row = {
            "adapter": str(adapter_dir),
            "objective": scored["objective"],
            **scored["metrics"],
            "seconds": time.perf_counter() - start,
        }
        log(f"{adapter_dir}: {sweep.evals.objective} = {scored['objective']:.4f} ({row['seconds']:.1f}s)")
        out.append(row)
    return out


_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)")


def _fields(config: dict[str, Any]) -> set[str]:
    """Document fields the task's templates read: `{{x}}` in doc_to_*, or a bare field name as doc_to_target."""
    fields: set[str] = set()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = config.get(key)
        if isinstance(value, str):
            found = _FIELD.findall(value)
            fields.update(found if found else ([value] if key != "doc_to_choice" and value.isidentifier() else []))
    return fields


def check(evals: Evals) -> list[Problem]:
    """Problems with the golden sets, before any trial runs: task YAMLs, data files line by line, and whether
    lm-eval itself accepts each task."""
    from lora_search.data import MAX_REPORTED_PER_FILE

    if not Path(evals.tasks_dir).is_dir():
        fix = "run from the project root, or give the folder of your task YAMLs"
        return [Problem("evals.tasks_dir", evals.tasks_dir, "is not a directory", fix)]
    try:
        configs = task_configs(evals)
    except ConfigError as e:
        return e.problems
    problems: list[Problem] = list(_objective_problems(evals, configs))
    for config in configs:
        task = config["task"]
        needed = _fields(config)
        for location in config.get("dataset_kwargs", {}).get("data_files", {}).values():
            path = Path(location)
            if not path.is_file():
                problems.append(
                    Problem(
                        f"evals task {task}",
                        str(path),
                        "golden data file not found",
                        "fix data_files in the task YAML (relative to the project root)",
                    )
                )
                continue
            problems.extend(_check_golden_file(path, needed, config, MAX_REPORTED_PER_FILE))
    if not problems:
        problems.extend(_lm_eval_accepts(configs))
    return problems


DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
"""What lm-eval scores a task by when its YAML has no metric_list."""


def _objective_problems(evals: Evals, configs: list[dict[str, Any]]) -> list[Problem]:
    """The objective's metric must be one its task computes: a typo would otherwise show only after every trial, as
    a missing score."""
    task, _, metric = evals.objective.partition("/")
    config = next((c for c in configs if c.get("task") == task), None)
    if config is None or not metric:
        return []  # Evals.problems has reported it
    listed = tuple(m["metric"] for m in config.get("metric_list", []) if isinstance(m, dict) and "metric" in m)
    known = listed or DEFAULT_METRICS.get(str(config.get("output_type")), ())
    if not known or metric in known:
        return []
    return [
        Problem(
            "evals.objective",
            evals.objective,
            f"task {task!r} computes {', '.join(known)}, not {metric!r}",
            f"use one of {', '.join(f'{task}/{m}' for m in known)}, or add {metric!r} to its metric_list",
        )
    ]


def _check_golden_file(path: Path, needed: set[str], config: dict[str, Any], cap: int) -> list[Problem]:
    problems: list[Problem] = []
    ids: dict[str, int] = {}
    kinds: dict[str, tuple[str, int]] = {}
    rows = 0
    choice_field = next(iter(_FIELD.findall(str(config.get("doc_to_choice", "")))), None)
    target = config.get("doc_to_target")
    for lineno, line, unreadable in jsonl_lines(path):
        rows += 1
        where = f"{path}:{lineno}"
        row, why = (None, unreadable) if line is None else parse_line(line)
        if why:
            problems.append(Problem(where, None, why, "save the file as UTF-8" if unreadable else "fix the line"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(where, None, "expected a JSON object", "fix the line"))
            continue
        # lm-eval reads the file as one table, as training does
        mixed = consistency_problem(row, lineno, kinds, formats=False)
        if mixed:
            problems.append(Problem(where, None, mixed, "fix the line"))
        missing = sorted(needed - row.keys())
        if missing:
            problems.append(
                Problem(
                    where,
                    None,
                    f"missing field(s) {', '.join(missing)} used by the task",
                    "add them, or change the task YAML's templates",
                )
            )
        if "id" in row:
            key = json.dumps(row["id"], sort_keys=True)  # an id may be any JSON value, lists too
            if key in ids:
                problems.append(
                    Problem(
                        where,
                        row["id"],
                        f"duplicate id (first on line {ids[key]})",
                        "give every golden example its own id",
                    )
                )
            ids.setdefault(key, lineno)
        if choice_field and isinstance(target, str) and target.isidentifier() and target in row:
            choices, label = row.get(choice_field), row[target]
            if isinstance(choices, list) and (not isinstance(label, int) or not 0 <= label < len(choices)):
                problems.append(
                    Problem(
                        where,
                        label,
                        f"label out of range for {len(choices)} choices",
                        f"use an index in 0..{len(choices) - 1}",
                    )
                )
        if len(problems) >= cap:
            break
    if rows == 0:
        problems.append(Problem(str(path), None, "golden set is empty", "add examples, one JSON object per line"))
    return problems


def _lm_eval_accepts(configs: list[dict[str, Any]]) -> list[Problem]:
    """Let lm-eval build each task from its config (what `lm_eval --tasks` would do) and report its refusal."""
    from lm_eval.tasks import TaskManager, get_task_dict

    problems = []
    manager = TaskManager(include_defaults=False)
    for config in configs:
        try:
            get_task_dict([config], manager)
        except Exception as e:  # lm-eval raises many types for a bad task config
            problems.append(
                Problem(
                    f"evals task {config.get('task')}",
                    None,
                    f"lm-eval rejects the task YAML: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    "fix the task YAML (see lm-eval's task guide)",
                )
            )
    return problems
