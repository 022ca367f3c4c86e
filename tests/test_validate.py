"""Pre-flight validation: every problem of a sweep in one message, exit 2, before Ray starts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lora_search import cli
from lora_search.config import BaseModel, Budget, ConfigError, Dataset, SearchSpace, Sweep, collecting_problems
from lora_search.data import check_jsonl


def _broken_jsonl(path: Path) -> Path:
    rows = [
        json.dumps({"instruction": "Name the mood.", "input": "the cat joy", "output": "joy"}),
        json.dumps({"instruction": "Name the mood.", "input": "the dog fear", "output": "fear"}),
        '{"instruction": "Name the mood.", "input": "the bird calm", "output": ',  # line 3: cut off
        json.dumps({"instruction": "Name the mood.", "input": "the cat anger", "output": "anger"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_environment_switches_are_named_with_the_rest_before_any_compute(
    tiny_model_dir, tmp_path, capsys, monkeypatch
) -> None:
    """The LORA_SEARCH_* switches a sweep's workers read (lora_search.environment) are checked in the driver with the
    sweep's other problems: a bad value is not first met by a trial's first forward after its base has loaded."""
    import ray

    if ray.is_initialized():  # a Ray an earlier test of this worker process started: not validate's to judge
        ray.shutdown()
    monkeypatch.setenv("LORA_SEARCH_LORA_ONE_NODE", "yes")
    monkeypatch.setenv("LORA_SEARCH_LORA_GROUPS", "on")
    monkeypatch.setenv("LORA_SEARCH_PROFILE_TRACE", "true")
    monkeypatch.setenv("LORA_SEARCH_PACK_IDLE_S", "-5")
    monkeypatch.setenv("LORA_SEARCH_LOADER_WORKERS", "two")
    monkeypatch.setenv("LORA_SEARCH_PACK_GRAPHS", "on")
    sweep_file = tmp_path / "env_sweep.py"
    sweep_file.write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Dataset, SearchSpace, Sweep
        SWEEP = Sweep(
            name="env",
            base=BaseModel({str(tiny_model_dir)!r}),
            dataset=Dataset({str(_broken_jsonl(tmp_path / "train.jsonl"))!r}),
            space=SearchSpace(ranks=(4,), lr=(1e-3, 1e-5)),
        )
    """)
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", str(sweep_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in (
        "environment LORA_SEARCH_LORA_ONE_NODE = 'yes': lora_search.fused_lora cannot read it. Fix: "
        "LORA_SEARCH_LORA_ONE_NODE='yes': give 1 (one autograd node, the default) or 0 (autograd's graph)",
        "environment LORA_SEARCH_LORA_GROUPS = 'on': lora_search.fused_lora cannot read it. Fix: ",
        "environment LORA_SEARCH_PROFILE_TRACE = 'true': lora_search.callbacks cannot read it. Fix: ",
        "environment LORA_SEARCH_PACK_IDLE_S = '-5': lora_search.pack_host cannot read it. Fix: "
        "LORA_SEARCH_PACK_IDLE_S='-5': give seconds >= 0, e.g. LORA_SEARCH_PACK_IDLE_S=15",
        "environment LORA_SEARCH_LOADER_WORKERS = 'two': lora_search.train cannot read it. Fix: "
        "LORA_SEARCH_LOADER_WORKERS='two': give auto (one loader process on a GPU, none on a CPU, the default) or a "
        "count of processes, e.g. LORA_SEARCH_LOADER_WORKERS=1",
        "environment LORA_SEARCH_PACK_GRAPHS = 'on': lora_search.pack_host cannot read it. Fix: "
        "LORA_SEARCH_PACK_GRAPHS='on': give 1 (a GPU pack's steps captured as CUDA graphs, the default) or 0",
        "space.lr = (0.001, 1e-05): need 0 < low < high",  # and the sweep's own problems, in the same report
        "train.jsonl:3: invalid JSON",
    ):
        assert text in err, f"missing {text!r} in:\n{err}"
    assert not ray.is_initialized()
    from lora_search import environment

    monkeypatch.setenv("LORA_SEARCH_LORA_ONE_NODE", "0")
    monkeypatch.setenv("LORA_SEARCH_LORA_GROUPS", "0")
    monkeypatch.setenv("LORA_SEARCH_PROFILE_TRACE", "1")
    monkeypatch.setenv("LORA_SEARCH_PACK_IDLE_S", "2.5")
    monkeypatch.setenv("LORA_SEARCH_LOADER_WORKERS", "2")
    monkeypatch.setenv("LORA_SEARCH_PACK_GRAPHS", "0")
    assert environment.problems() == []
    assert [environment.value(n) for n in environment.VARIABLES] == [False, False, True, 2.5, False, 2]
    monkeypatch.setenv("LORA_SEARCH_LOADER_WORKERS", "auto")
    assert environment.value(environment.LOADER_WORKERS) is None  # the trial decides: 1 on a GPU, 0 on a CPU


def test_validate_names_all_seven_problems_and_starts_no_ray(tiny_model_dir, tmp_path, capsys) -> None:
    import ray

    if ray.is_initialized():  # a Ray an earlier test of this worker process started: not validate's to judge
        ray.shutdown()
    data = _broken_jsonl(tmp_path / "train.jsonl")
    sweep_file = tmp_path / "bad_sweep.py"
    sweep_file.write_text(
        textwrap.dedent(f"""
        from lora_search import BaseModel, Dataset, SearchSpace, Sweep
        SWEEP = Sweep(
            name="bad",
            base=BaseModel({str(tiny_model_dir)!r}),
            dataset=Dataset({str(data)!r}),
            space=SearchSpace(
                ranks=(4, 10000),
                alpha=(0,),
                targets=(("q_prj",), ("q_proj", "v_projj")),
                variants=("lora", "qlora"),
                lr=(1e-3, 1e-5),
            ),
        )
    """)
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", str(sweep_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = [
        "space.targets[0] = ('q_prj',): module(s) q_prj not in the model",  # misspelled module
        "v_projj not in the model (PEFT would silently train only the rest)",  # partly wrong list
        "space.ranks = 10000: exceeds min(in, out) = 64",  # rank too large
        "space.alpha[0] = 0: must be > 0",  # alpha 0
        "space.lr = (0.001, 1e-05): need 0 < low < high",  # reversed lr range
        f"{data}:3: invalid JSON",  # broken JSONL line 3
        "space.variants = 'qlora': 4-bit NF4 variants run on CUDA GPUs only",  # qlora on CPU
    ]
    for text in expected:
        assert text in err, f"missing {text!r} in:\n{err}"
    assert "problem(s)" in err.splitlines()[0]
    import ray

    assert not ray.is_initialized()


def test_valid_sweep_passes(tiny_model_dir, tiny_jsonl, tmp_path, capsys) -> None:
    sweep_file = tmp_path / "ok_sweep.py"
    sweep_file.write_text(
        "from lora_search import BaseModel, Dataset, SearchSpace, Sweep\n"
        f"SWEEP = Sweep(name='ok', base=BaseModel({str(tiny_model_dir)!r}), dataset=Dataset({str(tiny_jsonl)!r}),\n"
        "              space=SearchSpace(ranks=(4,), targets=('attention', 'mlp'), variants=('lora', 'dora')))\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", str(sweep_file)])
    assert exit_info.value.code == 0
    assert "is valid" in capsys.readouterr().out


def test_construction_reports_every_static_problem_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        Sweep(
            name="bad name!",
            base=BaseModel("x"),
            dataset=Dataset("x.jsonl", eval_fraction=1.5),
            space=SearchSpace(variants=("dorra",), targets=("attn",), dropout=(1.0,)),
            budget=Budget(max_steps=10, grace_period=20, eval_every=30),
        )
    fields = {p.field.split("[")[0] for p in e.value.problems}  # a tuple item is named by its index: space.dropout[0]
    assert {
        "name",
        "dataset.eval_fraction",
        "space.variants",
        "space.targets",
        "space.dropout",
        "budget.grace_period",
        "budget.eval_every",
    } <= fields
    message = str(e.value)
    assert "unknown variant; known: lora, rslora, dora" in message
    assert "add a row to VARIANTS in lora_search/variants.py" in message


def test_collecting_problems_builds_the_sweep_anyway() -> None:
    with collecting_problems() as problems:
        sweep = Sweep(name="s", base=BaseModel("x"), dataset=Dataset("x.jsonl"), space=SearchSpace(lr=(1.0, 0.1)))
    assert sweep.name == "s"
    assert [p.field for p in problems] == ["space.lr"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"instruction": "x"}', "missing or empty string field 'output'"),
        ('{"instruction": "x", "output": ""}', "missing or empty string field 'output'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be from the assistant"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role = 'robot'"),
        ('{"text": "hello"}', "unknown row format"),
    ],
)
def test_bad_jsonl_rows_are_reported_with_file_and_line(tmp_path, line: str, message: str) -> None:
    good = json.dumps({"instruction": "Name the mood.", "output": "joy"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    problems = check_jsonl(path)
    assert len(problems) == 1
    assert problems[0].field == f"{path}:2"
    assert message in problems[0].message


def test_missing_and_empty_data_files(tmp_path) -> None:
    assert "file not found" in check_jsonl(tmp_path / "nope.jsonl")[0].message
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "has no rows" in check_jsonl(tmp_path / "empty.jsonl")[0].message


def test_chat_rows_are_accepted(tmp_path) -> None:
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "mood of 'the cat joy'?"}, {"role": "assistant", "content": "joy"}]}
    path.write_text(json.dumps(row) + "\n")
    assert check_jsonl(path) == []


def test_unreachable_tracking_server_is_reported_before_any_compute(tiny_model_dir, tiny_jsonl, tmp_path) -> None:
    import socket

    from lora_search.preflight import validate

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sweep = Sweep(
        name="t",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset(str(tiny_jsonl)),
        output_dir=str(tmp_path),
        tracking_uri=f"http://127.0.0.1:{port}",
    )
    with pytest.raises(ConfigError) as e:
        validate(sweep)
    assert [p.field for p in e.value.problems] == ["tracking_uri"]
    assert f"tracking_uri = 'http://127.0.0.1:{port}': the MLflow tracking server cannot be reached" in str(e.value)
    bad_scheme = sweep.replace(tracking_uri="ftp://somewhere")
    with pytest.raises(ConfigError, match="unknown tracking URI scheme 'ftp'"):
        validate(bad_scheme)


def test_ray_without_its_dashboard_extra_is_refused(tiny_model_dir, tiny_jsonl, tmp_path, monkeypatch) -> None:
    """Without ray[default]'s dashboard modules a trial's GPUs are never handed back (the next trial hangs): that is
    refused before any compute, naming what is missing and the install that fixes it."""
    from lora_search import preflight

    sweep = Sweep(
        name="t",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset(str(tiny_jsonl)),
        output_dir=str(tmp_path),
        tracking_uri="off",
    )
    preflight.validate(sweep)  # this machine has ray[default]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(preflight, "RAY_DASHBOARD_MODULES", ("aiohttp_cors", "no_such_module_xyz"))
    with pytest.raises(ConfigError) as e:
        preflight.validate(sweep)
    assert [p.field for p in e.value.problems] == ["ray"]
    assert "ray[default] missing no_such_module_xyz" in str(e.value)
    assert "pip install 'ray[default,tune,train]'" in str(e.value)
