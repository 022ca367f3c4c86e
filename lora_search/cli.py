"""`lora-search`: the command line.

    lora-search validate sweeps/tiny.py     # every problem at once; exit 2 if any, Ray never started
    lora-search run sweeps/tiny.py          # validate, then run (or resume) the sweep
    lora-search run --fresh sweeps/tiny.py  # move earlier results aside first
    lora-search eval sweeps/tiny.py [--adapters DIR ...]  # rescore saved adapters on the golden sets

A sweep file is a Python file that defines one `Sweep` (conventionally `SWEEP`) at module level.
Exit codes: 0 ok, 2 invalid sweep (nothing ran), 3 results exist (nothing overwritten), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from lora_search.config import ConfigError, Problem, Sweep, collecting_problems

EXIT_INVALID = 2
EXIT_EXISTS = 3


def load_sweep(path: str | Path) -> tuple[Sweep, list[Problem]]:
    """Import a sweep file and return its Sweep plus the construction problems it had (not raised)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem("sweep file", str(path), "not found", "give the path of a sweeps/*.py file")])
    spec = importlib.util.spec_from_file_location(f"lora_search_sweep_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with collecting_problems() as problems:
        spec.loader.exec_module(module)
    found = [v for v in vars(module).values() if isinstance(v, Sweep)]
    if not found:
        raise ConfigError([Problem("sweep file", str(path), "defines no Sweep", "assign SWEEP = Sweep(...)")])
    sweep = vars(module).get("SWEEP", found[0])
    return sweep, problems


def _validate(sweep: Sweep, problems: list[Problem]) -> int:
    from lora_search.preflight import validate

    validate(sweep, problems)
    print(f"sweep {sweep.name!r} is valid")
    return 0


def _run(sweep: Sweep, problems: list[Problem], fresh: bool) -> int:
    from lora_search.sweep import run

    run(sweep, fresh=fresh, construction_problems=problems)
    return 0


def _eval(sweep: Sweep, problems: list[Problem], adapters: list[str] | None, output: str | None) -> int:
    import pandas as pd

    from lora_search.evals import rescore
    from lora_search.sweep import sweep_dir

    if problems:
        raise ConfigError(problems, header=f"invalid sweep {sweep.name!r}")
    if sweep.evals is None:
        raise ConfigError([Problem("evals", None, "the sweep names no golden sets", "set evals=Evals(...)")])
    if adapters:
        dirs = [Path(a) for a in adapters]
    else:
        parquet = sweep_dir(sweep) / "trials.parquet"
        if not parquet.is_file():
            raise ConfigError(
                [
                    Problem(
                        "sweep results",
                        str(parquet),
                        "not found",
                        "run the sweep first, or name adapter dirs with --adapters",
                    )
                ],
                header="nothing to score",
            )
        trials = pd.read_parquet(parquet)
        dirs = [Path(p) for p in trials["adapter_path"] if p]
    missing = [str(d) for d in dirs if not (d / "adapter_config.json").is_file()]
    if missing or not dirs:
        raise ConfigError(
            [Problem("adapters", m, "not a PEFT adapter dir (no adapter_config.json)", "") for m in missing]
            or [Problem("adapters", None, "no adapters to score", "run the sweep first")]
        )
    rows = rescore(sweep, dirs)
    print(pd.DataFrame(rows).to_string(index=False))
    if output:
        Path(output).write_text(json.dumps(rows, indent=1))
    return 0


def _guarded(action) -> int:  # noqa: ANN001
    from lora_search.sweep import SweepExistsError

    try:
        return action()
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID
    except SweepExistsError as e:
        print(e, file=sys.stderr)
        return EXIT_EXISTS


def run_sweep_main(sweep: Sweep, argv: list[str] | None = None) -> None:
    """`python sweeps/NAME.py [--validate] [--fresh]`."""
    parser = argparse.ArgumentParser(description=f"run the {sweep.name!r} sweep")
    parser.add_argument("--validate", action="store_true", help="only check the sweep, start nothing")
    parser.add_argument("--fresh", action="store_true", help="move earlier results of this sweep aside first")
    args = parser.parse_args(argv)
    if args.validate:
        sys.exit(_guarded(lambda: _validate(sweep, [])))
    sys.exit(_guarded(lambda: _run(sweep, [], args.fresh)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-search", description="LoRA hyperparameter sweeps on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p_validate = sub.add_parser("validate", help="check a sweep file; start nothing")
    p_validate.add_argument("sweep_file")
    p_run = sub.add_parser("run", help="validate and run (or resume) a sweep")
    p_run.add_argument("sweep_file")
    p_run.add_argument("--fresh", action="store_true", help="move earlier results of this sweep aside first")
    p_eval = sub.add_parser("eval", help="score saved adapters on the sweep's golden sets (one base load)")
    p_eval.add_argument("sweep_file")
    p_eval.add_argument("--adapters", nargs="+", help="adapter dirs (default: every adapter of the sweep)")
    p_eval.add_argument("--output", help="also write the scores as JSON here")
    args = parser.parse_args(argv)

    def load_and(action):  # noqa: ANN001, ANN202
        def go() -> int:
            sweep, problems = load_sweep(args.sweep_file)
            return action(sweep, problems)

        return go

    if args.command == "validate":
        sys.exit(_guarded(load_and(_validate)))
    if args.command == "eval":
        sys.exit(_guarded(load_and(lambda s, p: _eval(s, p, args.adapters, args.output))))
    if args.command == "run":
        sys.exit(_guarded(load_and(lambda s, p: _run(s, p, args.fresh))))


if __name__ == "__main__":
    main()
