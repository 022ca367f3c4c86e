"""The bad-input matrix: malformed sweeps, datasets and golden sets, each run as a user would (`lora-search run
SWEEP_FILE`). Every one must exit 2 with a message naming the field (or file:line) and the bad value, print no
traceback, and start nothing: Ray's start-up is replaced by a tripwire, so a case that slips past the checks fails
here instead of spending compute."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from lora_search import cli, sweep

REPO = Path(__file__).resolve().parents[1]
GOOD_ROW = {"instruction": "Name the mood.", "input": "the cat smiles", "output": "joy"}


def _rows(n: int = 40) -> list[str]:
    return [json.dumps({**GOOD_ROW, "input": f"the cat smiles {i}"}) for i in range(n)]


def _golden(tmp: Path, edit=None) -> str:
    """evals/ copied into `tmp`, its tiny_mood golden set edited by `edit(rows)`; returns the tasks dir."""
    shutil.copytree(REPO / "evals", tmp / "evals")
    golden = tmp / "evals" / "golden" / "tiny_mood.jsonl"
    rows = golden.read_text().splitlines()[:20]
    if edit == "task_yaml":  # an unclosed bracket in the task's YAML
        task = tmp / "evals" / "tasks" / "tiny_mood.yaml"
        task.write_text(task.read_text() + "\nextra: [unclosed\n")
    elif edit is not None:
        edit(rows)
    golden.write_bytes(_encoded(rows))
    return str(tmp / "evals" / "tasks")


def _encoded(rows: list[str]) -> bytes:
    """The rows as file bytes; a lone surrogate (\\udcXX) in a row becomes the raw byte XX, which is not UTF-8."""
    return ("\n".join(rows) + ("\n" if rows else "")).encode("utf-8", "surrogateescape")


def _set(rows: list[str], i: int, **changes: object) -> None:
    rows[i] = json.dumps({**json.loads(rows[i]), **changes})


# id -> (Sweep keyword arguments as source text, data edit, golden edit, what the message must say)
CASES: dict[str, tuple[str, object, object, tuple[str, ...]]] = {
    "name": ("name='my sweep!'", None, None, ("name", "'my sweep!'")),
    "base-missing": ("base=BaseModel('/nonexistent/model')", None, None, ("base.name_or_path", "/nonexistent/model")),
    "rank-zero": ("space=SearchSpace(ranks=(0,))", None, None, ("space.ranks", "0")),
    "rank-too-big": ("space=SearchSpace(ranks=(100000,))", None, None, ("100000",)),
    "target-preset": ("space=SearchSpace(targets=('attn',))", None, None, ("space.targets", "attn")),
    "target-module": ("space=SearchSpace(targets=(('q_prj',),))", None, None, ("space.targets", "q_prj")),
    "variant": ("space=SearchSpace(variants=('lorra',))", None, None, ("space.variants", "lorra")),
    "lr-order": ("space=SearchSpace(lr=(1e-3, 1e-4))", None, None, ("space.lr", "0 < low < high")),
    "lr-equal": ("space=SearchSpace(lr=(1e-3, 1e-3))", None, None, ("space.lr", "lr=(0.0001, 0.01), lr_grid_points=1")),
    "lr-zero": ("space=SearchSpace(lr=(0.0, 1e-3))", None, None, ("space.lr",)),
    "alpha-zero": ("space=SearchSpace(alpha=(0,))", None, None, ("space.alpha",)),
    "max-steps": ("budget=Budget(max_steps=0)", None, None, ("budget.max_steps", ">= 1")),
    "grace": ("budget=Budget(max_steps=20, grace_period=50)", None, None, ("budget.grace_period", "50")),
    "eval-every": ("budget=Budget(max_steps=20, grace_period=5, eval_every=40)", None, None, ("budget.eval_every",)),
    "batch": ("budget=Budget(batch_size=-2)", None, None, ("budget.batch_size", "-2")),
    "optimizer": ("budget=Budget(optimizer='adam9')", None, None, ("budget.optimizer", "adam9")),
    "workers": ("resources=Resources(workers=0)", None, None, ("resources.workers", "0")),
    "memory-limit": ("resources=Resources(memory_limit_gb=-1)", None, None, ("resources.memory_limit_gb", "-1")),
    "strategy": ("resources=Resources(strategy='zero9')", None, None, ("resources.strategy", "zero9")),
    "fsdp-cpu": ("resources=Resources(strategy='fsdp')", None, None, ("resources.strategy", "CUDA")),
    "pissa-sharded": (
        "space=SearchSpace(variants=('pissa',)), resources=Resources(gpus_per_worker=1, strategy='fsdp')",
        None,
        None,
        ("space.variants", "pissa", "strategy_by_variant"),
    ),
    "strategy-override-typo": (
        "resources=Resources(strategy_by_variant={'qlroa': 'ddp'})",
        None,
        None,
        ("resources.strategy_by_variant['qlroa']", "not a variant of this sweep"),
    ),
    "qlora-cpu": ("space=SearchSpace(variants=('qlora',))", None, None, ("space.variants", "qlora", "CUDA")),
    "search": ("search='bayes'", None, None, ("search", "bayes")),
    "num-samples": ("num_samples=0", None, None, ("num_samples", "0")),
    "tracking-down": ("tracking_uri='http://127.0.0.1:9'", None, None, ("tracking_uri", "127.0.0.1:9")),
    "data-missing": ("dataset=Dataset('/nonexistent/train.jsonl')", None, None, ("/nonexistent/train.jsonl",)),
    "data-truncated": ("", lambda rows: rows.__setitem__(2, rows[2][:25]), None, ("train.jsonl:3",)),
    "data-no-output": ("", lambda rows: _set(rows, 4, output=None), None, ("train.jsonl:5",)),
    "data-not-object": ("", lambda rows: rows.__setitem__(6, "[1, 2, 3]"), None, ("train.jsonl:7",)),
    "data-mixed-formats": (
        "",
        lambda rows: rows.__setitem__(3, json.dumps({"prompt": "Name the mood: joy", "completion": "joy"})),
        None,
        ("train.jsonl:4", "one format per file"),
    ),
    "data-column-type-changes": (
        "",
        lambda rows: (_set(rows, 6, source="web"), _set(rows, 7, source=7)),
        None,
        ("train.jsonl:8", "'source' is a number here but a string on line 7"),
    ),
    "golden-column-type-changes": (
        "evals=Evals(tasks=('tiny_mood',), objective='tiny_mood/acc', tasks_dir=TASKS)",
        None,
        lambda rows: _set(rows, 4, id=5),
        ("tiny_mood.jsonl:5", "'id' is a number here but a string on line 1"),
    ),
    "data-empty": ("", lambda rows: rows.clear(), None, ("train.jsonl",)),
    "max-length": ("dataset=Dataset(DATA, max_length=0)", None, None, ("dataset.max_length", "0")),
    "golden-objective": (
        "evals=Evals(tasks=('tiny_mood',), objective='tiny_mood/f9', tasks_dir=TASKS)",
        None,
        lambda rows: None,
        ("evals.objective", "tiny_mood/f9"),
    ),
    "golden-task": (
        "evals=Evals(tasks=('tiny_nope',), objective='tiny_nope/acc', tasks_dir=TASKS)",
        None,
        lambda rows: None,
        ("tiny_nope",),
    ),
    "golden-row": (
        "evals=Evals(tasks=('tiny_mood',), objective='tiny_mood/acc', tasks_dir=TASKS)",
        None,
        lambda rows: _set(rows, 1, label=9),
        ("tiny_mood.jsonl:2", "9"),
    ),
    # The classes of mistake beyond the cases above: a wrong type or a value outside its range for any field (checked
    # from the annotations, `lora_search.checks`), a file that is not UTF-8 or does not parse, data that the trial's
    # tokenizer and max_length leave nothing to train on, and a sweep file that does not run.
    "dtype-typo": ("base=BaseModel(BASE, dtype='bfloat61')", None, None, ("base.dtype", "bfloat61", "'bfloat16'")),
    "num-samples-string": ("num_samples='10'", None, None, ("num_samples", "'10'", "drop the quotes")),
    "ranks-list": ("space=SearchSpace(ranks=[8, 16])", None, None, ("space.ranks", "(8, 16)")),
    "lr-nan": ("space=SearchSpace(lr=(1e-4, float('nan')))", None, None, ("space.lr[1]", "finite")),
    "targets-empty": ("space=SearchSpace(targets=((),))", None, None, ("space.targets[0]", "empty")),
    "seed-negative": ("seed=-1", None, None, ("seed", "-1")),
    "gpus-fraction": ("resources=Resources(gpus_per_worker=1.5)", None, None, ("resources.gpus_per_worker", "1.5")),
    "price-nan": ("pricing=Pricing(cpu_core_hour=float('nan'))", None, None, ("pricing.cpu_core_hour", "finite")),
    "base-as-string": ("base=BASE", None, None, ("base", "BaseModel(")),
    "evals-tasks-string": (
        "evals=Evals(tasks='tiny_mood', objective='tiny_mood/acc', tasks_dir=TASKS)",
        None,
        lambda rows: None,
        ("evals.tasks", "('tiny_mood',)"),
    ),
    "data-not-utf8": (
        "",
        lambda rows: rows.__setitem__(5, rows[5][:30] + "\udce9" + rows[5][30:]),
        None,
        (
            "train.jsonl:6",
            "not UTF-8",
        ),
    ),
    "max-length-cuts-answers": (
        "dataset=Dataset(DATA, max_length=8)",
        None,
        None,
        ("dataset.max_length = 8", "36 of 36 rows", "so 0 row(s) train", "max_length >="),
    ),
    "max-length-over-context": (
        "dataset=Dataset(DATA, max_length=100000)",
        None,
        None,
        ("dataset.max_length = 100000", "max_position_embeddings = 1024", "max_length <= 1024"),
    ),
    "cpus-beyond-machine": (
        "resources=Resources(workers=64, cpus_per_worker=4)",
        None,
        None,
        ("resources", "256 CPUs", "no trial would ever start"),
    ),
    "pack-host-beyond-machine": (  # the host's CPUs fit, but not beside its trials' own: it would never start
        "resources=Resources(cpus_per_worker=__import__('os').cpu_count(), pack=4)",
        None,
        None,
        ("resources", "with pack=4", "would never start", "cpus_per_worker to at most"),
    ),
    "output-dir-is-a-file": ("output_dir=DATA", None, None, ("output_dir", "is a file")),
    "sweep-file-syntax": ("num_samples=)", None, None, ("sweep_file.py:4", "SyntaxError")),
    "sweep-file-keyword": ("nmae='x'", None, None, ("sweep_file.py:4", "unexpected keyword argument 'nmae'")),
    "golden-not-utf8": (
        "evals=Evals(tasks=('tiny_mood',), objective='tiny_mood/acc', tasks_dir=TASKS)",
        None,
        lambda rows: rows.__setitem__(2, rows[2][:10] + "\udcff" + rows[2][10:]),
        ("tiny_mood.jsonl:3", "not UTF-8"),
    ),
    "task-yaml-broken": (
        "evals=Evals(tasks=('tiny_mood',), objective='tiny_mood/acc', tasks_dir=TASKS)",
        None,
        "task_yaml",
        ("tiny_mood.yaml:", "invalid YAML"),
    ),
    "golden-duplicate-id": (
        "evals=Evals(tasks=('tiny_mood',), objective='tiny_mood/acc', tasks_dir=TASKS)",
        None,
        lambda rows: rows.__setitem__(3, rows[0]),
        ("tiny_mood.jsonl:4", "duplicate id"),
    ),
}


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*_a: object, **_k: object) -> None:
        raise AssertionError("a bad input got past the checks: Ray was about to start")

    monkeypatch.setattr(sweep, "_init_ray", started)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_compute(
    case: str, tiny_model_dir: Path, tmp_path: Path, tripwire: None, capsys: pytest.CaptureFixture[str]
) -> None:
    kwargs, data_edit, golden_edit, says = CASES[case]
    rows = _rows()
    if callable(data_edit):
        data_edit(rows)
    data = tmp_path / "train.jsonl"
    data.write_bytes(_encoded(rows))
    tasks = _golden(tmp_path, golden_edit) if golden_edit is not None else ""
    sweep_file = tmp_path / "sweep_file.py"
    fields = {"name": "'bad'", "base": "BaseModel(BASE)", "dataset": "Dataset(DATA)", "output_dir": "OUT"}
    defaults = ", ".join(f"{k}={v}" for k, v in fields.items() if f"{k}=" not in kwargs)
    sweep_file.write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Budget, Dataset, Evals, Pricing, Resources, SearchSpace, Sweep, main
        BASE, DATA, TASKS, OUT = {str(tiny_model_dir)!r}, {str(data)!r}, {tasks!r}, {str(tmp_path / "out")!r}
        SWEEP = Sweep({", ".join(p for p in (defaults, kwargs) if p)})
        if __name__ == "__main__":
            main(SWEEP)
        """)
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(sweep_file)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert exit_info.value.code == 2, text
    assert "Traceback" not in text, text
    for fragment in says:
        assert fragment in text, f"{case}: {fragment!r} not in:\n{text}"
    assert not (tmp_path / "out" / "bad" / "ray").exists()  # no Tune experiment was created


def test_the_matrix_is_big_enough() -> None:
    assert len(CASES) >= 50


def test_a_sweep_script_run_with_python_exits_2_without_a_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`python sweeps/x.py`, the launch path of `ray job submit`: the Sweep is built at the script's top level, before
    `main(SWEEP)` runs, and its problems still come out in the one-message, exit-2 form."""
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(_rows()) + "\n")
    script = tmp_path / "mine.py"
    script.write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Dataset, Sweep, main
        SWEEP = Sweep(name="mine", base=BaseModel({str(tiny_model_dir)!r}, dtype="bfloat61"),
                      dataset=Dataset({str(data)!r}), num_samples="10", output_dir={str(tmp_path / "out")!r})
        if __name__ == "__main__":
            main(SWEEP)
        """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text, text
    assert "base.dtype = 'bfloat61'" in text and "num_samples = '10'" in text, text
    assert not (tmp_path / "out" / "mine" / "ray").exists()


@pytest.mark.parametrize("tolerance", ["-0.1", "30%", "nan"])
def test_nightly_options_are_refused_with_the_sweeps_own_problems(
    tolerance: str, tiny_model_dir: Path, tmp_path: Path, tripwire: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lora-search nightly` with a bad --timing-tolerance, a baseline file that is not a summary and a bad sweep
    field: all three in one exit-2 message, before Ray starts."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(_rows()) + "\n")
    baseline = tmp_path / "baseline.json"
    baseline.write_text('{"sweep": "nightly"}')
    sweep_file = tmp_path / "nightly_file.py"
    sweep_file.write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Dataset, Sweep
        SWEEP = Sweep(name="bad", base=BaseModel({str(tiny_model_dir)!r}), dataset=Dataset({str(data)!r}),
                      num_samples=0, output_dir={str(tmp_path / "out")!r})
        """)
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nightly", str(sweep_file), "--baseline", str(baseline), "--timing-tolerance", tolerance])
    out = capsys.readouterr()
    text = out.out + out.err
    assert exit_info.value.code == 2 and "Traceback" not in text, text
    assert f"--timing-tolerance = '{tolerance}'" in text and "e.g. 0.3" in text, text
    assert "is not a nightly summary" in text and "num_samples = 0" in text, text
    assert not (tmp_path / "out" / "bad" / "ray").exists()
